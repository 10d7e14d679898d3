//! The gradient of the mean NLL for every parameter, by a hand-written backward pass over the
//! fused kernels: no autograd graph, so none of candle's per-node gradient bookkeeping (a zero
//! tensor and an add for every intermediate, reshape and copy nodes). The forward keeps each
//! layer's activations on a tape; the backward walks the layers in reverse and hands every
//! parameter's gradient to a [`GradSink`] as soon as it is known.
//!
//! Same values as `mean_nll(ids).backward()` (tests compare both in f64 to 1e-12); used by
//! `score`, where the backward is most of the work.

use super::fused::{self, GradSink};
use super::{AttnContext, Model};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::sync::Mutex;

/// One layer's activations, as the backward needs them (`n` = b·t rows).
struct Tape {
    /// Layer input `[n, hidden]`, its input-norm output `[n, hidden]`.
    x: Tensor,
    hn1: Tensor,
    /// Rotated queries `[b, heads, t, d]`, keys and values `[b, kv, t, d]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention output `[b, t, heads, d]`.
    a: Tensor,
    /// Residual after attention `[n, hidden]`, its post-norm output `[n, hidden]`.
    x_mid: Tensor,
    hn2: Tensor,
    /// Gate and up projections and their SwiGLU `[n, intermediate]`.
    g: Tensor,
    u: Tensor,
    act: Tensor,
}

impl Model {
    /// Whether [`Model::mean_nll_grads`] can run (the fused CPU kernels are in use).
    pub fn has_manual_backward(&self) -> bool {
        let on_cpu = self.params.iter().all(|p| match &p.weight {
            super::Weight::Dense(v) => v.device().is_cpu(),
            super::Weight::Mapped(_) => true,
        });
        on_cpu && fused::fused_enabled() && matches!(self.dtype(), DType::F32 | DType::F64)
    }

    /// The lowest layer the backward must reach for `sink`: the lowest with a wanted
    /// parameter, 0 when the embedding is wanted, `num_layers` when none is.
    fn lowest_wanted_layer(&self, sink: &dyn GradSink) -> usize {
        if sink.wants(self.embed) {
            return 0;
        }
        (0..self.config.num_layers)
            .find(|&l| self.layer_params(l).into_iter().any(|i| sink.wants(i)))
            .unwrap_or(self.config.num_layers)
    }

    /// Mean NLL over all predicted tokens of `ids` `[b, t]` (as [`Model::mean_nll`]), with
    /// the gradient of every parameter `sink` wants sent to it: linear weights, norms and
    /// biases through [`GradSink::add`], the embedding's rows through [`GradSink::add_rows`]
    /// (with tied embeddings the output projection's part arrives through `add` as well; a
    /// mapped output projection sends its gradient block by block through `add_rows`). The
    /// forward keeps activations only for the layers the backward visits, and the backward
    /// stops at the lowest layer with a wanted parameter.
    pub fn mean_nll_grads(&self, ids: &Tensor, sink: &dyn GradSink) -> Result<f64> {
        if !self.has_manual_backward() {
            bail!("the manual backward needs the fused CPU kernels (f32 or f64)");
        }
        let (b, t) = ids.dims2()?;
        if t < 2 {
            bail!("a window needs at least 2 tokens, got {t}");
        }
        let c = &self.config;
        let h = c.hidden_size;
        let ctx = self.attn_context(t)?;
        let flat_ids = ids.flatten_all()?;

        let lowest = self.lowest_wanted_layer(sink);
        // forward, keeping the tape from the lowest wanted layer on
        let mut x = self.rows_of(self.embed, &flat_ids, false)?;
        let mut tapes = Vec::with_capacity(c.num_layers - lowest);
        for l in 0..c.num_layers {
            if l < lowest {
                x = self
                    .layer(l, &x.reshape((b, t, h))?, &ctx, false)?
                    .reshape((b * t, h))?;
                continue;
            }
            let (next, tape) = self.layer_taped(l, &x, &ctx, b, t)?;
            tapes.push(tape);
            x = next;
        }
        // head on positions 0..t-1 of each window
        let xs = x.reshape((b, t, h))?.narrow(1, 0, t - 1)?.contiguous()?;
        let xs = xs.reshape((b * (t - 1), h))?;
        let eps = c.rms_eps;
        let wf = self.w(self.final_norm, false)?;
        let xn = fused::rms_norm(&xs, &wf, eps)?;
        let logits = self.head_linear(&xn, false)?;
        let targets = ids.narrow(1, 1, t - 1)?.contiguous()?.flatten_all()?;
        let nll = fused::token_nll(&logits, &targets)?;
        let count = nll.elem_count();
        let loss = nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? / count as f64;

        // backward
        let d = Tensor::full(1.0 / count as f64, count, &candle_core::Device::Cpu)?
            .to_dtype(nll.dtype())?;
        let dlogits = fused::token_nll_backward(&logits, &targets, &nll, &d)?;
        drop(logits);
        if lowest == c.num_layers && !sink.wants(self.final_norm) && !sink.wants(self.lm_head) {
            return Ok(loss);
        }
        let dxn = self.head_backward(&dlogits, &xn, sink)?;
        drop(dlogits);
        let (dxs, dwf) = fused::rms_norm_backward(&xs, &wf, eps, &dxn)?;
        if sink.wants(self.final_norm) {
            sink.add(self.final_norm, &dwf)?;
        }
        // the last position of each window predicts nothing: zero gradient there
        let zero = Tensor::zeros((b, 1, h), dxs.dtype(), dxs.device())?;
        let mut dx = Tensor::cat(&[&dxs.reshape((b, t - 1, h))?, &zero], 1)?.reshape((b * t, h))?;
        for l in (lowest..c.num_layers).rev() {
            dx = self.layer_backward(
                l,
                tapes.pop().expect("one tape per layer"),
                &dx,
                &ctx,
                b,
                t,
                sink,
            )?;
        }
        if lowest == 0 && sink.wants(self.embed) {
            let rows: Vec<u32> = flat_ids.to_vec1()?;
            sink.add_rows(self.embed, &rows, &dx)?;
        }
        Ok(loss)
    }

