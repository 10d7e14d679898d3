//! Super-weight candidates (Yu et al. 2024): in each layer's mlp.down_proj, the token with
//! the largest-magnitude output activation; its output dimension is the weight's row and the
//! input channel with the largest-magnitude input activation at that token its column.

use crate::model::Model;
use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::Serialize;

/// One layer's candidate coordinate and the activations behind it.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub layer: usize,
    /// Output hidden dimension (row of down_proj, HF layout).
    pub row: usize,
    /// Input channel (column of down_proj).
    pub col: usize,
    /// Token position of the massive output activation.
    pub token: usize,
    /// down_proj output at (token, row).
    pub output_activation: f64,
    /// down_proj input at (token, col).
    pub input_activation: f64,
    /// Largest |input| anywhere in the layer (any token, any channel).
    pub max_abs_input: f64,
    /// The weight down_proj[row, col].
    pub weight: f64,
}

/// (flat index of the largest |v|, value).
fn argmax_abs(v: &[f64]) -> (usize, f64) {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if x.abs() > v[best].abs() {
            best = i;
        }
    }
    (best, v[best])
}

/// One candidate per layer from a forward pass over `ids`.
pub fn candidates(model: &Model, ids: &[u32]) -> Result<Vec<Candidate>> {
    let ids_t = Model::ids_tensor(ids)?;
    let ctx = model.attn_context(ids.len())?;
    let mut x = model.embed(&ids_t, false)?;
    let mut out = Vec::new();
    for l in 0..model.config.num_layers {
        let mut input: Option<Tensor> = None;
        let mut output: Option<Tensor> = None;
        x = model.layer_probed(l, &x, &ctx, false, &mut |name, a| {
            match name {
                "mlp.down_proj.input" => input = Some(a.clone()),
                "mlp.down_proj.output" => output = Some(a.clone()),
                _ => {}
            }
            Ok(())
        })?;
        let (Some(input), Some(output)) = (input, output) else {
            anyhow::bail!("layer {l}: down_proj probes missing")
        };
        let (_, inter) = input.dims2()?;
        let (_, h) = output.dims2()?;
        let o: Vec<f64> = output.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let i: Vec<f64> = input.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let (oi, ov) = argmax_abs(&o);
        let (token, row) = (oi / h, oi % h);
        let (col, iv) = argmax_abs(&i[token * inter..(token + 1) * inter]);
        let max_abs_input = argmax_abs(&i).1.abs();
        let w = model.values_of(&format!("model.layers.{l}.mlp.down_proj.weight"))?;
        let weight = w.get(row)?.get(col)?.to_dtype(DType::F64)?.to_scalar()?;
        out.push(Candidate {
            layer: l,
            row,
            col,
            token,
            output_activation: ov,
            input_activation: iv,
            max_abs_input,
            weight,
        });
    }
    Ok(out)
}

/// A candidate and the PPL with that one weight zeroed.
#[derive(Clone, Debug, Serialize)]
pub struct Verified {
    #[serde(flatten)]
    pub candidate: Candidate,
    pub ppl_zeroed: f64,
    pub ratio_to_base: f64,
}

/// The `top` candidates with the largest |output activation| on `prompt_ids`, each verified
/// by zeroing it and measuring the PPL of `ids` (one window); returns (base PPL, verified).
pub fn find_and_verify(
    model: &Model,
    prompt_ids: &[u32],
    ids: &[u32],
    top: usize,
) -> Result<(f64, Vec<Verified>)> {
    let ppl = |m: &Model| -> Result<f64> {
        Ok(crate::eval::perplexity(m, "eval", ids, ids.len(), ids.len(), |_| {})?.ppl)
    };
    let base = ppl(model)?;
    let mut cands = candidates(model, prompt_ids)?;
    cands.sort_by(|x, y| {
        y.output_activation
            .abs()
            .total_cmp(&x.output_activation.abs())
    });
    cands.truncate(top);
    let pb = crate::progress::bar(cands.len() as u64, "superweights", "weights");
    let cols = model.config.intermediate_size;
    let mut out = Vec::new();
    for c in cands {
        let name = format!("model.layers.{}.mlp.down_proj.weight", c.layer);
        let saved = super::ops::apply_values(model, &name, &[c.row * cols + c.col], &[0.0])?;
        let p = ppl(model);
        super::ops::restore(model, saved)?;
        let p = p?;
        pb.inc(1);
        out.push(Verified {
            candidate: c,
            ppl_zeroed: p,
            ratio_to_base: p / base,
        });
    }
    pb.finish_and_clear();
    Ok((base, out))
}
