//! The decoder-only transformer behind Llama (SmolLM2, Llama 3), Mistral, Qwen2 (Qwen2.5),
//! Qwen3 and Gemma 2 / 3.
//!
//! One implementation with two paths. [`Mode::Inference`] may use candle's fused kernels
//! (`rms_norm`, `softmax_last_dim`, `rope`), which record no backward op. [`Mode::Train`] uses
//! only differentiable ops and the frozen-weight matmul, so gradients reach exactly the LoRA
//! factors. Structs mirror the checkpoint: `Decoder` → `DecoderLayer` → `Attention` / `Mlp`.

use crate::batch::{KvCache, TokenBatch};
use crate::config::DecoderConfig;
use crate::cpu::CpuKernels;
use crate::linear::{matmul_wt, BaseWeight, FrozenLinear, LoraRun};
use crate::lora::{dropout_mask, LoraAdapter, Projection};
use crate::weights::{WeightMap, Weights};
use crate::Error;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::sync::Arc;

/// Which computation path a forward pass takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fused kernels, quantized weights allowed, no gradient bookkeeping needed.
    Inference,
    /// Differentiable ops only; LoRA dropout drawn from `dropout_seed` when given.
    Train { dropout_seed: Option<u64> },
}

/// Which positions get logits (the LM head is the largest matmul of a small model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsAt {
    /// No logits, only hidden states (value heads, reward models).
    None,
    /// Every position: `[batch, seq, vocab]`.
    All,
    /// Each row's last real token: `[batch, vocab]`.
    Last,
    /// Chosen `(row, column)` pairs: `[n, vocab]`.
    Positions(Vec<(usize, usize)>),
    /// Chosen `(row, column)` pairs at chosen vocabulary entries only: `[n, tokens.len()]`
    /// (a few label tokens without the full-vocabulary product; the inference path).
    PositionsAt { positions: Vec<(usize, usize)>, tokens: Vec<u32> },
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct DecoderOutput {
    /// Final hidden states after the last norm, `[batch, seq, hidden]` (f32 under bf16/f16
    /// weights): the value-head hook.
    pub hidden: Tensor,
    /// Logits as requested by [`LogitsAt`] (`None` for [`LogitsAt::None`]; f32 under bf16/f16
    /// weights).
    pub logits: Option<Tensor>,
}

struct RmsNorm {
    /// The scale the normalized values are multiplied by: the checkpoint's weight, plus one
    /// where `offset` (Gemma stores `w` and scales by `1 + w`).
    weight: Tensor,
    eps: f32,
    offset: bool,
}

impl RmsNorm {
    fn new(w: &Weights, eps: f64, offset: bool) -> Result<Self, Error> {
        let stored = w.dense("weight")?;
        let weight = if offset { (stored.to_dtype(DType::F32)? + 1.0)?.to_dtype(stored.dtype())? } else { stored };
        Ok(Self { weight, eps: eps as f32, offset })
    }

    /// The weight as the checkpoint stores it (f32).
    fn stored(&self) -> Result<Tensor, Error> {
        let w = self.weight.to_dtype(DType::F32)?;
        Ok(if self.offset { (w - 1.0)? } else { w })
    }

    fn clone_shallow(&self) -> Self {
        Self { weight: self.weight.clone(), eps: self.eps, offset: self.offset }
    }

    fn forward(&self, x: &Tensor, mode: Mode, fused: bool) -> Result<Tensor, Error> {
        Ok(match mode {
            Mode::Inference => candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?,
            Mode::Train { .. } if fused => {
                let weight = self.weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                x.contiguous()?.apply_op1(crate::cpu::train_ops::RmsNorm { weight, eps: self.eps })?
            }
            Mode::Train { .. } => candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)?,
        })
    }
}

/// Which LoRA adapter each row of a batch goes through.
#[derive(Debug, Clone, Copy)]
pub enum Adapters<'a> {
    /// Every row uses the same adapter (or none): what [`Decoder::forward`] takes.
    Same(Option<&'a LoraAdapter>),
    /// Row `i` uses `rows[i]`, unmerged: one base forward, then each run of rows that share an
    /// adapter gets that adapter's delta. Keep rows of one adapter together: each run costs two
    /// small matmuls per projection.
    PerRow(&'a [Option<&'a LoraAdapter>]),
}

impl<'a> Adapters<'a> {
    /// Rows `0..batch` cut into maximal runs `(start, end, adapter)` of rows that share an
    /// adapter (by identity): each run's LoRA delta is one computation.
    fn runs(&self, batch: usize) -> Vec<(usize, usize, Option<&'a LoraAdapter>)> {
        let rows: Vec<usize> = (0..batch).collect();
        rows.chunk_by(|&a, &b| same_adapter(self.row(a), self.row(b)))
            .map(|run| (run[0], run[0] + run.len(), self.row(run[0])))
            .collect()
    }

    /// The adapter of row `i`.
    pub fn row(&self, i: usize) -> Option<&'a LoraAdapter> {
        match self {
            Adapters::Same(a) => *a,
            Adapters::PerRow(rows) => rows.get(i).copied().flatten(),
        }
    }
}

/// Whether two rows use the very same adapter (by identity, not by value).
fn same_adapter(a: Option<&LoraAdapter>, b: Option<&LoraAdapter>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => std::ptr::eq(x, y),
        _ => false,
    }
}

/// Per-forward state every layer reads.
struct LayerCtx<'a> {
    mode: Mode,
    kernels: &'a CpuKernels,
    /// The fused CPU ops (attention, norms, rotary, SwiGLU) run on both paths: our kernels on
    /// the CPU in f32. Elsewhere candle's ops.
    fused: bool,
    adapters: Adapters<'a>,
    /// The keys each query may see: as an additive mask `[batch, 1, 1, seq, keys]` for
    /// candle's ops, or as booleans for the fused CPU attention.
    mask: AttentionMask,
    /// The sliding layers' mask where it differs from `mask` (Gemma).
    sliding_mask: Option<AttentionMask>,
    /// `[batch, seq, head_dim/2]`
    cos: Tensor,
    sin: Tensor,
    /// The sliding layers' rotary tables where they differ (Gemma 3).
    local_cos_sin: Option<(Tensor, Tensor)>,
    cfg: &'a DecoderConfig,
    /// The cache is only read (a branched forward, whose branch tokens must not reach it):
    /// each layer attends over the cached keys and values joined with its own and drops the
    /// joined copy after the layer, instead of storing every layer's until the forward ends
    /// (on SmolLM2 with an 80-token prompt prefix, 4.3 MiB per scored input).
    read_only_cache: bool,
}

