//! The `broca` binary end to end: generation on SmolLM2, and bad inputs, each of which must
//! give exit code ≠ 0, one `error:` line naming the file and the problem, no panic and no
//! output file.

mod common;

use broca::model::{Arch, Config, Model};
use candle_core::DType;
use common::{asset, fixture, SMOLLM};
use std::path::{Path, PathBuf};
use std::process::Command;

fn broca(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_broca"))
        .args(args)
        .current_dir(cwd)
        .env("BROCA_ASSETS", common::assets())
        // candle attaches backtraces to its errors when this is set: they must not leak
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("cannot run broca")
}

#[test]
fn generate_knows_the_capital_of_france() {
    let out = broca(
        &[
            "generate",
            "--model",
            asset(SMOLLM).to_str().unwrap(),
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "12",
        ],
        &common::root(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("The capital of France is"),
        "output: {stdout}"
    );
    assert!(stdout.contains("Paris"), "no Paris in: {stdout}");
}

/// Every entry below `dir`, recursively, sorted.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(listing(&p));
        }
        out.push(p);
    }
    out.sort();
    out
}

/// Runs `broca ppl --model MODEL --text TEXT --json` inside `dir` and checks the failure:
/// exit code ≠ 0, one stderr line `error: …` (after the memory plan, if the inputs got that
/// far) naming `named` and containing `problem`, nothing on stdout, no panic, nothing new in `dir`.
fn expect_failure(dir: &Path, model: &Path, text: &Path, named: &Path, problem: &str) {
    let before = listing(dir);
    let out = broca(
        &[
            "ppl",
            "--model",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--json",
        ],
        dir,
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "exit code 0; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let line = common::error_line(&stderr);
    assert!(
        !line.contains(".rs:"),
        "source locations (a backtrace?) in the error: {stderr}"
    );
    assert!(
        line.contains(named.to_str().unwrap()),
        "error does not name {}: {stderr}",
        named.display()
    );
    assert!(
        line.contains(problem),
        "error does not say '{problem}': {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "stdout not empty: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(listing(dir), before, "files appeared in {}", dir.display());
}

fn en() -> PathBuf {
    fixture("udhr-en.txt")
}

#[test]
fn truncated_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(asset(SMOLLM)).unwrap();
    std::fs::write(&bad, &bytes[..8 << 20]).unwrap();
    expect_failure(dir.path(), &bad, &en(), &bad, "truncated");
}

#[test]
fn random_bytes_are_rejected() {
    use rand::{RngCore, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("random.gguf");
    let mut bytes = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut bytes);
    std::fs::write(&bad, &bytes).unwrap();
    expect_failure(dir.path(), &bad, &en(), &bad, "not a valid GGUF file");
}

/// A tiny llama checkpoint directory whose tensors are edited by `edit` before saving.
fn tiny_checkpoint(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, candle_core::Tensor)>),
) -> PathBuf {
    let ckpt = dir.join("ckpt");
    let model = Model::random(Config::tiny(Arch::Llama), DType::F32, 3).unwrap();
    model.save_hf(&ckpt).unwrap();
    let mut tensors = model.named_tensors().unwrap();
    edit(&mut tensors);
    broca::model::hf::save_safetensors(&ckpt.join("model.safetensors"), &tensors, None).unwrap();
    ckpt
}

#[test]
fn checkpoint_missing_a_tensor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), |t| {
        t.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
    });
    let file = ckpt.join("model.safetensors");
    expect_failure(
        dir.path(),
        &ckpt,
        &en(),
        &file,
        "missing tensor model.layers.1.mlp.up_proj.weight",
    );
}

#[test]
fn checkpoint_with_wrong_shape_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), |t| {
        let (_, w) = t
            .iter_mut()
            .find(|(n, _)| n == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        *w = w.narrow(0, 0, 4).unwrap();
    });
    let file = ckpt.join("model.safetensors");
    expect_failure(
        dir.path(),
        &ckpt,
        &en(),
        &file,
        "model.layers.0.self_attn.k_proj.weight has shape [4, 16]",
    );
}

#[test]
fn unknown_architecture_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path(), |_| {});
    let cfg = ckpt.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("LlamaForCausalLM", "MambaForCausalLM")
        .replace("\"llama\"", "\"mamba\"");
    assert!(text.contains("mamba"));
    std::fs::write(&cfg, text).unwrap();
    expect_failure(dir.path(), &ckpt, &en(), &cfg, "unknown architecture");
}

#[test]
fn empty_text_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("empty.txt");
    std::fs::write(&bad, "").unwrap();
    expect_failure(dir.path(), &asset(SMOLLM), &bad, &bad, "empty");
}

#[test]
fn non_utf8_text_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("latin1.txt");
    std::fs::write(
        &bad,
        b"Alle Menschen sind frei und gleich an W\xfcrde und Rechten geboren.\n",
    )
    .unwrap();
    expect_failure(dir.path(), &asset(SMOLLM), &bad, &bad, "not valid UTF-8");
}

#[test]
fn missing_model_path_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("no-such-model.gguf");
    expect_failure(dir.path(), &bad, &en(), &bad, "no such file");
}

#[test]
fn missing_text_path_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("no-such-text.txt");
    expect_failure(dir.path(), &asset(SMOLLM), &bad, &bad, "no such file");
}
