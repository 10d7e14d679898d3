//! Memory-mapped weights (checkpoint encoding kept, decoded per use) against dense f32
//! weights on the real checkpoints: identical values (and identical to candle's own
//! dequantization, llama's Q/K un-permuted), identical NLL and gradients, and overlay
//! perturbations that equal in-place ones, never touch the mapped bytes and restore exactly.

mod common;

use broca::mask::Coverage;
use broca::model::{gguf, Model, Residency};
use broca::perturb::ops::{self, Op};
use candle_core::{DType, Device, Tensor};

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn window(model: &Model) -> Tensor {
    let text = common::read(&common::asset("udhr/es.txt"));
    let ids = model.tokenizer().unwrap().encode(&text).unwrap();
    Tensor::from_vec(ids[..96].to_vec(), (2, 48), &Device::Cpu).unwrap()
}

fn mean_nll(model: &Model, ids: &Tensor) -> f64 {
    model
        .token_nll(ids, false)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Every parameter decodes to the dense model's values, bit for bit; the mapped model holds
/// its matrices in the file's encoding only.
fn same_values(mapped: &Model, dense: &Model) {
    assert!(!mapped.is_dense() && dense.is_dense());
    assert!(
        mapped.resident_weight_bytes() * 3 < dense.resident_weight_bytes(),
        "mapped {} vs dense {} bytes",
        mapped.resident_weight_bytes(),
        dense.resident_weight_bytes()
    );
    for (i, p) in mapped.params.iter().enumerate() {
        let a = f32s(&mapped.values(i).unwrap());
        let b = f32s(&dense.values(i).unwrap());
        assert!(a == b, "{}: mapped and dense values differ", p.name);
    }
}

/// The decoded matrices equal candle's whole-tensor dequantization (the f32 path Broca used
/// before), with llama's permuted Q/K rows restored by the reference permutation.
fn equals_candle_dequantize(model: &Model, file: &str) {
    let g = gguf::GgufFile::open(&common::asset(file)).unwrap();
    let llama = model.config.arch == broca::model::Arch::Llama;
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
        "model.embed_tokens.weight",
    ] {
        let mut want = g.tensor_f32(&gguf::hf_to_gguf_name(name)).unwrap();
        if llama && name.contains("q_proj") {
            want = gguf::unpermute_rows(&want, model.config.num_heads).unwrap();
        }
        if llama && name.contains("k_proj") {
            want = gguf::unpermute_rows(&want, model.config.num_kv_heads).unwrap();
        }
        assert!(
            f32s(&model.values_of(name).unwrap()) == f32s(&want),
            "{file} {name}: decoded values differ from candle's dequantization"
        );
    }
}

/// NLL and every gradient of the hand-written backward agree between the two residencies.
fn same_forward_backward(mapped: &Model, dense: &Model) {
    let ids = window(mapped);
    let (a, b) = (mean_nll(mapped, &ids), mean_nll(dense, &ids));
    assert!((a - b).abs() <= 1e-6 * b.abs(), "NLL {a} vs {b}");
    let (la, ga) = mapped.mean_nll_and_grads(&ids).unwrap();
    let (lb, gb) = dense.mean_nll_and_grads(&ids).unwrap();
    assert!((la - lb).abs() <= 1e-6 * lb.abs(), "loss {la} vs {lb}");
    for ((p, x), y) in mapped.params.iter().zip(&ga).zip(&gb) {
        let (x, y) = (f32s(x.as_ref().unwrap()), f32s(y.as_ref().unwrap()));
        let norm = y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let diff = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            diff <= 1e-5 * norm,
            "{}: gradient differs by {}",
            p.name,
            diff / norm
        );
    }
}

/// A 1% random region zeroed and a norm entry scaled: the mapped model (overlays) gives the
/// dense model's (in place) NLL, its mapped values are untouched, and restoring is exact.
fn overlays_equal_in_place(mapped: &Model, dense: &Model) {
    let ids = window(mapped);
    let base: Vec<Vec<f32>> = (0..mapped.params.len())
        .map(|i| f32s(&mapped.values(i).unwrap()))
        .collect();
    let shapes: Vec<(String, Vec<usize>)> = mapped
        .params
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    let mask = broca::region::random::random_fraction(&shapes, 0.01, 7, Coverage::Layers).unwrap();
    for op in [Op::Zero, Op::Scale(-3.0), Op::Randomize] {
        let sm = ops::apply(mapped, &mask, &op, 11).unwrap();
        let sd = ops::apply(dense, &mask, &op, 11).unwrap();
        assert_eq!(sm.count(), sd.count());
        let (a, b) = (mean_nll(mapped, &ids), mean_nll(dense, &ids));
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{op}: NLL {a} vs {b}");
        // a mapped matrix's file bytes are never written: only its overlay changed
        let q = mapped
            .param_index("model.layers.1.self_attn.q_proj.weight")
            .unwrap();
        assert!(mapped.overlay(q).is_some());
        ops::restore(mapped, sm).unwrap();
        ops::restore(dense, sd).unwrap();
        assert!(
            mapped.overlay(q).is_none(),
            "{op}: overlay left after restore"
        );
        for (i, b) in base.iter().enumerate() {
            assert!(
                &f32s(&mapped.values(i).unwrap()) == b,
                "{op}: {} not restored",
                mapped.params[i].name
            );
            assert!(
                &f32s(&dense.values(i).unwrap()) == b,
                "{op}: dense {} not restored",
                mapped.params[i].name
            );
        }
    }
}

#[test]
fn smollm2_mapped_equals_dense() {
    let mapped = common::load_with(common::SMOLLM, Residency::Mapped);
    let dense = common::smollm();
    same_values(&mapped, dense);
    equals_candle_dequantize(&mapped, common::SMOLLM);
    same_forward_backward(&mapped, dense);
    overlays_equal_in_place(&mapped, dense);
}

#[test]
fn qwen2_mapped_equals_dense() {
    let mapped = common::qwen();
    let dense = common::qwen_dense();
    same_values(mapped, dense);
    equals_candle_dequantize(mapped, common::QWEN);
    same_forward_backward(mapped, dense);
    overlays_equal_in_place(mapped, dense);
}