impl LayerCtx<'_> {
    fn mask(&self, layer: usize) -> &AttentionMask {
        match &self.sliding_mask {
            Some(m) if self.cfg.slides(layer) => m,
            _ => &self.mask,
        }
    }

    fn cos_sin(&self, layer: usize) -> (&Tensor, &Tensor) {
        match &self.local_cos_sin {
            Some((c, s)) if self.cfg.local_layer(layer) => (c, s),
            _ => (&self.cos, &self.sin),
        }
    }

    /// A frozen projection plus its LoRA delta, if the adapter targets it.
    fn project(&self, linear: &FrozenLinear, layer: usize, proj: Projection, x: &Tensor) -> Result<Tensor, Error> {
        if let Some(y) = self.project_fused(linear, layer, proj, x)? {
            return Ok(y);
        }
        let base = match self.mode {
            Mode::Inference => linear.forward_inference(x, self.kernels)?,
            Mode::Train { .. } => linear.forward_train(x, self.kernels)?,
        };
        match self.adapters {
            Adapters::Same(None) => Ok(base),
            Adapters::Same(Some(adapter)) => match self.lora_delta(adapter, layer, proj, x)? {
                Some(delta) => Ok((base + delta)?),
                None => Ok(base),
            },
            Adapters::PerRow(rows) => {
                // One delta block per run of rows sharing an adapter; zeros where none applies.
                let mut parts = Vec::new();
                let mut any = false;
                for (start, end, adapter) in self.adapters.runs(rows.len()) {
                    let delta = match adapter {
                        Some(adapter) => self.lora_delta(adapter, layer, proj, &x.narrow(0, start, end - start)?)?,
                        None => None,
                    };
                    parts.push(match delta {
                        Some(d) => {
                            any = true;
                            d
                        }
                        None => base.narrow(0, start, end - start)?.zeros_like()?,
                    });
                }
                if !any {
                    return Ok(base);
                }
                Ok((base + Tensor::cat(&parts, 0)?)?)
            }
        }
    }

    /// Inference with frozen adapters on the packed CPU kernel: the base product and every
    /// run's LoRA delta in one output buffer ([`FrozenLinear::forward_inference_lora`]), the
    /// same values as [`LayerCtx::project`]'s tensor ops up to float rounding. `None` where it
    /// does not apply (training, no adapter, an adapter that trains, quantized weights...).
    fn project_fused(
        &self,
        linear: &FrozenLinear,
        layer: usize,
        proj: Projection,
        x: &Tensor,
    ) -> Result<Option<Tensor>, Error> {
        if !matches!(self.mode, Mode::Inference) || matches!(self.adapters, Adapters::Same(None)) {
            return Ok(None);
        }
        let batch = x.dim(0)?;
        let per_row = x.elem_count() / x.dim(D::Minus1)?.max(1) / batch.max(1);
        let mut runs = Vec::new();
        for (start, end, adapter) in self.adapters.runs(batch) {
            if let Some(adapter) = adapter.filter(|a| a.pair(layer, proj).is_some()) {
                let Some(lora) = adapter.packed_pair(layer, proj, self.kernels) else { return Ok(None) };
                runs.push(LoraRun { start: start * per_row, end: end * per_row, lora });
            }
        }
        Ok(linear.forward_inference_lora(x, &runs, self.kernels)?)
    }

    /// `scaling · (x Aᵀ) Bᵀ` of one adapter at one projection, `None` where it has no pair.
    fn lora_delta(
        &self,
        adapter: &LoraAdapter,
        layer: usize,
        proj: Projection,
        x: &Tensor,
    ) -> Result<Option<Tensor>, Error> {
        let Some(pair) = adapter.pair(layer, proj) else { return Ok(None) };
        let cfg = adapter.config();
        // The factors keep their own precision (f32) under bf16/f16 base weights; the delta
        // returns in the activations' dtype.
        let x_dtype = x.dtype();
        let x = &x.to_dtype(pair.a.dtype())?;
        let x = match self.mode {
            Mode::Train { dropout_seed: Some(seed) } if cfg.dropout > 0.0 => {
                let site = seed ^ ((layer as u64) << 32) ^ ((proj as u64 + 1) << 56);
                x.broadcast_mul(&dropout_mask(x.dims(), cfg.dropout, site, x.dtype(), x.device())?)?
            }
            _ => x.clone(),
        };
        let product = |x: &Tensor, w: &Tensor| match self.mode {
            // The factors may change between calls (dev evaluation during training): packed
            // afresh each time, which costs little at rank r.
            Mode::Inference => crate::linear::matmul_wt_packed_once(x, w, self.kernels),
            Mode::Train { .. } => matmul_wt(x, w),
        };
        Ok(Some((product(&product(&x, &pair.a)?, &pair.b)? * pair.scaling())?.to_dtype(x_dtype)?))
    }

    fn rope(&self, x: &Tensor, layer: usize) -> Result<Tensor, Error> {
        let (cos, sin) = self.cos_sin(layer);
        Ok(match self.mode {
            Mode::Inference => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?,
            Mode::Train { .. } if self.fused => {
                let (cos, sin) = (cos.flatten_all()?.to_vec1::<f32>()?, sin.flatten_all()?.to_vec1::<f32>()?);
                x.contiguous()?.apply_op1(crate::cpu::train_ops::Rope { cos, sin })?
            }
            Mode::Train { .. } => {
                // x·cos + rotate_half(x)·sin with per-row positions, differentiable.
                let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
                let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
                let half = x.dim(D::Minus1)? / 2;
                let rotated = Tensor::cat(
                    &[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?],
                    D::Minus1,
                )?;
                (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?
            }
        })
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor, Error> {
        Ok(match self.mode {
            Mode::Inference => match crate::fast::softmax_last_dim(x, self.kernels)? {
                Some(p) => p,
                None => candle_nn::ops::softmax_last_dim(x)?,
            },
            Mode::Train { .. } => candle_nn::ops::softmax(x, D::Minus1)?,
        })
    }
}

struct Attention {
    q_proj: FrozenLinear,
    k_proj: FrozenLinear,
    v_proj: FrozenLinear,
    o_proj: FrozenLinear,
    /// Per-head RMS norms of the queries and keys before the rotary embedding (Qwen3, Gemma 3).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Queries multiplied by this so that the kernels' `head_dim^-1/2` gives Gemma's
    /// `query_pre_attn_scalar^-1/2`.
    query_scale: Option<f64>,
    /// Gemma 2's `cap · tanh(score / cap)` before the mask.
    softcap: Option<f64>,
}

impl Attention {
    fn new(cfg: &DecoderConfig, w: &Weights) -> Result<Self, Error> {
        let head_norm = |name: &str| -> Result<RmsNorm, Error> {
            let norm = RmsNorm::new(&w.pp(name), cfg.rms_norm_eps, cfg.arch.is_gemma())?;
            let dims = norm.weight.dims().to_vec();
            if dims != [cfg.head_dim] {
                return Err(Error::Invalid(format!(
                    "{} is {dims:?}, the head dimension is {}",
                    w.pp(name).path("weight"),
                    cfg.head_dim
                )));
            }
            Ok(norm)
        };
        let qk_norm = if cfg.qk_norm() { Some((head_norm("q_norm")?, head_norm("k_norm")?)) } else { None };
        Ok(Self {
            q_proj: w.pp("q_proj").linear(cfg.attention_bias)?,
            k_proj: w.pp("k_proj").linear(cfg.attention_bias)?,
            v_proj: w.pp("v_proj").linear(cfg.attention_bias)?,
            o_proj: w.pp("o_proj").linear(false)?,
            qk_norm,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            query_scale: cfg
                .gemma
                .as_ref()
                .map(|g| (cfg.head_dim as f64 / g.query_pre_attn_scalar).sqrt())
                .filter(|&s| s != 1.0),
            softcap: cfg.gemma.as_ref().and_then(|g| g.attn_logit_softcapping),
        })
    }

    fn forward(&self, x: &Tensor, layer: usize, ctx: &LayerCtx, cache: Option<&mut KvCache>) -> Result<Tensor, Error> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor, Error> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (mut q, mut k) = (
            heads(ctx.project(&self.q_proj, layer, Projection::Q, x)?, nh)?,
            heads(ctx.project(&self.k_proj, layer, Projection::K, x)?, nkv)?,
        );
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q, ctx.mode, ctx.fused)?;
            k = k_norm.forward(&k, ctx.mode, ctx.fused)?;
        }
        let (q, k) = (ctx.rope(&q, layer)?, ctx.rope(&k, layer)?);
        let q = match self.query_scale {
            Some(s) => (q * s)?,
            None => q,
        };
        let v = heads(ctx.project(&self.v_proj, layer, Projection::V, x)?, nkv)?;
        let (k, v) = match cache {
            Some(cache) => {
                let kv = match cache.layer(layer) {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                    None => (k, v),
                };
                if !ctx.read_only_cache {
                    cache.set_layer(layer, kv.clone());
                }
                kv
            }
            None => (k, v),
        };
        if let (AttentionMask::Keys(mask), Mode::Train { .. }) = (ctx.mask(layer), ctx.mode) {
            // Training on the CPU: one differentiable op, products on the f32 tiles.
            let op = crate::cpu::train_ops::Attention {
                mask: mask.clone(),
                heads: nh,
                kv_heads: nkv,
                kernels: ctx.kernels.clone(),
            };
            let y = q.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
            return ctx.project(&self.o_proj, layer, Projection::O, &y);
        }
        if let AttentionMask::Keys(mask) = ctx.mask(layer) {
            // Inference on the CPU: the fused kernel over the allowed keys only.
            let heads = crate::cpu::attention::Heads { heads: nh, kv_heads: nkv, head_dim: hd };
            use crate::fast::with_f32;
            let y = with_f32(&q, |q| {
                with_f32(&k, |k| {
                    with_f32(&v, |v| crate::cpu::attention::attention(q, k, v, mask, heads, &ctx.kernels.caps))
                })
            })??;
            let y = Tensor::from_vec(y?, (b, t, nh * hd), x.device())?;
            return ctx.project(&self.o_proj, layer, Projection::O, &y);
        }
        let keys = k.dim(2)?;
        // Grouped-query attention without copying K/V: the query heads that share a KV head
        // are stacked along the sequence axis.
        let rep = nh / nkv;
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = match self.softcap {
            Some(cap) => ((scores / cap)?.tanh()? * cap)?,
            None => scores,
        };
        let AttentionMask::Additive(mask) = ctx.mask(layer) else { unreachable!("fused attention returned above") };
        let scores = scores.reshape((b, nkv, rep, t, keys))?.broadcast_add(mask)?;
        let probs = ctx.softmax(&scores)?.reshape((b, nkv, rep * t, keys))?;
        let y = probs.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        ctx.project(&self.o_proj, layer, Projection::O, &y)
    }
}

