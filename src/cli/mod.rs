//! The `broca` command line: one subcommand per task. `--json` prints exactly one JSON
//! object on stdout; progress and logs go to stderr.

mod bench;
mod generate;
mod ppl;
pub mod progress;

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
    }
}

/// Prints one JSON object on stdout.
pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
