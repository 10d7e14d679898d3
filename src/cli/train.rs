//! `broca train`: further pretraining with optional frozen regions, evaluation curves,
//! checkpoints and exact resume.

use super::args;
use crate::data;
use crate::mask::{self, Mask};
use crate::model::Model;
use crate::outln;
use crate::train::{self, forget, AdamWConfig, RunOptions, Schedule, TrainConfig, TrainInputs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Settings shared by `train` and `forget`.
#[derive(Args, Debug, Clone)]
pub struct HyperArgs {
    /// Optimizer steps.
    #[arg(long, value_parser = args::positive_usize)]
    pub steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5, value_parser = args::positive_f64)]
    pub lr: f64,
    /// Windows per micro-batch.
    #[arg(long, default_value_t = 1, value_parser = args::positive_usize)]
    pub batch: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1, value_parser = args::positive_usize)]
    pub grad_accum: usize,
    /// Tokens per training (and evaluation) window.
    #[arg(long, default_value_t = 512, value_parser = args::seq_len)]
    pub seq_len: usize,
    /// Linear warmup steps (capped at --steps).
    #[arg(long, default_value_t = 100, value_parser = args::count)]
    pub warmup: usize,
    /// Learning rate after warmup.
    #[arg(long, value_enum, default_value_t = Schedule::Cosine)]
    pub schedule: Schedule,
    /// Decoupled weight decay (not applied to norms and biases).
    #[arg(long, default_value_t = 0.001, value_parser = args::non_negative_f64)]
    pub weight_decay: f64,
    /// AdamW betas, as B1,B2.
    #[arg(long, default_value = "0.9,0.95")]
    pub betas: String,
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8, value_parser = args::positive_f64)]
    pub eps: f64,
    /// Clip the global gradient norm (over unfrozen entries) to this; 0 disables.
    #[arg(long, default_value_t = 1.0, value_parser = args::non_negative_f64)]
    pub clip: f64,
    /// Seed of the data order.
    #[arg(long, default_value_t = 0, value_parser = args::seed)]
    pub seed: u64,
    /// Evaluate every K steps (and at step 0 and the last step); 0 = only those.
    #[arg(long, default_value_t = 0, value_parser = args::count)]
    pub eval_every: usize,
    /// Keep only the first N tokens of each evaluation text.
    #[arg(long, value_parser = args::token_budget)]
    pub eval_tokens: Option<usize>,
    /// Keep only the first N tokens of each training text.
    #[arg(long, value_parser = args::token_budget)]
    pub data_tokens: Option<usize>,
    /// Write a resumable checkpoint every K steps (0 = never).
    #[arg(long, default_value_t = 0, value_parser = args::count)]
    pub checkpoint_every: usize,
    /// Checkpoints kept (the newest).
    #[arg(long, default_value_t = 1, value_parser = args::positive_usize)]
    pub keep_checkpoints: usize,
    /// Continue from the newest checkpoint under --out (bitwise the same result as an
    /// uninterrupted run).
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub mem: super::MemArgs,
}

impl HyperArgs {
    /// The training configuration these flags describe.
    pub fn config(&self, save_model: bool) -> Result<TrainConfig> {
        let b = data::split_values(std::slice::from_ref(&self.betas));
        let [b1, b2] = b.as_slice() else {
            bail!("--betas '{}': expected B1,B2", self.betas)
        };
        let p = |s: &str| {
            s.parse::<f64>()
                .with_context(|| format!("--betas: '{s}' is not a number"))
        };
        let (beta1, beta2) = (p(b1)?, p(b2)?);
        if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
            bail!("--betas must lie in [0, 1)");
        }
        if self.seq_len < 2 {
            bail!("--seq-len must be at least 2");
        }
        Ok(TrainConfig {
            steps: self.steps,
            lr: self.lr,
            batch: self.batch,
            grad_accum: self.grad_accum,
            seq_len: self.seq_len,
            warmup: self.warmup,
            schedule: self.schedule,
            adamw: AdamWConfig {
                beta1,
                beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
                clip: (self.clip > 0.0).then_some(self.clip),
            },
            seed: self.seed,
            eval_every: self.eval_every,
            eval_seq_len: self.seq_len,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints,
            save_model,
        })
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Base model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = super::default_model())]
    pub model: PathBuf,
    /// Training texts: a folder of *.txt (language = stem) or NAME=FILE pairs.
    #[arg(long, required = true, num_args = 1.., action = clap::ArgAction::Append)]
    pub data: Vec<String>,
    /// Evaluation texts: a folder or NAME=FILE pairs (none: no evaluation curves).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub eval: Vec<String>,
    /// Region masks to freeze (their union; 1 = frozen).
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    pub freeze: Vec<String>,
    #[command(flatten)]
    pub hyper: HyperArgs,
    /// Stop after N steps without the final outputs (simulates an interruption; for tests).
    #[arg(long, hide = true, value_parser = args::positive_usize)]
    pub stop_after: Option<usize>,
    /// Output directory (final model, eval.csv/json, train.json, checkpoints/).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object (the run's report) instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Union of several masks (a name present in several gets the element-wise OR).