struct Mlp {
    gate_proj: FrozenLinear,
    up_proj: FrozenLinear,
    down_proj: FrozenLinear,
    /// GeGLU with the tanh GELU (Gemma) instead of SwiGLU.
    gelu: bool,
}

impl Mlp {
    fn new(w: &Weights, gelu: bool) -> Result<Self, Error> {
        Ok(Self {
            gate_proj: w.pp("gate_proj").linear(false)?,
            up_proj: w.pp("up_proj").linear(false)?,
            down_proj: w.pp("down_proj").linear(false)?,
            gelu,
        })
    }

    fn forward(&self, x: &Tensor, layer: usize, ctx: &LayerCtx) -> Result<Tensor, Error> {
        let gate = ctx.project(&self.gate_proj, layer, Projection::Gate, x)?;
        let up = ctx.project(&self.up_proj, layer, Projection::Up, x)?;
        if self.gelu {
            let act = match ctx.mode {
                // candle's `gelu` is the tanh approximation (transformers' gelu_pytorch_tanh).
                Mode::Inference => gate.gelu()?,
                // Its backward op rounds the formula's constants to six digits (a relative
                // gradient error near 3e-6, which the finite-difference check catches): spelled
                // out in differentiable ops instead.
                Mode::Train { .. } => gelu_tanh(&gate)?,
            };
            return ctx.project(&self.down_proj, layer, Projection::Down, &(act * up)?);
        }
        let fused = match ctx.mode {
            Mode::Inference => crate::fast::swiglu(&gate, &up, ctx.kernels)?,
            Mode::Train { .. } if ctx.fused => {
                Some(gate.contiguous()?.apply_op2(&up.contiguous()?, crate::cpu::train_ops::Swiglu)?)
            }
            Mode::Train { .. } => None,
        };
        let hidden = match fused {
            Some(h) => h,
            None => (gate.silu()? * up)?,
        };
        ctx.project(&self.down_proj, layer, Projection::Down, &hidden)
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// Before the MLP; Gemma: on the attention's output, before the residual sum.
    post_attention_layernorm: RmsNorm,
    /// Gemma: before the MLP, and on the MLP's output before the residual sum.
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &DecoderConfig, w: &Weights) -> Result<Self, Error> {
        let gemma = cfg.arch.is_gemma();
        let norm = |name: &str| RmsNorm::new(&w.pp(name), cfg.rms_norm_eps, gemma);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(cfg, &w.pp("self_attn"))?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            feedforward_norms: if gemma {
                Some((norm("pre_feedforward_layernorm")?, norm("post_feedforward_layernorm")?))
            } else {
                None
            },
            mlp: Mlp::new(&w.pp("mlp"), gemma)?,
        })
    }

    fn forward(&self, x: &Tensor, layer: usize, ctx: &LayerCtx, cache: Option<&mut KvCache>) -> Result<Tensor, Error> {
        let norm = |n: &RmsNorm, x: &Tensor| n.forward(x, ctx.mode, ctx.fused);
        let h = norm(&self.input_layernorm, x)?;
        let attn = self.self_attn.forward(&h, layer, ctx, cache)?;
        match &self.feedforward_norms {
            None => {
                let x = (x + attn)?;
                let h = norm(&self.post_attention_layernorm, &x)?;
                Ok((&x + self.mlp.forward(&h, layer, ctx)?)?)
            }
            Some((pre, post)) => {
                let x = (x + norm(&self.post_attention_layernorm, &attn)?)?;
                let h = norm(pre, &x)?;
                Ok((&x + norm(post, &self.mlp.forward(&h, layer, ctx)?)?)?)
            }
        }
    }

    /// The layer's RMS norms with their checkpoint names (`DecoderConfig::layer_norms`' order).
    fn norms(&self) -> Vec<&RmsNorm> {
        let mut v = vec![&self.input_layernorm, &self.post_attention_layernorm];
        if let Some((pre, post)) = &self.feedforward_norms {
            v.extend([pre, post]);
        }
        v
    }

    fn linear(&self, proj: Projection) -> &FrozenLinear {
        match proj {
            Projection::Q => &self.self_attn.q_proj,
            Projection::K => &self.self_attn.k_proj,
            Projection::V => &self.self_attn.v_proj,
            Projection::O => &self.self_attn.o_proj,
            Projection::Gate => &self.mlp.gate_proj,
            Projection::Up => &self.mlp.up_proj,
            Projection::Down => &self.mlp.down_proj,
        }
    }

    fn linear_mut(&mut self, proj: Projection) -> &mut FrozenLinear {
        match proj {
            Projection::Q => &mut self.self_attn.q_proj,
            Projection::K => &mut self.self_attn.k_proj,
            Projection::V => &mut self.self_attn.v_proj,
            Projection::O => &mut self.self_attn.o_proj,
            Projection::Gate => &mut self.mlp.gate_proj,
            Projection::Up => &mut self.mlp.up_proj,
            Projection::Down => &mut self.mlp.down_proj,
        }
    }
}

