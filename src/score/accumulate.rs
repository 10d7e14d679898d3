//! Gradient accumulation without an optimizer step: Σ_w ∇θ mean-NLL(window w), in f64.
//!
//! Each batch of `b` equal-length windows runs one forward/backward of the mean NLL (the
//! mean over the batch of the per-window means; [`Model::mean_nll_grads`], the hand-written
//! backward, on CPU; candle's autograd elsewhere); its gradient times `b` is the sum of the
//! windows' gradients, added into an f64 running sum in window order as the backward
//! produces each parameter's part. The model
//! computes in its own dtype (f32 for loaded checkpoints), so results depend on the batch
//! size only through that dtype's rounding inside one batch; the running sum itself is
//! exact enough (f64) not to depend on how many windows it holds or where a run resumed.

use crate::model::{GradSink, Model};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// The running sum of per-window gradients: one f64 vector per scored parameter (model
/// order), `None` for parameters not scored (their gradients are never computed).
pub struct GradSum {
    pub sums: Vec<Option<Vec<f64>>>,
    /// Windows added so far.
    pub windows: usize,
    /// Tokens in those windows.
    pub tokens: usize,
}

impl GradSum {
    /// An empty sum for every parameter of `model`.
    pub fn zeros(model: &Model) -> GradSum {
        GradSum::zeros_for(model, &vec![true; model.params.len()])
    }

    /// An empty sum for the parameters `scored` marks (model order).
    pub fn zeros_for(model: &Model, scored: &[bool]) -> GradSum {
        let sums = model
            .params
            .iter()
            .zip(scored)
            .map(|(p, &s)| s.then(|| zeroed(p.elem_count())))
            .collect();
        GradSum {
            sums,
            windows: 0,
            tokens: 0,
        }
    }

    /// Adds the gradients of windows `wins` of `ids` (all of one length), computed as one batch.
    pub fn add_batch(&mut self, model: &Model, ids: &[u32], wins: &[Range<usize>]) -> Result<()> {
        let Some(first) = wins.first() else {
            return Ok(());
        };
        let t = first.len();
        if wins.iter().any(|w| w.len() != t) {
            bail!("windows of one batch must have equal lengths");
        }
        let flat: Vec<u32> = wins
            .iter()
            .flat_map(|w| ids[w.clone()].iter().copied())
            .collect();
        let batch = Tensor::from_vec(flat, (wins.len(), t), &Device::Cpu)?;
        let scale = wins.len() as f64;
        let sink = Arc::new(SumSink::new(std::mem::take(&mut self.sums), scale));
        if model.has_manual_backward() {
            // every gradient straight into the sums, no autograd graph
            let res = model.mean_nll_grads(&batch, &*sink);
            self.sums = std::mem::take(&mut *sink.sums.lock().unwrap_or_else(|e| e.into_inner()));
            let loss = res?;
            if !loss.is_finite() {
                return Err(self.non_finite(model, ids, wins, loss));
            }
            self.windows += wins.len();
            self.tokens += wins.len() * t;
            return Ok(());
        }
        // autograd: the linear layers' weight gradients are added into the sums as the
        // backward produces them; the rest (embeddings, norms, biases) from candle's
        // gradient store
        let grads = model.with_grad_sink(sink.clone(), || -> Result<_> {
            let loss = model.mean_nll(&batch)?;
            let v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            Ok(match v.is_finite() {
                true => Ok(loss.backward()?),
                false => Err(v),
            })
        });
        self.sums = std::mem::take(&mut *sink.sums.lock().unwrap_or_else(|e| e.into_inner()));
        let grads = match grads? {
            Ok(g) => g,
            Err(loss) => return Err(self.non_finite(model, ids, wins, loss)),
        };
        for (sum, p) in self.sums.iter_mut().zip(&model.params) {
            if let Some(sum) = sum {
                if let Some(g) = grads.get(p.var()?.as_tensor()) {
                    add_scaled(sum, g, scale)?;
                }
            }
        }
        self.windows += wins.len();
        self.tokens += wins.len() * t;
        Ok(())
    }
}

