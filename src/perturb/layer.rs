//! A decoder layer and the output head with per-batch-element RMSNorm weights, so one
//! forward can evaluate several norm perturbations at once (batch element b uses norm
//! weight row b). Mirrors `Model::layer` / `Model::head` using the model's public pieces.

use crate::model::{ops, AttnContext, Model};
use anyhow::{Context, Result};
use candle_core::Tensor;

fn weight(model: &Model, name: &str) -> Result<Tensor> {
    Ok(model
        .param(name)
        .with_context(|| format!("{name}: not a parameter of this model"))?
        .as_tensor()
        .detach())
}

/// Layer `l` on `x` `[b, t, hidden]` (no gradients). `input_w` / `post_w`: per-element norm
/// weights `[b, 1, hidden]` replacing the input / post-attention RMSNorm weight, or `None`
/// for the model's own.
pub fn layer_with_norm_weights(
    model: &Model,
    l: usize,
    x: &Tensor,
    ctx: &AttnContext,
    input_w: Option<&Tensor>,
    post_w: Option<&Tensor>,
) -> Result<Tensor> {
    let c = &model.config;
    let p = format!("model.layers.{l}");
    let w = |n: &str| weight(model, &format!("{p}.{n}"));
    let (b, t, h) = x.dims3()?;
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let rep = nh / nkv;
    let lin = |x: &Tensor, n: &str, bias: bool| -> Result<Tensor> {
        let y = x.matmul(&w(&format!("{n}.weight"))?.t()?)?;
        Ok(if bias {
            y.broadcast_add(&w(&format!("{n}.bias"))?)?
        } else {
            y
        })
    };
    let qb = c.qkv_bias();
    let in_w = match input_w {
        Some(t) => t.clone(),
        None => w("input_layernorm.weight")?,
    };
    let hn = ops::rms_norm(x, &in_w, c.rms_eps)?.reshape((b * t, h))?;
    let q = lin(&hn, "self_attn.q_proj", qb)?
        .reshape((b, t, nh, hd))?
        .transpose(1, 2)?;
    let k = lin(&hn, "self_attn.k_proj", qb)?
        .reshape((b, t, nkv, hd))?
        .transpose(1, 2)?;
    let v = lin(&hn, "self_attn.v_proj", qb)?
        .reshape((b, t, nkv, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let q = ops::rope(&q.contiguous()?, &ctx.cos, &ctx.sin)?;
    let k = ops::rope(&k.contiguous()?, &ctx.cos, &ctx.sin)?;
    let q = q.reshape((b, nkv, rep * t, hd))?;
    let a = ops::attention(&q, &k, &v, &ctx.mask)?;
    let a = a
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * t, nh * hd))?;
    let x = (x + lin(&a, "self_attn.o_proj", false)?.reshape((b, t, h))?)?;
    let post = match post_w {
        Some(t) => t.clone(),
        None => w("post_attention_layernorm.weight")?,
    };
    let hn = ops::rms_norm(&x, &post, c.rms_eps)?.reshape((b * t, h))?;
    let g = lin(&hn, "mlp.gate_proj", false)?;
    let u = lin(&hn, "mlp.up_proj", false)?;
    let m = lin(&ops::swiglu(&g, &u)?, "mlp.down_proj", false)?;
    Ok((x + m.reshape((b, t, h))?)?)
}

/// Mean NLL per batch element of windows `ids` `[b, t]` given the last residual stream `x`
/// `[b, t, hidden]`, with final-norm weights `final_w` `[b, 1, hidden]` (or the model's).
pub fn mean_nll_with_final_norm(
    model: &Model,
    x: &Tensor,
    ids: &Tensor,
    final_w: Option<&Tensor>,
) -> Result<Vec<f64>> {
    let nll = match final_w {
        None => model.nll_from_hidden(x, ids, false)?,
        Some(fw) => {
            let (b, t) = ids.dims2()?;
            let c = &model.config;
            let xs = x.narrow(1, 0, t - 1)?.contiguous()?;
            let xn = ops::rms_norm(&xs, fw, c.rms_eps)?.reshape((b * (t - 1), c.hidden_size))?;
            let head = if c.tie_embeddings {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            };
            let logits = xn.matmul(&weight(model, head)?.t()?)?;
            let targets = ids.narrow(1, 1, t - 1)?.contiguous()?.flatten_all()?;
            ops::token_nll(&logits, &targets)?.reshape((b, t - 1))?
        }
    };
    Ok(nll.mean(1)?.to_dtype(candle_core::DType::F64)?.to_vec1()?)
}
