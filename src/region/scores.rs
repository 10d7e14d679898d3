//! Reading score files (`DIR/<lang>.safetensors`: f32 tensors keyed by HF name in parameter
//! shape, metadata `lang`). Files are memory-mapped and read tensor by tensor, so summing
//! several languages holds only the running sum.

use super::{Dense, Scores};
use crate::mask::{is_covered, Coverage};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::path::Path;

/// Tensor names (sorted) with their shapes.
pub type Layout = Vec<(String, Vec<usize>)>;

/// A memory-mapped score file.
struct Mapped {
    map: memmap2::Mmap,
    lang: String,
}

fn open(path: &Path) -> Result<Mapped> {
    let f = std::fs::File::open(path).with_context(|| {
        if path.exists() {
            format!("{}: cannot open", path.display())
        } else {
            format!("{}: no such file", path.display())
        }
    })?;
    // SAFETY: the file is only read; score files are written atomically (rename), never in place.
    let map = unsafe { memmap2::Mmap::map(&f) }
        .with_context(|| format!("{}: cannot map", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let lang = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lang").cloned())
        .unwrap_or(stem);
    Ok(Mapped { map, lang })
}

/// Score files opened (memory-mapped) for reading one tensor's Σ|score| at a time: what
/// the bottom/top controls of a region need, in memory proportional to one tensor.
pub struct ScoreFiles {
    files: Vec<(std::path::PathBuf, Mapped)>,
}

impl ScoreFiles {
    /// Opens `paths` (at least one).
    pub fn open(paths: &[impl AsRef<Path>]) -> Result<ScoreFiles> {
        if paths.is_empty() {
            bail!("--controls bottom/top need the --scores files the region was made from");
        }
        let files = paths
            .iter()
            .map(|p| Ok((p.as_ref().to_path_buf(), open(p.as_ref())?)))
            .collect::<Result<_>>()?;
        Ok(ScoreFiles { files })
    }

    /// The language of each file, in order; an error when one is given twice.
    pub fn langs(&self) -> Result<Vec<String>> {
        let mut langs: Vec<String> = Vec::new();
        for (p, m) in &self.files {
            if langs.contains(&m.lang) {
                bail!("{}: language '{}' given twice", p.display(), m.lang);
            }
            langs.push(m.lang.clone());
        }
        Ok(langs)
    }

    /// The covered tensors (name order) and their shapes, which every file must hold alike.
    pub fn layout(&self, cov: Coverage) -> Result<Layout> {
        let mut first: Option<(&std::path::PathBuf, Layout)> = None;
        for (path, m) in &self.files {
            let st = safetensors::SafeTensors::deserialize(&m.map).map_err(|e| {
                anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display())
            })?;
            let mut l: Vec<(String, Vec<usize>)> = st
                .tensors()
                .into_iter()
                .filter(|(n, _)| is_covered(n, cov))
                .map(|(n, v)| (n, v.shape().to_vec()))
                .collect();
            l.sort();
            match &first {
                None if l.is_empty() => bail!(
                    "{}: no tensors covered by this region's coverage",
                    path.display()
                ),
                None => first = Some((path, l)),
                Some((fp, fl)) if *fl != l => bail!(
                    "{}: its tensors or shapes differ from {} (score files of different models?)",
                    path.display(),
                    fp.display()
                ),
                Some(_) => {}
            }
        }
        Ok(first.map(|f| f.1).unwrap_or_default())
    }

    /// |score| of tensor `name` in file `i` (flattened, f32).
    pub fn abs_one(&self, i: usize, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let mut acc = vec![0f32; shape.iter().product()];
        Self::add_abs(&self.files[i], name, shape, &mut acc)?;
        Ok(acc)
    }

    /// Σ over the files, in order, of |score| of tensor `name` (flattened, f32), which
    /// must have `shape` in every file.
    pub fn abs_sum(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let mut acc = vec![0f32; shape.iter().product()];
        for f in &self.files {
            Self::add_abs(f, name, shape, &mut acc)?;
        }
        Ok(acc)
    }

    /// Adds |score| of tensor `name` of one file to `acc`.
    fn add_abs(
        (path, m): &(std::path::PathBuf, Mapped),
        name: &str,
        shape: &[usize],
        acc: &mut [f32],
    ) -> Result<()> {
        let st = safetensors::SafeTensors::deserialize(&m.map).map_err(|e| {
            anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display())
        })?;
        let v = st
            .tensor(name)
            .map_err(|_| anyhow::anyhow!("{}: no score tensor {name}", path.display()))?;
        if v.shape() != shape {
            bail!(
                "{}: score tensor {name} has shape {:?}, the region has {shape:?}",
                path.display(),
                v.shape()
            );
        }
        let mut add = |i: usize, x: f32| -> Result<()> {
            if !x.is_finite() {
                bail!(
                    "{}: tensor {name} has a non-finite score at flat index {i}",
                    path.display()
                );
            }
            acc[i] += x.abs();
            Ok(())
        };
        match v.dtype() {
            safetensors::Dtype::F32 => {
                for (i, b) in v.data().chunks_exact(4).enumerate() {
                    add(i, f32::from_le_bytes([b[0], b[1], b[2], b[3]]))?;
                }
            }
            safetensors::Dtype::BF16 => {
                for (i, b) in v.data().chunks_exact(2).enumerate() {
                    add(i, half::bf16::from_le_bytes([b[0], b[1]]).to_f32())?;
                }
            }
            d => bail!(
                "{}: tensor {name} is {d:?}, scores must be F32 or BF16",
                path.display()
            ),
        }
        Ok(())
    }
}

