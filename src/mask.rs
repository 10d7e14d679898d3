//! Region masks. On disk: one U8 0/1 tensor per covered parameter, in the parameter's exact
//! shape, keyed by its HF name, as safetensors with a JSON summary beside it
//! (`FILE.safetensors` + `FILE.json`). In memory: the sorted flat indices of the selected
//! entries ([`MaskTensor`]), so a region costs memory in proportion to its size, not to the
//! model's. Every mask is read by [`load`], which checks it the same way for every command
//! (U8, only 0 and 1, sizes that match the header); a mask matches a model when its names
//! and shapes do.

use crate::io::write_json;
use crate::model::Model;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One parameter's part of a region: its shape and the sorted, distinct flat indices of the
/// selected entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskTensor {
    pub shape: Vec<usize>,
    idx: Vec<u32>,
}

/// A region: HF parameter name → the selected entries of that parameter.
pub type Mask = BTreeMap<String, MaskTensor>;

impl MaskTensor {
    /// The entries whose byte in `bits` (row-major, `shape`) is 1; any value other than 0
    /// and 1 is an error naming tensor `name`, the value and its place.
    pub fn from_bits(name: &str, shape: &[usize], bits: &[u8]) -> Result<MaskTensor> {
        let numel: usize = shape.iter().product();
        if bits.len() != numel {
            bail!(
                "mask tensor {name} has {} values for shape {shape:?}",
                bits.len()
            );
        }
        check_numel(name, numel)?;
        if let Some(i) = bits.iter().position(|&b| b > 1) {
            bail!(
                "mask tensor {name} holds the value {} at flat index {i}; a mask holds only 0 and 1",
                bits[i]
            );
        }
        let idx = bits
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == 1)
            .map(|(i, _)| i as u32)
            .collect();
        Ok(MaskTensor {
            shape: shape.to_vec(),
            idx,
        })
    }

    /// The given flat indices (any order, repeats allowed) of a parameter of `shape`.
    pub fn from_indices(
        name: &str,
        shape: &[usize],
        idx: impl IntoIterator<Item = usize>,
    ) -> Result<MaskTensor> {
        let numel: usize = shape.iter().product();
        check_numel(name, numel)?;
        let mut v = Vec::new();
        for i in idx {
            if i >= numel {
                bail!("{name}: entry {i} out of range ({numel} entries)");
            }
            v.push(i as u32);
        }
        v.sort_unstable();
        v.dedup();
        Ok(MaskTensor {
            shape: shape.to_vec(),
            idx: v,
        })
    }

    /// Number of entries of the parameter.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of selected entries.
    pub fn count(&self) -> usize {
        self.idx.len()
    }

    /// The selected flat indices, ascending.
    pub fn indices(&self) -> Vec<usize> {
        self.idx.iter().map(|&i| i as usize).collect()
    }

    /// The selected flat indices, ascending, as stored.
    pub fn indices_u32(&self) -> &[u32] {
        &self.idx
    }

    /// The mask as 0/1 bytes in the parameter's shape (row-major).
    pub fn to_bits(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.numel()];
        for &i in &self.idx {
            b[i as usize] = 1;
        }
        b
    }

    /// Number of entries selected both here and in `other`.
    pub fn intersection_count(&self, other: &MaskTensor) -> usize {
        let (mut i, mut j, mut n) = (0, 0, 0);
        while i < self.idx.len() && j < other.idx.len() {
            match self.idx[i].cmp(&other.idx[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    n += 1;
                    i += 1;
                    j += 1;
                }
            }
        }
        n
    }

    /// The entries selected here and not in `other`.
    pub fn minus(&self, other: &MaskTensor) -> MaskTensor {
        let mut j = 0;
        let idx = self
            .idx
            .iter()
            .copied()
            .filter(|&x| {
                while j < other.idx.len() && other.idx[j] < x {
                    j += 1;
                }
                !(j < other.idx.len() && other.idx[j] == x)
            })
            .collect();
        MaskTensor {
            shape: self.shape.clone(),
            idx,
        }
    }

    /// The entries selected here or in `other` (same shape).
    pub fn union(&self, other: &MaskTensor) -> MaskTensor {
        let mut idx = Vec::with_capacity(self.idx.len() + other.idx.len());
        let (mut a, mut b) = (self.idx.iter().peekable(), other.idx.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x == y => {
                    a.next();
                    b.next();
                    x
                }
                (Some(&&x), Some(&&y)) if x < y => {
                    a.next();
                    x
                }
                (Some(_), Some(&&y)) => {
                    b.next();
                    y
                }
                (Some(&&x), None) => {
                    a.next();
                    x
                }
                (None, Some(&&y)) => {
                    b.next();
                    y
                }
                (None, None) => break,
            };
            idx.push(next);
        }
        MaskTensor {
            shape: self.shape.clone(),
            idx,
        }
    }
}

/// Flat indices are stored as u32: a tensor of more entries cannot be a mask.
fn check_numel(name: &str, numel: usize) -> Result<()> {
    if numel > u32::MAX as usize {
        bail!(
            "mask tensor {name} has {numel} entries; at most {} are supported",
            u32::MAX
        );
    }
    Ok(())
}

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

