//! Per-parameter scores: gradient × weight importance (`broca score`, see [`run`] and
//! [`accumulate`]) and stability, |θ_tuned − θ_base| (`broca score diff`, see [`diff`]).
//!
//! A score file is `<lang>.safetensors`: one f32 tensor per parameter in its exact shape,
//! keyed by HF name, with metadata `lang`, `method`, `tokens`, `seq_len`, `model_sha256`,
//! `version` (see CONVENTIONS.md). [`load`] reads one back for region selection.

pub mod accumulate;
pub mod diff;
pub mod files;
pub mod plan;
mod recover;
pub mod run;
pub mod windows;

use crate::model::Model;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `method` of gradient × weight importance.
pub const METHOD_IMPORTANCE: &str = "importance";
/// `method` of |θ_tuned − θ_base|.
pub const METHOD_DIFF: &str = "diff";
/// `method` of |θ_tuned − θ_base| / (|θ_base| + ε).
pub const METHOD_DIFF_RELATIVE: &str = "diff-relative";

/// A score file read back.
pub struct ScoreFile {
    pub path: PathBuf,
    /// The `lang` metadata (the language the scores are for, or `diff`).
    pub lang: String,
    /// The `method` metadata: `importance`, `diff` or `diff-relative`.
    pub method: String,
    /// HF parameter name → scores (f32) in the parameter's shape.
    pub tensors: HashMap<String, Tensor>,
    /// All metadata.
    pub meta: HashMap<String, String>,
}

/// Reads a score file; it must carry `lang` and `method` metadata.
pub fn load(path: &Path) -> Result<ScoreFile> {
    let (tensors, meta) = crate::io::read_safetensors(path)?;
    let get = |k: &str| {
        meta.get(k).cloned().with_context(|| {
            format!(
                "{}: not a score file (metadata has no '{k}')",
                path.display()
            )
        })
    };
    let (lang, method) = (get("lang")?, get("method")?);
    if method.ends_with("-partial") {
        bail!(
            "{}: a shard's partial sum, not a score file (run `broca score merge`)",
            path.display()
        );
    }
    Ok(ScoreFile {
        path: path.to_path_buf(),
        lang,
        method,
        tensors,
        meta,
    })
}

impl ScoreFile {
    /// Checks that every tensor of the file is a parameter of `model` with its shape (a
    /// score file may cover only some parameters, e.g. the `model.layers.*` ones).
    pub fn check_matches(&self, model: &Model) -> Result<()> {
        for (name, t) in &self.tensors {
            match model.param(name) {
                None => bail!(
                    "{}: tensor {name} is not a parameter of the model (scores for another model?)",
                    self.path.display()
                ),
                Some(p) if t.dims() != p.shape.as_slice() => bail!(
                    "{}: tensor {name} has shape {:?}, the model's is {:?}",
                    self.path.display(),
                    t.dims(),
                    p.shape
                ),
                _ => {}
            }
        }
        Ok(())
    }
}

/// SHA-256 of a model, hex: of the GGUF file; of a checkpoint directory's `model.safetensors`;
/// or, for a sharded checkpoint (one with `model.safetensors.index.json`, which the loader
/// also prefers), the SHA-256 of the concatenated lowercase hex SHA-256 strings of its shard
/// files in index order (the distinct files of the index's `weight_map` sorted by name, which
/// for transformers' `model-0000i-of-0000N.safetensors` is shard order).
pub fn model_sha256(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return crate::io::sha256_file(path);
    }
    let index = path.join("model.safetensors.index.json");
    if !index.exists() {
        let single = path.join("model.safetensors");
        if !single.exists() {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                path.display()
            );
        }
        return crate::io::sha256_file(&single);
    }
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("{}: cannot read", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        bail!("{}: empty weight_map", index.display());
    }
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in files {
        h.update(crate::io::sha256_file(&path.join(f))?.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}