/// Rotary position embedding frequencies, scaled as the config says, and the factor cos and
/// sin are multiplied by (YaRN's attention factor, else 1).
struct Rope {
    inv_freq: Vec<f64>,
    scale: f64,
}

impl Rope {
    fn new(cfg: &DecoderConfig) -> Self {
        let (inv_freq, scale) = cfg.rope_frequencies();
        Self { inv_freq, scale }
    }

    /// The sliding layers' tables where they differ (Gemma 3).
    fn local(cfg: &DecoderConfig) -> Option<Self> {
        cfg.local_rope_frequencies().map(|(inv_freq, scale)| Self { inv_freq, scale })
    }

    /// `cos`, `sin` of shape `[batch, seq, head_dim/2]` for per-row positions.
    fn cos_sin(&self, positions: &[Vec<usize>], dtype: DType, device: &Device) -> Result<(Tensor, Tensor), Error> {
        let (b, t, h) = (positions.len(), positions[0].len(), self.inv_freq.len());
        let mut cos = Vec::with_capacity(b * t * h);
        let mut sin = Vec::with_capacity(b * t * h);
        for &p in positions.iter().flatten() {
            for &f in &self.inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() * self.scale);
                sin.push(angle.sin() * self.scale);
            }
        }
        let to =
            |v: Vec<f64>| -> Result<Tensor, Error> { Ok(Tensor::from_vec(v, (b, t, h), device)?.to_dtype(dtype)?) };
        Ok((to(cos)?, to(sin)?))
    }
}

