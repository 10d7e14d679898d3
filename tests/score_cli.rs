//! `broca score` from the command line on SmolLM2 and on tiny checkpoints: output format,
//! kill -9 and resume (bit-identical), shards + merge, stability diffs, bad inputs.

use broca::model::{Arch, Config, Model};
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const UDHR_AR: &str = "tests/fixtures/udhr-ar.txt";

fn smollm2() -> PathBuf {
    let p = broca::cli::default_model();
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-assets",
        p.display()
    );
    p
}

fn broca(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_broca"));
    c.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn run_ok(args: &[&str]) -> Output {
    let out = broca(args).output().unwrap();
    assert!(
        out.status.success(),
        "broca {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_err(args: &[&str]) -> String {
    let out = broca(args).output().unwrap();
    assert!(!out.status.success(), "broca {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    // informational lines (the memory plan) may come first; the error is one last line
    let lines: Vec<&str> = err.trim().lines().collect();
    assert!(
        lines.last().is_some_and(|l| l.starts_with("error: "))
            && lines[..lines.len() - 1]
                .iter()
                .all(|l| l.contains("memory plan:")),
        "one-line error expected: {err}"
    );
    lines.last().unwrap().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// One SmolLM2 run shared by three checks (the model is the expensive part).
#[test]
fn smollm2_scores_resume_after_kill_and_merge_shards() {
    let model_path = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let common = |out: &Path| -> Vec<String> {
        [
            "--model",
            s(&model_path),
            "--lang",
            &format!("ar={UDHR_AR}"),
            "--tokens",
            "256",
            "--seq-len",
            "64",
            "--out",
            s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v = vec!["score".to_string()];
        v.extend(common(out));
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    // uninterrupted run
    let out = run_ok(
        &args(&a, &["--json"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["results"][0]["status"], "scored");
    assert_eq!(v["results"][0]["windows"], 4);
    let entries: Vec<_> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        entries,
        vec!["ar.safetensors"],
        "exactly the result, no resume state left behind"
    );
    let one = broca::score::load(&a.join("ar.safetensors")).unwrap();
    let model = Model::load(&model_path).unwrap();
    one.check_matches(&model).unwrap();
    assert_eq!(
        (one.lang.as_str(), one.method.as_str()),
        ("ar", "importance")
    );
    assert_eq!(one.meta["tokens"], "256");
    assert_eq!(one.meta["seq_len"], "64");
    assert_eq!(one.meta["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        one.meta["model_sha256"],
        broca::io::sha256_file(&model_path).unwrap()
    );
    for (name, t) in &one.tensors {
        assert_eq!(t.dtype(), DType::F32, "{name}");
        let v = f32s(t);
        assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0), "{name}");
        assert!(v.iter().any(|x| *x > 0.0), "{name}: all zero");
    }
    drop(model);

    // kill -9 after the first checkpoint, then rerun the same command
    let kill_args = args(&b, &["--checkpoint-windows", "1"]);
    let mut child = broca(&kill_args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = b.join(".partial/ar.state.safetensors");
    let t0 = Instant::now();
    while !state.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "score exited before its first checkpoint"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "no checkpoint after 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !b.join("ar.safetensors").exists(),
        "finished before the kill; the test proves nothing"
    );
    // what a kill in the middle of a write leaves: temporary files of the dead process and
    // its lock file (no lock held); the rerun must take them over and leave none
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    for leftover in [
        format!(".partial/.ar.state.safetensors.{dead}.tmp"),
        format!(".ar.safetensors.{dead}.tmp"),
        ".partial/.ar.broca.lock".to_string(),
    ] {
        std::fs::write(b.join(leftover), format!("{dead}\n")).unwrap();
    }
    let out = run_ok(
        &args(&b, &["--json"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["results"][0]["status"], "resumed");
    assert!(v["results"][0]["resumed_windows"].as_u64().unwrap() >= 1);
    assert!(
        std::fs::read(a.join("ar.safetensors")).unwrap()
            == std::fs::read(b.join("ar.safetensors")).unwrap(),
        "resumed scores differ from the uninterrupted run"
    );
    let entries: Vec<_> = std::fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        entries,
        vec!["ar.safetensors"],
        "after the resumed run: only the result, no temporary, lock or resume file"
    );
    // a finished language is skipped on rerun
    let out = run_ok(
        &args(&b, &["--json"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["results"][0]["status"], "skipped");

    // shards 0/2 and 1/2, then merge
    for sh in ["1/2", "0/2"] {
        run_ok(
            &args(&c, &["--shard", sh])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
    }
    assert!(
        !c.join("ar.safetensors").exists(),
        "a shard must not write the result"
    );
    run_ok(&["score", "merge", "--out", s(&c)]);
    let two = broca::score::load(&c.join("ar.safetensors")).unwrap();
    assert_eq!(two.meta["tokens"], "256");
    assert_eq!(two.meta["model_sha256"], one.meta["model_sha256"]);
    let mut worst = 0f64;
    for (name, t) in &one.tensors {
        let (x, y) = (f32s(t), f32s(&two.tensors[name]));
        for (u, v) in x.iter().zip(&y) {
            let (u, v) = (*u as f64, *v as f64);
            if u.abs() > 1e-30 {
                worst = worst.max((u - v).abs() / u.abs());
            } else {
                assert!(v.abs() <= 1e-30, "{name}: {u:e} vs {v:e}");
            }
        }
    }
    assert!(
        worst <= 1e-6,
        "merged shards differ from one run by {worst:e} (relative)"
    );
}

#[test]
fn bad_inputs_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let missing = tmp.path().join("nope.txt");
    let e = run_err(&[
        "score",
        "--lang",
        &format!("ar={}", s(&missing)),
        "--out",
        s(&out),
    ]);
    assert!(e.contains("nope.txt") && e.contains("no such file"), "{e}");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, " \n\n").unwrap();
    let e = run_err(&["score", "--text", s(&empty), "--out", s(&out)]);
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let e = run_err(&[
        "score",
        "--text",
        UDHR_AR,
        "--shard",
        "3/2",
        "--out",
        s(&out),
    ]);
    assert!(e.contains("--shard 3/2"), "{e}");
    let e = run_err(&[
        "score",
        "--text",
        UDHR_AR,
        "--tokens",
        "1",
        "--out",
        s(&out),
    ]);
    assert!(e.contains("--tokens"), "{e}");
    let e = run_err(&["score", "merge", "--out", s(&out)]);
    assert!(e.contains(".partial"), "{e}");
    assert!(!out.join("udhr-ar.safetensors").exists());
}

/// Saves a tiny random checkpoint (and a copy with a few weights changed).
fn tiny_pair(dir: &Path, arch: Arch) -> (PathBuf, PathBuf, Vec<(String, usize, f64)>) {
    let model = Model::random(Config::tiny(arch), DType::F32, 3).unwrap();
    let (a, b) = (
        dir.join(format!("{arch:?}-a")),
        dir.join(format!("{arch:?}-b")),
    );
    model.save_hf(&a).unwrap();
    let changes = vec![
        (
            "model.layers.0.self_attn.q_proj.weight".to_string(),
            5usize,
            0.25f64,
        ),
        ("model.layers.1.mlp.down_proj.weight".to_string(), 17, -1.5),
        ("model.norm.weight".to_string(), 2, 4.0),
    ];
    for (name, i, delta) in &changes {
        let var = model.param(name).unwrap().var().unwrap();
        let mut v = f32s(var.as_tensor());
        v[*i] += *delta as f32;
        var.set(&Tensor::from_vec(v, var.dims(), var.device()).unwrap())
            .unwrap();
    }
    model.save_hf(&b).unwrap();
    (a, b, changes)
}

#[test]
fn diff_scores_are_the_weight_change() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, changes) = tiny_pair(tmp.path(), Arch::Qwen2);
    let base = Model::load(&a).unwrap();
    let file = tmp.path().join("d.safetensors");
    run_ok(&[
        "score",
        "diff",
        "--base",
        s(&a),
        "--tuned",
        s(&b),
        "--out",
        s(&file),
    ]);
    let d = broca::score::load(&file).unwrap();
    assert_eq!((d.lang.as_str(), d.method.as_str()), ("diff", "diff"));
    assert_eq!(
        d.meta["model_sha256"],
        broca::io::sha256_file(&a.join("model.safetensors")).unwrap()
    );
    d.check_matches(&base).unwrap();
    let rel = tmp.path().join("r.safetensors");
    run_ok(&[
        "score",
        "diff",
        "--base",
        s(&a),
        "--tuned",
        s(&b),
        "--out",
        s(&rel),
        "--relative",
        "--eps",
        "1e-3",
        "--lang",
        "zh",
    ]);
    let r = broca::score::load(&rel).unwrap();
    assert_eq!(
        (r.lang.as_str(), r.method.as_str()),
        ("zh", "diff-relative")
    );
    for p in &base.params {
        let theta = f32s(p.var().unwrap().as_tensor());
        let (dv, rv) = (f32s(&d.tensors[&p.name]), f32s(&r.tensors[&p.name]));
        for i in 0..theta.len() {
            let delta = changes
                .iter()
                .find(|c| c.0 == p.name && c.1 == i)
                .map(|c| c.2);
            match delta {
                None => assert!(dv[i] == 0.0 && rv[i] == 0.0, "{}[{i}] changed", p.name),
                Some(delta) => {
                    // the tuned value went through f32, so compare with its rounding
                    let moved = ((theta[i] + delta as f32) - theta[i]).abs();
                    assert_eq!(dv[i], moved, "{}[{i}]", p.name);
                    let want = moved as f64 / (theta[i].abs() as f64 + 1e-3);
                    assert!(
                        (rv[i] as f64 - want).abs() <= 1e-6 * want,
                        "{}[{i}]: {} vs {want}",
                        p.name,
                        rv[i]
                    );
                }
            }
        }
    }
    // mismatched checkpoints are refused
    let (q, _, _) = tiny_pair(tmp.path(), Arch::Llama);
    let e = run_err(&[
        "score",
        "diff",
        "--base",
        s(&a),
        "--tuned",
        s(&q),
        "--out",
        s(&tmp.path().join("x.safetensors")),
    ]);
    assert!(e.contains("q_proj.bias") || e.contains("lm_head"), "{e}");
    let mut cfg = Config::tiny(Arch::Qwen2);
    cfg.intermediate_size = 32;
    let wide = tmp.path().join("wide");
    Model::random(cfg, DType::F32, 1)
        .unwrap()
        .save_hf(&wide)
        .unwrap();
    let e = run_err(&[
        "score",
        "diff",
        "--base",
        s(&a),
        "--tuned",
        s(&wide),
        "--out",
        s(&tmp.path().join("y.safetensors")),
    ]);
    assert!(e.contains("shape") && e.contains("mlp"), "{e}");
    assert!(!tmp.path().join("y.safetensors").exists());
}

#[test]
fn diff_of_smollm2_against_an_edited_copy() {
    let model_path = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::load(&model_path).unwrap();
    let name = "model.layers.3.mlp.up_proj.weight";
    let var = model.param(name).unwrap().var().unwrap();
    let mut v = f32s(var.as_tensor());
    let old = v[1000];
    v[1000] = old + 0.5;
    var.set(&Tensor::from_vec(v, var.dims(), var.device()).unwrap())
        .unwrap();
    let tuned = tmp.path().join("tuned");
    model.save_hf(&tuned).unwrap();
    drop(model);
    let file = tmp.path().join("d.safetensors");
    run_ok(&[
        "score",
        "diff",
        "--base",
        s(&model_path),
        "--tuned",
        s(&tuned),
        "--out",
        s(&file),
        "--lang",
        "edit",
    ]);
    let d = broca::score::load(&file).unwrap();
    assert_eq!(d.lang, "edit");
    for (n, t) in &d.tensors {
        let v = f32s(t);
        let nonzero: Vec<usize> = (0..v.len()).filter(|&i| v[i] != 0.0).collect();
        if n == name {
            assert_eq!(nonzero, vec![1000]);
            assert_eq!(v[1000], (old + 0.5) - old);
        } else {
            assert!(nonzero.is_empty(), "{n}: {} entries changed", nonzero.len());
        }
    }
}

#[test]
fn token_budget_is_a_prefix_of_the_whole_encoding() {
    let model = Model::load(&smollm2()).unwrap();
    let tok = model.tokenizer().unwrap();
    for file in [UDHR_AR, "tests/fixtures/udhr-zh.txt"] {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
        let all = tok.encode(&text).unwrap();
        for n in [2, 100, 1500, 3000, all.len() - 1, all.len(), all.len() + 10] {
            let got = broca::score::windows::budget_tokens(tok, &text, Some(n)).unwrap();
            assert_eq!(got, all[..n.min(all.len())], "{file}: budget {n}");
        }
    }
}
