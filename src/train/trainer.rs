//! The training loop: shuffled windows → forward+backward (gradient accumulation) → masked
//! AdamW, with evaluation curves, checkpoints, exact resume and the final model.

use super::adamw::{AdamW, AdamWConfig};
use super::checkpoint::{self, TrainState};
use super::curves::{self, EvalPoint};
use super::schedule::{lr_at, Schedule};
use super::stream::Stream;
use crate::mask::Mask;
use crate::model::Model;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Instant;

/// Settings of one training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Windows per micro-batch.
    pub batch: usize,
    /// Micro-batches accumulated per step.
    pub grad_accum: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Warmup steps (capped at `steps`).
    pub warmup: usize,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    /// Seed of the data order.
    pub seed: u64,
    /// Evaluate every K steps (besides step 0 and the last step); 0 = only those two.
    pub eval_every: usize,
    /// Window length of the evaluation.
    pub eval_seq_len: usize,
    /// Write a checkpoint every K steps; 0 = never.
    pub checkpoint_every: usize,
    /// Checkpoints kept (the newest).
    pub keep_checkpoints: usize,
    /// Write the final model (config.json, model.safetensors, tokenizer.json) into the output.
    pub save_model: bool,
}

impl Default for TrainConfig {
    /// The official settings (lr 5e-5, cosine, 100 warmup steps, seq 512) for 100 steps.
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            lr: 5e-5,
            batch: 1,
            grad_accum: 1,
            seq_len: 512,
            warmup: 100,
            schedule: Schedule::Cosine,
            adamw: AdamWConfig::default(),
            seed: 0,
            eval_every: 0,
            eval_seq_len: 512,
            checkpoint_every: 0,
            keep_checkpoints: 1,
            save_model: true,
        }
    }
}

/// What a run is given besides its settings.
pub struct TrainInputs<'a> {
    /// Training texts: (language, token ids).
    pub data: Vec<(String, Vec<u32>)>,
    /// Evaluation texts: (language, token ids), already capped.
    pub eval: Vec<(String, Vec<u32>)>,
    /// Frozen elements (1 = frozen); `None` = train everything.
    pub freeze: Option<&'a Mask>,
}

/// How a run is driven (none of it changes the weights).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from the newest checkpoint under the output directory.
    pub resume: bool,
    /// Stop after this many steps without writing the final outputs (simulates an interruption).
    pub stop_after: Option<usize>,
    /// Label of the progress bar.
    pub label: String,
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: usize,
    /// Step the run started from (0, or the checkpoint it resumed).
    pub resumed_from: usize,
    pub losses: Vec<f64>,
    pub eval: Vec<EvalPoint>,
    pub frozen_elements: u64,
    pub params: u64,
    pub tokens_per_step: usize,
    /// Seconds spent in forward+backward (this process).
    pub fwd_bwd_s: f64,
    /// Seconds spent in the optimizer (clipping norm + update).
    pub optimizer_s: f64,
    /// Per step of this process: (forward+backward seconds, optimizer seconds).
    #[serde(default)]
    pub step_times_s: Vec<(f64, f64)>,
    pub tokens_per_s: f64,
    pub peak_rss_mb: f64,
    /// Whether the run stopped early (`stop_after`).
    pub interrupted: bool,
}

/// The model in f32 (training and checkpoints are f32 whatever the input's dtype).
/// A memory-mapped model is decoded into dense f32 tensors (training updates them in place).
pub fn into_f32(mut model: Model) -> Result<Model> {
    if model.dtype() == DType::F32 && model.is_dense() {
        return Ok(model);
    }
    let w = model
        .named_tensors()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let mut m = Model::from_weights(model.config.clone(), w)?;
    m.tokenizer = model.tokenizer.take();
    m.source = model.source.clone();
    Ok(m)
}

/// Per-parameter freeze flags (1 = frozen) of `mask` for parameter `name`.
pub fn freeze_flags(mask: Option<&Mask>, name: &str) -> Result<Option<Vec<u8>>> {
    match mask.and_then(|m| m.get(name)) {
        None => Ok(None),
        Some(t) => Ok(Some(t.to_bits())),
    }
}

