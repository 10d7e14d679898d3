//! LLaMA-family decoders (llama, qwen2): loading, parameters by Hugging Face name, and a
//! forward pass whose every op carries gradients.

mod backward;
pub mod config;
pub mod fused;
pub mod gguf;
pub mod hf;
pub mod ops;

pub use config::{Arch, Config};

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use fused::GradSink;

/// One named parameter.
pub struct Param {
    pub name: String,
    pub var: Var,
}

/// Indices of one decoder layer's parameters in [`Model::params`].
#[derive(Clone, Debug)]
struct LayerIdx {
    input_norm: usize,
    q: usize,
    k: usize,
    v: usize,
    bias: Option<(usize, usize, usize)>,
    o: usize,
    post_norm: usize,
    gate: usize,
    up: usize,
    down: usize,
}

impl LayerIdx {
    /// The q/k/v bias parameter indices (qwen2), or `None`s.
    fn biases(&self) -> (Option<usize>, Option<usize>, Option<usize>) {
        match self.bias {
            Some((q, k, v)) => (Some(q), Some(k), Some(v)),
            None => (None, None, None),
        }
    }
}

/// A loaded model: configuration, parameters (HF names, HF layout), tokenizer.
pub struct Model {
    pub config: Config,
    pub params: Vec<Param>,
    index: HashMap<String, usize>,
    layers: Vec<LayerIdx>,
    embed: usize,
    final_norm: usize,
    lm_head: usize,
    pub tokenizer: Option<Tokenizer>,
    /// Where the model was loaded from (empty for random models).
    pub source: PathBuf,
    /// While set (see [`Model::with_grad_sink`]), tracked forwards send the linear layers'
    /// weight gradients here.
    grad_sink: Mutex<Option<Arc<dyn GradSink>>>,
}

impl Model {
    /// Loads a GGUF file or a Hugging Face checkpoint directory.
    pub fn load(path: &Path) -> Result<Model> {
        if !path.exists() {
            bail!("{}: no such file or directory", path.display());
        }
        let (config, weights, tokenizer) = if path.is_dir() {
            let config = Config::from_hf_json(&path.join("config.json"))?;
            let weights = hf::load_weights(path, &config)?;
            let tok = if path.join("tokenizer.json").exists() {
                Some(Tokenizer::from_dir(path)?)
            } else {
                None
            };
            (config, weights, tok)
        } else {
            let g = gguf::GgufFile::open(path)?;
            let config = g.config()?;
            let weights = g.load_weights(&config)?;
            let tok = Tokenizer::from_gguf(&g.content.metadata, path)?;
            (config, weights, Some(tok))
        };
        let mut m =
            Model::from_weights(config, weights).with_context(|| format!("{}", path.display()))?;
        m.tokenizer = tokenizer;
        m.source = path.to_path_buf();
        Ok(m)
    }

