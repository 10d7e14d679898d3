//! Stability scores: how far each parameter moved between a base checkpoint and a further-
//! trained one, |θ_B − θ_A|, or relative to the base, |θ_B − θ_A| / (|θ_A| + ε).

use super::files::{self, Store};
use super::{METHOD_DIFF, METHOD_DIFF_RELATIVE};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::collections::BTreeMap;
use std::path::Path;

/// Checks that `tuned` has exactly `base`'s parameter names and shapes.
pub fn check_same_params(
    base: &Model,
    base_path: &Path,
    tuned: &Model,
    tuned_path: &Path,
) -> Result<()> {
    for p in &base.params {
        match tuned.param(&p.name) {
            None => bail!(
                "{}: no tensor {} (it is in --base {}); not a fine-tune of that model",
                tuned_path.display(),
                p.name,
                base_path.display()
            ),
            Some(v) if v.shape != p.shape => bail!(
                "{}: tensor {} has shape {:?}, but {:?} in --base {}",
                tuned_path.display(),
                p.name,
                v.shape,
                p.shape,
                base_path.display()
            ),
            _ => {}
        }
    }
    if let Some(p) = tuned.params.iter().find(|p| base.param(&p.name).is_none()) {
        bail!(
            "{}: tensor {} is not in --base {}",
            tuned_path.display(),
            p.name,
            base_path.display()
        );
    }
    Ok(())
}

/// |b − a|, or |b − a| / (|a| + eps) when `relative`, elementwise in f64.
pub fn diff_values(a: &[f64], b: &[f64], relative: bool, eps: f64) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if relative {
                (y - x).abs() / (x.abs() + eps)
            } else {
                (y - x).abs()
            }
        })
        .collect()
}

/// Writes the stability scores of `tuned` against `base` to `out` (f32, base's tensor order),
/// with metadata `lang`, `method` (`diff` or `diff-relative`), `tokens` = `seq_len` = 0,
/// `model_sha256` (the base's), `tuned_sha256`, `version`, and `eps` when relative.
#[allow(clippy::too_many_arguments)]
pub fn write_diff(
    base: &Model,
    base_sha256: &str,
    tuned: &Model,
    tuned_sha256: &str,
    lang: &str,
    relative: bool,
    eps: f64,
    out: &Path,
) -> Result<()> {
    if relative && !(eps > 0.0 && eps.is_finite()) {
        bail!("--eps must be a positive number, got {eps}");
    }
    let mut meta = BTreeMap::new();
    meta.insert("lang".to_string(), lang.to_string());
    meta.insert(
        "method".to_string(),
        if relative {
            METHOD_DIFF_RELATIVE
        } else {
            METHOD_DIFF
        }
        .to_string(),
    );
    meta.insert("tokens".to_string(), "0".to_string());
    meta.insert("seq_len".to_string(), "0".to_string());
    meta.insert("model_sha256".to_string(), base_sha256.to_string());
    meta.insert("tuned_sha256".to_string(), tuned_sha256.to_string());
    meta.insert("version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    if relative {
        meta.insert("eps".to_string(), format!("{eps:e}"));
    }
    let entries: Vec<(String, Vec<usize>)> = base
        .params
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    let vals = |m: &Model, name: &str| -> Result<Vec<f64>> {
        Ok(m.values_of(name)
            .with_context(|| format!("no tensor {name} in both models"))?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?)
    };
    files::write(out, &entries, Store::F32, &meta, |i| {
        let name = &entries[i].0;
        Ok(diff_values(
            &vals(base, name)?,
            &vals(tuned, name)?,
            relative,
            eps,
        ))
    })
}
