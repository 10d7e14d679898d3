//! `broca synth`: write a random checkpoint shaped like a real model (Qwen2.5-7B by default).

use crate::synth::{self, Preset, SynthDtype, SynthOptions};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output checkpoint folder (config.json, safetensors shards and index, tokenizer.json);
    /// checkpoint files of an earlier run there are replaced.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The shape to imitate.
    #[arg(long, value_enum, default_value_t = Preset::Qwen25_7b)]
    pub preset: Preset,
    /// Hidden size (overrides the preset; head_dim = hidden / heads).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Number of decoder layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// FFN (intermediate) size.
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (must divide --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Vocabulary size (at least the tokenizer's; by default raised to it when smaller).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// A tokenizer.json, or a GGUF file whose tokenizer is converted; saved as tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Seed: a tensor's values depend only on the seed and its name.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tensor bytes per shard (K/M/G = 1024-based: 2G, 500M); a larger tensor gets its own.
    #[arg(long, default_value = "4G")]
    pub shard_size: String,
    /// Stored type.
    #[arg(long, value_enum, default_value_t = SynthDtype::Bf16)]
    pub dtype: SynthDtype,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Decimal gigabytes (or megabytes below 1 GB), as `15.23 GB`.
fn fmt_bytes(b: u64) -> String {
    if b >= 1_000_000_000 {
        format!("{:.2} GB", b as f64 / 1e9)
    } else {
        format!("{:.1} MB", b as f64 / 1e6)
    }
}

/// A parameter count, as `7.62 B`, `135.1 M` or `139840`.
fn fmt_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n => n.to_string(),
    }
}

/// The options the flags describe, every flag checked.
fn options(a: &SynthArgs) -> Result<SynthOptions> {
    let Some(out) = a.out.clone() else {
        bail!("--out DIR is required")
    };
    if out.exists() && !out.is_dir() {
        bail!("--out: {} exists and is not a directory", out.display());
    }
    let shard_size = synth::parse_size(&a.shard_size).with_context(|| {
        format!(
            "--shard-size: cannot read '{}' as a positive size (e.g. 4G, 500M)",
            a.shard_size
        )
    })?;
    let mut c = a.preset.config();
    for (flag, v, field) in [
        ("--hidden", a.hidden, &mut c.hidden_size),
        ("--layers", a.layers, &mut c.num_layers),
        ("--ffn", a.ffn, &mut c.intermediate_size),
        ("--heads", a.heads, &mut c.num_heads),
        ("--kv-heads", a.kv_heads, &mut c.num_kv_heads),
        ("--vocab", a.vocab, &mut c.vocab_size),
    ] {
        if let Some(v) = v {
            if v == 0 {
                bail!("{flag}: must be at least 1");
            }
            *field = v;
        }
    }
    if !c.hidden_size.is_multiple_of(c.num_heads) {
        bail!(
            "--heads: {} heads do not divide the hidden size {}",
            c.num_heads,
            c.hidden_size
        );
    }
    c.head_dim = c.hidden_size / c.num_heads;
    if !c.num_heads.is_multiple_of(c.num_kv_heads) {
        bail!(
            "--kv-heads: {} KV heads do not divide the {} heads",
            c.num_kv_heads,
            c.num_heads
        );
    }
    if !c.head_dim.is_multiple_of(2) {
        bail!(
            "--heads: head_dim = hidden {} / heads {} = {} is odd (RoPE needs it even)",
            c.hidden_size,
            c.num_heads,
            c.head_dim
        );
    }
    let tokenizer = match &a.tokenizer {
        Some(p) => Some(synth::load_tokenizer(p).context("--tokenizer")?),
        None => None,
    };
    if let Some(t) = &tokenizer {
        let v = synth::tokenizer_vocab(t);
        if v > c.vocab_size {
            if a.vocab.is_some() {
                bail!(
                    "--vocab: {} is smaller than the tokenizer's vocabulary ({v} tokens)",
                    c.vocab_size
                );
            }
            c.vocab_size = v;
        }
        c.bos_token_id = t.bos;
        c.eos_token_id = t.eos;
    }
    c.validate()?;
    Ok(SynthOptions {
        out,
        config: c,
        tokenizer,
        seed: a.seed,
        shard_size,
        dtype: a.dtype,
    })
}

pub fn run(a: SynthArgs) -> Result<()> {
    let opts = options(&a)?;
    let c = &opts.config;
    let shards = synth::plan(c, opts.dtype, opts.shard_size);
    let total: u64 = shards.iter().map(|s| s.bytes).sum();
    eprintln!(
        "synth {}: qwen2, hidden {}, {} layers, ffn {}, {} heads ({} KV, head_dim {}), vocab {}: \
         {} params, {} of {} in {} shard(s) of at most {}, seed {} -> {}",
        a.preset
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        c.hidden_size,
        c.num_layers,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size,
        fmt_count(c.num_params()),
        fmt_bytes(total),
        opts.dtype.torch_name(),
        shards.len(),
        a.shard_size,
        opts.seed,
        opts.out.display()
    );
    let pb = crate::progress::bar(total.div_ceil(1 << 20), "synth", "MiB");
    let ends: Vec<(u64, &str)> = shards
        .iter()
        .scan(0u64, |acc, s| {
            *acc += s.bytes;
            Some((*acc, s.file.as_str()))
        })
        .collect();
    let mut next = 0;
    let t0 = std::time::Instant::now();
    let summary = synth::write_synthetic(&opts, &mut |done| {
        pb.set_position(done as u64 >> 20);
        while next < ends.len() && done as u64 >= ends[next].0 {
            pb.suspend(|| {
                eprintln!(
                    "  {} ({}) generated, {:.1} s",
                    ends[next].1,
                    fmt_bytes(shards[next].bytes),
                    t0.elapsed().as_secs_f64()
                )
            });
            next += 1;
        }
    })?;
    pb.finish_and_clear();
    if a.json {
        return super::print_json(&summary);
    }
    println!(
        "{}: {} params, {} on disk in {} shard(s), {:.1} s",
        summary.out,
        summary.params,
        fmt_bytes(summary.bytes),
        summary.shards,
        summary.seconds
    );
    Ok(())
}
