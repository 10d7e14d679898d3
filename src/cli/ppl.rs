//! `broca ppl`: perplexity per language.

use super::args;
use crate::data;
use crate::eval::{self, PplResult};
use crate::memory;
use crate::model::Model;
use crate::outln;
use crate::progress::bar;
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PplArgs {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    #[command(flatten)]
    pub inputs: super::TextArgs,
    /// Keep only the first N tokens of each text (BOS counted; at least 2).
    #[arg(long, value_parser = args::token_budget)]
    pub max_tokens: Option<usize>,
    /// Window length in tokens (at least 2).
    #[arg(long, default_value_t = 512, value_parser = args::seq_len)]
    pub seq_len: usize,
    /// Window advance in tokens (default: seq-len; capped at seq-len - 1 so no token is skipped).
    #[arg(long, value_parser = args::positive_usize)]
    pub stride: Option<usize>,
    #[command(flatten)]
    pub mem: super::MemArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct PplOutput {
    model: String,
    seq_len: usize,
    results: Vec<PplResult>,
}

/// Tokenizes each input (read once; with `max_tokens`, only the prefix those tokens need).
pub fn load_texts(
    model: &Model,
    inputs: &[data::TextInput],
    max_tokens: Option<usize>,
) -> Result<Vec<(String, Vec<u32>)>> {
    let tok = model.tokenizer()?;
    inputs
        .iter()
        .map(|t| Ok((t.lang.clone(), data::text_tokens(tok, &t.path, max_tokens)?)))
        .collect()
}

/// Checks each input before the model loads (read once, see [`data::open_text`]).
pub fn check_texts(inputs: &[data::TextInput], max_tokens: Option<usize>) -> Result<()> {
    inputs
        .iter()
        .try_for_each(|t| data::check_text(&t.path, max_tokens))
}

pub fn run(a: PplArgs) -> Result<()> {
    let inputs = a.inputs.gather(Some(&data::default_eval_dir()))?;
    check_texts(&inputs, a.max_tokens)?;
    let limit = a.mem.limit()?;
    let model = Model::load(&a.model)?;
    let texts = load_texts(&model, &inputs, a.max_tokens)?;
    // windows of --seq-len tokens, or the whole of the longest text when shorter
    let t = texts
        .iter()
        .map(|(_, ids)| ids.len())
        .max()
        .unwrap_or(2)
        .min(a.seq_len);
    super::announce_plan("ppl", &memory::forward_plan(&model, 1, t, limit))?;
    let stride = a.stride.unwrap_or(a.seq_len);
    let total: usize = texts.iter().map(|(_, ids)| ids.len() - 1).sum();
    let pb = bar(total as u64, "ppl", "tok");
    let mut results = Vec::new();
    for ((lang, ids), input) in texts.iter().zip(&inputs) {
        pb.set_message(format!("ppl {lang}"));
        let r = eval::perplexity(&model, lang, ids, a.seq_len, stride, |n| pb.inc(n as u64));
        results.push(r.with_context(|| format!("ppl: {}", input.path.display()))?);
    }
    pb.finish_and_clear();
    let out = PplOutput {
        model: a.model.display().to_string(),
        seq_len: a.seq_len,
        results,
    };
    if a.json {
        return super::print_json(&out);
    }
    outln!(
        "model: {}  seq_len: {}  (token-weighted mean NLL)",
        out.model,
        out.seq_len
    )?;
    outln!(
        "{:<10} {:>8} {:>9} {:>11} {:>8}",
        "lang",
        "tokens",
        "nll",
        "ppl",
        "bpb"
    )?;
    for r in &out.results {
        outln!(
            "{:<10} {:>8} {:>9.4} {:>11.3} {:>8.4}",
            r.lang,
            r.tokens,
            r.nll,
            r.ppl,
            r.bits_per_byte
        )?;
    }
    let ppls: Vec<f64> = out.results.iter().map(|r| r.ppl).collect();
    let bpbs: Vec<f64> = out.results.iter().map(|r| r.bits_per_byte).collect();
    outln!(
        "{:<10} {:>8} {:>9} {:>11.3} {:>8.4}",
        "geomean",
        "",
        "",
        eval::geomean(&ppls),
        eval::geomean(&bpbs)
    )
}
