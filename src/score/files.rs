//! Safetensors files of per-parameter f64/f32 values, written one tensor at a time (so a
//! 134M-parameter sum never needs a second full copy in memory) and read back through a
//! memory map. Writes are atomic: a temporary file beside the target, fsync, rename.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// How values are stored on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    F32,
    F64,
    BF16,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::F32 => "F32",
            Store::F64 => "F64",
            Store::BF16 => "BF16",
        }
    }

    fn size(self) -> usize {
        match self {
            Store::F32 => 4,
            Store::F64 => 8,
            Store::BF16 => 2,
        }
    }

    /// Parses `--dtype` of score files: `f32` or `bf16`.
    pub fn parse_score_dtype(s: &str) -> Result<Store> {
        match s {
            "f32" => Ok(Store::F32),
            "bf16" => Ok(Store::BF16),
            _ => bail!("--dtype: '{s}' is not f32 or bf16"),
        }
    }

    /// The `dtype` metadata value: `f32`, `f64` or `bf16`.
    pub fn meta_name(self) -> &'static str {
        match self {
            Store::F32 => "f32",
            Store::F64 => "f64",
            Store::BF16 => "bf16",
        }
    }

    /// Appends `xs` encoded little-endian to `buf`.
    fn encode(self, xs: &[f64], buf: &mut Vec<u8>) {
        match self {
            Store::F64 => xs
                .iter()
                .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
            Store::F32 => xs
                .iter()
                .for_each(|x| buf.extend_from_slice(&(*x as f32).to_le_bytes())),
            Store::BF16 => xs
                .iter()
                .for_each(|x| buf.extend_from_slice(&half::bf16::from_f64(*x).to_le_bytes())),
        }
    }
}

/// The header of a file holding `entries` as `store` (JSON padded to 8 bytes) and each
/// tensor's byte offset in the data section.
fn header(
    entries: &[(String, Vec<usize>)],
    store: Store,
    meta: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<usize>, usize)> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(meta)?);
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(entries.len());
    for (name, shape) in entries {
        let bytes = shape.iter().product::<usize>() * store.size();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": store.name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offsets.push(offset);
        offset += bytes;
    }
    let mut head = serde_json::to_string(&header)?.into_bytes();
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    Ok((head, offsets, offset))
}

/// Writes `v` (the values of tensor `name` of `shape`) encoded as `store` through `w`.
fn write_values(
    w: &mut impl Write,
    name: &str,
    shape: &[usize],
    v: &[f64],
    store: Store,
) -> Result<()> {
    if v.len() != shape.iter().product::<usize>() {
        bail!("tensor {name}: {} values for shape {shape:?}", v.len());
    }
    let mut buf = Vec::with_capacity(8 << 13);
    for part in v.chunks(1 << 13) {
        buf.clear();
        store.encode(part, &mut buf);
        w.write_all(&buf)?;
    }
    Ok(())
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
    let (head, _, _) = header(entries, store, meta)?;
    crate::io::atomic_write_with(path, |file| {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for (i, (tname, shape)) in entries.iter().enumerate() {
            write_values(&mut w, tname, shape, &values(i)?, store)?;
        }
        w.flush()?;
        Ok(())
    })
}

/// A result file filled in several passes: created at a temporary path with its whole
/// header and size, each pass writing its tensors at their offsets; renamed into place once
/// complete. Reopening the same temporary file with the same header resumes it.
pub struct ResultFile {
    tmp: PathBuf,
    file: std::fs::File,
    data_start: u64,
    offsets: Vec<usize>,
    entries: Vec<(String, Vec<usize>)>,
    store: Store,
    /// SHA-256 of the header: what a pass record must name to count.
    pub header_sha: String,
    /// The file was created by this open (no earlier pass is in it).
    pub fresh: bool,
    /// An earlier file was there but unusable (another header or size) and was replaced.
    pub replaced: bool,
}

impl ResultFile {
    /// Opens `tmp` when it holds exactly this header, else creates it afresh.
    pub fn open(
        tmp: &Path,
        entries: &[(String, Vec<usize>)],
        store: Store,
        meta: &BTreeMap<String, String>,
    ) -> Result<ResultFile> {
        use sha2::{Digest, Sha256};
        let (head, offsets, total) = header(entries, store, meta)?;
        let header_sha = hex::encode(Sha256::digest(&head));
        let data_start = 8 + head.len() as u64;
        if let Some(parent) = tmp.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("{}: cannot create directory", parent.display()))?;
        }
        let existed = tmp.exists();
        let same = std::fs::metadata(tmp).is_ok_and(|m| m.len() == data_start + total as u64) && {
            let mut buf = vec![0u8; data_start as usize];
            std::fs::File::open(tmp)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
                .is_ok()
                && buf[8..] == head[..]
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!same)
            .open(tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        if !same {
            let mut w = &file;
            w.write_all(&(head.len() as u64).to_le_bytes())?;
            w.write_all(&head)?;
            file.set_len(data_start + total as u64)?;
        }
        Ok(ResultFile {
            tmp: tmp.to_path_buf(),
            file,
            data_start,
            offsets,
            entries: entries.to_vec(),
            store,
            header_sha,
            fresh: !same,
            replaced: existed && !same,
        })
    }

    /// The temporary path being filled.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Writes tensor `i`'s values at its offset.
    pub fn write_tensor(&mut self, i: usize, v: &[f64]) -> Result<()> {
        use std::io::{Seek, SeekFrom};
        let (name, shape) = &self.entries[i];
        self.file
            .seek(SeekFrom::Start(self.data_start + self.offsets[i] as u64))?;
        let mut w = BufWriter::with_capacity(1 << 20, &self.file);
        write_values(&mut w, name, shape, v, self.store)
            .with_context(|| format!("{}: cannot write", self.tmp.display()))?;
        w.flush()?;
        Ok(())
    }

    /// Flushes what was written to the disk.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("{}: cannot sync", self.tmp.display()))
    }

    /// Syncs and renames the complete file to `path`.
    pub fn finish(self, path: &Path) -> Result<()> {
        self.sync()?;
        std::fs::rename(&self.tmp, path)
            .with_context(|| format!("{}: cannot write", path.display()))
    }
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
            "BF16" => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            d => bail!(
                "{}: tensor {name} has dtype {d}, expected F64, F32 or BF16",
                self.path.display()
            ),
        })
    }
}
