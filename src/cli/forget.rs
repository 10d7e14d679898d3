//! `broca forget`: the forgetting experiment (train with nothing / a region / a random
//! region frozen) and, with `--compensation`, the compensation experiment.

use super::train::HyperArgs;
use crate::data;
use crate::train::forget::{self, ForgetSpec};
use crate::{out, outln};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Base model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    /// Training texts (the new language): a folder or NAME=FILE pairs.
    #[arg(long, required = true, num_args = 1.., action = clap::ArgAction::Append)]
    pub train: Vec<String>,
    /// Evaluation texts: a folder or NAME=FILE pairs. Default: the UDHR folder.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub eval: Vec<String>,
    /// The region to freeze (a mask file, e.g. from `broca region core`).
    #[arg(long)]
    pub freeze_region: PathBuf,
    /// Also randomize the region and retrain with it frozen vs free.
    #[arg(long)]
    pub compensation: bool,
    /// Also write each condition's final model (large).
    #[arg(long)]
    pub save_models: bool,
    #[command(flatten)]
    pub hyper: HyperArgs,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object (the report) instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ForgetArgs) -> Result<()> {
    let train = data::from_dir_or_pairs(&a.train).context("--train")?;
    let eval = data::gather(&[], &[], &a.eval, "--eval", Some(&data::default_eval_dir()))?;
    super::ppl::check_texts(&train, a.hyper.data_tokens)?;
    super::ppl::check_texts(&eval, a.hyper.eval_tokens)?;
    let config = a.hyper.config(a.save_models)?;
    let mem_limit = a.hyper.mem.limit()?;
    let _lock = crate::lock::Lock::dir(&a.out)?;
    let spec = ForgetSpec {
        model: a.model.clone(),
        train,
        eval,
        region: a.freeze_region.clone(),
        config,
        eval_tokens: a.hyper.eval_tokens,
        data_tokens: a.hyper.data_tokens,
        compensation: a.compensation,
        resume: a.hyper.resume,
        out: a.out.clone(),
        mem_limit,
    };
    let r = forget::run(&spec)?;
    if a.json {
        return super::print_json(&r);
    }
    for (title, list) in [
        ("forgetting", &r.conditions),
        ("compensation", &r.compensation),
    ] {
        if list.is_empty() {
            continue;
        }
        outln!("{title}: PPL at step 0 -> step {} (ratio)", r.config.steps)?;
        out!("{:<34}", "condition")?;
        for l in &r.eval_langs {
            out!(
                " {:>22}",
                if r.train_langs.contains(l) {
                    format!("{l}*")
                } else {
                    l.clone()
                }
            )?;
        }
        outln!()?;
        for c in list {
            out!("{:<34}", c.condition)?;
            for s in &c.summary {
                out!(
                    " {:>22}",
                    format!("{:.2}->{:.2} ({:.2})", s.ppl_start, s.ppl_end, s.ratio)
                )?;
            }
            outln!()?;
        }
    }
    outln!("(* = trained language)  plots: {}", r.plots.join(", "))?;
    Ok(())
}
