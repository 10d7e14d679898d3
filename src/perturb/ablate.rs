//! The ablation table (`broca ablate`, `broca reproduce`): PPL and bits per byte per language
//! under the base model, each region × op, and each region's equal-size controls.

use super::ops::{self, Op};
use super::select::{self, Control};
use crate::eval::{self, geomean};
use crate::mask::Mask;
use crate::model::Model;
use crate::progress::bar;
use anyhow::{Context, Result};
use serde::Serialize;

/// One language under one condition.
#[derive(Clone, Debug, Serialize)]
pub struct LangResult {
    pub lang: String,
    pub ppl: f64,
    pub bits_per_byte: f64,
}

/// One condition: `base`, a region NAME, or `random(NAME)` / `bottom(NAME)` / `top(NAME)`.
#[derive(Clone, Debug, Serialize)]
pub struct Condition {
    pub condition: String,
    /// The op, `none` for base.
    pub op: String,
    pub geomean_ppl: f64,
    pub ratio_to_base: f64,
    pub geomean_bits_per_byte: f64,
    pub results: Vec<LangResult>,
}

/// The whole table (`ablate --json`).
#[derive(Clone, Debug, Serialize)]
pub struct Ablation {
    pub model: String,
    pub languages: Vec<String>,
    pub conditions: Vec<Condition>,
}

/// What to ablate.
pub struct AblationSpec<'a> {
    /// Regions by name.
    pub regions: &'a [(String, Mask)],
    pub ops: &'a [Op],
    pub controls: &'a [Control],
    /// Σ|score| per tensor, needed by bottom/top.
    pub scores: Option<&'a dyn select::TensorScores>,
    /// Evaluation texts (language, ids).
    pub texts: &'a [(String, Vec<u32>)],
    pub seq_len: usize,
    /// Seed of randomize/noise and of the random control.
    pub seed: u64,
}

/// Evaluates base, then each region × op followed by its controls (same op).
pub fn ablate(model: &Model, model_label: &str, s: &AblationSpec) -> Result<Ablation> {
    let mut conds: Vec<(String, Option<Op>, Option<Mask>)> = vec![("base".into(), None, None)];
    for (name, m) in s.regions {
        let ctrl: Vec<(String, Mask)> = s
            .controls
            .iter()
            .map(|c| Ok((c.label(name), select::control(m, *c, s.scores, s.seed)?)))
            .collect::<Result<_>>()?;
        for op in s.ops {
            conds.push((name.clone(), Some(op.clone()), Some(m.clone())));
            for (label, cm) in &ctrl {
                conds.push((label.clone(), Some(op.clone()), Some(cm.clone())));
            }
        }
    }
    let pb = bar((conds.len() * s.texts.len()) as u64, "ablate", "evals");
    let mut out = Vec::new();
    for (label, op, m) in &conds {
        let saved = match (op, m) {
            (Some(op), Some(m)) => Some(ops::apply(model, m, op, s.seed)?),
            _ => None,
        };
        let opname = op.as_ref().map_or("none".to_string(), |o| o.to_string());
        pb.set_message(format!("{label} {opname}"));
        let what = match op {
            Some(_) => format!("condition {label} ({opname})"),
            None => format!("condition {label}"),
        };
        let res: Result<Vec<LangResult>> = s
            .texts
            .iter()
            .map(|(lang, ids)| {
                let r = eval::perplexity(model, lang, ids, s.seq_len, s.seq_len, |_| {})
                    .with_context(|| what.clone())?;
                pb.inc(1);
                Ok(LangResult {
                    lang: lang.clone(),
                    ppl: r.ppl,
                    bits_per_byte: r.bits_per_byte,
                })
            })
            .collect();
        if let Some(saved) = saved {
            ops::restore(model, saved)?;
        }
        let results = res?;
        out.push(Condition {
            condition: label.clone(),
            op: opname,
            geomean_ppl: geomean(&results.iter().map(|r| r.ppl).collect::<Vec<_>>()),
            ratio_to_base: 0.0,
            geomean_bits_per_byte: geomean(
                &results.iter().map(|r| r.bits_per_byte).collect::<Vec<_>>(),
            ),
            results,
        });
    }
    pb.finish_and_clear();
    let base = out[0].geomean_ppl;
    for c in &mut out {
        c.ratio_to_base = c.geomean_ppl / base;
    }
    Ok(Ablation {
        model: model_label.to_string(),
        languages: s.texts.iter().map(|(l, _)| l.clone()).collect(),
        conditions: out,
    })
}
