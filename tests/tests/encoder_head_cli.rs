//! `verdict-train encoder-head` end to end on the real MiniLM and synthetic `mr` splits: it
//! writes a head, a manifest naming MiniLM's sha256 and a report; a second run reuses the
//! cached embeddings; `verdict-serve --model minilm` serves the head, and the served labels of
//! the test split score exactly the test accuracy the report gives. `--random` writes a head
//! of a random BERT's width without data.
//!
//! Needs MiniLM in the cache: `verdict-train fetch minilm` (scripts/test.sh does it).

use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::{binary, free_port, http, train_ok, wait_for, TempDir};

#[test]
fn encoder_head_trains_a_head_that_verdict_serve_serves() {
    let dir = TempDir::new("enc-head");
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (split, n, seed) in [("train", 160, 1), ("dev", 48, 2), ("test", 48, 3)] {
        tests::tiny::synthetic_split(&data.join(format!("{split}.jsonl")), n, seed);
    }
    let out = dir.0.join("head");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = ["--threads", "2", "encoder-head", "--model", "minilm", "--task", "mr", "--data", d, "--out", o];
    let args: Vec<&str> = args.iter().copied().chain(["--steps", "200", "--resamples", "100"]).collect();
    train_ok(&args);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let test_acc = report["test"]["score"].as_f64().unwrap();
    assert!(test_acc > 0.85, "one sentiment word per sentence should be easy: {report}");
    assert_eq!(report["examples"], json!({"train": 160, "dev": 48, "test": 48}));
    let manifest = tests::read_manifest(&out);
    let minilm = shared::assets::find_model("minilm").unwrap();
    assert_eq!(
        (manifest["method"].as_str(), manifest["base_sha256"].as_str()),
        (Some("encoder-head"), Some(minilm.sha256))
    );
    assert_eq!(manifest["label_words"], json!(["Negative", "Positive"]));
    // A second run embeds nothing again.
    assert!(train_ok(&args).contains("cached embeddings"));

    // Serve it and classify the test split: the served labels score the report's accuracy.
    let reg = dir.0.join("heads");
    std::fs::create_dir_all(reg.join("mr")).unwrap();
    std::fs::rename(&out, reg.join("mr/v1")).unwrap();
    std::fs::write(reg.join("mr/CURRENT"), "v1\n").unwrap();
    let port = free_port();
    let mut child = Command::new(binary("verdict-serve"))
        .args(["--model", "minilm", "--adapters", reg.to_str().unwrap(), "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let ready = wait_for(port, "/ready", 200, Duration::from_secs(120));
    let rows: Vec<Value> = std::fs::read_to_string(data.join("test.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let sentences: Vec<&str> = rows.iter().map(|r| r["sentence"].as_str().unwrap()).collect();
    let mut right = 0;
    for (chunk, gold) in sentences.chunks(16).zip(rows.chunks(16)) {
        let body = json!({"task": "mr", "inputs": chunk}).to_string();
        let (status, text) = http(port, "POST", "/v1/classify", Some(&body)).unwrap();
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        for (r, g) in v["results"].as_array().unwrap().iter().zip(gold) {
            right += usize::from(r["label"].as_str().unwrap().eq_ignore_ascii_case(g["label"].as_str().unwrap()));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(ready, Some((200, _))), "{ready:?}");
    let served = right as f64 / rows.len() as f64;
    assert!((served - test_acc).abs() < 1e-9, "served accuracy {served}, report {test_acc}");

    // A random head for BERT-base: its width, no data needed.
    let random = dir.0.join("random");
    train_ok(&["encoder-head", "--model", "bert-base", "--task", "mr", "--random", "--out", random.to_str().unwrap()]);
    let head = models::ClassifierHead::load(&random, 768, 2, &candle_core::Device::Cpu).unwrap();
    assert_eq!(head.labels(), 2);
    assert_eq!(tests::read_manifest(&random)["steps"], 0);
}
