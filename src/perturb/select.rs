//! Control regions of the same per-tensor size as a region: random entries, or the least /
//! most important entries by summed |score| (per tensor; ties go to the lower index). The
//! selection itself is [`crate::region::select`]'s and the random draw
//! [`crate::region::random`]'s.

use crate::io::read_safetensors;
use crate::mask::Mask;
use crate::perturb::ops::mask_indices;
use crate::region::random::{name_hash, random_bits};
use crate::region::select::{apply, cut, Direction};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

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

/// Σ over score files of |score|, for the tensors named in `names` (f32, flattened).
pub fn summed_abs_scores(
    files: &[PathBuf],
    names: &BTreeMap<String, Vec<usize>>,
) -> Result<BTreeMap<String, Vec<f32>>> {
    if files.is_empty() {
        bail!("--controls bottom/top need the --scores files the region was made from");
    }
    let mut sum: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for f in files {
        let (tensors, _) = read_safetensors(f)?;
        for (name, shape) in names {
            let t = tensors
                .get(name)
                .with_context(|| format!("{}: no score tensor {name}", f.display()))?;
            if t.dims() != shape.as_slice() {
                bail!(
                    "{}: score tensor {name} has shape {:?}, the region has {:?}",
                    f.display(),
                    t.dims(),
                    shape
                );
            }
            let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            let acc = sum
                .entry(name.clone())
                .or_insert_with(|| vec![0f32; v.len()]);
            for (a, x) in acc.iter_mut().zip(&v) {
                *a += x.abs();
            }
        }
    }
    Ok(sum)
}

/// The control of `region` with the same count per tensor. `scores` (from
/// [`summed_abs_scores`]) is needed for bottom/top; random is seeded per tensor.
pub fn control(
    region: &Mask,
    kind: Control,
    scores: Option<&BTreeMap<String, Vec<f32>>>,
    seed: u64,
) -> Result<Mask> {
    let mut out = Mask::new();
    for (name, m) in region {
        let k = mask_indices(m)?.len();
        let n = m.elem_count();
        let bits = match kind {
            Control::Random => random_bits(m.dims(), k, seed ^ 0x5eed_c0de ^ name_hash(name)).data,
            Control::Bottom | Control::Top => {
                let s = scores.context("bottom/top controls need --scores")?;
                let s = s
                    .get(name)
                    .with_context(|| format!("no scores for {name}"))?;
                if s.len() != n {
                    bail!(
                        "scores for {name} have {} entries, the region has {n}",
                        s.len()
                    );
                }
                let dir = match kind {
                    Control::Top => Direction::Top,
                    _ => Direction::Bottom,
                };
                let c = cut(&[s], k as u64, dir);
                apply(s, c.rank, c.ties[0], dir)
            }
        };
        out.insert(
            name.clone(),
            Tensor::from_vec(bits, m.dims(), &Device::Cpu)?,
        );
    }
    Ok(out)
}
