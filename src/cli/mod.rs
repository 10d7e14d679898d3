//! The `broca` command line: one subcommand per task. `--json` prints exactly one JSON
//! object on stdout; progress and logs go to stderr.

mod ablate;
pub mod args;
mod bench;
mod dims;
mod forget;
mod generate;
pub mod output;
mod perturb;
mod ppl;
pub mod region;
mod reproduce;
mod score;
mod superweights;
mod synth;
pub mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Broca: find, test and use the linguistic regions of large language models.
#[derive(Parser, Debug)]
#[command(name = "broca", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Perplexity and bits per byte per language (token-weighted, windows of --seq-len).
    Ppl(ppl::PplArgs),
    /// Greedy (or sampled) continuation of a prompt.
    Generate(generate::GenerateArgs),
    /// Matmul peak, forward and forward+backward tokens/s, peak memory.
    Bench(bench::BenchArgs),
    /// Apply an op to a region and save the perturbed model (HF checkpoint).
    Perturb(perturb::PerturbArgs),
    /// PPL per language under region perturbations and equal-size controls.
    Ablate(ablate::AblateArgs),
    /// Scan single RMSNorm entries (two stages), or `dims structured` for whole dimensions.
    Dims(dims::DimsArgs),
    /// Super-weight candidates in mlp.down_proj, verified by zeroing each.
    Superweights(superweights::SuperweightsArgs),
    /// Importance scores |θ·g| per language (resumable, --shard i/n, `merge`), or `diff` (stability).
    Score(score::ScoreArgs),
    /// Regions (masks): core, mono, random, ops, compare, stats (concentration, heatmaps), bench.
    Region(region::RegionArgs),
    /// Further pretraining with frozen regions (masked AdamW), eval curves, exact resume.
    Train(train::TrainArgs),
    /// Forgetting experiment: train with nothing / a region / a random region frozen (+ compensation).
    Forget(forget::ForgetArgs),
    /// The whole study (baseline → importance → regions → ablation → … ) with an HTML report; resumable.
    Reproduce(reproduce::ReproduceArgs),
    /// A random checkpoint shaped like Qwen2.5-7B (or --preset tiny), streamed to safetensors shards.
    Synth(synth::SynthArgs),
}

/// The default model: SmolLM2-135M from the assets folder.
pub fn default_model() -> PathBuf {
    crate::data::assets_dir().join("smollm2-135m-instruct-q4_1.gguf")
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ppl(a) => ppl::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Perturb(a) => perturb::run(a),
        Command::Ablate(a) => ablate::run(a),
        Command::Dims(a) => dims::run(a),
        Command::Superweights(a) => superweights::run(a),
        Command::Region(a) => region::run(a),
        Command::Score(a) => score::run(a),
        Command::Train(a) => train::run(a),
        Command::Forget(a) => forget::run(a),
        Command::Reproduce(a) => reproduce::run(a),
        Command::Synth(a) => synth::run(a),
    }
}

/// The text-input flags shared by commands that read texts (`--text`, `--lang`, `--data`).
#[derive(clap::Args, Debug)]
pub struct TextArgs {
    /// Text files (language = file stem).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub text: Vec<String>,
    /// NAME=FILE pairs.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub lang: Vec<String>,
    /// A folder of *.txt (language = stem) or NAME=FILE pairs (`ppl` defaults to the UDHR folder).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub data: Vec<String>,
}

impl TextArgs {
    /// The named texts these flags give; `default` is used when none is given.
    pub fn gather(&self, default: Option<&std::path::Path>) -> Result<Vec<crate::data::TextInput>> {
        crate::data::gather(&self.text, &self.lang, &self.data, "--data", default)
    }
}

/// `--mem-limit`, shared by the commands that load a model.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MemArgs {
    /// Memory budget (e.g. 16G, 800M): the command prints its memory plan and refuses
    /// before any work when the plan needs more. Default: 80% of the available memory
    /// (cgroup and address-space limits included).
    #[arg(long, value_name = "SIZE")]
    pub mem_limit: Option<String>,
}

impl MemArgs {
    /// The limit in bytes: the flag's size, or the default.
    pub fn limit(&self) -> Result<u64> {
        crate::memory::limit_or_default(self.mem_limit.as_deref())
    }
}

/// Checks `plan` against its limit (an error with the arithmetic when it needs more), then
/// prints it on stderr as the one line `CMD: memory plan: …`.
pub fn announce_plan(cmd: &str, plan: &crate::memory::Plan) -> Result<()> {
    plan.check(cmd)?;
    eprintln!("{cmd}: {plan}");
    Ok(())
}

pub use output::print_json;
