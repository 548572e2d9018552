//! A tiny seeded random model with a word-level tokenizer and a synthetic sentiment task in
//! the `mr` format: fast stand-ins for the real assets in training and serving tests.

use crate::TempDir;
use candle_core::{DType, Device};
use models::random::{random_decoder, tiny_config};
use models::{Arch, LoadedModel, SpecialTokens, WeightMode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

pub const POSITIVE: [&str; 3] = ["good", "great", "fine"];
pub const NEGATIVE: [&str; 3] = ["bad", "awful", "poor"];
pub const FILLER: [&str; 10] = ["the", "movie", "was", "a", "film", "plot", "acting", "story", "really", "quite"];

/// The tiny model for the synthetic sentiment task (its vocabulary is that task's words).
pub fn tiny_model_dir(dir: &Path) {
    let words: Vec<&str> = ["Positive", "Negative", "<", ">", "</", "Judgement", "\"", ":", "Sentence"]
        .into_iter()
        .chain(POSITIVE.iter().chain(&NEGATIVE).chain(&FILLER).copied())
        .collect();
    model_dir_with_words(dir, &words);
}

/// A tiny random Qwen2-shaped model (seed 7) whose word-level tokenizer knows `[UNK]`,
/// `<|endoftext|>` (id 1: end of text and padding) and `words`, written as a Hugging Face
/// directory. Qwen2 shape: an untied, 1/sqrt(h)-scaled LM head keeps the starting logits small
/// (a tied head over ±1 embeddings starts saturated and learns slowly).
pub fn model_dir_with_words(dir: &Path, words: &[&str]) {
    let words: Vec<String> = ["[UNK]", "<|endoftext|>"].iter().chain(words).map(|s| s.to_string()).collect();
    let vocab: serde_json::Map<String, serde_json::Value> =
        words.iter().enumerate().map(|(i, w)| (w.clone(), serde_json::json!(i))).collect();
    let tok_json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 1, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let tokenizer: tokenizers::Tokenizer = tok_json.to_string().parse().unwrap();
    let cfg = tiny_config(Arch::Qwen2, words.len());
    let model = random_decoder(&cfg, 7, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let loaded = LoadedModel {
        model,
        tokenizer,
        special: SpecialTokens { bos: None, eos: Some(1), pad: Some(1), add_bos: false, stop: vec![1] },
        chat: None,
        path: dir.to_path_buf(),
        weights_sha256: None,
    };
    models::hf::save_dir(&loaded, dir).unwrap();
}

/// Sentences of filler words with one sentiment word; the label follows that word.
pub fn synthetic_split(path: &Path, n: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = String::new();
    for i in 0..n {
        let positive = rng.random_bool(0.5);
        let mut s: Vec<&str> = (0..rng.random_range(3..7)).map(|_| FILLER[rng.random_range(0..FILLER.len())]).collect();
        let word = if positive { POSITIVE[rng.random_range(0..3)] } else { NEGATIVE[rng.random_range(0..3)] };
        s.insert(rng.random_range(0..=s.len()), word);
        let label = if positive { "positive" } else { "negative" };
        out.push_str(&format!("{{\"id\": \"{i}\", \"sentence\": \"{}\", \"label\": \"{label}\"}}\n", s.join(" ")));
    }
    std::fs::write(path, out).unwrap();
}

/// A temporary directory with the tiny model (`tiny/`) and synthetic `train` / `dev` splits
/// (`data/`); returns the directory and the two paths.
pub fn setup(tag: &str) -> (TempDir, String, String) {
    let dir = TempDir::new(tag);
    let model = dir.0.join("tiny");
    tiny_model_dir(&model);
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    synthetic_split(&data.join("train.jsonl"), 256, 1);
    synthetic_split(&data.join("dev.jsonl"), 64, 2);
    let (m, d) = (model.to_str().unwrap().to_string(), data.to_str().unwrap().to_string());
    (dir, m, d)
}

/// The start of a training command on the tiny model and the synthetic `mr` data:
/// `<command> --model M --task mr --data D --out O --max-steps N --seed S`; callers add the rest.
pub fn train_args<'a>(command: &'a str, model: &'a str, data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![command, "--model", model, "--task", "mr", "--data", data, "--out", out, "--max-steps", steps]
}

/// SFT settings under which the tiny model learns the synthetic task in a few dozen steps:
/// batch 16, rank 8 / alpha 16 on every projection, constant lr 3e-3, seed 3.
pub const SFT_SETTINGS: [&str; 14] = [
    "--batch-size",
    "16",
    "--rank",
    "8",
    "--alpha",
    "16",
    "--targets",
    "q,k,v,o,gate,up,down",
    "--lr",
    "3e-3",
    "--schedule",
    "constant",
    "--seed",
    "3",
];

/// The PPO batch the tiny-model tests use: 32 prompts in mini-batches of 16, advantages not
/// whitened (once every response is right, whitening blows residual noise up to unit scale;
/// docs/training.md).
pub const PPO_BATCH: [&str; 5] = ["--batch-size", "32", "--mini-batch-size", "16", "--no-whiten-advantages"];

/// PPO settings under which the tiny model's reward rises within 20 steps: 4 PPO epochs,
/// rank 8 / alpha 16 on every projection without dropout (exact ratios), constant lr 2e-3,
/// seed 5. Callers add the batch sizes.
pub const PPO_SETTINGS: [&str; 16] = [
    "--ppo-epochs",
    "4",
    "--rank",
    "8",
    "--alpha",
    "16",
    "--lora-dropout",
    "0",
    "--targets",
    "q,k,v,o,gate,up,down",
    "--schedule",
    "constant",
    "--lr",
    "2e-3",
    "--seed",
    "5",
];
