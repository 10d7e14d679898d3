//! The hand-written backward (`Model::mean_nll_and_grads`, what `train` runs; `score` runs
//! the same backward into its f64 sums) against candle's
//! autograd through the same kernels, on the real checkpoints in f32: SmolLM2 (tied head)
//! and Qwen2.5-Coder (q/k/v biases, untied head), two windows of UDHR text.

mod common;

use broca::model::Model;
use candle_core::{DType, Device, Tensor};

fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn check(model: &Model) {
    assert!(model.has_manual_backward());
    let text = common::read(&common::asset("udhr/es.txt"));
    let ids = model.tokenizer().unwrap().encode(&text).unwrap();
    let ids = Tensor::from_vec(ids[..96].to_vec(), (2, 48), &Device::Cpu).unwrap();
    let loss = model.mean_nll(&ids).unwrap();
    let want = loss.backward().unwrap();
    let (got_loss, got) = model.mean_nll_and_grads(&ids).unwrap();
    let want_loss = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        (got_loss - want_loss).abs() < 1e-5 * want_loss,
        "{got_loss} vs {want_loss}"
    );
    for (p, g) in model.params.iter().zip(&got) {
        let g = f64s(
            g.as_ref()
                .unwrap_or_else(|| panic!("{}: no gradient", p.name)),
        );
        let w = f64s(want.get(p.var().unwrap().as_tensor()).unwrap());
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
    check(common::qwen_dense());
}