/// The language a score file names (metadata `lang`, else the file stem).
pub fn lang_of(path: &Path) -> Result<String> {
    Ok(open(path)?.lang)
}

/// Calls `f(name, shape, |values|)` for every covered tensor of a score file, in parallel.
fn for_each_abs(
    path: &Path,
    cov: Coverage,
    f: impl Fn(&str, &[usize], Vec<f32>) -> Result<()> + Sync,
) -> Result<String> {
    let m = open(path)?;
    let st = safetensors::SafeTensors::deserialize(&m.map)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let views: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| is_covered(n, cov))
        .collect();
    if views.is_empty() {
        bail!(
            "{}: no tensors covered by this region's coverage",
            path.display()
        );
    }
    views.par_iter().try_for_each(|(name, v)| {
        let vals: Vec<f32> = match v.dtype() {
            safetensors::Dtype::F32 => v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).abs())
                .collect(),
            safetensors::Dtype::BF16 => v
                .data()
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32().abs())
                .collect(),
            d => bail!(
                "{}: tensor {name} is {d:?}, scores must be F32 or BF16",
                path.display()
            ),
        };
        if let Some(i) = vals.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor {name} has a non-finite score at flat index {i}",
                path.display()
            );
        }
        f(name, v.shape(), vals)
    })?;
    Ok(m.lang)
}

/// The covered |scores| of one file and the language it names.
pub fn read_abs(path: &Path, cov: Coverage) -> Result<(String, Scores)> {
    let out = std::sync::Mutex::new(Scores::new());
    let lang = for_each_abs(path, cov, |n, s, data| {
        out.lock().unwrap().insert(
            n.to_string(),
            Dense {
                shape: s.to_vec(),
                data,
            },
        );
        Ok(())
    })?;
    Ok((lang, out.into_inner().unwrap()))
}

/// Σ over files of |score|, covered tensors only, with each file's language. Every file must
/// hold the same covered tensor names and shapes; languages must differ.
pub fn sum_abs(paths: &[impl AsRef<Path>], cov: Coverage) -> Result<(Vec<String>, Scores)> {
    let Some(first) = paths.first() else {
        bail!("no score files given (use --scores FILE…)")
    };
    let first = first.as_ref();
    let (lang, acc) = read_abs(first, cov)?;
    let mut langs = vec![lang];
    let names: BTreeSet<String> = acc.keys().cloned().collect();
    let acc = std::sync::Mutex::new(acc);
    for p in &paths[1..] {
        let p = p.as_ref();
        let seen = std::sync::Mutex::new(BTreeSet::new());
        let lang = for_each_abs(p, cov, |n, s, data| {
            let mut sum = {
                let mut g = acc.lock().unwrap();
                match g.get_mut(n) {
                    None => bail!("{}: tensor {n} is not in {} (score files of different models?)", p.display(), first.display()),
                    Some(d) if d.shape != s => bail!("{}: tensor {n} has shape {s:?} but {:?} in {} (score files of different models?)", p.display(), d.shape, first.display()),
                    Some(d) => std::mem::take(&mut d.data),
                }
            };
            sum.iter_mut().zip(&data).for_each(|(a, b)| *a += b);
            acc.lock().unwrap().get_mut(n).unwrap().data = sum;
            seen.lock().unwrap().insert(n.to_string());
            Ok(())
        })?;
        if let Some(n) = names.difference(&seen.into_inner().unwrap()).next() {
            bail!(
                "{}: has no tensor {n} (which {} has; score files of different models?)",
                p.display(),
                first.display()
            );
        }
        if langs.contains(&lang) {
            bail!("{}: language '{lang}' given twice", p.display());
        }
        langs.push(lang);
    }
    Ok((langs, acc.into_inner().unwrap()))
}
