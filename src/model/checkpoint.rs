//! Opening a checkpoint without reading its weights: a GGUF file or a Hugging Face directory
//! (one `model.safetensors`, or shards listed in `model.safetensors.index.json`) is memory
//! mapped, its header validated against the file (every count, shape and offset), and each
//! parameter described as a [`MappedTensor`] under its HF name.

use super::config::{Arch, Config};
use super::gguf::{hf_to_gguf_name, GgufFile};
use super::store::{MappedFile, MappedTensor};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A validated, mapped checkpoint.
pub struct Checkpoint {
    pub config: Config,
    /// HF name → where its values are.
    pub tensors: HashMap<String, MappedTensor>,
    pub tokenizer: Option<Tokenizer>,
    /// The mapped files, in index order.
    pub files: Vec<PathBuf>,
}

impl Checkpoint {
    /// Opens a GGUF file or an HF checkpoint directory.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        if !path.exists() {
            bail!("{}: no such file or directory", path.display());
        }
        if path.is_dir() {
            open_hf(path)
        } else {
            open_gguf(path)
        }
    }

    /// Bytes of all mapped parameters.
    pub fn mapped_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.bytes()).sum()
    }
}

fn open_gguf(path: &Path) -> Result<Checkpoint> {
    let g = GgufFile::open(path)?;
    let config = g.config()?;
    check_layer_count(&config, g.content.tensor_infos.len(), path)?;
    let file = MappedFile::open(path)?;
    let base = g.content.tensor_data_offset as usize;
    let mut tensors = HashMap::new();
    for (hf, shape) in config.param_shapes() {
        let gg = hf_to_gguf_name(&hf);
        let info = g
            .content
            .tensor_infos
            .get(&gg)
            .with_context(|| format!("{}: missing tensor {gg} ({hf})", path.display()))?;
        if info.shape.dims() != shape.as_slice() {
            bail!(
                "{}: tensor {gg} ({hf}) has shape {:?}, expected {:?} from the metadata",
                path.display(),
                info.shape.dims(),
                shape
            );
        }
        let permuted = match config.arch {
            Arch::Llama if hf.ends_with("q_proj.weight") => Some(config.num_heads),
            Arch::Llama if hf.ends_with("k_proj.weight") => Some(config.num_kv_heads),
            _ => None,
        };
        let offset = base
            .checked_add(info.offset as usize)
            .with_context(|| format!("{}: tensor {gg}: offset out of range", path.display()))?;
        let t = MappedTensor::new(
            file.clone(),
            &gg,
            offset,
            rows_cols(&shape),
            info.ggml_dtype,
            permuted,
        )?;
        tensors.insert(hf, t);
    }
    let tokenizer = Some(Tokenizer::from_gguf(&g.content.metadata, path)?);
    Ok(Checkpoint {
        config,
        tensors,
        tokenizer,
        files: vec![path.to_path_buf()],
    })
}

/// `[rows, cols]` of a parameter shape (vectors are one row).
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        _ => (1, shape.iter().product()),
    }
}

/// Refuses layer counts the file cannot hold (each layer has at least 9 tensors) before
/// anything is sized by them.
fn check_layer_count(c: &Config, tensors_present: usize, path: &Path) -> Result<()> {
    if c.num_layers.saturating_mul(9) > tensors_present {
        bail!(
            "{}: the header says {} layers but the file holds only {tensors_present} tensors",
            path.display(),
            c.num_layers
        );
    }
    Ok(())
}

/// The shard files of an HF directory in index order (the index's files sorted by name, as
/// transformers numbers them), checking each exists; or the single `model.safetensors`.
pub fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let map = read_index(&index)?;
        let mut files: Vec<String> = map.values().cloned().collect();
        files.sort();
        files.dedup();
        for f in &files {
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                bail!(
                    "{}: shard name '{f}' is not a file in this folder",
                    index.display()
                );
            }
            if !dir.join(f).is_file() {
                bail!("{}: names shard {f}, which is missing", index.display());
            }
        }
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

/// The index's weight map: tensor name → shard file name.
fn read_index(index: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("{}: cannot read", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map object", index.display()))?;
    map.iter()
        .map(|(k, f)| {
            let f = f
                .as_str()
                .with_context(|| format!("{}: weight_map[{k}] is not a string", index.display()))?;
            Ok((k.clone(), f.to_string()))
        })
        .collect()
}

fn open_hf(dir: &Path) -> Result<Checkpoint> {
    let config = Config::from_hf_json(&dir.join("config.json"))?;
    let files = shard_files(dir)?;
    let index = dir.join("model.safetensors.index.json");
    let index_map = if index.exists() {
        Some(read_index(&index)?)
    } else {
        None
    };
    // every tensor of every shard, validated against its file
    let mut found: HashMap<String, MappedTensor> = HashMap::new();
    let mut count = 0usize;
    for f in &files {
        let file = MappedFile::open(f)?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&file.map).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file (truncated or corrupt): {e}",
                f.display()
            )
        })?;
        let data = 8 + n;
        for (name, info) in meta.tensors() {
            count += 1;
            let dtype = match info.dtype {
                safetensors::Dtype::BF16 => GgmlDType::BF16,
                safetensors::Dtype::F16 => GgmlDType::F16,
                safetensors::Dtype::F32 => GgmlDType::F32,
                d if name.starts_with("model.") || name.starts_with("lm_head") => bail!(
                    "{}: tensor {name} has unsupported dtype {d:?} (supported: BF16, F16, F32)",
                    f.display()
                ),
                _ => continue,
            };
            if let Some(m) = &index_map {
                let listed = m.get(&name).map(String::as_str);
                let here = f.file_name().and_then(|n| n.to_str());
                if listed.is_some() && listed != here {
                    continue; // the index places it elsewhere
                }
            }
            let (a, b) = info.data_offsets;
            let numel: usize = info.shape.iter().product();
            if b - a != numel * dtype.type_size() {
                bail!(
                    "{}: tensor {name}: data size does not match its shape",
                    f.display()
                );
            }
            let t = MappedTensor::new(
                file.clone(),
                &name,
                data + a,
                rows_cols(&info.shape),
                dtype,
                None,
            )?;
            found.insert(name.clone(), t);
        }
    }
    check_layer_count(&config, count, dir)?;
    let mut tensors = HashMap::new();
    for (name, shape) in config.param_shapes() {
        let t = found.remove(&name).with_context(|| match &index_map {
            Some(m) if m.contains_key(&name) => {
                format!(
                    "{}: tensor {name} is not in shard {}",
                    dir.display(),
                    m[&name]
                )
            }
            _ => format!("{}: missing tensor {name}", files[0].display()),
        })?;
        if (t.rows, t.cols) != rows_cols(&shape) {
            bail!(
                "{}: tensor {name} has shape [{}, {}], expected {:?}",
                t.file.path.display(),
                t.rows,
                t.cols,
                shape
            );
        }
        tensors.insert(name, t);
    }
    // a tied checkpoint may still carry lm_head.weight; other layer tensors we do not
    // know mean the config and the weights disagree
    if let Some((name, t)) = found
        .iter()
        .find(|(n, _)| n.starts_with("model.layers.") && !n.contains("rotary_emb"))
    {
        bail!(
            "{}: unexpected tensor {name} for this config",
            t.file.path.display()
        );
    }
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_dir(dir)?)
    } else {
        None
    };
    Ok(Checkpoint {
        config,
        tensors,
        tokenizer,
        files,
    })
}
