//! `broca ablate`: PPL and bits per byte per language under base, each region × op, and
//! equal-size controls (random / bottom / top per tensor).

use super::args;
use crate::data;
use crate::mask::{self, Mask};
use crate::model::Model;
use crate::outln;
use crate::perturb::ablate::{ablate, Ablation, AblationSpec};
use crate::perturb::ops;
use crate::perturb::select::{self, Control};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct AblateArgs {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    /// Regions as NAME=MASK.safetensors (several allowed).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append, required = true)]
    pub region: Vec<String>,
    /// Operations: zero, randomize, randomize-uniform, scale:F, noise:SIGMA.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append, default_value = "zero")]
    pub op: Vec<String>,
    /// Controls of equal per-tensor size: random, bottom, top (bottom/top need --scores).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub controls: Vec<String>,
    /// Score files (safetensors) the regions were made from; |score| is summed over them.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub scores: Vec<String>,
    /// Evaluation texts: a DIR of *.txt or NAME=FILE pairs. Default: the 30 UDHR languages.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub eval: Vec<String>,
    /// Keep only the first N tokens of each text (at least 2).
    #[arg(long, value_parser = args::token_budget)]
    pub max_tokens: Option<usize>,
    /// Window length in tokens (at least 2).
    #[arg(long, default_value_t = 512, value_parser = args::seq_len)]
    pub seq_len: usize,
    /// Seed for randomize/noise and the random control.
    #[arg(long, default_value_t = 0, value_parser = args::seed)]
    pub seed: u64,
    #[command(flatten)]
    pub mem: super::MemArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `NAME=FILE` region arguments, loaded and checked against the model.
fn load_regions(values: &[String], model: &Model) -> Result<Vec<(String, Mask)>> {
    let mut out: Vec<(String, Mask)> = Vec::new();
    for t in data::from_pairs(values).context("--region")? {
        if out.iter().any(|(n, _)| *n == t.lang) {
            bail!("region name '{}' given twice", t.lang);
        }
        out.push((t.lang.clone(), mask::load_for(&t.path, model)?));
    }
    Ok(out)
}

pub fn run(a: AblateArgs) -> Result<()> {
    let ops = ops::parse_ops(&a.op)?;
    let controls: Vec<Control> = data::split_values(&a.controls)
        .iter()
        .map(|c| Control::parse(c).context("--controls"))
        .collect::<Result<_>>()?;
    let needs_scores = controls.iter().any(|c| *c != Control::Random);
    let inputs = data::gather(&[], &[], &a.eval, "--eval", Some(&data::default_eval_dir()))?;
    super::ppl::check_texts(&inputs, a.max_tokens)?;
    let limit = a.mem.limit()?;
    let model = Model::load(&a.model)?;
    let regions = load_regions(&a.region, &model)?;
    let scores = if needs_scores {
        let files: Vec<PathBuf> = data::split_values(&a.scores)
            .into_iter()
            .map(PathBuf::from)
            .collect();
        Some(crate::region::scores::ScoreFiles::open(&files)?)
    } else {
        None
    };
    let texts = super::ppl::load_texts(&model, &inputs, a.max_tokens)?;
    // windows of --seq-len tokens, or the whole of the longest text when shorter
    let t = texts
        .iter()
        .map(|(_, ids)| ids.len())
        .max()
        .unwrap_or(2)
        .min(a.seq_len);
    super::announce_plan("ablate", &crate::memory::forward_plan(&model, 1, t, limit))?;

    let spec = AblationSpec {
        regions: &regions,
        ops: &ops,
        controls: &controls,
        scores: scores.as_ref().map(|s| s as &dyn select::TensorScores),
        texts: &texts,
        seq_len: a.seq_len,
        seed: a.seed,
    };
    let output = ablate(&model, &a.model.display().to_string(), &spec).context("ablate")?;
    if a.json {
        return super::print_json(&output);
    }
    print_table(&output)
}

fn print_table(o: &Ablation) -> Result<()> {
    outln!("model: {}  (PPL per language; token-weighted)", o.model)?;
    let mut head = format!(
        "{:<22} {:<18} {:>12} {:>9}",
        "condition", "op", "geomean_ppl", "ratio"
    );
    for l in &o.languages {
        head.push_str(&format!(" {l:>9}"));
    }
    outln!("{head}")?;
    for c in &o.conditions {
        let mut row = format!(
            "{:<22} {:<18} {:>12} {:>9.3}",
            c.condition,
            c.op,
            fmt_ppl(c.geomean_ppl),
            c.ratio_to_base
        );
        for r in &c.results {
            row.push_str(&format!(" {:>9}", fmt_ppl(r.ppl)));
        }
        outln!("{row}")?;
    }
    Ok(())
}

/// PPL for tables: fixed point while small, scientific when huge.
pub fn fmt_ppl(v: f64) -> String {
    if v.is_finite() && v < 1e5 {
        format!("{v:.2}")
    } else {
        format!("{v:.2e}")
    }
}
