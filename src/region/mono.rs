//! Monolingual regions: a language's own top-k AND NOT the union of the other languages'
//! top-k, each language's top-k taken from its own |score|.

use super::scores::read_abs;
use super::select::{select, Direction, Scope};
use super::{check_same_layout, Region};
use crate::mask::Coverage;
use anyhow::{bail, Result};
use std::path::Path;

/// Bitwise `a AND NOT b`, in place.
pub fn minus_in_place(a: &mut Region, b: &Region) {
    for (n, x) in a.iter_mut() {
        if let Some(y) = b.get(n) {
            x.data
                .iter_mut()
                .zip(&y.data)
                .for_each(|(p, q)| *p &= 1 - q);
        }
    }
}

/// Bitwise `a OR b`, in place (same layout).
pub fn union_in_place(a: &mut Region, b: &Region) {
    for (n, x) in a.iter_mut() {
        if let Some(y) = b.get(n) {
            x.data.iter_mut().zip(&y.data).for_each(|(p, q)| *p |= q);
        }
    }
}

/// The monolingual region of `target` from one score file per language; returns the
/// languages in file order and the region.
pub fn mono(
    paths: &[impl AsRef<Path>],
    target: &str,
    k: f64,
    cov: Coverage,
    scope: Scope,
) -> Result<(Vec<String>, Region)> {
    if paths.len() < 2 {
        bail!(
            "mono needs score files of at least two languages (got {})",
            paths.len()
        );
    }
    let mut langs = Vec::new();
    let mut own: Option<Region> = None;
    let mut others: Option<Region> = None;
    let mut first: Option<(String, Region)> = None;
    for p in paths {
        let p = p.as_ref();
        let (lang, scores) = read_abs(p, cov)?;
        if langs.contains(&lang) {
            bail!("{}: language '{lang}' given twice", p.display());
        }
        let top = select(&scores, k, Direction::Top, scope);
        drop(scores);
        let pname = p.display().to_string();
        match &first {
            None => first = Some((pname, top.clone())),
            Some((fname, f)) => check_same_layout(f, &top, fname, &pname)?,
        }
        if lang == target {
            own = Some(top);
        } else {
            match &mut others {
                None => others = Some(top),
                Some(u) => union_in_place(u, &top),
            }
        }
        langs.push(lang);
    }
    let Some(mut own) = own else {
        bail!(
            "--target {target}: no score file has lang '{target}' (languages: {})",
            langs.join(", ")
        );
    };
    if let Some(u) = &others {
        minus_in_place(&mut own, u);
    }
    Ok((langs, own))
}
