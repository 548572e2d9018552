//! GGUF files with SentencePiece vocabularies, as llama.cpp's converter writes them: a Llama (as
//! Llama 2 and Mistral GGUFs are), a Gemma 2 and a Gemma 3, each against transformers' own
//! reading of the same file (`tests/fixtures/spm/tiny-*.{gguf,json}`, made by
//! `scripts/fixtures/make_spm_gguf_fixture.py`): the same token ids for text, and the same
//! logits (Gemma: norm shift, GeGLU, sliding and full layers, soft-capping, q/k norms).

use candle_core::{DType, Device};
use models::{load_model, Arch, LogitsAt, Mode, TokenBatch, WeightMode};
use serde_json::Value;
use shared::chat::ChatMessage;
use std::path::PathBuf;

/// float32 on both sides, the same weights: what is left is summation order.
const LOGIT_TOL: f32 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/spm")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn a_sentencepiece_llama_gguf_tokenizes_and_computes_as_transformers_reads_it() {
    let model = check("tiny-llama-spm", Arch::Llama);
    assert!(model.chat.is_none());
}

#[test]
fn a_gemma2_gguf_computes_as_transformers_reads_it() {
    let model = check("tiny-gemma2", Arch::Gemma2);
    let g = model.model.config().gemma.clone().unwrap();
    assert_eq!((g.attn_logit_softcapping, g.final_logit_softcapping), (Some(20.0), Some(10.0)));
    assert_eq!(g.sliding_layers, [true, false]);
    assert_gemma_chat(&model);
}

#[test]
fn a_gemma3_gguf_computes_as_transformers_reads_it() {
    let model = check("tiny-gemma3", Arch::Gemma3);
    let g = model.model.config().gemma.clone().unwrap();
    assert_eq!(g.sliding_layers, [true, true, true, true, true, false]);
    assert_eq!((model.model.config().rope_theta, g.local_rope_theta), (1e6, 1e4));
    assert_gemma_chat(&model);
}

/// The file's own chat template (Gemma's turn markers) renders with the file's BOS.
fn assert_gemma_chat(model: &models::LoadedModel) {
    let chat = model.chat.as_ref().expect("the GGUF's tokenizer.chat_template");
    let text = chat.render(&[ChatMessage::new("user", "Is it good?")], true).unwrap();
    assert_eq!(text, "<s><start_of_turn>user\nIs it good?<end_of_turn>\n<start_of_turn>model\n");
}

/// Loads `tests/fixtures/spm/{stem}.gguf` and checks its tokens and logits against
/// `{stem}.json`.
fn check(stem: &str, arch: Arch) -> models::LoadedModel {
    let dir = fixture_dir();
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap()).unwrap();
    let model = load_model(&dir.join(format!("{stem}.gguf")), WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.model.config().arch, arch);
    // A BOS before prompts, as the file asks.
    assert!(model.special.add_bos);
    assert_eq!(model.special.bos, Some(1));

    let cases = fixture["tokens"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let got = model.encode(text, false).unwrap();
        assert_eq!(got, ids(&case["ids"]), "tokenizing {text:?}");
        assert_eq!(model.decode(&got).unwrap(), text, "decoding {text:?}");
    }

    for seq in fixture["sequences"].as_array().unwrap() {
        let input = ids(&seq["ids"]);
        let logits = model
            .model
            .forward(&TokenBatch::single(&input).unwrap(), None, None, Mode::Inference, LogitsAt::All)
            .unwrap()
            .logits
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(logits.len(), input.len());
        let want_last = floats(&seq["last_logits"]);
        assert_eq!(logits[input.len() - 1].len(), want_last.len());
        let worst = logits[input.len() - 1].iter().zip(&want_last).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < LOGIT_TOL, "last-position logits differ by {worst}");
        let at = ids(&seq["logits_at"]["ids"]);
        for (pos, row) in seq["logits_at"]["values"].as_array().unwrap().iter().enumerate() {
            for (&id, want) in at.iter().zip(floats(row)) {
                let got = logits[pos][id as usize];
                assert!((got - want).abs() < LOGIT_TOL, "position {pos}, id {id}: {got} against {want}");
            }
        }
    }
    model
}

/// `--weights quantized` keeps the file's blocks (float16 here) and computes what the dense
/// load does, norm shift included.
#[test]
fn a_gemma_gguf_in_quantized_mode_computes_as_the_dense_load() {
    let path = fixture_dir().join("tiny-gemma3.gguf");
    let ids: Vec<u32> = (300..324).collect();
    let logits = |mode| {
        let model = load_model(&path, mode, DType::F32, &Device::Cpu).unwrap();
        model
            .model
            .forward(&TokenBatch::single(&ids).unwrap(), None, None, Mode::Inference, LogitsAt::All)
            .unwrap()
            .logits
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (dense, quantized) = (logits(WeightMode::Dense), logits(WeightMode::Quantized));
    let worst = dense.iter().zip(&quantized).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < LOGIT_TOL, "quantized-mode logits differ from the dense load's by {worst}");
}
