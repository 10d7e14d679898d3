//! `broca dims`: single-dimension scans of one RMSNorm weight (two stages, prefix-cached,
//! batched, with a first-order screen), and `broca dims structured`: one hidden dimension
//! perturbed everywhere it appears.

use super::ablate::fmt_ppl;
use super::args;
use crate::data;
use crate::eval::{self, geomean};
use crate::memory;
use crate::model::Model;
use crate::outln;
use crate::perturb::dims::NormSite;
use crate::perturb::ops::{self, Op};
use crate::perturb::scan::{self as pscan, DimRow, ScanOutput, ScanParams};
use crate::perturb::structured;
use crate::progress::bar;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;

/// Default evaluation languages of the scans (UDHR): a few scripts, kept small for speed.
pub const DEFAULT_LANGS: [&str; 5] = ["en", "zh", "ar", "ru", "de"];

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DimsArgs {
    #[command(subcommand)]
    pub sub: Option<DimsCommand>,
    #[command(flatten)]
    pub scan: ScanArgs,
}

#[derive(Subcommand, Debug)]
pub enum DimsCommand {
    /// Perturb hidden dimension D everywhere it appears (q/k/v/gate/up columns, o/down rows,
    /// norm entries), together and optionally by matrix kind.
    Structured(StructuredArgs),
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    /// Layer of the norm (not needed for --norm final).
    #[arg(long, value_parser = args::count)]
    pub layer: Option<usize>,
    /// Which RMSNorm: input, post_attention or final.
    #[arg(long)]
    pub norm: Option<String>,
    /// Operation on the one entry: randomize, scale:F, zero, noise:SIGMA, randomize-uniform.
    #[arg(long)]
    pub op: Option<String>,
    /// Dimensions to scan: all, or a list (commas, ranges A-B).
    #[arg(long, default_value = "all")]
    pub dims: String,
    /// Evaluation texts: a DIR of *.txt or NAME=FILE pairs. Default: UDHR en zh ar ru de.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub eval: Vec<String>,
    /// Tokens per text in the screening stage (every dimension; at least 2).
    #[arg(long, default_value_t = 64, value_parser = args::token_budget)]
    pub screen_tokens: usize,
    /// How many of the most damaging dimensions are measured again at --max-tokens.
    #[arg(long, default_value_t = 32, value_parser = args::count)]
    pub confirm_top: usize,
    /// Tokens per text in the confirmation stage (at least 2).
    #[arg(long, default_value_t = 512, value_parser = args::token_budget)]
    pub max_tokens: usize,
    /// Perturbed copies per forward (default: about 1024 tokens per forward; at least 1).
    #[arg(long, value_parser = args::positive_usize)]
    pub batch: Option<usize>,
    /// Screen exactly only the N dims with the largest first-order (gradient) prediction
    /// (default: every dim in --dims); for wide models.
    #[arg(long, value_parser = args::positive_usize)]
    pub exact_dims: Option<usize>,
    /// Seed for randomize / noise.
    #[arg(long, default_value_t = 0, value_parser = args::seed)]
    pub seed: u64,
    #[command(flatten)]
    pub mem: super::MemArgs,
    /// Folder for dims.json, dims.csv and dims.png.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StructuredArgs {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    /// The hidden dimension.
    #[arg(long, value_parser = args::count)]
    pub dim: usize,
    /// Layers: all, or a list (commas, ranges A-B).
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Operations (several allowed).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append, required = true)]
    pub op: Vec<String>,
    /// Also perturb each matrix kind on its own.
    #[arg(long)]
    pub by_kind: bool,
    #[command(flatten)]
    pub mem: super::MemArgs,
    /// Evaluation texts: a DIR of *.txt or NAME=FILE pairs. Default: UDHR en zh ar ru de.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub eval: Vec<String>,
    /// Tokens per text (one window; at least 2).
    #[arg(long, default_value_t = 512, value_parser = args::token_budget)]
    pub max_tokens: usize,
    /// Seed for randomize / noise.
    #[arg(long, default_value_t = 0, value_parser = args::seed)]
    pub seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `all` or a list of numbers and ranges `A-B`, each below `n`.
