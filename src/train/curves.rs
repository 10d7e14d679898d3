//! Evaluation curves: PPL and bits per byte of every evaluation language at chosen steps,
//! written as `eval.csv` and `eval.json` (rewritten atomically after every evaluation).

use crate::eval;
use crate::io::{atomic_write, write_json};
use crate::model::Model;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One language evaluated at one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: usize,
    pub lang: String,
    pub tokens: usize,
    /// Token-weighted mean NLL (nats).
    pub nll: f64,
    pub ppl: f64,
    pub bits_per_byte: f64,
}

/// Evaluates every text (windows of `seq_len`, stride `seq_len`) at `step`.
pub fn evaluate(
    model: &Model,
    texts: &[(String, Vec<u32>)],
    seq_len: usize,
    step: usize,
) -> Result<Vec<EvalPoint>> {
    texts
        .iter()
        .map(|(lang, ids)| {
            let r = eval::perplexity(model, lang, ids, seq_len, seq_len, |_| {})?;
            Ok(EvalPoint {
                step,
                lang: r.lang,
                tokens: r.tokens,
                nll: r.nll,
                ppl: r.ppl,
                bits_per_byte: r.bits_per_byte,
            })
        })
        .collect()
}

/// The CSV text of a curve: `step,lang,tokens,nll,ppl,bits_per_byte`.
pub fn to_csv(points: &[EvalPoint]) -> String {
    let mut s = String::from("step,lang,tokens,nll,ppl,bits_per_byte\n");
    for p in points {
        s.push_str(&format!(
            "{},{},{},{},{},{}\n",
            p.step, p.lang, p.tokens, p.nll, p.ppl, p.bits_per_byte
        ));
    }
    s
}

/// Writes `DIR/eval.csv` and `DIR/eval.json` (`{"seq_len", "points": [...]}`).
pub fn write(dir: &Path, seq_len: usize, points: &[EvalPoint]) -> Result<()> {
    atomic_write(&dir.join("eval.csv"), to_csv(points).as_bytes())?;
    write_json(
        &dir.join("eval.json"),
        &serde_json::json!({"seq_len": seq_len, "points": points}),
    )
}
