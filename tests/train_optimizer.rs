//! The masked AdamW and the training loop on tiny random models: frozen elements stay
//! bitwise identical, the fused update equals a plain reference AdamW, and resuming after an
//! interruption reproduces an uninterrupted run bit for bit.

use broca::mask::Mask;
use broca::model::{Arch, Config, Model};
use broca::train::{self, AdamW, AdamWConfig, RunOptions, Schedule, TrainConfig, TrainInputs};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// A random mask: ~`frac` of each listed tensor frozen; `full` frozen entirely.
fn random_mask(model: &Model, frac: f64, full: &[&str], seed: u64) -> Mask {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut m = Mask::new();
    for (i, p) in model.params.iter().enumerate() {
        if i % 3 == 2 {
            continue; // some tensors carry no mask at all
        }
        let n = p.var().unwrap().elem_count();
        let v: Vec<u8> = if full.contains(&p.name.as_str()) {
            vec![1; n]
        } else {
            (0..n).map(|_| rng.gen_bool(frac) as u8).collect()
        };
        m.insert(
            p.name.clone(),
            broca::mask::MaskTensor::from_bits(&p.name, &p.shape, &v).unwrap(),
        );
    }
    m
}

fn flags(m: &Mask, name: &str, n: usize) -> Vec<u8> {
    m.get(name)
        .map(|t| t.to_bits())
        .unwrap_or_else(|| vec![0; n])
}

fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

fn bits(model: &Model) -> HashMap<String, Vec<u32>> {
    model
        .params
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.var()
                    .unwrap()
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect()
}

fn tiny_config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 1e-2,
        batch: 2,
        grad_accum: 2,
        seq_len: 12,
        warmup: 3,
        schedule: Schedule::Cosine,
        adamw: AdamWConfig {
            weight_decay: 0.1,
            clip: Some(1.0),
            ..AdamWConfig::default()
        },
        seed: 11,
        eval_every: 0,
        eval_seq_len: 12,
        checkpoint_every: 0,
        keep_checkpoints: 1,
        save_model: true,
    }
}

