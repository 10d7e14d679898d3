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
    /// The same three rates from CPU time (all threads' on-CPU time / threads) instead of
    /// wall time: less sensitive to other processes competing for the cores.
    pub cpu_matmul_gflops: f64,
    pub cpu_forward_tok_s: f64,
    pub cpu_fwd_bwd_tok_s: f64,
    pub cpu_forward_fraction_of_ceiling: f64,
    pub cpu_fwd_bwd_fraction_of_ceiling: f64,
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

/// Median wall seconds and median CPU seconds / threads of `reps` runs of `f` after one
/// warm-up run.
fn measure(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let threads = rayon::current_num_threads() as f64;
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for i in 0..reps + 1 {
        let (t, c) = (Instant::now(), cpu_seconds());
        f()?;
        if i > 0 {
            wall.push(t.elapsed().as_secs_f64());
            cpu.push((cpu_seconds() - c) / threads);
        }
    }
    Ok((median(&mut wall), median(&mut cpu)))
}

/// f32 GFLOP/s of an n×n×n matmul with gemm's best kernel, median of `reps`.
pub fn matmul_gflops(n: usize, reps: usize) -> f64 {
    let (a, b, mut c) = square_operands(n);
    let (wall, _) = measure(reps.max(1), || {
        square_gemm(n, &a, &b, &mut c);
        Ok(())
    })
    .unwrap_or((f64::INFINITY, 0.0));
    2.0 * (n * n * n) as f64 / wall / 1e9
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

/// Runs the benchmark on `model` with windows of `seq_len` tokens, `reps` timed runs each.
/// With `backward` false the forward+backward figures are 0.
pub fn run(
    model: &Model,
    name: &str,
    seq_len: usize,
    reps: usize,
    backward: bool,
) -> Result<BenchResult> {
    let n = 2048usize;
    let (a, b, mut c) = square_operands(n);
    let (mm_wall, mm_cpu) = measure(5, || {
        square_gemm(n, &a, &b, &mut c);
        Ok(())
    })?;
    drop((a, b, c));
    let flop = 2.0 * (n * n * n) as f64 / 1e9;
    let (gflops, cpu_gflops) = (flop / mm_wall, flop / mm_cpu);
    let ids: Vec<u32> = (0..seq_len)
        .map(|i| ((i * 7919 + 13) % model.config.vocab_size) as u32)
        .collect();
    let x = Model::ids_tensor(&ids)?;
    let (fw, fc) = measure(reps, || {
        let nll = model.token_nll(&x, false)?;
        nll.sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        Ok(())
    })?;
    let (bw, bc) = if backward {
        measure(reps, || {
            let loss = model.mean_nll(&x)?;
            drop(loss.backward()?);
            Ok(())
        })?
    } else {
        (f64::INFINITY, f64::INFINITY)
    };
    let params = model.num_params();
    let ceiling = gflops * 1e9 / (2.0 * params as f64);
    let cpu_ceiling = cpu_gflops * 1e9 / (2.0 * params as f64);
    let t = seq_len as f64;
    let (f, b, cf, cb) = (t / fw, t / bw, t / fc, t / bc);
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
        cpu_matmul_gflops: cpu_gflops,
        cpu_forward_tok_s: cf,
        cpu_fwd_bwd_tok_s: cb,
        cpu_forward_fraction_of_ceiling: cf / cpu_ceiling,
        cpu_fwd_bwd_fraction_of_ceiling: cb / (cpu_ceiling / 3.0),
    })
}
