//! Single-dimension scans of one RMSNorm weight: for each hidden dimension d, replace entry d
//! (by an [`Op`]) and measure the mean NLL of each text.
//!
//! The residual stream entering the perturbed layer is computed once per text and copied
//! along the batch axis; each batch element carries its own norm weight (see
//! [`super::layer`]), so one forward evaluates several dimensions.

use super::ops::{self, Op};
use crate::model::{Model, NormWeights};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

/// Which RMSNorm weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormSite {
    /// `model.layers.L.input_layernorm`.
    Input(usize),
    /// `model.layers.L.post_attention_layernorm`.
    PostAttention(usize),
    /// `model.norm`.
    Final,
}

impl NormSite {
    /// From `--norm input|post_attention|final` and `--layer`, checked against the model.
    pub fn parse(norm: &str, layer: Option<usize>, model: &Model) -> Result<NormSite> {
        let n = model.config.num_layers;
        let need = |l: Option<usize>| -> Result<usize> {
            let l = l.with_context(|| format!("--norm {norm} needs --layer (0..{})", n - 1))?;
            if l >= n {
                bail!(
                    "layer {l} out of range: the model has {n} layers (0..{})",
                    n - 1
                );
            }
            Ok(l)
        };
        Ok(match norm {
            "input" => NormSite::Input(need(layer)?),
            "post_attention" => NormSite::PostAttention(need(layer)?),
            "final" => NormSite::Final,
            _ => bail!("unknown norm '{norm}' (expected input, post_attention or final)"),
        })
    }

    /// The HF parameter name of the norm weight.
    pub fn param_name(&self) -> String {
        match self {
            NormSite::Input(l) => format!("model.layers.{l}.input_layernorm.weight"),
            NormSite::PostAttention(l) => {
                format!("model.layers.{l}.post_attention_layernorm.weight")
            }
            NormSite::Final => "model.norm.weight".to_string(),
        }
    }

    /// Layers that run before the perturbed one (their output is shared by every dim).
    fn prefix_layers(&self, model: &Model) -> usize {
        match self {
            NormSite::Input(l) | NormSite::PostAttention(l) => *l,
            NormSite::Final => model.config.num_layers,
        }
    }
}

/// The new value of entry d for each of `dims`: `op` applied to that one entry, with the
/// same seeded stream as `perturb::ops::apply` on a one-entry region.
pub fn new_values(
    model: &Model,
    site: NormSite,
    op: &Op,
    seed: u64,
    dims: &[usize],
) -> Result<Vec<f64>> {
    let name = site.param_name();
    let w = ops::values_f64(&model.values_of(&name)?)?;
    dims.iter()
        .map(|&d| {
            if d >= w.len() {
                bail!(
                    "dimension {d} out of range: hidden size is {} (0..{})",
                    w.len(),
                    w.len() - 1
                );
            }
            Ok(op.new_values(&w, &[d], &mut ops::tensor_rng(seed, &name))[0])
        })
        .collect()
}

