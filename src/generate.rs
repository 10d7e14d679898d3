//! Text generation: greedy by default, or temperature / top-p sampling with a seed.

use crate::model::Model;
use anyhow::Result;
use rand::{Rng, SeedableRng};

/// How to pick each next token.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Continues `prompt` by up to `max_tokens` tokens (stops at EOS); returns only the new text.
/// Non-finite logits are an error naming the new token and where they first appear.
pub fn generate(model: &Model, prompt: &str, max_tokens: usize, s: &Sampling) -> Result<String> {
    let tok = model.tokenizer()?;
    let mut ids = tok.encode(prompt)?;
    if ids.is_empty() {
        anyhow::bail!("the prompt has no tokens");
    }
    let n0 = ids.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    let eos = tok.eos.or(model.config.eos_token_id);
    for k in 0..max_tokens {
        let logits = model.next_token_logits(&ids)?;
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            anyhow::bail!(
                "non-finite logit ({}) for token id {i} of new token {k} (position {}); it first appears in {}",
                logits[i],
                ids.len(),
                model.locate_non_finite(&ids)?
            );
        }
        let next = pick(&logits, s, &mut rng);
        if Some(next) == eos {
            break;
        }
        ids.push(next);
    }
    tok.decode(&ids[n0..])
}

fn pick(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            // NaN never wins
            if v > logits[best] || logits[best].is_nan() {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let max = logits
        .iter()
        .cloned()
        .filter(|v| v.is_finite())
        .fold(f32::MIN, f32::max) as f64;
    let mut p: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            (
                i,
                if v.is_finite() {
                    ((v as f64 - max) / s.temperature).exp()
                } else {
                    0.0
                },
            )
        })
        .collect();
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = p.iter().map(|x| x.1).sum();
    let mut keep = 0;
    let mut acc = 0.0;
    for (i, x) in p.iter().enumerate() {
        acc += x.1 / total;
        keep = i + 1;
        if acc >= s.top_p {
            break;
        }
    }
    let p = &p[..keep];
    let z: f64 = p.iter().map(|x| x.1).sum();
    let mut r = rng.gen::<f64>() * z;
    for x in p {
        r -= x.1;
        if r <= 0.0 {
            return x.0 as u32;
        }
    }
    p[p.len() - 1].0 as u32
}
