//! Where a parameter's values live: a dense candle `Var` (f32, trainable, perturbed in place)
//! or its checkpoint's own encoding (GGUF blocks, safetensors bf16/f16/f32) in a memory map,
//! decoded to f32 row by row right before a kernel uses it. Perturbations of mapped
//! parameters are sparse [`Overlay`]s applied to the decoded rows; the mapped bytes are never
//! written.

use anyhow::{bail, Result};
use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor, Var};
use memmap2::Mmap;
use rayon::prelude::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A read-only memory map of one checkpoint file.
pub struct MappedFile {
    pub path: PathBuf,
    pub map: Mmap,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &std::path::Path) -> Result<Arc<MappedFile>> {
        let f = std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot open: {e}", path.display()))?;
        // SAFETY: the file is opened read-only and only read through this map; a checkpoint
        // changed by another process while mapped is outside what Broca promises.
        let map = unsafe { Mmap::map(&f) }
            .map_err(|e| anyhow::anyhow!("{}: cannot map: {e}", path.display()))?;
        Ok(Arc::new(MappedFile {
            path: path.to_path_buf(),
            map,
        }))
    }
}

/// A 2-D tensor `[rows, cols]` (HF layout) stored in a mapped file in a GGML encoding
/// (safetensors bf16/f16/f32 count as GGML's BF16/F16/F32), one encoded row after another.
pub struct MappedTensor {
    pub file: Arc<MappedFile>,
    /// The tensor's name in the file (GGUF or HF), for messages.
    pub stored_name: String,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub dtype: GgmlDType,
    /// llama GGUF Q/K rows are stored permuted per head (see [`super::gguf::unpermute_rows`]);
    /// the head count to undo it while decoding.
    pub permuted_heads: Option<usize>,
    /// Whether a full decode already checked that every value is finite.
    checked: AtomicBool,
}

impl MappedTensor {
    /// Describes a tensor at byte `offset` of `file`; checks that its rows are whole blocks
    /// and that it lies inside the file.
    pub fn new(
        file: Arc<MappedFile>,
        stored_name: &str,
        offset: usize,
        shape: (usize, usize),
        dtype: GgmlDType,
        permuted_heads: Option<usize>,
    ) -> Result<MappedTensor> {
        let (rows, cols) = shape;
        let p = file.path.display();
        if !cols.is_multiple_of(dtype.block_size()) {
            bail!(
                "{p}: tensor {stored_name}: rows of {cols} values are not whole {dtype:?} blocks"
            );
        }
        let bytes = (cols / dtype.block_size())
            .checked_mul(dtype.type_size())
            .and_then(|r| r.checked_mul(rows))
            .and_then(|b| b.checked_add(offset));
        match bytes {
            Some(end) if end <= file.map.len() => {}
            _ => bail!(
                "{p}: truncated file: tensor {stored_name} needs bytes up to {} but the file has {}",
                bytes.map_or("beyond 2^64".to_string(), |e| e.to_string()),
                file.map.len()
            ),
        }
        if let Some(h) = permuted_heads {
            if h == 0 || !rows.is_multiple_of(2 * h) {
                bail!("{p}: tensor {stored_name}: {rows} rows do not split into {h} heads");
            }
        }
        Ok(MappedTensor {
            file,
            stored_name: stored_name.to_string(),
            offset,
            rows,
            cols,
            dtype,
            permuted_heads,
            checked: AtomicBool::new(false),
        })
    }

    /// Encoded bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// Bytes of the whole tensor in the file.
    pub fn bytes(&self) -> usize {
        self.row_bytes() * self.rows
    }

    /// The stored row holding HF row `r` (llama's Q/K permutation undone).
    fn stored_row(&self, r: usize) -> usize {
        match self.permuted_heads {
            None => r,
            Some(h) => {
                let hd = self.rows / h;
                let (head, rem) = (r / hd, r % hd);
                let (j, i) = (rem / (hd / 2), rem % (hd / 2));
                head * hd + 2 * i + j
            }
        }
    }

    /// Decodes HF row `r` into `out` (`cols` values).
    fn decode_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let start = self.offset + self.stored_row(r) * rb;
        decode(self.dtype, &self.file.map[start..start + rb], out);
    }

    /// Decodes rows `rows` (HF order) into `out` (`rows.len() · cols` values), in parallel.
    pub fn decode_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let c = self.cols;
        let per_task = (1 << 16) / c.max(1) + 1;
        out.par_chunks_mut(c * per_task)
            .enumerate()
            .for_each(|(k, chunk)| {
                for (j, row) in chunk.chunks_mut(c).enumerate() {
                    self.decode_row(rows.start + k * per_task + j, row);
                }
            });
    }

    /// Decodes the listed rows (HF indices, each < rows) into `out`.
    pub fn decode_row_list(&self, rows: &[u32], out: &mut [f32]) {
        let c = self.cols;
        out.par_chunks_mut(c)
            .zip(rows.par_iter())
            .for_each(|(row, &r)| self.decode_row(r as usize, row));
    }

    /// Whether every value was already found finite.
    pub fn is_checked(&self) -> bool {
        self.checked.load(Ordering::Relaxed)
    }

    /// Records that a full decode found every value finite.
    pub fn mark_checked(&self) {
        self.checked.store(true, Ordering::Relaxed)
    }

    /// Lets the kernel drop this tensor's mapped pages from the process (they are read
    /// again from the page cache or the disk on the next use).
    pub fn release_pages(&self) {
        #[cfg(target_os = "linux")]
        {
            let base = self.file.map.as_ptr() as usize;
            let page = 4096;
            let start = (base + self.offset).next_multiple_of(page);
            let end = (base + self.offset + self.bytes()) / page * page;
            if end > start {
                extern "C" {
                    fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
                }
                const MADV_DONTNEED: i32 = 4;
                // SAFETY: [start, end) lies inside a read-only shared file mapping this
                // process owns; dropping its pages never changes what a later read sees.
                unsafe { madvise(start as *mut std::ffi::c_void, end - start, MADV_DONTNEED) };
            }
        }
    }
}

