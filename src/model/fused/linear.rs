//! `x · wᵀ` straight through gemm: no zero-filled output, no transposed-weight node in the
//! graph, and a weight gradient computed directly in the weight's own layout.

use super::{slice, Real, Same};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// `x` `[m, k]` times `w` `[n, k]` transposed → `[m, n]` (a linear layer without bias).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !super::use_fused(x) {
        return x.matmul(&w.t()?);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Mm::Linear)
}

/// Gradient of [`linear`]'s input: `dy` `[m, n]` times `w` `[n, k]` (no autograd graph).
pub fn linear_backward_input(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    dy.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &Mm::Plain)
}

/// Gradient of [`linear`]'s weight: `dy` `[m, n]` transposed times `x` `[m, k]` → `[n, k]`
/// (no autograd graph).
pub fn linear_backward_weight(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    dy.contiguous()?
        .apply_op2_no_bwd(&x.contiguous()?, &Mm::TransA)
}

/// Receives weight gradients from [`linear_into`] layers during a backward pass, in place of
/// candle's gradient store (which would add each one to a fresh zero tensor on one thread).
pub trait GradSink: Send + Sync {
    /// Adds `g`, the gradient of the model's parameter number `param` (in its shape).
    fn add(&self, param: usize, g: &Tensor) -> Result<()>;

    /// Adds a gradient that is zero outside some rows of parameter `param` (an embedding's):
    /// row `rows[i]` gets row `i` of `g` `[rows.len(), cols]`; repeated rows add up.
    fn add_rows(&self, param: usize, rows: &[u32], g: &Tensor) -> Result<()>;

    /// Whether this sink wants parameter `param`'s gradient at all (the manual backward
    /// skips the products of those it does not want, and stops below the lowest layer that
    /// has a wanted parameter).
    fn wants(&self, _param: usize) -> bool {
        true
    }
}

/// [`linear`] whose weight gradient goes to `sink` as parameter `param` instead of to
/// candle's gradient store (`w` is used detached). Off the fused path (other devices,
/// reference ops) it is plain [`linear`] and the gradient stays in the gradient store.
pub fn linear_into(
    x: &Tensor,
    w: &Tensor,
    sink: &Arc<dyn GradSink>,
    param: usize,
) -> Result<Tensor> {
    if !super::use_fused(x) || !x.track_op() {
        return linear(x, w);
    }
    x.contiguous()?.apply_op2(
        &w.detach().contiguous()?,
        SinkLinear {
            sink: sink.clone(),
            param,
        },
    )
}

struct SinkLinear {
    sink: Arc<dyn GradSink>,
    param: usize,
}

impl CustomOp2 for SinkLinear {
    fn name(&self) -> &'static str {
        "fused-linear-sink"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Mm::Linear.cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dw = linear_backward_weight(&dy, x)?;
        self.sink.add(self.param, &dw)?;
        drop(dw);
        Ok((Some(linear_backward_input(&dy, w)?), None))
    }
}

/// The three products a linear layer needs, on row-major operands `a`, `b`.
#[derive(Clone, Copy)]
enum Mm {
    /// `a bᵀ`: forward, `a` `[m, k]`, `b` `[n, k]`.
    Linear,
    /// `a b`: input gradient, `a` `[m, k]`, `b` `[k, n]`.
    Plain,
    /// `aᵀ b`: weight gradient, `a` `[k, m]`, `b` `[k, n]`.
    TransA,
}

impl Mm {
    /// (m, n, k) from the operand dims, or an error.
    fn dims(self, a: &[usize], b: &[usize]) -> Result<(usize, usize, usize)> {
        let (&[a0, a1], &[b0, b1]) = (a, b) else {
            bail!("linear: expected matrices, got {a:?} and {b:?}");
        };
        let (m, k, kb, n) = match self {
            Mm::Linear => (a0, a1, b1, b0),
            Mm::Plain => (a0, a1, b0, b1),
            Mm::TransA => (a1, a0, b0, b1),
        };
        if k != kb {
            bail!("linear: inner dimensions differ, {a:?} and {b:?}");
        }
        Ok((m, n, k))
    }

