//! Safetensors files of per-parameter f64/f32 values, written one tensor at a time (so a
//! 134M-parameter sum never needs a second full copy in memory) and read back through a
//! memory map. Writes are atomic: a temporary file beside the target, fsync, rename.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::Path;

/// How values are stored on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    F32,
    F64,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::F32 => "F32",
            Store::F64 => "F64",
        }
    }
    fn size(self) -> usize {
        match self {
            Store::F32 => 4,
            Store::F64 => 8,
        }
    }
}

/// Writes tensors `(name, shape)` whose values `values(i)` yields one at a time (in f64,
/// stored as `store`), with string metadata, atomically.
pub fn write(
    path: &Path,
    entries: &[(String, Vec<usize>)],
    store: Store,
    meta: &BTreeMap<String, String>,
    mut values: impl FnMut(usize) -> Result<Vec<f64>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(meta)?);
    let mut offset = 0usize;
    for (name, shape) in entries {
        let bytes = shape.iter().product::<usize>() * store.size();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": store.name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_string(&header)?.into_bytes();
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    crate::io::atomic_write_with(path, |file| {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for (i, (tname, shape)) in entries.iter().enumerate() {
            let v = values(i)?;
            if v.len() != shape.iter().product::<usize>() {
                bail!("tensor {tname}: {} values for shape {shape:?}", v.len());
            }
            let mut buf = Vec::with_capacity(8 << 13);
            for part in v.chunks(1 << 13) {
                buf.clear();
                match store {
                    Store::F64 => part
                        .iter()
                        .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                    Store::F32 => part
                        .iter()
                        .for_each(|x| buf.extend_from_slice(&(*x as f32).to_le_bytes())),
                }
                w.write_all(&buf)?;
            }
        }
        w.flush()?;
        Ok(())
    })
}

/// A stored tensor: dtype name, shape, byte range in the data section.
struct Stored {
    dtype: String,
    shape: Vec<usize>,
    range: (usize, usize),
}

/// A safetensors file opened through a memory map.
pub struct Mapped {
    map: memmap2::Mmap,
    header_len: usize,
    tensors: HashMap<String, Stored>,
    /// Tensor names in file (data offset) order.
    pub names: Vec<String>,
    pub meta: HashMap<String, String>,
    path: std::path::PathBuf,
}

impl Mapped {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<Mapped> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the files are written once (renamed into place) and never modified in place.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        let (header_len, md) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
            anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display())
        })?;
        let tensors: HashMap<_, _> = md
            .tensors()
            .into_iter()
            .map(|(n, info)| {
                let dtype = format!("{:?}", info.dtype);
                (
                    n,
                    Stored {
                        dtype,
                        shape: info.shape.clone(),
                        range: info.data_offsets,
                    },
                )
            })
            .collect();
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort_by_key(|n| tensors[n].range);
        Ok(Mapped {
            map,
            header_len,
            tensors,
            names,
            meta: md.metadata().clone().unwrap_or_default(),
            path: path.to_path_buf(),
        })
    }

    /// A metadata value, or an error naming the file.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.meta
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("{}: metadata has no '{key}'", self.path.display()))
    }

    /// Shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Tensor `name` as f64 (stored as F64 or F32).
    pub fn f64s(&self, name: &str) -> Result<Vec<f64>> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: no tensor {name}", self.path.display()))?;
        let (dtype, (s, e)) = (&t.dtype, t.range);
        let data = &self.map[8 + self.header_len + s..8 + self.header_len + e];
        Ok(match dtype.as_str() {
            "F64" => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            "F32" => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            d => bail!(
                "{}: tensor {name} has dtype {d}, expected F64 or F32",
                self.path.display()
            ),
        })
    }
}
