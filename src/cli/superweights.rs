//! `broca superweights`: super-weight candidates from down_proj activations, each verified
//! by zeroing that one weight and measuring PPL.

use super::ablate::fmt_ppl;
use super::args;
use crate::data;
use crate::model::Model;
use crate::outln;
use crate::perturb::superweights::find_and_verify;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SuperweightsArgs {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    /// Prompt whose activations are recorded (not empty).
    #[arg(long, default_value = "Apple Inc. is a worldwide tech company.", value_parser = args::non_empty)]
    pub prompt: String,
    /// How many candidates (layers with the largest down_proj output activation) to verify
    /// (at least 1).
    #[arg(long, default_value_t = 10, value_parser = args::positive_usize)]
    pub top: usize,
    /// Verification text (default: English UDHR).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Tokens of the verification text (at least 2).
    #[arg(long, default_value_t = 256, value_parser = args::token_budget)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub mem: super::MemArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: SuperweightsArgs) -> Result<()> {
    let eval_path = a
        .eval
        .clone()
        .unwrap_or_else(|| data::default_eval_dir().join("en.txt"));
    data::check_text(&eval_path, Some(a.max_tokens))?;
    let limit = a.mem.limit()?;
    let model = Model::load(&a.model)?;
    let tok = model.tokenizer()?;
    let prompt_ids = tok.encode(&a.prompt)?;
    if prompt_ids.is_empty() {
        bail!("--prompt: no tokens");
    }
    let ids = data::text_tokens(tok, &eval_path, Some(a.max_tokens))?;
    let longest = prompt_ids.len().max(ids.len());
    super::announce_plan(
        "superweights",
        &crate::memory::forward_plan(&model, 1, longest, limit),
    )?;
    let (base, out) = find_and_verify(&model, &prompt_ids, &ids, a.top)
        .with_context(|| format!("superweights: {}", eval_path.display()))?;
    if a.json {
        return super::print_json(&serde_json::json!({
            "model": a.model.display().to_string(), "prompt": a.prompt, "prompt_tokens": prompt_ids.len(),
            "eval": eval_path.display().to_string(), "eval_tokens": ids.len(), "base_ppl": base, "candidates": out,
        }));
    }
    outln!(
        "model: {}  prompt: {:?} ({} tokens)",
        a.model.display(),
        a.prompt,
        prompt_ids.len()
    )?;
    outln!(
        "verification: {} first {} tokens, base PPL {}",
        eval_path.display(),
        ids.len(),
        fmt_ppl(base)
    )?;
    outln!(
        "{:>5} {:>5} {:>6} {:>5} {:>12} {:>11} {:>10} {:>12} {:>9}",
        "layer",
        "row",
        "col",
        "tok",
        "out_act",
        "in_act",
        "weight",
        "ppl_zeroed",
        "ratio"
    )?;
    for v in &out {
        let c = &v.candidate;
        outln!(
            "{:>5} {:>5} {:>6} {:>5} {:>12.2} {:>11.2} {:>10.4} {:>12} {:>9.3}",
            c.layer,
            c.row,
            c.col,
            c.token,
            c.output_activation,
            c.input_activation,
            c.weight,
            fmt_ppl(v.ppl_zeroed),
            v.ratio_to_base
        )?;
    }
    Ok(())
}