pub fn parse_list(s: &str, n: usize, what: &str) -> Result<Vec<usize>> {
    if s.trim() == "all" {
        return Ok((0..n).collect());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |v: &str| -> Result<usize> {
            v.trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("'{v}' is not a {what} number"))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if a > b {
            bail!("{what} range '{part}' is empty");
        }
        if b >= n {
            bail!("{what} {b} out of range (0..{})", n - 1);
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        bail!("no {what}s given");
    }
    Ok(out)
}

/// The evaluation texts of the scans: `--eval`, or the default UDHR languages.
fn eval_inputs(values: &[String]) -> Result<Vec<data::TextInput>> {
    if !values.is_empty() {
        return data::from_dir_or_pairs(values).context("--eval");
    }
    let dir = data::default_eval_dir();
    DEFAULT_LANGS
        .iter()
        .map(|l| {
            let path = dir.join(format!("{l}.txt"));
            if !path.exists() {
                bail!(
                    "{}: default evaluation text missing (run scripts/fetch-assets)",
                    path.display()
                );
            }
            Ok(data::TextInput {
                lang: l.to_string(),
                path,
            })
        })
        .collect()
}

pub fn run(a: DimsArgs) -> Result<()> {
    match a.sub {
        Some(DimsCommand::Structured(s)) => run_structured(s),
        None => run_scan(a.scan),
    }
}

fn run_scan(a: ScanArgs) -> Result<()> {
    let norm = a
        .norm
        .as_deref()
        .context("dims: --norm input|post_attention|final is required")?;
    let op: Op =
        a.op.as_deref()
            .context("dims: --op is required (e.g. scale:10)")?
            .parse::<Op>()
            .context("--op")?;
    let inputs = eval_inputs(&a.eval)?;
    super::ppl::check_texts(&inputs, Some(a.max_tokens))?;
    let limit = a.mem.limit()?;
    let _lock = a.out.as_deref().map(crate::lock::Lock::dir).transpose()?;
    let model = Model::load(&a.model)?;
    let site = NormSite::parse(norm, a.layer, &model).with_context(|| match a.layer {
        Some(l) => format!("--norm {norm} --layer {l}"),
        None => format!("--norm {norm}"),
    })?;
    let h = model.config.hidden_size;
    let dims = parse_list(&a.dims, h, "dimension").context("--dims")?;
    let texts = super::ppl::load_texts(&model, &inputs, Some(a.max_tokens))?;
    // the larger forward of the two stages (perturbed copies × tokens)
    let (b, t) = [a.screen_tokens, a.max_tokens]
        .into_iter()
        .map(|t| (pscan::batch_for(a.batch, t).min(dims.len()), t))
        .max_by_key(|(b, t)| b * t)
        .unwrap_or((1, a.max_tokens));
    super::announce_plan("dims", &memory::forward_plan(&model, b, t, limit))?;
    let params = ScanParams {
        site,
        op: &op,
        dims: &dims,
        screen_tokens: a.screen_tokens,
        confirm_top: a.confirm_top,
        confirm_tokens: a.max_tokens,
        batch: a.batch,
        exact_dims: a.exact_dims,
        seed: a.seed,
    };
    let out = pscan::scan(&model, &a.model.display().to_string(), &texts, &params)?;
    check_scan(&model, &texts, &out, a.max_tokens)?;
    if let Some(dir) = &a.out {
        pscan::write_files(dir, &out, true)?;
    }
    if a.json {
        return super::print_json(&out);
    }
    print_scan(&out, a.confirm_top)
}

/// Refuses a scan with a non-finite result: for the unperturbed model, the error of
/// [`eval::perplexity`] (naming the text, token and first non-finite step); else the first
/// dimension whose perturbed PPL or first-order prediction is non-finite.
fn check_scan(
    model: &Model,
    texts: &[(String, Vec<u32>)],
    o: &ScanOutput,
    max: usize,
) -> Result<()> {
    if !(o.base_screen_ppl.is_finite() && o.base_ppl.is_finite()) {
        for (lang, ids) in texts {
            eval::perplexity(model, lang, ids, max, max, |_| {})
                .context("dims: unperturbed model")?;
        }
        bail!(
            "dims: the unperturbed model's PPL is {} (screen {})",
            o.base_ppl,
            o.base_screen_ppl
        );
    }
    let bad = |r: &DimRow| {
        let v = [r.screen_ppl, r.ppl.unwrap_or(0.0), r.first_order_delta_nll];
        v.into_iter()
            .chain(r.per_lang_ppl.iter().copied())
            .any(|x| !x.is_finite())
    };
    if let Some(r) = o.dims.iter().find(|r| bad(r)) {
        bail!(
            "dims: dimension {} of {} set to {} ({}): non-finite result (screen PPL {}, PPL {:?}, per language {:?}, first-order ΔNLL {})",
            r.dim,
            o.norm,
            r.new_value,
            o.op,
            r.screen_ppl,
            r.ppl,
            r.per_lang_ppl,
            r.first_order_delta_nll
        );
    }
    Ok(())
}

fn print_scan(o: &ScanOutput, top: usize) -> Result<()> {
    outln!(
        "model: {}  norm: {}  op: {}  languages: {}",
        o.model,
        o.norm,
        o.op,
        o.languages.join(" ")
    )?;
    outln!(
        "base geomean PPL: {} at {:?} tokens (screen), {} at {:?} tokens",
        fmt_ppl(o.base_screen_ppl),
        o.screen_tokens,
        fmt_ppl(o.base_ppl),
        o.max_tokens
    )?;
    outln!(
        "{:>4} {:>6} {:>10} {:>10} {:>12} {:>12} {:>12}",
        "rank",
        "dim",
        "weight",
        "new",
        "screen_ppl",
        "ppl",
        "1st-order"
    )?;
    let line = |rank: String, r: &DimRow| -> Result<()> {
        let p = r.ppl.map_or("-".to_string(), fmt_ppl);
        outln!(
            "{:>4} {:>6} {:>10.4} {:>10.4} {:>12} {:>12} {:>12.4}",
            rank,
            r.dim,
            r.weight,
            r.new_value,
            fmt_ppl(r.screen_ppl),
            p,
            r.first_order_delta_nll
        )
    };
    for (i, r) in o.dims.iter().take(top.max(1)).enumerate() {
        line((i + 1).to_string(), r)?;
    }
    if let Some(r) = o.dims.iter().find(|r| r.dim == o.median_dim) {
        line("med".into(), r)?;
    }
    outln!(
        "Spearman(first-order, screen) = {:.3}; Spearman(screen, confirm) over top {} = {}",
        o.spearman_first_order_vs_screen,
        top,
        o.spearman_screen_vs_confirm
            .map_or("-".into(), |v| format!("{v:.3}"))
    )?;
    outln!("timing: {}", o.timing)
}

#[derive(Serialize)]
struct StructCondition {
    condition: String,
    op: String,
    entries: usize,
    geomean_ppl: f64,
    ratio_to_base: f64,
    results: Vec<serde_json::Value>,
}

fn run_structured(a: StructuredArgs) -> Result<()> {
    let ops = ops::parse_ops(&a.op)?;
    let inputs = eval_inputs(&a.eval)?;
    super::ppl::check_texts(&inputs, Some(a.max_tokens))?;
    let limit = a.mem.limit()?;
    let model = Model::load(&a.model)?;
    let layers = parse_list(&a.layers, model.config.num_layers, "layer").context("--layers")?;
    let all: Vec<&str> = structured::KINDS.iter().map(|(s, _)| *s).collect();
    let h = model.config.hidden_size;
    if a.dim >= h {
        bail!(
            "dimension {} out of range: hidden size is {h} (0..{})",
            a.dim,
            h - 1
        );
    }
    let texts = super::ppl::load_texts(&model, &inputs, Some(a.max_tokens))?;
    super::announce_plan(
        "dims structured",
        &memory::forward_plan(&model, 1, a.max_tokens, limit),
    )?;
    let mut groups: Vec<(String, Vec<&str>)> = vec![("all".into(), all.clone())];
    if a.by_kind {
        groups.extend(
            all.iter()
                .map(|k| (structured::kind_label(k).to_string(), vec![*k])),
        );
    }
    let n = 1 + ops.len() * groups.len();
    let pb = bar((n * texts.len()) as u64, "structured", "evals");
    let eval_all = |label: &str| -> Result<Vec<serde_json::Value>> {
        pb.set_message(label.to_string());
        texts
            .iter()
            .map(|(lang, ids)| {
                let r = eval::perplexity(&model, lang, ids, ids.len(), ids.len(), |_| {})?;
                pb.inc(1);
                Ok(serde_json::json!({"lang": lang, "ppl": r.ppl, "bits_per_byte": r.bits_per_byte}))
            })
            .collect()
    };
    let gm = |r: &[serde_json::Value]| {
        geomean(
            &r.iter()
                .map(|x| x["ppl"].as_f64().unwrap_or(f64::NAN))
                .collect::<Vec<_>>(),
        )
    };
    let base = eval_all("base").context("dims structured: condition base")?;
    let base_g = gm(&base);
    let mut conds = vec![StructCondition {
        condition: "base".into(),
        op: "none".into(),
        entries: 0,
        geomean_ppl: base_g,
        ratio_to_base: 1.0,
        results: base,
    }];
    for op in &ops {
        for (label, kinds) in &groups {
            let mask = structured::stripe_mask(&model, a.dim, &layers, kinds)?;
            let saved = ops::apply(&model, &mask, op, a.seed)?;
            let entries = saved.count();
            let r = eval_all(label);
            ops::restore(&model, saved)?;
            let r = r.with_context(|| format!("dims structured: condition {label} ({op})"))?;
            let g = gm(&r);
            conds.push(StructCondition {
                condition: label.clone(),
                op: op.to_string(),
                entries,
                geomean_ppl: g,
                ratio_to_base: g / base_g,
                results: r,
            });
        }
    }
    pb.finish_and_clear();
    let langs: Vec<String> = texts.iter().map(|(l, _)| l.clone()).collect();
    if a.json {
        return super::print_json(&serde_json::json!({
            "model": a.model.display().to_string(), "dim": a.dim, "layers": layers,
            "languages": langs, "conditions": conds,
        }));
    }
    outln!(
        "model: {}  dim: {}  layers: {}",
        a.model.display(),
        a.dim,
        a.layers
    )?;
    let mut head = format!(
        "{:<26} {:<12} {:>8} {:>12} {:>9}",
        "condition", "op", "entries", "geomean_ppl", "ratio"
    );
    for l in &langs {
        head.push_str(&format!(" {l:>9}"));
    }
    outln!("{head}")?;
    for c in &conds {
        let mut row = format!(
            "{:<26} {:<12} {:>8} {:>12} {:>9.3}",
            c.condition,
            c.op,
            c.entries,
            fmt_ppl(c.geomean_ppl),
            c.ratio_to_base
        );
        for r in &c.results {
            row.push_str(&format!(
                " {:>9}",
                fmt_ppl(r["ppl"].as_f64().unwrap_or(f64::NAN))
            ));
        }
        outln!("{row}")?;
    }
    Ok(())
}
