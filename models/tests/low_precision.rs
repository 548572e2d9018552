//! `--cpu-matmul bf16` and `int8` on a whole model: every low-precision kernel family this CPU
//! runs (AMX, AVX-512, AVX-VNNI: selected by limiting the instruction sets) against the f32
//! path on a seeded random decoder with an adapter.

use candle_core::{DType, Device, Tensor};
use models::cpu::{Caps, CpuKernels, Precision};
use models::random::{random_decoder, tiny_config};
use models::{Arch, LogitsAt, LoraAdapter, LoraConfig, Mode, Padding, Projection, TokenBatch, WeightMode};

/// The instruction-set limits that select each family of `precision` on this CPU.
fn families(precision: Precision) -> Vec<(String, Caps)> {
    let all = Caps::detect();
    let mut out = Vec::new();
    let mut push = |name: &str, caps: Caps| {
        if precision.check(&caps).is_ok() && !out.iter().any(|(_, c)| *c == caps) {
            out.push((name.to_string(), caps));
        }
    };
    push("all", all);
    push("no amx", Caps { amx: false, ..all });
    push("avx-vnni only", Caps { amx: false, avx512_vnni: false, ..all });
    out
}

#[test]
fn low_precision_products_track_the_f32_model() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let cfg = tiny_config(arch, 50);
        let dev = Device::Cpu;
        let batch = TokenBatch::new(&[vec![1, 5, 9, 14, 2, 33, 7, 8], vec![4, 4, 19]], 0, Padding::Right).unwrap();
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            use_rslora: true,
            dropout: 0.0,
            targets: Projection::ALL.to_vec(),
            layers: None,
        };
        let logits = |kernels: CpuKernels| -> Tensor {
            // A fresh model: weights are packed on first use in the model's precision.
            let mut model = random_decoder(&cfg, 42, WeightMode::Dense, DType::F32, &dev).unwrap();
            model.set_kernels(kernels);
            let adapter = LoraAdapter::init_random(lora.clone(), &cfg, 9, DType::F32, &dev).unwrap();
            model.forward(&batch, None, Some(&adapter), Mode::Inference, LogitsAt::All).unwrap().logits.unwrap()
        };
        let f32_logits = logits(CpuKernels::auto());
        let scale = f32_logits.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        for precision in [Precision::Bf16, Precision::Int8] {
            let fams = families(precision);
            if fams.is_empty() {
                eprintln!("{precision}: refused on this CPU ({})", Caps::detect().describe());
                assert!(CpuKernels::new(precision).is_err());
            }
            for (name, caps) in fams {
                let got = logits(CpuKernels::with_caps(precision, caps).unwrap());
                let max = (&got - &f32_logits).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                // bf16 keeps 8 bits of mantissa, int8 about 7 per value: errors of a few per cent of
                // the logits' scale, and not zero (the low-precision path really ran).
                assert!(max > 0.0, "{arch:?} {precision} ({name}): equal to f32 bit for bit: the kernel did not run");
                assert!(
                    max < 0.05 * scale.max(1.0),
                    "{arch:?} {precision} ({name}): logits differ by {max} (scale {scale})"
                );
            }
        }
    }
}
