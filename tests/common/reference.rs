//! An independent forward pass in plain f64 loops (no candle ops): candle is used only to
//! read the model's named tensors. Rows of every matrix-vector product run in parallel.

use broca::model::{Config, Model};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// A row-major matrix `[rows, cols]` in f64.
struct Mat {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("tensor to f64")
}

/// The model's values of parameter `name` (a memory-mapped one decoded).
fn tensor(model: &Model, name: &str) -> Tensor {
    model
        .values_of(name)
        .unwrap_or_else(|e| panic!("model has no tensor {name}: {e:#}"))
}

fn vector(model: &Model, name: &str) -> Vec<f64> {
    to_f64(&tensor(model, name))
}

fn matrix(model: &Model, name: &str) -> Mat {
    let t = &tensor(model, name);
    let (rows, cols) = t.dims2().expect("2-d tensor");
    Mat {
        rows,
        cols,
        data: to_f64(t),
    }
}

/// Dot product (FMA on 16 accumulators where the CPU has AVX2 and FMA).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { dot_fma(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] = x[k].mul_add(y[k], acc[k]);
        }
    }
    let mut s: f64 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// `y[t] = W x[t] (+ b)` for every token `t`.
fn linear(w: &Mat, b: Option<&[f64]>, xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
    // out[i][t], computed row by row so each row of W is read once
    let by_row: Vec<Vec<f64>> = (0..w.rows)
        .into_par_iter()
        .map(|i| {
            let row = &w.data[i * w.cols..(i + 1) * w.cols];
            let bias = b.map_or(0.0, |b| b[i]);
            xs.iter().map(|x| dot(row, x) + bias).collect()
        })
        .collect();
    (0..xs.len())
        .map(|t| by_row.iter().map(|r| r[t]).collect())
        .collect()
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

/// Rotate-half RoPE of one head vector at position `pos`.
fn rope(v: &mut [f64], pos: usize, theta: f64) {
    let hd = v.len();
    let half = hd / 2;
    for i in 0..half {
        let angle = pos as f64 * theta.powf(-2.0 * i as f64 / hd as f64);
        let (s, c) = angle.sin_cos();
        let (a, b) = (v[i], v[i + half]);
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

/// Causal grouped-query attention over all tokens: `q` `[t][nh*hd]`, `k`, `v` `[t][nkv*hd]`.
fn attention(c: &Config, q: &[Vec<f64>], k: &[Vec<f64>], v: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    (0..q.len())
        .into_par_iter()
        .map(|i| {
            let mut out = vec![0f64; nh * hd];
            for h in 0..nh {
                let kv = h / group;
                let qh = &q[i][h * hd..(h + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| dot(qh, &k[j][kv * hd..(kv + 1) * hd]) * scale)
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    let vj = &v[j][kv * hd..(kv + 1) * hd];
                    for d in 0..hd {
                        out[h * hd + d] += ej / z * vj[d];
                    }
                }
            }
            out
        })
        .collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Mean NLL (nats) of tokens `1..n` of `ids` given their prefixes, computed in f64.
pub fn mean_nll(model: &Model, ids: &[u32]) -> f64 {
    let c = &model.config;
    let n = ids.len();
    assert!(n >= 2);
    let embed = tensor(model, "model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| to_f64(&embed.narrow(0, id as usize, 1).expect("embedding row")))
        .collect();
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let bias = |w: &str| {
            c.qkv_bias()
                .then(|| vector(model, &format!("{p}.self_attn.{w}_proj.bias")))
        };
        let input_norm = vector(model, &format!("{p}.input_layernorm.weight"));
        let hn: Vec<Vec<f64>> = x
            .iter()
            .map(|xt| rms_norm(xt, &input_norm, c.rms_eps))
            .collect();
        let (bq, bk, bv) = (bias("q"), bias("k"), bias("v"));
        let mut q = linear(
            &matrix(model, &format!("{p}.self_attn.q_proj.weight")),
            bq.as_deref(),
            &hn,
        );
        let mut k = linear(
            &matrix(model, &format!("{p}.self_attn.k_proj.weight")),
            bk.as_deref(),
            &hn,
        );
        let v = linear(
            &matrix(model, &format!("{p}.self_attn.v_proj.weight")),
            bv.as_deref(),
            &hn,
        );
        for (pos, (qt, kt)) in q.iter_mut().zip(k.iter_mut()).enumerate() {
            for h in qt.chunks_mut(c.head_dim) {
                rope(h, pos, c.rope_theta);
            }
            for h in kt.chunks_mut(c.head_dim) {
                rope(h, pos, c.rope_theta);
            }
        }
        let a = attention(c, &q, &k, &v);
        let o = linear(
            &matrix(model, &format!("{p}.self_attn.o_proj.weight")),
            None,
            &a,
        );
        for (xt, ot) in x.iter_mut().zip(&o) {
            xt.iter_mut().zip(ot).for_each(|(a, b)| *a += b);
        }
        let post = vector(model, &format!("{p}.post_attention_layernorm.weight"));
        let hn: Vec<Vec<f64>> = x.iter().map(|xt| rms_norm(xt, &post, c.rms_eps)).collect();
        let g = linear(
            &matrix(model, &format!("{p}.mlp.gate_proj.weight")),
            None,
            &hn,
        );
        let u = linear(
            &matrix(model, &format!("{p}.mlp.up_proj.weight")),
            None,
            &hn,
        );
        let act: Vec<Vec<f64>> = g
            .iter()
            .zip(&u)
            .map(|(gt, ut)| gt.iter().zip(ut).map(|(a, b)| silu(*a) * b).collect())
            .collect();
        let d = linear(
            &matrix(model, &format!("{p}.mlp.down_proj.weight")),
            None,
            &act,
        );
        for (xt, dt) in x.iter_mut().zip(&d) {
            xt.iter_mut().zip(dt).for_each(|(a, b)| *a += b);
        }
    }
    let norm = vector(model, "model.norm.weight");
    let xn: Vec<Vec<f64>> = x[..n - 1]
        .iter()
        .map(|xt| rms_norm(xt, &norm, c.rms_eps))
        .collect();
    let head_name = if c.tie_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let head = tensor(model, head_name);
    // logits[t][v], filled a block of vocabulary rows at a time to bound memory
    let vocab = c.vocab_size;
    let mut logits = vec![vec![0f64; vocab]; n - 1];
    let block = 4096;
    for start in (0..vocab).step_by(block) {
        let len = block.min(vocab - start);
        let w = Mat {
            rows: len,
            cols: c.hidden_size,
            data: to_f64(&head.narrow(0, start, len).expect("head rows")),
        };
        let part = linear(&w, None, &xn);
        for (lt, pt) in logits.iter_mut().zip(part) {
            lt[start..start + len].copy_from_slice(&pt);
        }
    }
    let mut total = 0.0;
    for (t, lt) in logits.iter().enumerate() {
        let max = lt.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + lt.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        total += lse - lt[ids[t + 1] as usize];
    }
    total / (n - 1) as f64
}