impl GradSum {
    /// The error for a batch whose mean NLL `loss` is non-finite: the first window and token
    /// with a non-finite NLL and where the forward first went non-finite.
    fn non_finite(
        &self,
        model: &Model,
        ids: &[u32],
        wins: &[Range<usize>],
        loss: f64,
    ) -> anyhow::Error {
        for (j, w) in wins.iter().enumerate() {
            let nll = Model::ids_tensor(&ids[w.clone()])
                .and_then(|t| model.token_nll(&t, false))
                .and_then(|n| Ok(n.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?));
            match nll {
                Ok(nll) => {
                    if let Err(e) =
                        model.check_nll(ids, &nll, self.windows + j, w.start, w.start + 1)
                    {
                        return e;
                    }
                }
                Err(e) => return e,
            }
        }
        anyhow::anyhow!(
            "non-finite mean NLL ({loss}) over windows {}..{} (tokens {}..{})",
            self.windows,
            self.windows + wins.len(),
            wins[0].start,
            wins[wins.len() - 1].end
        )
    }
}

/// `n` zeros, written in parallel (not lazily mapped) and on transparent huge pages where the
/// kernel allows. The sums are read and written every window; zero pages mapped on demand
/// would cost two page faults per 4 KiB in the first window (a read fault, then a
/// copy-on-write fault with a TLB shootdown): ~0.5 M faults, ≈1.5 s for SmolLM2.
fn zeroed(n: usize) -> Vec<f64> {
    use rayon::prelude::*;
    let mut v: Vec<f64> = Vec::with_capacity(n);
    advise_huge_pages(v.as_mut_ptr().cast(), n * std::mem::size_of::<f64>());
    v.spare_capacity_mut()
        .par_chunks_mut(1 << 16)
        .for_each(|c| c.iter_mut().for_each(|x| _ = x.write(0.0)));
    // SAFETY: every one of the n elements was written above.
    unsafe { v.set_len(n) };
    v
}

