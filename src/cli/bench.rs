//! `broca bench`: speed and memory.

use super::args;
use crate::bench;
use crate::memory;
use crate::model::Model;
use crate::outln;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    /// Window length in tokens (at least 2).
    #[arg(long, default_value_t = 512, value_parser = args::seq_len)]
    pub seq_len: usize,
    /// Timed repetitions (after one warm-up; at least 1).
    #[arg(long, default_value_t = 5, value_parser = args::positive_usize)]
    pub reps: usize,
    /// Measure the matmul and the forward only: no gradient memory is allocated, and the
    /// forward+backward and score figures are null.
    #[arg(long)]
    pub skip_backward: bool,
    // --mem-limit: refuses when the forward does not fit; skips (reports as null) the
    // forward+backward and score rounds whose estimate does not
    #[command(flatten)]
    pub mem: super::MemArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// A rate for the table, or why its round did not run.
fn rate(v: Option<f64>, round: &str, r: &bench::BenchResult) -> String {
    match v {
        Some(v) => format!("{v:>9.1} tok/s"),
        None => match r.skipped.get(round).map(String::as_str) {
            Some("memory") => "skipped (memory)".into(),
            Some("skip-backward") => "skipped (--skip-backward)".into(),
            _ => "-".into(),
        },
    }
}

/// `(N% of ceiling C)`, or nothing when the rate is missing.
fn of_ceiling(f: Option<f64>, ceiling: f64) -> String {
    f.map_or(String::new(), |f| {
        format!("  ({:.0}% of ceiling {:.0})", 100.0 * f, ceiling)
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    let limit = a.mem.limit()?;
    let model = Model::load(&a.model)?;
    let name = a
        .model
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    super::announce_plan("bench", &memory::forward_plan(&model, 1, a.seq_len, limit))?;
    let r = bench::run(&model, &name, a.seq_len, a.reps, !a.skip_backward, limit)?;
    if a.json {
        return super::print_json(&r);
    }
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.0}%", 100.0 * v));
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    outln!(
        "model {} ({} params), seq {}, {} threads",
        r.model,
        r.params,
        r.seq_len,
        r.threads
    )?;
    outln!("matmul 2048^3 f32     {:>9.1} GFLOP/s", r.matmul_gflops)?;
    outln!(
        "forward               {}{}",
        rate(r.forward_tok_s, "forward", &r),
        of_ceiling(r.forward_fraction_of_ceiling, r.forward_ceiling_tok_s)
    )?;
    outln!(
        "forward+backward      {}{}",
        rate(r.fwd_bwd_tok_s, "fwd_bwd", &r),
        of_ceiling(r.fwd_bwd_fraction_of_ceiling, r.forward_ceiling_tok_s / 3.0)
    )?;
    outln!(
        "score window          {}{}",
        rate(r.score_tok_s, "score", &r),
        r.score_to_forward_ratio
            .map_or(String::new(), |x| format!("  ({x:.3} of forward)"))
    )?;
    outln!(
        "from CPU time: matmul {:.1} GFLOP/s, forward {} tok/s ({}), forward+backward {} tok/s ({})",
        r.cpu_matmul_gflops,
        num(r.cpu_forward_tok_s),
        pct(r.cpu_forward_fraction_of_ceiling),
        num(r.cpu_fwd_bwd_tok_s),
        pct(r.cpu_fwd_bwd_fraction_of_ceiling)
    )?;
    outln!(
        "memory estimates: forward {:.0} MB, forward+backward {:.0} MB, score {:.0} MB; limit {:.0} MB",
        r.estimated_mb.forward,
        r.estimated_mb.fwd_bwd,
        r.estimated_mb.score,
        r.mem_limit_mb
    )?;
    outln!("peak RSS              {:>9.1} MB", r.peak_rss_mb)?;
    Ok(())
}
