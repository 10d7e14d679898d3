//! Causal attention in query blocks: only the scores on and below the diagonal are
//! computed, nothing of size `t × t` outlives a block, and the output comes out in the
//! `[b, t, heads, d]` layout the output projection reads. The backward recomputes each
//! block's probabilities (as FlashAttention does) instead of keeping them.

use super::{slice, Real, Same};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows per block.
const BLOCK: usize = 64;

/// Causal grouped-query attention: `q` `[b, h, t, d]`, `k`, `v` `[b, kv, t, d]` (query
/// head `i` reads kv head `i / (h / kv)`) → `[b, t, h, d]`, with gradients for all three
/// inputs when they track them. Same values as [`crate::model::ops::attention`].
pub fn causal_attention_blocked(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if q.track_op() || k.track_op() || v.track_op() {
        q.apply_op3(&k, &v, BlockAttention)
    } else {
        q.apply_op3_no_bwd(&k, &v, &BlockAttention)
    }
}

struct BlockAttention;

/// Rows `i0..` of a causal block of scores `[rows, keys]` → probabilities of
/// `softmax(scale · scores)` over the keys each row may see (row `r` sees `i0 + r + 1`), 0
/// beyond.
fn causal_softmax_rows<T: Real>(s: &mut [T], keys: usize, i0: usize, scale: T) {
    for (r, row) in s.chunks_mut(keys).enumerate() {
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
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)` with single-threaded gemm; each operand is
/// given as (pointer, column stride, row stride).
///
/// # Safety
/// The pointers must address m×k, k×n and m×n elements at the given strides, and `dst`
/// must not be written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut T, usize, usize),
    accumulate: bool,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.1 as isize,
        dst.2 as isize,
        accumulate,
        lhs.0,
        lhs.1 as isize,
        lhs.2 as isize,
        rhs.0,
        rhs.1 as isize,
        rhs.2 as isize,
        if accumulate { T::ONE } else { T::ZERO },
        T::ONE,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Gradients of [`kernel`]: `(dq [b,h,t,d], dk [b,kv,t,d], dv [b,kv,t,d])` from `dout`
/// `[b,t,h,d]` and the forward's output `o` (same layout). One task per (batch, head) walks
/// its query blocks, recomputing the probabilities P, and accumulates its own dk, dv; heads
/// sharing a kv head are summed at the end.
#[allow(clippy::too_many_arguments)]
fn kernel_bwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    dout: &[T],
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut dq = vec![T::ZERO; b * h * t * d];
    let rep = h / kv;
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    let hd = h * d;
    // per (batch, head): [dk | dv] for its kv head, t×d each
    let mut parts = vec![T::ZERO; b * h * 2 * t * d];
    dq.par_chunks_mut(t * d)
        .zip(parts.par_chunks_mut(2 * t * d))
        .enumerate()
        .for_each_init(
            || (vec![T::ZERO; BLOCK * t], vec![T::ZERO; BLOCK * t]),
            |(p, ds), (task, (dq, part))| {
                let (bi, hi) = (task / h, task % h);
                let (dk, dv) = part.split_at_mut(t * d);
                let qh = &q[task * t * d..(task + 1) * t * d];
                let kvo = (bi * kv + hi / rep) * t * d;
                let (kh, vh) = (&k[kvo..kvo + t * d], &v[kvo..kvo + t * d]);
                for i0 in (0..t).step_by(BLOCK) {
                    let rows = BLOCK.min(t - i0);
                    let keys = i0 + rows;
                    let qb = qh[i0 * d..].as_ptr();
                    // rows of dout / o for (bi, i0.., hi): row stride h·d
                    let row0 = (bi * t + i0) * hd + hi * d;
                    let dob = dout[row0..].as_ptr();
                    // SAFETY (all gemms): operands are the (rows|keys)×d slices of this
                    // task's head and the rows×keys scratch buffers; dq rows and dk/dv
                    // belong to this task only.
                    unsafe {
                        // P = softmax(scale · q kᵀ), dP = dout vᵀ
                        mm(
                            rows,
                            keys,
                            d,
                            (p.as_mut_ptr(), 1, keys),
                            false,
                            (qb, 1, d),
                            (kh.as_ptr(), d, 1),
                        );
                        mm(
                            rows,
                            keys,
                            d,
                            (ds.as_mut_ptr(), 1, keys),
                            false,
                            (dob, 1, hd),
                            (vh.as_ptr(), d, 1),
                        );
                    }
                    causal_softmax_rows(&mut p[..rows * keys], keys, i0, scale);
                    // dS = scale · P ⊙ (dP − rowsum(dout ⊙ o))
                    for r in 0..rows {
                        let at = row0 + r * hd;
                        let mut dd = 0f64;
                        for c in 0..d {
                            dd += (dout[at + c] * o[at + c]).to_f64();
                        }
                        let dd = T::from_f64(dd);
                        let (pr, dr) = (
                            &p[r * keys..(r + 1) * keys],
                            &mut ds[r * keys..(r + 1) * keys],
                        );
                        for (x, &pv) in dr.iter_mut().zip(pr) {
                            *x = pv * (*x - dd) * scale;
                        }
                    }
                    unsafe {
                        // dq = dS k; dk += dSᵀ q; dv += Pᵀ dout
                        mm(
                            rows,
                            d,
                            keys,
                            (dq[i0 * d..].as_mut_ptr(), 1, d),
                            false,
                            (ds.as_ptr(), 1, keys),
                            (kh.as_ptr(), 1, d),
                        );
                        mm(
                            keys,
                            d,
                            rows,
                            (dk.as_mut_ptr(), 1, d),
                            true,
                            (ds.as_ptr(), keys, 1),
                            (qb, 1, d),
                        );
                        mm(
                            keys,
                            d,
                            rows,
                            (dv.as_mut_ptr(), 1, d),
                            true,
                            (p.as_ptr(), keys, 1),
                            (dob, 1, hd),
                        );
                    }
                }
            },
        );
    // sum the heads of each kv group
    let mut dk = vec![T::ZERO; b * kv * t * d];
    let mut dv = vec![T::ZERO; b * kv * t * d];
    dk.par_chunks_mut(t * d)
        .zip(dv.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(g, (dk, dv))| {
            let (bi, kh) = (g / kv, g % kv);
            for hi in kh * rep..(kh + 1) * rep {
                let part = &parts[(bi * h + hi) * 2 * t * d..][..2 * t * d];
                let (pk, pv) = part.split_at(t * d);
                for (x, &y) in dk.iter_mut().zip(pk) {
                    *x += y;
                }
                for (x, &y) in dv.iter_mut().zip(pv) {
                    *x += y;
                }
            }
        });
    (dq, dk, dv)
}

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
                // scores = q kᵀ
                mm(
                    rows,
                    keys,
                    d,
                    (s.as_mut_ptr(), 1, keys),
                    false,
                    (qb.as_ptr(), 1, d),
                    (kb.as_ptr(), d, 1),
                );
            }
            causal_softmax_rows(&mut s[..rows * keys], keys, i0, scale);
            let dst = (out_ptr as *mut T).wrapping_add(((bi * t + i0) * h + hi) * d);
            unsafe {
                // out = P v, written in the [b, t, h, d] layout
                mm(
                    rows,
                    d,
                    keys,
                    (dst, 1, h * d),
                    false,
                    (s.as_ptr(), 1, keys),
                    (vb.as_ptr(), 1, d),
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

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = causal_attention_backward(q, k, v, o, dout)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Gradients `(dq, dk, dv)` of [`causal_attention_blocked`] at `q`, `k`, `v` with output
/// `o`, for the output gradient `dout` (no autograd graph).
pub fn causal_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    dout: &Tensor,
) -> Result<Grads3> {
    let dout = dout.contiguous()?;
    let (q, k, v, o) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        o.contiguous()?,
    );
    match q.dtype() {
        candle_core::DType::F32 => bwd_tensors::<f32>(&q, &k, &v, &o, &dout),
        candle_core::DType::F64 => bwd_tensors::<f64>(&q, &k, &v, &o, &dout),
        dt => bail!("attention: unsupported dtype {dt:?}"),
    }
}

/// The contiguous CPU data of `t` as `&[T]`, passed to `f`.
fn with_data<T: Same, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*s else {
        bail!("attention: CPU tensors only");
    };
    f(slice(T::same(cpu, "attention bwd")?, l, "attention bwd")?)
}

type Grads3 = (Tensor, Tensor, Tensor);

fn bwd_tensors<T: Same + candle_core::WithDType>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    dout: &Tensor,
) -> Result<Grads3> {
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let (dq, dk, dv) = with_data::<T, _>(q, |qs| {
        with_data::<T, _>(k, |ks| {
            with_data::<T, _>(v, |vs| {
                with_data::<T, _>(o, |os| {
                    with_data::<T, _>(dout, |ds| {
                        Ok(kernel_bwd(qs, ks, vs, os, ds, b, h, kv, t, d))
                    })
                })
            })
        })
    })?;
    let dev = q.device();
    Ok((
        Tensor::from_vec(dq, q.shape(), dev)?,
        Tensor::from_vec(dk, k.shape(), dev)?,
        Tensor::from_vec(dv, v.shape(), dev)?,
    ))
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
        let got = super::causal_attention_blocked(&q, &k, &v).unwrap();
        assert_eq!(got.dims(), &[b, t, h, d]);
        let diff = max_abs_diff(&got, &want.contiguous().unwrap());
        assert!(diff < 1e-12, "{diff}");
        let got32 = super::causal_attention_blocked(
            &q.to_dtype(DType::F32).unwrap(),
            &k.to_dtype(DType::F32).unwrap(),
            &v.to_dtype(DType::F32).unwrap(),
        )
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
        assert!(max_abs_diff(&got32, &want.contiguous().unwrap()) < 1e-5);
    }

    /// Gradients of q, k, v against the composed ops and finite differences (several
    /// blocks, a partial last block, grouped heads, batch 2).
    #[test]
    fn block_attention_gradients() {
        let (b, h, kv, t, d) = (2, 4, 2, 70, 5);
        let q = randn(&[b, h, t, d], 15);
        let k = randn(&[b, kv, t, d], 16);
        let v = randn(&[b, kv, t, d], 17);
        let mask = ops::causal_mask(h / kv, t, DType::F64, &Device::Cpu).unwrap();
        super::super::testing::check(
            &[q, k, v],
            &|a| super::causal_attention_blocked(&a[0], &a[1], &a[2]),
            &|a| {
                let qs = a[0].reshape((b, kv, h / kv * t, d))?;
                ops::attention(&qs, &a[1], &a[2], &mask)?
                    .reshape((b, h, t, d))?
                    .transpose(1, 2)?
                    .contiguous()
            },
            1e-10,
        );
    }
}
