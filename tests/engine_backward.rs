//! The hand-written backward (`Model::mean_nll_grads`, what `score` runs) against candle's
//! autograd through the same kernels, on the real checkpoints in f32: SmolLM2 (tied head)
//! and Qwen2.5-Coder (q/k/v biases, untied head), two windows of UDHR text.

mod common;

use broca::model::{GradSink, Model};
use candle_core::{DType, Device, Tensor};
use std::sync::Mutex;

/// Dense f64 gradients per parameter.
struct Dense {
    shapes: Vec<Vec<usize>>,
    grads: Mutex<Vec<Option<Vec<f64>>>>,
}

impl Dense {
    fn add_values(&self, param: usize, at: impl Fn(&mut [f64])) {
        let mut gs = self.grads.lock().unwrap();
        let n: usize = self.shapes[param].iter().product();
        at(gs[param].get_or_insert_with(|| vec![0.0; n]));
    }
}

impl GradSink for Dense {
    fn add(&self, param: usize, g: &Tensor) -> candle_core::Result<()> {
        assert_eq!(g.dims(), self.shapes[param].as_slice(), "param {param}");
        let v: Vec<f64> = g.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        self.add_values(param, |s| s.iter_mut().zip(&v).for_each(|(s, v)| *s += v));
        Ok(())
    }
    fn add_rows(&self, param: usize, rows: &[u32], g: &Tensor) -> candle_core::Result<()> {
        let v: Vec<Vec<f64>> = g.to_dtype(DType::F64)?.to_vec2()?;
        let cols = self.shapes[param][1];
        self.add_values(param, |s| {
            for (&r, row) in rows.iter().zip(&v) {
                let dst = &mut s[r as usize * cols..(r as usize + 1) * cols];
                dst.iter_mut().zip(row).for_each(|(d, x)| *d += x);
            }
        });
        Ok(())
    }
}

fn check(model: &Model) {
    assert!(model.has_manual_backward());
    let text = common::read(&common::asset("udhr/es.txt"));
    let ids = model.tokenizer().unwrap().encode(&text).unwrap();
    let ids = Tensor::from_vec(ids[..96].to_vec(), (2, 48), &Device::Cpu).unwrap();
    let loss = model.mean_nll(&ids).unwrap();
    let want = loss.backward().unwrap();
    let sink = Dense {
        shapes: model.params.iter().map(|p| p.var.dims().to_vec()).collect(),
        grads: Mutex::new(vec![None; model.params.len()]),
    };
    let got_loss = model.mean_nll_grads(&ids, &sink).unwrap();
    let want_loss = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        (got_loss - want_loss).abs() < 1e-5 * want_loss,
        "{got_loss} vs {want_loss}"
    );
    let got = sink.grads.into_inner().unwrap();
    for (p, g) in model.params.iter().zip(&got) {
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no gradient", p.name));
        let w: Vec<f64> = want
            .get(p.var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        assert!(norm > 0.0, "{}: zero gradient", p.name);
        assert!(
            diff <= 1e-4 * norm,
            "{}: relative difference {}",
            p.name,
            diff / norm
        );
    }
}

#[test]
fn manual_backward_matches_autograd_on_smollm2() {
    check(common::smollm());
}

#[test]
fn manual_backward_matches_autograd_on_qwen2() {
    check(common::qwen());
}
