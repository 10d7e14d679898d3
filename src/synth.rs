//! Random Hugging Face checkpoints shaped like a real model (Qwen2.5-7B by default), for memory
//! and speed work where the real checkpoint is out of reach (`broca synth`).
//!
//! Every matrix, embedding, `lm_head` and q/k/v bias is drawn from N(0, 0.02²); every RMSNorm
//! weight is exactly 1. A tensor's values depend only on the seed and the tensor's name (not
//! on the dtype's rounding, the shard size or the thread count): the tensor is cut into fixed
//! blocks of [`BLOCK`] values, each drawn from its own ChaCha stream keyed by
//! `seed ^ name_hash(name)` and the block index. The output is the layout transformers
//! writes: `config.json`, `model-0000i-of-0000N.safetensors` shards (tensors assigned in model
//! order, a new shard when the next tensor would pass the shard size; one shard is written as
//! `model.safetensors`), `model.safetensors.index.json` when sharded, and `tokenizer.json`
//! when a tokenizer is given. Writing streams: beyond two buffers of [`CHUNK`] values
//! nothing is held, so the 15 GB of the 7B shape need well under 1 GB of memory; each shard is
//! written atomically (temporary file beside it, then renamed).

use crate::model::{Arch, Config};
use crate::region::random::name_hash;
use crate::safetensors_writer::{self, Entry};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;
use safetensors::Dtype;
use serde::Serialize;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Standard deviation of the random weights.
pub const STD: f32 = 0.02;
/// Values per random stream (a tensor's last block may be shorter).
pub const BLOCK: usize = 1 << 16;
/// Values generated (in parallel, by blocks) per buffer; two buffers are held.
pub const CHUNK: usize = 64 * BLOCK;

/// A model shape to imitate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Preset {
    /// Qwen2.5-7B: hidden 3584, 28 layers, FFN 18944, 28 heads (4 KV), vocab 152064, untied.
    #[value(name = "qwen2.5-7b")]
    #[serde(rename = "qwen2.5-7b")]
    Qwen25_7b,
    /// A tiny qwen2 for tests: hidden 64, 2 layers, FFN 128, 4 heads (2 KV), vocab 512.
    #[value(name = "tiny")]
    #[serde(rename = "tiny")]
    Tiny,
}

impl Preset {
    /// The preset's configuration.
    pub fn config(self) -> Config {
        let base = Config {
            arch: Arch::Qwen2,
            vocab_size: 152064,
            hidden_size: 3584,
            intermediate_size: 18944,
            num_layers: 28,
            num_heads: 28,
            num_kv_heads: 4,
            head_dim: 128,
            rope_theta: 1e6,
            rms_eps: 1e-6,
            max_position: 32768,
            tie_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
        };
        match self {
            Preset::Qwen25_7b => base,
            Preset::Tiny => Config {
                vocab_size: 512,
                hidden_size: 64,
                intermediate_size: 128,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 16,
                max_position: 2048,
                ..base
            },
        }
    }
}

/// The stored floating-point type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SynthDtype {
    Bf16,
    F16,
    F32,
}

impl SynthDtype {
    fn safetensors(self) -> Dtype {
        match self {
            SynthDtype::Bf16 => Dtype::BF16,
            SynthDtype::F16 => Dtype::F16,
            SynthDtype::F32 => Dtype::F32,
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            SynthDtype::Bf16 | SynthDtype::F16 => 2,
            SynthDtype::F32 => 4,
        }
    }

    /// `torch_dtype` of `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            SynthDtype::Bf16 => "bfloat16",
            SynthDtype::F16 => "float16",
            SynthDtype::F32 => "float32",
        }
    }

    /// Writes `v` little-endian into `out` (exactly [`SynthDtype::size`] bytes).
    #[inline]
    fn put(self, out: &mut [u8], v: f32) {
        match self {
            SynthDtype::Bf16 => out.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            SynthDtype::F16 => out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            SynthDtype::F32 => out.copy_from_slice(&v.to_le_bytes()),
        }
    }
}

/// What to write.
pub struct SynthOptions {
    /// The checkpoint directory (created if needed).
    pub out: PathBuf,
    /// The shapes; must pass [`Config::validate`].
    pub config: Config,
    /// Saved as `tokenizer.json` when given (its vocabulary must fit `config.vocab_size`).
    pub tokenizer: Option<Tokenizer>,
    pub seed: u64,
    /// Most tensor bytes per shard (a single larger tensor gets a shard of its own).
    pub shard_size: u64,
    pub dtype: SynthDtype,
}

/// One shard of the plan.
#[derive(Clone, Debug, Serialize)]
pub struct Shard {
    /// File name inside the checkpoint directory.
    pub file: String,
    /// Tensors (HF name, shape) in model order.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// Tensor bytes (without the safetensors header).
    pub bytes: u64,
}

