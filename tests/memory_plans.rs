//! Memory plans end to end: every command that loads a model prints one `memory plan:` line
//! on stderr, `--mem-limit` refuses work that does not fit (exit 1, one last line naming the
//! flag), `bench` skips the rounds that do not fit (JSON null) and allocates no gradient
//! memory with `--skip-backward`, and `train` refuses a model it cannot hold, with the
//! arithmetic, before decoding it.

mod common;

use common::{asset, QWEN, SMOLLM};
use serde_json::Value;
use std::process::{Command, Output};

fn broca(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_broca"))
        .args(args)
        .env("BROCA_ASSETS", common::assets())
        .output()
        .expect("cannot run broca")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// Runs a command that must succeed; returns (stdout, stderr).
fn ok(args: &[&str]) -> (String, String) {
    let out = broca(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "broca {args:?} failed: {stderr}");
    (stdout, stderr)
}

/// The one `CMD: memory plan: …` line of `stderr` (panics unless there is exactly one).
fn plan_line<'a>(stderr: &'a str, cmd: &str) -> &'a str {
    let plans: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("memory plan:"))
        .collect();
    assert_eq!(plans.len(), 1, "not one memory plan line: {stderr}");
    assert!(
        plans[0].starts_with(&format!("{cmd}: memory plan: ")),
        "plan line of {cmd}: {}",
        plans[0]
    );
    plans[0]
}

/// Runs a command that must be refused; returns its last (error) line.
fn refused(args: &[&str]) -> String {
    let out = broca(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "broca {args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    common::error_line(&stderr)
}

fn smollm() -> String {
    asset(SMOLLM).to_str().unwrap().to_string()
}

fn en() -> String {
    asset("udhr/en.txt").to_str().unwrap().to_string()
}

#[test]
fn ppl_and_generate_print_one_plan_line() {
    let (m, en) = (smollm(), en());
    let (stdout, stderr) = ok(&[
        "ppl",
        "--model",
        &m,
        "--text",
        &en,
        "--max-tokens",
        "64",
        "--json",
    ]);
    let line = plan_line(&stderr, "ppl");
    assert!(
        line.contains("weights") && line.contains("activations") && line.contains("limit"),
        "{line}"
    );
    let v: Value = serde_json::from_str(&stdout).expect("ppl --json: one JSON object");
    assert!(v["results"][0]["ppl"].as_f64().unwrap() > 1.0);

    let (_, stderr) = ok(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "Hello",
        "--max-tokens",
        "2",
        "--mem-limit",
        "4G",
    ]);
    let line = plan_line(&stderr, "generate");
    assert!(line.contains("of limit 4.00 GiB"), "{line}");
}

#[test]
fn ppl_refuses_a_mem_limit_below_its_plan() {
    let last = refused(&[
        "ppl",
        "--model",
        &smollm(),
        "--text",
        &en(),
        "--max-tokens",
        "64",
        "--mem-limit",
        "1M",
    ]);
    assert!(
        last.contains("--mem-limit 1.0 MiB is too small for ppl") && last.contains("peak ~"),
        "{last}"
    );
    // a bad size is a usage error, before the model loads
    let last = refused(&["ppl", "--model", &smollm(), "--mem-limit", "12X"]);
    assert!(
        last.contains("--mem-limit") && last.contains("12X"),
        "{last}"
    );
}