/// Decodes one encoded row `bytes` into `out`.
fn decode(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    use k_quants::*;
    match dtype {
        GgmlDType::F32 => decode_as::<f32>(bytes, out),
        GgmlDType::F16 => decode_as::<half::f16>(bytes, out),
        GgmlDType::BF16 => decode_as::<half::bf16>(bytes, out),
        GgmlDType::Q4_0 => decode_as::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => decode_as::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => decode_as::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => decode_as::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => decode_as::<BlockQ8_0>(bytes, out),
        GgmlDType::Q8_1 => decode_as::<BlockQ8_1>(bytes, out),
        GgmlDType::Q2K => decode_as::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => decode_as::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => decode_as::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => decode_as::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => decode_as::<BlockQ6K>(bytes, out),
        GgmlDType::Q8K => decode_as::<BlockQ8K>(bytes, out),
    }
}

/// Reads `bytes` as blocks of `T` (in place when aligned, else through an aligned copy).
fn decode_as<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let size = std::mem::size_of::<T>();
    let n = bytes.len() / size;
    if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        // SAFETY: the pointer is aligned for T, the slice holds n·size_of::<T>() bytes, and
        // every GGML block type is plain old data (any bit pattern is a valid value).
        let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n) };
        T::to_float(blocks, out);
    } else {
        let mut blocks: Vec<T> = Vec::with_capacity(n);
        // SAFETY: as above; the destination is a fresh allocation of n blocks.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                blocks.as_mut_ptr().cast::<u8>(),
                n * size,
            );
            blocks.set_len(n);
        }
        T::to_float(&blocks, out);
    }
}

/// Sparse replacement values for a mapped parameter: sorted, distinct flat indices.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overlay {
    pub idx: Vec<usize>,
    pub vals: Vec<f32>,
}

impl Overlay {
    /// This overlay with `idx` set to `vals` (later values win).
    pub fn with(&self, idx: &[usize], vals: &[f64]) -> Overlay {
        let mut m: std::collections::BTreeMap<usize, f32> = self
            .idx
            .iter()
            .copied()
            .zip(self.vals.iter().copied())
            .collect();
        for (&i, &v) in idx.iter().zip(vals) {
            m.insert(i, v as f32);
        }
        Overlay {
            idx: m.keys().copied().collect(),
            vals: m.values().copied().collect(),
        }
    }

    /// Writes the entries that fall in flat range `[start, start + out.len())` into `out`.
    pub fn apply_range(&self, start: usize, out: &mut [f32]) {
        let lo = self.idx.partition_point(|&i| i < start);
        let hi = self.idx.partition_point(|&i| i < start + out.len());
        for k in lo..hi {
            out[self.idx[k] - start] = self.vals[k];
        }
    }
}

/// Where one parameter's values live.
pub enum Weight {
    /// In memory as a candle variable (f32 or f64).
    Dense(Var),
    /// Encoded in a mapped checkpoint, decoded per use.
    Mapped(MappedTensor),
}

/// One named parameter (HF name, HF shape).
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub weight: Weight,
}

impl Param {
    /// The dense variable, or an error naming the parameter when it is memory-mapped.
    pub fn var(&self) -> Result<&Var> {
        match &self.weight {
            Weight::Dense(v) => Ok(v),
            Weight::Mapped(_) => bail!(
                "{}: held in the checkpoint's encoding (memory-mapped), not as a trainable tensor",
                self.name
            ),
        }
    }

    /// Number of values.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// The mapped tensor, when this parameter is memory-mapped.
    pub fn mapped(&self) -> Option<&MappedTensor> {
        match &self.weight {
            Weight::Mapped(m) => Some(m),
            Weight::Dense(_) => None,
        }
    }
}

/// Decodes a whole mapped tensor to an f32 CPU tensor, `overlay` applied; the first full
/// decode of a tensor checks that every value is finite.
pub fn decode_tensor(name: &str, m: &MappedTensor, overlay: Option<&Overlay>) -> Result<Tensor> {
    let mut v = vec![0f32; m.rows * m.cols];
    m.decode_rows(0..m.rows, &mut v);
    if !m.is_checked() {
        check_finite(name, m, &v, 0)?;
        m.mark_checked();
    }
    if let Some(o) = overlay {
        o.apply_range(0, &mut v);
    }
    Ok(Tensor::from_vec(v, (m.rows, m.cols), &Device::Cpu)?)
}

/// Fails naming the file, tensor and entry of the first non-finite value of `rows` decoded
/// rows starting at row `first_row`.
pub fn check_finite(name: &str, m: &MappedTensor, v: &[f32], first_row: usize) -> Result<()> {
    // a branch-free scan per chunk (vectorizes); the position only once one is found
    let bad = |c: &[f32]| c.iter().fold(false, |acc, x| acc | !x.is_finite());
    if !v.par_chunks(1 << 16).any(bad) {
        return Ok(());
    }
    if let Some(k) = v.iter().position(|x| !x.is_finite()) {
        bail!(
            "{}: tensor {} ({name}) has a non-finite value ({}) at [{}, {}]",
            m.file.path.display(),
            m.stored_name,
            v[k],
            first_row + k / m.cols,
            k % m.cols
        );
    }
    Ok(())
}
