//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// Supported decoder architectures (the LLaMA family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    /// Parses an architecture name as GGUF (`llama`) or transformers (`LlamaForCausalLM`) spell it.
    pub fn parse(name: &str) -> Option<Arch> {
        match name {
            "llama" | "LlamaForCausalLM" => Some(Arch::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            _ => None,
        }
    }

    /// The `model_type` string of transformers.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// Hyper-parameters of a LLaMA-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub max_position: usize,
    pub tie_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Config {
    /// Whether q/k/v projections carry a bias (qwen2).
    pub fn qkv_bias(&self) -> bool {
        self.arch == Arch::Qwen2
    }

    /// Checks that the numbers are mutually consistent.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.num_heads == 0
            || c.num_kv_heads == 0
            || c.num_layers == 0
            || c.hidden_size == 0
            || c.intermediate_size == 0
            || c.vocab_size == 0
            || c.head_dim == 0
        {
            bail!("zero-sized dimension in config: {c:?}");
        }
        if !(c.rms_eps.is_finite() && c.rms_eps > 0.0) {
            bail!("RMS norm epsilon {} must be finite and positive", c.rms_eps);
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 0.0) {
            bail!("RoPE theta {} must be finite and positive", c.rope_theta);
        }
        if !c.num_heads.is_multiple_of(c.num_kv_heads) {
            bail!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                c.num_heads,
                c.num_kv_heads
            );
        }
        if !c.head_dim.is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", c.head_dim);
        }
        if c.checked_num_params().is_none() {
            bail!(
                "the sizes multiply beyond 2^64 parameters (vocab {}, hidden {}, FFN {}, {} layers, {} heads of {})",
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_layers,
                c.num_heads,
                c.head_dim
            );
        }
        Ok(())
    }

    /// The parameter count, `None` when it (or any tensor's size in bytes) overflows.
    fn checked_num_params(&self) -> Option<usize> {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let q = self.num_heads.checked_mul(self.head_dim)?;
        let kv = self.num_kv_heads.checked_mul(self.head_dim)?;
        let embed = self.vocab_size.checked_mul(h)?;
        let attn = q.checked_add(kv.checked_mul(2)?)?.checked_mul(h)?;
        let o = h.checked_mul(q)?;
        let mlp = f.checked_mul(h)?.checked_mul(3)?;
        let bias = q.checked_add(kv.checked_mul(2)?)?;
        let layer = [attn, o, mlp, bias, h.checked_mul(2)?]
            .into_iter()
            .try_fold(0usize, usize::checked_add)?;
        let all = layer
            .checked_mul(self.num_layers)?
            .checked_add(embed.checked_mul(2)?)?
            .checked_add(h)?;
        // every tensor must also fit in bytes at f64
        all.checked_mul(8)?;
        Some(all)
    }

    /// Reads a transformers `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_value(&v).with_context(|| format!("{}", path.display()))
    }

    fn from_hf_value(v: &Value) -> Result<Config> {
        let model_type = v["model_type"].as_str().unwrap_or("");
        let arch_name = v["architectures"][0].as_str().unwrap_or(model_type);
        let arch = Arch::parse(model_type)
            .or_else(|| Arch::parse(arch_name))
            .with_context(|| {
                format!("unknown architecture '{model_type}' (supported: llama, qwen2)")
            })?;
        let get = |k: &str| -> Result<usize> {
            v[k].as_u64()
                .map(|x| x as usize)
                .with_context(|| format!("missing or invalid field '{k}'"))
        };
        let hidden = get("hidden_size")?;
        let heads = get("num_attention_heads")?;
        if heads == 0 {
            bail!("num_attention_heads is 0");
        }
        let c = Config {
            arch,
            vocab_size: get("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: get("intermediate_size")?,
            num_layers: get("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: v["num_key_value_heads"]
                .as_u64()
                .map(|x| x as usize)
                .unwrap_or(heads),
            head_dim: v["head_dim"]
                .as_u64()
                .map(|x| x as usize)
                .unwrap_or(hidden / heads),
            rope_theta: v["rope_theta"].as_f64().unwrap_or(10000.0),
            rms_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            max_position: v["max_position_embeddings"].as_u64().unwrap_or(2048) as usize,
            tie_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            bos_token_id: v["bos_token_id"].as_u64().map(|x| x as u32),
            eos_token_id: v["eos_token_id"].as_u64().map(|x| x as u32),
        };
        c.validate()?;
        Ok(c)
    }

    /// The transformers `config.json` for this model (f32 weights).
    pub fn to_hf_json(&self) -> Value {
        let arch = match self.arch {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        };
        let mut v = json!({
            "architectures": [arch],
            "model_type": self.arch.name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if self.arch == Arch::Llama {
            v["attention_bias"] = json!(false);
            v["mlp_bias"] = json!(false);
        }
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = json!(b);
        }
        if let Some(e) = self.eos_token_id {
            v["eos_token_id"] = json!(e);
        }
        v
    }

    /// Every parameter of the model: HF name and shape, in a fixed order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_heads * hd, self.num_kv_heads * hd);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            if self.qkv_bias() {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// A tiny configuration for tests.
    pub fn tiny(arch: Arch) -> Config {
        Config {
            arch,
            vocab_size: 37,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
            max_position: 64,
            tie_embeddings: arch == Arch::Llama,
            bos_token_id: None,
            eos_token_id: None,
        }
    }
}
