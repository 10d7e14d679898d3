//! Fused CPU kernels with exact backward passes, as candle custom ops.
//!
//! Each op computes in one pass over rows (rayon-parallel) what [`super::ops`] builds from
//! several candle ops, and its backward is a second fused kernel. The composed versions in
//! `ops` stay the reference (unit tests compare both, forward and backward) and the path
//! used on non-CPU devices.

mod attention;
mod linear;
mod nll;
mod norm;
mod rope;
mod swiglu;

pub use attention::{causal_attention_backward, causal_attention_blocked};
pub use linear::{linear, linear_backward_input, linear_backward_weight, linear_into, GradSink};
pub use nll::{token_nll, token_nll_backward};
pub use norm::{rms_norm, rms_norm_backward};
pub use rope::{rope_transposed, rope_transposed_backward};
pub use swiglu::{swiglu, swiglu_backward};

use candle_core::{bail, CpuStorage, Layout, Result, Tensor};
use std::cell::Cell;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

thread_local! {
    static REFERENCE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the fused ops replaced by the composed reference ops of
/// [`super::ops`] on this thread (tests compare whole models both ways).
pub fn with_reference_ops<R>(f: impl FnOnce() -> R) -> R {
    let old = REFERENCE.with(|r| r.replace(true));
    let out = f();
    REFERENCE.with(|r| r.set(old));
    out
}

/// Whether the fused kernels are switched on for this thread (see [`with_reference_ops`]).
pub fn fused_enabled() -> bool {
    !REFERENCE.with(|r| r.get())
}

/// Whether the fused kernel applies to `t` (a CPU tensor, fused ops not switched off).
pub fn use_fused(t: &Tensor) -> bool {
    t.device().is_cpu() && !REFERENCE.with(|r| r.get())
}

/// The float types the kernels run on (f32, f64).
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    /// `exp`, branch-free so that loops over it vectorise (f32); `exp` itself for f64.
    fn fast_exp(self) -> Self {
        self.exp()
    }
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn max(self, o: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty, $fast:path) => {
        impl Real for $t {
            #[inline(always)]
            fn fast_exp(self) -> Self {
                $fast(self)
            }
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
        }
    };
}
impl_real!(f32, exp_f32);
impl_real!(f64, f64::exp);

/// Branch-free `exp` for f32 (Cephes polynomial, within ~2 ulp; inputs below -87.3 give
/// ~1e-38 instead of 0). Written so that loops over it auto-vectorise.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to integer
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from the bits of `n + ROUND` (its low mantissa bits hold n as an integer): no
    // float-to-int conversion, so the whole function vectorises.
    let n_bits = (n + ROUND).to_bits().wrapping_sub(ROUND.to_bits());
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// Largest element of `v` (−∞ for an empty slice; NaN is ignored unless all are NaN), in
/// 16 independent lanes so that the loop vectorises.
#[inline]
pub(crate) fn max_of<T: Real>(v: &[T]) -> T {
    let mut acc = [T::NEG_INF; 16];
    let mut it = v.chunks_exact(16);
    for c in &mut it {
        for k in 0..16 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let mut m = T::NEG_INF;
    for &x in acc.iter().chain(it.remainder()) {
        m = m.max(x);
    }
    m
}

/// Sum in f64 with four independent accumulators.
#[inline]
pub(crate) fn sum_f64<T: Real>(v: &[T]) -> f64 {
    let mut acc = [0f64; 4];
    let mut it = v.chunks_exact(4);
    for c in &mut it {
        for k in 0..4 {
            acc[k] += c[k].to_f64();
        }
    }
    let rest: f64 = it.remainder().iter().map(|x| x.to_f64()).sum();
    acc[0] + acc[1] + acc[2] + acc[3] + rest
}

/// The contiguous data of a storage/layout pair.
pub(crate) fn slice<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: input must be contiguous"),
    }
}

/// Rows of length `n` in a slice of length `len`, or an error.
pub(crate) fn rows_of(len: usize, n: usize, what: &str) -> Result<usize> {
    if n == 0 || !len.is_multiple_of(n) {
        bail!("{what}: {len} elements are not rows of {n}");
    }
    Ok(len / n)
}

/// Rows per parallel task so that each task gets at least ~`min_elems` elements.
pub(crate) fn rows_per_task(rows: usize, n: usize, min_elems: usize) -> usize {
    let tasks = (rayon::current_num_threads() * 4).max(1);
    rows.div_ceil(tasks)
        .max(min_elems.div_ceil(n.max(1)))
        .max(1)
}

