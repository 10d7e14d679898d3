//! Perplexity and bits per byte of a text, window by window.
//!
//! Windows: targets are tokens `1..n` (token 0 has no context). The first window is tokens
//! `[0, seq_len)`; each next window ends `stride` tokens later and holds the `seq_len`
//! tokens before its end, scoring only the tokens not yet scored. So every token is scored
//! exactly once, with at least `seq_len - stride` tokens of context (except near the start).
//! A window of `seq_len` tokens makes `seq_len - 1` predictions, so the stride is capped at
//! `seq_len - 1`: with the default stride (= seq_len) consecutive windows share one token.

use crate::model::Model;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde::Serialize;

/// One window: input tokens `[start, end)`, scoring targets `[first_target, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
    pub first_target: usize,
}

/// The evaluation windows over `n` tokens (see the module doc).
pub fn eval_windows(n: usize, seq_len: usize, stride: usize) -> Result<Vec<Window>> {
    if seq_len < 2 {
        bail!("--seq-len must be at least 2");
    }
    if stride == 0 {
        bail!("--stride must be at least 1");
    }
    let s = stride.min(seq_len - 1);
    let mut out = Vec::new();
    if n < 2 {
        return Ok(out);
    }
    let mut end = seq_len.min(n);
    out.push(Window {
        start: 0,
        end,
        first_target: 1,
    });
    while end < n {
        let new_end = (end + s).min(n);
        out.push(Window {
            start: new_end.saturating_sub(seq_len),
            end: new_end,
            first_target: end,
        });
        end = new_end;
    }
    Ok(out)
}

/// Perplexity of one text.
#[derive(Clone, Debug, Serialize)]
pub struct PplResult {
    pub lang: String,
    /// Input tokens (BOS included if the model adds one).
    pub tokens: usize,
    /// Token-weighted mean NLL (nats) over the scored tokens.
    pub nll: f64,
    pub ppl: f64,
    pub bits_per_byte: f64,
    pub scored_tokens: usize,
    pub scored_bytes: usize,
}

/// Sum of NLL over every scored token of `ids`, plus the count of scored tokens; a
/// non-finite NLL is an error naming its token, window and first non-finite step.
pub fn nll_sum(
    model: &Model,
    ids: &[u32],
    seq_len: usize,
    stride: usize,
    mut on_window: impl FnMut(usize),
) -> Result<(f64, Vec<usize>)> {
    let mut total = 0f64;
    let mut scored = Vec::new();
    for (k, w) in eval_windows(ids.len(), seq_len, stride)?
        .into_iter()
        .enumerate()
    {
        let win = &ids[w.start..w.end];
        let nll = model.token_nll(&Model::ids_tensor(win)?, false)?;
        let nll: Vec<f64> = nll.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        model.check_nll(ids, &nll, k, w.start, w.first_target)?;
        // nll[j] is the NLL of token start + j + 1
        for (j, v) in nll.iter().enumerate() {
            let tok = w.start + j + 1;
            if tok >= w.first_target {
                total += v;
                scored.push(tok);
            }
        }
        on_window(w.end - w.first_target);
    }
    Ok((total, scored))
}

/// Perplexity of `ids` in windows of `seq_len` advancing by `stride`.
pub fn perplexity(
    model: &Model,
    lang: &str,
    ids: &[u32],
    seq_len: usize,
    stride: usize,
    on_window: impl FnMut(usize),
) -> Result<PplResult> {
    if ids.len() < 2 {
        bail!(
            "{lang}: text has {} token(s); at least 2 are needed",
            ids.len()
        );
    }
    let (total, scored) =
        nll_sum(model, ids, seq_len, stride, on_window).with_context(|| format!("text {lang}"))?;
    let tok = model.tokenizer()?;
    let scored_ids: Vec<u32> = scored.iter().map(|&i| ids[i]).collect();
    let bytes: usize = tok.token_bytes(&scored_ids).iter().sum();
    let nll = total / scored.len() as f64;
    Ok(PplResult {
        lang: lang.to_string(),
        tokens: ids.len(),
        nll,
        ppl: nll.exp(),
        bits_per_byte: total / std::f64::consts::LN_2 / bytes.max(1) as f64,
        scored_tokens: scored.len(),
        scored_bytes: bytes,
    })
}

/// Geometric mean of positive values.
pub fn geomean(v: &[f64]) -> f64 {
    (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp()
}