/// What was written.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub out: String,
    pub params: usize,
    /// Bytes of the safetensors files on disk (headers included).
    pub bytes: u64,
    /// Tensor bytes (the index's `total_size`).
    pub tensor_bytes: u64,
    pub shards: usize,
    pub dtype: SynthDtype,
    pub seed: u64,
    pub seconds: f64,
}

/// Parses a size such as `4G`, `500M`, `64K`, `1.5G` or `123` (bytes): the suffixes K, M, G, T
/// are powers of 1024 (a trailing `B` or `iB` is accepted). `None` when unparsable or zero.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .or_else(|| t.strip_suffix('B'))
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last()?.to_ascii_uppercase() {
        'K' => (&t[..t.len() - 1], 1u64 << 10),
        'M' => (&t[..t.len() - 1], 1 << 20),
        'G' => (&t[..t.len() - 1], 1 << 30),
        'T' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let num = num.trim();
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let v: f64 = num.parse().ok()?;
    let bytes = (v * mult as f64).round();
    (bytes >= 1.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Reads a tokenizer: a `tokenizer.json`, or a GGUF file whose embedded tokenizer is converted
/// ([`Tokenizer::from_gguf`]).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        bail!("{}: no such file", path.display());
    }
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut magic = [0u8; 4];
    let is_gguf = f.read_exact(&mut magic).is_ok() && &magic == b"GGUF";
    if is_gguf {
        let (content, _) = crate::model::gguf::read_content(path)?;
        return Tokenizer::from_gguf(&content.metadata, path);
    }
    let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
        anyhow::anyhow!(
            "{}: neither a tokenizer.json nor a GGUF file: {e}",
            path.display()
        )
    })?;
    Ok(Tokenizer {
        inner,
        bos: None,
        eos: None,
    })
}

/// The tokenizer's vocabulary size (added tokens included): the smallest usable `vocab_size`.
pub fn tokenizer_vocab(t: &Tokenizer) -> usize {
    t.inner.get_vocab_size(true)
}

/// Splits the parameters of `config` (in model order) into shards of at most `shard_size`
/// tensor bytes each; a tensor larger than that gets a shard of its own. One shard is named
/// `model.safetensors`, several `model-0000i-of-0000N.safetensors`.
pub fn plan(config: &Config, dtype: SynthDtype, shard_size: u64) -> Vec<Shard> {
    let mut shards: Vec<Shard> = Vec::new();
    for (name, shape) in config.param_shapes() {
        let b = (shape.iter().product::<usize>() * dtype.size()) as u64;
        match shards.last_mut() {
            Some(s) if s.bytes + b <= shard_size => {
                s.tensors.push((name, shape));
                s.bytes += b;
            }
            _ => shards.push(Shard {
                file: String::new(),
                tensors: vec![(name, shape)],
                bytes: b,
            }),
        }
    }
    let n = shards.len();
    for (i, s) in shards.iter_mut().enumerate() {
        s.file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
    }
    shards
}

/// Whether a parameter is an RMSNorm weight (all ones).
fn is_norm(name: &str) -> bool {
    name.ends_with("layernorm.weight") || name == "model.norm.weight"
}

/// Fills `out` (whole values of `dtype`) with block `block` of the tensor whose stream key is
/// `key`: N(0, STD²) draws, or ones for a norm.
fn fill_block(out: &mut [u8], dtype: SynthDtype, key: u64, block: usize, ones: bool) {
    let es = dtype.size();
    if ones {
        let mut one = [0u8; 4];
        dtype.put(&mut one[..es], 1.0);
        for c in out.chunks_exact_mut(es) {
            c.copy_from_slice(&one[..es]);
        }
        return;
    }
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&key.to_le_bytes());
    seed[8..16].copy_from_slice(&(block as u64).to_le_bytes());
    let mut rng = StdRng::from_seed(seed);
    for c in out.chunks_exact_mut(es) {
        let z: f32 = rng.sample(StandardNormal);
        dtype.put(c, z * STD);
    }
}

/// Fills `buf` with the values of blocks `first..` of a tensor (see [`fill_block`]), the
/// blocks in parallel.
fn fill_chunk(buf: &mut [u8], dtype: SynthDtype, key: u64, first: usize, ones: bool) {
    buf.par_chunks_mut(BLOCK * dtype.size())
        .enumerate()
        .for_each(|(i, out)| fill_block(out, dtype, key, first + i, ones));
}

