//! Tiny seeded random models: fast, deterministic stand-ins for tests and for speed
//! measurements at a real model's shape (throughput does not depend on weight values).

use crate::config::{Arch, DecoderConfig, GemmaSettings};
use crate::decoder::Decoder;
use crate::linear::BaseWeight;
use crate::lora::Projection;
use crate::weights::{WeightMap, WeightMode};
use crate::Error;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

/// A small config of any family, for tests: 2 layers, hidden 64, 4 query / 2 KV heads. Qwen3's
/// and Gemma 3's heads are 32 wide (not hidden / heads); Mistral slides a 3-key window, so
/// short test sequences already exercise it; the Gemmas slide it on their first layer only,
/// scale scores by `query_pre_attn_scalar` 8, Gemma 2 soft-caps scores at 2 and logits at 3
/// (low enough to bend tiny models' values), Gemma 3 has its own rotary base on the sliding
/// layer.
pub fn tiny_config(arch: Arch, vocab_size: usize) -> DecoderConfig {
    let gemma = arch.is_gemma().then(|| GemmaSettings {
        sliding_layers: vec![true, false],
        local_rope_theta: if arch == Arch::Gemma3 { 100.0 } else { 10_000.0 },
        local_rope_scaling: Default::default(),
        query_pre_attn_scalar: 8.0,
        attn_logit_softcapping: (arch == Arch::Gemma2).then_some(2.0),
        final_logit_softcapping: (arch == Arch::Gemma2).then_some(3.0),
    });
    DecoderConfig {
        arch,
        vocab_size,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: if matches!(arch, Arch::Qwen3 | Arch::Gemma3) { 32 } else { 16 },
        rope_theta: 10_000.0,
        rope_scaling: Default::default(),
        rms_norm_eps: 1e-6,
        max_position_embeddings: 512,
        tie_word_embeddings: matches!(arch, Arch::Llama | Arch::Gemma3),
        attention_bias: arch == Arch::Qwen2,
        sliding_window: matches!(arch, Arch::Mistral | Arch::Gemma2 | Arch::Gemma3).then_some(3),
        gemma,
    }
}

/// A model of `cfg`'s shape with weights uniform in `±1/sqrt(fan_in)` (so activations stay
/// O(1)) and norm weights near one (per-head q/k norms within 0.5 of one), drawn from `seed`. In quantized mode the projections are
/// quantized to Q8_0 (their input size must be a multiple of 32).
pub fn random_decoder(
    cfg: &DecoderConfig,
    seed: u64,
    mode: WeightMode,
    dtype: DType,
    device: &Device,
) -> Result<Decoder, Error> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    let dense = |rng: &mut ChaCha8Rng, shape: (usize, usize), bound: f64, center: f64| -> Result<Tensor, Error> {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| (center + rng.random_range(-bound..bound)) as f32).collect();
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
    };
    let linear = |t: Tensor| -> Result<BaseWeight, Error> {
        Ok(match mode {
            WeightMode::Quantized => {
                BaseWeight::Quantized(Arc::new(QTensor::quantize(&t.to_dtype(DType::F32)?, GgmlDType::Q8_0)?))
            }
            WeightMode::Dense => BaseWeight::Dense(t),
        })
    };
    let h = cfg.hidden_size;
    tensors
        .insert("model.embed_tokens.weight".into(), BaseWeight::Dense(dense(&mut rng, (cfg.vocab_size, h), 1.0, 0.0)?));
    // Gemma's norms scale by 1 + w: stored near zero.
    let norm_center = if cfg.gemma.is_some() { 0.0 } else { 1.0 };
    tensors
        .insert("model.norm.weight".into(), BaseWeight::Dense(dense(&mut rng, (1, h), 0.1, norm_center)?.squeeze(0)?));
    if !cfg.tie_word_embeddings {
        tensors.insert(
            "lm_head.weight".into(),
            linear(dense(&mut rng, (cfg.vocab_size, h), 1.0 / (h as f64).sqrt(), 0.0)?)?,
        );
    }
    for layer in 0..cfg.num_layers {
        let p = format!("model.layers.{layer}");
        for norm in cfg.layer_norms() {
            tensors.insert(
                format!("{p}.{norm}.weight"),
                BaseWeight::Dense(dense(&mut rng, (1, h), 0.1, norm_center)?.squeeze(0)?),
            );
        }
        if cfg.qk_norm() {
            for norm in ["q_norm", "k_norm"] {
                let w = dense(&mut rng, (1, cfg.head_dim), 0.5, norm_center)?.squeeze(0)?;
                tensors.insert(format!("{p}.self_attn.{norm}.weight"), BaseWeight::Dense(w));
            }
        }
        for proj in Projection::ALL {
            let (out, inp) = proj.dims(cfg);
            let w = dense(&mut rng, (out, inp), 1.0 / (inp as f64).sqrt(), 0.0)?;
            tensors.insert(format!("{p}.{}.weight", proj.module_path()), linear(w)?);
            if cfg.attention_bias && matches!(proj, Projection::Q | Projection::K | Projection::V) {
                let b = dense(&mut rng, (1, out), 0.1, 0.0)?.squeeze(0)?;
                tensors.insert(format!("{p}.{}.bias", proj.module_path()), BaseWeight::Dense(b));
            }
        }
    }
    Decoder::new(cfg.clone(), &WeightMap::new(tensors, mode, dtype, device.clone()))
}
