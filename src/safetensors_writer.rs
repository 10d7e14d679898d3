//! Writing safetensors files tensor by tensor: beyond the caller's data at most one tensor's
//! bytes are held at a time (none at all for [`Data::Stream`], whose producer writes the
//! bytes itself), the header is deterministic (metadata keys sorted; tensors in
//! the order `safetensors::serialize` uses: descending dtype alignment, then name), and the
//! file is written atomically (temporary file, synced, renamed into place).

use crate::io::atomic_write_with;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

/// Where a tensor's values come from.
pub enum Data<'a> {
    /// A candle tensor in its own type: U8 as U8, F64 as F64, anything else as F32.
    Tensor(Tensor),
    /// A candle tensor, always written as F32.
    TensorF32(Tensor),
    F32(&'a [f32]),
    F64(&'a [f64]),
    /// Values produced while the file is written, in any stored `dtype`: `write` is called
    /// once, at the tensor's place in the file, and must emit exactly the tensor's
    /// little-endian bytes (a different count is an error and nothing is written), so a
    /// producer that fills a small buffer at a time never holds the whole tensor.
    Stream {
        dtype: Dtype,
        write: StreamFn<'a>,
    },
}

/// The producer of a [`Data::Stream`] tensor.
pub type StreamFn<'a> = Box<dyn FnOnce(&mut dyn Write) -> Result<()> + 'a>;

/// One tensor to write.
pub struct Entry<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Data<'a>,
}

impl<'a> Entry<'a> {
    /// A candle tensor, stored in its own type (U8, F64, or F32 for anything else).
    pub fn tensor(name: impl Into<String>, t: Tensor) -> Entry<'a> {
        Entry {
            name: name.into(),
            shape: t.dims().to_vec(),
            data: Data::Tensor(t),
        }
    }

    /// A candle tensor, stored as F32.
    pub fn tensor_f32(name: impl Into<String>, t: Tensor) -> Entry<'a> {
        Entry {
            name: name.into(),
            shape: t.dims().to_vec(),
            data: Data::TensorF32(t),
        }
    }

    /// A tensor of `dtype` whose bytes `write` produces when the file is written.
    pub fn stream(
        name: impl Into<String>,
        shape: Vec<usize>,
        dtype: Dtype,
        write: impl FnOnce(&mut dyn Write) -> Result<()> + 'a,
    ) -> Entry<'a> {
        Entry {
            name: name.into(),
            shape,
            data: Data::Stream {
                dtype,
                write: Box::new(write),
            },
        }
    }

    /// The stored dtype.
    fn dtype(&self) -> Dtype {
        match &self.data {
            Data::Tensor(t) => match t.dtype() {
                DType::U8 => Dtype::U8,
                DType::F64 => Dtype::F64,
                _ => Dtype::F32,
            },
            Data::TensorF32(_) | Data::F32(_) => Dtype::F32,
            Data::F64(_) => Dtype::F64,
            Data::Stream { dtype, .. } => *dtype,
        }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes in the file.
    fn byte_len(&self) -> usize {
        self.numel() * self.dtype().bitsize() / 8
    }

    /// Writes the values (little endian).
    fn write_to(self, w: &mut impl Write) -> Result<()> {
        let len = self.byte_len();
        let data = match self.data {
            Data::Stream { write, .. } => {
                let mut counted = Counted { inner: w, bytes: 0 };
                write(&mut counted)?;
                if counted.bytes != len {
                    bail!(
                        "tensor {}: {} bytes written for shape {:?} ({len} expected)",
                        self.name,
                        counted.bytes,
                        self.shape
                    );
                }
                return Ok(());
            }
            data => data,
        };
        match &data {
            Data::F32(x) => write_le(w, x, |v| v.to_le_bytes()),
            Data::F64(x) => write_le(w, x, |v| v.to_le_bytes()),
            Data::Tensor(t) if t.dtype() == DType::U8 => {
                Ok(w.write_all(&t.flatten_all()?.to_vec1::<u8>()?)?)
            }
            Data::Tensor(t) if t.dtype() == DType::F64 => {
                write_le(w, &t.flatten_all()?.to_vec1::<f64>()?, |v| v.to_le_bytes())
            }
            Data::Tensor(t) | Data::TensorF32(t) => {
                let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                write_le(w, &v, |v| v.to_le_bytes())
            }
            Data::Stream { .. } => unreachable!("handled above"),
        }
    }
}

/// A writer that counts the bytes passing through it.
struct Counted<'w, W: Write> {
    inner: &'w mut W,
    bytes: usize,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `xs` as little-endian bytes through a small reused buffer.
fn write_le<T: Copy, const N: usize>(
    w: &mut impl Write,
    xs: &[T],
    le: impl Fn(T) -> [u8; N],
) -> Result<()> {
    let mut buf = Vec::with_capacity(N * 8192);
    for chunk in xs.chunks(8192) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|&x| le(x)));
        w.write_all(&buf)?;
    }
    Ok(())
}

/// The header (JSON padded with spaces to a multiple of 8 bytes) for `entries`, which must
/// already be in file order.
fn header(entries: &[Entry], metadata: Option<&BTreeMap<String, String>>) -> Result<Vec<u8>> {
    let mut parts = Vec::with_capacity(entries.len() + 1);
    if let Some(m) = metadata {
        parts.push(format!("\"__metadata__\":{}", serde_json::to_string(m)?));
    }
    let mut offset = 0;
    for e in entries {
        let info = TensorInfo {
            dtype: e.dtype(),
            shape: e.shape.clone(),
            data_offsets: (offset, offset + e.byte_len()),
        };
        offset += e.byte_len();
        parts.push(format!(
            "{}:{}",
            serde_json::to_string(&e.name)?,
            serde_json::to_string(&info)?
        ));
    }
    let mut h = format!("{{{}}}", parts.join(",")).into_bytes();
    h.resize(h.len().next_multiple_of(8), b' ');
    Ok(h)
}