    fn run<T: Real>(self, a: &[T], b: &[T], m: usize, n: usize, k: usize) -> Vec<T> {
        if k == 0 {
            return vec![T::ZERO; m * n];
        }
        // (cs, rs) strides of the logical operands
        let (a_cs, a_rs) = match self {
            Mm::TransA => (m, 1),
            _ => (1, k),
        };
        let (b_cs, b_rs) = match self {
            Mm::Linear => (k, 1),
            _ => (1, n),
        };
        let mut c: Vec<T> = Vec::with_capacity(m * n);
        let c_ptr = SendPtr(c.as_mut_ptr());
        // One single-threaded gemm per thread on its own block of the output, run in
        // parallel. gemm's own threading packs an operand on the calling thread before it fans
        // out (for every window of ≤ ~1000 tokens), which left one core idle for ~10% of a
        // forward pass. gemm computes a row-major product as its transpose, so `b` is the
        // operand it packs (for the forward: the weight, gathered element by element): blocks
        // of columns let each thread pack only its part of it; rows when columns are few.
        // The weight gradient (`aᵀ b`, `a` read transposed) always by rows: measured 1.2–1.4×
        // faster than by columns for every [out, in] of SmolLM2 but [576, 1536] (equal).
        let threads = rayon::current_num_threads().max(1);
        let by_rows = match self {
            Mm::TransA => m >= n || m >= 64 * threads,
            _ => n < 64 * threads && m > n,
        };
        let (len, unit) = (if by_rows { m } else { n }, 16);
        let per = len.div_ceil(threads).next_multiple_of(unit).max(unit);
        let blocks: Vec<(usize, usize)> = (0..len)
            .step_by(per)
            .map(|s| (s, per.min(len - s)))
            .collect();
        blocks.par_iter().for_each(|&(s, size)| {
            let c = c_ptr;
            let (mm, nn, a_off, b_off, c_off) = if by_rows {
                (size, n, s as isize * a_rs as isize, 0, s * n)
            } else {
                (m, size, 0, s as isize * b_cs as isize, s)
            };
            // SAFETY: a, b hold m×k and k×n elements at the given strides (checked by
            // `dims`); this block reads rows [s, s+size) of a (or columns of b) and writes
            // only its own rows (columns) of c, which has room for m×n; with read_dst = false
            // gemm writes every element of the block.
            unsafe {
                gemm::gemm(
                    mm,
                    nn,
                    k,
                    c.0.add(c_off),
                    1,
                    n as isize,
                    false,
                    a.as_ptr().offset(a_off),
                    a_cs as isize,
                    a_rs as isize,
                    b.as_ptr().offset(b_off),
                    b_cs as isize,
                    b_rs as isize,
                    T::ZERO,
                    T::ONE,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
        // SAFETY: the blocks cover all m×n elements and each was written by its gemm.
        unsafe { c.set_len(m * n) };
        c
    }
}

/// A raw pointer that may cross threads (each block writes a disjoint part of the output).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl CustomOp2 for Mm {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = self.dims(l1.dims(), l2.dims())?;
        fn go<T: Same>(
            mm: Mm,
            a: &[T],
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            mnk: (usize, usize, usize),
        ) -> Result<Vec<T>> {
            let a = slice(a, l1, "linear")?;
            let b = slice(T::same(s2, "linear")?, l2, "linear")?;
            Ok(mm.run(a, b, mnk.0, mnk.1, mnk.2))
        }
        let out = super::dispatch!(s1, "linear", |v| go(*self, v, l1, s2, l2, (m, n, k))?);
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Mm::Linear = self else {
            bail!("linear: backward only for the forward product");
        };
        // only what the graph needs: no weight gradient for a detached weight
        let dy = dy.contiguous()?;
        let dx = match x.track_op() {
            true => Some(linear_backward_input(&dy, w)?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(linear_backward_weight(&dy, x)?),
            false => None,
        };
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, randn};

    #[test]
    fn linear_matches_matmul_and_finite_differences() {
        let x = randn(&[5, 7], 9);
        let w = randn(&[3, 7], 10);
        check(
            &[x, w],
            &|a| super::linear(&a[0], &a[1]),
            &|a| a[0].matmul(&a[1].t()?),
            1e-12,
        );
    }

    /// Shapes that split the output into several row blocks (with a partial last block) and
    /// into column blocks (few rows, many columns), forward and both gradients.
    #[test]
    fn linear_blocks_cover_every_element() {
        for (m, n, k) in [(150, 40, 33), (3, 200, 17), (129, 129, 5)] {
            let x = randn(&[m, k], 21);
            let w = randn(&[n, k], 22);
            check(
                &[x, w],
                &|a| super::linear(&a[0], &a[1]),
                &|a| a[0].matmul(&a[1].t()?),
                1e-11,
            );
        }
    }
}
