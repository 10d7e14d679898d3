//! Region masks: one U8 0/1 tensor per covered parameter, in the parameter's exact shape,
//! keyed by its HF name, stored as safetensors with a JSON summary beside it
//! (`FILE.safetensors` + `FILE.json`). A mask matches a model when its names and shapes do.

use crate::io::{read_safetensors, write_json};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A region: HF parameter name → U8 tensor of 0/1 in that parameter's shape.
pub type Mask = BTreeMap<String, Tensor>;

/// Which parameters a region may cover. `Layers` (the paper's default) is every tensor under
/// `model.layers.*`; `All` adds embeddings, the final norm and lm_head.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Coverage {
    Layers,
    All,
}

/// Whether parameter `name` is covered.
pub fn is_covered(name: &str, cov: Coverage) -> bool {
    match cov {
        Coverage::All => true,
        Coverage::Layers => name.starts_with("model.layers."),
    }
}

/// The JSON summary path beside a mask file (`X.safetensors` → `X.json`).
pub fn summary_path(mask: &Path) -> PathBuf {
    mask.with_extension("json")
}

/// Writes a mask (atomically) and its summary JSON beside it. The summary gets per-tensor
/// counts, numel and fractions, totals, plus the caller's `how` object (how it was made).
/// Saving the same mask twice gives byte-identical files.
pub fn save(path: &Path, mask: &Mask, how: serde_json::Value) -> Result<()> {
    use crate::safetensors_writer::{write, Entry};
    for (n, t) in mask {
        if t.dtype() != DType::U8 {
            bail!("mask tensor {n} must be U8, is {:?}", t.dtype());
        }
    }
    let entries = mask
        .iter()
        .map(|(n, t)| Entry::tensor(n.clone(), t.clone()))
        .collect();
    let meta = BTreeMap::from([
        ("kind".to_string(), "broca-mask".to_string()),
        ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ]);
    write(path, entries, Some(&meta))?;
    write_json(&summary_path(path), &summary(mask, how)?)
}

/// Per-tensor and total counts of a mask.
pub fn summary(mask: &Mask, how: serde_json::Value) -> Result<serde_json::Value> {
    let mut per = Vec::new();
    let (mut total, mut numel) = (0u64, 0u64);
    for (n, t) in mask {
        let c = count(t)?;
        let e = t.elem_count() as u64;
        total += c;
        numel += e;
        per.push(serde_json::json!({"name": n, "count": c, "numel": e, "fraction": c as f64 / e.max(1) as f64}));
    }
    Ok(serde_json::json!({
        "tensors": per,
        "total": {"count": total, "numel": numel, "fraction": total as f64 / numel.max(1) as f64},
        "how": how,
    }))
}

/// Number of selected (non-zero) entries.
pub fn count(t: &Tensor) -> Result<u64> {
    Ok(t.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as u64)
}

/// Reads a mask file (any model).
pub fn load(path: &Path) -> Result<Mask> {
    let (tensors, _) = read_safetensors(path)?;
    let mut out = Mask::new();
    for (n, t) in tensors {
        if t.dtype() != DType::U8 {
            bail!(
                "{}: tensor {n} is {:?}, a mask must be U8",
                path.display(),
                t.dtype()
            );
        }
        out.insert(n, t);
    }
    if out.is_empty() {
        bail!("{}: mask has no tensors", path.display());
    }
    Ok(out)
}

/// Reads a mask and checks that every tensor names a parameter of `model` with its shape.
pub fn load_for(path: &Path, model: &Model) -> Result<Mask> {
    let mask = load(path)?;
    check_matches(&mask, model).with_context(|| format!("{}", path.display()))?;
    Ok(mask)
}