/// A decoder-only language model with frozen base weights.
pub struct Decoder {
    cfg: DecoderConfig,
    embed_tokens: crate::weights::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: FrozenLinear,
    rope: Rope,
    local_rope: Option<Rope>,
    dtype: DType,
    device: Device,
    /// How products run on the CPU (precision, instruction sets, tile plan).
    kernels: CpuKernels,
}

/// Additive mask value for disallowed keys; finite so an all-masked padding row gives no NaN.
const MASKED: f64 = -1e9;

impl Decoder {
    /// Builds the model from weights named as in Hugging Face checkpoints.
    pub fn new(cfg: DecoderConfig, weights: &WeightMap) -> Result<Self, Error> {
        cfg.validate()?;
        let model = weights.pp("model");
        let embed_tokens = weights.embedding("model.embed_tokens.weight")?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::new(&cfg, &model.pp("layers").pp(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::new(&model.pp("norm"), cfg.rms_norm_eps, cfg.arch.is_gemma())?;
        // A pack file stores a tied head packed under its own name (the embedding stays rows).
        let lm_head = if weights.contains("lm_head.weight")
            && (!cfg.tie_word_embeddings || weights.is_packed("lm_head.weight"))
        {
            weights.pp("lm_head").linear(false)?
        } else {
            FrozenLinear::new(weights.base_weight("model.embed_tokens.weight")?, None)?
        };
        let (e_rows, e_cols) = embed_tokens.dims()?;
        if (e_rows, e_cols) != (cfg.vocab_size, cfg.hidden_size) {
            return Err(Error::Invalid(format!(
                "embedding is [{e_rows}, {e_cols}], config says [{}, {}]",
                cfg.vocab_size, cfg.hidden_size
            )));
        }
        Ok(Self {
            rope: Rope::new(&cfg),
            local_rope: Rope::local(&cfg),
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            dtype: weights.dtype(),
            device: weights.device().clone(),
            kernels: CpuKernels::auto(),
        })
    }

    /// How this model's products run on the CPU.
    pub fn kernels(&self) -> &CpuKernels {
        &self.kernels
    }

    /// Sets how this model's products run on the CPU (before the first forward: weights
    /// already packed keep their precision).
    pub fn set_kernels(&mut self, kernels: CpuKernels) {
        self.kernels = kernels;
    }

    /// The product shapes of this model ([`DecoderConfig::product_shapes`]).
    pub fn product_shapes(&self, gradients: bool) -> Vec<(usize, usize, usize)> {
        self.cfg.product_shapes(gradients)
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Compute dtype of activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the model over `batch`, appending to `cache` when given; a batch with branches
    /// ([`TokenBatch::with_branches`]) reads `cache` but leaves it unchanged.
    ///
    /// Rotary positions continue from the real tokens already in the cache, so left or right
    /// padding, incremental decoding and a shared prefix all give each real token the position
    /// it would have in its own unpadded sequence.
    pub fn forward(
        &self,
        batch: &TokenBatch,
        cache: Option<&mut KvCache>,
        adapter: Option<&LoraAdapter>,
        mode: Mode,
        logits_at: LogitsAt,
    ) -> Result<DecoderOutput, Error> {
        self.forward_rows(batch, cache, Adapters::Same(adapter), mode, logits_at)
    }

    /// [`Decoder::forward`] with an adapter chosen per row ([`Adapters::PerRow`]): one batch
    /// serves several adapters over the shared base weights. Each row computes what it would
    /// compute alone with its adapter.
    pub fn forward_rows(
        &self,
        batch: &TokenBatch,
        cache: Option<&mut KvCache>,
        adapters: Adapters,
        mode: Mode,
        logits_at: LogitsAt,
    ) -> Result<DecoderOutput, Error> {
        let (b, t) = (batch.batch_size(), batch.seq_len());
        // Branch tokens must never reach the caller's cache (a later forward would attend to
        // them all): a branched forward only reads it (`LayerCtx::read_only_cache`).
        let read_only_cache = batch.branches().is_some();
        let mut cache = cache;
        if let Adapters::PerRow(rows) = adapters {
            if rows.len() != b {
                return Err(Error::Invalid(format!("{} per-row adapters for a batch of {b} rows", rows.len())));
            }
        }
        let (past_mask, past_lens) = match cache.as_deref() {
            Some(c) if c.batch_size() > 0 => {
                if c.batch_size() != b {
                    return Err(Error::Invalid(format!("cache has {} rows, batch has {b}", c.batch_size())));
                }
                (c.mask().to_vec(), c.real_lens())
            }
            _ => (vec![Vec::new(); b], vec![0; b]),
        };
        let positions = positions(batch.mask(), batch.branches(), batch.segments(), &past_lens);
        if let Some(max) = positions.iter().flatten().max() {
            if *max >= self.cfg.max_position_embeddings {
                return Err(Error::Invalid(format!(
                    "position {max} exceeds the model's context of {} tokens",
                    self.cfg.max_position_embeddings
                )));
            }
        }
        let (cos, sin) = self.rope.cos_sin(&positions, self.dtype, &self.device)?;
        let local_cos_sin = match &self.local_rope {
            Some(r) => Some(r.cos_sin(&positions, self.dtype, &self.device)?),
            None => None,
        };
        let window = self.cfg.sliding_window.map(|w| Window { keys: w, positions: &positions });
        let gemma = self.cfg.gemma.as_ref();
        let keys = |window| allowed_keys(&past_mask, batch.mask(), batch.branches(), batch.segments(), window);
        let fused = self.kernels.enabled() && self.device.is_cpu() && self.dtype == DType::F32 && self.cfg.head_dim > 0;
        // Soft-capped scores run on candle's ops (the fused attention kernel has no cap).
        let fused_attention = fused && gemma.is_none_or(|g| g.attn_logit_softcapping.is_none());
        let as_mask = |allowed| -> Result<AttentionMask, Error> {
            Ok(if fused_attention {
                AttentionMask::Keys(allowed)
            } else {
                AttentionMask::Additive(additive_mask(&allowed, self.dtype, &self.device)?)
            })
        };
        // Mistral slides the window on every layer; a Gemma on its sliding layers only.
        let (mask, sliding_mask) = match (gemma, window) {
            (Some(_), Some(w)) => (as_mask(keys(None))?, Some(as_mask(keys(Some(w)))?)),
            _ => (as_mask(keys(window))?, None),
        };
        let ctx = LayerCtx {
            mode,
            kernels: &self.kernels,
            fused,
            adapters,
            mask,
            sliding_mask,
            cos,
            sin,
            local_cos_sin,
            cfg: &self.cfg,
            read_only_cache,
        };

        let ids = batch.ids_tensor(&self.device)?.flatten_all()?;
        let mut x = self.embed_tokens.lookup(&ids, self.dtype, &self.device)?.reshape((b, t, self.cfg.hidden_size))?;
        if gemma.is_some() {
            // transformers multiplies by sqrt(hidden) rounded to the activations' dtype.
            let scale = Tensor::new((self.cfg.hidden_size as f32).sqrt(), &self.device)?.to_dtype(self.dtype)?;
            x = x.broadcast_mul(&scale)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, i, &ctx, cache.as_deref_mut())?;
        }
        if let Some(c) = cache.filter(|_| !read_only_cache) {
            c.append_mask(batch.mask());
        }
        let hidden = self.norm.forward(&x, mode, fused)?;
        let head = |h: &Tensor| -> Result<Tensor, Error> {
            Ok(match mode {
                Mode::Inference => self.lm_head.forward_inference(h, &self.kernels)?,
                Mode::Train { .. } => self.lm_head.forward_train(h, &self.kernels)?,
            })
        };
        let logits = match logits_at {
            LogitsAt::None => None,
            LogitsAt::All => Some(head(&hidden)?),
            LogitsAt::Last => {
                let cols: Vec<(usize, usize)> =
                    batch.last_real().iter().enumerate().map(|(r, c)| (r, c.unwrap_or(t - 1))).collect();
                Some(head(&gather_positions(&hidden, &cols)?)?)
            }
            LogitsAt::Positions(pos) => Some(head(&gather_positions(&hidden, &pos)?)?),
            LogitsAt::PositionsAt { positions, tokens } => {
                let h = gather_positions(&hidden, &positions)?;
                Some(match mode {
                    Mode::Inference => self.lm_head.forward_inference_columns(&h, &tokens, &self.kernels)?,
                    Mode::Train { .. } => {
                        let idx = Tensor::new(tokens.as_slice(), h.device())?;
                        self.lm_head.forward_train(&h, &self.kernels)?.index_select(&idx, D::Minus1)?
                    }
                })
            }
        };
        // Heads, log-probs and losses work in f32 (or f64) whatever the weights' precision.
        let widen = |t: Tensor| match t.dtype() {
            DType::BF16 | DType::F16 => t.to_dtype(DType::F32),
            _ => Ok(t),
        };
        let logits = logits.map(widen).transpose()?;
        let logits = match (logits, gemma.and_then(|g| g.final_logit_softcapping)) {
            (Some(l), Some(cap)) => Some(((l / cap)?.tanh()? * cap)?),
            (l, _) => l,
        };
        Ok(DecoderOutput { hidden: widen(hidden)?, logits })
    }

    /// A copy of the model with the adapter's deltas added into the base weights: one adapter
    /// at full base-model speed. Quantized weights are dequantized, summed and re-quantized to
    /// their original block type.
    pub fn merged(&self, adapter: &LoraAdapter) -> Result<Self, Error> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let mut layer = layer.clone_shallow();
            for &proj in &adapter.config().targets {
                let Some(delta) = adapter.delta(i, proj)? else { continue };
                let linear = layer.linear(proj);
                let merged = match linear.weight() {
                    BaseWeight::Dense(w) => BaseWeight::Dense((w + delta.to_dtype(w.dtype())?)?),
                    BaseWeight::Quantized(q) => {
                        let w = (q.dequantize(&self.device)? + delta.to_dtype(DType::F32)?)?;
                        BaseWeight::Quantized(Arc::new(QTensor::quantize(&w, q.dtype())?))
                    }
                    // Panels from a pack: unpacked, summed and packed again as they were (for
                    // bf16 and int8 the delta is rounded with the weights).
                    BaseWeight::Packed(p) => {
                        let (out, inner) = p.dims();
                        let w = (Tensor::from_vec(p.unpack(), (out, inner), &Device::Cpu)?
                            + delta.to_dtype(DType::F32)?)?;
                        let w = w.flatten_all()?.to_vec1::<f32>()?;
                        let panels = crate::cpu::Panels::of_weight(p);
                        BaseWeight::Packed(crate::cpu::PackedWeight::pack_kind(&w, out, inner, panels))
                    }
                };
                *layer.linear_mut(proj) = FrozenLinear::new(merged, linear.bias().cloned())?;
            }
            layers.push(layer);
        }
        Ok(Self {
            cfg: self.cfg.clone(),
            embed_tokens: self.embed_tokens.clone(),
            layers,
            norm: self.norm.clone_shallow(),
            lm_head: self.lm_head.clone(),
            rope: Rope::new(&self.cfg),
            local_rope: Rope::local(&self.cfg),
            dtype: self.dtype,
            device: self.device.clone(),
            kernels: self.kernels.clone(),
        })
    }

