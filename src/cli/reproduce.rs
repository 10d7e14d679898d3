//! `broca reproduce`: the whole study in one resumable command, with an HTML report.

use crate::data::split_values;
use crate::outln;
use crate::study::{self, config::StudyConfig, Options};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ReproduceArgs {
    /// A built-in study: quick (SmolLM2, ≤ 20 min on 2 cores) or full (Qwen2.5-Coder-0.5B).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// A study config (TOML; see DIR/study.toml of any run for the fields).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model (GGUF file or HF checkpoint directory) instead of the config's.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Run only these stages (their upstream stages must be finished).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub only: Vec<String>,
    /// Output folder (resumed when it exists).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object (what ran, times, the report path).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ReproduceArgs) -> Result<()> {
    let mut cfg = match (&a.preset, &a.config) {
        (_, Some(p)) => StudyConfig::from_file(p)?,
        (Some(p), None) => StudyConfig::preset(p).context("--preset")?,
        (None, None) => bail!("give --preset quick|full or --config FILE"),
    };
    if let Some(m) = &a.model {
        cfg.model = m.display().to_string();
    }
    let opts = Options {
        only: split_values(&a.only),
        ..Options::default()
    };
    let _lock = crate::lock::Lock::dir(&a.out)?;
    let s = study::run(&cfg, &a.out, &opts)?;
    if a.json {
        return super::print_json(&s);
    }
    outln!(
        "stages run: {}",
        if s.executed.is_empty() {
            "none (all up to date)".into()
        } else {
            s.executed.join(", ")
        }
    )?;
    outln!("report: {}  ({:.1} s)", s.report.display(), s.wall_s)?;
    Ok(())
}
