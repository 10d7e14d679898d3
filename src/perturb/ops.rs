//! Perturbation operations applied in place to the entries of a region, and their exact undo.
//!
//! Dense parameters change in place and keep their touched entries' old values (f64, which
//! holds every f32/f16/bf16 value exactly); memory-mapped ones get a sparse overlay and keep
//! the overlay they had. Either way restoring leaves every weight bitwise as it was, and
//! memory grows with the region, not the model.

use crate::mask::Mask;
use crate::model::{Model, Undo};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::fmt;
use std::str::FromStr;

/// What to do to the selected entries of a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Set to 0.
    Zero,
    /// Draw from a normal with the tensor's own mean and standard deviation.
    Randomize,
    /// Draw from a uniform with the tensor's own mean and standard deviation.
    RandomizeUniform,
    /// Multiply by a factor.
    Scale(f64),
    /// Add normal noise with this standard deviation.
    Noise(f64),
}

/// The accepted forms, for error messages.
pub const OP_FORMS: &str = "zero, randomize, randomize-uniform, scale:F, noise:SIGMA";

impl FromStr for Op {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Op> {
        let num = |v: &str, what: &str| -> Result<f64> {
            let x: f64 = v
                .parse()
                .map_err(|_| anyhow::anyhow!("op '{s}': '{v}' is not a number ({what})"))?;
            if !x.is_finite() {
                bail!("op '{s}': {what} must be finite");
            }
            Ok(x)
        };
        Ok(match s.split_once(':') {
            None => match s {
                "zero" => Op::Zero,
                "randomize" => Op::Randomize,
                "randomize-uniform" => Op::RandomizeUniform,
                "scale" | "noise" => bail!("op '{s}' needs a value ({s}:X)"),
                _ => bail!("unknown op '{s}' (expected one of {OP_FORMS})"),
            },
            Some(("scale", v)) => Op::Scale(num(v, "the factor")?),
            Some(("noise", v)) => {
                let x = num(v, "sigma")?;
                if x < 0.0 {
                    bail!("op '{s}': sigma must not be negative");
                }
                Op::Noise(x)
            }
            Some(_) => bail!("unknown op '{s}' (expected one of {OP_FORMS})"),
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Zero => write!(f, "zero"),
            Op::Randomize => write!(f, "randomize"),
            Op::RandomizeUniform => write!(f, "randomize-uniform"),
            Op::Scale(x) => write!(f, "scale:{x}"),
            Op::Noise(x) => write!(f, "noise:{x}"),
        }
    }
}

/// Parses `--op` values (repeated or comma-separated).
pub fn parse_ops(values: &[String]) -> Result<Vec<Op>> {
    let ops: Vec<Op> = crate::data::split_values(values)
        .iter()
        .map(|s| s.parse::<Op>().context("--op"))
        .collect::<Result<_>>()?;
    if ops.is_empty() {
        bail!("no --op given (expected one of {OP_FORMS})");
    }
    Ok(ops)
}

/// The random stream for one tensor: depends only on the seed and the tensor's name, so a
/// tensor's draws do not depend on which other tensors are perturbed.
pub fn tensor_rng(seed: u64, name: &str) -> StdRng {
    StdRng::seed_from_u64(seed ^ crate::region::random::name_hash(name))
}

/// Mean and (population) standard deviation.
pub fn mean_std(w: &[f64]) -> (f64, f64) {
    let n = w.len().max(1) as f64;
    let mean = w.iter().sum::<f64>() / n;
    let var = w.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

impl Op {
    /// New values for entries `idx` (flat indices, in order) of a tensor holding `w`.
    pub fn new_values(&self, w: &[f64], idx: &[usize], rng: &mut StdRng) -> Vec<f64> {
        match self {
            Op::Zero => vec![0.0; idx.len()],
            Op::Scale(f) => idx.iter().map(|&i| w[i] * f).collect(),
            Op::Noise(s) => {
                let n = Normal::new(0.0, *s).expect("sigma checked when parsed");
                idx.iter().map(|&i| w[i] + n.sample(rng)).collect()
            }
            Op::Randomize => {
                let (m, s) = mean_std(w);
                let n = Normal::new(m, s).expect("finite std");
                idx.iter().map(|_| n.sample(rng)).collect()
            }
            Op::RandomizeUniform => {
                let (m, s) = mean_std(w);
                let half = s * 3f64.sqrt();
                idx.iter()
                    .map(|_| {
                        if half > 0.0 {
                            rng.gen_range(m - half..m + half)
                        } else {
                            m
                        }
                    })
                    .collect()
            }
        }
    }
}

/// A tensor's values as f64 (exact for f32, f16, bf16).
pub fn values_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?)
}

/// One changed parameter and how to undo the change.
struct Touched {
    param: usize,
    count: usize,
    undo: Undo,
}

/// What [`apply`] changed, for [`restore`].
#[must_use = "restore the model with perturb::ops::restore"]
pub struct Saved {
    touched: Vec<Touched>,
}

impl Saved {
    /// Number of entries changed.
    pub fn count(&self) -> usize {
        self.touched.iter().map(|t| t.count).sum()
    }
}

/// The index of parameter `name`, or an error naming it.
fn param_index(model: &Model, name: &str) -> Result<usize> {
    model
        .param_index(name)
        .with_context(|| format!("{name}: not a parameter of this model"))
}

/// Applies `op` to the entries of `mask` (checked against the model), seeded per tensor:
/// in place for dense parameters, as a sparse overlay for memory-mapped ones. Reads one
/// tensor's values at a time.
pub fn apply(model: &Model, mask: &Mask, op: &Op, seed: u64) -> Result<Saved> {
    crate::mask::check_matches(mask, model)?;
    let mut saved = Saved {
        touched: Vec::new(),
    };
    for (name, m) in mask {
        let idx = m.indices();
        if idx.is_empty() {
            continue;
        }
        let res = (|| -> Result<Touched> {
            let i = param_index(model, name)?;
            let w = values_f64(&model.values(i)?)?;
            let vals = op.new_values(&w, &idx, &mut tensor_rng(seed, name));
            Ok(Touched {
                param: i,
                count: idx.len(),
                undo: model.set_entries(i, &idx, &vals)?,
            })
        })();
        match res {
            Ok(t) => saved.touched.push(t),
            Err(e) => {
                // leave the model as it was
                restore(model, saved)?;
                return Err(e);
            }
        }
    }
    Ok(saved)
}

/// Sets entries `idx` of parameter `name` to `vals` (a hand-made perturbation), saving what
/// [`restore`] needs.
pub fn apply_values(model: &Model, name: &str, idx: &[usize], vals: &[f64]) -> Result<Saved> {
    let i = param_index(model, name)?;
    Ok(Saved {
        touched: vec![Touched {
            param: i,
            count: idx.len(),
            undo: model.set_entries(i, idx, vals)?,
        }],
    })
}

/// Puts back every entry [`apply`] changed (bitwise), dropping overlays it added.
pub fn restore(model: &Model, saved: Saved) -> Result<()> {
    for t in saved.touched.into_iter().rev() {
        model.undo(t.param, t.undo)?;
    }
    Ok(())
}

/// A mask selecting flat entries `idx` of parameter `name` of `model`.
pub fn entries_mask(model: &Model, name: &str, idx: &[usize]) -> Result<Mask> {
    let p = model
        .param(name)
        .with_context(|| format!("{name}: not a parameter of this model"))?;
    let t = crate::mask::MaskTensor::from_indices(name, &p.shape, idx.iter().copied())?;
    Ok(Mask::from([(name.to_string(), t)]))
}
