//! `broca bench`: this machine's matmul peak and the model's forward and forward+backward
//! speed, measured in one run so that their ratios are meaningful on a noisy machine.

use crate::memory::{self, ModelCost};
use crate::model::Model;
use crate::score::accumulate::GradSum;
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// Results in the JSON shape of CONVENTIONS.md. A rate of a round that did not run
/// (`--skip-backward`, or its estimated memory above the limit; see [`BenchResult::skipped`])
/// is `None` (JSON null).
#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub matmul_gflops: f64,
    pub forward_tok_s: Option<f64>,
    pub fwd_bwd_tok_s: Option<f64>,
    pub peak_rss_mb: f64,
    pub threads: usize,
    pub seq_len: usize,
    pub model: String,
    pub params: usize,
    /// matmul_gflops / (2 × params per token): the forward ceiling in tokens/s.
    pub forward_ceiling_tok_s: f64,
    pub forward_fraction_of_ceiling: Option<f64>,
    pub fwd_bwd_fraction_of_ceiling: Option<f64>,
    /// The same three rates from CPU time (all threads' on-CPU time / threads) instead of
    /// wall time: less sensitive to other processes competing for the cores.
    pub cpu_matmul_gflops: f64,
    pub cpu_forward_tok_s: Option<f64>,
    pub cpu_fwd_bwd_tok_s: Option<f64>,
    pub cpu_forward_fraction_of_ceiling: Option<f64>,
    pub cpu_fwd_bwd_fraction_of_ceiling: Option<f64>,
    /// One window of `broca score`'s work (forward, backward, accumulation into the f64
    /// sums, [`GradSum::add_batch`]) in tokens/s, and its ratio to the forward (`ppl`'s work
    /// per window), the median of per-round ratios.
    pub score_tok_s: Option<f64>,
    pub score_to_forward_ratio: Option<f64>,
    /// The same ratio from CPU time.
    pub cpu_score_to_forward_ratio: Option<f64>,
    /// The memory limit the rounds were planned under, in MB.
    pub mem_limit_mb: f64,
    /// Each round's estimated peak memory in MB (weights and matmul operands included).
    pub estimated_mb: RoundEstimates,
    /// Rounds that did not run, by name (`forward`, `fwd_bwd`, `score`), with the reason:
    /// `skip-backward` or `memory` (estimate above the limit).
    pub skipped: BTreeMap<String, String>,
}

/// Estimated peak memory of each kind of round, in MB.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RoundEstimates {
    pub forward: f64,
    pub fwd_bwd: f64,
    pub score: f64,
}

/// Estimated peak bytes of the three rounds on windows of `t` tokens: the forward; a forward
/// and backward that returns every parameter's dense f32 gradient; a score window (the
/// backward into f64 sums of every parameter). Each includes the weights as held and the
/// matmul operands.
pub fn round_bytes(model: &Model, t: usize) -> (u64, u64, u64) {
    let base = ModelCost::of(model).weights + MATMUL_BYTES;
    let fwd = memory::forward_bytes(model, 1, t);
    let bwd = fwd
        + model.config.num_layers as u64 * memory::tape_bytes_per_layer(model, 1, t)
        + memory::backward_extra_bytes(model, 1, t);
    let p = model.num_params() as u64;
    (base + fwd, base + bwd + 4 * p, base + bwd + 8 * p)
}

