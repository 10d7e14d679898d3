//! Token negative log-likelihood over the vocabulary (log-softmax + gather in one pass).

use super::{dispatch, rows_per_task, slice, Real, Same};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `-log softmax(logits)[target]` per row: `logits` `[n, vocab]`, `targets` `[n]` (u32).
/// Fused; see [`crate::model::ops::token_nll`].
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !super::use_fused(logits) {
        return crate::model::ops::token_nll(logits, targets);
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TokenNll)
}

struct TokenNll;

/// (max, log Σ exp(x - max)) of a row.
fn lse<T: Real>(row: &[T]) -> (T, T) {
    let m = super::max_of(row);
    // exp in blocks (vectorised), summed in f64
    let mut buf = [T::ZERO; 256];
    let mut s = 0f64;
    for c in row.chunks(256) {
        for (o, &v) in buf.iter_mut().zip(c) {
            *o = (v - m).fast_exp();
        }
        s += super::sum_f64(&buf[..c.len()]);
    }
    (m, T::from_f64(s.ln()))
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, n: usize, vocab: usize) -> Result<&'a [u32]> {
    let t = match s {
        CpuStorage::U32(v) => slice(v, l, "token_nll")?,
        s => bail!(
            "token_nll: targets must be u32, got {:?}",
            candle_core::backend::BackendStorage::dtype(s)
        ),
    };
    if t.len() != n {
        bail!("token_nll: {} targets for {n} rows", t.len());
    }
    if let Some(&bad) = t.iter().find(|&&x| x as usize >= vocab) {
        bail!("token_nll: target {bad} outside the vocabulary of {vocab}");
    }
    Ok(t)
}

fn dims(l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        &[n, v] => Ok((n, v)),
        d => bail!("token_nll: logits must be [n, vocab], got {d:?}"),
    }
}

impl CustomOp2 for TokenNll {
    fn name(&self) -> &'static str {
        "fused-token-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, vocab) = dims(l1)?;
        let t = targets_of(s2, l2, n, vocab)?;
        fn go<T: Real>(x: &[T], t: &[u32], vocab: usize) -> Vec<T> {
            x.par_chunks(vocab)
                .zip(t.par_iter())
                .map(|(row, &k)| {
                    let (m, l) = lse(row);
                    l - (row[k as usize] - m)
                })
                .collect()
        }
        let out = dispatch!(s1, "token_nll", |v| go(
            slice(v, l1, "token_nll")?,
            t,
            vocab
        ));
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        d: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(token_nll_backward(logits, targets, res, d)?), None))
    }
}

/// Gradient of [`token_nll`]'s logits for the per-row gradient `d`, given the forward's
/// result `nll` (no autograd graph).
pub fn token_nll_backward(
    logits: &Tensor,
    targets: &Tensor,
    nll: &Tensor,
    d: &Tensor,
) -> Result<Tensor> {
    // (upstream gradient, forward NLL) per row: the NLL gives back each row's log-sum-exp
    // (nll + x[target]) without a second pass over the logits
    let d_nll = Tensor::stack(&[d, nll], 1)?;
    logits
        .contiguous()?
        .apply_op3_no_bwd(&targets.contiguous()?, &d_nll, &TokenNllBwd)
}

struct TokenNllBwd;

impl CustomOp3 for TokenNllBwd {
    fn name(&self) -> &'static str {
        "fused-token-nll-bwd"
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
        let (n, vocab) = dims(l1)?;
        let t = targets_of(s2, l2, n, vocab)?;
        fn go<T: Same>(
            x: &[T],
            l1: &Layout,
            t: &[u32],
            s3: &CpuStorage,
            l3: &Layout,
            vocab: usize,
        ) -> Result<Vec<T>> {
            let x = slice(x, l1, "token_nll bwd")?;
            let dn = slice(T::same(s3, "token_nll bwd")?, l3, "token_nll bwd")?;
            if dn.len() != 2 * t.len() {
                bail!(
                    "token_nll bwd: expected (gradient, nll) pairs for {} rows",
                    t.len()
                );
            }
            // every element is written below: no zero fill of the [n, vocab] gradient
            let mut g: Vec<T> = Vec::with_capacity(x.len());
            let per = rows_per_task(t.len(), vocab, 1);
            g.spare_capacity_mut()[..x.len()]
                .par_chunks_mut(per * vocab)
                .zip(x.par_chunks(per * vocab))
                .enumerate()
                .for_each(|(ci, (gc, xc))| {
                    for (k, (gr, xr)) in gc.chunks_mut(vocab).zip(xc.chunks(vocab)).enumerate() {
                        let i = ci * per + k;
                        let (d, target) = (dn[2 * i], t[i] as usize);
                        let shift = dn[2 * i + 1] + xr[target];
                        for (o, &v) in gr.iter_mut().zip(xr) {
                            o.write(d * (v - shift).fast_exp());
                        }
                        gr[target].write(d * (xr[target] - shift).fast_exp() - d);
                    }
                });
            // SAFETY: the loop above wrote all x.len() elements (rows of `vocab` cover x).
            unsafe { g.set_len(x.len()) };
            Ok(g)
        }
        let out = dispatch!(s1, "token_nll bwd", |v| go(v, l1, t, s3, l3, vocab)?);
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, randn};
    use crate::model::ops;
    use candle_core::{Device, Tensor};

    #[test]
    fn token_nll_matches_composed_and_finite_differences() {
        let logits = (randn(&[4, 9], 7) * 4.0).unwrap();
        let t = Tensor::new(&[0u32, 8, 3, 3], &Device::Cpu).unwrap();
        check(
            &[logits],
            &|a| super::token_nll(&a[0], &t),
            &|a| ops::token_nll(&a[0], &t),
            1e-12,
        );
    }

    #[test]
    fn token_nll_rejects_out_of_range_targets() {
        let logits = randn(&[2, 3], 8);
        let t = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
        let e = super::token_nll(&logits, &t).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
    }
}