pub fn union_masks(paths: &[String], model: &Model) -> Result<Option<Mask>> {
    let paths = data::split_values(paths);
    let mut out: Option<Mask> = None;
    for p in paths {
        let m = mask::load_for(std::path::Path::new(&p), model)?;
        let acc = out.get_or_insert_with(Mask::new);
        for (n, t) in m {
            let t = match acc.remove(&n) {
                Some(prev) => prev.union(&t),
                None => t,
            };
            acc.insert(n, t);
        }
    }
    Ok(out)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = a.hyper.config(true)?;
    let data_in = data::from_dir_or_pairs(&a.data).context("--data")?;
    let eval_in = if a.eval.is_empty() {
        Vec::new()
    } else {
        data::from_dir_or_pairs(&a.eval).context("--eval")?
    };
    super::ppl::check_texts(&data_in, a.hyper.data_tokens)?;
    super::ppl::check_texts(&eval_in, a.hyper.eval_tokens)?;
    let limit = a.hyper.mem.limit()?;
    let _lock = crate::lock::Lock::dir(&a.out)?;
    // the arithmetic first: decoding a mapped model into f32 is what could exhaust memory
    let model = Model::load(&a.model)?;
    let freeze = union_masks(&a.freeze, &model)?;
    let need = crate::memory::TrainNeed::of(
        &model,
        &train::trainable(&model, freeze.as_ref())?,
        cfg.batch,
        cfg.seq_len,
        cfg.grad_accum,
        1,
    );
    need.check(limit, &forget::model_name(&a.model))?;
    super::announce_plan("train", &need.plan(limit))?;
    let mut model = train::into_f32(model)?;
    let inputs = TrainInputs {
        data: forget::tokenize(&model, &data_in, a.hyper.data_tokens)?,
        eval: forget::tokenize(&model, &eval_in, a.hyper.eval_tokens)?,
        freeze: freeze.as_ref(),
    };
    let opts = RunOptions {
        resume: a.hyper.resume,
        stop_after: a.stop_after,
        label: "train".into(),
    };
    let r = train::train(&mut model, &inputs, &cfg, &a.out, &opts).with_context(|| {
        format!(
            "train --model {} --out {}",
            a.model.display(),
            a.out.display()
        )
    })?;
    if a.json {
        return super::print_json(&r);
    }
    outln!(
        "trained {} steps ({} frozen of {} parameters); final loss {:.4}; {:.0} tok/s; fwd+bwd {:.1}s, optimizer {:.1}s; peak RSS {:.0} MB",
        r.steps,
        r.frozen_elements,
        r.params,
        r.losses.last().copied().unwrap_or(f64::NAN),
        r.tokens_per_s,
        r.fwd_bwd_s,
        r.optimizer_s,
        r.peak_rss_mb
    )?;
    if !r.eval.is_empty() {
        outln!("{:>6} {:<10} {:>10} {:>8}", "step", "lang", "ppl", "bpb")?;
        for p in &r.eval {
            outln!(
                "{:>6} {:<10} {:>10.3} {:>8.4}",
                p.step,
                p.lang,
                p.ppl,
                p.bits_per_byte
            )?;
        }
    }
    if r.interrupted {
        outln!(
            "stopped early after step {} (--stop-after); resume with --resume",
            r.steps
        )?;
    } else {
        outln!("model written to {}", a.out.display())?;
    }
    Ok(())
}
