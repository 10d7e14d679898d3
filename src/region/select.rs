//! Exact top-/bottom-k selection, per tensor or over all tensors at once.
//!
//! Each value maps to a 32-bit rank that orders like the value (smallest rank = most wanted).
//! A histogram of the ranks' high 16 bits finds the bucket holding the k-th entry; that
//! bucket's (rank, tensor, index) keys are gathered and `select_nth_unstable` finds the cut
//! (nth-element, no sort). When the bucket is too big to gather (a mass of equal scores), a
//! second histogram of the low 16 bits finds it instead. Either way it is O(n), streams over
//! the tensors, and needs at most 1/16 of the scores' memory. Ties at the cut go to the lower
//! flat index (tensor order first, then the row-major index inside a tensor), for top and
//! for bottom.

use super::{region_size, Bits, Region, Scores};
use rayon::prelude::*;

/// Which end of the scores a region takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The largest scores (most important).
    Top,
    /// The smallest scores (least important / least changed).
    Bottom,
}

/// Over what a fraction k is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// floor(k · numel) entries in every tensor (the paper).
    PerTensor,
    /// floor(k · total) entries over all covered tensors together.
    Global,
}

/// A 32-bit key that orders like the f32 (IEEE total order: -0 before +0).
#[inline]
fn order_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The rank of a value: smaller is selected first.
#[inline]
pub fn rank(v: f32, dir: Direction) -> u32 {
    match dir {
        Direction::Top => !order_key(v),
        Direction::Bottom => order_key(v),
    }
}

/// Where a selection cuts: every entry with rank < `rank` is selected and, of the entries
/// with rank == `rank`, the first `ties[t]` of tensor t in index order (`u64::MAX`: all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    pub rank: u32,
    pub ties: Vec<u64>,
}

const CHUNK: usize = 1 << 20;
const BUCKETS: usize = 1 << 16;

/// Histogram over all values of `bucket(rank)` (None = not counted).
fn histogram(
    values: &[&[f32]],
    dir: Direction,
    bucket: impl Fn(u32) -> Option<u32> + Sync,
) -> Vec<u64> {
    let chunks: Vec<&[f32]> = values.iter().flat_map(|v| v.chunks(CHUNK)).collect();
    let add = |mut a: Vec<u64>, b: Vec<u64>| {
        a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
        a
    };
    chunks
        .par_iter()
        .map(|c| {
            // u32 counts (a chunk has < 2^32 entries) keep the table in cache
            let mut h = vec![0u32; BUCKETS];
            for &v in c.iter() {
                if let Some(b) = bucket(rank(v, dir)) {
                    h[b as usize] += 1;
                }
            }
            h.into_iter().map(u64::from).collect()
        })
        .reduce(|| vec![0u64; BUCKETS], add)
}

/// The first bucket where the running count reaches `want` (≥ 1), and the count before it.
fn find_bucket(h: &[u64], want: u64) -> (u32, u64) {
    let mut below = 0u64;
    for (b, &c) in h.iter().enumerate() {
        if below + c >= want {
            return (b as u32, below);
        }
        below += c;
    }
    unreachable!("find_bucket: want {want} exceeds the {below} counted entries")
}

/// How [`cut_using`] resolves the bucket that holds the cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMethod {
    /// Candidates when the bucket is small (under 1/64 of the entries), else radix.
    Auto,
    /// Gather the bucket's (rank, tensor, index) keys and take the nth element.
    Candidates,
    /// A second histogram of the low 16 bits, then count ties per tensor.
    Radix,
}

/// Finds the cut that selects exactly `count` entries from `values` (tensors in order).
pub fn cut(values: &[&[f32]], count: u64, dir: Direction) -> Cut {
    cut_using(values, count, dir, CutMethod::Auto)
}

/// [`cut`] with a chosen method for the last step (all methods give the same cut).
pub fn cut_using(values: &[&[f32]], count: u64, dir: Direction, method: CutMethod) -> Cut {
    let total: u64 = values.iter().map(|v| v.len() as u64).sum();
    assert!(
        count <= total,
        "cut: count {count} exceeds the {total} entries"
    );
    if count == 0 {
        return Cut {
            rank: 0,
            ties: vec![0; values.len()],
        };
    }
    let hi = histogram(values, dir, |r| Some(r >> 16));
    let (b, below) = find_bucket(&hi, count);
    let need = count - below;
    // candidates take 16 bytes each: keep them under 1/16 of the scores' 4 bytes per entry
    let small = hi[b as usize] <= (total / 64).max(1 << 16);
    match method {
        CutMethod::Candidates => cut_by_candidates(values, dir, b, need),
        CutMethod::Auto if small => cut_by_candidates(values, dir, b, need),
        _ => cut_by_radix(values, dir, b, need),
    }
}