/// Errors unless every mask tensor names a parameter of `model` with the same shape.
pub fn check_matches(mask: &Mask, model: &Model) -> Result<()> {
    for (n, t) in mask {
        let Some(v) = model.param(n) else {
            bail!(
                "mask tensor {n} is not a parameter of this model (a mask made for another model?)"
            );
        };
        if v.shape != t.dims() {
            bail!("mask tensor {n} has shape {:?} but the model's parameter has {:?} (a mask made for another model?)", t.dims(), v.shape);
        }
    }
    Ok(())
}

/// Errors unless every mask tensor names one of `shapes` (a model's parameters, as
/// [`crate::model::Config::param_shapes`] gives them) with the same shape.
pub fn check_against_shapes(mask: &Mask, shapes: &[(String, Vec<usize>)]) -> Result<()> {
    let layout: Vec<(String, Vec<usize>)> = mask
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    check_layout(&layout, shapes)
}

/// [`check_against_shapes`] on a mask's (name, shape) list.
pub fn check_layout(
    layout: &[(String, Vec<usize>)],
    shapes: &[(String, Vec<usize>)],
) -> Result<()> {
    let model: std::collections::HashMap<&str, &Vec<usize>> =
        shapes.iter().map(|(n, s)| (n.as_str(), s)).collect();
    for (n, dims) in layout {
        let Some(s) = model.get(n.as_str()) else {
            bail!(
                "mask tensor {n} is not a parameter of this model (a mask made for another model?)"
            );
        };
        if *s != dims {
            bail!("mask tensor {n} has shape {dims:?} but the model's parameter has {s:?} (a mask made for another model?)");
        }
    }
    Ok(())
}

/// A model's parameter names and shapes from its configuration alone (GGUF metadata or a
/// Hugging Face directory's config.json), without reading weights.
pub fn model_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let cfg = if path.is_dir() {
        crate::model::Config::from_hf_json(&path.join("config.json"))?
    } else if path.exists() {
        crate::model::gguf::GgufFile::open(path)?.config()?
    } else {
        bail!("{}: no such file or directory", path.display());
    };
    Ok(cfg.param_shapes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn saving_the_same_mask_twice_gives_identical_bytes() {
        let d = &Device::Cpu;
        let mut mask = Mask::new();
        for (i, name) in ["model.layers.1.mlp.up_proj.weight", "model.layers.0.q", "z"]
            .iter()
            .enumerate()
        {
            let v: Vec<u8> = (0..24).map(|j| ((j + i) % 3 == 0) as u8).collect();
            mask.insert(name.to_string(), Tensor::from_vec(v, (4, 6), d).unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        let how = serde_json::json!({"method": "test", "k": 0.5, "seed": 3});
        let bytes = |p: &Path| {
            (
                std::fs::read(p).unwrap(),
                std::fs::read(summary_path(p)).unwrap(),
            )
        };
        let first = dir.path().join("a.safetensors");
        save(&first, &mask, how.clone()).unwrap();
        let want = bytes(&first);
        // the metadata is a map of several keys: repeat so a random key order would show
        for i in 0..8 {
            let p = dir.path().join(format!("m{i}.safetensors"));
            save(&p, &mask, how.clone()).unwrap();
            assert_eq!(bytes(&p), want, "save {i} differs from the first");
        }
        save(&first, &mask, how).unwrap();
        assert_eq!(bytes(&first), want, "overwriting changed the bytes");
        // the header is the 8-byte length, then JSON padded to a multiple of 8
        let n = u64::from_le_bytes(want.0[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&want.0[8..8 + n]).unwrap();
        assert!(header.starts_with(r#"{"__metadata__":{"kind":"broca-mask","version":""#));
        let (_, meta) = read_safetensors(&first).unwrap();
        assert_eq!(meta["kind"], "broca-mask");
        let back = load(&first).unwrap();
        assert_eq!(
            back.keys().collect::<Vec<_>>(),
            mask.keys().collect::<Vec<_>>()
        );
        for (n, t) in &mask {
            assert_eq!(back[n].dims(), t.dims());
            assert_eq!(
                back[n].flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
            );
        }
        // only the two outputs per save, no temporary files left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2 * 9);
    }
}
