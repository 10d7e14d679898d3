//! Importance scores on tiny f64 models: against central finite differences, independent of
//! the batch size, weights untouched, and the on-disk run (resume, shards, merge).

use broca::model::{Arch, Config, Model};
use broca::score::accumulate::importance;
use broca::score::plan::Include;
use broca::score::run::{self, Job, Options};
use broca::score::windows::{windows, Shard};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

/// (1/W) Σ_w mean-NLL(window w), without gradients.
fn objective(model: &Model, ids: &[u32], seq_len: usize) -> f64 {
    let wins = windows(ids.len(), seq_len).unwrap();
    let total: f64 = wins
        .iter()
        .map(|w| {
            let nll = model
                .token_nll(&Model::ids_tensor(&ids[w.clone()]).unwrap(), false)
                .unwrap();
            nll.mean_all().unwrap().to_scalar::<f64>().unwrap()
        })
        .sum();
    total / wins.len() as f64
}

fn values(model: &Model, name: &str) -> Vec<f64> {
    model
        .param(name)
        .unwrap()
        .var()
        .unwrap()
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn set_entry(model: &Model, name: &str, idx: usize, value: f64) {
    let var = model.param(name).unwrap().var().unwrap();
    let mut v = values(model, name);
    v[idx] = value;
    var.set(&Tensor::from_vec(v, var.dims(), var.device()).unwrap())
        .unwrap();
}

fn check_finite_differences(arch: Arch) {
    let cfg = Config::tiny(arch);
    let model = Model::random(cfg.clone(), DType::F64, 7).unwrap();
    let seq_len = 8;
    // 3 full windows and a trailing partial one (dropped)
    let ids = tokens(3 * seq_len + 5, cfg.vocab_size, 11);
    let before: Vec<Vec<f64>> = model
        .params
        .iter()
        .map(|p| values(&model, &p.name))
        .collect();
    let scores = importance(&model, &ids, seq_len, 1).unwrap();
    for (p, b) in model.params.iter().zip(&before) {
        assert_eq!(&values(&model, &p.name), b, "{}: weights changed", p.name);
    }
    assert_eq!(scores.len(), model.params.len());
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let h = 1e-5;
    let (mut checked, mut meaningful) = (0, 0);
    for (name, score) in &scores {
        let theta = values(&model, name);
        assert_eq!(score.len(), theta.len(), "{name}: shape");
        let mut picks: Vec<usize> = (0..3).map(|_| rng.gen_range(0..theta.len())).collect();
        if name == "model.embed_tokens.weight" {
            // a row of a token that occurs in the text
            picks.push(ids[0] as usize * cfg.hidden_size + 3);
        }
        for idx in picks {
            set_entry(&model, name, idx, theta[idx] + h);
            let up = objective(&model, &ids, seq_len);
            set_entry(&model, name, idx, theta[idx] - h);
            let down = objective(&model, &ids, seq_len);
            set_entry(&model, name, idx, theta[idx]);
            let g = (up - down) / (2.0 * h);
            let want = (theta[idx] * g).abs();
            let got = score[idx];
            assert!(
                (got - want).abs() <= 1e-4 * want + 1e-9,
                "{arch:?} {name}[{idx}]: score {got:e}, finite differences {want:e}"
            );
            checked += 1;
            meaningful += usize::from(want > 1e-5);
        }
    }
    assert!(
        meaningful * 2 > checked,
        "only {meaningful} of {checked} sampled scores are non-negligible"
    );
}

#[test]
fn importance_matches_finite_differences_llama_tied() {
    check_finite_differences(Arch::Llama);
}

#[test]
fn importance_matches_finite_differences_qwen2_biases() {
    check_finite_differences(Arch::Qwen2);
}

#[test]
fn importance_is_independent_of_batch_size() {
    let cfg = Config::tiny(Arch::Qwen2);
    let model = Model::random(cfg.clone(), DType::F64, 5).unwrap();
    let ids = tokens(3 * 8, cfg.vocab_size, 2);
    let one = importance(&model, &ids, 8, 1).unwrap();
    for batch in [2, 3] {
        let other = importance(&model, &ids, 8, batch).unwrap();
        for ((name, a), (_, b)) in one.iter().zip(&other) {
            let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-12 * scale.max(1e-300),
                    "{name}: batch 1 {x:e} vs batch {batch} {y:e}"
                );
            }
        }
    }
}

#[test]
fn budget_below_seq_len_gives_one_short_window() {
    let cfg = Config::tiny(Arch::Llama);
    let model = Model::random(cfg.clone(), DType::F64, 1).unwrap();
    let ids = tokens(6, cfg.vocab_size, 4);
    let short = importance(&model, &ids, 64, 1).unwrap();
    let exact = importance(&model, &ids, 6, 1).unwrap();
    assert_eq!(short, exact);
    assert!(short.iter().any(|(_, v)| v.iter().any(|x| *x > 0.0)));
}

