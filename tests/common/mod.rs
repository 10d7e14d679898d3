//! Shared helpers for the integration tests: asset paths and models loaded once per test
//! binary. Tests that need assets fail (never skip) when they are missing.
#![allow(dead_code)]

pub mod checks;
pub mod reference;

use broca::model::{Model, Residency};
use broca::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// File name of the SmolLM2 checkpoint in the assets folder.
pub const SMOLLM: &str = "smollm2-135m-instruct-q4_1.gguf";
/// File name of the Qwen2.5-Coder checkpoint in the assets folder.
pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// The crate root (integration tests may run from anywhere).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The assets folder (`$BROCA_ASSETS`, default `./assets`, relative to the crate root).
/// Panics with a hint when it is missing.
pub fn assets() -> PathBuf {
    let dir = broca::data::assets_dir();
    let dir = if dir.is_relative() {
        root().join(dir)
    } else {
        dir
    };
    if !dir.is_dir() {
        panic!(
            "assets folder {} missing: run scripts/fetch-assets",
            dir.display()
        );
    }
    dir
}

/// A file inside the assets folder; panics with a hint when it is missing.
pub fn asset(rel: &str) -> PathBuf {
    let p = assets().join(rel);
    if !p.exists() {
        panic!("asset {} missing: run scripts/fetch-assets", p.display());
    }
    p
}

/// The final line of a refusal's stderr, which must be `error: …`; a line before it is
/// allowed only when it is a memory plan (`CMD: memory plan: …`, printed once the inputs
/// are valid). Panics, quoting stderr, otherwise.
pub fn error_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .trim_end()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let Some((last, before)) = lines.split_last() else {
        panic!("no error line on stderr");
    };
    assert!(
        last.starts_with("error: "),
        "last stderr line is not 'error: …': {stderr}"
    );
    assert!(
        before.iter().all(|l| l.contains("memory plan:")),
        "stderr has more than the error line (and memory plans): {stderr}"
    );
    last.to_string()
}

/// A file inside tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// Reads a UTF-8 file or panics naming it.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(rel: &str) -> Model {
    load_with(rel, Residency::Auto)
}

/// An asset model held as `residency` says.
pub fn load_with(rel: &str, residency: Residency) -> Model {
    let p = asset(rel);
    Model::load_with(&p, residency).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()))
}

/// SmolLM2-135M (GGUF), loaded once per test binary.
pub fn smollm() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load(SMOLLM))
}

/// Qwen2.5-Coder-0.5B (GGUF; memory-mapped, its matrices decoded per use), loaded once per
/// test binary.
pub fn qwen() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load(QWEN))
}

/// Qwen2.5-Coder-0.5B with every weight as a dense f32 tensor (~2.5 GB; autograd needs it).
pub fn qwen_dense() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load_with(QWEN, Residency::Dense))
}

/// Only the tokenizer of a GGUF asset (cheap: no tensors are read).
pub fn gguf_tokenizer(rel: &str) -> Tokenizer {
    let p = asset(rel);
    let g = broca::model::gguf::GgufFile::open(&p).unwrap_or_else(|e| panic!("{e:#}"));
    Tokenizer::from_gguf(&g.content.metadata, &p).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Relative difference `|a - b| / |b|`.
pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}
