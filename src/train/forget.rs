//! The forgetting experiment: train on new-language data under three conditions with the
//! same seed and data — nothing frozen, a region frozen, a random region of the same
//! per-tensor sizes frozen — and record how the perplexity of the trained language and of
//! the other languages moves. The compensation experiment: randomize the region (normal
//! with each tensor's mean and standard deviation), then retrain with the region frozen vs
//! free and record how each language recovers.
//!
//! Outputs under `out`: one training directory per condition (`none/`, `region/`,
//! `random/`, and with compensation `compensation-frozen/`, `compensation-free/`), each with
//! its `eval.csv`/`eval.json`; `curves.csv` (all conditions), `forget.json`, and the plots
//! `forgetting.png` and `compensation.png`.

use super::curves::EvalPoint;
use super::plot::{self, Panel, Series};
use super::trainer::{self, RunOptions, TrainConfig, TrainInputs};
use crate::data::{self, TextInput};
use crate::io::{atomic_write, write_json};
use crate::mask::{self, Mask};
use crate::model::Model;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What to run.
#[derive(Clone, Debug)]
pub struct ForgetSpec {
    /// Base model (GGUF file or HF directory).
    pub model: PathBuf,
    /// Training texts (the "new" language or languages).
    pub train: Vec<TextInput>,
    /// Evaluation texts.
    pub eval: Vec<TextInput>,
    /// The region (mask file) to freeze.
    pub region: PathBuf,
    pub config: TrainConfig,
    /// Cap on tokens per evaluation text.
    pub eval_tokens: Option<usize>,
    /// Cap on tokens per training text.
    pub data_tokens: Option<usize>,
    /// Also run the compensation experiment.
    pub compensation: bool,
    /// Reuse finished conditions and checkpoints under `out`.
    pub resume: bool,
    pub out: PathBuf,
    /// Memory limit in bytes: the run refuses before decoding the model when training
    /// needs more (see [`crate::memory::TrainNeed`]).
    pub mem_limit: u64,
}

/// One trained condition.
#[derive(Clone, Debug, Serialize)]
pub struct ConditionResult {
    /// `none`, the region's name, `random(NAME)`, `randomized(NAME)+frozen`, `randomized(NAME)+free`.
    pub condition: String,
    pub dir: String,
    pub frozen_elements: u64,
    pub losses: Vec<f64>,
    pub eval: Vec<EvalPoint>,
    /// Per language: PPL at the first and the last evaluated step.
    pub summary: Vec<LangSummary>,
}

/// A language's PPL before and after.
#[derive(Clone, Debug, Serialize)]
pub struct LangSummary {
    pub lang: String,
    pub trained: bool,
    pub ppl_start: f64,
    pub ppl_end: f64,
    pub ratio: f64,
}

/// The experiment's results.
#[derive(Clone, Debug, Serialize)]
pub struct ForgetReport {
    pub model: String,
    pub region: String,
    pub train_langs: Vec<String>,
    pub eval_langs: Vec<String>,
    pub config: TrainConfig,
    pub conditions: Vec<ConditionResult>,
    pub compensation: Vec<ConditionResult>,
    pub plots: Vec<String>,
}

/// Tokenizes texts with the model's tokenizer, keeping at most `cap` tokens of each. Each
/// text is read once ([`data::text_tokens`]); with a cap, only the prefix the cap needs is
/// read and tokenized, and its tokens equal the first `cap` of the whole text's.
pub fn tokenize(
    model: &Model,
    inputs: &[TextInput],
    cap: Option<usize>,
) -> Result<Vec<(String, Vec<u32>)>> {
    let tok = model.tokenizer()?;
    inputs
        .iter()
        .map(|t| Ok((t.lang.clone(), data::text_tokens(tok, &t.path, cap)?)))
        .collect()
}

