//! GGUF checkpoints: metadata → [`Config`], tensors dequantized to f32 and renamed to their
//! Hugging Face names, with llama's permuted Q/K rows restored to HF layout.

use super::config::{Arch, Config};
use crate::io::candle_msg;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// A parsed GGUF file: header, metadata and the path to read tensors from.
pub struct GgufFile {
    pub content: Content,
    pub path: std::path::PathBuf,
}

/// Reads and checks a GGUF header: [`super::gguf_header::check`] first, then candle's parser
/// on the header's bytes in memory. Returns it and the file's length.
pub fn read_content(path: &Path) -> Result<(Content, u64)> {
    use std::io::{Read, Seek};
    let p = path.display();
    let f = std::fs::File::open(path).with_context(|| format!("{p}: cannot open"))?;
    let len = f
        .metadata()
        .with_context(|| format!("{p}: cannot read"))?
        .len();
    let mut r = std::io::BufReader::with_capacity(1 << 16, f);
    let end = super::gguf_header::check(&mut r, len, path)?;
    r.rewind().with_context(|| format!("{p}: cannot read"))?;
    // the check bounds `end` by the file's length
    let mut head = Vec::with_capacity(end as usize);
    r.take(end)
        .read_to_end(&mut head)
        .with_context(|| format!("{p}: cannot read"))?;
    let content = Content::read(&mut std::io::Cursor::new(head))
        .map_err(|e| anyhow::anyhow!("{p}: not a valid GGUF file: {}", candle_msg(&e)))?;
    Ok((content, len))
}

impl GgufFile {
    /// Reads and validates the header; every tensor must lie inside the file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let (content, len) = read_content(path)?;
        for (name, info) in &content.tensor_infos {
            // the header check bounds the element count
            let numel = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            if numel % bs != 0 {
                bail!(
                    "{}: tensor {name} has {numel} elements, not a multiple of its block size {bs}",
                    path.display()
                );
            }
            let end = ((numel / bs) as u64)
                .checked_mul(info.ggml_dtype.type_size() as u64)
                .and_then(|b| b.checked_add(info.offset))
                .and_then(|b| b.checked_add(content.tensor_data_offset));
            if end.is_none_or(|e| e > len) {
                bail!(
                    "{}: truncated file: tensor {name} ends at byte {} but the file has {len} bytes",
                    path.display(),
                    end.map_or("beyond 2^64".to_string(), |e| e.to_string())
                );
            }
        }
        Ok(GgufFile {
            content,
            path: path.to_path_buf(),
        })
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .meta(key)
            .with_context(|| format!("{}: missing GGUF metadata key {key}", self.path.display()))?;
        if let Value::I32(i) = v {
            if *i < 0 {
                bail!("{}: metadata {key} is negative ({i})", self.path.display());
            }
        }
        let x = v
            .to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x as u64))
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: metadata {key}: {}",
                    self.path.display(),
                    candle_msg(&e)
                )
            })?;
        usize::try_from(x)
            .with_context(|| format!("{}: metadata {key} = {x} is too large", self.path.display()))
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        let v = self.meta(key)?;
        v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
    }

    /// The model configuration from the GGUF metadata.
    pub fn config(&self) -> Result<Config> {
        let p = self.path.display();
        let arch_name = self
            .meta("general.architecture")
            .and_then(|v| v.to_string().ok())
            .with_context(|| format!("{p}: missing general.architecture"))?
            .clone();
        let arch = Arch::parse(&arch_name).with_context(|| {
            format!("{p}: unknown architecture '{arch_name}' (supported: llama, qwen2)")
        })?;
        let a = &arch_name;
        let hidden = self.meta_usize(&format!("{a}.embedding_length"))?;
        let heads = self.meta_usize(&format!("{a}.attention.head_count"))?;
        if heads == 0 {
            bail!("{p}: {a}.attention.head_count is 0");
        }
        let kv = self
            .meta_usize(&format!("{a}.attention.head_count_kv"))
            .unwrap_or(heads);
        let head_dim = self
            .meta_usize(&format!("{a}.attention.key_length"))
            .unwrap_or(hidden / heads);
        let vocab = match self.meta("tokenizer.ggml.tokens") {
            Some(Value::Array(t)) => t.len(),
            _ => self.meta_usize(&format!("{a}.vocab_size"))?,
        };
        let tie = !self.content.tensor_infos.contains_key("output.weight");
        let tok_id = |k: &str| self.meta_usize(k).ok().map(|x| x as u32);
        let c = Config {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.meta_usize(&format!("{a}.feed_forward_length"))?,
            num_layers: self.meta_usize(&format!("{a}.block_count"))?,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            rope_theta: self
                .meta_f64(&format!("{a}.rope.freq_base"))
                .unwrap_or(10000.0),
            rms_eps: self
                .meta_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            max_position: self
                .meta_usize(&format!("{a}.context_length"))
                .unwrap_or(2048),
            tie_embeddings: tie,
            bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: tok_id("tokenizer.ggml.eos_token_id"),
        };
        c.validate().with_context(|| format!("{p}"))?;
        Ok(c)
    }

    /// Reads one tensor by GGUF name, dequantized to f32.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let mut f = std::fs::File::open(&self.path)?;
        let q = self
            .content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(|e| {
                anyhow::anyhow!("{}: tensor {name}: {}", self.path.display(), candle_msg(&e))
            })?;
        let t = q.dequantize(&Device::Cpu).map_err(|e| {
            anyhow::anyhow!("{}: tensor {name}: {}", self.path.display(), candle_msg(&e))
        })?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// The GGUF name of a Hugging Face parameter name.
pub fn hf_to_gguf_name(hf: &str) -> String {
    if hf == "model.embed_tokens.weight" {
        return "token_embd.weight".into();
    }
    if hf == "model.norm.weight" {
        return "output_norm.weight".into();
    }
    if hf == "lm_head.weight" {
        return "output.weight".into();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap_or(hf);
    let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let map = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.q_proj.bias", "attn_q.bias"),
        ("self_attn.k_proj.bias", "attn_k.bias"),
        ("self_attn.v_proj.bias", "attn_v.bias"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ];
    for (h, g) in map {
        if tail == h {
            return format!("blk.{layer}.{g}");
        }
    }
    hf.to_string()
}

/// Undoes llama.cpp's conversion permutation of Q/K rows. Within each head, the GGUF rows
/// are interleaved pairs (`[0, hd/2, 1, hd/2+1, …]` of HF order); HF order is recovered as
/// `reshape(heads, hd/2, 2, in).transpose(1, 2)`.
pub fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let hd = rows / heads;
    Ok(t.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The converter's permutation (HF → GGUF), the inverse of [`unpermute_rows`].
pub fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let hd = rows / heads;
    Ok(t.reshape((heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}
