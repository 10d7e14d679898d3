//! Benchmark of region selection on synthetic scores: LLaMA-2-7B-shaped tensors (hidden
//! 4096, ffn 11008) up to a total entry count, generated tensor by tensor in parallel.

use super::region_size;
use super::select::{select_map, Direction, Scope};
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// Tensor sizes of LLaMA-2-7B layers (norms, q/k/v/o, gate/up/down), repeated and cut so
/// they add up to `numel`.
pub fn synthetic_sizes(numel: u64) -> Vec<usize> {
    let (h, f) = (4096usize, 11008usize);
    let layer = [h, h * h, h * h, h * h, h * h, h, f * h, f * h, h * f];
    let mut out = Vec::new();
    let mut left = numel;
    for &s in layer.iter().cycle() {
        if left == 0 {
            break;
        }
        let s = (s as u64).min(left);
        out.push(s as usize);
        left -= s;
    }
    out
}

/// Heavy-tailed non-negative scores (u⁴, u uniform on 2²⁴ levels, so ties occur) from a
/// splitmix64 stream.
pub fn synthetic_scores(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32;
            (u * u) * (u * u)
        })
        .collect()
}

/// What `region bench` measures.
#[derive(Clone, Debug, Serialize)]
pub struct SelectBench {
    pub numel: u64,
    pub tensors: usize,
    pub k: f64,
    pub threads: usize,
    pub scores_mb: f64,
    pub generate_s: f64,
    pub per_tensor_top_s: f64,
    pub per_tensor_bottom_s: f64,
    pub global_top_s: f64,
    /// CPU seconds (user + system, all threads) of each selection: on an idle machine the
    /// wall time is about this divided by the threads.
    pub per_tensor_top_cpu_s: f64,
    pub per_tensor_bottom_cpu_s: f64,
    pub global_top_cpu_s: f64,
    pub peak_rss_mb: f64,
    /// Peak RSS / size of the scores (target < 1.2).
    pub rss_over_scores: f64,
}

/// Generates `numel` synthetic scores and times per-tensor (top, bottom) and global selection
/// of a fraction `k`; each mask is counted (and checked) then dropped.
pub fn run(numel: u64, k: f64, seed: u64) -> Result<SelectBench> {
    let sizes = synthetic_sizes(numel);
    let t = Instant::now();
    let scores: Vec<Vec<f32>> = sizes
        .par_iter()
        .enumerate()
        .map(|(i, &n)| synthetic_scores(n, seed ^ i as u64))
        .collect();
    let generate_s = t.elapsed().as_secs_f64();
    let values: Vec<&[f32]> = scores.iter().map(Vec::as_slice).collect();
    let count = |_: usize, m: Vec<u8>| m.iter().map(|&b| b as u64).sum::<u64>();
    let timed = |dir, scope| -> Result<(f64, f64)> {
        let (t, cpu) = (Instant::now(), cpu_seconds());
        let counts = select_map(&values, k, dir, scope, count);
        let s = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        let want: u64 = match scope {
            Scope::PerTensor => values.iter().map(|v| region_size(k, v.len() as u64)).sum(),
            Scope::Global => region_size(k, numel),
        };
        let got: u64 = counts.iter().sum();
        if got != want {
            bail!("selection picked {got} entries, expected {want}");
        }
        Ok(s)
    };
    let (per_tensor_top_s, per_tensor_top_cpu_s) = timed(Direction::Top, Scope::PerTensor)?;
    let (per_tensor_bottom_s, per_tensor_bottom_cpu_s) =
        timed(Direction::Bottom, Scope::PerTensor)?;
    let (global_top_s, global_top_cpu_s) = timed(Direction::Top, Scope::Global)?;
    let scores_mb = numel as f64 * 4.0 / (1024.0 * 1024.0);
    let peak_rss_mb = crate::bench::peak_rss_mb();
    Ok(SelectBench {
        numel,
        tensors: sizes.len(),
        k,
        threads: rayon::current_num_threads(),
        scores_mb,
        generate_s,
        per_tensor_top_s,
        per_tensor_bottom_s,
        global_top_s,
        per_tensor_top_cpu_s,
        per_tensor_bottom_cpu_s,
        global_top_cpu_s,
        peak_rss_mb,
        rss_over_scores: peak_rss_mb / scores_mb,
    })
}

/// CPU time of this process so far (user + system, seconds), from /proc/self/stat
/// (clock ticks of 1/100 s, the Linux default); 0 where unavailable.
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // fields after the command name (which may hold spaces) start at index 2 of the stat list
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
