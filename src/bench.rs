//! `broca bench`: this machine's matmul peak and the model's forward and forward+backward
//! speed, measured in one run so that their ratios are meaningful on a noisy machine.

use crate::model::Model;
use crate::score::accumulate::GradSum;
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
    /// The same three rates from CPU time (all threads' on-CPU time / threads) instead of
    /// wall time: less sensitive to other processes competing for the cores.
    pub cpu_matmul_gflops: f64,
    pub cpu_forward_tok_s: f64,
    pub cpu_fwd_bwd_tok_s: f64,
    pub cpu_forward_fraction_of_ceiling: f64,
    pub cpu_fwd_bwd_fraction_of_ceiling: f64,
    /// One window of `broca score`'s work (forward, backward, accumulation into the f64
    /// sums, [`GradSum::add_batch`]) in tokens/s, and its ratio to the forward (`ppl`'s work
    /// per window), the median of per-round ratios.
    pub score_tok_s: f64,
    pub score_to_forward_ratio: f64,
    /// The same ratio from CPU time.
    pub cpu_score_to_forward_ratio: f64,
}

/// Seconds this process's threads have been on a CPU (sum of /proc/self/task/*/schedstat).
pub fn cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .sum::<f64>()
        / 1e9
}

fn square_operands(n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (vec![1.0f32; n * n], vec![0.5f32; n * n], vec![0f32; n * n])
}

/// `c = a · b` for n×n row-major f32 matrices with gemm on all rayon threads.
fn square_gemm(n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() == n * n && b.len() == n * n && c.len() == n * n);
    let threads = rayon::current_num_threads();
    // SAFETY: all three buffers are n×n, row-major (checked above), and do not alias.
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

/// One timed call: (wall seconds, CPU seconds / threads).
fn time_once(mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let threads = rayon::current_num_threads() as f64;
    let (t, c) = (Instant::now(), cpu_seconds());
    f()?;
    Ok((t.elapsed().as_secs_f64(), (cpu_seconds() - c) / threads))
}

/// Runs the benchmark on `model` with windows of `seq_len` tokens, `reps` timed rounds.
/// With `backward` false the forward+backward figures are 0.
///
/// Each round times the 2048³ matmul (best of three), a forward, a forward+backward and a
/// score window back to back, so that every round's ratios compare work done under the same machine load; the
/// reported rates and ratios are medians over rounds, after one warm-up round.
pub fn run(
    model: &Model,
    name: &str,
    seq_len: usize,
    reps: usize,
    backward: bool,
) -> Result<BenchResult> {
    let n = 2048usize;
    let (a, b, mut c) = square_operands(n);
    let flop = 2.0 * (n * n * n) as f64 / 1e9;
    let ids: Vec<u32> = (0..seq_len)
        .map(|i| ((i * 7919 + 13) % model.config.vocab_size) as u32)
        .collect();
    let x = Model::ids_tensor(&ids)?;
    let forward = || -> Result<()> {
        let nll = model.token_nll(&x, false)?;
        nll.sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        Ok(())
    };
    // what a training step computes: the loss and every parameter's dense gradient
    let fwd_bwd = || -> Result<()> {
        drop(model.mean_nll_and_grads(&x)?);
        Ok(())
    };
    let mut sums = backward.then(|| GradSum::zeros(model));
    let window = vec![std::ops::Range {
        start: 0,
        end: seq_len,
    }];
    // per round: (matmul wall, matmul cpu, fwd wall, fwd cpu, fwd+bwd wall, fwd+bwd cpu,
    // score wall, score cpu)
    let mut rounds: Vec<[f64; 8]> = Vec::new();
    for i in 0..reps.max(1) + 1 {
        let mut mm = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            let (w, c_) = time_once(|| {
                square_gemm(n, &a, &b, &mut c);
                Ok(())
            })?;
            mm = (mm.0.min(w), mm.1.min(c_));
        }
        let f = time_once(forward)?;
        let fb = if backward {
            time_once(fwd_bwd)?
        } else {
            (f64::INFINITY, f64::INFINITY)
        };
        let sc = match sums.as_mut() {
            Some(acc) => time_once(|| acc.add_batch(model, &ids, &window))?,
            None => (f64::INFINITY, f64::INFINITY),
        };
        if i > 0 {
            rounds.push([mm.0, mm.1, f.0, f.1, fb.0, fb.1, sc.0, sc.1]);
        }
    }
    drop((a, b, c, sums));
    let t = seq_len as f64;
    let params = model.num_params() as f64;
    let med = |g: &dyn Fn(&[f64; 8]) -> f64| -> f64 {
        let mut v: Vec<f64> = rounds.iter().map(g).collect();
        median(&mut v)
    };
    // ceiling of a round in tokens/s from its matmul time
    let ceil = |mm_s: f64| flop / mm_s * 1e9 / (2.0 * params);
    let fractions = (
        med(&|r| t / r[2] / ceil(r[0])),
        med(&|r| t / r[4] / (ceil(r[0]) / 3.0)),
        med(&|r| t / r[3] / ceil(r[1])),
        med(&|r| t / r[5] / (ceil(r[1]) / 3.0)),
    );
    let (gflops, cpu_gflops) = (med(&|r| flop / r[0]), med(&|r| flop / r[1]));
    let (f, b, cf, cb) = (
        med(&|r| t / r[2]),
        med(&|r| t / r[4]),
        med(&|r| t / r[3]),
        med(&|r| t / r[5]),
    );
    let ceiling = gflops * 1e9 / (2.0 * params);
    Ok(BenchResult {
        matmul_gflops: gflops,
        forward_tok_s: f,
        fwd_bwd_tok_s: b,
        peak_rss_mb: peak_rss_mb(),
        threads: rayon::current_num_threads(),
        seq_len,
        model: name.to_string(),
        params: params as usize,
        forward_ceiling_tok_s: ceiling,
        forward_fraction_of_ceiling: fractions.0,
        fwd_bwd_fraction_of_ceiling: fractions.1,
        cpu_matmul_gflops: cpu_gflops,
        cpu_forward_tok_s: cf,
        cpu_fwd_bwd_tok_s: cb,
        cpu_forward_fraction_of_ceiling: fractions.2,
        cpu_fwd_bwd_fraction_of_ceiling: fractions.3,
        score_tok_s: med(&|r| t / r[6]),
        score_to_forward_ratio: med(&|r| r[2] / r[6]),
        cpu_score_to_forward_ratio: med(&|r| r[3] / r[7]),
    })
}