#[test]
fn frozen_elements_are_bitwise_unchanged_after_20_steps() {
    let mut model = Model::random(Config::tiny(Arch::Llama), DType::F32, 1).unwrap();
    let full = ["model.layers.0.self_attn.q_proj.weight"];
    let mask = random_mask(&model, 0.3, &full, 2);
    let before = bits(&model);
    let data = vec![("x".to_string(), random_ids(600, model.config.vocab_size, 3))];
    let inputs = TrainInputs {
        data,
        eval: vec![],
        freeze: Some(&mask),
    };
    let dir = tempfile::tempdir().unwrap();
    let r = train::train(
        &mut model,
        &inputs,
        &tiny_config(20),
        dir.path(),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(r.steps, 20);
    let after = bits(&model);
    let (mut frozen, mut moved, mut free) = (0usize, 0usize, 0usize);
    for p in &model.params {
        let f = flags(&mask, &p.name, p.var().unwrap().elem_count());
        let (b, a) = (&before[&p.name], &after[&p.name]);
        for i in 0..b.len() {
            if f[i] != 0 {
                frozen += 1;
                assert_eq!(a[i], b[i], "{}[{i}] is frozen but changed", p.name);
            } else {
                free += 1;
                moved += (a[i] != b[i]) as usize;
            }
        }
    }
    assert!(frozen > 500, "too few frozen elements to test: {frozen}");
    assert_eq!(
        moved, free,
        "every unfrozen element should have moved ({moved} of {free})"
    );
    assert_eq!(r.frozen_elements as usize, frozen);
    // the final model on disk is the trained one
    let saved = broca::io::read_safetensors(&dir.path().join("model.safetensors"))
        .unwrap()
        .0;
    for p in &model.params {
        let s: Vec<u32> = saved[&p.name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(s, after[&p.name], "{} on disk differs", p.name);
    }
}

/// One plain AdamW step (PyTorch's algorithm written out) on the unfrozen entries.
#[allow(clippy::too_many_arguments)]
fn reference_step(
    w: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    g: &[f64],
    frozen: &[u8],
    t: i32,
    lr: f64,
    c: &AdamWConfig,
    scale: f64,
    decay: bool,
) {
    for i in 0..w.len() {
        if frozen[i] != 0 {
            continue;
        }
        let gi = g[i] * scale;
        if decay {
            w[i] -= lr * c.weight_decay * w[i];
        }
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
        let m_hat = m[i] / (1.0 - c.beta1.powi(t));
        let v_hat = v[i] / (1.0 - c.beta2.powi(t));
        w[i] -= lr * m_hat / (v_hat.sqrt() + c.eps);
    }
}

#[test]
fn fused_masked_adamw_equals_reference_adamw_in_f64() {
    // qwen2 has q/k/v biases, which (like norms) get no weight decay
    let model = Model::random(Config::tiny(Arch::Qwen2), DType::F64, 5).unwrap();
    let mask = random_mask(&model, 0.25, &[], 6);
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.05,
        clip: Some(0.5),
    };
    let mut opt = AdamW::new(cfg, &model.params, |n| mask.get(n).map(|t| t.to_bits())).unwrap();
    let init: Vec<Vec<f64>> = model
        .params
        .iter()
        .map(|p| {
            p.var()
                .unwrap()
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let mut rw = init.clone();
    let mut rm: Vec<Vec<f64>> = init.iter().map(|w| vec![0.0; w.len()]).collect();
    let mut rv = rm.clone();
    let fr: Vec<Vec<u8>> = model
        .params
        .iter()
        .map(|p| flags(&mask, &p.name, p.var().unwrap().elem_count()))
        .collect();
    let mut clipped = 0;
    for step in 0..10 {
        let ids = Tensor::from_vec(
            random_ids(2 * 10, model.config.vocab_size, 100 + step as u64),
            (2, 10),
            &Device::Cpu,
        )
        .unwrap();
        let loss = model.mean_nll(&ids).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Option<Tensor>> = model
            .params
            .iter()
            .map(|p| grads.get(p.var().unwrap().as_tensor()).cloned())
            .collect();
        let lr = train::lr_at(step, 10, 3, 2e-2, Schedule::Cosine);
        let gs: Vec<Vec<f64>> = g
            .iter()
            .map(|t| {
                t.as_ref()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        // grad_scale 0.5 stands for two accumulated micro-batches
        let norm = gs
            .iter()
            .zip(&fr)
            .flat_map(|(g, f)| {
                g.iter()
                    .zip(f)
                    .filter(|(_, &f)| f == 0)
                    .map(|(x, _)| (0.5 * x) * (0.5 * x))
            })
            .sum::<f64>()
            .sqrt();
        let clip = if norm > 0.5 { 0.5 / (norm + 1e-6) } else { 1.0 };
        clipped += (clip < 1.0) as usize;
        let stats = opt.step(&model.params, g.clone(), lr, 0.5).unwrap();
        assert!(
            (stats.grad_norm - norm).abs() <= 1e-12 * norm,
            "grad norm {} vs {norm}",
            stats.grad_norm
        );
        for (i, p) in model.params.iter().enumerate() {
            let decay = !(p.name.ends_with(".bias") || p.name.contains("norm"));
            reference_step(
                &mut rw[i],
                &mut rm[i],
                &mut rv[i],
                &gs[i],
                &fr[i],
                step as i32 + 1,
                lr,
                &cfg,
                0.5 * clip,
                decay,
            );
        }
    }
    assert!(
        clipped > 0,
        "clipping never engaged; the test would not cover it"
    );
    let (mut worst, mut max_move) = (0f64, 0f64);
    for (i, p) in model.params.iter().enumerate() {
        let w: Vec<f64> = p
            .var()
            .unwrap()
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for j in 0..w.len() {
            if fr[i][j] != 0 {
                assert_eq!(
                    w[j].to_bits(),
                    init[i][j].to_bits(),
                    "{}[{j}] frozen but changed",
                    p.name
                );
                continue;
            }
            worst = worst.max((w[j] - rw[i][j]).abs() / rw[i][j].abs().max(1e-3));
            max_move = max_move.max((w[j] - init[i][j]).abs());
        }
    }
    assert!(
        max_move > 1e-2,
        "weights barely moved ({max_move}); the comparison would be vacuous"
    );
    assert!(
        worst < 1e-6,
        "fused AdamW differs from the reference: relative error {worst}"
    );
}

#[test]
fn resume_after_interruption_is_bitwise_identical() {
    let base = Model::random(Config::tiny(Arch::Llama), DType::F32, 21).unwrap();
    let data = vec![
        ("a".to_string(), random_ids(300, base.config.vocab_size, 22)),
        ("b".to_string(), random_ids(200, base.config.vocab_size, 23)),
    ];
    let mask = random_mask(&base, 0.2, &[], 24);
    let cfg = TrainConfig {
        checkpoint_every: 3,
        ..tiny_config(10)
    };
    let fresh =
        || train::trainer::into_f32(broca::train::forget::copy_model(&base).unwrap()).unwrap();

    let whole = tempfile::tempdir().unwrap();
    let mut m1 = fresh();
    let inputs = TrainInputs {
        data: data.clone(),
        eval: vec![],
        freeze: Some(&mask),
    };
    train::train(&mut m1, &inputs, &cfg, whole.path(), &RunOptions::default()).unwrap();

    let split = tempfile::tempdir().unwrap();
    let mut m2 = fresh();
    let stop = RunOptions {
        stop_after: Some(7),
        ..RunOptions::default()
    };
    let r = train::train(&mut m2, &inputs, &cfg, split.path(), &stop).unwrap();
    assert!(r.interrupted && r.steps == 7);
    assert!(
        !split.path().join("model.safetensors").exists(),
        "an interrupted run must not write the final model"
    );
    let cks: Vec<usize> = train::checkpoint::list(split.path())
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(cks, vec![6], "only the newest checkpoint is kept");
    drop(m2);
    // a new process would start from the base model again
    let mut m3 = fresh();
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let r = train::train(&mut m3, &inputs, &cfg, split.path(), &resume).unwrap();
    assert_eq!((r.resumed_from, r.steps), (6, 10));
    assert_eq!(
        bits(&m1),
        bits(&m3),
        "resumed weights differ from the uninterrupted run"
    );
    let a = std::fs::read(whole.path().join("model.safetensors")).unwrap();
    let b = std::fs::read(split.path().join("model.safetensors")).unwrap();
    assert!(a == b, "final model files differ");

    // resuming with other settings is refused
    let mut m4 = fresh();
    let other = TrainConfig {
        lr: 2e-2,
        ..cfg.clone()
    };
    let stop4 = RunOptions {
        stop_after: Some(3),
        ..RunOptions::default()
    };
    let d4 = tempfile::tempdir().unwrap();
    train::train(&mut m4, &inputs, &cfg, d4.path(), &stop4).unwrap();
    let err = train::train(&mut fresh(), &inputs, &other, d4.path(), &resume).unwrap_err();
    assert!(format!("{err:#}").contains("other settings"), "{err:#}");
}
