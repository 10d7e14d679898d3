//! `broca generate`: continue a prompt; with `--perturb SPEC…`, also under each perturbation,
//! printed under the baseline.

use super::args;
use crate::generate::{generate, Sampling};
use crate::model::Model;
use crate::outln;
use crate::perturb::{ops, spec};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    /// The prompt to continue (not empty).
    #[arg(long, value_parser = args::non_empty)]
    pub prompt: String,
    /// Number of new tokens at most (at least 1).
    #[arg(long, default_value_t = 32, value_parser = args::positive_usize)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy; finite, not negative).
    #[arg(long, default_value_t = 0.0, value_parser = args::non_negative_f64)]
    pub temperature: f64,
    /// Nucleus sampling threshold, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = args::fraction)]
    pub top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0, value_parser = args::seed)]
    pub seed: u64,
    /// Perturbations, each also generated: MASKFILE:OP, norm:LAYER:input|post_attention:DIM:OP
    /// or norm:final:DIM:OP (OP: zero, randomize, randomize-uniform, scale:F, noise:SIGMA).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub perturb: Vec<String>,
    #[command(flatten)]
    pub mem: super::MemArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let limit = a.mem.limit()?;
    let model = Model::load(&a.model)?;
    let prompt_len = model.tokenizer()?.encode(&a.prompt)?.len();
    if prompt_len == 0 {
        bail!("--prompt: no tokens");
    }
    let specs: Vec<spec::Spec> = crate::data::split_values(&a.perturb)
        .iter()
        .map(|x| spec::parse(x, &model))
        .collect::<Result<_>>()?;
    // each new token recomputes the whole sequence
    let longest = prompt_len + a.max_tokens;
    super::announce_plan(
        "generate",
        &crate::memory::forward_plan(&model, 1, longest, limit),
    )?;
    let s = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    let mut outs = vec![(
        "base".to_string(),
        generate(&model, &a.prompt, a.max_tokens, &s).context("generate")?,
    )];
    for sp in &specs {
        let saved = sp.apply(&model, a.seed)?;
        let text = generate(&model, &a.prompt, a.max_tokens, &s);
        ops::restore(&model, saved)?;
        let text = text.with_context(|| format!("generate --perturb {}", sp.text))?;
        outs.push((sp.text.clone(), text));
    }
    if a.json {
        let c: Vec<_> = outs
            .iter()
            .map(|(c, t)| serde_json::json!({"condition": c, "text": t}))
            .collect();
        return super::print_json(&serde_json::json!({"prompt": a.prompt, "completions": c}));
    }
    if specs.is_empty() {
        return outln!("{}{}", a.prompt, outs[0].1);
    }
    for (i, (c, t)) in outs.iter().enumerate() {
        if i > 0 {
            outln!()?;
        }
        outln!("[{c}]")?;
        outln!("{}{}", a.prompt, t)?;
    }
    Ok(())
}
