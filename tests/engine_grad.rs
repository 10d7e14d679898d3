//! Autograd gradients of the mean NLL against central finite differences, for every
//! parameter tensor of tiny random llama (tied head) and qwen2 (q/k/v biases, untied head)
//! models in f64.

use broca::model::{Arch, Config, Model};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

fn loss(model: &Model, ids: &Tensor) -> f64 {
    model
        .token_nll(ids, false)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn check_gradients(arch: Arch, seed: u64) {
    let cfg = Config::tiny(arch);
    let model = Model::random(cfg.clone(), DType::F64, seed).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // two windows of 9 tokens: exercises batching, GQA, the causal mask and every position
    let ids: Vec<u32> = (0..18)
        .map(|_| rng.gen_range(0..cfg.vocab_size as u32))
        .collect();
    let ids = Tensor::from_vec(ids, (2, 9), &candle_core::Device::Cpu).unwrap();
    let grads = model.mean_nll(&ids).unwrap().backward().unwrap();
    let eps = 1e-5;
    let mut kinds = std::collections::BTreeSet::new();
    let mut errors = Vec::new();
    let mut checked = 0;
    for p in &model.params {
        let g: Vec<f64> = grads
            .get(p.var().unwrap().as_tensor())
            .unwrap_or_else(|| panic!("{}: no gradient", p.name))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let gmax = g.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(gmax > 1e-6, "{}: gradient is zero everywhere", p.name);
        // the two largest entries and three random ones that are not negligible
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let mut entries = order[..2.min(g.len())].to_vec();
        let big: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| g[i].abs() > 1e-3 * gmax)
            .collect();
        for _ in 0..3 {
            entries.push(big[rng.gen_range(0..big.len())]);
        }
        let original = p
            .var()
            .unwrap()
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = p.var().unwrap().shape().clone();
        let at = |w: &[f64]| {
            p.var()
                .unwrap()
                .set(
                    &Tensor::from_vec(w.to_vec(), shape.clone(), &candle_core::Device::Cpu)
                        .unwrap(),
                )
                .unwrap();
            loss(&model, &ids)
        };
        for e in entries {
            let mut w = original.clone();
            w[e] = original[e] + eps;
            let plus = at(&w);
            w[e] = original[e] - eps;
            let minus = at(&w);
            let numeric = (plus - minus) / (2.0 * eps);
            let err = (g[e] - numeric).abs() / g[e].abs().max(numeric.abs());
            if err.is_nan() || err >= 1e-4 {
                errors.push(format!(
                    "{}[{e}]: autograd {:.8e}, finite difference {numeric:.8e}, rel err {err:.2e}",
                    p.name, g[e]
                ));
            }
            checked += 1;
        }
        at(&original);
        kinds.insert(
            p.name
                .split('.')
                .filter(|s| s.parse::<usize>().is_err())
                .collect::<Vec<_>>()
                .join("."),
        );
    }
    assert!(
        errors.is_empty(),
        "{arch:?}: {} of {checked} entries disagree:\n{}",
        errors.len(),
        errors.join("\n")
    );
    // embed, 2 layer norms, q/k/v/o, gate/up/down, final norm (+ q/k/v biases and lm_head for qwen2)
    let expected = if arch == Arch::Qwen2 { 15 } else { 11 };
    assert_eq!(kinds.len(), expected, "parameter kinds checked: {kinds:?}");
}

#[test]
fn llama_gradients_match_finite_differences() {
    check_gradients(Arch::Llama, 1);
}

#[test]
fn qwen2_gradients_match_finite_differences() {
    check_gradients(Arch::Qwen2, 2);
}
