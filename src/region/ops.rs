//! Set operations on regions and their overlap.

use super::{Bits, Region};
use serde::Serialize;

/// A set operation on two regions of the same layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SetOp {
    /// A OR B.
    Union,
    /// A AND B.
    Intersect,
    /// A AND NOT B.
    Minus,
}

/// Applies `op` entry by entry (the caller checks the layouts match).
pub fn apply(op: SetOp, a: &Region, b: &Region) -> Region {
    a.iter()
        .map(|(n, x)| {
            let y = &b[n];
            let data = x
                .data
                .iter()
                .zip(&y.data)
                .map(|(&p, &q)| match op {
                    SetOp::Union => p | q,
                    SetOp::Intersect => p & q,
                    SetOp::Minus => p & (1 - q),
                })
                .collect();
            (
                n.clone(),
                Bits {
                    shape: x.shape.clone(),
                    data,
                },
            )
        })
        .collect()
}

/// Overlap of two selections.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Overlap {
    /// Tensor name, or "total".
    pub name: String,
    pub numel: u64,
    pub a: u64,
    pub b: u64,
    pub both: u64,
    /// |A∩B| / |A∪B| (1 when both are empty).
    pub jaccard: f64,
    /// |A∩B| / |A| (0 when A is empty).
    pub of_a: f64,
    /// |A∩B| / |B| (0 when B is empty).
    pub of_b: f64,
}

impl Overlap {
    /// The sum of per-tensor overlaps, named "total".
    pub(crate) fn total(per: &[Overlap]) -> Overlap {
        let sum = |f: fn(&Overlap) -> u64| per.iter().map(f).sum::<u64>();
        Overlap::new(
            "total",
            sum(|o| o.numel),
            sum(|o| o.a),
            sum(|o| o.b),
            sum(|o| o.both),
        )
    }

    pub(crate) fn new(name: &str, numel: u64, a: u64, b: u64, both: u64) -> Overlap {
        let ratio = |x: u64, y: u64| if y == 0 { 0.0 } else { x as f64 / y as f64 };
        let union = a + b - both;
        Overlap {
            name: name.to_string(),
            numel,
            a,
            b,
            both,
            jaccard: if union == 0 {
                1.0
            } else {
                both as f64 / union as f64
            },
            of_a: ratio(both, a),
            of_b: ratio(both, b),
        }
    }
}

/// Per-tensor overlaps (name order) and the total (the caller checks the layouts match).
pub fn compare(a: &Region, b: &Region) -> (Vec<Overlap>, Overlap) {
    let mut per = Vec::new();
    for (n, x) in a {
        let y = &b[n];
        let (mut ca, mut cb, mut both) = (0u64, 0u64, 0u64);
        for (&p, &q) in x.data.iter().zip(&y.data) {
            ca += p as u64;
            cb += q as u64;
            both += (p & q) as u64;
        }
        per.push(Overlap::new(n, x.data.len() as u64, ca, cb, both));
    }
    let total = Overlap::total(&per);
    (per, total)
}