    /// Every base tensor as dense f32 with its Hugging Face name (for export).
    pub fn dense_state(&self) -> Result<Vec<(String, Tensor)>, Error> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), self.embed_tokens.to_dense()?),
            ("model.norm.weight".to_string(), self.norm.stored()?),
        ];
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.weight().to_dense(DType::F32)?));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, norm) in self.cfg.layer_norms().iter().zip(layer.norms()) {
                out.push((format!("{p}.{name}.weight"), norm.stored()?));
            }
            if let Some((q_norm, k_norm)) = &layer.self_attn.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), q_norm.stored()?));
                out.push((format!("{p}.self_attn.k_norm.weight"), k_norm.stored()?));
            }
            for proj in Projection::ALL {
                let linear = layer.linear(proj);
                out.push((format!("{p}.{}.weight", proj.module_path()), linear.weight().to_dense(DType::F32)?));
                if let Some(bias) = linear.bias() {
                    out.push((format!("{p}.{}.bias", proj.module_path()), f32(bias)?));
                }
            }
        }
        Ok(out)
    }
}

impl DecoderLayer {
    fn clone_shallow(&self) -> Self {
        let norm = |n: &RmsNorm| n.clone_shallow();
        let a = &self.self_attn;
        Self {
            input_layernorm: norm(&self.input_layernorm),
            self_attn: Attention {
                q_proj: a.q_proj.clone(),
                k_proj: a.k_proj.clone(),
                v_proj: a.v_proj.clone(),
                o_proj: a.o_proj.clone(),
                qk_norm: a.qk_norm.as_ref().map(|(q, k)| (norm(q), norm(k))),
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
                head_dim: a.head_dim,
                query_scale: a.query_scale,
                softcap: a.softcap,
            },
            post_attention_layernorm: norm(&self.post_attention_layernorm),
            feedforward_norms: self.feedforward_norms.as_ref().map(|(a, b)| (norm(a), norm(b))),
            mlp: Mlp {
                gate_proj: self.mlp.gate_proj.clone(),
                up_proj: self.mlp.up_proj.clone(),
                down_proj: self.mlp.down_proj.clone(),
                gelu: self.mlp.gelu,
            },
        }
    }
}

