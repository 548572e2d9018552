//! LoRA gradients against central finite differences on tiny f64 models of every family, and
//! proof that the training path computes no gradient for frozen base weights.

use candle_core::{DType, Device, Tensor, D};
use models::random::{random_decoder, tiny_config};
use models::{Arch, Decoder, LogitsAt, LoraAdapter, LoraConfig, Mode, Padding, Projection, TokenBatch, WeightMode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 40;

fn batch() -> TokenBatch {
    // Two rows, right padding, B*T = 14 so no activation shape equals a weight shape.
    TokenBatch::new(&[vec![3, 17, 5, 9, 22, 1, 30], vec![8, 2, 39, 11]], 0, Padding::Right).unwrap()
}

/// Mean next-token cross-entropy over real positions.
fn loss(model: &Decoder, adapter: &LoraAdapter, batch: &TokenBatch) -> Tensor {
    let out = model.forward(batch, None, Some(adapter), Mode::Train { dropout_seed: Some(7) }, LogitsAt::All).unwrap();
    let logp = candle_nn::ops::log_softmax(&out.logits.unwrap(), D::Minus1).unwrap();
    let mut terms = Vec::new();
    for (r, (ids, mask)) in batch.ids().iter().zip(batch.mask()).enumerate() {
        for t in 0..ids.len() - 1 {
            if mask[t] && mask[t + 1] {
                terms.push(logp.get(r).unwrap().get(t).unwrap().get(ids[t + 1] as usize).unwrap());
            }
        }
    }
    (Tensor::stack(&terms, 0).unwrap().mean_all().unwrap() * -1.0).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

fn check_gradients(arch: Arch) {
    let dev = Device::Cpu;
    let cfg = tiny_config(arch, VOCAB);
    let model = random_decoder(&cfg, 11, WeightMode::Dense, DType::F64, &dev).unwrap();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        use_rslora: true,
        dropout: 0.1,
        targets: Projection::ALL.to_vec(),
        layers: None,
    };
    let adapter = LoraAdapter::init_random(lora, &cfg, 5, DType::F64, &dev).unwrap();
    let batch = batch();
    let grads = loss(&model, &adapter, &batch).backward().unwrap();

    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let eps = 1e-5;
    assert_eq!(adapter.vars().len(), cfg.num_layers * 7 * 2);
    for (name, var) in adapter.vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient (an op dropped it)"));
        let g_flat: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(g_flat.iter().any(|x| x.abs() > 1e-8), "{name}: gradient is all zero");
        let original = var.as_tensor().copy().unwrap();
        let n = original.elem_count();
        let base: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
        let eval = |v: Vec<f64>| -> f64 {
            var.set(&Tensor::from_vec(v, original.shape(), &dev).unwrap()).unwrap();
            scalar(&loss(&model, &adapter, &batch))
        };
        // A random direction covers every entry at once: dL/de (theta + e v) = <g, v>.
        let dir: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let shifted = |s: f64| base.iter().zip(&dir).map(|(b, d)| b + s * d).collect::<Vec<_>>();
        let fd = (eval(shifted(eps)) - eval(shifted(-eps))) / (2.0 * eps);
        let analytic: f64 = g_flat.iter().zip(&dir).map(|(g, d)| g * d).sum();
        assert!(
            (fd - analytic).abs() <= 1e-6 * (1.0 + analytic.abs()),
            "{name}: directional fd {fd} vs analytic {analytic}"
        );
        // And a few single entries.
        for _ in 0..3 {
            let i = rng.random_range(0..n);
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let fd = (eval(plus) - eval(minus)) / (2.0 * eps);
            assert!(
                (fd - g_flat[i]).abs() <= 1e-6 * (1.0 + g_flat[i].abs()),
                "{name}[{i}]: fd {fd} vs analytic {}",
                g_flat[i]
            );
        }
        var.set(&original).unwrap();
    }
}

#[test]
fn lora_gradients_match_finite_differences_llama() {
    check_gradients(Arch::Llama);
}

#[test]
fn lora_gradients_match_finite_differences_qwen2() {
    check_gradients(Arch::Qwen2);
}

/// Mistral's tiny config slides a 3-key window over the 7-token rows.
#[test]
fn lora_gradients_match_finite_differences_mistral() {
    check_gradients(Arch::Mistral);
}