/// Applies a generic kernel to f32 or f64 storage, wrapping the result back into storage.
macro_rules! dispatch {
    ($s:expr, $name:expr, |$v:ident| $body:expr) => {
        match $s {
            candle_core::CpuStorage::F32($v) => candle_core::CpuStorage::F32($body),
            candle_core::CpuStorage::F64($v) => candle_core::CpuStorage::F64($body),
            s => candle_core::bail!(
                "{}: unsupported dtype {:?}",
                $name,
                candle_core::backend::BackendStorage::dtype(s)
            ),
        }
    };
}
pub(crate) use dispatch;

/// The f32/f64 view of a second operand with the same dtype as the first.
pub(crate) trait Same: Real {
    fn same<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [Self]>;
}
impl Same for f32 {
    fn same<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            s => bail!(
                "{what}: dtype mismatch, expected f32, got {:?}",
                candle_core::backend::BackendStorage::dtype(s)
            ),
        }
    }
}
impl Same for f64 {
    fn same<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f64]> {
        match s {
            CpuStorage::F64(v) => Ok(v),
            s => bail!(
                "{what}: dtype mismatch, expected f64, got {:?}",
                candle_core::backend::BackendStorage::dtype(s)
            ),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Shared checks: fused vs composed (forward and backward) and finite differences.
    use candle_core::{Device, Result, Tensor, Var};

    pub fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Compares `fused` and `reference` on the f64 inputs `xs` (gradients of the weighted
    /// sum `Σ r·f(x)` for a fixed random `r`), and checks the fused gradient against central
    /// finite differences at a few coordinates of each input.
    pub fn check(
        xs: &[Tensor],
        fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        tol: f64,
    ) {
        let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let yf = fused(&ts).unwrap();
        let yr = reference(&ts).unwrap();
        assert_eq!(yf.dims(), yr.dims());
        let d = max_abs_diff(&yf, &yr);
        assert!(d < tol, "forward differs by {d}");
        let r = randn(yf.dims(), 99);
        let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let a = gf.get(v.as_tensor()).expect("fused grad");
            let b = gr.get(v.as_tensor()).expect("reference grad");
            let d = max_abs_diff(a, b);
            assert!(d < tol, "gradient of input {i} differs by {d}");
            // finite differences on a few coordinates
            let flat: Vec<f64> = xs[i].flatten_all().unwrap().to_vec1().unwrap();
            let ga: Vec<f64> = a.flatten_all().unwrap().to_vec1().unwrap();
            let n = flat.len();
            for k in [0, n / 3, n / 2, n - 1] {
                let h = 1e-5;
                let f_at = |delta: f64| -> f64 {
                    let mut p = flat.clone();
                    p[k] += delta;
                    let mut args: Vec<Tensor> = xs.to_vec();
                    args[i] = Tensor::from_vec(p, xs[i].dims(), &Device::Cpu).unwrap();
                    let y = fused(&args).unwrap();
                    (&y * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let fd = (f_at(h) - f_at(-h)) / (2.0 * h);
                let err = (fd - ga[k]).abs() / (1e-6 + fd.abs().max(ga[k].abs()));
                assert!(
                    err < 1e-5 || (fd - ga[k]).abs() < 1e-8,
                    "input {i} coord {k}: fd {fd} vs {}",
                    ga[k]
                );
            }
        }
    }
}

#[cfg(test)]
mod model_tests {
    use super::testing::max_abs_diff;
    use crate::model::{Arch, Config, Model};
    use candle_core::{DType, Tensor};

    /// Whole tiny models (both architectures, batch 2): fused and reference forward give the
    /// same per-token NLL and the same gradient for every parameter.
    #[test]
    fn fused_model_matches_reference_ops() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let m = Model::random(Config::tiny(arch), DType::F64, 11).unwrap();
            let ids: Vec<u32> = (0..14).map(|i| (i * 7 + 3) % 37).collect();
            let ids = Tensor::from_vec(ids, (2, 7), &candle_core::Device::Cpu).unwrap();
            let run = || {
                let nll = m.token_nll(&ids, true).unwrap();
                let g = nll.mean_all().unwrap().backward().unwrap();
                let grads: Vec<Tensor> = m
                    .params
                    .iter()
                    .map(|p| g.get(p.var().unwrap().as_tensor()).unwrap().clone())
                    .collect();
                (nll, grads)
            };
            let (nf, gf) = run();
            let (nr, gr) = super::with_reference_ops(run);
            assert!(max_abs_diff(&nf, &nr) < 1e-12, "{arch:?} nll");
            for ((p, a), b) in m.params.iter().zip(&gf).zip(&gr) {
                let d = max_abs_diff(a, b);
                assert!(d < 1e-12, "{arch:?} {}: gradient differs by {d}", p.name);
            }
            let inference = m.token_nll(&ids, false).unwrap();
            assert!(max_abs_diff(&inference, &nf) < 1e-12);
        }
    }
}

#[cfg(test)]
mod sink_tests {
    use super::testing::max_abs_diff;
    use crate::model::{Arch, Config, GradSink, Model};
    use candle_core::{DType, Tensor};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Collect(Mutex<Vec<(usize, Tensor)>>);
    impl GradSink for Collect {
        fn add(&self, param: usize, g: &Tensor) -> candle_core::Result<()> {
            self.0.lock().unwrap().push((param, g.clone()));
            Ok(())
        }
        fn add_rows(&self, _: usize, _: &[u32], _: &Tensor) -> candle_core::Result<()> {
            unreachable!("only the manual backward sends embedding rows")
        }
    }

    /// With a grad sink, every linear weight's gradient arrives there (once; for tied
    /// embeddings the lm_head part) and equals the gradient-store one; the other parameters
    /// stay in the gradient store.
    #[test]
    fn grad_sink_receives_the_linear_weight_gradients() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let m = Model::random(Config::tiny(arch), DType::F64, 5).unwrap();
            let ids =
                Tensor::from_vec((0..12u32).collect(), (2, 6), &candle_core::Device::Cpu).unwrap();
            let plain = m.mean_nll(&ids).unwrap().backward().unwrap();
            let sink = Arc::new(Collect::default());
            let store = m
                .with_grad_sink(sink.clone(), || m.mean_nll(&ids).unwrap().backward())
                .unwrap();
            let got = sink.0.lock().unwrap();
            let linear = |n: &str| n.ends_with("proj.weight") || n == "lm_head.weight";
            for (i, p) in m.params.iter().enumerate() {
                let want = plain.get(p.var().unwrap().as_tensor()).unwrap();
                let from_sink: Vec<&Tensor> = got
                    .iter()
                    .filter(|(j, _)| *j == i)
                    .map(|(_, g)| g)
                    .collect();
                let from_store = store.get(p.var().unwrap().as_tensor());
                let total = match (from_sink.as_slice(), from_store) {
                    ([g], None) => (*g).clone(),
                    ([g], Some(s)) => (*g + s).unwrap(), // tied embeddings: lm_head + embedding
                    ([], Some(s)) => s.clone(),
                    _ => panic!("{arch:?} {}: gradient missing or duplicated", p.name),
                };
                if linear(&p.name) {
                    assert_eq!(from_sink.len(), 1, "{}", p.name);
                    assert!(from_store.is_none(), "{}", p.name);
                }
                let d = max_abs_diff(&total, want);
                assert!(d < 1e-12, "{arch:?} {}: differs by {d}", p.name);
            }
        }
    }
}

#[cfg(test)]
mod exp_tests {
    #[test]
    fn exp_f32_is_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = super::exp_f32(x) as f64;
            let r = (x as f64).exp();
            worst = worst.max((e - r).abs() / r);
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON as f64, "relative error {worst}");
        assert_eq!(super::exp_f32(0.0), 1.0);
        assert!(super::exp_f32(f32::NEG_INFINITY) < 1e-37);
        // every integer exponent the bit trick builds inside the clamp (2^-125 .. 2^127)
        for n in -125..=127 {
            let x = n as f32 * std::f32::consts::LN_2;
            let r = (x as f64).exp();
            assert!((super::exp_f32(x) as f64 - r).abs() / r < 4.0 * f32::EPSILON as f64);
        }
    }

    #[test]
    fn max_of_matches_a_plain_loop() {
        assert_eq!(super::max_of::<f32>(&[]), f32::NEG_INFINITY);
        for len in [1, 15, 16, 17, 100] {
            let v: Vec<f32> = (0..len).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
            let want = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max_of(&v), want, "len {len}");
        }
        assert_eq!(super::max_of(&[1.0f64, f64::NAN, 3.0]), 3.0);
    }
}
