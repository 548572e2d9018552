//! The real all-MiniLM-L6-v2 through candle-transformers' BERT against PyTorch + transformers
//! (`tests/fixtures/minilm.transformers.json`, made by
//! `scripts/fixtures/make_minilm_fixture.py`): the same WordPiece and segment ids, and the same
//! sentence embeddings one at a time and in a padded batch.
//!
//! Needs MiniLM in the cache: `verdict-train fetch minilm` (scripts/test.sh does it).

use candle_core::{Device, IndexOp};
use models::{EncodedInput, Encoder, EncoderSource};
use serde_json::Value;
use std::path::PathBuf;

/// f32 on both sides, other kernels and summation orders: measured worst 1.6e-7 on unit-norm
/// embeddings (components of about 0.05).
const TOL: f32 = 1e-5;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn minilm_matches_transformers() {
    let m = shared::assets::find_model("minilm").unwrap();
    let cache = shared::assets::cache_dir();
    assert!(m.is_cached(&cache), "MiniLM is missing: run `verdict-train fetch minilm` first");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/minilm.transformers.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(fixture["model_sha256"], m.sha256);
    let encoder = Encoder::load(&EncoderSource::Dir(m.model_path_in(&cache)), &Device::Cpu).unwrap();
    let mut singles: Vec<EncodedInput> = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let texts: Vec<&str> = case["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        let input = encoder.encode_input(&texts).unwrap();
        assert_eq!(input.ids, ids(&case["ids"]), "{texts:?}");
        assert_eq!(input.type_ids, ids(&case["type_ids"]), "{texts:?}");
        let got = encoder.embed(&[&input]).unwrap().i(0).unwrap().to_vec1::<f32>().unwrap();
        let d = max_diff(&got, &floats(&case["embedding"]));
        eprintln!("{texts:?}: max |diff| {d:e}");
        assert!(d < TOL, "{texts:?}: max |diff| {d}");
        if texts.len() == 1 {
            singles.push(input);
        }
    }
    let refs: Vec<&EncodedInput> = singles.iter().collect();
    let batch = encoder.embed(&refs).unwrap();
    for (k, want) in fixture["batch_of_singles"].as_array().unwrap().iter().enumerate() {
        let d = max_diff(&batch.i(k).unwrap().to_vec1::<f32>().unwrap(), &floats(want));
        eprintln!("batch row {k}: max |diff| {d:e}");
        assert!(d < TOL, "batch row {k}: max |diff| {d}");
    }
}