fn bench_json(extra: &[&str]) -> (Value, String) {
    let m = smollm();
    let mut args = vec![
        "bench",
        "--model",
        &m,
        "--reps",
        "1",
        "--seq-len",
        "64",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (stdout, stderr) = ok(&args);
    plan_line(&stderr, "bench");
    (
        serde_json::from_str(&stdout).expect("bench --json: one JSON object"),
        stderr,
    )
}

const BACKWARD_FIELDS: [&str; 7] = [
    "fwd_bwd_tok_s",
    "fwd_bwd_fraction_of_ceiling",
    "cpu_fwd_bwd_tok_s",
    "cpu_fwd_bwd_fraction_of_ceiling",
    "score_tok_s",
    "score_to_forward_ratio",
    "cpu_score_to_forward_ratio",
];

#[test]
fn bench_skips_the_backward_on_request_and_rounds_that_do_not_fit() {
    // --skip-backward: forward figures, null backward figures, and no gradient memory
    let (v, _) = bench_json(&["--skip-backward"]);
    assert!(v["forward_tok_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["matmul_gflops"].as_f64().unwrap() > 0.0, "{v}");
    for f in BACKWARD_FIELDS {
        assert!(v[f].is_null(), "{f} should be null: {v}");
    }
    assert_eq!(v["skipped"]["fwd_bwd"], "skip-backward", "{v}");
    assert_eq!(v["skipped"]["score"], "skip-backward", "{v}");
    let est = &v["estimated_mb"];
    let (fwd, fwd_bwd) = (
        est["forward"].as_f64().unwrap(),
        est["fwd_bwd"].as_f64().unwrap(),
    );
    assert!(fwd > 0.0 && fwd < fwd_bwd, "{v}");
    assert!(
        fwd_bwd < est["score"].as_f64().unwrap(),
        "the score round also holds f64 sums: {v}"
    );
    // the gradients (4 bytes per parameter) would take more than the whole forward run did
    let params = v["params"].as_f64().unwrap();
    assert!(
        v["peak_rss_mb"].as_f64().unwrap() < fwd + 4.0 * params / 1e6,
        "gradient memory allocated? {v}"
    );

    // a limit between the forward's estimate and the backward's: the forward runs, the
    // backward rounds are skipped for memory
    let limit = format!("{}K", ((fwd + fwd_bwd) / 2.0 * 1e6 / 1024.0) as u64);
    let (v, _) = bench_json(&["--mem-limit", &limit]);
    assert!(v["forward_tok_s"].as_f64().unwrap() > 0.0, "{v}");
    for f in BACKWARD_FIELDS {
        assert!(v[f].is_null(), "{f} should be null under {limit}: {v}");
    }
    assert_eq!(v["skipped"]["fwd_bwd"], "memory", "{v}");
    assert_eq!(v["skipped"]["score"], "memory", "{v}");
    assert!(v["skipped"].get("forward").is_none(), "{v}");
}

#[test]
fn bench_runs_every_round_on_a_mapped_model() {
    let m = smollm();
    let out = Command::new(env!("CARGO_BIN_EXE_broca"))
        .args([
            "bench",
            "--model",
            &m,
            "--reps",
            "1",
            "--seq-len",
            "16",
            "--json",
        ])
        .env("BROCA_ASSETS", common::assets())
        .env("BROCA_WEIGHTS", "mapped")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        plan_line(&stderr, "bench").contains("weights (mapped"),
        "{stderr}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for f in ["forward_tok_s", "fwd_bwd_tok_s", "score_tok_s"] {
        assert!(v[f].as_f64().is_some_and(|x| x > 0.0), "{f}: {v}");
    }
    assert!(v["skipped"].as_object().unwrap().is_empty(), "{v}");
}

#[test]
fn train_refuses_a_model_it_cannot_hold_with_the_arithmetic() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let data = format!("en={}", en());
    let last = refused(&[
        "train",
        "--model",
        asset(QWEN).to_str().unwrap(),
        "--data",
        &data,
        "--steps",
        "1",
        "--seq-len",
        "64",
        "--mem-limit",
        "2G",
        "--out",
        out.to_str().unwrap(),
    ]);
    for want in [
        "--mem-limit 2.00 GiB",
        "training qwen2.5-coder-0.5b-instruct-q4_k_m.gguf needs ~",
        "parameters × 16 bytes",
        "+ activations",
        "train a smaller model",
    ] {
        assert!(last.contains(want), "no '{want}' in: {last}");
    }
    // ~6.3e8 parameters × 16 bytes ≈ 9.4 GiB, plus activations
    let gib: f64 = last
        .split("needs ~")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no size in {last}"));
    assert!((9.0..12.0).contains(&gib), "{last}");
    assert!(!out.exists(), "nothing written on refusal");
}

#[test]
fn train_prints_its_plan_when_it_fits() {
    let tmp = tempfile::tempdir().unwrap();
    let data = format!("en={}", en());
    let (_, stderr) = ok(&[
        "train",
        "--model",
        &smollm(),
        "--data",
        &data,
        "--data-tokens",
        "64",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--seq-len",
        "16",
        "--out",
        tmp.path().join("out").to_str().unwrap(),
        "--json",
    ]);
    let line = plan_line(&stderr, "train");
    for part in [
        "weights (dense f32)",
        "gradients",
        "AdamW moments",
        "activations",
    ] {
        assert!(line.contains(part), "no {part} in {line}");
    }
}
