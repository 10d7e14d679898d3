//! Linguistic regions: selecting parameters from importance scores (core, bottom, global),
//! monolingual regions, random controls, set operations and comparisons, and how a region
//! concentrates on hidden dimensions (stats and heatmaps).
//!
//! Inside this module a region is plain bytes ([`Region`]: name → shape + 0/1 bytes); it is
//! converted to and from [`crate::mask::Mask`] at the file boundary.

pub mod bench;
pub mod build;
pub mod heatmap;
pub mod ops;
pub mod random;
pub mod scores;
pub mod select;
pub mod stats;

use crate::mask::{Mask, MaskTensor};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// A dense f32 tensor (row-major) with its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Scores by HF parameter name (name order = the global flat order used for ties).
pub type Scores = BTreeMap<String, Dense>;

/// A 0/1 byte tensor (row-major) with its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bits {
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Bits {
    /// All zeros.
    pub fn zeros(shape: &[usize]) -> Bits {
        Bits {
            shape: shape.to_vec(),
            data: vec![0; shape.iter().product()],
        }
    }

    /// Number of selected entries.
    pub fn count(&self) -> u64 {
        self.data.iter().map(|&b| b as u64).sum()
    }
}

/// A region in memory: HF parameter name → 0/1 bytes in the parameter's shape.
pub type Region = BTreeMap<String, Bits>;

/// Total number of selected entries.
pub fn total_count(r: &Region) -> u64 {
    r.values().map(Bits::count).sum()
}

/// floor(k · n): the number of entries a fraction `k` of `n` selects.
pub fn region_size(k: f64, n: u64) -> u64 {
    (k * n as f64).floor() as u64
}

/// Checks a fraction given on the command line: finite, in (0, 1].
pub fn check_fraction(k: f64) -> Result<()> {
    if !(k.is_finite() && k > 0.0 && k <= 1.0) {
        bail!("--k {k}: must be a fraction in (0, 1]");
    }
    Ok(())
}

/// Converts a region to a mask (sorted indices).
pub fn to_mask(r: &Region) -> Result<Mask> {
    r.iter()
        .map(|(n, b)| Ok((n.clone(), MaskTensor::from_bits(n, &b.shape, &b.data)?)))
        .collect()
}

/// Converts a mask to a region (0/1 bytes).
pub fn from_mask(m: &Mask) -> Region {
    m.iter()
        .map(|(n, t)| {
            (
                n.clone(),
                Bits {
                    shape: t.shape.clone(),
                    data: t.to_bits(),
                },
            )
        })
        .collect()
}

/// Reads a mask file as a region.
pub fn load(path: &Path) -> Result<Region> {
    Ok(from_mask(&crate::mask::load(path)?))
}

/// Writes a region as a mask file with its summary (`how` says how it was made).
pub fn save(path: &Path, r: &Region, how: serde_json::Value) -> Result<()> {
    crate::mask::save(path, &to_mask(r)?, how)
}

/// Errors unless two regions have the same tensor names and shapes.
pub fn check_same_layout(a: &Region, b: &Region, a_name: &str, b_name: &str) -> Result<()> {
    for (n, x) in a {
        match b.get(n) {
            None => {
                bail!("{b_name}: has no tensor {n} (which {a_name} has): the masks do not match")
            }
            Some(y) if y.shape != x.shape => bail!(
                "{b_name}: tensor {n} has shape {:?} but {a_name} has {:?}: the masks do not match",
                y.shape,
                x.shape
            ),
            _ => {}
        }
    }
    if let Some(n) = b.keys().find(|n| !a.contains_key(*n)) {
        bail!("{a_name}: has no tensor {n} (which {b_name} has): the masks do not match");
    }
    Ok(())
}

/// The shapes of a region, for [`crate::mask::check_against_shapes`].
pub fn shapes(r: &Region) -> Vec<(String, Vec<usize>)> {
    r.iter()
        .map(|(n, b)| (n.clone(), b.shape.clone()))
        .collect()
}