/// Replaces the masked entries of each masked parameter by draws from a normal with that
/// whole tensor's mean and standard deviation (seeded).
pub fn randomize(model: &Model, mask: &Mask, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, m) in mask {
        let var = model
            .param(name)
            .with_context(|| format!("mask tensor {name} is not a parameter"))?
            .var()?;
        let mut w: Vec<f32> = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let flags: Vec<u8> = m.to_bits();
        let n = w.len() as f64;
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var_ = w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let normal = rand_distr::Normal::new(mean, var_.sqrt().max(1e-12))?;
        for (x, &f) in w.iter_mut().zip(&flags) {
            if f != 0 {
                *x = normal.sample(&mut rng) as f32;
            }
        }
        var.set(&Tensor::from_vec(w, var.dims(), &Device::Cpu)?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// An independent copy of a model (own storage).
pub fn copy_model(base: &Model) -> Result<Model> {
    let w = base.named_tensors()?.into_iter().collect();
    let mut m = Model::from_weights(base.config.clone(), w)?;
    m.tokenizer = base
        .tokenizer
        .as_ref()
        .map(|t| crate::tokenizer::Tokenizer {
            inner: t.inner.clone(),
            bos: t.bos,
            eos: t.eos,
        });
    m.source = base.source.clone();
    Ok(m)
}

fn summarize(eval: &[EvalPoint], train_langs: &[String]) -> Vec<LangSummary> {
    let mut langs: Vec<&str> = Vec::new();
    for p in eval {
        if !langs.contains(&p.lang.as_str()) {
            langs.push(&p.lang);
        }
    }
    langs
        .into_iter()
        .filter_map(|l| {
            let pts: Vec<&EvalPoint> = eval.iter().filter(|p| p.lang == l).collect();
            let first = pts.iter().min_by_key(|p| p.step)?;
            let last = pts.iter().max_by_key(|p| p.step)?;
            Some(LangSummary {
                lang: l.to_string(),
                trained: train_langs.iter().any(|t| t == l),
                ppl_start: first.ppl,
                ppl_end: last.ppl,
                ratio: last.ppl / first.ppl,
            })
        })
        .collect()
}

/// Trains one condition from a fresh copy of `base` (after `prepare`) into `out/dir`.
#[allow(clippy::too_many_arguments)]
fn run_condition(
    base: &Model,
    spec: &ForgetSpec,
    data: &[(String, Vec<u32>)],
    eval: &[(String, Vec<u32>)],
    condition: &str,
    dir: &str,
    freeze: Option<&Mask>,
    prepare: impl FnOnce(&Model) -> Result<()>,
    train_langs: &[String],
) -> Result<ConditionResult> {
    let mut model = copy_model(base)?;
    prepare(&model)?;
    let inputs = TrainInputs {
        data: data.to_vec(),
        eval: eval.to_vec(),
        freeze,
    };
    let opts = RunOptions {
        resume: spec.resume,
        stop_after: None,
        label: condition.to_string(),
    };
    eprintln!(
        "condition {condition}: training into {}",
        spec.out.join(dir).display()
    );
    let r = trainer::train(
        &mut model,
        &inputs,
        &spec.config,
        &spec.out.join(dir),
        &opts,
    )?;
    Ok(ConditionResult {
        condition: condition.to_string(),
        dir: dir.to_string(),
        frozen_elements: r.frozen_elements,
        summary: summarize(&r.eval, train_langs),
        losses: r.losses,
        eval: r.eval,
    })
}

fn panels(
    results: &[ConditionResult],
    eval_langs: &[String],
    train_langs: &[String],
    reference: Option<&ConditionResult>,
) -> Vec<Panel> {
    eval_langs
        .iter()
        .map(|lang| {
            let mut series: Vec<Series> = results
                .iter()
                .map(|c| Series {
                    label: c.condition.clone(),
                    points: c
                        .eval
                        .iter()
                        .filter(|p| &p.lang == lang)
                        .map(|p| (p.step as f64, p.ppl))
                        .collect(),
                })
                .collect();
            if let Some(r) = reference {
                let pts: Vec<&EvalPoint> = r.eval.iter().filter(|p| &p.lang == lang).collect();
                if let (Some(first), Some(last)) = (
                    pts.iter().min_by_key(|p| p.step),
                    pts.iter().max_by_key(|p| p.step),
                ) {
                    series.push(Series {
                        label: "base model".into(),
                        points: vec![(0.0, first.ppl), (last.step as f64, first.ppl)],
                    });
                }
            }
            let title = if train_langs.contains(lang) {
                format!("{lang} (trained)")
            } else {
                lang.clone()
            };
            Panel { title, series }
        })
        .collect()
}

/// The CSV of every condition's curve: `experiment,condition,step,lang,tokens,nll,ppl,bits_per_byte`.
fn curves_csv(report: &ForgetReport) -> String {
    let mut s = String::from("experiment,condition,step,lang,tokens,nll,ppl,bits_per_byte\n");
    for (exp, list) in [
        ("forgetting", &report.conditions),
        ("compensation", &report.compensation),
    ] {
        for c in list {
            for p in &c.eval {
                s.push_str(&format!(
                    "{exp},{},{},{},{},{},{},{}\n",
                    c.condition, p.step, p.lang, p.tokens, p.nll, p.ppl, p.bits_per_byte
                ));
            }
        }
    }
    s
}

/// A model's name for messages: its file or folder name.
pub fn model_name(path: &std::path::Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Runs the experiment (and, with `spec.compensation`, the compensation experiment).
pub fn run(spec: &ForgetSpec) -> Result<ForgetReport> {
    let base = Model::load(&spec.model)?;
    let region = mask::load_for(&spec.region, &base)?;
    // the base and one trained copy, with nothing frozen in the `none` condition
    let need = crate::memory::TrainNeed::of(
        &base,
        &vec![true; base.params.len()],
        spec.config.batch,
        spec.config.seq_len,
        spec.config.grad_accum,
        2,
    );
    need.check(spec.mem_limit, &model_name(&spec.model))?;
    eprintln!("forget: {}", need.plan(spec.mem_limit));
    let base = trainer::into_f32(base)?;
    let name = spec
        .region
        .file_stem()
        .map(|s| s.to_string_lossy().replace(".safetensors", ""))
        .unwrap_or_else(|| "region".into());
    let data = tokenize(&base, &spec.train, spec.data_tokens)?;
    let eval = tokenize(&base, &spec.eval, spec.eval_tokens)?;
    let train_langs: Vec<String> = data.iter().map(|d| d.0.clone()).collect();
    let eval_langs: Vec<String> = eval.iter().map(|d| d.0.clone()).collect();
    let random = crate::region::random::random_like(&region, spec.config.seed ^ 0x5eed_0001)?;
    std::fs::create_dir_all(&spec.out)
        .with_context(|| format!("{}: cannot create", spec.out.display()))?;
    mask::save(
        &spec.out.join("random-mask.safetensors"),
        &random,
        serde_json::json!({"method": "random", "like": spec.region.display().to_string(), "seed": spec.config.seed ^ 0x5eed_0001}),
    )?;
    let mut conditions = Vec::new();
    for (cond, dir, freeze) in [
        ("none".to_string(), "none", None),
        (name.clone(), "region", Some(&region)),
        (format!("random({name})"), "random", Some(&random)),
    ] {
        conditions.push(run_condition(
            &base,
            spec,
            &data,
            &eval,
            &cond,
            dir,
            freeze,
            |_| Ok(()),
            &train_langs,
        )?);
    }
    let mut compensation = Vec::new();
    if spec.compensation {
        let seed = spec.config.seed ^ 0x5eed_0002;
        for (cond, dir, freeze) in [
            (
                format!("randomized({name})+frozen"),
                "compensation-frozen",
                Some(&region),
            ),
            (
                format!("randomized({name})+free"),
                "compensation-free",
                None,
            ),
        ] {
            let prep = |m: &Model| randomize(m, &region, seed);
            compensation.push(run_condition(
                &base,
                spec,
                &data,
                &eval,
                &cond,
                dir,
                freeze,
                prep,
                &train_langs,
            )?);
        }
    }
    let mut report = ForgetReport {
        model: spec.model.display().to_string(),
        region: spec.region.display().to_string(),
        train_langs: train_langs.clone(),
        eval_langs: eval_langs.clone(),
        config: spec.config.clone(),
        conditions,
        compensation,
        plots: Vec::new(),
    };
    let cols = if eval_langs.len() <= 4 {
        eval_langs.len()
    } else {
        3
    };
    let fp = spec.out.join("forgetting.png");
    let title = format!(
        "forgetting: train on {} ({} steps), frozen region vs none vs random",
        train_langs.join("+"),
        spec.config.steps
    );
    plot::render(
        &fp,
        &title,
        &panels(&report.conditions, &eval_langs, &train_langs, None),
        "step",
        "ppl",
        true,
        cols,
    )?;
    report.plots.push(fp.display().to_string());
    if spec.compensation {
        let cp = spec.out.join("compensation.png");
        let title = format!(
            "compensation: region randomized, retrain on {} with it frozen vs free",
            train_langs.join("+")
        );
        plot::render(
            &cp,
            &title,
            &panels(
                &report.compensation,
                &eval_langs,
                &train_langs,
                report.conditions.first(),
            ),
            "step",
            "ppl",
            true,
            cols,
        )?;
        report.plots.push(cp.display().to_string());
    }
    atomic_write(&spec.out.join("curves.csv"), curves_csv(&report).as_bytes())?;
    write_json(&spec.out.join("forget.json"), &report)?;
    Ok(report)
}

/// Where the experiment writes its summary (for callers).
pub fn report_path(out: &Path) -> PathBuf {
    out.join("forget.json")
}
