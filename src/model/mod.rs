//! LLaMA-family decoders (llama, qwen2): loading, parameters by Hugging Face name, and a
//! forward pass whose every op carries gradients.

mod backward;
pub mod checkpoint;
pub mod config;
mod finite;
pub mod fused;
pub mod gguf;
mod gguf_header;
pub mod hf;
pub mod ops;
pub mod store;

pub use config::{Arch, Config};
pub use store::{Overlay, Param, Weight};

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

pub use fused::GradSink;

/// How a loaded model holds its weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// Every parameter as an f32 tensor in memory (trainable, fastest for small models).
    Dense,
    /// Matrices stay in the checkpoint's encoding, memory-mapped, decoded per use; vectors
    /// (norms, biases) are dense.
    Mapped,
    /// `Dense` when the f32 weights take at most [`DENSE_LIMIT`] bytes, else `Mapped`;
    /// the environment variable `BROCA_WEIGHTS=dense|mapped` overrides it.
    Auto,
}

/// Largest f32 weight size that [`Residency::Auto`] keeps dense (SmolLM2-135M: 0.54 GB is
/// dense; Qwen2.5-Coder-0.5B: 2.5 GB is mapped).
pub const DENSE_LIMIT: usize = 1 << 30;

/// f32 bytes of one block of the output projection (SmolLM2's 113 MB head runs in 2
/// blocks, Qwen2.5's 0.5B in 9, the 7B's 2.2 GB in 33).
pub const HEAD_BLOCK_BYTES: usize = 64 << 20;

/// Mapped checkpoints larger than this give back each tensor's pages after decoding it, so
/// that the process holds about one layer of the checkpoint at a time.
pub const RELEASE_PAGES_ABOVE: usize = 4 << 30;

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
    /// The file `tokenizer` was read from when the checkpoint supplied it (for messages).
    tokenizer_file: Option<PathBuf>,
    /// While set (see [`Model::with_grad_sink`]), tracked forwards send the linear layers'
    /// weight gradients here.
    grad_sink: Mutex<Option<Arc<dyn GradSink>>>,
    /// The dtype computations run in (f32 for loaded checkpoints).
    dtype: DType,
    /// Sparse perturbations of mapped parameters, by parameter index.
    overlays: RwLock<Vec<Option<Arc<Overlay>>>>,
    /// Whether mapped tensors give back their pages after each decode.
    release_pages: bool,
}

/// How to undo one [`Model::set_entries`].
pub enum Undo {
    /// Old values of a dense parameter's entries.
    Dense { idx: Vec<usize>, old: Vec<f64> },
    /// The overlay a mapped parameter had before.
    Overlay(Option<Arc<Overlay>>),
}

impl Model {
    /// Loads a GGUF file or a Hugging Face checkpoint directory ([`Residency::Auto`]).
    pub fn load(path: &Path) -> Result<Model> {
        Model::load_with(path, Residency::Auto)
    }

    /// Loads a checkpoint, holding its weights as `residency` says. The checkpoint is
    /// memory-mapped and validated first; a dense model decodes every tensor once and drops
    /// the map, a mapped one keeps only the map (the checkpoint is never held twice).
    pub fn load_with(path: &Path, residency: Residency) -> Result<Model> {
        let ck = checkpoint::Checkpoint::open(path)?;
        let residency = match residency {
            Residency::Auto => match std::env::var("BROCA_WEIGHTS").as_deref() {
                Ok("dense") => Residency::Dense,
                Ok("mapped") => Residency::Mapped,
                _ if ck.config.num_params().saturating_mul(4) <= DENSE_LIMIT => Residency::Dense,
                _ => Residency::Mapped,
            },
            r => r,
        };
        let release = ck.mapped_bytes() > RELEASE_PAGES_ABOVE;
        let config = ck.config.clone();
        let mut tensors = ck.tensors;
        let mut params = Vec::new();
        for (name, shape) in config.param_shapes() {
            let t = tensors
                .remove(&name)
                .with_context(|| format!("{}: missing tensor {name}", path.display()))?;
            let weight = if residency == Residency::Dense || shape.len() == 1 {
                let v = store::decode_tensor(&name, &t, None)?.reshape(shape.as_slice())?;
                Weight::Dense(Var::from_tensor(&v)?)
            } else {
                Weight::Mapped(t)
            };
            params.push(Param {
                name,
                shape,
                weight,
            });
        }
        let mut m = Model::from_params(config, params, DType::F32)
            .with_context(|| format!("{}", path.display()))?;
        m.tokenizer = ck.tokenizer;
        m.tokenizer_file = m.tokenizer.as_ref().map(|_| match path.is_dir() {
            true => path.join("tokenizer.json"),
            false => path.to_path_buf(),
        });
        m.source = path.to_path_buf();
        m.release_pages = release;
        Ok(m)
    }

