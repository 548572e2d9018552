//! `--cpu-matmul bf16` on a whole model: the packed bf16 kernel (`models::packed`) against the
//! f32 path on a seeded random decoder. Its own test binary, because the format is a process-wide
//! setting.

use candle_core::{DType, Device, Tensor};
use models::packed::{self, Format};
use models::random::{random_decoder, tiny_config};
use models::{Arch, LogitsAt, LoraAdapter, LoraConfig, Mode, Padding, Projection, TokenBatch, WeightMode};

#[test]
fn bf16_matmuls_track_the_f32_model() {
    if !packed::bf16_supported() {
        eprintln!("no AVX512-BF16 on this CPU: --cpu-matmul bf16 is refused here");
        assert!(packed::set_format(Format::Bf16).is_err());
        return;
    }
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
        let logits = |format: Format| -> Tensor {
            packed::set_format(format).unwrap();
            // A fresh model: weights are packed on first use in the format set then.
            let model = random_decoder(&cfg, 42, WeightMode::Dense, DType::F32, &dev).unwrap();
            let adapter = LoraAdapter::init_random(lora.clone(), &cfg, 9, DType::F32, &dev).unwrap();
            model.forward(&batch, None, Some(&adapter), Mode::Inference, LogitsAt::All).unwrap().logits.unwrap()
        };
        let f32_logits = logits(Format::F32);
        let bf16_logits = logits(Format::Bf16);
        packed::set_format(Format::F32).unwrap();
        let diff = (&bf16_logits - &f32_logits).unwrap().abs().unwrap();
        let max = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = f32_logits.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // bf16 keeps 8 bits of mantissa: expect errors of a few 2⁻⁹ of the logits' scale, and
        // not zero (the bf16 path really ran).
        assert!(max > 0.0, "{arch:?}: bf16 logits equal the f32 ones bit for bit: the bf16 kernel did not run");
        assert!(max < 0.05 * scale.max(1.0), "{arch:?}: bf16 logits differ by {max} (scale {scale})");
    }
}
