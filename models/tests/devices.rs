//! Precision and device parity: the same seeded tiny model in bf16 / f16 against f32 on the
//! CPU (always run), and on a CUDA device against the CPU (built with `--features cuda`, run
//! on the GPU machine by `scripts/gpu_check.sh`). The f32 CPU path is itself checked against
//! finite differences (`gradients.rs`) and llama.cpp / PEFT (`equivalence.rs`), so agreement
//! with it carries those checks over.

use candle_core::{DType, Device, Tensor, D};
use models::random::{random_decoder, tiny_config};
use models::scoring::score_candidates;
use models::{
    Arch, Decoder, KvCache, LogitsAt, LoraAdapter, LoraConfig, Mode, Padding, Projection, TokenBatch, WeightMode,
};

const VOCAB: usize = 48;

fn model(arch: Arch, mode: WeightMode, dtype: DType, dev: &Device) -> (Decoder, LoraAdapter) {
    let cfg = tiny_config(arch, VOCAB);
    let model = random_decoder(&cfg, 21, mode, dtype, dev).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        use_rslora: false,
        dropout: 0.0,
        targets: Projection::ALL.to_vec(),
        layers: None,
    };
    // Adapters stay f32 whatever the base precision, as the trainer and server load them.
    let adapter = LoraAdapter::init_random(lora, &cfg, 4, DType::F32, dev).unwrap();
    (model, adapter)
}

fn batch() -> TokenBatch {
    TokenBatch::new(&[vec![3, 17, 5, 9, 22, 1, 30, 44], vec![8, 2, 39, 11, 6]], 0, Padding::Right).unwrap()
}

/// Log-probabilities of every position (real and padded) as plain numbers.
fn log_probs(model: &Decoder, adapter: &LoraAdapter) -> Vec<f32> {
    let out = model.forward(&batch(), None, Some(adapter), Mode::Inference, LogitsAt::All).unwrap();
    let logits = out.logits.unwrap();
    assert_eq!(logits.dtype(), DType::F32, "logits must come back in f32");
    assert_eq!(out.hidden.dtype(), DType::F32, "hidden states must come back in f32");
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    lp.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Gradients of a next-token loss with respect to every LoRA factor, in adapter order.
fn lora_grads(model: &Decoder, adapter: &LoraAdapter) -> Vec<Vec<f32>> {
    let b = batch();
    let out = model.forward(&b, None, Some(adapter), Mode::Train { dropout_seed: None }, LogitsAt::All).unwrap();
    let logp = candle_nn::ops::log_softmax(&out.logits.unwrap(), D::Minus1).unwrap();
    let mut terms = Vec::new();
    for (r, (ids, mask)) in b.ids().iter().zip(b.mask()).enumerate() {
        for t in 0..ids.len() - 1 {
            if mask[t] && mask[t + 1] {
                terms.push(logp.get(r).unwrap().get(t).unwrap().get(ids[t + 1] as usize).unwrap());
            }
        }
    }
    let loss = (Tensor::stack(&terms, 0).unwrap().mean_all().unwrap() * -1.0).unwrap();
    let grads = loss.backward().unwrap();
    adapter
        .vars()
        .iter()
        .map(|(name, v)| {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
            g.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        })
        .collect()
}

/// `max |a - b| / max |b|`: the error relative to the reference's scale.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    diff / scale.max(1e-12)
}

/// Every gradient of `got` within `tol` of the reference's, relative to each factor's scale.
fn assert_grads_close(got: &[Vec<f32>], want: &[Vec<f32>], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(w.iter().any(|x| x.abs() > 1e-8), "{what}: reference gradient {i} is zero");
        let e = rel_err(g, w);
        assert!(e <= tol, "{what}: gradient {i} off by {e:.2e} (tolerance {tol:.0e})");
    }
}

/// Constrained scores of two prompts after a shared prefix, through the adapter.
fn scores(model: &Decoder, adapter: &LoraAdapter) -> Vec<f64> {
    let mut prefix = KvCache::new(model.config().num_layers);
    model
        .forward(
            &TokenBatch::single(&[5, 6, 7, 8]).unwrap(),
            Some(&mut prefix),
            Some(adapter),
            Mode::Inference,
            LogitsAt::None,
        )
        .unwrap();
    let prompts = vec![vec![12, 13, 14], vec![20, 21]];
    let candidates = vec![vec![30, 31, 2], vec![40, 2]];
    score_candidates(model, Some(adapter), Some(&prefix), &prompts, &candidates, 0).unwrap().concat()
}

// Tolerances relative to the f32 reference's scale, about 2-3x the largest error measured on
// these models (CPU, 2026-11-21): bf16 (8-bit mantissa) log-probs 7.0e-3, LoRA gradients
// 3.0e-2; f16 (11-bit) log-probs 9.0e-4.
const BF16_TOL: f64 = 2e-2;
const BF16_GRAD_TOL: f64 = 6e-2;
const F16_TOL: f64 = 3e-3;

