//! `broca reproduce`: the whole study (baseline → importance → regions → ablation →
//! concentration → dimension scans → structured perturbation → generation → super weights →
//! forgetting) in one resumable run, and the HTML report built from its outputs.
//!
//! Each stage is a call into the same library functions the subcommands use. A stage writes
//! its outputs atomically under DIR, then `DIR/stages/<stage>.json` with the hash of its
//! inputs (its config section, the model's sha256, the input texts and the upstream stages'
//! hashes), so a rerun skips finished stages and recomputes only what changed.

pub mod cache;
pub mod config;
mod experiments;
pub mod html;
mod stages;

use crate::model::Model;
use anyhow::{bail, Context, Result};
use config::StudyConfig;
use serde::Serialize;
use serde_json::{json, Value};
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to run (besides the config).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Run only these stages (their upstream stages must be finished already).
    pub only: Vec<String>,
    /// Tests: fail right after this stage is recorded, as a kill would.
    pub stop_after_stage: Option<String>,
    /// Tests: the importance stage fails after this many windows of a language (after
    /// checkpointing each window), as a kill inside the stage would.
    pub importance_stop_after_windows: Option<usize>,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Stages that ran (work was done).
    pub executed: Vec<String>,
    /// Stages found finished with the same inputs.
    pub skipped: Vec<String>,
    /// Seconds per executed stage.
    pub seconds: BTreeMap<String, f64>,
    pub wall_s: f64,
    pub report: PathBuf,
}

/// Shared state of one run: config, output folder, the model (loaded on first use).
pub(crate) struct Ctx<'a> {
    pub cfg: &'a StudyConfig,
    pub dir: PathBuf,
    pub model_path: PathBuf,
    pub model_sha: String,
    pub opts: &'a Options,
    model: OnceCell<Model>,
    hashes: std::cell::RefCell<BTreeMap<String, String>>,
}

impl Ctx<'_> {
    /// The model, loaded once.
    pub fn model(&self) -> Result<&Model> {
        if let Some(m) = self.model.get() {
            return Ok(m);
        }
        let t = Instant::now();
        let m = Model::load(&self.model_path)?;
        eprintln!(
            "study: loaded {} in {:.1}s",
            self.model_path.display(),
            t.elapsed().as_secs_f64()
        );
        eprintln!("reproduce: {}", self.forward_plan(&m));
        let _ = self.model.set(m);
        Ok(self.model.get().expect("just set"))
    }

    /// The memory plan of the largest forward of the stages that only run the model
    /// (baseline, ablation, scans, generation, super weights), against the default limit;
    /// importance and forgetting plan their own passes.
    fn forward_plan(&self, m: &Model) -> crate::memory::Plan {
        use crate::perturb::scan::batch_for;
        let c = self.cfg;
        let prompt = |p: &str| {
            m.tokenizer
                .as_ref()
                .and_then(|t| t.encode(p).ok())
                .map_or(0, |ids| ids.len())
        };
        let gen = c.generation.max_tokens
            + c.generation
                .prompts
                .iter()
                .map(|p| prompt(p))
                .max()
                .unwrap_or(0);
        let (b, t) = [
            (1, c.eval.seq_len.min(c.eval.max_tokens)),
            (batch_for(None, c.dims.screen_tokens), c.dims.screen_tokens),
            (batch_for(None, c.dims.max_tokens), c.dims.max_tokens),
            (1, c.superweights.eval_tokens),
            (1, gen),
        ]
        .into_iter()
        .max_by_key(|(b, t)| b * t)
        .unwrap_or((1, 2));
        let mut plan = crate::memory::forward_plan(m, b, t, crate::memory::default_limit());
        plan.note =
            "largest forward of the stages; importance and forgetting plan their own".into();
        plan
    }

    /// A path under DIR.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

/// The stages a stage reads the outputs of.
pub fn upstream(stage: &str) -> &'static [&'static str] {
    match stage {
        "regions" => &["importance"],
        "ablation" => &["regions"],
        "concentration" => &["regions"],
        "structured" => &["dims"],
        "generation" => &["regions", "dims"],
        "forgetting" => &["regions"],
        _ => &[],
    }
}

