//! Control regions of the same per-tensor size as a region: random entries, or the least /
//! most important entries by summed |score| (per tensor; ties go to the lower index). The
//! selection itself is [`crate::region::select`]'s and the random draw
//! [`crate::region::random`]'s.

use crate::mask::{Mask, MaskTensor};
use crate::region::random::{name_hash, random_indices};
use crate::region::select::{apply, cut, Direction};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

/// Which control to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Random,
    Bottom,
    Top,
}

impl Control {
    /// Parses `random`, `bottom` or `top`.
    pub fn parse(s: &str) -> Result<Control> {
        Ok(match s {
            "random" => Control::Random,
            "bottom" => Control::Bottom,
            "top" => Control::Top,
            _ => bail!("unknown control '{s}' (expected random, bottom or top)"),
        })
    }

    /// The condition label for region `name`: `random(NAME)` and so on.
    pub fn label(&self, name: &str) -> String {
        let k = match self {
            Control::Random => "random",
            Control::Bottom => "bottom",
            Control::Top => "top",
        };
        format!("{k}({name})")
    }
}

/// Σ over languages of |score| of one tensor (flattened), for the bottom/top controls.
pub trait TensorScores: Sync {
    fn abs_sum(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

impl TensorScores for crate::region::scores::ScoreFiles {
    fn abs_sum(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        crate::region::scores::ScoreFiles::abs_sum(self, name, shape)
    }
}

impl TensorScores for BTreeMap<String, Vec<f32>> {
    fn abs_sum(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let s = self
            .get(name)
            .with_context(|| format!("no scores for {name}"))?;
        let n: usize = shape.iter().product();
        if s.len() != n {
            bail!(
                "scores for {name} have {} entries, the region has {n}",
                s.len()
            );
        }
        Ok(s.clone())
    }
}

/// The control of `region` with the same count per tensor. `scores` is needed for
/// bottom/top (read one tensor at a time); random is seeded per tensor.
pub fn control(
    region: &Mask,
    kind: Control,
    scores: Option<&dyn TensorScores>,
    seed: u64,
) -> Result<Mask> {
    let mut out = Mask::new();
    for (name, m) in region {
        let k = m.count();
        let bits = match kind {
            Control::Random => {
                let s = seed ^ 0x5eed_c0de ^ name_hash(name);
                out.insert(name.clone(), random_indices(name, &m.shape, k, s)?);
                continue;
            }
            Control::Bottom | Control::Top => {
                let s = scores
                    .context("bottom/top controls need --scores")?
                    .abs_sum(name, &m.shape)?;
                let dir = match kind {
                    Control::Top => Direction::Top,
                    _ => Direction::Bottom,
                };
                let c = cut(&[s.as_slice()], k as u64, dir);
                apply(&s, c.rank, c.ties[0], dir)
            }
        };
        out.insert(name.clone(), MaskTensor::from_bits(name, &m.shape, &bits)?);
    }
    Ok(out)
}