/// Through Qwen3's per-head q/k norms (32-wide heads, not hidden / heads).
#[test]
fn lora_gradients_match_finite_differences_qwen3() {
    check_gradients(Arch::Qwen3);
}

/// Through Gemma 2's soft-capped scores and logits, GeGLU, the norms after attention and MLP
/// (scaling by 1 + w) and a sliding first layer.
#[test]
fn lora_gradients_match_finite_differences_gemma2() {
    check_gradients(Arch::Gemma2);
}

/// Through Gemma 3's q/k norms and the sliding layer's own rotary base.
#[test]
fn lora_gradients_match_finite_differences_gemma3() {
    check_gradients(Arch::Gemma3);
}

/// Fails if any frozen base weight (or its transpose) gets a gradient tensor computed.
#[test]
fn frozen_weights_get_no_gradient() {
    let dev = Device::Cpu;
    for arch in Arch::ALL {
        let cfg = tiny_config(arch, VOCAB);
        let model = random_decoder(&cfg, 1, WeightMode::Dense, DType::F64, &dev).unwrap();
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            use_rslora: false,
            dropout: 0.0,
            targets: vec![Projection::Q, Projection::V],
            layers: None,
        };
        let adapter = LoraAdapter::init_random(lora, &cfg, 2, DType::F64, &dev).unwrap();
        let grads = loss(&model, &adapter, &batch()).backward().unwrap();
        let mut weight_shapes: Vec<Vec<usize>> = Vec::new();
        for (name, t) in model.dense_state().unwrap() {
            if t.rank() == 2 {
                let d = t.dims().to_vec();
                weight_shapes.push(vec![d[1], d[0]]);
                weight_shapes.push(d);
            } else {
                assert!(!grads.get_ids().any(|id| *id == t.id()), "{name} got a gradient");
            }
        }
        let lora_ids: Vec<_> = adapter.vars().iter().map(|(_, v)| v.as_tensor().id()).collect();
        for id in grads.get_ids() {
            let g = grads.get_id(*id).unwrap();
            if lora_ids.contains(id) {
                continue;
            }
            assert!(
                !weight_shapes.contains(&g.dims().to_vec()),
                "{arch:?}: a gradient of base-weight shape {:?} was computed",
                g.dims()
            );
        }
    }
}

/// The f32 training path on our packed kernels (forward `x Wᵀ` on `W`'s panels, input gradient
/// `g W` on `Wᵀ`'s) gives the loss and LoRA gradients of candle's matmuls, which the f64
/// finite-difference checks above validate.
#[test]
fn packed_training_products_give_candles_loss_and_gradients() {
    let kernels = models::cpu::CpuKernels::auto();
    if !kernels.enabled() {
        eprintln!("skipped: our kernels do not run on this CPU");
        return;
    }
    let dev = Device::Cpu;
    for arch in Arch::ALL {
        let cfg = tiny_config(arch, VOCAB);
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            use_rslora: false,
            dropout: 0.0,
            targets: Projection::ALL.to_vec(),
            layers: None,
        };
        let run = |k: models::cpu::CpuKernels| -> (f32, Vec<Vec<f32>>) {
            let mut model = random_decoder(&cfg, 11, WeightMode::Dense, DType::F32, &dev).unwrap();
            model.set_kernels(k);
            let adapter = LoraAdapter::init_random(lora.clone(), &cfg, 5, DType::F32, &dev).unwrap();
            let l = loss(&model, &adapter, &batch());
            let grads = l.backward().unwrap();
            let g = adapter
                .vars()
                .iter()
                .map(|(_, v)| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            (l.to_scalar::<f32>().unwrap(), g)
        };
        let (l_ours, g_ours) = run(kernels.clone());
        let (l_candle, g_candle) = run(models::cpu::CpuKernels::portable());
        assert!((l_ours - l_candle).abs() < 1e-5 * (1.0 + l_candle.abs()), "{arch:?}: loss {l_ours} vs {l_candle}");
        let mut worst = 0f32;
        for (a, b) in g_ours.iter().zip(&g_candle) {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs() / scale);
            }
        }
        assert!(worst < 1e-4, "{arch:?}: LoRA gradients differ by {worst} of their scale");
    }
}
