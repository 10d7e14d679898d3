//! A fused, masked AdamW: one parallel pass per tensor updates the weights and both moments
//! together, in place, and never touches a frozen element (no weight decay, no moment
//! update; it stays bitwise identical). Generic over f32 and f64.
//!
//! Update for step `t` (1-based), gradient `g` (after clipping), as PyTorch's `AdamW`:
//! `w ← w·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `w ← w − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε)`.
//!
//! Gradient clipping by global norm (PyTorch's `clip_grad_norm_`: scale `clip / (norm + 1e-6)`
//! when the norm exceeds `clip`) takes the norm over the **unfrozen** entries only: frozen
//! entries' gradients never reach the weights, so letting them shrink the step of the
//! trainable ones would make the update depend on the size of the frozen region.
//!
//! Weight decay skips biases and normalization weights (names ending in `.bias` or
//! containing `norm`), as transformers' `Trainer` does.

use crate::model::Param;
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Elements per parallel chunk (and per partial sum of the gradient norm).
const CHUNK: usize = 1 << 14;

/// A float type the optimizer runs in (f32 or f64).
pub trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + 'static
{
    const DTYPE: DType;
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    fn tensor(v: Vec<Self>, shape: &[usize]) -> Result<Tensor>;
    fn vec(t: &Tensor) -> Result<Vec<Self>>;
}

macro_rules! impl_float {
    ($t:ty, $dt:expr, $variant:ident) => {
        impl Float for $t {
            const DTYPE: DType = $dt;
            fn of(x: f64) -> Self {
                x as $t
            }
            fn f64(self) -> f64 {
                self as f64
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn tensor(v: Vec<Self>, shape: &[usize]) -> Result<Tensor> {
                Ok(Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?)
            }
            fn vec(t: &Tensor) -> Result<Vec<Self>> {
                Ok(t.to_dtype($dt)?.flatten_all()?.to_vec1::<$t>()?)
            }
        }
    };
}
impl_float!(f32, DType::F32, F32);
impl_float!(f64, DType::F64, F64);

/// Hyper-parameters of AdamW (the learning rate is given per step).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Maximum global gradient norm (over unfrozen entries); `None` disables clipping.
    pub clip: Option<f64>,
}

impl Default for AdamWConfig {
    /// The official settings: betas (0.9, 0.95), eps 1e-8, weight decay 0.001, clip 1.0.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.001,
            clip: Some(1.0),
        }
    }
}

/// Per-step constants of the update, in the working float type.
#[derive(Clone, Copy, Debug)]
pub struct Coeffs<T> {
    /// Multiplies the gradient first (clipping and gradient-accumulation scale).
    pub grad_scale: T,
    /// `1 − lr·wd` (1 when the tensor is not decayed).
    pub decay: T,
    pub beta1: T,
    pub one_minus_beta1: T,
    pub beta2: T,
    pub one_minus_beta2: T,
    /// `lr / (1 − β1^t)`.
    pub step_size: T,
    /// `√(1 − β2^t)`.
    pub bc2_sqrt: T,
    pub eps: T,
}

impl<T: Float> Coeffs<T> {
    /// The constants of step `t` (1-based) at learning rate `lr`.
    pub fn new(cfg: &AdamWConfig, t: u64, lr: f64, grad_scale: f64, decayed: bool) -> Self {
        let bc1 = 1.0 - cfg.beta1.powi(t as i32);
        let bc2 = 1.0 - cfg.beta2.powi(t as i32);
        Coeffs {
            grad_scale: T::of(grad_scale),
            decay: T::of(if decayed {
                1.0 - lr * cfg.weight_decay
            } else {
                1.0
            }),
            beta1: T::of(cfg.beta1),
            one_minus_beta1: T::of(1.0 - cfg.beta1),
            beta2: T::of(cfg.beta2),
            one_minus_beta2: T::of(1.0 - cfg.beta2),
            step_size: T::of(lr / bc1),
            bc2_sqrt: T::of(bc2.sqrt()),
            eps: T::of(cfg.eps),
        }
    }
}

