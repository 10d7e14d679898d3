//! Importance in planned passes over layer groups (tiny f64 models): several passes give the
//! one-pass file bit for bit; `--layers` jobs, with or without shards, merge to it; a run
//! killed in a later pass resumes bit-identically; scores only for what is scored; bf16
//! files; the planner splits under a memory limit and refuses one that fits no layer.

use broca::model::{Arch, Config, Model};
use broca::score::files::{Mapped, Store};
use broca::score::plan::{self, Group, Include};
use broca::score::run::{self, Job, Options};
use broca::score::windows::Shard;
use candle_core::DType;
use rand::{Rng, SeedableRng};
use std::path::Path;

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

fn opts(include: Include, groups: Vec<Group>) -> Options {
    Options {
        seq_len: 8,
        batch: 2,
        checkpoint_secs: 1e9,
        checkpoint_windows: Some(1),
        include,
        groups,
        ..Default::default()
    }
}

fn g(first: usize, last: usize, extras: bool) -> Group {
    Group {
        first,
        last,
        extras,
    }
}

fn score(model: &Model, out: &Path, ids: &[u32], o: &Options) -> run::Outcome {
    let job = Job {
        model,
        model_sha256: "x",
        out,
    };
    run::score_language(&job, "xx", ids, o, &mut |_| {}).unwrap()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every tensor of two score files as f64, by name; the names must agree.
fn same_scores(a: &Path, b: &Path, tol: f64) {
    let (ma, mb) = (Mapped::open(a).unwrap(), Mapped::open(b).unwrap());
    let mut na = ma.names.clone();
    let mut nb = mb.names.clone();
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    for n in &na {
        let (x, y) = (ma.f64s(n).unwrap(), mb.f64s(n).unwrap());
        for (p, q) in x.iter().zip(&y) {
            assert!((p - q).abs() <= tol * q.abs().max(1e-30), "{n}: {p} vs {q}");
        }
    }
}

fn model3(arch: Arch) -> (Model, Vec<u32>) {
    let mut cfg = Config::tiny(arch);
    cfg.num_layers = 3;
    let model = Model::random(cfg.clone(), DType::F64, 5).unwrap();
    (model, tokens(6 * 8 + 3, cfg.vocab_size, 2))
}

#[test]
fn passes_give_the_one_pass_file_bit_for_bit() {
    for (arch, include) in [(Arch::Qwen2, Include::Layers), (Arch::Llama, Include::All)] {
        let (model, ids) = model3(arch);
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let one = score(&model, &a, &ids, &opts(include, vec![]));
        let extras = include == Include::All;
        let groups = vec![g(0, 0, extras), g(1, 2, false)];
        let two = score(&model, &b, &ids, &opts(include, groups));
        assert_eq!((one.passes, two.passes), (1, 2));
        assert_eq!(
            read(&run::final_path(&a, "xx")),
            read(&run::final_path(&b, "xx")),
            "{arch:?} {include}"
        );
        assert!(!run::partial_dir(&b).exists(), "partials left behind");
        let m = Mapped::open(&run::final_path(&b, "xx")).unwrap();
        let layer_only = m.names.iter().all(|n| n.starts_with("model.layers."));
        assert_eq!(layer_only, include == Include::Layers);
        assert_eq!(m.meta("include").unwrap(), include.to_string());
        let expected = model
            .params
            .iter()
            .filter(|p| extras || p.name.starts_with("model.layers."))
            .count();
        assert_eq!(m.names.len(), expected);
    }
}

#[test]
fn layer_jobs_and_shards_merge_to_the_one_pass_scores() {
    let (model, ids) = model3(Arch::Qwen2);
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    score(&model, &a, &ids, &opts(Include::All, vec![]));
    // layer groups as separate jobs (a Slurm array), then merge
    for grp in [g(0, 0, true), g(1, 2, false)] {
        let mut o = opts(Include::All, vec![grp]);
        o.forced_layers = true;
        assert_eq!(score(&model, &b, &ids, &o).status, "partial");
    }
    let merged = run::merge(&b).unwrap();
    assert_eq!(merged[0].status, "merged");
    same_scores(
        &run::final_path(&a, "xx"),
        &run::final_path(&b, "xx"),
        1e-12,
    );
    assert!(!run::partial_dir(&b).exists(), "merge left its partials");
    // shards × groups
    for grp in [g(0, 1, true), g(2, 2, false)] {
        for i in 0..2 {
            let mut o = opts(Include::All, vec![grp]);
            o.forced_layers = true;
            o.shard = Some(Shard { index: i, count: 2 });
            score(&model, &c, &ids, &o);
        }
    }
    run::merge(&c).unwrap();
    same_scores(&run::final_path(&a, "xx"), &run::final_path(&c, "xx"), 1e-6);
}

#[test]
fn merge_names_the_missing_layers() {
    let (model, ids) = model3(Arch::Llama);
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(Include::Layers, vec![g(0, 0, false)]);
    o.forced_layers = true;
    score(&model, dir.path(), &ids, &o);
    let e = format!("{:#}", run::merge(dir.path()).unwrap_err());
    assert!(e.contains("layers 1-2 have no result"), "{e}");
    assert!(e.contains("--layers 1-2"), "{e}");
}

#[test]
fn a_run_killed_in_a_later_pass_resumes_bit_identically() {
    let (model, ids) = model3(Arch::Qwen2);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let groups = vec![g(0, 0, false), g(1, 1, false), g(2, 2, false)];
    score(&model, &a, &ids, &opts(Include::Layers, groups.clone()));
    // 6 windows per pass, batch 2: dies in the second pass after its first batch
    let mut o = opts(Include::Layers, groups.clone());
    o.stop_after_windows = Some(8);
    let job = Job {
        model: &model,
        model_sha256: "x",
        out: &b,
    };
    let e = run::score_language(&job, "xx", &ids, &o, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("stopped after"), "{e}");
    assert!(!run::final_path(&b, "xx").exists());
    let r = score(&model, &b, &ids, &opts(Include::Layers, groups));
    assert_eq!(r.status, "resumed");
    assert_eq!(r.resumed_windows, 2);
    assert_eq!(
        read(&run::final_path(&a, "xx")),
        read(&run::final_path(&b, "xx"))
    );
    assert!(!run::partial_dir(&b).exists(), "resume state left behind");
}

#[test]
fn bf16_score_files_round_the_f32_scores() {
    let (model, ids) = model3(Arch::Llama);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    score(&model, &a, &ids, &opts(Include::Layers, vec![]));
    let mut o = opts(Include::Layers, vec![]);
    o.dtype = Store::BF16;
    score(&model, &b, &ids, &o);
    let (fa, fb) = (run::final_path(&a, "xx"), run::final_path(&b, "xx"));
    let (ma, mb) = (Mapped::open(&fa).unwrap(), Mapped::open(&fb).unwrap());
    assert_eq!(mb.meta("dtype").unwrap(), "bf16");
    assert_eq!(ma.meta("dtype").unwrap(), "f32");
    assert!(read(&fb).len() < read(&fa).len() * 6 / 10);
    same_scores(&fa, &fb, 1.0 / 128.0);
    // regions read bf16 score files
    let (_, s) = broca::region::scores::read_abs(&fb, broca::mask::Coverage::Layers).unwrap();
    assert_eq!(s.len(), mb.names.len());
}

#[test]
fn the_planner_splits_under_the_limit_and_refuses_what_fits_no_layer() {
    let (model, _) = model3(Arch::Qwen2);
    let one = plan::plan(&model, Include::Layers, None, 2, 8, u64::MAX).unwrap();
    assert_eq!(one.groups, vec![g(0, 2, false)]);
    // a limit just above a one-layer pass of the top layer: every layer alone
    let top = plan::plan(&model, Include::Layers, Some((2, 2)), 2, 8, u64::MAX).unwrap();
    let bottom = plan::plan(&model, Include::Layers, Some((0, 0)), 2, 8, u64::MAX).unwrap();
    let limit = bottom.plan.peak();
    let split = plan::plan(&model, Include::Layers, None, 2, 8, limit).unwrap();
    assert!(split.groups.len() > 1, "{:?}", split.groups);
    assert_eq!(split.groups.first().unwrap().first, 0);
    assert_eq!(split.groups.last().unwrap().last, 2);
    for w in split.groups.windows(2) {
        assert_eq!(w[0].last + 1, w[1].first, "groups must tile the layers");
    }
    assert!(split.plan.peak() <= limit);
    let e = plan::plan(&model, Include::Layers, None, 2, 8, top.plan.peak() - 1)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(e.contains("--mem-limit") && e.contains("too small"), "{e}");
}
