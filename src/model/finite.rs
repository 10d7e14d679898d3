//! Finding where a forward first goes non-finite: run only once a result was found
//! non-finite, so that the error can name the first place (the embeddings, a layer's output,
//! the logits) instead of a NaN.

use super::Model;
use anyhow::{bail, Result};
use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

/// Whether every value of `t` (on the CPU) is finite; f32 and f64 read in place.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        bail!("not a contiguous CPU tensor");
    };
    let ok = |c: &[f32]| c.iter().fold(true, |acc, x| acc & x.is_finite());
    let ok64 = |c: &[f64]| c.iter().fold(true, |acc, x| acc & x.is_finite());
    Ok(match t.dtype() {
        DType::F32 => cpu.as_slice::<f32>()?[a..b].par_chunks(1 << 16).all(ok),
        DType::F64 => cpu.as_slice::<f64>()?[a..b].par_chunks(1 << 16).all(ok64),
        _ => return all_finite(&t.to_dtype(DType::F32)?),
    })
}

impl Model {
    /// Runs the forward of one window `ids` step by step and names the first step whose
    /// output holds a non-finite value (or says that every step was finite), and the model.
    pub fn locate_non_finite(&self, ids: &[u32]) -> Result<String> {
        let step = self.first_non_finite_step(ids)?;
        Ok(match self.source.as_os_str().is_empty() {
            true => step,
            false => format!("{step} of {}", self.source.display()),
        })
    }

    fn first_non_finite_step(&self, ids: &[u32]) -> Result<String> {
        let ids_t = Self::ids_tensor(ids)?;
        let mut x = self.embed(&ids_t, false)?;
        if !all_finite(&x)? {
            return Ok("the token embeddings".into());
        }
        let ctx = self.attn_context(ids.len())?;
        for l in 0..self.config.num_layers {
            x = self.layer(l, &x, &ctx, false)?;
            if !all_finite(&x)? {
                return Ok(format!("the output of layer {l}"));
            }
        }
        if !all_finite(&self.head(&x, false)?)? {
            return Ok("the logits (final norm and output projection)".into());
        }
        Ok("the log-softmax (every logit is finite)".into())
    }

    /// Fails when a window's per-token NLL `nll` (entry j: token `start + j + 1`) holds a
    /// non-finite value at a token from `first_target` on, naming the token, the window and
    /// where the forward first went non-finite.
    pub fn check_nll(
        &self,
        ids: &[u32],
        nll: &[f64],
        window: usize,
        start: usize,
        first_target: usize,
    ) -> Result<()> {
        let bad = nll
            .iter()
            .enumerate()
            .find(|&(j, v)| start + j + 1 >= first_target && !v.is_finite());
        let Some((j, v)) = bad else {
            return Ok(());
        };
        let end = start + nll.len() + 1;
        bail!(
            "non-finite NLL ({v}) at token {} (window {window}: tokens {start}..{end}); it first appears in {}",
            start + j + 1,
            self.locate_non_finite(&ids[start..end])?
        )
    }
}