/// The fused update over raw slices: `w`, `m`, `v` in place from gradient `g`; elements
/// with `frozen[i] != 0` are skipped entirely. All slices have the same length.
pub fn update_slices<T: Float>(
    w: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    frozen: Option<&[u8]>,
    c: &Coeffs<T>,
) {
    let n = w.len();
    assert!(g.len() == n && m.len() == n && v.len() == n && frozen.is_none_or(|f| f.len() == n));
    w.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(ci, (((w, m), v), g))| match frozen {
            None => {
                for i in 0..w.len() {
                    (w[i], m[i], v[i]) = adamw_elem(w[i], g[i], m[i], v[i], c);
                }
            }
            Some(f) => {
                let f = &f[ci * CHUNK..ci * CHUNK + w.len()];
                // branch-free: compute every element, keep the old values where frozen
                for i in 0..w.len() {
                    let (wn, mn, vn) = adamw_elem(w[i], g[i], m[i], v[i], c);
                    let keep = f[i] != 0;
                    w[i] = if keep { w[i] } else { wn };
                    m[i] = if keep { m[i] } else { mn };
                    v[i] = if keep { v[i] } else { vn };
                }
            }
        });
}

/// The AdamW update of one element: new (w, m, v).
#[inline(always)]
fn adamw_elem<T: Float>(w: T, g: T, m: T, v: T, c: &Coeffs<T>) -> (T, T, T) {
    let g = g * c.grad_scale;
    let m = c.beta1 * m + c.one_minus_beta1 * g;
    let v = c.beta2 * v + c.one_minus_beta2 * g * g;
    let denom = v.sqrt() / c.bc2_sqrt + c.eps;
    (w * c.decay - c.step_size * m / denom, m, v)
}

/// Σ g² over the unfrozen entries, in f64, summed in a fixed order (deterministic).
pub fn sum_squares<T: Float>(g: &[T], frozen: Option<&[u8]>) -> f64 {
    const LANES: usize = 8;
    let parts: Vec<f64> = g
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(ci, g)| {
            let mut acc = [0f64; LANES];
            match frozen {
                None => {
                    for (k, x) in g.iter().enumerate() {
                        let x = x.f64();
                        acc[k % LANES] += x * x;
                    }
                }
                Some(f) => {
                    let f = &f[ci * CHUNK..ci * CHUNK + g.len()];
                    for (k, (x, &f)) in g.iter().zip(f).enumerate() {
                        let x = if f == 0 { x.f64() } else { 0.0 };
                        acc[k % LANES] += x * x;
                    }
                }
            }
            acc.iter().sum::<f64>()
        })
        .collect();
    parts.iter().sum()
}

/// Whether a parameter gets weight decay (not biases, not normalization weights).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

/// The two moments of one parameter.
#[derive(Clone, Debug)]
pub enum Moments {
    F32 { m: Vec<f32>, v: Vec<f32> },
    F64 { m: Vec<f64>, v: Vec<f64> },
}

/// Optimizer state of one parameter.
#[derive(Clone, Debug)]
pub struct ParamState {
    pub name: String,
    pub shape: Vec<usize>,
    /// Per-element freeze flags (1 = frozen); `None` = nothing frozen.
    pub frozen: Option<Vec<u8>>,
    /// `None` when every element is frozen (no moments are kept).
    pub moments: Option<Moments>,
    pub decayed: bool,
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StepStats {
    /// Global norm of the (accumulation-scaled) gradient over unfrozen entries, before clipping.
    pub grad_norm: f64,
    /// Factor applied by clipping (1 when not clipped).
    pub clip_scale: f64,
}

/// AdamW over a model's parameters with per-element freeze masks.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken so far.
    pub step: u64,
    pub states: Vec<ParamState>,
}