    /// The output projection's backward: its weight gradient to `sink` (when wanted) and
    /// the gradient of its input `xn` `[n, hidden]` returned, block by block as the forward
    /// ran it ([`Model::head_blocks`], the same for dense and mapped weights, so both give
    /// the same bits).
    fn head_backward(&self, dlogits: &Tensor, xn: &Tensor, sink: &dyn GradSink) -> Result<Tensor> {
        let i = self.lm_head;
        let want = sink.wants(i);
        let blocks = self.head_blocks();
        if blocks.len() == 1 {
            if want {
                sink.add(i, &fused::linear_backward_weight(dlogits, xn)?)?;
            }
            return Ok(fused::linear_backward_input(dlogits, &self.w(i, false)?)?);
        }
        let mut dxn: Option<Tensor> = None;
        for r in blocks {
            let dl = dlogits.narrow(1, r.start, r.len())?.contiguous()?;
            if want {
                let rows: Vec<u32> = (r.start as u32..r.end as u32).collect();
                sink.add_rows(i, &rows, &fused::linear_backward_weight(&dl, xn)?)?;
            }
            let part = fused::linear_backward_input(&dl, &self.head_block(r)?)?;
            dxn = Some(match dxn {
                None => part,
                Some(acc) => (acc + part)?,
            });
        }
        dxn.context("the output projection has no rows")
    }

    /// Every parameter index of layer `l`.
    pub(crate) fn layer_params(&self, l: usize) -> Vec<usize> {
        let li = &self.layers[l];
        let mut v = vec![
            li.input_norm,
            li.q,
            li.k,
            li.v,
            li.o,
            li.post_norm,
            li.gate,
            li.up,
            li.down,
        ];
        if let Some((q, k, v2)) = li.bias {
            v.extend([q, k, v2]);
        }
        v
    }

