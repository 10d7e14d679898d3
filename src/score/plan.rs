//! What `score` sums and in how many passes: the scored parameters (the `model.layers.*`
//! tensors the regions use, or all), split into contiguous layer groups so that each pass's
//! peak memory (weights, activation tapes from its lowest layer up, f64 sums of its
//! parameters) stays under the memory limit. A pass runs every window's forward and a
//! backward only down to its lowest layer.

use crate::memory::{self, ModelCost, Plan};
use crate::model::Model;
use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

/// Which parameters `score` keeps sums for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    /// The `model.layers.*` tensors (what regions use).
    Layers,
    /// Also the embeddings, the final norm and the output projection.
    All,
}

impl FromStr for Include {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Include> {
        match s {
            "layers" => Ok(Include::Layers),
            "all" => Ok(Include::All),
            _ => bail!("--include: '{s}' is not layers or all"),
        }
    }
}

impl fmt::Display for Include {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Include::Layers => "layers",
            Include::All => "all",
        })
    }
}

/// One pass: layers `first..=last`, plus the non-layer parameters when `extras`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    pub first: usize,
    pub last: usize,
    pub extras: bool,
}

impl Group {
    /// `layers-A-B`, the group's part of file names.
    pub fn tag(&self) -> String {
        format!("layers-{}-{}", self.first, self.last)
    }

    /// Parses a tag made by [`Group::tag`] (extras decided by the caller).
    pub fn from_tag(tag: &str) -> Option<(usize, usize)> {
        let rest = tag.strip_prefix("layers-")?;
        let (a, b) = rest.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }

    /// Which parameters of `model` this group scores (model order).
    pub fn scored(&self, model: &Model) -> Vec<bool> {
        model
            .params
            .iter()
            .map(|p| match layer_of(&p.name) {
                Some(l) => (self.first..=self.last).contains(&l),
                None => self.extras,
            })
            .collect()
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.last + 1 - self.first
    }

    /// Never empty (a group has at least one layer).
    pub fn is_empty(&self) -> bool {
        false
    }
}

pub use crate::region::stats::layer_of;

/// Parses `--layers A-B` (inclusive) against a model of `layers` layers.
pub fn parse_layers(s: &str, layers: usize) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once('-')
        .map(|(a, b)| (a.trim().parse::<usize>(), b.trim().parse::<usize>()))
        .filter(|(a, b)| a.is_ok() && b.is_ok())
        .map(|(a, b)| (a.unwrap_or(0), b.unwrap_or(0)))
        .ok_or_else(|| anyhow::anyhow!("--layers: '{s}' is not a range A-B (e.g. 0-13)"))?;
    if a > b || b >= layers {
        bail!(
            "--layers: {a}-{b} is not a range within layers 0-{}",
            layers - 1
        );
    }
    Ok((a, b))
}

/// The passes of one language's run and the memory plan of its largest pass.
pub struct PassPlan {
    pub groups: Vec<Group>,
    pub plan: Plan,
}

/// Bytes of a pass over `g` (`b` windows of `t` tokens per batch), by part.
fn pass_parts(model: &Model, g: Group, b: usize, t: usize) -> Vec<(String, u64)> {
    let cost = ModelCost::of(model);
    let scored = g.scored(model);
    let params: u64 = model
        .params
        .iter()
        .zip(&scored)
        .filter(|(_, &s)| s)
        .map(|(p, _)| p.elem_count() as u64)
        .sum();
    let largest = model
        .params
        .iter()
        .zip(&scored)
        .filter(|(_, &s)| s)
        .map(|(p, _)| p.elem_count() as u64)
        .max()
        .unwrap_or(0);
    let layers_taped = (model.config.num_layers - g.first) as u64;
    vec![
        (memory::weights_label(model), cost.weights),
        (
            format!("tapes ({layers_taped} layers)"),
            layers_taped * memory::tape_bytes_per_layer(model, b, t),
        ),
        (
            "backward".into(),
            memory::forward_bytes(model, b, t) + memory::backward_extra_bytes(model, b, t),
        ),
        // the f64 sums, plus θ ⊙ Σg of one tensor and its encoded copy while writing
        ("sums".into(), 8 * params + 12 * largest),
    ]
}

/// Plans the passes: `forced` (`--layers`) as one group, else the fewest contiguous groups
/// that fit `limit`, built from the last layer down (the lower a group starts, the more
/// tapes its backward needs). Errors before any work when one layer does not fit.
pub fn plan(
    model: &Model,
    include: Include,
    forced: Option<(usize, usize)>,
    b: usize,
    t: usize,
    limit: u64,
) -> Result<PassPlan> {
    let n = model.config.num_layers;
    let group = |first: usize, last: usize| Group {
        first,
        last,
        extras: include == Include::All && first == 0,
    };
    let peak = |g: Group| pass_parts(model, g, b, t).iter().map(|p| p.1).sum::<u64>();
    let groups = match forced {
        Some((a, z)) => vec![group(a, z)],
        None => {
            let mut groups = Vec::new();
            let mut last = n;
            while last > 0 {
                let top = last - 1;
                let mut first = top;
                while first > 0 && peak(group(first - 1, top)) <= limit {
                    first -= 1;
                }
                groups.push(group(first, top));
                last = first;
            }
            groups.reverse();
            groups
        }
    };
    // the pass that needs the most decides the plan
    let worst = *groups
        .iter()
        .max_by_key(|g| peak(**g))
        .expect("a model has layers");
    let per_pass: Vec<String> = groups.iter().map(|g| g.len().to_string()).collect();
    let plan = Plan {
        limit,
        parts: pass_parts(model, worst, b, t),
        note: format!(
            "{} pass(es), layers per pass {}{}",
            groups.len(),
            per_pass.join("/"),
            if include == Include::All {
                " (embeddings, final norm and lm_head with layer 0)"
            } else {
                ""
            }
        ),
    };
    if plan.peak() > limit {
        let what = if forced.is_some() {
            format!("layers {}-{} in one pass", worst.first, worst.last)
        } else {
            format!("one layer ({}) in a pass", worst.first)
        };
        plan.check(&what)?;
    }
    Ok(PassPlan { groups, plan })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_numbers_and_ranges() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(parse_layers("0-3", 4).unwrap(), (0, 3));
        assert_eq!(parse_layers("2-2", 4).unwrap(), (2, 2));
        for bad in ["3-2", "0-4", "a-b", "3", "-1-2"] {
            assert!(parse_layers(bad, 4).is_err(), "{bad}");
        }
        let g = Group {
            first: 3,
            last: 7,
            extras: false,
        };
        assert_eq!(Group::from_tag(&g.tag()), Some((3, 7)));
    }
}