impl AdamW {
    /// State for `params`; `frozen(name)` gives a parameter's 0/1 flags (1 = frozen), if any.
    pub fn new(
        config: AdamWConfig,
        params: &[Param],
        mut frozen: impl FnMut(&str) -> Option<Vec<u8>>,
    ) -> Result<AdamW> {
        let mut states = Vec::with_capacity(params.len());
        for p in params {
            let n = p.elem_count();
            let fr = frozen(&p.name);
            if let Some(f) = &fr {
                if f.len() != n {
                    bail!(
                        "freeze mask for {} has {} entries, the parameter {n}",
                        p.name,
                        f.len()
                    );
                }
            }
            let all_frozen = fr.as_ref().is_some_and(|f| f.iter().all(|&x| x != 0));
            let moments = if all_frozen {
                None
            } else {
                Some(match p.var()?.dtype() {
                    DType::F32 => Moments::F32 {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    },
                    DType::F64 => Moments::F64 {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    },
                    d => bail!("AdamW needs f32 or f64 parameters, {} is {d:?}", p.name),
                })
            };
            let frozen = fr.filter(|f| f.iter().any(|&x| x != 0));
            states.push(ParamState {
                name: p.name.clone(),
                shape: p.shape.clone(),
                frozen,
                moments,
                decayed: decays(&p.name),
            });
        }
        Ok(AdamW {
            config,
            step: 0,
            states,
        })
    }

    /// Number of frozen elements and of all elements.
    pub fn frozen_count(&self) -> (u64, u64) {
        let mut fz = 0u64;
        let mut all = 0u64;
        for s in &self.states {
            let n: usize = s.shape.iter().product();
            all += n as u64;
            fz += match (&s.moments, &s.frozen) {
                (None, _) => n as u64,
                (Some(_), Some(f)) => f.iter().filter(|&&x| x != 0).count() as u64,
                _ => 0,
            };
        }
        (fz, all)
    }

