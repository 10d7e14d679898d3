//! Scaled causal softmax over attention scores.

use super::{dispatch, rows_of, rows_per_task, slice, Real, Same};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `softmax(scale · s + causal mask)` over the last dimension of `s` `[.., rows, t]`, where
/// row `r` is the query at position `r % t` (the GQA layout of [`crate::model::ops::attention`]):
/// keys after the query get probability 0.
pub fn causal_softmax(s: &Tensor, scale: f64) -> Result<Tensor> {
    if !super::use_fused(s) {
        let d = s.dims();
        let (rows, t) = (d[d.len() - 2], d[d.len() - 1]);
        let mask = crate::model::ops::causal_mask(rows / t, t, s.dtype(), s.device())?;
        return crate::model::ops::softmax(&(s * scale)?.broadcast_add(&mask)?);
    }
    s.contiguous()?.apply_op1(CausalSoftmax { scale })
}

struct CausalSoftmax {
    scale: f64,
}

fn fwd<T: Real>(s: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut p = vec![T::ZERO; s.len()];
    let sc = T::from_f64(scale);
    let per = rows_per_task(s.len() / t, t, 16384);
    p.par_chunks_mut(per * t)
        .zip(s.par_chunks(per * t))
        .enumerate()
        .for_each(|(ci, (pc, sc_))| {
            for (k, (pr, sr)) in pc.chunks_mut(t).zip(sc_.chunks(t)).enumerate() {
                let i = (ci * per + k) % t;
                let sr = &sr[..=i];
                let m = super::max_of(sr);
                for (o, &v) in pr.iter_mut().zip(sr) {
                    *o = ((v - m) * sc).fast_exp();
                }
                let inv = T::from_f64(1.0 / super::sum_f64(&pr[..=i]));
                for o in pr[..=i].iter_mut() {
                    *o = *o * inv;
                }
            }
        });
    p
}

fn bwd<T: Real>(p: &[T], dp: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut ds = vec![T::ZERO; p.len()];
    let sc = T::from_f64(scale);
    let per = rows_per_task(p.len() / t, t, 16384);
    ds.par_chunks_mut(per * t)
        .zip(p.par_chunks(per * t))
        .zip(dp.par_chunks(per * t))
        .enumerate()
        .for_each(|(ci, ((dc, pc), gc))| {
            for (k, ((dr, pr), gr)) in dc
                .chunks_mut(t)
                .zip(pc.chunks(t))
                .zip(gc.chunks(t))
                .enumerate()
            {
                let i = (ci * per + k) % t;
                let mut dot = T::ZERO;
                for j in 0..=i {
                    dot += pr[j] * gr[j];
                }
                for j in 0..=i {
                    dr[j] = sc * pr[j] * (gr[j] - dot);
                }
            }
        });
    ds
}

fn last_dim(l: &Layout) -> Result<usize> {
    let t = *l.dims().last().unwrap_or(&0);
    rows_of(l.shape().elem_count(), t, "causal_softmax")?;
    Ok(t)
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = last_dim(l)?;
        let out = dispatch!(s, "causal_softmax", |v| fwd(
            slice(v, l, "causal_softmax")?,
            t,
            self.scale
        ));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, dp: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(
            &dp.contiguous()?,
            &CausalSoftmaxBwd { scale: self.scale },
        )?))
    }
}

struct CausalSoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-causal-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = last_dim(l1)?;
        fn go<T: Same>(
            p: &[T],
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            t: usize,
            scale: f64,
        ) -> Result<Vec<T>> {
            let p = slice(p, l1, "causal_softmax bwd")?;
            let dp = slice(T::same(s2, "causal_softmax bwd")?, l2, "causal_softmax bwd")?;
            Ok(bwd(p, dp, t, scale))
        }
        let out = dispatch!(s1, "causal_softmax bwd", |v| go(
            v, l1, s2, l2, t, self.scale
        )?);
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, randn};
    use crate::model::ops;
    use candle_core::{DType, Device};

    #[test]
    fn causal_softmax_matches_composed_and_finite_differences() {
        let (rep, t) = (2, 5);
        let s = randn(&[2, 3, rep * t, t], 3);
        let mask = ops::causal_mask(rep, t, DType::F64, &Device::Cpu).unwrap();
        check(
            &[s],
            &|a| super::causal_softmax(&a[0], 0.7),
            &|a| ops::softmax(&(&a[0] * 0.7)?.broadcast_add(&mask)?),
            1e-12,
        );
    }
}