    /// Mean NLL of `ids` `[b, t]` and every parameter's gradient as a dense tensor (model
    /// order; `None` where a parameter gets none): the manual backward where it can run,
    /// candle's autograd elsewhere. What training uses.
    pub fn mean_nll_and_grads(&self, ids: &Tensor) -> Result<(f64, Vec<Option<Tensor>>)> {
        if !self.has_manual_backward() {
            let loss = self.mean_nll(ids)?;
            let grads = loss.backward()?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let dense = self
                .params
                .iter()
                .map(|p| Ok(grads.get(p.var()?.as_tensor()).cloned()))
                .collect::<Result<_>>()?;
            return Ok((value, dense));
        }
        let sink = DenseGrads {
            shapes: self.params.iter().map(|p| p.shape.clone()).collect(),
            grads: Mutex::new(vec![None; self.params.len()]),
        };
        let loss = self.mean_nll_grads(ids, &sink)?;
        Ok((
            loss,
            sink.grads.into_inner().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// One decoder layer on `x` `[b·t, hidden]` (as [`Model::layer`]), returning its output
    /// and the activations its backward needs.
    fn layer_taped(
        &self,
        l: usize,
        x: &Tensor,
        ctx: &AttnContext,
        b: usize,
        t: usize,
    ) -> Result<(Tensor, Tape)> {
        let c = &self.config;
        let li = &self.layers[l];
        let (nh, hd, eps) = (c.num_heads, c.head_dim, c.rms_eps);
        // the inference forward (detached weights), keeping what the backward reads
        let lin = |x: &Tensor, wi: usize| self.linear_bias(x, wi, None, false);
        let hn1 = fused::rms_norm(x, &self.w(li.input_norm, false)?, eps)?;
        let (q, k, v) = self.qkv(li, &hn1, ctx, b, t, false)?;
        let a = fused::causal_attention_blocked(&q, &k, &v)?;
        let x_mid = (x + lin(&a.reshape((b * t, nh * hd))?, li.o)?)?;
        let hn2 = fused::rms_norm(&x_mid, &self.w(li.post_norm, false)?, eps)?;
        let g = lin(&hn2, li.gate)?;
        let u = lin(&hn2, li.up)?;
        let act = fused::swiglu(&g, &u)?;
        let out = (&x_mid + lin(&act, li.down)?)?;
        let tape = Tape {
            x: x.clone(),
            hn1,
            q,
            k,
            v,
            a,
            x_mid,
            hn2,
            g,
            u,
            act,
        };
        Ok((out, tape))
    }

    /// The backward of layer `l`: from the gradient `dy` of its output `[b·t, hidden]`, sends
    /// its parameters' gradients to `sink` and returns the gradient of its input.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        tape: Tape,
        dy: &Tensor,
        ctx: &AttnContext,
        b: usize,
        t: usize,
        sink: &dyn GradSink,
    ) -> Result<Tensor> {
        let c = &self.config;
        let li = &self.layers[l];
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let eps = c.rms_eps;
        let n = b * t;
        // dW = dyᵀ·x to the sink (when wanted), dx = dy·W returned
        let linear_bwd = |dy: &Tensor, x: &Tensor, wi: usize| -> Result<Tensor> {
            if sink.wants(wi) {
                sink.add(wi, &fused::linear_backward_weight(dy, x)?)?;
            }
            Ok(fused::linear_backward_input(dy, &self.w(wi, false)?)?)
        };
        let add = |wi: usize, g: &Tensor| -> Result<()> {
            if sink.wants(wi) {
                sink.add(wi, g)?;
            }
            Ok(())
        };
        // MLP
        let dact = linear_bwd(dy, &tape.act, li.down)?;
        let (dg, du) = fused::swiglu_backward(&tape.g, &tape.u, &dact)?;
        drop(dact);
        let dhn2 = (linear_bwd(&dg, &tape.hn2, li.gate)? + linear_bwd(&du, &tape.hn2, li.up)?)?;
        drop((dg, du));
        let (dx_norm, dw) =
            fused::rms_norm_backward(&tape.x_mid, &self.w(li.post_norm, false)?, eps, &dhn2)?;
        add(li.post_norm, &dw)?;
        let d_mid = (dy + dx_norm)?;
        // attention
        let da = linear_bwd(&d_mid, &tape.a.reshape((n, nh * hd))?, li.o)?;
        let (dq, dk, dv) = fused::causal_attention_backward(
            &tape.q,
            &tape.k,
            &tape.v,
            &tape.a,
            &da.reshape((b, t, nh, hd))?,
        )?;
        drop(da);
        let dq = fused::rope_transposed_backward(&dq, &ctx.cos, &ctx.sin)?.reshape((n, nh * hd))?;
        let dk =
            fused::rope_transposed_backward(&dk, &ctx.cos, &ctx.sin)?.reshape((n, nkv * hd))?;
        let dv = dv.transpose(1, 2)?.contiguous()?.reshape((n, nkv * hd))?;
        let (qb, kb, vb) = li.biases();
        for (bi, d) in [(qb, &dq), (kb, &dk), (vb, &dv)] {
            if let Some(bi) = bi {
                add(bi, &d.sum(0)?)?;
            }
        }
        let dhn1 = ((linear_bwd(&dq, &tape.hn1, li.q)? + linear_bwd(&dk, &tape.hn1, li.k)?)?
            + linear_bwd(&dv, &tape.hn1, li.v)?)?;
        let (dx_norm, dw) =
            fused::rms_norm_backward(&tape.x, &self.w(li.input_norm, false)?, eps, &dhn1)?;
        add(li.input_norm, &dw)?;
        Ok((d_mid + dx_norm)?)
    }
}

/// Collects gradients as dense tensors, adding up repeated contributions.
struct DenseGrads {
    shapes: Vec<Vec<usize>>,
    grads: Mutex<Vec<Option<Tensor>>>,
}

impl DenseGrads {
    fn accumulate(&self, param: usize, g: Tensor) -> candle_core::Result<()> {
        let mut gs = self.grads.lock().unwrap_or_else(|e| e.into_inner());
        let slot = gs
            .get_mut(param)
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {param}")))?;
        *slot = Some(match slot.take() {
            Some(old) => (old + g)?,
            None => g,
        });
        Ok(())
    }
}

impl GradSink for DenseGrads {
    fn add(&self, param: usize, g: &Tensor) -> candle_core::Result<()> {
        self.accumulate(param, g.clone())
    }

    fn add_rows(&self, param: usize, rows: &[u32], g: &Tensor) -> candle_core::Result<()> {
        let shape = self
            .shapes
            .get(param)
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {param}")))?;
        let idx = Tensor::new(rows, g.device())?;
        let dense =
            Tensor::zeros(shape.as_slice(), g.dtype(), g.device())?.index_add(&idx, g, 0)?;
        self.accumulate(param, dense)
    }
}

#[cfg(test)]
mod tests {
    use crate::model::fused::testing::max_abs_diff;
    use crate::model::{Arch, Config, GradSink, Model};
    use candle_core::{DType, Device, Tensor};
    use std::sync::Mutex;

    /// Collects dense gradients per parameter.
    struct Dense {
        shapes: Vec<Vec<usize>>,
        grads: Mutex<Vec<Option<Tensor>>>,
    }
    impl Dense {
        fn add_dense(&self, param: usize, g: Tensor) -> candle_core::Result<()> {
            let mut gs = self.grads.lock().unwrap();
            gs[param] = Some(match gs[param].take() {
                Some(old) => (old + g)?,
                None => g,
            });
            Ok(())
        }
    }
    impl GradSink for Dense {
        fn add(&self, param: usize, g: &Tensor) -> candle_core::Result<()> {
            assert_eq!(g.dims(), self.shapes[param].as_slice());
            self.add_dense(param, g.clone())
        }
        fn add_rows(&self, param: usize, rows: &[u32], g: &Tensor) -> candle_core::Result<()> {
            let z = Tensor::zeros(self.shapes[param].as_slice(), g.dtype(), g.device())?;
            let idx = Tensor::new(rows, g.device())?;
            self.add_dense(param, z.index_add(&idx, g, 0)?)
        }
    }

    /// Both architectures, tied and untied head, batch 2: the manual backward gives the loss
    /// and every parameter's gradient of candle's autograd through the same kernels.
    #[test]
    fn manual_backward_matches_autograd() {
        for (arch, tie) in [
            (Arch::Llama, true),
            (Arch::Llama, false),
            (Arch::Qwen2, false),
        ] {
            let mut cfg = Config::tiny(arch);
            cfg.tie_embeddings = tie;
            let m = Model::random(cfg, DType::F64, 3).unwrap();
            assert!(m.has_manual_backward());
            let ids: Vec<u32> = (0..18).map(|i| (i * 5 + 2) % 37).collect();
            let ids = Tensor::from_vec(ids, (2, 9), &Device::Cpu).unwrap();
            let loss = m.mean_nll(&ids).unwrap();
            let want = loss.backward().unwrap();
            let sink = Dense {
                shapes: m.params.iter().map(|p| p.shape.clone()).collect(),
                grads: Mutex::new(vec![None; m.params.len()]),
            };
            let got_loss = m.mean_nll_grads(&ids, &sink).unwrap();
            assert!((got_loss - loss.to_scalar::<f64>().unwrap()).abs() < 1e-12);
            let got = sink.grads.into_inner().unwrap();
            let (dense_loss, dense) = m.mean_nll_and_grads(&ids).unwrap();
            assert_eq!(dense_loss, got_loss);
            for ((p, g), d) in m.params.iter().zip(&got).zip(&dense) {
                let g = g
                    .as_ref()
                    .unwrap_or_else(|| panic!("{}: no gradient", p.name));
                let w = want.get(p.var().unwrap().as_tensor()).unwrap();
                let diff = max_abs_diff(g, w);
                assert!(
                    diff < 1e-12,
                    "{arch:?} tie {tie} {}: differs by {diff}",
                    p.name
                );
                assert!(
                    max_abs_diff(d.as_ref().unwrap(), w) < 1e-12,
                    "{}: dense",
                    p.name
                );
            }
        }
    }
}
