//! `broca perturb`: apply an op to a region and save the perturbed model as a HF checkpoint.

use crate::mask;
use crate::model::Model;
use crate::outln;
use crate::perturb::ops::{self, Op};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PerturbArgs {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    /// Region mask (safetensors of U8 0/1 per parameter).
    #[arg(long)]
    pub region: PathBuf,
    /// zero, randomize, randomize-uniform, scale:F or noise:SIGMA.
    #[arg(long)]
    pub op: String,
    /// Seed for randomize / noise.
    #[arg(long, default_value_t = 0, value_parser = super::args::seed)]
    pub seed: u64,
    /// Output checkpoint folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub save: PathBuf,
    #[command(flatten)]
    pub mem: super::MemArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PerturbArgs) -> Result<()> {
    let op: Op = a.op.parse().context("--op")?;
    if !a.region.is_file() {
        bail!("{}: no such mask file", a.region.display());
    }
    let limit = a.mem.limit()?;
    let _lock = crate::lock::Lock::dir(&a.save)?;
    let model = Model::load(&a.model)?;
    let region = mask::load_for(&a.region, &model)?;
    super::announce_plan("perturb", &crate::memory::edit_plan(&model, limit))?;
    let saved = ops::apply(&model, &region, &op, a.seed)?;
    let n = saved.count();
    model.save_hf(&a.save)?;
    let v = serde_json::json!({
        "model": a.model.display().to_string(), "region": a.region.display().to_string(),
        "op": op.to_string(), "seed": a.seed, "entries": n, "saved": a.save.display().to_string(),
    });
    if a.json {
        return super::print_json(&v);
    }
    outln!(
        "{} entries perturbed ({op}); model written to {}",
        n,
        a.save.display()
    )?;
    Ok(())
}
