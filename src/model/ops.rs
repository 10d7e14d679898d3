//! Differentiable building blocks of the transformer. Each is written with candle ops that
//! carry gradients (candle's fused `rms_norm`, `softmax_last_dim`, `rope*` and `sdpa` do
//! not), so the same code serves inference and backpropagation.

use candle_core::{DType, Device, Result, Tensor, D};

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// RoPE tables for positions `0..t`: `(cos, sin)`, each `[t, head_dim / 2]`.
pub fn rope_tables(
    t: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        for i in 0..half {
            let inv_freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let a = p as f64 * inv_freq;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (t, half), dev)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, half), dev)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Rotary position embedding in the rotate-halves (NeoX / HF) form, on `[b, h, t, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

/// Additive causal mask for `q_len` queries (repeated `rep` times along rows, the GQA
/// layout of [`attention`]) over `t` keys: 0 on and below the diagonal, -inf above.
pub fn causal_mask(rep: usize, t: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut m = Vec::with_capacity(rep * t * t);
    for _ in 0..rep {
        for i in 0..t {
            for j in 0..t {
                m.push(if j <= i { 0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(m, (rep * t, t), dev)?.to_dtype(dtype)
}

/// Softmax over the last dimension from differentiable ops.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max.detach())?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Causal grouped-query attention. `q`: `[b, kv, rep*t, d]` (the `rep` query heads that share
/// one key/value head stacked along rows), `k`, `v`: `[b, kv, t, d]`; `mask` from
/// [`causal_mask`]. Returns `[b, kv, rep*t, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let att = (q.matmul(&k.t()?)? * scale)?;
    let att = softmax(&att.broadcast_add(mask)?)?;
    att.matmul(v)
}

/// SwiGLU: `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Negative log-likelihood of each target: `logits` `[n, vocab]`, `targets` `[n]` (u32).
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.squeeze(1)
}