/// Paths under DIR a stage owns (removed when its inputs changed).
fn owned(stage: &str) -> &'static [&'static str] {
    match stage {
        "baseline" => &["baseline.json", "baseline.csv"],
        "importance" => &["scores"],
        "regions" => &["regions"],
        "ablation" => &["ablation.json", "ablation.csv"],
        "concentration" => &["concentration"],
        "dims" => &["dims"],
        "structured" => &["structured.json", "structured.csv"],
        "generation" => &["generation.json"],
        "superweights" => &["superweights.json", "superweights.csv"],
        "forgetting" => &["forgetting"],
        _ => &[],
    }
}

/// sha256 of each text file a stage reads, keyed by language.
fn text_hashes(dir: &Path, langs: &[String]) -> Result<Value> {
    let mut m = serde_json::Map::new();
    for l in langs {
        let p = dir.join(format!("{l}.txt"));
        m.insert(l.clone(), Value::String(crate::io::sha256_file(&p)?));
    }
    Ok(Value::Object(m))
}

/// The config section (and text hashes) a stage's results depend on.
fn section(ctx: &Ctx, stage: &str) -> Result<Value> {
    let c = ctx.cfg;
    let eval_dir = config::expand(&c.eval.dir);
    Ok(match stage {
        "baseline" => {
            json!({"eval": c.eval, "texts": text_hashes(&eval_dir, &stages::eval_langs(c)?)?})
        }
        "importance" => {
            json!({"importance": c.importance, "texts": text_hashes(&config::expand(&c.importance.corpus_dir), &c.importance.languages)?})
        }
        "regions" => json!({"k": c.regions.k, "mono_k": c.regions.mono_k}),
        "ablation" => {
            json!({"eval": c.eval, "ops": c.regions.ops, "controls": c.regions.controls, "seed": c.seed})
        }
        "concentration" => json!({}),
        "dims" => {
            json!({"dims": c.dims, "seed": c.seed, "texts": text_hashes(&eval_dir, &c.dims.languages)?})
        }
        "structured" => json!({"structured": c.structured, "seed": c.seed}),
        "generation" => json!({"generation": c.generation, "seed": c.seed}),
        "superweights" => {
            json!({"superweights": c.superweights, "texts": text_hashes(&eval_dir, std::slice::from_ref(&c.superweights.eval_lang))?})
        }
        "forgetting" => {
            let mut langs = c.forgetting.eval_languages.clone();
            langs.retain(|l| eval_dir.join(format!("{l}.txt")).exists());
            json!({"forgetting": c.forgetting, "seed": c.seed, "texts": text_hashes(&eval_dir, &langs)?,
                   "train": text_hashes(&config::expand(&c.forgetting.train_dir), std::slice::from_ref(&c.forgetting.train_lang))?})
        }
        _ => bail!("unknown stage '{stage}'"),
    })
}

/// The input hash of a stage (recursively over its upstream stages).
fn stage_hash(ctx: &Ctx, stage: &str) -> Result<String> {
    if let Some(h) = ctx.hashes.borrow().get(stage) {
        return Ok(h.clone());
    }
    let mut parts = vec![
        json!("broca-study-v1"),
        json!(stage),
        json!(ctx.model_sha),
        section(ctx, stage)?,
    ];
    for up in upstream(stage) {
        parts.push(json!({*up: stage_hash(ctx, up)?}));
    }
    let h = cache::input_hash(&parts);
    ctx.hashes.borrow_mut().insert(stage.to_string(), h.clone());
    Ok(h)
}

fn started_path(dir: &Path, stage: &str) -> PathBuf {
    dir.join("stages").join(format!("{stage}.started"))
}

/// Removes a stage's outputs unless they were started with the same inputs (so a stage
/// interrupted midway resumes, and one whose inputs changed starts clean).
fn prepare_stage(dir: &Path, stage: &str, hash: &str) -> Result<()> {
    let sp = started_path(dir, stage);
    if std::fs::read_to_string(&sp).ok().as_deref() == Some(hash) {
        return Ok(());
    }
    let _ = std::fs::remove_file(dir.join("stages").join(format!("{stage}.json")));
    for rel in owned(stage) {
        let p = dir.join(rel);
        if p.is_dir() {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("{}: cannot remove", p.display()))?;
        } else if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("{}: cannot remove", p.display()))?;
        }
    }
    crate::io::atomic_write(&sp, hash.as_bytes())
}

