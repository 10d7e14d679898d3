//! Writing Hugging Face checkpoint directories (`config.json` + `model.safetensors`, f32 or
//! bf16) and safetensors files; reading them is [`super::checkpoint`]'s.

use super::config::Config;
use super::Model;
use crate::io::atomic_write;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

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
/// `model.safetensors` (HF names and layout, `dtype` F32 or BF16), each atomically (a
/// non-finite weight is refused, naming its tensor); the
/// weights are decoded and written one tensor at a time, so saving holds at most one
/// tensor's values beyond the model.
pub fn save_checkpoint(dir: &Path, cfg: &Config, model: &Model, dtype: DType) -> Result<()> {
    use crate::safetensors_writer::{write, Data, Entry};
    let stored = match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        d => bail!("--dtype: cannot save weights as {d:?} (f32 or bf16)"),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let entries = model
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| Entry {
            name: p.name.clone(),
            shape: p.shape.clone(),
            data: Data::Stream {
                dtype: stored,
                write: Box::new(move |w| {
                    let t = model.values(i)?.flatten_all()?;
                    if !super::finite::all_finite(&t)? {
                        let v: Vec<f64> = t.to_dtype(DType::F64)?.to_vec1()?;
                        let k = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
                        bail!(
                            "{}: non-finite value ({}) at flat index {k}; not saved",
                            p.name,
                            v[k]
                        );
                    }
                    let bytes: Vec<u8> = match dtype {
                        DType::BF16 => t
                            .to_dtype(DType::BF16)?
                            .to_vec1::<half::bf16>()?
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                        _ => t
                            .to_dtype(DType::F32)?
                            .to_vec1::<f32>()?
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                    };
                    Ok(w.write_all(&bytes)?)
                }),
            },
        })
        .collect();
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write(&dir.join("model.safetensors"), entries, Some(&meta))?;
    let mut cfg_json = cfg.to_hf_json();
    cfg_json["torch_dtype"] = serde_json::json!(match dtype {
        DType::BF16 => "bfloat16",
        _ => "float32",
    });
    let cfg_json = serde_json::to_string_pretty(&cfg_json)?;
    atomic_write(&dir.join("config.json"), cfg_json.as_bytes())
}