/// Side of the square matmul.
const MATMUL_N: usize = 2048;
/// Bytes of its three f32 operands.
const MATMUL_BYTES: u64 = 3 * 4 * (MATMUL_N * MATMUL_N) as u64;

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
/// Without `backward`, only the matmul and the forward run (no gradient memory is
/// allocated). A round whose estimate ([`round_bytes`]) exceeds `limit` bytes does not run;
/// its figures are `None`.
///
/// Each round times the 2048³ matmul (best of three), a forward, a forward+backward and a
/// score window back to back, so that every round's ratios compare work done under the same
/// machine load; the reported rates and ratios are medians over rounds, after one warm-up
/// round.
pub fn run(
    model: &Model,
    name: &str,
    seq_len: usize,
    reps: usize,
    backward: bool,
    limit: u64,
) -> Result<BenchResult> {
    let n = MATMUL_N;
    let (est_f, est_fb, est_sc) = round_bytes(model, seq_len);
    let p_sums = 8 * model.num_params() as u64;
    let mut skipped = BTreeMap::new();
    let mut decide = |round: &str, wanted: bool, est: u64| -> bool {
        let reason = if !wanted {
            "skip-backward"
        } else if est > limit {
            "memory"
        } else {
            return true;
        };
        skipped.insert(round.to_string(), reason.to_string());
        false
    };
    let run_f = decide("forward", true, est_f);
    let run_fb = decide("fwd_bwd", backward, est_fb);
    let run_sc = decide("score", backward, est_sc);
    // the f64 sums stay allocated across rounds when the forward+backward fits beside them,
    // else they exist only during each score round
    let keep_sums = run_sc && (!run_fb || est_fb + p_sums <= limit);
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
    let mut sums = keep_sums.then(|| GradSum::zeros(model));
    let window = vec![std::ops::Range {
        start: 0,
        end: seq_len,
    }];
    let not_run = (f64::NAN, f64::NAN);
    // per round: (matmul wall, matmul cpu, fwd wall, fwd cpu, fwd+bwd wall, fwd+bwd cpu,
    // score wall, score cpu); NaN for rounds that do not run
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
        let f = if run_f { time_once(forward)? } else { not_run };
        let fb = if run_fb { time_once(fwd_bwd)? } else { not_run };
        let sc = if run_sc {
            let mut fresh = None;
            let acc = match sums.as_mut() {
                Some(acc) => acc,
                None => fresh.insert(GradSum::zeros(model)),
            };
            time_once(|| acc.add_batch(model, &ids, &window))?
        } else {
            not_run
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
    // a figure of a round that did not run is NaN: None in the result
    let opt = |v: f64| v.is_finite().then_some(v);
    // ceiling of a round in tokens/s from its matmul time
    let ceil = |mm_s: f64| flop / mm_s * 1e9 / (2.0 * params);
    let (gflops, cpu_gflops) = (med(&|r| flop / r[0]), med(&|r| flop / r[1]));
    let ceiling = gflops * 1e9 / (2.0 * params);
    let mb = |b: u64| b as f64 / 1e6;
    Ok(BenchResult {
        matmul_gflops: gflops,
        forward_tok_s: opt(med(&|r| t / r[2])),
        fwd_bwd_tok_s: opt(med(&|r| t / r[4])),
        peak_rss_mb: peak_rss_mb(),
        threads: rayon::current_num_threads(),
        seq_len,
        model: name.to_string(),
        params: params as usize,
        forward_ceiling_tok_s: ceiling,
        forward_fraction_of_ceiling: opt(med(&|r| t / r[2] / ceil(r[0]))),
        fwd_bwd_fraction_of_ceiling: opt(med(&|r| t / r[4] / (ceil(r[0]) / 3.0))),
        cpu_matmul_gflops: cpu_gflops,
        cpu_forward_tok_s: opt(med(&|r| t / r[3])),
        cpu_fwd_bwd_tok_s: opt(med(&|r| t / r[5])),
        cpu_forward_fraction_of_ceiling: opt(med(&|r| t / r[3] / ceil(r[1]))),
        cpu_fwd_bwd_fraction_of_ceiling: opt(med(&|r| t / r[5] / (ceil(r[1]) / 3.0))),
        score_tok_s: opt(med(&|r| t / r[6])),
        score_to_forward_ratio: opt(med(&|r| r[2] / r[6])),
        cpu_score_to_forward_ratio: opt(med(&|r| r[3] / r[7])),
        mem_limit_mb: mb(limit),
        estimated_mb: RoundEstimates {
            forward: mb(est_f),
            fwd_bwd: mb(est_fb),
            score: mb(est_sc),
        },
        skipped,
    })
}