    /// Builds a model from named tensors (every name of `config.param_shapes()`).
    pub fn from_weights(config: Config, mut weights: HashMap<String, Tensor>) -> Result<Model> {
        let mut params = Vec::new();
        for (name, shape) in config.param_shapes() {
            let t = weights
                .remove(&name)
                .with_context(|| format!("missing tensor {name}"))?;
            if t.dims() != shape.as_slice() {
                bail!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    t.dims(),
                    shape
                );
            }
            params.push(Param {
                name,
                var: Var::from_tensor(&t.contiguous()?)?,
            });
        }
        let index: HashMap<String, usize> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let at = |n: String| -> usize { index[&n] };
        let layers = (0..config.num_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                LayerIdx {
                    input_norm: at(format!("{p}.input_layernorm.weight")),
                    q: at(format!("{p}.self_attn.q_proj.weight")),
                    k: at(format!("{p}.self_attn.k_proj.weight")),
                    v: at(format!("{p}.self_attn.v_proj.weight")),
                    bias: config.qkv_bias().then(|| {
                        (
                            at(format!("{p}.self_attn.q_proj.bias")),
                            at(format!("{p}.self_attn.k_proj.bias")),
                            at(format!("{p}.self_attn.v_proj.bias")),
                        )
                    }),
                    o: at(format!("{p}.self_attn.o_proj.weight")),
                    post_norm: at(format!("{p}.post_attention_layernorm.weight")),
                    gate: at(format!("{p}.mlp.gate_proj.weight")),
                    up: at(format!("{p}.mlp.up_proj.weight")),
                    down: at(format!("{p}.mlp.down_proj.weight")),
                }
            })
            .collect();
        let embed = at("model.embed_tokens.weight".into());
        let final_norm = at("model.norm.weight".into());
        let lm_head = if config.tie_embeddings {
            embed
        } else {
            at("lm_head.weight".into())
        };
        Ok(Model {
            config,
            params,
            index,
            layers,
            embed,
            final_norm,
            lm_head,
            tokenizer: None,
            source: PathBuf::new(),
            grad_sink: Mutex::new(None),
        })
    }

    /// A model with random weights (tests): normal(0, 0.2) matrices, norms near 1.
    pub fn random(config: Config, dtype: DType, seed: u64) -> Result<Model> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut w = HashMap::new();
        for (name, shape) in config.param_shapes() {
            let n: usize = shape.iter().product();
            let v: Vec<f64> = if name.ends_with("norm.weight") {
                (0..n).map(|_| 1.0 + rng.gen_range(-0.3..0.3)).collect()
            } else {
                (0..n).map(|_| rng.gen_range(-0.35..0.35)).collect()
            };
            w.insert(
                name,
                Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?,
            );
        }
        Model::from_weights(config, w)
    }

    /// The parameter called `name` (HF name).
    pub fn param(&self, name: &str) -> Option<&Var> {
        self.index.get(name).map(|&i| &self.params[i].var)
    }

    /// The tokenizer, or an error for models without one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .context("this model has no tokenizer")
    }

    /// The dtype the parameters are held in.
    pub fn dtype(&self) -> DType {
        self.params[0].var.dtype()
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Every parameter as (name, tensor), in the model's order.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
            .collect()
    }

    /// Writes a transformers-loadable checkpoint: config.json, model.safetensors (f32),
    /// tokenizer.json.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        hf::save_checkpoint(dir, &self.config, &self.named_tensors())?;
        if let Some(t) = &self.tokenizer {
            t.save(&dir.join("tokenizer.json"))?;
        }
        Ok(())
    }

    /// Runs `f` (which builds and back-propagates tracked forwards) with the weight gradients
    /// of every linear layer (q/k/v/o, gate/up/down, lm_head) going to `sink` instead of to
    /// candle's gradient store; the other parameters' gradients (embeddings, norms, biases)
    /// stay in the gradient store. Saves a zero tensor and an add per weight per backward.
    pub fn with_grad_sink<R>(&self, sink: Arc<dyn GradSink>, f: impl FnOnce() -> R) -> R {
        let old = self.set_grad_sink(Some(sink));
        let out = f();
        self.set_grad_sink(old);
        out
    }

    fn set_grad_sink(&self, s: Option<Arc<dyn GradSink>>) -> Option<Arc<dyn GradSink>> {
        let mut g = self.grad_sink.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *g, s)
    }

    /// `x · wᵀ` for weight parameter `wi`, its gradient to the grad sink when one is set.
    fn linear(&self, x: &Tensor, wi: usize, grad: bool) -> Result<Tensor> {
        let sink = match grad {
            true => self
                .grad_sink
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            false => None,
        };
        Ok(match sink {
            Some(sink) => fused::linear_into(x, &self.w(wi, true), &sink, wi)?,
            None => fused::linear(x, &self.w(wi, grad))?,
        })
    }

    fn w(&self, i: usize, grad: bool) -> Tensor {
        let t = self.params[i].var.as_tensor();
        if grad {
            t.clone()
        } else {
            t.detach()
        }
    }

    /// Token embeddings for `ids` `[b, t]` → `[b, t, hidden]`.
    pub fn embed(&self, ids: &Tensor, grad: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self
            .w(self.embed, grad)
            .index_select(&ids.flatten_all()?, 0)?;
        Ok(e.reshape((b, t, self.config.hidden_size))?)
    }

    /// Position tables and causal mask for sequences of length `t`.
    pub fn attn_context(&self, t: usize) -> Result<AttnContext> {
        let c = &self.config;
        let dev = Device::Cpu;
        let (cos, sin) = ops::rope_tables(t, c.head_dim, c.rope_theta, self.dtype(), &dev)?;
        let mask = ops::causal_mask(c.num_heads / c.num_kv_heads, t, self.dtype(), &dev)?;
        Ok(AttnContext { cos, sin, mask })
    }

    /// One decoder layer on the residual stream `x` `[b, t, hidden]`.
    pub fn layer(&self, l: usize, x: &Tensor, ctx: &AttnContext, grad: bool) -> Result<Tensor> {
        self.layer_probed(l, x, ctx, grad, &mut |_, _| Ok(()))
    }

    /// [`Model::layer`], calling `probe(name, activation)` on intermediate activations:
    /// `"mlp.down_proj.input"` `[b*t, intermediate]` and `"mlp.down_proj.output"` `[b*t, hidden]`.
    pub fn layer_probed(
        &self,
        l: usize,
        x: &Tensor,
        ctx: &AttnContext,
        grad: bool,
        probe: &mut dyn FnMut(&'static str, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        self.layer_full(l, x, ctx, grad, NormWeights::default(), probe)
    }

    /// [`Model::layer`] with per-batch-element RMSNorm weights: batch element `i` uses row
    /// `i` of `norms.input` / `norms.post` (`[b, 1, hidden]`) instead of the layer's own
    /// weight, so one forward evaluates several norm perturbations at once.
    pub fn layer_with_norms(
        &self,
        l: usize,
        x: &Tensor,
        ctx: &AttnContext,
        grad: bool,
        norms: NormWeights,
    ) -> Result<Tensor> {
        self.layer_full(l, x, ctx, grad, norms, &mut |_, _| Ok(()))
    }

    /// RMSNorm of `x` `[b, t, hidden]` with parameter `wi`, or with per-batch-element weights
    /// `[b, 1, hidden]`: the fused norm with unit weight, times the rows.
    fn norm(&self, x: &Tensor, wi: usize, rows: Option<&Tensor>, grad: bool) -> Result<Tensor> {
        let eps = self.config.rms_eps;
        Ok(match rows {
            None => fused::rms_norm(x, &self.w(wi, grad), eps)?,
            Some(rows) => {
                let ones = Tensor::ones(self.config.hidden_size, x.dtype(), x.device())?;
                fused::rms_norm(x, &ones, eps)?.broadcast_mul(rows)?
            }
        })
    }

    /// `x · Wᵀ` for weight parameter `wi`, plus bias parameter `bi` when given.
    fn linear_bias(&self, x: &Tensor, wi: usize, bi: Option<usize>, grad: bool) -> Result<Tensor> {
        let y = self.linear(x, wi, grad)?;
        Ok(match bi {
            Some(bi) => y.broadcast_add(&self.w(bi, grad))?,
            None => y,
        })
    }

    /// From a layer's normed input `hn` `[b·t, hidden]`: rotated queries `[b, heads, t, d]`,
    /// rotated keys and values `[b, kv, t, d]`.
    #[allow(clippy::too_many_arguments)]
    fn qkv(
        &self,
        li: &LayerIdx,
        hn: &Tensor,
        ctx: &AttnContext,
        b: usize,
        t: usize,
        grad: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qb, kb, vb) = li.biases();
        let q = fused::rope_transposed(
            &self
                .linear_bias(hn, li.q, qb, grad)?
                .reshape((b, t, nh, hd))?,
            &ctx.cos,
            &ctx.sin,
        )?;
        let k = fused::rope_transposed(
            &self
                .linear_bias(hn, li.k, kb, grad)?
                .reshape((b, t, nkv, hd))?,
            &ctx.cos,
            &ctx.sin,
        )?;
        let v = self
            .linear_bias(hn, li.v, vb, grad)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        Ok((q, k, v))
    }

    fn layer_full(
        &self,
        l: usize,
        x: &Tensor,
        ctx: &AttnContext,
        grad: bool,
        norms: NormWeights,
        probe: &mut dyn FnMut(&'static str, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let li = &self.layers[l];
        let (b, t, h) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let rep = nh / nkv;
        let lin = |x: &Tensor, wi: usize| self.linear_bias(x, wi, None, grad);
        let hn = self.norm(x, li.input_norm, norms.input, grad)?;
        let (q, k, v) = self.qkv(li, &hn.reshape((b * t, h))?, ctx, b, t, grad)?;
        let a = if fused::use_fused(&q) {
            // blocked kernel: causal half only, output already [b, t, nh, hd]
            fused::causal_attention_blocked(&q, &k, &v)?.reshape((b * t, nh * hd))?
        } else {
            // [b, nh, t, hd] -> [b, nkv, rep*t, hd]: query heads sharing a kv head stacked
            let q = q.reshape((b, nkv, rep * t, hd))?;
            let a = ops::attention(&q, &k, &v, &ctx.mask)?;
            a.reshape((b, nh, t, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, nh * hd))?
        };
        let x = (x + lin(&a, li.o)?.reshape((b, t, h))?)?;
        let hn = self
            .norm(&x, li.post_norm, norms.post, grad)?
            .reshape((b * t, h))?;
        let g = lin(&hn, li.gate)?;
        let u = lin(&hn, li.up)?;
        let act = fused::swiglu(&g, &u)?;
        probe("mlp.down_proj.input", &act)?;
        let m = lin(&act, li.down)?;
        probe("mlp.down_proj.output", &m)?;
        Ok((x + m.reshape((b, t, h))?)?)
    }

    /// Final norm and output projection: `[b, t, hidden]` → logits `[b, t, vocab]`.
    pub fn head(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        self.head_with_norm(x, grad, None)
    }

    /// [`Model::head`] with per-batch-element final-norm weights `[b, 1, hidden]` (or the
    /// model's own for `None`).
    pub fn head_with_norm(
        &self,
        x: &Tensor,
        grad: bool,
        final_rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let xn = self.norm(x, self.final_norm, final_rows, grad)?;
        let logits = self.linear(&xn.reshape((b * t, h))?, self.lm_head, grad)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Residual stream after the last layer for `ids` `[b, t]`.
    pub fn hidden(&self, ids: &Tensor, grad: bool) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let ctx = self.attn_context(t)?;
        let mut x = self.embed(ids, grad)?;
        for l in 0..self.config.num_layers {
            x = self.layer(l, &x, &ctx, grad)?;
        }
        Ok(x)
    }

    /// Full-sequence logits `[b, t, vocab]`.
    pub fn forward(&self, ids: &Tensor, grad: bool) -> Result<Tensor> {
        self.head(&self.hidden(ids, grad)?, grad)
    }

    /// Per-token NLL (nats) of a batch of equal-length windows `ids` `[b, t]`: entry
    /// `[i, j]` is the NLL of token `j+1` given tokens `0..=j`. Returns `[b, t-1]`.
    pub fn token_nll(&self, ids: &Tensor, grad: bool) -> Result<Tensor> {
        let x = self.hidden(ids, grad)?;
        self.nll_from_hidden(&x, ids, grad)
    }

    /// Per-token NLL from the last residual stream `x` `[b, t, hidden]`.
    pub fn nll_from_hidden(&self, x: &Tensor, ids: &Tensor, grad: bool) -> Result<Tensor> {
        self.nll_from_hidden_with_norm(x, ids, grad, None)
    }

    /// [`Model::nll_from_hidden`] with per-batch-element final-norm weights `[b, 1, hidden]`.
    pub fn nll_from_hidden_with_norm(
        &self,
        x: &Tensor,
        ids: &Tensor,
        grad: bool,
        final_rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t < 2 {
            bail!("a window needs at least 2 tokens, got {t}");
        }
        let x = x.narrow(1, 0, t - 1)?;
        let logits = self
            .head_with_norm(&x.contiguous()?, grad, final_rows)?
            .reshape((b * (t - 1), self.config.vocab_size))?;
        let targets = ids.narrow(1, 1, t - 1)?.contiguous()?.flatten_all()?;
        Ok(fused::token_nll(&logits, &targets)?.reshape((b, t - 1))?)
    }

    /// Mean NLL over all predicted tokens of `ids` `[b, t]` (a scalar), for backprop.
    pub fn mean_nll(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.token_nll(ids, true)?.mean_all()?)
    }

    /// Ids as a `[1, t]` tensor.
    pub fn ids_tensor(ids: &[u32]) -> Result<Tensor> {
        Ok(Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?)
    }

    /// Greedy next token after `ids` (full recompute; simple and exact).
    pub fn next_token_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let x = self.hidden(&Self::ids_tensor(ids)?, false)?;
        let t = ids.len();
        let last = x.narrow(1, t - 1, 1)?.contiguous()?;
        let logits = self.head(&last, false)?;
        Ok(logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    }
}

/// Per-batch-element RMSNorm weights `[b, 1, hidden]` replacing a layer's own (see
/// [`Model::layer_with_norms`]); `None` keeps the layer's weight.
#[derive(Clone, Copy, Default)]
pub struct NormWeights<'a> {
    pub input: Option<&'a Tensor>,
    pub post: Option<&'a Tensor>,
}

/// Per-length tensors shared by all layers: RoPE tables and the causal mask.
pub struct AttnContext {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
}
