//! Perturbation SPECs for `broca generate --perturb`: `MASKFILE:OP` (a region file and an
//! op) or `norm:LAYER:input|post_attention:DIM:OP` / `norm:final:DIM:OP` (one norm entry).

use super::dims::NormSite;
use super::ops::{self, Op, Saved};
use crate::mask::{self, Mask};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// What a SPEC perturbs.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A region mask file.
    Region(PathBuf),
    /// One entry of an RMSNorm weight.
    Norm(NormSite, usize),
}

/// A parsed SPEC.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// The SPEC as written.
    pub text: String,
    pub target: Target,
    pub op: Op,
}

const FORMS: &str = "MASKFILE:OP or norm:LAYER:input|post_attention:DIM:OP or norm:final:DIM:OP";

/// Splits `X:OP` where OP may itself be `scale:F` / `noise:S`.
fn split_op(s: &str) -> Result<(&str, Op)> {
    let parts: Vec<&str> = s.rsplitn(3, ':').collect();
    let (rest, op) = match parts.as_slice() {
        [v, kind, rest] if matches!(*kind, "scale" | "noise") => (*rest, format!("{kind}:{v}")),
        [op, rest] => (*rest, op.to_string()),
        [op, mid, rest] => (&s[..rest.len() + 1 + mid.len()], op.to_string()),
        _ => bail!("no op (expected {FORMS})"),
    };
    if rest.is_empty() {
        bail!("no region or norm before the op (expected {FORMS})");
    }
    Ok((rest, op.parse()?))
}

fn parse_inner(s: &str, model: &Model) -> Result<Spec> {
    let (rest, op) = split_op(s)?;
    let target = if let Some(norm) = rest.strip_prefix("norm:") {
        let p: Vec<&str> = norm.split(':').collect();
        let num = |v: &str, what: &str| -> Result<usize> {
            v.parse()
                .map_err(|_| anyhow::anyhow!("'{v}' is not a {what} number (expected {FORMS})"))
        };
        let (site, dim) = match p.as_slice() {
            ["final", d] => (NormSite::Final, num(d, "dimension")?),
            [l, kind, d] => {
                let l = num(l, "layer")?;
                if !matches!(*kind, "input" | "post_attention") {
                    bail!("unknown norm '{kind}' (expected input or post_attention)");
                }
                (NormSite::parse(kind, Some(l), model)?, num(d, "dimension")?)
            }
            _ => bail!("expected norm:LAYER:input|post_attention:DIM:OP or norm:final:DIM:OP"),
        };
        let h = model.config.hidden_size;
        if dim >= h {
            bail!(
                "dimension {dim} out of range: hidden size is {h} (0..{})",
                h - 1
            );
        }
        Target::Norm(site, dim)
    } else {
        let path = PathBuf::from(rest);
        if !path.exists() {
            bail!("{}: no such mask file", path.display());
        }
        Target::Region(path)
    };
    Ok(Spec {
        text: s.to_string(),
        target,
        op,
    })
}

/// Parses a SPEC and checks it against `model` (layer and dimension ranges, mask shapes).
pub fn parse(s: &str, model: &Model) -> Result<Spec> {
    let spec = parse_inner(s, model).with_context(|| format!("--perturb '{s}'"))?;
    spec.mask(model)?;
    Ok(spec)
}

impl Spec {
    /// The region this SPEC perturbs.
    pub fn mask(&self, model: &Model) -> Result<Mask> {
        match &self.target {
            Target::Region(p) => mask::load_for(p, model),
            Target::Norm(site, d) => ops::entries_mask(model, &site.param_name(), &[*d]),
        }
    }

    /// Applies the SPEC to `model` in place; undo with `ops::restore`.
    pub fn apply(&self, model: &Model, seed: u64) -> Result<Saved> {
        ops::apply(model, &self.mask(model)?, &self.op, seed)
    }
}
