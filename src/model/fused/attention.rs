//! Causal attention for inference in query blocks: only the scores on and below the
//! diagonal are computed, nothing of size `t × t` outlives a block, and the output comes out
//! in the `[b, t, heads, d]` layout the output projection reads.

use super::{slice, Real, Same};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows per block.
const BLOCK: usize = 64;

/// Causal grouped-query attention without gradients: `q` `[b, h, t, d]`, `k`, `v`
/// `[b, kv, t, d]` (query head `i` reads kv head `i / (h / kv)`) → `[b, t, h, d]`.
/// Same values as [`crate::model::ops::attention`]; errors if an input tracks gradients.
pub fn causal_attention_inference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if q.track_op() || k.track_op() || v.track_op() {
        bail!("causal_attention_inference: inputs track gradients");
    }
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &BlockAttention)
}

struct BlockAttention;

#[allow(clippy::too_many_arguments)]
fn kernel<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
) -> Vec<T> {
    let mut out = vec![T::ZERO; b * t * h * d];
    let out_ptr = out.as_mut_ptr() as usize;
    let blocks = t.div_ceil(BLOCK);
    let rep = h / kv;
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    // largest blocks first so that the tail of the parallel loop is short
    let tasks: Vec<(usize, usize, usize)> = (0..blocks)
        .rev()
        .flat_map(|blk| (0..b).flat_map(move |bi| (0..h).map(move |hi| (bi, hi, blk))))
        .collect();
    tasks.par_iter().for_each_init(
        || vec![T::ZERO; BLOCK * t],
        |s, &(bi, hi, blk)| {
            let i0 = blk * BLOCK;
            let rows = BLOCK.min(t - i0);
            let keys = i0 + rows;
            let qb = &q[((bi * h + hi) * t + i0) * d..];
            let kvo = (bi * kv + hi / rep) * t * d;
            let (kb, vb) = (&k[kvo..], &v[kvo..]);
            // SAFETY (both gemms): operands hold the rows × d, keys × d and rows × keys
            // elements the strides address; out rows of this (b, head, block) are written by
            // this task only.
            unsafe {
                gemm::gemm(
                    rows,
                    keys,
                    d,
                    s.as_mut_ptr(),
                    1,
                    keys as isize,
                    false,
                    qb.as_ptr(),
                    1,
                    d as isize,
                    kb.as_ptr(),
                    d as isize,
                    1,
                    T::ZERO,
                    T::ONE,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for r in 0..rows {
                let row = &mut s[r * keys..(r + 1) * keys];
                let n = i0 + r + 1;
                let m = super::max_of(&row[..n]);
                for x in row[..n].iter_mut() {
                    *x = ((*x - m) * scale).fast_exp();
                }
                let inv = T::from_f64(1.0 / super::sum_f64(&row[..n]));
                for x in row[..n].iter_mut() {
                    *x = *x * inv;
                }
                for x in row[n..].iter_mut() {
                    *x = T::ZERO;
                }
            }
            let dst = (out_ptr as *mut T).wrapping_add(((bi * t + i0) * h + hi) * d);
            unsafe {
                gemm::gemm(
                    rows,
                    d,
                    keys,
                    dst,
                    1,
                    (h * d) as isize,
                    false,
                    s.as_ptr(),
                    1,
                    keys as isize,
                    vb.as_ptr(),
                    1,
                    d as isize,
                    T::ZERO,
                    T::ONE,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    out
}

impl CustomOp3 for BlockAttention {
    fn name(&self) -> &'static str {
        "fused-block-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[b, h, t, d], &[b2, kv, t2, d2]) = (l1.dims(), l2.dims()) else {
            bail!(
                "attention: expected 4-d q and k, got {:?} {:?}",
                l1.dims(),
                l2.dims()
            );
        };
        if b2 != b || t2 != t || d2 != d || kv == 0 || h % kv != 0 || l3.dims() != l2.dims() {
            bail!(
                "attention: shapes q {:?} k {:?} v {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        #[allow(clippy::too_many_arguments)]
        fn go<T: Same>(
            q: &[T],
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
            dims: (usize, usize, usize, usize, usize),
        ) -> Result<Vec<T>> {
            let w = "attention";
            let q = slice(q, l1, w)?;
            let k = slice(T::same(s2, w)?, l2, w)?;
            let v = slice(T::same(s3, w)?, l3, w)?;
            let (b, h, kv, t, d) = dims;
            Ok(kernel(q, k, v, b, h, kv, t, d))
        }
        let out = super::dispatch!(s1, "attention", |x| go(
            x,
            l1,
            s2,
            l2,
            s3,
            l3,
            (b, h, kv, t, d)
        )?);
        Ok((out, Shape::from((b, t, h, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_abs_diff, randn};
    use crate::model::ops;
    use candle_core::{DType, Device};

    #[test]
    fn block_attention_matches_composed() {
        // t spans several blocks and a partial one
        let (b, h, kv, t, d) = (2, 6, 2, 150, 8);
        let q = randn(&[b, h, t, d], 12);
        let k = randn(&[b, kv, t, d], 13);
        let v = randn(&[b, kv, t, d], 14);
        let mask = ops::causal_mask(h / kv, t, DType::F64, &Device::Cpu).unwrap();
        let qs = q.reshape((b, kv, h / kv * t, d)).unwrap();
        let want = ops::attention(&qs, &k, &v, &mask)
            .unwrap()
            .reshape((b, h, t, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let got = super::causal_attention_inference(&q, &k, &v).unwrap();
        assert_eq!(got.dims(), &[b, t, h, d]);
        let diff = max_abs_diff(&got, &want.contiguous().unwrap());
        assert!(diff < 1e-12, "{diff}");
        let got32 = super::causal_attention_inference(
            &q.to_dtype(DType::F32).unwrap(),
            &k.to_dtype(DType::F32).unwrap(),
            &v.to_dtype(DType::F32).unwrap(),
        )
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
        assert!(max_abs_diff(&got32, &want.contiguous().unwrap()) < 1e-5);
    }
}
