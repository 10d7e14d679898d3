//! RMSNorm over the last dimension, with gradients for both `x` and the weight.

use super::{dispatch, rows_of, rows_per_task, slice, Real, Same};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension (fused; see [`super::super::ops::rms_norm`]).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !super::use_fused(x) {
        return crate::model::ops::rms_norm(x, w, eps);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

fn inv_rms<T: Real>(row: &[T], eps: f64) -> T {
    let mut s = 0f64;
    for &v in row {
        s += (v * v).to_f64();
    }
    T::from_f64(1.0 / (s / row.len() as f64 + eps).sqrt())
}

fn fwd<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let n = w.len();
    let mut y = vec![T::ZERO; x.len()];
    let per = rows_per_task(x.len() / n, n, 8192);
    y.par_chunks_mut(per * n)
        .zip(x.par_chunks(per * n))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(n).zip(xc.chunks(n)) {
                let r = inv_rms(xr, eps);
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * r * g;
                }
            }
        });
    y
}

/// Returns `dx` (x's length) followed by `dw` (n).
fn bwd<T: Real>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let n = w.len();
    let rows = x.len() / n;
    let mut out = vec![T::ZERO; x.len() + n];
    let (dx, dw) = out.split_at_mut(x.len());
    let per = rows_per_task(rows, n, 8192);
    let inv_n = T::from_f64(1.0 / n as f64);
    let partial = dx
        .par_chunks_mut(per * n)
        .zip(x.par_chunks(per * n))
        .zip(dy.par_chunks(per * n))
        .map(|((dxc, xc), dyc)| {
            let mut acc = vec![T::ZERO; n];
            for ((dxr, xr), dyr) in dxc.chunks_mut(n).zip(xc.chunks(n)).zip(dyc.chunks(n)) {
                let r = inv_rms(xr, eps);
                let mut s = T::ZERO;
                for j in 0..n {
                    s += dyr[j] * w[j] * xr[j];
                    acc[j] += dyr[j] * xr[j] * r;
                }
                let c = r * r * r * s * inv_n;
                for j in 0..n {
                    dxr[j] = r * dyr[j] * w[j] - xr[j] * c;
                }
            }
            acc
        })
        .reduce(
            || vec![T::ZERO; n],
            |mut a, b| {
                for (u, v) in a.iter_mut().zip(b) {
                    *u += v;
                }
                a
            },
        );
    dw.copy_from_slice(&partial);
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l2.shape().elem_count();
        if l1.dims().last() != Some(&n) {
            candle_core::bail!("rms_norm: weight of {n} for input {:?}", l1.dims());
        }
        fn go<T: Same>(
            x: &[T],
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            eps: f64,
        ) -> Result<Vec<T>> {
            let x = slice(x, l1, "rms_norm")?;
            let w = slice(T::same(s2, "rms_norm")?, l2, "rms_norm")?;
            Ok(fwd(x, w, eps))
        }
        let out = dispatch!(s1, "rms_norm", |v| go(v, l1, s2, l2, self.eps)?);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = rms_norm_backward(x, w, self.eps, dy)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Gradients `(dx, dw)` of [`rms_norm`] at `x`, `w` for the output gradient `dy` (fused
/// kernel, no autograd graph).
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let g = x.contiguous()?.apply_op3_no_bwd(
        &w.contiguous()?,
        &dy.contiguous()?,
        &RmsNormBwd { eps },
    )?;
    let len = x.elem_count();
    let dx = g.narrow(0, 0, len)?.reshape(x.shape())?;
    let dw = g.narrow(0, len, w.elem_count())?.reshape(w.shape())?;
    Ok((dx, dw))
}

struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
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
        fn go<T: Same>(
            x: &[T],
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
            eps: f64,
        ) -> Result<Vec<T>> {
            let x = slice(x, l1, "rms_norm bwd")?;
            let w = slice(T::same(s2, "rms_norm bwd")?, l2, "rms_norm bwd")?;
            let dy = slice(T::same(s3, "rms_norm bwd")?, l3, "rms_norm bwd")?;
            rows_of(x.len(), w.len(), "rms_norm bwd")?;
            Ok(bwd(x, w, dy, eps))
        }
        let out = dispatch!(s1, "rms_norm bwd", |v| go(v, l1, s2, l2, s3, l3, self.eps)?);
        let len = l1.shape().elem_count() + l2.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, randn};
    use crate::model::ops;

    #[test]
    fn rms_norm_matches_composed_and_finite_differences() {
        let x = randn(&[2, 5, 7], 1);
        let w = (randn(&[7], 2) + 1.0).unwrap();
        check(
            &[x, w],
            &|a| super::rms_norm(&a[0], &a[1], 1e-5),
            &|a| ops::rms_norm(&a[0], &a[1], 1e-5),
            1e-12,
        );
    }
}