/// Writes a mask (atomically, tensor by tensor: at most one tensor's bytes at a time) and
/// its summary JSON beside it. The summary gets per-tensor counts, numel and fractions,
/// totals, plus the caller's `how` object (how it was made). Saving the same mask twice
/// gives byte-identical files.
pub fn save(path: &Path, mask: &Mask, how: serde_json::Value) -> Result<()> {
    use crate::safetensors_writer::{write, Entry};
    let entries = mask
        .iter()
        .map(|(n, t)| {
            Entry::stream(
                n.clone(),
                t.shape.clone(),
                safetensors::Dtype::U8,
                move |w| Ok(w.write_all(&t.to_bits())?),
            )
        })
        .collect();
    let meta = BTreeMap::from([
        ("kind".to_string(), "broca-mask".to_string()),
        ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ]);
    write(path, entries, Some(&meta))?;
    write_json(&summary_path(path), &summary(mask, how))
}

/// Per-tensor and total counts of a mask.
pub fn summary(mask: &Mask, how: serde_json::Value) -> serde_json::Value {
    let mut per = Vec::new();
    let (mut total, mut numel) = (0u64, 0u64);
    for (n, t) in mask {
        let c = t.count() as u64;
        let e = t.numel() as u64;
        total += c;
        numel += e;
        per.push(serde_json::json!({"name": n, "count": c, "numel": e, "fraction": c as f64 / e.max(1) as f64}));
    }
    serde_json::json!({
        "tensors": per,
        "total": {"count": total, "numel": numel, "fraction": total as f64 / numel.max(1) as f64},
        "how": how,
    })
}

/// Reads a mask file (any model): memory-mapped and converted tensor by tensor, so only
/// the selected indices stay in memory. Every tensor must be U8 holding only 0 and 1.
pub fn load(path: &Path) -> Result<Mask> {
    load_inner(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn load_inner(path: &Path) -> Result<Mask> {
    let f = std::fs::File::open(path).map_err(|e| {
        if path.exists() {
            anyhow::anyhow!("cannot open ({e})")
        } else {
            anyhow::anyhow!("no such file")
        }
    })?;
    // SAFETY: the file is only read; Broca writes masks atomically (rename), never in place.
    let map = unsafe { memmap2::Mmap::map(&f) }.context("cannot map")?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file: {e}"))?;
    let mut out = Mask::new();
    for (n, v) in st.tensors() {
        if v.dtype() != safetensors::Dtype::U8 {
            bail!("tensor {n} is {:?}, a mask must be U8", v.dtype());
        }
        out.insert(n.clone(), MaskTensor::from_bits(&n, v.shape(), v.data())?);
    }
    if out.is_empty() {
        bail!("mask has no tensors");
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
        if v.shape != t.shape {
            bail!("mask tensor {n} has shape {:?} but the model's parameter has {:?} (a mask made for another model?)", t.shape, v.shape);
        }
    }
    Ok(())
}

/// Errors unless every mask tensor names one of `shapes` (a model's parameters, as
/// [`crate::model::Config::param_shapes`] gives them) with the same shape.
pub fn check_against_shapes(mask: &Mask, shapes: &[(String, Vec<usize>)]) -> Result<()> {
    let layout: Vec<(String, Vec<usize>)> = mask
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone()))
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
    use crate::io::read_safetensors;

    #[test]
    fn saving_the_same_mask_twice_gives_identical_bytes() {
        let mut mask = Mask::new();
        for (i, name) in ["model.layers.1.mlp.up_proj.weight", "model.layers.0.q", "z"]
            .iter()
            .enumerate()
        {
            let v: Vec<u8> = (0..24).map(|j| ((j + i) % 3 == 0) as u8).collect();
            mask.insert(
                name.to_string(),
                MaskTensor::from_bits(name, &[4, 6], &v).unwrap(),
            );
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
        assert_eq!(back, mask);
        let (raw, _) = read_safetensors(&first).unwrap();
        for (n, t) in &mask {
            assert_eq!(raw[n].dims(), t.shape.as_slice());
            assert_eq!(
                raw[n].flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                t.to_bits()
            );
        }
        // only the two outputs per save, no temporary files left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2 * 9);
    }

    #[test]
    fn indices_union_and_bits_agree() {
        let a = MaskTensor::from_indices("a", &[3, 4], [7, 1, 7, 11]).unwrap();
        assert_eq!(a.indices(), vec![1, 7, 11]);
        assert_eq!(a.count(), 3);
        let b = MaskTensor::from_bits("b", &[3, 4], &a.to_bits()).unwrap();
        assert_eq!(a, b);
        let c = MaskTensor::from_indices("c", &[3, 4], [0, 7, 9]).unwrap();
        assert_eq!(a.union(&c).indices(), vec![0, 1, 7, 9, 11]);
        assert_eq!(a.minus(&c).indices(), vec![1, 11]);
        assert_eq!(c.minus(&a).indices(), vec![0, 9]);
        assert_eq!(a.intersection_count(&c), 1);
        assert!(MaskTensor::from_indices("d", &[3, 4], [12]).is_err());
        let e = MaskTensor::from_bits("e", &[2], &[1, 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("value 2 at flat index 1"), "{e}");
    }
}