/// Writes the values of tensor `name` (`numel` values) to `w`, [`CHUNK`] values at a time
/// from two buffers (the next chunk is drawn while the last one is written), calling
/// `progress` with the bytes of each chunk.
pub fn write_tensor(
    w: &mut dyn Write,
    name: &str,
    numel: usize,
    seed: u64,
    dtype: SynthDtype,
    progress: &mut dyn FnMut(usize),
) -> Result<()> {
    let es = dtype.size();
    let key = seed ^ name_hash(name);
    let ones = is_norm(name);
    let chunks = numel.div_ceil(CHUNK);
    // bytes of chunk c
    let len = |c: usize| (numel - c * CHUNK).min(CHUNK) * es;
    let mut cur = vec![0u8; len(0)];
    let mut next = vec![0u8; if chunks > 1 { len(1) } else { 0 }];
    fill_chunk(&mut cur, dtype, key, 0, ones);
    for c in 0..chunks {
        if c + 1 < chunks {
            next.resize(len(c + 1), 0);
            let first = (c + 1) * (CHUNK / BLOCK);
            let next = &mut next;
            std::thread::scope(|s| -> Result<()> {
                let drawing = s.spawn(move || fill_chunk(next, dtype, key, first, ones));
                let written = w.write_all(&cur);
                if let Err(panic) = drawing.join() {
                    std::panic::resume_unwind(panic);
                }
                Ok(written?)
            })?;
        } else {
            w.write_all(&cur)?;
        }
        progress(cur.len());
        std::mem::swap(&mut cur, &mut next);
    }
    Ok(())
}

/// Whether a file name is one of the checkpoint files this module writes.
fn is_checkpoint_file(name: &str) -> bool {
    if name == "model.safetensors" || name == "model.safetensors.index.json" {
        return true;
    }
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let mut parts = rest.split("-of-");
    let digits =
        |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    digits(parts.next()) && digits(parts.next()) && parts.next().is_none()
}

/// Writes the random checkpoint that `opts` describes; `progress` is called with the
/// tensor bytes written so far. Checkpoint files of an earlier run in the directory
/// (`model*.safetensors`, the index, and `tokenizer.json` when no tokenizer is given) that
/// this run does not rewrite are removed at the end, so the directory holds one model.
pub fn write_synthetic(opts: &SynthOptions, progress: &mut dyn FnMut(usize)) -> Result<Summary> {
    let t0 = std::time::Instant::now();
    let cfg = &opts.config;
    cfg.validate()?;
    if opts.shard_size == 0 {
        bail!("shard size must be positive");
    }
    if let Some(t) = &opts.tokenizer {
        let v = tokenizer_vocab(t);
        if v > cfg.vocab_size {
            bail!(
                "vocab_size {} is smaller than the tokenizer's vocabulary ({v})",
                cfg.vocab_size
            );
        }
    }
    let out = &opts.out;
    if out.exists() && !out.is_dir() {
        bail!("{}: exists and is not a directory", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;

    let shards = plan(cfg, opts.dtype, opts.shard_size);
    let done = RefCell::new((0usize, progress));
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut weight_map = BTreeMap::new();
    let mut bytes_on_disk = 0u64;
    for shard in &shards {
        let entries = shard
            .tensors
            .iter()
            .map(|(name, shape)| {
                let numel = shape.iter().product();
                let done = &done;
                Entry::stream(
                    name.clone(),
                    shape.clone(),
                    opts.dtype.safetensors(),
                    move |w: &mut dyn Write| {
                        let mut d = done.borrow_mut();
                        let (n, p) = &mut *d;
                        write_tensor(w, name, numel, opts.seed, opts.dtype, &mut |b| {
                            *n += b;
                            p(*n)
                        })
                    },
                )
            })
            .collect();
        let path = out.join(&shard.file);
        safetensors_writer::write(&path, entries, Some(&meta))?;
        bytes_on_disk += std::fs::metadata(&path)?.len();
        for (name, _) in &shard.tensors {
            weight_map.insert(name.clone(), shard.file.clone());
        }
    }
    let tensor_bytes: u64 = shards.iter().map(|s| s.bytes).sum();
    if shards.len() > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": tensor_bytes},
            "weight_map": weight_map,
        });
        crate::io::write_json(&out.join("model.safetensors.index.json"), &index)?;
    }
    if let Some(t) = &opts.tokenizer {
        t.save(&out.join("tokenizer.json"))?;
    }
    let mut config = cfg.to_hf_json();
    config["torch_dtype"] = serde_json::json!(opts.dtype.torch_name());
    crate::io::write_json(&out.join("config.json"), &config)?;

    // what an earlier run left that is not part of this checkpoint
    let mut keep: Vec<&str> = shards.iter().map(|s| s.file.as_str()).collect();
    if shards.len() > 1 {
        keep.push("model.safetensors.index.json");
    }
    let mut stale: Vec<PathBuf> = Vec::new();
    for e in std::fs::read_dir(out).with_context(|| format!("{}: cannot read", out.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let ours = is_checkpoint_file(&name) && !keep.contains(&name.as_str());
        if ours || (name == "tokenizer.json" && opts.tokenizer.is_none()) {
            stale.push(e.path());
        }
    }
    // the index first: until it goes, it still describes the earlier, complete checkpoint
    stale.sort_by_key(|p| !p.ends_with("model.safetensors.index.json"));
    for p in stale {
        std::fs::remove_file(&p).with_context(|| format!("{}: cannot remove", p.display()))?;
    }

    Ok(Summary {
        out: out.display().to_string(),
        params: cfg.num_params(),
        bytes: bytes_on_disk,
        tensor_bytes,
        shards: shards.len(),
        dtype: opts.dtype,
        seed: opts.seed,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