/// Mean NLL of each window in `texts` with entry `dims[i]` of the norm set to `values[i]`:
/// result `[i][text]`. `batch` perturbed copies go through each forward; `on_done(n)` is
/// called after each forward with the number of dims it covered.
pub fn scan_batched(
    model: &Model,
    site: NormSite,
    dims: &[usize],
    values: &[f64],
    texts: &[Vec<u32>],
    batch: usize,
    on_done: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<f64>>> {
    let name = site.param_name();
    let w = ops::values_f64(&model.values_of(&name)?)?;
    let h = w.len();
    let dtype = model.dtype();
    let mut out = vec![Vec::with_capacity(texts.len()); dims.len()];
    for ids in texts {
        let t = ids.len();
        let ids1 = Model::ids_tensor(ids)?;
        let ctx = model.attn_context(t)?;
        let mut x = model.embed(&ids1, false)?;
        for l in 0..site.prefix_layers(model) {
            x = model.layer(l, &x, &ctx, false)?;
        }
        for (chunk_i, chunk) in dims.chunks(batch.max(1)).enumerate() {
            let b = chunk.len();
            let mut wb = Vec::with_capacity(b * h);
            for (j, &d) in chunk.iter().enumerate() {
                let mut row = w.clone();
                row[d] = values[chunk_i * batch.max(1) + j];
                wb.extend(row);
            }
            let wb = Tensor::from_vec(wb, (b, 1, h), &Device::Cpu)?.to_dtype(dtype)?;
            let xb = x.broadcast_as((b, t, h))?.contiguous()?;
            let idsb = ids1.broadcast_as((b, t))?.contiguous()?;
            let nll = match site {
                NormSite::Final => mean_nll_rows(model, &xb, &idsb, Some(&wb))?,
                NormSite::Input(l) | NormSite::PostAttention(l) => {
                    let norms = if matches!(site, NormSite::Input(_)) {
                        NormWeights {
                            input: Some(&wb),
                            post: None,
                        }
                    } else {
                        NormWeights {
                            input: None,
                            post: Some(&wb),
                        }
                    };
                    let mut y = model.layer_with_norms(l, &xb, &ctx, false, norms)?;
                    for l2 in l + 1..model.config.num_layers {
                        y = model.layer(l2, &y, &ctx, false)?;
                    }
                    mean_nll_rows(model, &y, &idsb, None)?
                }
            };
            for (j, v) in nll.into_iter().enumerate() {
                out[chunk_i * batch.max(1) + j].push(v);
            }
            on_done(b);
        }
    }
    Ok(out)
}

/// Mean NLL per batch element of windows `ids` `[b, t]` from the last residual stream `x`,
/// with per-element final-norm weights `final_rows` `[b, 1, hidden]` (or the model's own).
fn mean_nll_rows(
    model: &Model,
    x: &Tensor,
    ids: &Tensor,
    final_rows: Option<&Tensor>,
) -> Result<Vec<f64>> {
    Ok(model
        .nll_from_hidden_with_norm(x, ids, false, final_rows)?
        .mean(1)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1()?)
}

/// Mean NLL of each window with the model as it is (one plain forward each).
pub fn base_nll(model: &Model, texts: &[Vec<u32>]) -> Result<Vec<f64>> {
    texts
        .iter()
        .map(|ids| {
            Ok(model
                .token_nll(&Model::ids_tensor(ids)?, false)?
                .mean_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar()?)
        })
        .collect()
}

/// The reference: set the real norm weight entry, run full forwards, restore.
pub fn scan_naive(
    model: &Model,
    site: NormSite,
    dims: &[usize],
    values: &[f64],
    texts: &[Vec<u32>],
) -> Result<Vec<Vec<f64>>> {
    let name = site.param_name();
    let mut out = Vec::new();
    for (&d, &v) in dims.iter().zip(values) {
        let saved = ops::apply_values(model, &name, &[d], &[v])?;
        let r = base_nll(model, texts);
        ops::restore(model, saved)?;
        out.push(r?);
    }
    Ok(out)
}

/// Gradient of the mean over texts of each text's mean NLL with respect to the norm weight.
pub fn norm_gradient(model: &Model, site: NormSite, texts: &[Vec<u32>]) -> Result<Vec<f64>> {
    let name = site.param_name();
    let var = model.param(&name).context("norm weight missing")?.var()?;
    let mut g = vec![0f64; var.elem_count()];
    for ids in texts {
        let loss = model.mean_nll(&Model::ids_tensor(ids)?)?;
        let grads = loss.backward()?;
        let gi = grads
            .get(var.as_tensor())
            .context("no gradient for the norm weight")?;
        for (a, x) in g.iter_mut().zip(ops::values_f64(gi)?) {
            *a += x / texts.len() as f64;
        }
    }
    Ok(g)
}

/// Spearman rank correlation (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0f64; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for k in i..=j {
                r[idx[k]] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}