/// Writes `entries` (any order; names must be unique) with string `metadata` to `path`.
pub fn write(
    path: &Path,
    mut entries: Vec<Entry>,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let mut seen = BTreeSet::new();
    for e in &entries {
        if !seen.insert(e.name.as_str()) {
            bail!("{}: tensor {} given twice", path.display(), e.name);
        }
        let len = match &e.data {
            Data::F32(x) => x.len(),
            Data::F64(x) => x.len(),
            Data::Tensor(t) | Data::TensorF32(t) => t.elem_count(),
            // checked while writing
            Data::Stream { .. } => e.numel(),
        };
        if len != e.numel() {
            bail!(
                "{}: tensor {} has {len} values for shape {:?}",
                path.display(),
                e.name,
                e.shape
            );
        }
    }
    entries.sort_by(|a, b| b.dtype().cmp(&a.dtype()).then(a.name.cmp(&b.name)));
    let header = header(&entries, metadata)?;
    atomic_write_with(path, |f| {
        let mut w = std::io::BufWriter::new(f);
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for e in entries {
            e.write_to(&mut w)?;
        }
        w.flush()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn entries() -> Vec<(String, Tensor)> {
        let d = &Device::Cpu;
        vec![
            (
                "b.weight".into(),
                Tensor::from_vec(vec![1.5f32, -2.0, 3.25, 0.0, 7.0, -0.5], (2, 3), d).unwrap(),
            ),
            (
                "a.mask".into(),
                Tensor::from_vec(vec![1u8, 0, 1, 1, 0], (5,), d).unwrap(),
            ),
            (
                "c.double".into(),
                Tensor::from_vec(vec![0.1f64, 1e300, -3.0], (3, 1), d).unwrap(),
            ),
            (
                "a.weight".into(),
                Tensor::from_vec(vec![9.0f32, 8.0, 7.0], (3,), d).unwrap(),
            ),
        ]
    }

    /// With at most one metadata key the library's own serializer is deterministic: the
    /// streamed file must match it byte for byte.
    #[test]
    fn matches_safetensors_serialize() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let es = entries();
        write(
            &path,
            es.iter()
                .map(|(n, t)| Entry::tensor(n.clone(), t.clone()))
                .collect(),
            Some(&meta),
        )
        .unwrap();
        let owned: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = es
            .iter()
            .map(|(n, t)| {
                let (b, d): (Vec<u8>, Dtype) = match t.dtype() {
                    DType::U8 => (t.to_vec1::<u8>().unwrap(), Dtype::U8),
                    DType::F64 => (
                        t.flatten_all()
                            .unwrap()
                            .to_vec1::<f64>()
                            .unwrap()
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                        Dtype::F64,
                    ),
                    _ => (
                        t.flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                        Dtype::F32,
                    ),
                };
                (n.clone(), b, t.dims().to_vec(), d)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = owned
            .iter()
            .map(|(n, b, s, d)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let want = safetensors::serialize(views, Some(meta.into_iter().collect())).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        let (back, m) = crate::io::read_safetensors(&path).unwrap();
        assert_eq!(m["format"], "pt");
        for (n, t) in &es {
            let b = &back[n];
            assert_eq!(b.dtype(), t.dtype(), "{n}");
            assert_eq!(b.dims(), t.dims(), "{n}");
            let diff = (b.to_dtype(DType::F64).unwrap() - t.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(diff, 0.0, "{n}");
        }
    }

    #[test]
    fn slices_and_f32_tensors_round_trip_and_bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("y.safetensors");
        let m = [1.0f32, 2.0, 3.0, 4.0];
        let v = [0.25f64, -1.0];
        let t = Tensor::from_vec(vec![0.5f64, 1.5], (2,), &Device::Cpu).unwrap();
        let es = vec![
            Entry {
                name: "m".into(),
                shape: vec![2, 2],
                data: Data::F32(&m),
            },
            Entry {
                name: "v".into(),
                shape: vec![2],
                data: Data::F64(&v),
            },
            Entry::tensor_f32("t", t),
        ];
        write(&path, es, None).unwrap();
        let (back, meta) = crate::io::read_safetensors(&path).unwrap();
        assert!(meta.is_empty());
        assert_eq!(
            back["m"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            m
        );
        assert_eq!(back["m"].dims(), [2, 2]);
        assert_eq!(back["v"].to_vec1::<f64>().unwrap(), v);
        assert_eq!(back["t"].dtype(), DType::F32);
        assert_eq!(back["t"].to_vec1::<f32>().unwrap(), [0.5, 1.5]);
        // wrong length and duplicate names: error, and the existing file is untouched
        let before = std::fs::read(&path).unwrap();
        let bad = vec![Entry {
            name: "m".into(),
            shape: vec![3],
            data: Data::F32(&m),
        }];
        assert!(write(&path, bad, None).is_err());
        let t = Tensor::zeros(2, DType::U8, &Device::Cpu).unwrap();
        let dup = vec![Entry::tensor("a", t.clone()), Entry::tensor("a", t)];
        assert!(write(&path, dup, None).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary file was left behind");
    }
}
