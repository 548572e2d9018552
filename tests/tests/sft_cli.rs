//! `verdict-train sft` end to end on a tiny seeded model: it learns a synthetic task, and a run
//! killed after a checkpoint and resumed ends exactly where an uninterrupted run ends.

use candle_core::{DType, Device};
use models::random::{random_decoder, tiny_config};
use models::{Arch, LoadedModel, SpecialTokens, WeightMode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::{binary, run, TempDir};

const POSITIVE: [&str; 3] = ["good", "great", "fine"];
const NEGATIVE: [&str; 3] = ["bad", "awful", "poor"];
const FILLER: [&str; 10] = ["the", "movie", "was", "a", "film", "plot", "acting", "story", "really", "quite"];

/// A tiny random Llama with a word-level tokenizer, written as a Hugging Face directory.
fn tiny_model_dir(dir: &Path) {
    let mut words: Vec<String> =
        ["[UNK]", "<|endoftext|>", "Positive", "Negative", "<", ">", "</", "Judgement", "\"", ":", "Sentence"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    words.extend(POSITIVE.iter().chain(&NEGATIVE).chain(&FILLER).map(|s| s.to_string()));
    let vocab: serde_json::Map<String, serde_json::Value> =
        words.iter().enumerate().map(|(i, w)| (w.clone(), serde_json::json!(i))).collect();
    let tok_json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 1, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let tokenizer: tokenizers::Tokenizer = tok_json.to_string().parse().unwrap();
    // Qwen2 shape: an untied, 1/sqrt(h)-scaled LM head keeps the starting logits small (a tied
    // head over ±1 embeddings starts saturated and learns slowly).
    let cfg = tiny_config(Arch::Qwen2, words.len());
    let model = random_decoder(&cfg, 7, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let loaded = LoadedModel {
        model,
        tokenizer,
        special: SpecialTokens { bos: None, eos: Some(1), pad: Some(1), add_bos: false, stop: vec![1] },
        chat: None,
        chat_template_source: None,
        path: dir.to_path_buf(),
    };
    models::hf::save_dir(&loaded, dir).unwrap();
}

/// Sentences of filler words with one sentiment word; the label follows that word.
fn synthetic_split(path: &Path, n: usize, seed: u64) {
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

fn setup(tag: &str) -> (TempDir, String, String) {
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

fn sft_args<'a>(model: &'a str, data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "sft",
        "--model",
        model,
        "--task",
        "mr",
        "--data",
        data,
        "--out",
        out,
        "--max-steps",
        steps,
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
        "--save-every",
        "5",
        "--keep-checkpoints",
        "20",
        "--seed",
        "3",
    ]
}

/// `(step, value)` of every `metrics.jsonl` entry that has `key`.
fn series(out: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v[key].as_f64()?)))
        .collect()
}

#[test]
fn a_tiny_model_learns_a_synthetic_task() {
    let (dir, model, data) = setup("sft-learn");
    let out = dir.0.join("run");
    let mut args = sft_args(&model, &data, out.to_str().unwrap(), "200");
    args.extend(["--eval-every", "50"]);
    let o = run("verdict-train", &args, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let scores = series(&out, "dev_score");
    assert_eq!(scores.iter().map(|s| s.0).collect::<Vec<_>>(), vec![50, 100, 150, 200]);
    let last = scores.last().unwrap().1;
    let losses: Vec<String> = series(&out, "loss").iter().map(|(_, x)| format!("{x:.3}")).collect();
    assert!(last >= 0.95, "dev accuracy after 200 steps: {scores:?}; losses {losses:?}");
    // Before training the base model is at chance on this task.
    let base = run(
        "verdict-train",
        &["eval", "--model", &model, "--task", "mr", "--data", &data, "--split", "dev", "--resamples", "10"],
        &[],
    );
    let table = String::from_utf8_lossy(&base.stdout);
    let acc: f64 =
        table.lines().find(|l| l.starts_with("| mr")).unwrap().split('|').nth(7).unwrap().trim().parse().unwrap();
    assert!(acc < 0.8, "untrained accuracy {acc}");
    // The trained adapter evaluates the same through `eval --adapter`, and carries its manifest.
    let adapter = out.join("adapter");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("verdict_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["task"], "mr");
    assert_eq!(manifest["steps"], 200);
    let o = run(
        "verdict-train",
        &[
            "eval",
            "--model",
            &model,
            "--task",
            "mr",
            "--data",
            &data,
            "--split",
            "dev",
            "--adapter",
            adapter.to_str().unwrap(),
            "--resamples",
            "10",
        ],
        &[],
    );
    let table = String::from_utf8_lossy(&o.stdout);
    let acc: f64 =
        table.lines().find(|l| l.starts_with("| mr")).unwrap().split('|').nth(7).unwrap().trim().parse().unwrap();
    assert!((acc - last).abs() < 1e-9, "eval --adapter gives {acc}, training reported {last}");
    assert!(out.join("curves.svg").is_file() && out.join("best/adapter_model.safetensors").is_file());
    // The manifest refuses the adapter for another task or other base weights, with the reason.
    let a = adapter.to_str().unwrap();
    let o =
        run("verdict-train", &["eval", "--model", &model, "--task", "mr-score", "--data", &data, "--adapter", a], &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("adapter is for task mr, not mr-score"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run("verdict-train", &["eval", "--model", "smollm2", "--task", "mr", "--data", &data, "--adapter", a], &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("trained on base weights"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_killed_run_resumes_to_the_same_adapter() {
    let (dir, model, data) = setup("sft-resume");
    let whole = dir.0.join("whole");
    let o = run("verdict-train", &sft_args(&model, &data, whole.to_str().unwrap(), "25"), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The same run, killed (SIGKILL) once its step-10 checkpoint is on disk, then resumed.
    let cut = dir.0.join("cut");
    let mut child = Command::new(binary("verdict-train"))
        .args(sft_args(&model, &data, cut.to_str().unwrap(), "25"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !cut.join("checkpoints/step-000010/state.json").is_file() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!cut.join("adapter").exists(), "killed before the end");
    let mut args = sft_args(&model, &data, cut.to_str().unwrap(), "25");
    args.push("--resume");
    let o = run("verdict-train", &args, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resumed from"));

    let load =
        |p: &Path| candle_core::safetensors::load(p.join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (a, b) = (load(&whole), load(&cut));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let diff =
            (t - &b[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{name} differs by {diff} after resume");
    }
    // The logged losses agree step for step, and no step is logged twice.
    assert_eq!(series(&whole, "loss"), series(&cut, "loss"));
    // Starting over in a directory that holds a run is refused.
    let o = run("verdict-train", &sft_args(&model, &data, cut.to_str().unwrap(), "25"), &[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--resume"));
}
