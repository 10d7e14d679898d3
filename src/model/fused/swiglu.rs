//! SwiGLU `silu(g) · u`.

use super::{dispatch, slice, Real, Same};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

/// `silu(gate) · up`, elementwise (fused; see [`crate::model::ops::swiglu`]).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !super::use_fused(gate) {
        return crate::model::ops::swiglu(gate, up);
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

#[inline(always)]
fn sigmoid<T: Real>(g: T) -> T {
    T::ONE / (T::ONE + (-g).fast_exp())
}

fn fwd<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::ZERO; g.len()];
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(u.par_chunks(CHUNK))
        .for_each(|((yc, gc), uc)| {
            for ((o, &g), &u) in yc.iter_mut().zip(gc).zip(uc) {
                *o = g * sigmoid(g) * u;
            }
        });
    y
}

/// `[dg; du]` stacked.
fn bwd<T: Real>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    let mut out = vec![T::ZERO; 2 * n];
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .zip(u.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(((dgc, duc), gc), (uc, dyc))| {
            for i in 0..gc.len() {
                let (g, u, d) = (gc[i], uc[i], dyc[i]);
                let s = sigmoid(g);
                duc[i] = d * g * s;
                dgc[i] = d * u * s * (T::ONE + g * (T::ONE - s));
            }
        });
    out
}

fn same_len(l1: &Layout, l2: &Layout) -> Result<()> {
    if l1.shape() != l2.shape() {
        bail!("swiglu: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    Ok(())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_len(l1, l2)?;
        fn go<T: Same>(g: &[T], l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<Vec<T>> {
            Ok(fwd(
                slice(g, l1, "swiglu")?,
                slice(T::same(s2, "swiglu")?, l2, "swiglu")?,
            ))
        }
        let out = dispatch!(s1, "swiglu", |v| go(v, l1, s2, l2)?);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = swiglu_backward(g, u, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

/// Gradients `(dgate, dup)` of [`swiglu`] for the output gradient `dy` (fused kernel, no
/// autograd graph).
pub fn swiglu_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let both = g
        .contiguous()?
        .apply_op3_no_bwd(&u.contiguous()?, &dy.contiguous()?, &SwiGluBwd)?;
    let n = g.elem_count();
    let dg = both.narrow(0, 0, n)?.reshape(g.shape())?;
    let du = both.narrow(0, n, n)?.reshape(u.shape())?;
    Ok((dg, du))
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
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
        same_len(l1, l2)?;
        same_len(l1, l3)?;
        fn go<T: Same>(
            g: &[T],
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<Vec<T>> {
            let w = "swiglu bwd";
            Ok(bwd(
                slice(g, l1, w)?,
                slice(T::same(s2, w)?, l2, w)?,
                slice(T::same(s3, w)?, l3, w)?,
            ))
        }
        let out = dispatch!(s1, "swiglu bwd", |v| go(v, l1, s2, l2, s3, l3)?);
        Ok((out, Shape::from(2 * l1.shape().elem_count())))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, randn};
    use crate::model::ops;

    #[test]
    fn swiglu_matches_composed_and_finite_differences() {
        let g = (randn(&[3, 11], 5) * 3.0).unwrap();
        let u = randn(&[3, 11], 6);
        check(
            &[g, u],
            &|a| super::swiglu(&a[0], &a[1]),
            &|a| ops::swiglu(&a[0], &a[1]),
            1e-12,
        );
    }
}