/// Per parameter (model order), whether it has an entry `mask` leaves trainable (a
/// parameter the mask does not name is trainable).
pub fn trainable(model: &Model, mask: Option<&Mask>) -> Result<Vec<bool>> {
    model
        .params
        .iter()
        .map(|p| Ok(!freeze_flags(mask, &p.name)?.is_some_and(|f| f.iter().all(|&x| x != 0))))
        .collect()
}

/// SHA-256 over everything that decides the final weights: the settings that matter, the
/// training ids, the freeze mask and the initial weights.
pub fn fingerprint(model: &Model, cfg: &TrainConfig, inputs: &TrainInputs) -> Result<String> {
    let mut h = Sha256::new();
    let key = serde_json::json!({
        "steps": cfg.steps, "lr": cfg.lr, "batch": cfg.batch, "grad_accum": cfg.grad_accum,
        "seq_len": cfg.seq_len, "warmup": cfg.warmup, "schedule": cfg.schedule, "adamw": cfg.adamw, "seed": cfg.seed,
    });
    h.update(key.to_string().as_bytes());
    for (lang, ids) in &inputs.data {
        h.update(lang.as_bytes());
        h.update((ids.len() as u64).to_le_bytes());
        for &i in ids {
            h.update(i.to_le_bytes());
        }
    }
    for p in &model.params {
        h.update(p.name.as_bytes());
        if let Some(f) = freeze_flags(inputs.freeze, &p.name)? {
            h.update(&f);
        }
        let t = p
            .var()?
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        for x in t {
            h.update(x.to_le_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The report of a finished run under `out` with fingerprint `fp`, if there is one (and, when
/// it saved its model, the model is there too).
fn finished(out: &Path, fp: &str) -> Option<TrainReport> {
    let text = std::fs::read_to_string(out.join("train.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v["fingerprint"].as_str() != Some(fp) {
        return None;
    }
    if v["config"]["save_model"].as_bool() == Some(true) && !out.join("model.safetensors").exists()
    {
        return None;
    }
    serde_json::from_value(v["report"].clone()).ok()
}

/// Trains `model` (f32) in place and writes the outputs under `out`: `eval.csv`/`eval.json`
/// as training goes, checkpoints under `checkpoints/`, and at the end `train.json` and (with
/// `save_model`) the final model.
pub fn train(
    model: &mut Model,
    inputs: &TrainInputs,
    cfg: &TrainConfig,
    out: &Path,
    opts: &RunOptions,
) -> Result<TrainReport> {
    if model.dtype() != DType::F32 {
        bail!("training runs in f32; convert the model with train::into_f32 first");
    }
    if cfg.steps == 0 || cfg.batch == 0 || cfg.grad_accum == 0 {
        bail!("--steps, --batch and --grad-accum must be at least 1");
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        bail!("--lr must be positive");
    }
    if let Some(m) = inputs.freeze {
        crate::mask::check_matches(m, model)?;
    }
    let mut stream = Stream::new(inputs.data.clone(), cfg.seq_len, cfg.seed)?;
    let fp = fingerprint(model, cfg, inputs)?;
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", out.display()))?;
    let mut opt = AdamW::new(cfg.adamw, &model.params, |n| {
        freeze_flags(inputs.freeze, n).ok().flatten()
    })?;
    let mut losses = Vec::new();
    let mut eval_points: Vec<EvalPoint> = Vec::new();
    let mut start = 0;
    if opts.resume {
        if let Some(done) = finished(out, &fp) {
            eprintln!(
                "{}: already trained with these settings; reusing it",
                out.display()
            );
            if cfg.save_model {
                checkpoint::restore_weights(
                    model,
                    &crate::io::read_safetensors(&out.join("model.safetensors"))?.0,
                    out,
                )?;
            }
            return Ok(done);
        }
        if let Some((step, dir)) = checkpoint::list(out)?.pop() {
            let ck = checkpoint::load(&dir)?;
            if ck.state.fingerprint != fp {
                bail!("{}: checkpoint was made with other settings, data, masks or base model; cannot resume", dir.display());
            }
            checkpoint::restore_weights(model, &ck.weights, &dir)?;
            opt.load_moments(&ck.moments, step as u64)?;
            stream.restore(ck.state.stream)?;
            losses = ck.state.losses;
            eval_points = ck.state.eval;
            start = step;
            eprintln!("resuming from {} (step {step})", dir.display());
        } else {
            eprintln!(
                "no checkpoint under {}; starting from step 0",
                checkpoint::root(out).display()
            );
        }
    }
    let (frozen_elements, params) = opt.frozen_count();
    let evaluate = |model: &Model, step: usize, pts: &mut Vec<EvalPoint>| -> Result<()> {
        if inputs.eval.is_empty() || pts.iter().any(|p| p.step == step) {
            return Ok(());
        }
        pts.extend(curves::evaluate(
            model,
            &inputs.eval,
            cfg.eval_seq_len,
            step,
        )?);
        curves::write(out, cfg.eval_seq_len, pts)
    };
    if start == 0 {
        evaluate(model, 0, &mut eval_points)?;
    } else if !inputs.eval.is_empty() {
        curves::write(out, cfg.eval_seq_len, &eval_points)?;
    }
    let tokens_per_step = cfg.batch * cfg.grad_accum * cfg.seq_len;
    let pb = crate::progress::bar(
        cfg.steps as u64,
        if opts.label.is_empty() {
            "train"
        } else {
            &opts.label
        },
        "steps",
    );
    pb.set_position(start as u64);
    let (mut fwd_bwd_s, mut optimizer_s) = (0f64, 0f64);
    let mut step_times_s = Vec::new();
    let mut interrupted = false;
    for step in start..cfg.steps {
        let lr = lr_at(step, cfg.steps, cfg.warmup, cfg.lr, cfg.schedule);
        let t0 = Instant::now();
        let mut acc: Vec<Option<Tensor>> = vec![None; model.params.len()];
        let mut loss_sum = 0f64;
        for _ in 0..cfg.grad_accum {
            let ids = stream.next_batch(cfg.batch)?;
            let (loss, grads) = model.mean_nll_and_grads(&ids)?;
            loss_sum += loss;
            for (a, g) in acc.iter_mut().zip(grads) {
                if let Some(g) = g {
                    *a = Some(match a.take() {
                        None => g,
                        Some(prev) => (prev + g)?,
                    });
                }
            }
        }
        let t1 = Instant::now();
        opt.step(&model.params, acc, lr, 1.0 / cfg.grad_accum as f64)?;
        let t2 = Instant::now();
        fwd_bwd_s += (t1 - t0).as_secs_f64();
        optimizer_s += (t2 - t1).as_secs_f64();
        step_times_s.push(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64()));
        let loss = loss_sum / cfg.grad_accum as f64;
        if !loss.is_finite() {
            bail!("training diverged at step {}: loss {loss}", step + 1);
        }
        losses.push(loss);
        let done = step + 1;
        pb.set_message(format!(
            "{} loss {loss:.3} | {:.0} tok/s | lr {lr:.2e}",
            if opts.label.is_empty() {
                "train"
            } else {
                &opts.label
            },
            tokens_per_step as f64 / (t2 - t0).as_secs_f64()
        ));
        pb.set_position(done as u64);
        if (cfg.eval_every > 0 && done % cfg.eval_every == 0) || done == cfg.steps {
            evaluate(model, done, &mut eval_points)?;
        }
        if cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0 && done < cfg.steps {
            let state = TrainState {
                step: done,
                stream: stream.state,
                fingerprint: fp.clone(),
                losses: losses.clone(),
                eval: eval_points.clone(),
            };
            checkpoint::save(out, model, &opt, &state, cfg.keep_checkpoints)?;
        }
        if opts.stop_after == Some(done) && done < cfg.steps {
            interrupted = true;
            break;
        }
    }
    pb.finish_and_clear();
    drop(opt);
    let ran = (losses.len() - start) as f64;
    let report = TrainReport {
        steps: losses.len(),
        resumed_from: start,
        losses,
        eval: eval_points,
        frozen_elements,
        params,
        tokens_per_step,
        fwd_bwd_s,
        optimizer_s,
        step_times_s,
        tokens_per_s: if fwd_bwd_s + optimizer_s > 0.0 {
            ran * tokens_per_step as f64 / (fwd_bwd_s + optimizer_s)
        } else {
            0.0
        },
        peak_rss_mb: crate::bench::peak_rss_mb(),
        interrupted,
    };
    if interrupted {
        return Ok(report);
    }
    if cfg.save_model {
        checkpoint::write_model(out, model)?;
    }
    crate::io::write_json(
        &out.join("train.json"),
        &serde_json::json!({"config": cfg, "fingerprint": fp, "report": report}),
    )?;
    Ok(report)
}