/// The cut inside bucket `b` by nth-element on the (rank, tensor, index) keys of the
/// bucket's entries, taking `need` of them.
fn cut_by_candidates(values: &[&[f32]], dir: Direction, b: u32, need: u64) -> Cut {
    let chunks: Vec<(u32, u64, &[f32])> = values
        .iter()
        .enumerate()
        .flat_map(|(t, v)| {
            v.chunks(CHUNK)
                .enumerate()
                .map(move |(c, s)| (t as u32, (c * CHUNK) as u64, s))
        })
        .collect();
    let mut cand: Vec<(u32, u32, u64)> = chunks
        .par_iter()
        .map(|&(t, off, s)| {
            let mut out = Vec::new();
            for (i, &v) in s.iter().enumerate() {
                let r = rank(v, dir);
                if r >> 16 == b {
                    out.push((r, t, off + i as u64));
                }
            }
            out
        })
        .flatten()
        .collect();
    let need = need as usize;
    let (_, nth, _) = cand.select_nth_unstable(need - 1);
    let rank_cut = nth.0;
    let mut chosen = vec![0u64; values.len()];
    let mut tied = vec![0u64; values.len()];
    for (i, c) in cand.iter().enumerate().filter(|(_, c)| c.0 == rank_cut) {
        tied[c.1 as usize] += 1;
        if i < need {
            chosen[c.1 as usize] += 1;
        }
    }
    let ties = chosen
        .iter()
        .zip(&tied)
        .map(|(&c, &t)| if c == t { u64::MAX } else { c })
        .collect();
    Cut {
        rank: rank_cut,
        ties,
    }
}

/// The cut inside bucket `b` by a second histogram of the low 16 bits (for buckets too big
/// to gather, e.g. a mass of equal scores), taking `need` of its entries.
fn cut_by_radix(values: &[&[f32]], dir: Direction, b: u32, need: u64) -> Cut {
    let lo = histogram(values, dir, |r| (r >> 16 == b).then_some(r & 0xffff));
    let (l, below) = find_bucket(&lo, need);
    let rank_cut = (b << 16) | l;
    let need = need - below;
    if need == lo[l as usize] {
        return Cut {
            rank: rank_cut,
            ties: vec![u64::MAX; values.len()],
        };
    }
    // only part of the tied entries is taken: hand them out in tensor order
    let per: Vec<u64> = values
        .par_iter()
        .map(|v| v.iter().filter(|&&x| rank(x, dir) == rank_cut).count() as u64)
        .collect();
    let mut left = need;
    let ties = per
        .iter()
        .map(|&e| {
            let t = e.min(left);
            left -= t;
            t
        })
        .collect();
    Cut {
        rank: rank_cut,
        ties,
    }
}

/// The 0/1 mask of one tensor under a cut (`ties` = that tensor's share of the tied entries).
pub fn apply(values: &[f32], rank_cut: u32, ties: u64, dir: Direction) -> Vec<u8> {
    if ties == u64::MAX {
        return values
            .iter()
            .map(|&v| (rank(v, dir) <= rank_cut) as u8)
            .collect();
    }
    if ties == 0 {
        return values
            .iter()
            .map(|&v| (rank(v, dir) < rank_cut) as u8)
            .collect();
    }
    let mut taken = 0u64;
    values
        .iter()
        .map(|&v| {
            let r = rank(v, dir);
            if r < rank_cut {
                1
            } else if r == rank_cut && taken < ties {
                taken += 1;
                1
            } else {
                0
            }
        })
        .collect()
}

/// Selects a fraction `k` of `values` (per tensor or globally) and hands each tensor's mask,
/// in order, to `f`, so a caller may keep or drop it; returns what `f` returned.
pub fn select_map<T: Send>(
    values: &[&[f32]],
    k: f64,
    dir: Direction,
    scope: Scope,
    f: impl Fn(usize, Vec<u8>) -> T + Sync + Send,
) -> Vec<T> {
    match scope {
        Scope::PerTensor => values
            .par_iter()
            .enumerate()
            .map(|(i, v)| {
                let c = cut(&[v], region_size(k, v.len() as u64), dir);
                f(i, apply(v, c.rank, c.ties[0], dir))
            })
            .collect(),
        Scope::Global => {
            let total: u64 = values.iter().map(|v| v.len() as u64).sum();
            let c = cut(values, region_size(k, total), dir);
            values
                .par_iter()
                .enumerate()
                .map(|(i, v)| f(i, apply(v, c.rank, c.ties[i], dir)))
                .collect()
        }
    }
}

/// The region of a fraction `k` of the scores (ties: lower flat index, tensors in name order).
pub fn select(scores: &Scores, k: f64, dir: Direction, scope: Scope) -> Region {
    let values: Vec<&[f32]> = scores.values().map(|d| d.data.as_slice()).collect();
    let masks = select_map(&values, k, dir, scope, |_, m| m);
    scores
        .iter()
        .zip(masks)
        .map(|((n, d), data)| {
            (
                n.clone(),
                Bits {
                    shape: d.shape.clone(),
                    data,
                },
            )
        })
        .collect()
}