/// Asks the kernel for transparent huge pages on the 2 MiB-aligned interior of a fresh
/// allocation (a hint: ignored where THP is off or the range is small).
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        const MADV_HUGEPAGE: i32 = 14;
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: [start, end) lies inside an allocation this process owns; MADV_HUGEPAGE
            // only changes how its pages are backed, never their contents.
            unsafe { madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// Adds weight gradients into the running sums during a backward pass.
struct SumSink {
    sums: Mutex<Vec<Option<Vec<f64>>>>,
    scale: f64,
    /// Which parameters have a sum (fixed for the sink's life).
    wanted: Vec<bool>,
}

impl SumSink {
    fn new(sums: Vec<Option<Vec<f64>>>, scale: f64) -> SumSink {
        let wanted = sums.iter().map(Option::is_some).collect();
        SumSink {
            sums: Mutex::new(sums),
            scale,
            wanted,
        }
    }
}

/// The sum of parameter `param`, or an error when it has none.
fn sum_of(sums: &mut [Option<Vec<f64>>], param: usize) -> candle_core::Result<&mut Vec<f64>> {
    sums.get_mut(param)
        .and_then(Option::as_mut)
        .ok_or_else(|| candle_core::Error::Msg(format!("no sum for parameter {param}")))
}

impl GradSink for SumSink {
    fn wants(&self, param: usize) -> bool {
        self.wanted.get(param).copied().unwrap_or(false)
    }

    fn add(&self, param: usize, g: &Tensor) -> candle_core::Result<()> {
        if !self.wants(param) {
            return Ok(());
        }
        let mut sums = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        let sum = sum_of(&mut sums, param)?;
        add_scaled(sum, g, self.scale).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }

    fn add_rows(&self, param: usize, rows: &[u32], g: &Tensor) -> candle_core::Result<()> {
        if !self.wants(param) {
            return Ok(());
        }
        let mut sums = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        let sum = sum_of(&mut sums, param)?;
        let (n, cols) = g.dims2()?;
        if n != rows.len() || cols == 0 || sum.len() % cols != 0 {
            candle_core::bail!("embedding gradient {:?} for {} rows", g.dims(), rows.len());
        }
        let g = g.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        for (&r, gr) in rows.iter().zip(&g) {
            let dst = sum
                .get_mut(r as usize * cols..(r as usize + 1) * cols)
                .ok_or_else(|| candle_core::Error::Msg(format!("row {r} out of range")))?;
            dst.iter_mut()
                .zip(gr)
                .for_each(|(s, v)| *s += self.scale * v);
        }
        Ok(())
    }
}

/// `sum += scale · g`, elementwise in f64, reading `g` in place (no copy) when it is a
/// contiguous f32/f64 CPU tensor.
fn add_scaled(sum: &mut [f64], g: &Tensor, scale: f64) -> Result<()> {
    use candle_core::Storage;
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let g = g.contiguous()?;
    let (storage, layout) = g.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .context("gradient is not contiguous")?;
    let Storage::Cpu(cpu) = &*storage else {
        bail!("gradients must be on the CPU")
    };
    if end - start != sum.len() {
        bail!(
            "gradient has {} values, the parameter {}",
            end - start,
            sum.len()
        );
    }
    match g.dtype() {
        DType::F64 => {
            let v = &cpu.as_slice::<f64>()?[start..end];
            sum.par_chunks_mut(CHUNK)
                .zip(v.par_chunks(CHUNK))
                .for_each(|(s, v)| {
                    s.iter_mut().zip(v).for_each(|(s, v)| *s += scale * v);
                });
        }
        DType::F32 => {
            let v = &cpu.as_slice::<f32>()?[start..end];
            sum.par_chunks_mut(CHUNK)
                .zip(v.par_chunks(CHUNK))
                .for_each(|(s, v)| {
                    s.iter_mut()
                        .zip(v)
                        .for_each(|(s, v)| *s += scale * *v as f64);
                });
        }
        _ => {
            drop(storage);
            let v = g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            sum.iter_mut().zip(v).for_each(|(s, v)| *s += scale * v);
        }
    }
    Ok(())
}

/// θ ⊙ s for parameter `i`, in f64: one parallel pass over θ (a dense parameter read in
/// place, a mapped one decoded once).
/// A non-finite product (an overflowed gradient sum) is an error naming the tensor.
pub fn times_param(model: &Model, i: usize, s: &[f64]) -> Result<Vec<f64>> {
    use rayon::prelude::*;
    let p = &model.params[i];
    if p.elem_count() != s.len() {
        bail!("{}: {} sums for {} values", p.name, s.len(), p.elem_count());
    }
    let t = model.values(i)?;
    let v = product(&t, s, &p.name)?;
    // a branch-free scan per chunk; the position only once one is found
    let bad = |c: &[f64]| c.iter().fold(false, |acc, x| acc | !x.is_finite());
    if v.par_chunks(1 << 16).any(bad) {
        let k = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
        bail!(
            "{}: non-finite score (θ·Σg = {}) at flat index {k}: the gradient sum overflowed",
            p.name,
            v[k]
        );
    }
    Ok(v)
}

/// θ ⊙ s elementwise in f64.
fn product(t: &Tensor, s: &[f64], name: &str) -> Result<Vec<f64>> {
    use candle_core::Storage;
    use rayon::prelude::*;
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        bail!("{name}: values are not a contiguous CPU tensor");
    };
    Ok(match t.dtype() {
        DType::F32 => cpu.as_slice::<f32>()?[a..b]
            .par_iter()
            .zip(s)
            .map(|(&t, g)| t as f64 * g)
            .collect(),
        DType::F64 => cpu.as_slice::<f64>()?[a..b]
            .par_iter()
            .zip(s)
            .map(|(t, g)| t * g)
            .collect(),
        _ => {
            drop(storage);
            let theta: Vec<f64> = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            theta.iter().zip(s).map(|(t, g)| t * g).collect()
        }
    })
}

/// The score from θ ⊙ Σg over `windows` windows: |θ ⊙ Σg| / W (in place).
pub fn score_from_product(mut product: Vec<f64>, windows: usize) -> Vec<f64> {
    use rayon::prelude::*;
    let w = windows as f64;
    product.par_iter_mut().for_each(|p| *p = (*p / w).abs());
    product
}

/// Importance of every parameter over `ids` in memory (no files): windows of `seq_len`
/// (see [`super::windows::windows`]), batches of `batch`; returns (name, |θ ⊙ g|) in f64
/// with g = (1/W) Σ_w ∇ mean-NLL(window w).
pub fn importance(
    model: &Model,
    ids: &[u32],
    seq_len: usize,
    batch: usize,
) -> Result<Vec<(String, Vec<f64>)>> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let wins = super::windows::windows(ids.len(), seq_len)?;
    let mut acc = GradSum::zeros(model);
    for chunk in wins.chunks(batch) {
        acc.add_batch(model, ids, chunk)?;
    }
    model
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sum = acc.sums[i]
                .as_deref()
                .context("every parameter is scored")?;
            Ok((
                p.name.clone(),
                score_from_product(times_param(model, i, sum)?, acc.windows),
            ))
        })
        .collect()
}