fn opts(batch: usize, shard: Option<Shard>) -> Options {
    Options {
        seq_len: 8,
        batch,
        shard,
        checkpoint_secs: 1e9,
        checkpoint_windows: Some(1),
        stop_after_windows: None,
        include: Include::All,
        ..Default::default()
    }
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn interrupted_run_resumes_bit_identically() {
    let cfg = Config::tiny(Arch::Qwen2);
    let model = Model::random(cfg.clone(), DType::F64, 9).unwrap();
    let ids = tokens(7 * 8 + 3, cfg.vocab_size, 6);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for batch in [1, 2] {
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
        let one = Job {
            model: &model,
            model_sha256: "x",
            out: &a,
        };
        run::score_language(&one, "xx", &ids, &opts(batch, None), &mut |_| {}).unwrap();
        let job = Job {
            model: &model,
            model_sha256: "x",
            out: &b,
        };
        // checkpoint every 3 windows, die after 5: the windows after the checkpoint are lost
        let mut o = opts(batch, None);
        o.checkpoint_windows = Some(3);
        o.stop_after_windows = Some(5);
        let err = run::score_language(&job, "xx", &ids, &o, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("stopped after"), "{err}");
        assert!(run::state_path(&b, "xx", None).exists());
        assert!(!run::final_path(&b, "xx").exists());
        let r = run::score_language(&job, "xx", &ids, &opts(batch, None), &mut |_| {}).unwrap();
        assert_eq!(r.status, "resumed");
        assert_eq!(r.resumed_windows, [3, 4][batch - 1], "batch {batch}");
        assert_eq!(
            read(&run::final_path(&a, "xx")),
            read(&run::final_path(&b, "xx")),
            "batch {batch}"
        );
        assert!(
            !run::state_path(&b, "xx", None).exists(),
            "state left behind"
        );
        // finished: skipped on rerun; other arguments are refused
        let r = run::score_language(&job, "xx", &ids, &opts(batch, None), &mut |_| {}).unwrap();
        assert_eq!(r.status, "skipped");
        let err =
            run::score_language(&job, "xx", &ids, &opts(batch + 1, None), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("different"), "{err}");
    }
    // a state made with other arguments is refused, not mixed
    let c = dir.path().join("c");
    let job = Job {
        model: &model,
        model_sha256: "x",
        out: &c,
    };
    let mut o = opts(1, None);
    o.stop_after_windows = Some(2);
    run::score_language(&job, "xx", &ids, &o, &mut |_| {}).unwrap_err();
    let err = run::score_language(&job, "xx", &ids[1..], &opts(1, None), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("resume state"), "{err}");
}

#[test]
fn shards_merge_to_the_one_shot_scores() {
    let cfg = Config::tiny(Arch::Llama);
    let model = Model::random(cfg.clone(), DType::F64, 4).unwrap();
    let ids = tokens(7 * 8, cfg.vocab_size, 8);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    run::score_language(
        &Job {
            model: &model,
            model_sha256: "x",
            out: &a,
        },
        "yy",
        &ids,
        &opts(2, None),
        &mut |_| {},
    )
    .unwrap();
    let job = Job {
        model: &model,
        model_sha256: "x",
        out: &b,
    };
    for i in [2, 0] {
        let r = run::score_language(
            &job,
            "yy",
            &ids,
            &opts(2, Some(Shard { index: i, count: 3 })),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(r.status, "shard");
    }
    let err = run::merge(&b).unwrap_err().to_string();
    assert!(err.contains("missing shard(s) 1/3"), "{err}");
    run::score_language(
        &job,
        "yy",
        &ids,
        &opts(2, Some(Shard { index: 1, count: 3 })),
        &mut |_| {},
    )
    .unwrap();
    let merged = run::merge(&b).unwrap();
    assert_eq!(merged.len(), 1);
    assert_eq!(
        (
            merged[0].status.as_str(),
            merged[0].windows,
            merged[0].tokens
        ),
        ("merged", 7, 56)
    );
    let one = broca::score::load(&run::final_path(&a, "yy")).unwrap();
    let two = broca::score::load(&run::final_path(&b, "yy")).unwrap();
    assert_eq!(two.method, "importance");
    assert_eq!(two.meta["tokens"], "56");
    for p in &model.params {
        let x = one.tensors[&p.name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = two.tensors[&p.name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (u, v) in x.iter().zip(&y) {
            assert!(
                (u - v).abs() <= 1e-6 * u.abs() + 1e-30,
                "{}: {u:e} vs {v:e}",
                p.name
            );
        }
    }
    one.check_matches(&model).unwrap();
}
