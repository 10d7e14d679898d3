//! `broca bench`: this machine's matmul peak and the model's forward and forward+backward
//! speed, measured in one run so that their ratios are meaningful on a noisy machine.

use crate::model::Model;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

/// Results in the JSON shape of CONVENTIONS.md.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub matmul_gflops: f64,
    pub forward_tok_s: f64,
    pub fwd_bwd_tok_s: f64,
    pub peak_rss_mb: f64,
    pub threads: usize,
    pub seq_len: usize,
    pub model: String,
    pub params: usize,
    /// matmul_gflops / (2 × params per token): the forward ceiling in tokens/s.
    pub forward_ceiling_tok_s: f64,
    pub forward_fraction_of_ceiling: f64,
    pub fwd_bwd_fraction_of_ceiling: f64,
}

/// f32 GFLOP/s of an n×n×n matmul with gemm's best kernel, median of `reps`.
pub fn matmul_gflops(n: usize, reps: usize) -> f64 {
    let a = vec![1.0f32; n * n];
    let b = vec![0.5f32; n * n];
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    let mut times = Vec::new();
    for _ in 0..reps + 1 {
        let t = Instant::now();
        // SAFETY: all three buffers are n×n, row-major, and do not alias.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.remove(0);
    2.0 * (n * n * n) as f64 / median(&mut times) / 1e9
}

/// Median of a slice.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak resident set size of this process in MB (VmHWM).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Runs the benchmark on `model` with windows of `seq_len` tokens, `reps` timed runs each.
/// With `backward` false the forward+backward figures are 0.
pub fn run(
    model: &Model,
    name: &str,
    seq_len: usize,
    reps: usize,
    backward: bool,
) -> Result<BenchResult> {
    let gflops = matmul_gflops(2048, 5);
    let ids: Vec<u32> = (0..seq_len)
        .map(|i| ((i * 7919 + 13) % model.config.vocab_size) as u32)
        .collect();
    let x = Model::ids_tensor(&ids)?;
    let mut fwd = Vec::new();
    for i in 0..reps + 1 {
        let t = Instant::now();
        let nll = model.token_nll(&x, false)?;
        nll.sum_all()?.to_scalar::<f32>()?;
        if i > 0 {
            fwd.push(t.elapsed().as_secs_f64());
        }
    }
    let mut fb = Vec::new();
    for i in 0..if backward { reps + 1 } else { 0 } {
        let t = Instant::now();
        let loss = model.mean_nll(&x)?;
        let grads = loss.backward()?;
        drop(grads);
        if i > 0 {
            fb.push(t.elapsed().as_secs_f64());
        }
    }
    let params = model.num_params();
    let ceiling = gflops * 1e9 / (2.0 * params as f64);
    let f = seq_len as f64 / median(&mut fwd);
    let b = if backward {
        seq_len as f64 / median(&mut fb)
    } else {
        0.0
    };
    Ok(BenchResult {
        matmul_gflops: gflops,
        forward_tok_s: f,
        fwd_bwd_tok_s: b,
        peak_rss_mb: peak_rss_mb(),
        threads: rayon::current_num_threads(),
        seq_len,
        model: name.to_string(),
        params,
        forward_ceiling_tok_s: ceiling,
        forward_fraction_of_ceiling: f / ceiling,
        fwd_bwd_fraction_of_ceiling: b / (ceiling / 3.0),
    })
}
