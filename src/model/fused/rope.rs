//! Rotary position embedding fused with the `[b, t, h, d]` → `[b, h, t, d]` transpose.

use super::{dispatch, slice, Real, Same};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// RoPE (rotate-halves form, as [`crate::model::ops::rope`]) of `x` `[b, t, h, d]`, returned
/// as `[b, h, t, d]`; `cos`, `sin` `[t, d/2]`.
pub fn rope_transposed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !super::use_fused(x) {
        return crate::model::ops::rope(&x.transpose(1, 2)?.contiguous()?, cos, sin);
    }
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )
}

/// `inverse: false`: `[b, t, h, d]` → rotated `[b, h, t, d]`. `inverse: true`: the adjoint,
/// `[b, h, t, d]` → `[b, t, h, d]` rotated by minus the angle (the backward pass).
struct Rope {
    inverse: bool,
}

/// `x` in the source layout; `dims` = (b, t, h, d).
fn kernel<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: (usize, usize, usize, usize),
    inverse: bool,
) -> Vec<T> {
    let (_, t, h, d) = dims;
    let half = d / 2;
    let mut y = vec![T::ZERO; x.len()];
    // one task per (batch, head): its output block [t, d] (forward) is contiguous
    let sign = if inverse { -T::ONE } else { T::ONE };
    let body = |p: usize, out: &mut [T], src: &[T]| {
        let (c, s) = (
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
        for i in 0..half {
            let (x1, x2) = (src[i], src[i + half]);
            let sn = sign * s[i];
            out[i] = x1 * c[i] - x2 * sn;
            out[i + half] = x2 * c[i] + x1 * sn;
        }
    };
    if !inverse {
        y.par_chunks_mut(t * d).enumerate().for_each(|(bh, blk)| {
            let (bi, hi) = (bh / h, bh % h);
            for p in 0..t {
                let src = &x[((bi * t + p) * h + hi) * d..][..d];
                body(p, &mut blk[p * d..(p + 1) * d], src);
            }
        });
    } else {
        // output [b, t, h, d]: one task per (batch, position)
        y.par_chunks_mut(h * d).enumerate().for_each(|(bp, blk)| {
            let (bi, p) = (bp / t, bp % t);
            for hi in 0..h {
                let src = &x[((bi * h + hi) * t + p) * d..][..d];
                body(p, &mut blk[hi * d..(hi + 1) * d], src);
            }
        });
    }
    y
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
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
        let dims = match l1.dims() {
            &[b, t, h, d] if !self.inverse => (b, t, h, d),
            &[b, h, t, d] => (b, t, h, d),
            d => bail!("rope: expected a 4-d input, got {d:?}"),
        };
        let (_, t, _, d) = dims;
        if d % 2 != 0 || l2.dims() != [t, d / 2] || l3.dims() != [t, d / 2] {
            bail!(
                "rope: tables {:?} {:?} do not fit input {:?}",
                l2.dims(),
                l3.dims(),
                l1.dims()
            );
        }
        #[allow(clippy::too_many_arguments)]
        fn go<T: Same>(
            x: &[T],
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
            dims: (usize, usize, usize, usize),
            inverse: bool,
        ) -> Result<Vec<T>> {
            let x = slice(x, l1, "rope")?;
            let c = slice(T::same(s2, "rope")?, l2, "rope")?;
            let s = slice(T::same(s3, "rope")?, l3, "rope")?;
            Ok(kernel(x, c, s, dims, inverse))
        }
        let out = dispatch!(s1, "rope", |v| go(
            v,
            l1,
            s2,
            l2,
            s3,
            l3,
            dims,
            self.inverse
        )?);
        let (b, t, h, d) = dims;
        let shape = if self.inverse {
            Shape::from((b, t, h, d))
        } else {
            Shape::from((b, h, t, d))
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(rope_transposed_backward(dy, cos, sin)?), None, None))
    }
}

/// Gradient of [`rope_transposed`]'s input (`[b, t, h, d]`) for the output gradient `dy`
/// `[b, h, t, d]`: the rotation by minus the angle, transposed back (no autograd graph).
pub fn rope_transposed_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    dy.contiguous()?.apply_op3_no_bwd(
        &cos.contiguous()?,
        &sin.contiguous()?,
        &Rope { inverse: true },
    )
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, randn};
    use crate::model::ops;
    use candle_core::{DType, Device};

    #[test]
    fn rope_matches_composed_and_finite_differences() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = randn(&[b, t, h, d], 4);
        let (cos, sin) = ops::rope_tables(t, d, 10000.0, DType::F64, &Device::Cpu).unwrap();
        check(
            &[x],
            &|a| super::rope_transposed(&a[0], &cos, &sin),
            &|a| ops::rope(&a[0].transpose(1, 2)?.contiguous()?, &cos, &sin),
            1e-12,
        );
    }
}