/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` from differentiable ops.
fn gelu_tanh(x: &Tensor) -> Result<Tensor, Error> {
    let inner = ((x.sqr()? * 0.044715)? + 1.0)?;
    let t = ((x * inner)? * (2.0 / std::f64::consts::PI).sqrt())?.tanh()?;
    Ok(((x * 0.5)? * (t + 1.0)?)?)
}

/// Rotary position of every new token: real tokens already cached plus the real tokens before
/// it that it attends to (its segment's trunk, and its own branch's when `branches` gives it
/// one). Padding entries repeat the neighbouring position (they are masked anyway).
fn positions(
    mask: &[Vec<bool>],
    branches: Option<&[Vec<u32>]>,
    segments: Option<&[Vec<u32>]>,
    past_lens: &[usize],
) -> Vec<Vec<usize>> {
    mask.iter()
        .zip(past_lens)
        .enumerate()
        .map(|(r, (row, &past))| {
            // Real tokens seen so far on each segment's trunk and on each (segment, branch).
            let mut trunk: HashMap<u32, usize> = HashMap::new();
            let mut own: HashMap<(u32, u32), usize> = HashMap::new();
            row.iter()
                .enumerate()
                .map(|(c, &real)| {
                    let b = branches.map_or(0, |br| br[r][c]);
                    let s = segments.map_or(0, |sg| sg[r][c]);
                    if real {
                        if b == 0 {
                            *trunk.entry(s).or_default() += 1;
                        } else {
                            *own.entry((s, b)).or_default() += 1;
                        }
                    }
                    let seen = trunk.get(&s).copied().unwrap_or(0)
                        + if b == 0 { 0 } else { own.get(&(s, b)).copied().unwrap_or(0) };
                    past + seen.saturating_sub(1)
                })
                .collect()
        })
        .collect()
}

/// How a forward pass's layers learn which keys each query may see.
enum AttentionMask {
    /// `[batch, 1, 1, seq, keys]`, 0 where allowed and [`MASKED`] elsewhere (candle's ops).
    Additive(Tensor),
    /// The same as booleans (the fused CPU attention).
    Keys(crate::cpu::attention::KeyMask),
}

/// A sliding attention window: a query sees only keys fewer than `keys` rotary positions
/// before it. `positions` are the new tokens' ([`positions`]); a cached token's is the number
/// of real cached tokens before it.
#[derive(Clone, Copy)]
struct Window<'a> {
    keys: usize,
    positions: &'a [Vec<usize>],
}

/// Which of `past + seq` keys each new token may see: causal over the new tokens, padding keys
/// hidden everywhere; with `branches`, a token sees only the trunk and its own branch; with
/// `segments`, only tokens of its own segment (and the cache); with `window`, only keys within
/// the window. A padding query may see itself so its row is never empty.
fn allowed_keys(
    past: &[Vec<bool>],
    new: &[Vec<bool>],
    branches: Option<&[Vec<u32>]>,
    segments: Option<&[Vec<u32>]>,
    window: Option<Window>,
) -> crate::cpu::attention::KeyMask {
    let (b, t) = (new.len(), new[0].len());
    let p = past.first().map(Vec::len).unwrap_or(0);
    let keys = p + t;
    let branch = |r: usize, c: usize| branches.map_or(0, |br| br[r][c]);
    let segment = |r: usize, c: usize| segments.map_or(0, |sg| sg[r][c]);
    let mut m = vec![false; b * t * keys];
    for r in 0..b {
        // Rotary positions of the cached keys: the real tokens before each.
        let past_pos: Vec<usize> =
            past[r].iter().scan(0, |real, &x| Some(std::mem::replace(real, *real + usize::from(x)))).collect();
        for i in 0..t {
            let row = &mut m[(r * t + i) * keys..(r * t + i + 1) * keys];
            row[..past[r].len()].copy_from_slice(&past[r]);
            for j in 0..=i {
                let same_tree_path =
                    segment(r, j) == segment(r, i) && (branch(r, j) == 0 || branch(r, j) == branch(r, i));
                if new[r][j] && same_tree_path || j == i && !new[r][i] {
                    row[p + j] = true;
                }
            }
            if let Some(w) = window {
                let q = w.positions[r][i];
                let key_pos = past_pos.iter().copied().chain(w.positions[r].iter().copied());
                for ((allowed, k), c) in row.iter_mut().zip(key_pos).zip(0..) {
                    // The query itself always stays visible (a padding query's only key).
                    if q.saturating_sub(k) >= w.keys && c != p + i {
                        *allowed = false;
                    }
                }
            }
        }
    }
    crate::cpu::attention::KeyMask { rows: b, queries: t, keys, allowed: m }
}

/// `[batch, 1, 1, seq, keys]` additive mask of `allowed`.
fn additive_mask(allowed: &crate::cpu::attention::KeyMask, dtype: DType, device: &Device) -> Result<Tensor, Error> {
    let m: Vec<f32> = allowed.allowed.iter().map(|&a| if a { 0.0 } else { MASKED as f32 }).collect();
    Ok(Tensor::from_vec(m, (allowed.rows, 1, 1, allowed.queries, allowed.keys), device)?.to_dtype(dtype)?)
}

/// The additive mask of [`allowed_keys`] (tests read it as numbers).
#[cfg(test)]
fn attention_mask(
    past: &[Vec<bool>],
    new: &[Vec<bool>],
    branches: Option<&[Vec<u32>]>,
    segments: Option<&[Vec<u32>]>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor, Error> {
    additive_mask(&allowed_keys(past, new, branches, segments, None), dtype, device)
}

/// Rows `hidden[r, c]` for each `(r, c)`, stacked to `[n, hidden]`.
fn gather_positions(hidden: &Tensor, positions: &[(usize, usize)]) -> Result<Tensor, Error> {
    let (b, t, h) = hidden.dims3()?;
    let mut idx = Vec::with_capacity(positions.len());
    for &(r, c) in positions {
        if r >= b || c >= t {
            return Err(Error::Invalid(format!("position ({r}, {c}) outside a [{b}, {t}] batch")));
        }
        idx.push((r * t + c) as u32);
    }
    let idx = Tensor::from_vec(idx, positions.len(), hidden.device())?;
    Ok(hidden.reshape((b * t, h))?.index_select(&idx, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_real_tokens() {
        let mask = vec![vec![false, false, true, true], vec![true, true, true, false]];
        assert_eq!(positions(&mask, None, None, &[0, 0]), vec![vec![0, 0, 0, 1], vec![0, 1, 2, 2]]);
        assert_eq!(positions(&mask, None, None, &[5, 2]), vec![vec![5, 5, 5, 6], vec![2, 3, 4, 4]]);
    }

    #[test]
    fn mask_is_causal_and_hides_padding() {
        let m =
            attention_mask(&[vec![true, false]], &[vec![true, true]], None, None, DType::F32, &Device::Cpu).unwrap();
        let m: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        // keys: past0 (real), past1 (pad), new0, new1
        let x = MASKED as f32;
        assert_eq!(m, vec![0.0, x, 0.0, x, 0.0, x, 0.0, 0.0]);
    }

    #[test]
    fn a_sliding_window_hides_keys_as_many_positions_back() {
        // Cache: padding, then real tokens at positions 0 and 1; two new tokens at 2 and 3.
        let past = vec![vec![false, true, true]];
        let new = vec![vec![true, true]];
        let pos = positions(&new, None, None, &[2]);
        assert_eq!(pos, vec![vec![2, 3]]);
        let window = Some(Window { keys: 2, positions: &pos });
        let m = allowed_keys(&past, &new, None, None, window);
        // keys: pad, p0, p1, n2, n3
        assert_eq!(m.allowed, vec![false, false, true, true, false, false, false, false, true, true]);
        // A window wider than the context changes nothing.
        let wide = allowed_keys(&past, &new, None, None, Some(Window { keys: 4, positions: &pos }));
        assert_eq!(wide.allowed, allowed_keys(&past, &new, None, None, None).allowed);
    }

    #[test]
    fn branches_see_the_trunk_and_themselves_and_take_positions_after_the_trunk() {
        // Trunk t0 t1, branch 1 (a0 a1), branch 2 (b0), then padding.
        let mask = vec![vec![true, true, true, true, true, false]];
        let branches = vec![vec![0, 0, 1, 1, 2, 0]];
        assert_eq!(positions(&mask, Some(&branches), None, &[3]), vec![vec![3, 4, 5, 6, 5, 4]]);
        let m = attention_mask(&[Vec::new()], &mask, Some(&branches), None, DType::F32, &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.reshape((6, 6)).unwrap().to_vec2().unwrap();
        let x = MASKED as f32;
        assert_eq!(
            m,
            vec![
                vec![0.0, x, x, x, x, x],
                vec![0.0, 0.0, x, x, x, x],
                vec![0.0, 0.0, 0.0, x, x, x],
                vec![0.0, 0.0, 0.0, 0.0, x, x],
                vec![0.0, 0.0, x, x, 0.0, x],
                vec![0.0, 0.0, x, x, x, 0.0],
            ]
        );
    }

    #[test]
    fn segments_see_only_themselves_and_restart_their_positions() {
        // One cached token, then segment 1 (x0 x1), segment 2 (trunk y0, branch 1: z0), padding.
        let mask = vec![vec![true, true, true, true, false]];
        let branches = vec![vec![0, 0, 0, 1, 0]];
        let segments = vec![vec![1, 1, 2, 2, 2]];
        assert_eq!(positions(&mask, Some(&branches), Some(&segments), &[1]), vec![vec![1, 2, 1, 2, 1]]);
        let m =
            attention_mask(&[vec![true]], &mask, Some(&branches), Some(&segments), DType::F32, &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.reshape((5, 6)).unwrap().to_vec2().unwrap();
        let x = MASKED as f32;
        assert_eq!(
            m,
            vec![
                // cache, x0, x1, y0, z0, pad
                vec![0.0, 0.0, x, x, x, x],
                vec![0.0, 0.0, 0.0, x, x, x],
                vec![0.0, x, x, 0.0, x, x],
                vec![0.0, x, x, 0.0, 0.0, x],
                // Padding (on the last segment's trunk) sees that trunk and itself.
                vec![0.0, x, x, 0.0, x, 0.0],
            ]
        );
    }
}