    /// One step at learning rate `lr`. `grads[i]` is parameter `i`'s gradient (`None`: the
    /// parameter is left alone, as PyTorch skips parameters without a gradient);
    /// `grad_scale` multiplies every gradient first (e.g. `1/A` for A accumulated
    /// micro-batches). Gradients are taken by value so that a non-contiguous one can be
    /// replaced by its contiguous copy without keeping both.
    pub fn step(
        &mut self,
        params: &[Param],
        mut grads: Vec<Option<Tensor>>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<StepStats> {
        if params.len() != self.states.len() || grads.len() != params.len() {
            bail!(
                "AdamW: {} parameters, {} states, {} gradients",
                params.len(),
                self.states.len(),
                grads.len()
            );
        }
        for (g, s) in grads.iter_mut().zip(&self.states) {
            if s.moments.is_none() {
                *g = None;
            } else if let Some(t) = g.take() {
                *g = Some(if t.is_contiguous() {
                    t
                } else {
                    t.contiguous()?
                });
            }
        }
        let mut sq = 0f64;
        for (g, s) in grads.iter().zip(&self.states) {
            if let Some(g) = g {
                sq += with_slice(g, |gs: GradSlice| match gs {
                    GradSlice::F32(x) => sum_squares(x, s.frozen.as_deref()),
                    GradSlice::F64(x) => sum_squares(x, s.frozen.as_deref()),
                })?;
            }
        }
        let grad_norm = sq.sqrt() * grad_scale.abs();
        let clip_scale = match self.config.clip {
            Some(c) if grad_norm > c => c / (grad_norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step;
        let cfg = self.config;
        for ((p, g), s) in params.iter().zip(&grads).zip(self.states.iter_mut()) {
            let (Some(g), Some(mom)) = (g, s.moments.as_mut()) else {
                continue;
            };
            if g.dims() != p.shape.as_slice() {
                bail!(
                    "gradient of {} has shape {:?}, the parameter {:?}",
                    p.name,
                    g.dims(),
                    p.shape
                );
            }
            let scale = grad_scale * clip_scale;
            let frozen = s.frozen.as_deref();
            match mom {
                Moments::F32 { m, v } => apply::<f32>(
                    p,
                    g,
                    m,
                    v,
                    frozen,
                    Coeffs::new(&cfg, t, lr, scale, s.decayed),
                )?,
                Moments::F64 { m, v } => apply::<f64>(
                    p,
                    g,
                    m,
                    v,
                    frozen,
                    Coeffs::new(&cfg, t, lr, scale, s.decayed),
                )?,
            }
        }
        Ok(StepStats {
            grad_norm,
            clip_scale,
        })
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`), for checkpoints.
    pub fn moment_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for s in &self.states {
            match &s.moments {
                Some(Moments::F32 { m, v }) => {
                    out.push((format!("m.{}", s.name), f32::tensor(m.clone(), &s.shape)?));
                    out.push((format!("v.{}", s.name), f32::tensor(v.clone(), &s.shape)?));
                }
                Some(Moments::F64 { m, v }) => {
                    out.push((format!("m.{}", s.name), f64::tensor(m.clone(), &s.shape)?));
                    out.push((format!("v.{}", s.name), f64::tensor(v.clone(), &s.shape)?));
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// Restores the moments written by [`AdamW::moment_tensors`].
    pub fn load_moments(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for s in &mut self.states {
            let Some(mom) = s.moments.as_mut() else {
                continue;
            };
            let get = |k: &str| -> Result<&Tensor> {
                let key = format!("{k}.{}", s.name);
                let t = tensors
                    .get(&key)
                    .with_context(|| format!("optimizer state lacks {key}"))?;
                if t.dims() != s.shape.as_slice() {
                    bail!(
                        "optimizer state {key} has shape {:?}, expected {:?}",
                        t.dims(),
                        s.shape
                    );
                }
                Ok(t)
            };
            match mom {
                Moments::F32 { m, v } => {
                    *m = f32::vec(get("m")?)?;
                    *v = f32::vec(get("v")?)?;
                }
                Moments::F64 { m, v } => {
                    *m = f64::vec(get("m")?)?;
                    *v = f64::vec(get("v")?)?;
                }
            }
        }
        self.step = step;
        Ok(())
    }
}

/// A contiguous gradient's data.
enum GradSlice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// Runs `f` on the data of a contiguous CPU tensor (f32 or f64), without copying.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(GradSlice) -> R) -> Result<R> {
    let (st, layout) = t.storage_and_layout();
    let (a, b) = layout
        .contiguous_offsets()
        .context("gradient is not contiguous")?;
    match &*st {
        Storage::Cpu(CpuStorage::F32(x)) => Ok(f(GradSlice::F32(&x[a..b]))),
        Storage::Cpu(CpuStorage::F64(x)) => Ok(f(GradSlice::F64(&x[a..b]))),
        _ => bail!("AdamW runs on CPU f32/f64 tensors only"),
    }
}

/// The in-place update of one parameter's storage.
struct Update<'a, T> {
    g: &'a [T],
    m: RefCell<&'a mut [T]>,
    v: RefCell<&'a mut [T]>,
    frozen: Option<&'a [u8]>,
    c: Coeffs<T>,
}

impl<T: Float> candle_core::InplaceOp1 for Update<'_, T> {
    fn name(&self) -> &'static str {
        "masked-adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("AdamW: parameter is not contiguous".into()))?;
        let w = T::slice_mut(storage).ok_or_else(|| {
            candle_core::Error::Msg("AdamW: parameter dtype differs from its moments".into())
        })?;
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        update_slices(&mut w[a..b], self.g, &mut m, &mut v, self.frozen, &self.c);
        Ok(())
    }
}

fn apply<T: Float>(
    p: &Param,
    g: &Tensor,
    m: &mut [T],
    v: &mut [T],
    frozen: Option<&[u8]>,
    c: Coeffs<T>,
) -> Result<()> {
    if g.dtype() != T::DTYPE {
        bail!(
            "gradient of {} is {:?}, the optimizer state {:?}",
            p.name,
            g.dtype(),
            T::DTYPE
        );
    }
    let (st, layout) = g.storage_and_layout();
    let (a, b) = layout
        .contiguous_offsets()
        .context("gradient is not contiguous")?;
    let gs = match &*st {
        Storage::Cpu(cs) => T::slice(cs).context("gradient dtype")?,
        _ => bail!("AdamW runs on CPU tensors only"),
    };
    let op = Update {
        g: &gs[a..b],
        m: RefCell::new(m),
        v: RefCell::new(v),
        frozen,
        c,
    };
    p.var()?.as_tensor().inplace_op1(&op)?;
    Ok(())
}
