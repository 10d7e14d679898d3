//! `broca generate`: continue a prompt.

use crate::generate::{generate, Sampling};
use crate::model::Model;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    /// The prompt to continue.
    #[arg(long)]
    pub prompt: String,
    /// Number of new tokens at most.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let s = Sampling { temperature: a.temperature, top_p: a.top_p, seed: a.seed };
    let text = generate(&model, &a.prompt, a.max_tokens, &s)?;
    if a.json {
        return super::print_json(&serde_json::json!({"prompt": a.prompt, "completions": [{"condition": "base", "text": text}]}));
    }
    println!("{}{}", a.prompt, text);
    Ok(())
}