#[test]
fn bf16_and_f16_inference_track_f32() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let cpu = Device::Cpu;
        let (m32, a32) = model(arch, WeightMode::Dense, DType::F32, &cpu);
        let want = log_probs(&m32, &a32);
        for (dtype, tol) in [(DType::BF16, BF16_TOL), (DType::F16, F16_TOL)] {
            let (m, a) = model(arch, WeightMode::Dense, dtype, &cpu);
            let e = rel_err(&log_probs(&m, &a), &want);
            assert!(e <= tol, "{arch:?} {dtype:?}: log-probs off by {e:.2e}");
            // And not trivially: the half model is a different computation.
            assert!(e > 0.0, "{arch:?} {dtype:?}: identical to f32, the dtype was not applied");
        }
    }
}

#[test]
fn bf16_training_gradients_track_f32() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let cpu = Device::Cpu;
        let (m32, a32) = model(arch, WeightMode::Dense, DType::F32, &cpu);
        let want = lora_grads(&m32, &a32);
        let (m, a) = model(arch, WeightMode::Dense, DType::BF16, &cpu);
        let got = lora_grads(&m, &a);
        assert_grads_close(&got, &want, BF16_GRAD_TOL, &format!("{arch:?} bf16"));
        for (_, v) in a.vars() {
            assert_eq!(v.dtype(), DType::F32, "LoRA factors must stay f32 under bf16 weights");
        }
    }
}

#[test]
fn bf16_constrained_scores_track_f32() {
    let cpu = Device::Cpu;
    let (m32, a32) = model(Arch::Qwen2, WeightMode::Dense, DType::F32, &cpu);
    let (m, a) = model(Arch::Qwen2, WeightMode::Dense, DType::BF16, &cpu);
    let (want, got) = (scores(&m32, &a32), scores(&m, &a));
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= BF16_TOL * w.abs().max(1.0), "score {g} vs f32 {w}");
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Run on the GPU machine: `scripts/gpu_check.sh` (docs/gpu.md).
    use super::*;

    fn gpu() -> Device {
        Device::new_cuda(0).expect("these tests need a CUDA device")
    }

    #[test]
    fn cuda_f32_inference_matches_cpu() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let (mc, ac) = model(arch, WeightMode::Dense, DType::F32, &Device::Cpu);
            let (mg, ag) = model(arch, WeightMode::Dense, DType::F32, &gpu());
            let e = rel_err(&log_probs(&mg, &ag), &log_probs(&mc, &ac));
            assert!(e <= 1e-4, "{arch:?}: cuda f32 log-probs off by {e:.2e}");
        }
    }

    #[test]
    fn cuda_f32_gradients_match_cpu() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let (mc, ac) = model(arch, WeightMode::Dense, DType::F32, &Device::Cpu);
            let (mg, ag) = model(arch, WeightMode::Dense, DType::F32, &gpu());
            assert_grads_close(&lora_grads(&mg, &ag), &lora_grads(&mc, &ac), 1e-4, &format!("{arch:?} cuda f32"));
        }
    }

    #[test]
    fn cuda_bf16_tracks_cpu_f32() {
        let (mc, ac) = model(Arch::Qwen2, WeightMode::Dense, DType::F32, &Device::Cpu);
        let (mg, ag) = model(Arch::Qwen2, WeightMode::Dense, DType::BF16, &gpu());
        let e = rel_err(&log_probs(&mg, &ag), &log_probs(&mc, &ac));
        assert!(e <= BF16_TOL, "cuda bf16 log-probs off by {e:.2e}");
        assert_grads_close(&lora_grads(&mg, &ag), &lora_grads(&mc, &ac), BF16_GRAD_TOL, "cuda bf16");
    }

    #[test]
    fn cuda_quantized_matches_cpu_quantized() {
        let (mc, ac) = model(Arch::Llama, WeightMode::Quantized, DType::F32, &Device::Cpu);
        let (mg, ag) = model(Arch::Llama, WeightMode::Quantized, DType::F32, &gpu());
        // Both run Q8_0 blocks, through different kernels (the CPU quantizes activations too).
        let e = rel_err(&log_probs(&mg, &ag), &log_probs(&mc, &ac));
        assert!(e <= 2e-2, "cuda Q8_0 log-probs off by {e:.2e}");
    }

    #[test]
    fn cuda_constrained_scores_match_cpu() {
        let (mc, ac) = model(Arch::Qwen2, WeightMode::Dense, DType::F32, &Device::Cpu);
        let (mg, ag) = model(Arch::Qwen2, WeightMode::Dense, DType::F32, &gpu());
        for (g, w) in scores(&mg, &ag).iter().zip(scores(&mc, &ac)) {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "cuda score {g} vs cpu {w}");
        }
    }
}