    /// Builds a model from named tensors (every name of `config.param_shapes()`).
    pub fn from_weights(config: Config, mut weights: HashMap<String, Tensor>) -> Result<Model> {
        let mut params = Vec::new();
        let mut dtype = DType::F32;
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
            dtype = t.dtype();
            params.push(Param {
                name,
                shape,
                weight: Weight::Dense(Var::from_tensor(&t.contiguous()?)?),
            });
        }
        Model::from_params(config, params, dtype)
    }

    /// Indexes `params` (in `config.param_shapes()` order) by name and layer.
    fn from_params(config: Config, params: Vec<Param>, dtype: DType) -> Result<Model> {
        let index: HashMap<String, usize> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let at = |n: String| -> Result<usize> {
            index
                .get(&n)
                .copied()
                .with_context(|| format!("missing tensor {n}"))
        };
        let layers = (0..config.num_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let bias = match config.qkv_bias() {
                    true => Some((
                        at(format!("{p}.self_attn.q_proj.bias"))?,
                        at(format!("{p}.self_attn.k_proj.bias"))?,
                        at(format!("{p}.self_attn.v_proj.bias"))?,
                    )),
                    false => None,
                };
                Ok(LayerIdx {
                    input_norm: at(format!("{p}.input_layernorm.weight"))?,
                    q: at(format!("{p}.self_attn.q_proj.weight"))?,
                    k: at(format!("{p}.self_attn.k_proj.weight"))?,
                    v: at(format!("{p}.self_attn.v_proj.weight"))?,
                    bias,
                    o: at(format!("{p}.self_attn.o_proj.weight"))?,
                    post_norm: at(format!("{p}.post_attention_layernorm.weight"))?,
                    gate: at(format!("{p}.mlp.gate_proj.weight"))?,
                    up: at(format!("{p}.mlp.up_proj.weight"))?,
                    down: at(format!("{p}.mlp.down_proj.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = at("model.embed_tokens.weight".into())?;
        let final_norm = at("model.norm.weight".into())?;
        let lm_head = if config.tie_embeddings {
            embed
        } else {
            at("lm_head.weight".into())?
        };
        let n = params.len();
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
            tokenizer_file: None,
            grad_sink: Mutex::new(None),
            dtype,
            overlays: RwLock::new(vec![None; n]),
            release_pages: false,
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
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.params[i])
    }

    /// The index of parameter `name` in [`Model::params`].
    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The tokenizer, or an error for models without one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().with_context(|| match self.source.is_dir() {
            true => format!(
                "{}: no tokenizer.json in this model folder (copy the one of the model it was made from)",
                self.source.display()
            ),
            false => format!(
                "{}: this model has no tokenizer (tokenizer.json or GGUF tokenizer metadata)",
                self.source.display()
            ),
        })
    }

    /// Refuses token ids beyond the embedding's rows, naming the tokenizer and the model
    /// (a tokenizer from another model).
    pub fn check_token_ids(&self, ids: &[u32]) -> Result<()> {
        let rows = self.params[self.embed].shape[0];
        let Some(&id) = ids.iter().find(|&&r| r as usize >= rows) else {
            return Ok(());
        };
        let model = match self.source.as_os_str().is_empty() {
            true => "this model".to_string(),
            false => self.source.display().to_string(),
        };
        match &self.tokenizer_file {
            Some(t) if t == &self.source => bail!(
                "{model}: its tokenizer gives token id {id}, outside its vocabulary of {rows} rows ({})",
                self.params[self.embed].name
            ),
            Some(t) => bail!(
                "{}: token id {id} is outside the vocabulary of {model} ({rows} rows in {}): the tokenizer does not belong to this model",
                t.display(),
                self.params[self.embed].name
            ),
            None => bail!(
                "token id {id} is outside the vocabulary of {model} ({rows} rows in {}): the tokenizer does not belong to this model",
                self.params[self.embed].name
            ),
        }
    }

    /// The dtype computations run in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.elem_count()).sum()
    }

    /// Bytes of the weights as held now (dense values, plus mapped encodings).
    pub fn resident_weight_bytes(&self) -> usize {
        self.params
            .iter()
            .map(|p| match &p.weight {
                Weight::Dense(v) => v.elem_count() * v.dtype().size_in_bytes(),
                Weight::Mapped(m) => m.bytes(),
            })
            .sum()
    }

    /// Whether mapped tensors give back their pages after each decode (big checkpoints).
    pub fn releases_pages(&self) -> bool {
        self.release_pages
    }

    /// Whether every parameter is a dense tensor (trainable).
    pub fn is_dense(&self) -> bool {
        self.params.iter().all(|p| p.mapped().is_none())
    }

    /// The current values of parameter `i` (a mapped one decoded, its overlay applied).
    pub fn values(&self, i: usize) -> Result<Tensor> {
        self.w(i, false)
    }

    /// The current values of parameter `name`.
    pub fn values_of(&self, name: &str) -> Result<Tensor> {
        let i = self
            .param_index(name)
            .with_context(|| format!("{name}: not a parameter of this model"))?;
        self.values(i)
    }

    /// Every parameter as (name, values), in the model's order (decodes every mapped one:
    /// for big models prefer [`Model::values`] one at a time).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        (0..self.params.len())
            .map(|i| Ok((self.params[i].name.clone(), self.values(i)?)))
            .collect()
    }

    /// Sets flat entries `idx` of parameter `i` to `vals`: in place for a dense parameter,
    /// as an overlay for a mapped one (its file is never written). Returns what undoes it.
    pub fn set_entries(&self, i: usize, idx: &[usize], vals: &[f64]) -> Result<Undo> {
        let p = &self.params[i];
        let n = p.elem_count();
        if let Some(&bad) = idx.iter().find(|&&k| k >= n) {
            bail!("{}: entry {bad} out of range ({n} entries)", p.name);
        }
        match &p.weight {
            Weight::Dense(var) => {
                let t = var.as_tensor();
                let mut w: Vec<f64> = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
                let old = idx.iter().map(|&k| w[k]).collect();
                for (&k, &v) in idx.iter().zip(vals) {
                    w[k] = v;
                }
                var.set(&Tensor::from_vec(w, t.dims(), &Device::Cpu)?.to_dtype(t.dtype())?)?;
                Ok(Undo::Dense {
                    idx: idx.to_vec(),
                    old,
                })
            }
            Weight::Mapped(_) => {
                let mut ov = self.overlays.write().unwrap_or_else(|e| e.into_inner());
                let prev = ov[i].clone();
                let next = prev.as_deref().cloned().unwrap_or_default().with(idx, vals);
                ov[i] = Some(Arc::new(next));
                Ok(Undo::Overlay(prev))
            }
        }
    }

    /// Reverts one [`Model::set_entries`] (bitwise).
    pub fn undo(&self, i: usize, undo: Undo) -> Result<()> {
        match undo {
            Undo::Dense { idx, old } => {
                self.set_entries(i, &idx, &old)?;
            }
            Undo::Overlay(prev) => {
                self.overlays.write().unwrap_or_else(|e| e.into_inner())[i] = prev;
            }
        }
        Ok(())
    }

    /// The overlay of parameter `i`, if any.
    pub fn overlay(&self, i: usize) -> Option<Arc<Overlay>> {
        self.overlays.read().unwrap_or_else(|e| e.into_inner())[i].clone()
    }

    /// Writes a transformers-loadable checkpoint in f32 (see [`Model::save_hf_as`]).
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        self.save_hf_as(dir, DType::F32)
    }

    /// Writes a transformers-loadable checkpoint: config.json, model.safetensors (`dtype`
    /// F32 or BF16), tokenizer.json; tensor by tensor, so a mapped model never holds more
    /// than one decoded tensor.
    pub fn save_hf_as(&self, dir: &Path, dtype: DType) -> Result<()> {
        hf::save_checkpoint(dir, &self.config, self, dtype)?;
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
            Some(sink) => fused::linear_into(x, &self.w(wi, true)?, &sink, wi)?,
            None => fused::linear(x, &self.w(wi, grad)?)?,
        })
    }

    /// Parameter `i` as a tensor: a dense one as it is (tracked when `grad`), a mapped one
    /// decoded to f32 with its overlay (never tracked).
    fn w(&self, i: usize, grad: bool) -> Result<Tensor> {
        Ok(match &self.params[i].weight {
            Weight::Dense(v) if grad => v.as_tensor().clone(),
            Weight::Dense(v) => v.as_tensor().detach(),
            Weight::Mapped(m) => {
                let t = store::decode_tensor(&self.params[i].name, m, self.overlay(i).as_deref())?;
                if self.release_pages {
                    m.release_pages();
                }
                t
            }
        })
    }

    /// Rows `ids` of a `[rows, cols]` parameter (the embedding), decoding only those rows
    /// of a mapped one; ids beyond the embedding's rows are refused naming the tokenizer
    /// and the model.
    fn rows_of(&self, i: usize, ids: &Tensor, grad: bool) -> Result<Tensor> {
        let rows: Vec<u32> = ids.to_vec1()?;
        if i == self.embed {
            self.check_token_ids(&rows)?;
        }
        let Weight::Mapped(m) = &self.params[i].weight else {
            return Ok(self.w(i, grad)?.index_select(ids, 0)?);
        };
        let c = m.cols;
        let mut v = vec![0f32; rows.len() * c];
        m.decode_row_list(&rows, &mut v);
        if let Some(o) = self.overlay(i) {
            for (k, &r) in rows.iter().enumerate() {
                o.apply_range(r as usize * c, &mut v[k * c..(k + 1) * c]);
            }
        }
        for (k, &r) in rows.iter().enumerate() {
            store::check_finite(&self.params[i].name, m, &v[k * c..(k + 1) * c], r as usize)?;
        }
        Ok(Tensor::from_vec(v, (rows.len(), c), &Device::Cpu)?)
    }

    /// Row blocks of about [`HEAD_BLOCK_BYTES`] of f32 in which the output projection is
    /// decoded and applied (inference and the manual backward; dense and mapped weights
    /// alike, so that both give the same bits).
    pub(crate) fn head_blocks(&self) -> Vec<std::ops::Range<usize>> {
        let rows = self.config.vocab_size;
        let per = (HEAD_BLOCK_BYTES / (4 * self.config.hidden_size.max(1))).max(1);
        (0..rows.div_ceil(per))
            .map(|k| k * per..((k + 1) * per).min(rows))
            .collect()
    }

    /// Rows `r` of the output projection as an f32 tensor (overlay applied).
    fn head_block(&self, r: std::ops::Range<usize>) -> Result<Tensor> {
        let i = self.lm_head;
        let Weight::Mapped(m) = &self.params[i].weight else {
            return self
                .w(i, false)?
                .narrow(0, r.start, r.len())
                .map_err(Into::into);
        };
        let c = m.cols;
        let mut v = vec![0f32; r.len() * c];
        m.decode_rows(r.clone(), &mut v);
        if !m.is_checked() {
            store::check_finite(&self.params[i].name, m, &v, r.start)?;
            if r.end == m.rows {
                m.mark_checked();
            }
        }
        if let Some(o) = self.overlay(i) {
            o.apply_range(r.start * c, &mut v);
        }
        Ok(Tensor::from_vec(v, (r.len(), c), &Device::Cpu)?)
    }

    /// Logits `x · W_headᵀ` for `x` `[n, hidden]`, block by block ([`Model::head_blocks`]);
    /// in one piece when tracked for autograd.
    fn head_linear(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        let blocks = self.head_blocks();
        if blocks.len() == 1 || (grad && self.params[self.lm_head].mapped().is_none()) {
            return self.linear(x, self.lm_head, grad);
        }
        let parts = blocks
            .into_iter()
            .map(|r| Ok(fused::linear(x, &self.head_block(r)?)?))
            .collect::<Result<Vec<_>>>()?;
        if self.release_pages {
            if let Some(m) = self.params[self.lm_head].mapped() {
                m.release_pages();
            }
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// Token embeddings for `ids` `[b, t]` → `[b, t, hidden]`.
    pub fn embed(&self, ids: &Tensor, grad: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.rows_of(self.embed, &ids.flatten_all()?, grad)?;
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
            None => fused::rms_norm(x, &self.w(wi, grad)?, eps)?,
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
            Some(bi) => y.broadcast_add(&self.w(bi, grad)?)?,
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
        let logits = self.head_linear(&xn.reshape((b * t, h))?, grad)?;
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
