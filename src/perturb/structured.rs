//! Structured perturbation: hidden dimension D everywhere it appears in a layer — column D of
//! q/k/v/gate/up (they read the residual stream), row D of o/down (they write it), entry D
//! of both RMSNorm weights.

use crate::mask::Mask;
use crate::model::Model;
use anyhow::{bail, Result};

/// The parameter kinds a hidden dimension appears in, and how it sits in each.
pub const KINDS: [(&str, Stripe); 9] = [
    ("self_attn.q_proj.weight", Stripe::Column),
    ("self_attn.k_proj.weight", Stripe::Column),
    ("self_attn.v_proj.weight", Stripe::Column),
    ("self_attn.o_proj.weight", Stripe::Row),
    ("mlp.gate_proj.weight", Stripe::Column),
    ("mlp.up_proj.weight", Stripe::Column),
    ("mlp.down_proj.weight", Stripe::Row),
    ("input_layernorm.weight", Stripe::Entry),
    ("post_attention_layernorm.weight", Stripe::Entry),
];

/// How dimension D sits in a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stripe {
    Column,
    Row,
    Entry,
}

/// Short kind label: `q_proj`, …, `input_layernorm`.
pub fn kind_label(suffix: &str) -> &str {
    suffix
        .trim_end_matches(".weight")
        .rsplit('.')
        .next()
        .unwrap_or(suffix)
}

/// Mask of dimension `dim` in `layers`, restricted to the kinds whose suffix is in `kinds`.
pub fn stripe_mask(model: &Model, dim: usize, layers: &[usize], kinds: &[&str]) -> Result<Mask> {
    let h = model.config.hidden_size;
    if dim >= h {
        bail!(
            "dimension {dim} out of range: hidden size is {h} (0..{})",
            h - 1
        );
    }
    let mut mask = Mask::new();
    for &l in layers {
        if l >= model.config.num_layers {
            bail!(
                "layer {l} out of range: the model has {} layers",
                model.config.num_layers
            );
        }
        for (suffix, stripe) in KINDS.iter().filter(|(s, _)| kinds.contains(s)) {
            let name = format!("model.layers.{l}.{suffix}");
            let Some(var) = model.param(&name) else {
                bail!("{name}: not a parameter of this model")
            };
            let dims = var.shape.clone();
            let idx: Vec<usize> = match stripe {
                Stripe::Entry => vec![dim],
                Stripe::Column => (0..dims[0]).map(|r| r * dims[1] + dim).collect(),
                Stripe::Row => (0..dims[1]).map(|c| dim * dims[1] + c).collect(),
            };
            let t = crate::mask::MaskTensor::from_indices(&name, &dims, idx)?;
            mask.insert(name, t);
        }
    }
    Ok(mask)
}
