//! Core and monolingual regions from score files: the one recipe `region core`,
//! `region mono` and the study's regions stage share. With the per-tensor scope (the
//! paper's) the work goes tensor by tensor over memory-mapped files, so it holds one
//! tensor's |scores| per thread plus the selected indices, whatever the model's size; the
//! global scope needs every covered |score| at once and holds them (4 bytes per entry).

use super::ops::Overlap;
use super::scores::{sum_abs, ScoreFiles};
use super::select::{apply, cut, select, Direction, Scope};
use super::{region_size, to_mask};
use crate::mask::{Coverage, Mask, MaskTensor};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::path::Path;

/// The per-tensor selection of a fraction `k` of `v` (ties: lower flat index).
fn top_of(name: &str, shape: &[usize], v: &[f32], k: f64, dir: Direction) -> Result<MaskTensor> {
    let c = cut(&[v], region_size(k, v.len() as u64), dir);
    MaskTensor::from_bits(name, shape, &apply(v, c.rank, c.ties[0], dir))
}

/// Gathers `(name, [one mask tensor per output])` rows into one mask per output.
fn columns(rows: Vec<(String, Vec<MaskTensor>)>, n: usize) -> Vec<Mask> {
    let mut out = vec![Mask::new(); n];
    for (name, ts) in rows {
        for (m, t) in out.iter_mut().zip(ts) {
            m.insert(name.clone(), t);
        }
    }
    out
}

/// Core regions for each fraction in `ks`: the top (or bottom) `k` of Σ_lang |score|.
/// Returns the files' languages and one mask per `k`.
pub fn core(
    files: &[impl AsRef<Path>],
    ks: &[f64],
    dir: Direction,
    scope: Scope,
    cov: Coverage,
) -> Result<(Vec<String>, Vec<Mask>)> {
    if scope == Scope::Global {
        let (langs, scores) = sum_abs(files, cov)?;
        let masks = ks
            .iter()
            .map(|&k| to_mask(&select(&scores, k, dir, scope)))
            .collect::<Result<_>>()?;
        return Ok((langs, masks));
    }
    let sf = ScoreFiles::open(files)?;
    let langs = sf.langs()?;
    let rows = sf
        .layout(cov)?
        .into_par_iter()
        .map(|(name, shape)| {
            let v = sf.abs_sum(&name, &shape)?;
            let ts = ks
                .iter()
                .map(|&k| top_of(&name, &shape, &v, k, dir))
                .collect::<Result<_>>()?;
            Ok((name, ts))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((langs, columns(rows, ks.len())))
}

/// Every language's top-`k` region and its monolingual region (its top-k minus the union
/// of the other languages' top-k), in file order.
pub struct Monolingual {
    pub langs: Vec<String>,
    pub tops: Vec<Mask>,
    pub monos: Vec<Mask>,
}

/// The monolingual regions of every language of `files` (at least two).
pub fn mono_all(
    files: &[impl AsRef<Path>],
    k: f64,
    scope: Scope,
    cov: Coverage,
) -> Result<Monolingual> {
    if files.len() < 2 {
        bail!(
            "mono needs score files of at least two languages (got {})",
            files.len()
        );
    }
    let sf = ScoreFiles::open(files)?;
    let langs = sf.langs()?;
    let n = files.len();
    let tops: Vec<Mask> = if scope == Scope::Global {
        files
            .iter()
            .map(|f| {
                let (_, s) = super::scores::read_abs(f.as_ref(), cov)?;
                to_mask(&select(&s, k, Direction::Top, scope))
            })
            .collect::<Result<_>>()?
    } else {
        let rows = sf
            .layout(cov)?
            .into_par_iter()
            .map(|(name, shape)| {
                let ts = (0..n)
                    .map(|i| {
                        let v = sf.abs_one(i, &name, &shape)?;
                        top_of(&name, &shape, &v, k, Direction::Top)
                    })
                    .collect::<Result<_>>()?;
                Ok((name, ts))
            })
            .collect::<Result<Vec<_>>>()?;
        columns(rows, n)
    };
    let monos = (0..n)
        .map(|i| {
            tops[i]
                .iter()
                .map(|(name, own)| {
                    let others = (0..n).filter(|&j| j != i).fold(None::<MaskTensor>, |u, j| {
                        let t = &tops[j][name];
                        Some(u.map_or_else(|| t.clone(), |u| u.union(t)))
                    });
                    let m = others.map_or_else(|| own.clone(), |u| own.minus(&u));
                    (name.clone(), m)
                })
                .collect()
        })
        .collect();
    Ok(Monolingual { langs, tops, monos })
}

/// The monolingual region of `target` (see [`mono_all`]); returns the languages too.
pub fn mono(
    files: &[impl AsRef<Path>],
    target: &str,
    k: f64,
    cov: Coverage,
    scope: Scope,
) -> Result<(Vec<String>, Mask)> {
    let m = mono_all(files, k, scope, cov)?;
    let Some(i) = m.langs.iter().position(|l| l == target) else {
        bail!(
            "--target {target}: no score file has lang '{target}' (languages: {})",
            m.langs.join(", ")
        );
    };
    Ok((m.langs, m.monos.into_iter().nth(i).unwrap_or_default()))
}

/// Overlap of two masks with the same tensors, per tensor and in total (as
/// [`super::ops::compare`] counts it for byte regions).
pub fn compare(a: &Mask, b: &Mask) -> (Vec<Overlap>, Overlap) {
    let per: Vec<Overlap> = a
        .iter()
        .map(|(n, x)| {
            let (cb, both) = b.get(n).map_or((0, 0), |y| {
                (y.count() as u64, x.intersection_count(y) as u64)
            });
            Overlap::new(n, x.numel() as u64, x.count() as u64, cb, both)
        })
        .collect();
    let total = Overlap::total(&per);
    (per, total)
}