fn run_stage(ctx: &Ctx, stage: &str) -> Result<Vec<String>> {
    match stage {
        "baseline" => stages::baseline(ctx),
        "importance" => stages::importance(ctx),
        "regions" => stages::regions(ctx),
        "concentration" => stages::concentration(ctx),
        "ablation" => experiments::ablation(ctx),
        "dims" => experiments::dims(ctx),
        "structured" => experiments::structured(ctx),
        "generation" => experiments::generation(ctx),
        "superweights" => experiments::superweights(ctx),
        "forgetting" => experiments::forgetting(ctx),
        _ => bail!("unknown stage '{stage}'"),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the study into `dir` (resuming), then writes `dir/report.html`.
pub fn run(cfg: &StudyConfig, dir: &Path, opts: &Options) -> Result<Summary> {
    let t0 = Instant::now();
    cfg.validate()?;
    for s in &opts.only {
        if !config::ALL_STAGES.contains(&s.as_str()) {
            bail!(
                "--only {s}: unknown stage (stages: {})",
                config::ALL_STAGES.join(", ")
            );
        }
    }
    let model_path = config::expand(&cfg.model);
    if !model_path.exists() {
        bail!(
            "{}: model not found (run scripts/fetch-assets, or give --model)",
            model_path.display()
        );
    }
    std::fs::create_dir_all(dir.join("stages"))
        .with_context(|| format!("{}: cannot create", dir.display()))?;
    let toml = cfg.to_toml()?;
    if std::fs::read_to_string(dir.join("study.toml"))
        .ok()
        .as_deref()
        != Some(toml.as_str())
    {
        crate::io::atomic_write(&dir.join("study.toml"), toml.as_bytes())?;
    }
    let model_sha = crate::score::model_sha256(&model_path)?;
    let ctx = Ctx {
        cfg,
        dir: dir.to_path_buf(),
        model_path,
        model_sha,
        opts,
        model: OnceCell::new(),
        hashes: Default::default(),
    };
    let mut list = cfg.stage_list();
    if !opts.only.is_empty() {
        list.retain(|s| opts.only.contains(s));
    }
    let mut summary = Summary {
        executed: Vec::new(),
        skipped: Vec::new(),
        seconds: BTreeMap::new(),
        wall_s: 0.0,
        report: dir.join("report.html"),
    };
    for stage in &list {
        let hash = stage_hash(&ctx, stage)?;
        if cache::finished(dir, stage, &hash).is_some() {
            eprintln!("study: {stage}: up to date");
            summary.skipped.push(stage.clone());
            continue;
        }
        for up in upstream(stage) {
            if cache::finished(dir, up, &stage_hash(&ctx, up)?).is_none() {
                bail!("stage {stage} needs stage {up}, which is not finished with the current config (run it too)");
            }
        }
        prepare_stage(dir, stage, &hash)?;
        let ts = Instant::now();
        eprintln!("study: {stage}: running");
        let outputs = run_stage(&ctx, stage).with_context(|| format!("stage {stage}"))?;
        let seconds = ts.elapsed().as_secs_f64();
        cache::mark(
            dir,
            &cache::StageRecord {
                stage: stage.clone(),
                hash,
                outputs,
                seconds,
                finished_at: unix_now(),
            },
        )?;
        eprintln!("study: {stage}: done in {seconds:.1}s");
        summary.executed.push(stage.clone());
        summary.seconds.insert(stage.clone(), seconds);
        if opts.stop_after_stage.as_deref() == Some(stage.as_str()) {
            bail!("stopped after stage {stage} (test hook)");
        }
    }
    let tr = Instant::now();
    let run_info = json!({"wall_s": t0.elapsed().as_secs_f64(), "executed": summary.executed, "finished_at": unix_now()});
    html::write(&ctx, &run_info)?;
    summary.wall_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "study: report {} ({:.1}s); total {:.1}s",
        summary.report.display(),
        tr.elapsed().as_secs_f64(),
        summary.wall_s
    );
    Ok(summary)
}
