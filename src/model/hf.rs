//! Hugging Face checkpoint directories: `config.json` + `model.safetensors` (single, or
//! sharded with `model.safetensors.index.json`), f32/f16/bf16; and writing them back in f32.

use super::config::Config;
use crate::io::atomic_write;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The safetensors files of a checkpoint directory, in index order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("{}: cannot read", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

/// Loads every parameter of `cfg` from the directory's safetensors files, as f32, checking
/// that each is present with the expected shape.
pub fn load_weights(dir: &Path, cfg: &Config) -> Result<HashMap<String, Tensor>> {
    let files = weight_files(dir)?;
    let mut found: HashMap<String, (Tensor, PathBuf)> = HashMap::new();
    for f in &files {
        let tensors = candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file: {}",
                f.display(),
                crate::io::candle_msg(&e)
            )
        })?;
        for (name, t) in tensors {
            found.insert(name, (t, f.clone()));
        }
    }
    let mut out = HashMap::new();
    let wanted: HashSet<String> = cfg.param_shapes().into_iter().map(|(n, _)| n).collect();
    for (name, shape) in cfg.param_shapes() {
        let Some((t, file)) = found.remove(&name) else {
            // transformers may omit lm_head for tied models; anything else is an error
            bail!("{}: missing tensor {name}", files[0].display());
        };
        if t.dims() != shape.as_slice() {
            bail!(
                "{}: tensor {name} has shape {:?}, expected {:?}",
                file.display(),
                t.dims(),
                shape
            );
        }
        let t = match t.dtype() {
            DType::F32 => t,
            DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
            d => bail!(
                "{}: tensor {name} has unsupported dtype {d:?}",
                file.display()
            ),
        };
        out.insert(name, t);
    }
    // a tied checkpoint may still carry lm_head.weight; other extras are ignored unless
    // they look like model parameters we do not know.
    for (name, (_, file)) in found {
        if name.starts_with("model.layers.")
            && !wanted.contains(&name)
            && !name.contains("rotary_emb")
        {
            bail!(
                "{}: unexpected tensor {name} for this config",
                file.display()
            );
        }
    }
    Ok(out)
}

/// Writes `tensors` as one safetensors file (U8 and F64 as they are, anything else as F32),
/// atomically, streaming one tensor at a time, with string metadata (keys written sorted,
/// so saving the same tensors twice gives the same bytes).
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    use crate::safetensors_writer::{write, Entry};
    let entries = tensors
        .iter()
        .map(|(n, t)| Entry::tensor(n.clone(), t.clone()))
        .collect();
    let metadata: Option<std::collections::BTreeMap<String, String>> =
        metadata.map(|m| m.into_iter().collect());
    write(path, entries, metadata.as_ref())
}

/// Writes a checkpoint directory loadable by transformers: `config.json` and
/// `model.safetensors` (f32, HF names and layout), each atomically; the weights are streamed
/// tensor by tensor, so saving holds at most one tensor's bytes beyond the model.
pub fn save_checkpoint(dir: &Path, cfg: &Config, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(&dir.join("model.safetensors"), tensors, Some(meta))?;
    let cfg_json = serde_json::to_string_pretty(&cfg.to_hf_json())?;
    atomic_write(&dir.join("config.json"), cfg_json.as_bytes())
}
