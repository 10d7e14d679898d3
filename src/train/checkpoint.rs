//! Resumable training state under `DIR/checkpoints/step-N/`: the weights as a loadable
//! checkpoint (`config.json`, `model.safetensors`, `tokenizer.json`), the AdamW moments
//! (`optimizer.safetensors`, tensors `m.NAME` and `v.NAME`) and `state.json` (step, data
//! position, RNG seed and epoch, fingerprint of the run's settings, losses and eval points so
//! far). A checkpoint is written into a temporary directory (`.step-N.broca-PID.tmp`) and renamed
//! into place when complete; old ones are renamed to a temporary name before being deleted.

use super::adamw::{AdamW, Moments};
use super::curves::EvalPoint;
use super::stream::StreamState;
use crate::io::{read_safetensors, write_json};
use crate::model::Model;
use crate::safetensors_writer::{write, Data, Entry};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Everything but the tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    pub stream: StreamState,
    /// Hash of everything that decides the weights (settings, data, masks, base weights).
    pub fingerprint: String,
    /// Mean training loss of each completed step.
    pub losses: Vec<f64>,
    pub eval: Vec<EvalPoint>,
}

/// `DIR/checkpoints`.
pub fn root(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Checkpoints present under `out`, as (step, path), oldest first.
pub fn list(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let r = root(out);
    if !r.is_dir() {
        return Ok(Vec::new());
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(&r).with_context(|| format!("{}: cannot read", r.display()))? {
        let p = e?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if p.join("state.json").exists() {
                v.push((n, p));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// Writes a loadable model directory (config.json, model.safetensors in f32, tokenizer.json;
/// the layout of `Model::save_hf`) without building the whole file in memory. Each file is
/// written through a temporary name and renamed.
pub fn write_model(dir: &Path, model: &Model) -> Result<()> {
    let entries = model
        .params
        .iter()
        .map(|p| {
            Ok(Entry::tensor_f32(
                p.name.clone(),
                p.var()?.as_tensor().detach(),
            ))
        })
        .collect::<Result<_>>()?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    write(&dir.join("model.safetensors"), entries, Some(&meta))?;
    write_json(&dir.join("config.json"), &model.config.to_hf_json())?;
    if let Some(t) = &model.tokenizer {
        t.save(&dir.join("tokenizer.json"))?;
    }
    Ok(())
}

/// Writes the optimizer moments as `m.NAME` / `v.NAME`.
fn write_moments(path: &Path, opt: &AdamW) -> Result<()> {
    let mut entries = Vec::new();
    for s in &opt.states {
        let (m, v) = match &s.moments {
            Some(Moments::F32 { m, v }) => (Data::F32(m), Data::F32(v)),
            Some(Moments::F64 { m, v }) => (Data::F64(m), Data::F64(v)),
            None => continue,
        };
        for (prefix, data) in [("m", m), ("v", v)] {
            entries.push(Entry {
                name: format!("{prefix}.{}", s.name),
                shape: s.shape.clone(),
                data,
            });
        }
    }
    write(path, entries, None)
}

/// Writes checkpoint `step-N` atomically and keeps only the newest `keep` (at least 1).
pub fn save(
    out: &Path,
    model: &Model,
    opt: &AdamW,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let r = root(out);
    std::fs::create_dir_all(&r).with_context(|| format!("{}: cannot create", r.display()))?;
    let dest = r.join(format!("step-{}", state.step));
    // `.step-N.broca-PID.tmp`: removed on error or signal, swept after a kill
    let tmp_name = crate::io::temp_path(&dest);
    let tmp = crate::io::TempPath::create_dir(tmp_name.clone())
        .with_context(|| format!("{}: cannot create", tmp_name.display()))?;
    write_model(tmp.path(), model)?;
    write_moments(&tmp.path().join("optimizer.safetensors"), opt)?;
    write_json(&tmp.path().join("state.json"), state)?;
    if dest.exists() {
        crate::io::remove_dir_atomic(&dest)
            .with_context(|| format!("{}: cannot replace", dest.display()))?;
    }
    tmp.rename_to(&dest)
        .with_context(|| format!("{}: cannot rename into place", dest.display()))?;
    // old checkpoints are renamed away before they are deleted, so an interrupted prune
    // never leaves a half-deleted `step-N/` that looks like a checkpoint
    let all = list(out)?;
    let keep = keep.max(1);
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            crate::io::remove_dir_atomic(p)
                .with_context(|| format!("{}: cannot remove old checkpoint", p.display()))?;
        }
    }
    Ok(dest)
}

/// A loaded checkpoint.
pub struct Loaded {
    pub state: TrainState,
    pub weights: HashMap<String, Tensor>,
    pub moments: HashMap<String, Tensor>,
}

/// Reads a checkpoint directory.
pub fn load(dir: &Path) -> Result<Loaded> {
    let sp = dir.join("state.json");
    let text =
        std::fs::read_to_string(&sp).with_context(|| format!("{}: cannot read", sp.display()))?;
    let state: TrainState = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid training state", sp.display()))?;
    let (weights, _) = read_safetensors(&dir.join("model.safetensors"))?;
    let (moments, _) = read_safetensors(&dir.join("optimizer.safetensors"))?;
    Ok(Loaded {
        state,
        weights,
        moments,
    })
}

/// Sets every parameter of `model` to the checkpoint's weights (exact copy).
pub fn restore_weights(model: &Model, weights: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    for p in &model.params {
        let t = weights
            .get(&p.name)
            .with_context(|| format!("{}: checkpoint lacks {}", dir.display(), p.name))?;
        if t.dims() != p.shape.as_slice() {
            bail!(
                "{}: {} has shape {:?}, the model {:?}",
                dir.display(),
                p.name,
                t.dims(),
                p.shape
            );
        }
        let var = p.var()?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
