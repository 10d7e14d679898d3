//! `broca bench`: speed and memory.

use super::args;
use crate::bench;
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
    /// Measure the forward only (forward+backward reported as 0).
    #[arg(long)]
    pub skip_backward: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let name = a
        .model
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let r = bench::run(&model, &name, a.seq_len, a.reps, !a.skip_backward)?;
    if a.json {
        return super::print_json(&r);
    }
    outln!(
        "model {} ({} params), seq {}, {} threads",
        r.model,
        r.params,
        r.seq_len,
        r.threads
    )?;
    outln!("matmul 2048^3 f32     {:>9.1} GFLOP/s", r.matmul_gflops)?;
    outln!(
        "forward               {:>9.1} tok/s  ({:.0}% of ceiling {:.0})",
        r.forward_tok_s,
        100.0 * r.forward_fraction_of_ceiling,
        r.forward_ceiling_tok_s
    )?;
    outln!(
        "forward+backward      {:>9.1} tok/s  ({:.0}% of ceiling {:.0})",
        r.fwd_bwd_tok_s,
        100.0 * r.fwd_bwd_fraction_of_ceiling,
        r.forward_ceiling_tok_s / 3.0
    )?;
    if !a.skip_backward {
        outln!(
            "score window          {:>9.1} tok/s  ({:.3} of forward)",
            r.score_tok_s,
            r.score_to_forward_ratio
        )?;
    }
    outln!(
        "from CPU time: matmul {:.1} GFLOP/s, forward {:.1} tok/s ({:.0}%), forward+backward {:.1} tok/s ({:.0}%)",
        r.cpu_matmul_gflops,
        r.cpu_forward_tok_s,
        100.0 * r.cpu_forward_fraction_of_ceiling,
        r.cpu_fwd_bwd_tok_s,
        100.0 * r.cpu_fwd_bwd_fraction_of_ceiling
    )?;
    outln!("peak RSS              {:>9.1} MB", r.peak_rss_mb)?;
    Ok(())
}
