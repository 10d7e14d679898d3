//! `broca region`: build regions (masks) from scores, controls, set operations, overlaps and
//! concentration statistics with heatmaps.

use super::args;
use crate::data::split_values;
use crate::lock::Lock;
use crate::mask::{self, Coverage};
use crate::outln;
use crate::region::ops::{self as rops, SetOp};
use crate::region::select::{Direction, Scope};
use crate::region::{self, heatmap, stats, Region};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct RegionArgs {
    #[command(subcommand)]
    pub command: RegionCommand,
}

#[derive(Subcommand, Debug)]
pub enum RegionCommand {
    /// Core region: the top (or bottom) fraction k of Σ_lang |score|, per tensor or global.
    Core(CoreArgs),
    /// Monolingual region: the target's top-k AND NOT the union of the other languages' top-k.
    Mono(MonoArgs),
    /// Random control: the same count per tensor as a mask, uniformly placed, seeded.
    Random(RandomArgs),
    /// Set operation on two masks: union, intersect or minus (A AND NOT B).
    Ops(OpsArgs),
    /// Overlap of two masks per tensor and in total (|A∩B|, Jaccard, |A∩B|/|A|, |A∩B|/|B|).
    Compare(CompareArgs),
    /// Concentration on hidden dimensions: per-row/column counts, top dims, heatmap PNGs.
    Stats(StatsArgs),
    /// Times selection over synthetic scores (default 1e9 entries) and reports peak memory.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
pub struct CoreArgs {
    /// Score files (one per language, `lang` in their metadata).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append, required = true)]
    pub scores: Vec<String>,
    /// Fraction to select, in (0, 1].
    #[arg(long, default_value_t = 0.01, value_parser = args::fraction)]
    pub k: f64,
    /// Largest (top) or smallest (bottom) scores.
    #[arg(long, value_enum, default_value_t = Direction::Top)]
    pub select: Direction,
    /// floor(k·numel) per tensor, or floor(k·total) over all covered tensors.
    #[arg(long, value_enum, default_value_t = Scope::PerTensor)]
    pub scope: Scope,
    /// Covered tensors: everything under model.layers.* (layers) or every parameter (all).
    #[arg(long, value_enum, default_value_t = Coverage::Layers)]
    pub include: Coverage,
    /// Check the region against this model's parameter names and shapes.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output mask (FILE.safetensors; the summary goes to FILE.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct MonoArgs {
    /// The language whose monolingual region to build (a score file's `lang`).
    #[arg(long)]
    pub target: String,
    /// Score files, one per language (at least two).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append, required = true)]
    pub scores: Vec<String>,
    /// Fraction each language's top-k takes, in (0, 1].
    #[arg(long, default_value_t = 0.01, value_parser = args::fraction)]
    pub k: f64,
    /// Per tensor (the paper) or over all covered tensors.
    #[arg(long, value_enum, default_value_t = Scope::PerTensor)]
    pub scope: Scope,
    /// Covered tensors.
    #[arg(long, value_enum, default_value_t = Coverage::Layers)]
    pub include: Coverage,
    /// Check the region against this model's parameter names and shapes.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output mask (FILE.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RandomArgs {
    /// The mask whose per-tensor counts to copy.
    #[arg(long, required_unless_present = "k", conflicts_with = "k")]
    pub like: Option<PathBuf>,
    /// Without --like: select floor(k · numel) entries of every model.layers.* tensor of
    /// --model (its shapes alone; no weights are read).
    #[arg(long, requires = "model")]
    pub k: Option<f64>,
    /// Random seed.
    #[arg(long, default_value_t = 0, value_parser = args::seed)]
    pub seed: u64,
    /// Check the masks against this model's parameter names and shapes.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output mask (FILE.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct OpsArgs {
    /// union, intersect or minus.
    #[arg(value_enum)]
    pub op: SetOp,
    pub a: PathBuf,
    pub b: PathBuf,
    /// Check the masks against this model's parameter names and shapes.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output mask (FILE.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    pub a: PathBuf,
    pub b: PathBuf,
    /// Check the masks against this model's parameter names and shapes.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    pub mask: PathBuf,
    /// Check the mask against this model's parameter names and shapes.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output folder: stats.json, overview.png and heatmaps/<tensor>.png.
    #[arg(long)]
    pub out: PathBuf,
    /// Tensors to draw (default: layer 0 q_proj, the last down_proj, the most concentrated).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub tensors: Vec<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Total number of synthetic scores.
    #[arg(long, default_value_t = 1_000_000_000, value_parser = args::positive_u64)]
    pub numel: u64,
    /// Fraction to select, in (0, 1].
    #[arg(long, default_value_t = 0.01, value_parser = args::fraction)]
    pub k: f64,
    /// Seed of the synthetic scores.
    #[arg(long, default_value_t = 0, value_parser = args::seed)]
    pub seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `broca region …`.
pub fn run(a: RegionArgs) -> Result<()> {
    match a.command {
        RegionCommand::Core(a) => core(a),
        RegionCommand::Mono(a) => mono(a),
        RegionCommand::Random(a) => random(a),
        RegionCommand::Ops(a) => ops(a),
        RegionCommand::Compare(a) => compare(a),
        RegionCommand::Stats(a) => run_stats(a),
        RegionCommand::Bench(a) => bench(a),
    }
}

/// Errors unless `r` matches the model at `model` (names and shapes).
fn check_model(r: &Region, model: Option<&Path>, what: &str) -> Result<()> {
    let Some(m) = model else { return Ok(()) };
    let shapes = mask::model_shapes(m)?;
    mask::check_layout(&region::shapes(r), &shapes)
        .with_context(|| format!("{what} does not fit the model {}", m.display()))
}

/// Errors unless mask `r` matches the model at `model` (names and shapes).
fn check_model_mask(r: &mask::Mask, model: Option<&Path>, what: &str) -> Result<()> {
    let Some(m) = model else { return Ok(()) };
    mask::check_against_shapes(r, &mask::model_shapes(m)?)
        .with_context(|| format!("{what} does not fit the model {}", m.display()))
}

/// Loads a mask file, checked against the model when one is given.
fn load_mask(path: &Path, model: Option<&Path>) -> Result<Region> {
    let r = region::load(path)?;
    check_model(&r, model, &path.display().to_string())?;
    Ok(r)
}

/// Saves, then prints the summary (JSON or one line).
fn finish(out: &Path, r: &Region, how: serde_json::Value, json: bool) -> Result<()> {
    finish_mask(out, &region::to_mask(r)?, how, json)
}

/// [`finish`] for a mask.
fn finish_mask(out: &Path, r: &mask::Mask, how: serde_json::Value, json: bool) -> Result<()> {
    mask::save(out, r, how)?;
    let total: u64 = r.values().map(|t| t.count() as u64).sum();
    let numel: u64 = r.values().map(|t| t.numel() as u64).sum();
    if json {
        let s = mask::summary(r, serde_json::Value::Null);
        return super::print_json(
            &json!({"out": out, "summary": mask::summary_path(out), "total": s["total"], "tensors": r.len()}),
        );
    }
    outln!(
        "{}: {total} of {numel} entries ({:.4}%) in {} tensors; summary {}",
        out.display(),
        100.0 * total as f64 / numel.max(1) as f64,
        r.len(),
        mask::summary_path(out).display()
    )?;
    Ok(())
}

fn core(a: CoreArgs) -> Result<()> {
    region::check_fraction(a.k)?;
    let files = split_values(&a.scores);
    let _lock = Lock::file(&a.out)?;
    let (langs, masks) = region::build::core(&files, &[a.k], a.select, a.scope, a.include)?;
    let r = masks.into_iter().next().unwrap_or_default();
    check_model_mask(&r, a.model.as_deref(), "the score files")?;
    let how = json!({
        "method": "core", "k": a.k, "select": a.select, "scope": a.scope, "include": a.include,
        "languages": langs, "scores": files, "ties": "lower flat index (tensors in name order)",
    });
    finish_mask(&a.out, &r, how, a.json)
}

fn mono(a: MonoArgs) -> Result<()> {
    region::check_fraction(a.k)?;
    let files = split_values(&a.scores);
    let _lock = Lock::file(&a.out)?;
    let (langs, r) =
        region::build::mono(&files, &a.target, a.k, a.include, a.scope).context("--scores")?;
    check_model_mask(&r, a.model.as_deref(), "the score files")?;
    let how = json!({
        "method": "mono", "target": a.target, "k": a.k, "select": "top", "scope": a.scope,
        "include": a.include, "languages": langs, "scores": files,
    });
    finish_mask(&a.out, &r, how, a.json)
}

fn random(a: RandomArgs) -> Result<()> {
    let _lock = Lock::file(&a.out)?;
    let (r, how) = match (&a.like, a.k, &a.model) {
        (Some(like), _, model) => {
            let like_mask = mask::load(like)?;
            if let Some(m) = model {
                mask::check_against_shapes(&like_mask, &mask::model_shapes(m)?).with_context(
                    || format!("{} does not fit the model {}", like.display(), m.display()),
                )?;
            }
            let r = region::random::random_like(&like_mask, a.seed)?;
            (r, json!({"method": "random", "like": like, "seed": a.seed}))
        }
        (None, Some(k), Some(model)) => {
            region::check_fraction(k)?;
            let shapes = crate::mask::model_shapes(model)?;
            let r = region::random::random_fraction(&shapes, k, a.seed, Coverage::Layers)?;
            let how = json!({"method": "random", "k": k, "model": model, "seed": a.seed, "include": "layers"});
            (r, how)
        }
        _ => bail!("--like MASK, or --k F with --model PATH, is required"),
    };
    finish_mask(&a.out, &r, how, a.json)
}

fn ops(a: OpsArgs) -> Result<()> {
    let _lock = Lock::file(&a.out)?;
    let x = load_mask(&a.a, a.model.as_deref())?;
    let y = load_mask(&a.b, a.model.as_deref())?;
    region::check_same_layout(
        &x,
        &y,
        &a.a.display().to_string(),
        &a.b.display().to_string(),
    )?;
    let r = rops::apply(a.op, &x, &y);
    let how = json!({"method": a.op, "a": a.a, "b": a.b});
    finish(&a.out, &r, how, a.json)
}

fn compare(a: CompareArgs) -> Result<()> {
    let x = load_mask(&a.a, a.model.as_deref())?;
    let y = load_mask(&a.b, a.model.as_deref())?;
    region::check_same_layout(
        &x,
        &y,
        &a.a.display().to_string(),
        &a.b.display().to_string(),
    )?;
    let (per, total) = rops::compare(&x, &y);
    if a.json {
        return super::print_json(&json!({"a": a.a, "b": a.b, "total": total, "tensors": per}));
    }
    outln!("A = {}\nB = {}", a.a.display(), a.b.display())?;
    outln!(
        "{:<48} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "tensor",
        "|A|",
        "|B|",
        "|A∩B|",
        "jaccard",
        "∩/|A|",
        "∩/|B|"
    )?;
    for o in per.iter().chain(std::iter::once(&total)) {
        outln!(
            "{:<48} {:>10} {:>10} {:>10} {:>8.4} {:>8.4} {:>8.4}",
            o.name,
            o.a,
            o.b,
            o.both,
            o.jaccard,
            o.of_a,
            o.of_b
        )?;
    }
    Ok(())
}

/// A file name for a tensor's heatmap.
fn heatmap_name(tensor: &str) -> String {
    format!("{}.png", tensor.replace(['/', '\\'], "_"))
}

fn run_stats(a: StatsArgs) -> Result<()> {
    let r = load_mask(&a.mask, a.model.as_deref())?;
    let _lock = Lock::dir(&a.out)?;
    let s = stats::region_stats(&r);
    let chosen = match split_values(&a.tensors) {
        t if t.is_empty() => stats::default_heatmap_tensors(&r, &s, 3),
        t => {
            if let Some(n) = t.iter().find(|n| !r.contains_key(n.as_str())) {
                bail!("{}: no tensor {n} in this mask", a.mask.display());
            }
            t
        }
    };
    let mut images = Vec::new();
    for n in &chosen {
        let p = a.out.join("heatmaps").join(heatmap_name(n));
        heatmap::write_grid(&p, &heatmap::tensor_grid(&r[n]), 64, heatmap::Scale::Counts)?;
        images.push(json!({"tensor": n, "path": p}));
    }
    let overview = (!s.layers.is_empty()).then(|| a.out.join("overview.png"));
    if let Some(p) = &overview {
        let counts: Vec<Vec<u64>> = s.layers.iter().map(|l| l.hidden_counts.clone()).collect();
        heatmap::write_grid(
            p,
            &heatmap::overview_grid(&counts),
            480,
            heatmap::Scale::Enrichment,
        )?;
    }
    let stats_path = a.out.join("stats.json");
    let doc = json!({"mask": a.mask, "overview": overview, "images": images, "stats": s});
    crate::io::write_json(&stats_path, &doc)?;
    if a.json {
        let g = s.global.as_ref();
        return super::print_json(&json!({
            "mask": a.mask, "stats": stats_path, "overview": overview, "images": images,
            "top_dims": g.map(|g| &g.top_dims), "concentration": g.map(|g| &g.concentration),
            "most_concentrated": s.most_concentrated,
        }));
    }
    outln!(
        "{}: {} of {} entries selected",
        a.mask.display(),
        s.count,
        s.numel
    )?;
    if let Some(g) = &s.global {
        outln!(
            "hidden dims over all layers (hidden size {}): gini {:.3}, top 1% ({} dims) hold {:.1}%",
            g.hidden_size,
            g.concentration.gini,
            g.concentration.top1pct_len,
            100.0 * g.concentration.top1pct_share
        )?;
        outln!(
            "{:>6} {:>10} {:>8} {:>14} {:>11}",
            "dim",
            "count",
            "share",
            "layers(top10)",
            "norm layers"
        )?;
        for d in g.top_dims.iter().take(10) {
            outln!(
                "{:>6} {:>10} {:>7.2}% {:>14} {:>11}",
                d.dim,
                d.count,
                100.0 * d.share,
                d.layers_in_top10,
                d.norm_layers
            )?;
        }
    }
    outln!("most concentrated tensors (share of the selection in the top 1% of hidden dims):")?;
    for c in s.most_concentrated.iter().take(5) {
        let dims: Vec<String> = c.top_dims.iter().map(|d| d.index.to_string()).collect();
        outln!(
            "  {:<48} {:>6.1}%  gini {:.3}  dims {}",
            c.name,
            100.0 * c.top1pct_share,
            c.gini,
            dims.join(",")
        )?;
    }
    outln!("stats {}", stats_path.display())?;
    if let Some(p) = &overview {
        outln!("overview {}", p.display())?;
    }
    for i in &images {
        outln!("heatmap {}", i["path"].as_str().unwrap_or_default())?;
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    region::check_fraction(a.k)?;
    let r = region::bench::run(a.numel, a.k, a.seed)?;
    if a.json {
        return super::print_json(&r);
    }
    outln!(
        "{} synthetic scores ({:.0} MB) in {} tensors, k = {}, {} threads",
        r.numel,
        r.scores_mb,
        r.tensors,
        r.k,
        r.threads
    )?;
    outln!("generate              {:>8.2} s", r.generate_s)?;
    outln!(
        "per-tensor top        {:>8.2} s  ({:.2} CPU s)",
        r.per_tensor_top_s,
        r.per_tensor_top_cpu_s
    )?;
    outln!(
        "per-tensor bottom     {:>8.2} s  ({:.2} CPU s)",
        r.per_tensor_bottom_s,
        r.per_tensor_bottom_cpu_s
    )?;
    outln!(
        "global top            {:>8.2} s  ({:.2} CPU s)",
        r.global_top_s,
        r.global_top_cpu_s
    )?;
    outln!(
        "peak RSS              {:>8.0} MB ({:.2}x the scores)",
        r.peak_rss_mb,
        r.rss_over_scores
    )?;
    Ok(())
}
