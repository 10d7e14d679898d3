//! `broca score`: gradient × weight importance per language (resumable, shardable), plus
//! `broca score merge` (adds shard results) and `broca score diff` (stability scores).

use super::args;
use crate::data;
use crate::lock::Lock;
use crate::memory;
use crate::model::Model;
use crate::outln;
use crate::progress::bar;
use crate::score::files::Store;
use crate::score::plan::{self, Include};
use crate::score::{self, run, windows};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ScoreArgs {
    #[command(subcommand)]
    pub cmd: Option<ScoreCmd>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum ScoreCmd {
    /// Adds the shard results under DIR/.partial/ into DIR/<lang>.safetensors.
    Merge(MergeArgs),
    /// Stability scores |θ_tuned − θ_base| (or relative) of two checkpoints.
    Diff(DiffArgs),
}

/// Importance scores |θ ⊙ g|, g = mean over windows of ∇ mean-NLL(window).
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    #[command(flatten)]
    pub inputs: super::TextArgs,
    /// Token budget per language: use the first N tokens of each text (default: all; at
    /// least 2).
    #[arg(long, value_parser = args::token_budget)]
    pub tokens: Option<usize>,
    /// Window length in tokens (non-overlapping windows; a trailing partial window is dropped;
    /// at least 2).
    #[arg(long, default_value_t = 512, value_parser = args::seq_len)]
    pub seq_len: usize,
    /// Windows per forward/backward pass (at least 1).
    #[arg(long, default_value_t = 1, value_parser = args::positive_usize)]
    pub batch: usize,
    /// Process only the i-th of n contiguous slices of the windows (0-based, e.g. 0/4);
    /// combine with `broca score merge`.
    #[arg(long)]
    pub shard: Option<String>,
    /// Checkpoint the running sum under DIR/.partial/ at least this often (seconds).
    #[arg(long, default_value_t = 300.0, value_parser = args::non_negative_f64)]
    pub checkpoint_secs: f64,
    /// Also checkpoint every K windows (at least 1).
    #[arg(long, value_parser = args::positive_usize)]
    pub checkpoint_windows: Option<usize>,
    /// Tests: exit with an error after K windows of this call, without saving (simulates a kill).
    #[arg(long, hide = true, value_parser = args::positive_usize)]
    pub stop_after_windows: Option<usize>,
    /// Which parameters get scores: `layers` (the model.layers.* tensors regions use) or
    /// `all` (also embeddings, final norm, lm_head).
    #[arg(long, default_value = "layers")]
    pub include: String,
    /// Score only layers A-B (inclusive) in one pass, as a partial for `score merge`
    /// (one job of a layer-split run, e.g. a Slurm array task).
    #[arg(long)]
    pub layers: Option<String>,
    /// Memory budget (e.g. 16G, 800M); passes over layer groups are planned to stay under
    /// it. Default: 80% of the available memory (cgroup and address-space limits included).
    #[arg(long)]
    pub mem_limit: Option<String>,
    /// How scores are stored: f32 or bf16 (metadata `dtype`).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Output folder: DIR/<lang>.safetensors per language.
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The folder given as --out to the shard runs.
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The base checkpoint (GGUF file or HF directory).
    #[arg(long)]
    pub base: PathBuf,
    /// The further-trained checkpoint, with the same parameter names and shapes.
    #[arg(long)]
    pub tuned: PathBuf,
    /// Output score file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// |Δθ| / (|θ_base| + eps) instead of |Δθ|.
    #[arg(long)]
    pub relative: bool,
    /// ε of --relative (finite, > 0).
    #[arg(long, default_value_t = 1e-8, value_parser = args::positive_f64)]
    pub eps: f64,
    /// The `lang` metadata (e.g. the language the model was tuned on).
    #[arg(long, default_value = "diff")]
    pub lang: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct ScoreOutput {
    model: String,
    out: PathBuf,
    seq_len: usize,
    batch: usize,
    shard: Option<String>,
    seconds: f64,
    tokens_per_second: f64,
    results: Vec<run::Outcome>,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    match a.cmd {
        Some(ScoreCmd::Merge(m)) => merge(m),
        Some(ScoreCmd::Diff(d)) => diff(d),
        None => score(a.run),
    }
}

fn score(a: RunArgs) -> Result<()> {
    let Some(out) = a.out.clone() else {
        bail!("--out DIR is required")
    };
    let shard = a
        .shard
        .as_deref()
        .map(str::parse::<windows::Shard>)
        .transpose()?;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if a.seq_len < 2 {
        bail!("--seq-len must be at least 2");
    }
    if a.tokens.is_some_and(|n| n < 2) {
        bail!("--tokens must be at least 2");
    }
    let include: Include = a.include.parse()?;
    let dtype = Store::parse_score_dtype(&a.dtype)?;
    let limit = memory::limit_or_default(a.mem_limit.as_deref())?;
    let inputs = a.inputs.gather(None)?;
    for t in &inputs {
        run::check_lang(&t.lang)?;
        data::check_text(&t.path, a.tokens)?;
    }
    // one lock per (language, shard) this run writes, all taken before any work: parallel
    // jobs of other languages or shards go on, a second run of the same unit stops here
    let layers_tag = a.layers.as_deref().map(|l| format!("layers-{}", l.trim()));
    let locks = UnitLocks::take(&out, &inputs, shard, layers_tag.as_deref())?;
    let model = Model::load(&a.model)?;
    let sha = score::model_sha256(&a.model)?;
    let tok = model.tokenizer()?;
    let mut ids = Vec::new();
    for t in &inputs {
        ids.push(data::text_tokens(tok, &t.path, a.tokens)?);
    }
    let forced = a
        .layers
        .as_deref()
        .map(|s| plan::parse_layers(s, model.config.num_layers))
        .transpose()?;
    let passes = plan::plan(&model, include, forced, a.batch, a.seq_len, limit)?;
    eprintln!("score: {}", passes.plan);
    let opts = run::Options {
        seq_len: a.seq_len,
        batch: a.batch,
        shard,
        checkpoint_secs: a.checkpoint_secs,
        checkpoint_windows: a.checkpoint_windows,
        stop_after_windows: a.stop_after_windows,
        include,
        forced_layers: forced.is_some(),
        dtype,
        groups: passes.groups.clone(),
    };
    let total: usize = ids
        .iter()
        .map(|v| -> Result<usize> {
            let w = windows::windows(v.len(), a.seq_len)?;
            let r = shard.map(|s| s.range(w.len())).unwrap_or(0..w.len());
            Ok(w[r].iter().map(|x| x.len()).sum())
        })
        .sum::<Result<usize>>()?;
    let pb = bar((total * opts.groups.len()) as u64, "score", "tok");
    let job = run::Job {
        model: &model,
        model_sha256: &sha,
        out: &out,
    };
    let start = std::time::Instant::now();
    let mut results = Vec::new();
    let mut computed = 0usize;
    for (t, v) in inputs.iter().zip(&ids) {
        pb.set_message(format!("score {}", t.lang));
        let o = run::score_language(&job, &t.lang, v, &opts, &mut |n| pb.inc(n as u64))
            .with_context(|| format!("score: {}", t.path.display()))?;
        computed += o.computed_tokens;
        results.push(o);
    }
    pb.finish_and_clear();
    drop(locks);
    let secs = start.elapsed().as_secs_f64();
    let o = ScoreOutput {
        model: a.model.display().to_string(),
        out,
        seq_len: a.seq_len,
        batch: a.batch,
        shard: shard.map(|s| s.to_string()),
        seconds: secs,
        tokens_per_second: computed as f64 / secs.max(1e-9),
        results,
    };
    if a.json {
        return super::print_json(&o);
    }
    print_table(&o.results)?;
    outln!(
        "total {:.1} s, {:.1} tokens/s computed",
        o.seconds,
        o.tokens_per_second
    )?;
    Ok(())
}

fn print_table(results: &[run::Outcome]) -> Result<()> {
    outln!(
        "{:<8} {:<8} {:>8} {:>8} {:>9} {:>9}  file",
        "lang",
        "status",
        "windows",
        "tokens",
        "seconds",
        "tok/s"
    )?;
    for r in results {
        outln!(
            "{:<8} {:<8} {:>8} {:>8} {:>9.1} {:>9.1}  {}",
            r.lang,
            r.status,
            r.windows,
            r.tokens,
            r.seconds,
            r.tokens_per_second,
            r.file.display()
        )?;
    }
    Ok(())
}

fn merge(a: MergeArgs) -> Result<()> {
    let locks = UnitLocks::take_merge(&a.out)?;
    let results = run::merge(&a.out)?;
    drop(locks);
    if a.json {
        return super::print_json(&serde_json::json!({"out": a.out, "results": results}));
    }
    print_table(&results)
}

fn diff(a: DiffArgs) -> Result<()> {
    let _lock = Lock::file(&a.out)?;
    let base = Model::load(&a.base)?;
    let tuned = Model::load(&a.tuned)?;
    score::diff::check_same_params(&base, &a.base, &tuned, &a.tuned)?;
    let (bs, ts) = (
        score::model_sha256(&a.base)?,
        score::model_sha256(&a.tuned)?,
    );
    score::diff::write_diff(&base, &bs, &tuned, &ts, &a.lang, a.relative, a.eps, &a.out)?;
    let method = if a.relative {
        score::METHOD_DIFF_RELATIVE
    } else {
        score::METHOD_DIFF
    };
    if a.json {
        return super::print_json(&serde_json::json!({
            "base": a.base, "tuned": a.tuned, "out": a.out, "method": method, "lang": a.lang,
            "params": base.num_params(),
        }));
    }
    outln!(
        "{} ({method}, {} parameters) written to {}",
        a.lang,
        base.num_params(),
        a.out.display()
    )?;
    Ok(())
}

/// The locks of a score run: one per (language, shard) unit under `DIR/.partial/`
/// (`.<lang>[.shard-i-of-n].broca.lock`), released in reverse order; then an empty
/// `DIR/.partial/` is removed, so only the results stay beside each other.
struct UnitLocks {
    out: PathBuf,
    locks: Vec<Lock>,
}

impl UnitLocks {
    fn take(
        out: &std::path::Path,
        inputs: &[data::TextInput],
        shard: Option<windows::Shard>,
        layers: Option<&str>,
    ) -> Result<UnitLocks> {
        let dir = run::partial_dir(out);
        let mut u = UnitLocks {
            out: out.to_path_buf(),
            locks: Vec::new(),
        };
        for t in inputs {
            let mut unit = match shard {
                Some(s) => format!("{}.{}", t.lang, s.tag()),
                None => t.lang.clone(),
            };
            let mut what = match shard {
                Some(s) => format!("{} (language {}, shard {s}", out.display(), t.lang),
                None => format!("{} (language {}", out.display(), t.lang),
            };
            if let Some(l) = layers {
                unit = format!("{unit}.{l}");
                what = format!("{what}, {l}");
            }
            what.push(')');
            u.locks
                .push(Lock::part(&dir, &unit, std::path::Path::new(&what))?);
        }
        // temporary results of killed runs sit beside the results
        crate::io::sweep_stale(out, 0);
        Ok(u)
    }

    /// `score merge` writes `DIR/<lang>.safetensors` of every language with shard results:
    /// it takes those languages' units.
    fn take_merge(out: &std::path::Path) -> Result<UnitLocks> {
        let dir = run::partial_dir(out);
        let mut langs = std::collections::BTreeSet::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if let Some((lang, _, _)) = run::parse_partial_name(&name) {
                    langs.insert(lang);
                }
            }
        }
        let inputs: Vec<data::TextInput> = langs
            .into_iter()
            .map(|lang| data::TextInput {
                lang,
                path: PathBuf::new(),
            })
            .collect();
        UnitLocks::take(out, &inputs, None, None)
    }
}

impl Drop for UnitLocks {
    fn drop(&mut self) {
        while let Some(l) = self.locks.pop() {
            drop(l);
        }
        crate::io::sweep_stale(&self.out, 0);
        let _ = std::fs::remove_dir(run::partial_dir(&self.out));
    }
}
