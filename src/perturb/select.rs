//! Control regions of the same per-tensor size as a region: random entries, or the least /
//! most important entries by summed |score| (per tensor; ties go to the lower index).

use crate::io::read_safetensors;
use crate::mask::Mask;
use crate::perturb::ops::{mask_indices, tensor_rng};
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

/// Flat indices of the `k` largest (`largest`) or smallest scores; ties: lower index first.
/// Returned sorted ascending.
pub fn top_k_indices(scores: &[f32], k: usize, largest: bool) -> Vec<usize> {
    let k = k.min(scores.len());
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let cmp = |a: &usize, b: &usize| {
        let o = scores[*a].total_cmp(&scores[*b]);
        let o = if largest { o.reverse() } else { o };
        o.then(a.cmp(b))
    };
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// `k` distinct flat indices out of `n`, uniformly, sorted ascending.
pub fn random_k_indices(n: usize, k: usize, rng: &mut impl rand::Rng) -> Vec<usize> {
    let mut v = rand::seq::index::sample(rng, n, k.min(n)).into_vec();
    v.sort_unstable();
    v
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

/// A U8 mask tensor of `shape` with ones at `idx`.
fn mask_tensor(shape: &[usize], idx: &[usize]) -> Result<Tensor> {
    let mut m = vec![0u8; shape.iter().product()];
    for &i in idx {
        m[i] = 1;
    }
    Ok(Tensor::from_vec(m, shape, &Device::Cpu)?)
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
        let idx = match kind {
            Control::Random => random_k_indices(n, k, &mut tensor_rng(seed ^ 0x5eed_c0de, name)),
            Control::Bottom | Control::Top => {
                let s = scores.context("bottom/top controls need --scores")?;
                let s = s
                    .get(name)
                    .with_context(|| format!("no scores for {name}"))?;
                top_k_indices(s, k, kind == Control::Top)
            }
        };
        out.insert(name.clone(), mask_tensor(m.dims(), &idx)?);
    }
    Ok(out)
}
