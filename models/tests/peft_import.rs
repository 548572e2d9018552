//! PEFT adapters with per-module ranks and alphas and a regex target
//! (tests/fixtures/peft_import, made by PEFT 0.21.2) survive Verdict's own writer: saved and
//! read back, every pair keeps its factors, rank, alpha and scaling, and the logits do not move.

use candle_core::{DType, Device};
use models::{LoadedModel, LogitsAt, LoraAdapter, Mode, Padding, Projection, TokenBatch, WeightMode};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft_import")
}

fn logits(m: &LoadedModel, adapter: &LoraAdapter, ids: &[u32]) -> Vec<f32> {
    let batch = TokenBatch::new(&[ids.to_vec()], 0, Padding::Right).unwrap();
    let out = m.model.forward(&batch, None, Some(adapter), Mode::Inference, LogitsAt::All).unwrap();
    out.logits.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn peft_adapters_round_trip_through_verdicts_writer() {
    let base = fixtures().join("base");
    let m = models::load_model(&base, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let cfg = m.model.config();
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 % cfg.vocab_size) as u32).collect();
    for name in ["adapter_regex", "adapter_layers"] {
        let a = LoraAdapter::load_peft_dir(&fixtures().join(name), cfg, DType::F32, &Device::Cpu).unwrap();
        let dir = std::env::temp_dir().join(format!("verdict-peft-rt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        a.save_peft_dir(&dir, "verdict-fixtures/tiny-llama-mr").unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        let back = LoraAdapter::load_peft_dir(&dir, cfg, DType::F32, &Device::Cpu).unwrap();
        let mut n = 0;
        for layer in 0..cfg.num_layers {
            for proj in Projection::ALL {
                match (a.pair(layer, proj), back.pair(layer, proj)) {
                    (None, None) => {}
                    (Some(x), Some(y)) => {
                        n += 1;
                        assert_eq!((x.rank(), x.alpha(), x.scaling()), (y.rank(), y.alpha(), y.scaling()), "{name}");
                        let v = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        assert_eq!(v(&x.a), v(&y.a));
                        assert_eq!(v(&x.b), v(&y.b));
                    }
                    _ => panic!("{name}: layer {layer} {proj:?} adapted on one side only"),
                }
            }
        }
        assert_eq!(logits(&m, &a, &ids), logits(&m, &back, &ids), "{name}");
        match name {
            "adapter_regex" => {
                // Three modules, one with rank 2 (v_proj), one with alpha 16 (down_proj), rsLoRA.
                assert_eq!(n, 3);
                let v = a.pair(1, Projection::V).unwrap();
                assert_eq!((v.rank(), v.scaling()), (2, 8.0 / 2f64.sqrt()));
                let d = a.pair(0, Projection::Down).unwrap();
                assert_eq!((d.rank(), d.scaling()), (4, 16.0 / 2.0));
                assert!(written["target_modules"].is_string(), "{written}");
                assert_eq!(written["rank_pattern"], serde_json::json!({r"model\.layers\.1\.self_attn\.v_proj": 2}));
                assert_eq!(written["alpha_pattern"], serde_json::json!({r"model\.layers\.0\.mlp\.down_proj": 16.0}));
            }
            _ => {
                // Layer 1 only, o_proj with alpha 2 (no rsLoRA: scaling alpha / r).
                assert_eq!(n, 4);
                assert_eq!(a.pair(1, Projection::O).unwrap().scaling(), 0.5);
                assert_eq!(a.pair(1, Projection::Q).unwrap().scaling(), 2.0);
                assert_eq!(written["layers_to_transform"], serde_json::json!([1]));
                assert!(written["target_modules"].is_array() && written.get("rank_pattern").is_none(), "{written}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
