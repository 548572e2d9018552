//! `verdict-serve` with a BERT encoder (the real all-MiniLM-L6-v2 from the cache) and linear
//! heads in the registry, end to end on loopback: `/v1/classify` and `/predict` answer what the
//! library computes for the same inputs; bad inputs get the decoder server's 4xx codes; and
//! `verdict-bench` against it counts every request without errors and refuses other hosts.
//!
//! Needs MiniLM in the cache: `verdict-train fetch minilm` (scripts/test.sh does it).

use candle_core::Device;
use models::{ClassifierHead, Encoder, EncoderSource};
use serde_json::{json, Value};
use shared::adapter::{weights_sha256, Manifest, HEAD_METHOD, MANIFEST_VERSION};
use shared::registry::Registry;
use shared::task::TaskRegistry;
use std::path::PathBuf;
use std::process::Command;
use tests::{binary, http, http_raw, Server, TempDir};

/// Server answers vs the library: the same f32 math in other batch shapes.
const TOL: f64 = 1e-5;

fn minilm_dir() -> PathBuf {
    let m = shared::assets::find_model("minilm").unwrap();
    let cache = shared::assets::cache_dir();
    assert!(m.is_cached(&cache), "MiniLM is missing: run `verdict-train fetch minilm` first");
    m.model_path_in(&cache)
}

/// Publishes a seeded random head for `task` as `<registry>/<task>/<version>`.
fn publish_head(reg: &Registry, task: &str, version: &str, seed: u64, sha: &str, method: &str) -> ClassifierHead {
    let t = TaskRegistry::builtin().get(task).unwrap().clone();
    let head = ClassifierHead::random(384, t.num_classes(), seed, &Device::Cpu).unwrap();
    // A non-zero bias too, so the bias is checked.
    let head = ClassifierHead::new(head.weight.clone(), (head.bias.ones_like().unwrap() * 0.25).unwrap()).unwrap();
    let m = Manifest {
        manifest_version: MANIFEST_VERSION,
        base_sha256: sha.to_string(),
        base_model: "minilm".into(),
        base_hub_id: None,
        task: t.name.clone(),
        template_version: t.template_version,
        template_hash: t.template_hash(),
        label_words: t.label_words(),
        method: method.into(),
        command: "test".into(),
        steps: 0,
        dev_metrics: None,
    };
    reg.publish::<shared::registry::RegistryError>(task, version, |d| {
        head.save(d).map_err(std::io::Error::other)?;
        Ok(m.write(d)?)
    })
    .unwrap();
    head
}

/// MiniLM, a registry with heads for `mr` (v1, v2, a refused one) and `mrpc` (a pair task).
struct Fixture {
    dir: TempDir,
    registry: Registry,
    encoder: Encoder,
    heads: Vec<(String, String, ClassifierHead)>,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let model = minilm_dir();
        let sha = weights_sha256(&model).unwrap();
        let registry = Registry::new(dir.0.join("heads"));
        let mut heads = Vec::new();
        for (task, version, seed) in [("mr", "v1", 1), ("mr", "v2", 2), ("mrpc", "v1", 3)] {
            heads.push((
                task.to_string(),
                version.to_string(),
                publish_head(&registry, task, version, seed, &sha, HEAD_METHOD),
            ));
        }
        publish_head(&registry, "mr", "other-encoder", 4, &"0".repeat(64), HEAD_METHOD);
        publish_head(&registry, "mr", "lora", 5, &sha, "sft");
        registry.promote("mr", "v1").unwrap();
        registry.promote("mrpc", "v1").unwrap();
        let encoder = Encoder::load(&EncoderSource::Dir(model), &Device::Cpu).unwrap();
        Self { dir, registry, encoder, heads }
    }

    fn head(&self, task: &str, version: &str) -> &ClassifierHead {
        &self.heads.iter().find(|(t, v, _)| t == task && v == version).unwrap().2
    }

    /// Label probabilities and logits of one input, as the library computes them.
    fn expected(&self, task: &str, version: &str, texts: &[&str]) -> (Vec<f64>, Vec<f64>) {
        let input = self.encoder.encode_input(texts).unwrap();
        let logits = self.head(task, version).classify(&self.encoder, &[&input]).unwrap().remove(0);
        (models::scoring::normalize(&logits), logits)
    }

    fn start(&self, extra: &[&str]) -> Server {
        let mut args = vec![
            "--model".to_string(),
            minilm_dir().display().to_string(),
            "--adapters".into(),
            self.registry.root().display().to_string(),
            "--threads".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::start(&args)
    }
}

fn close(got: &Value, want: &[f64], words: &[&str], what: &str) {
    for (w, p) in words.iter().zip(want) {
        let g = got[*w].as_f64().unwrap_or_else(|| panic!("{what}: no {w} in {got}"));
        assert!((g - p).abs() < TOL, "{what}: {w} {g} vs library {p}");
    }
}

#[test]
fn encoder_server_answers_what_the_library_computes() {
    let f = Fixture::new("enc-api");
    let s = f.start(&["--default-task", "mr", "--admin-token", "t"]);
    let sentences =
        ["a gorgeous, witty, seductive movie.", "dull", "The plot is thin, but the jokes land more often than not."];

    // /v1/classify: a list (one batch of different lengths), and one string.
    let (status, v) = s.post("/v1/classify", &json!({"task": "mr", "inputs": sentences}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["adapter_version"], "v1");
    for (r, text) in v["results"].as_array().unwrap().iter().zip(sentences) {
        let (probs, _) = f.expected("mr", "v1", &[text]);
        close(&r["probabilities"], &probs, &["Negative", "Positive"], text);
        let want = if probs[1] > probs[0] { "Positive" } else { "Negative" };
        assert_eq!(r["label"], want);
        assert_eq!(r["adapter_version"], "v1");
        assert_eq!(r["truncated"], false);
    }
    let (_, one) = s.post("/v1/classify", &json!({"task": "mr", "inputs": {"sentence": sentences[1]}}));
    close(
        &one["results"][0]["probabilities"],
        &f.expected("mr", "v1", &[sentences[1]]).0,
        &["Negative", "Positive"],
        "object",
    );

    // An explicit version (loaded by an admin first: requests never load).
    let r = http_raw(s.port, "POST", "/v1/admin/adapters/mr/v2/load", b"", &["Authorization: Bearer t"]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let (status, v2) = s.post("/v1/classify", &json!({"task": "mr", "version": "v2", "inputs": sentences[0]}));
    assert_eq!(status, 200, "{v2}");
    assert_eq!(v2["adapter_version"], "v2");
    close(
        &v2["results"][0]["probabilities"],
        &f.expected("mr", "v2", &[sentences[0]]).0,
        &["Negative", "Positive"],
        "v2",
    );

    // A pair task: segment ids matter.
    let pair = ["A man is playing a guitar.", "Someone plays an instrument."];
    let (status, p) =
        s.post("/v1/classify", &json!({"task": "mrpc", "inputs": {"sentence1": pair[0], "sentence2": pair[1]}}));
    assert_eq!(status, 200, "{p}");
    let words = TaskRegistry::builtin().get("mrpc").unwrap().label_words();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    close(&p["results"][0]["probabilities"], &f.expected("mrpc", "v1", &pair).0, &words, "pair");

    // /predict (TEI): one input, a batch, raw scores (the head's logits).
    let (status, pr) = s.post("/predict", &json!({"inputs": sentences[0]}));
    assert_eq!(status, 200, "{pr}");
    let (probs, logits) = f.expected("mr", "v1", &[sentences[0]]);
    let by_label = |list: &Value| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .map(|x| (x["label"].as_str().unwrap().to_string(), x["score"].clone()))
            .collect()
    };
    close(&by_label(&pr), &probs, &["Negative", "Positive"], "predict");
    assert!(pr[0]["score"].as_f64() >= pr[1]["score"].as_f64(), "sorted by score: {pr}");
    let (_, batch) = s.post("/predict", &json!({"inputs": [[sentences[0]], [sentences[2]]]}));
    assert_eq!(batch.as_array().unwrap().len(), 2);
    close(&by_label(&batch[1]), &f.expected("mr", "v1", &[sentences[2]]).0, &["Negative", "Positive"], "predict batch");
    let (_, raw) = s.post("/predict", &json!({"inputs": sentences[0], "raw_scores": true}));
    close(&by_label(&raw), &logits, &["Negative", "Positive"], "raw scores");

    // Readiness names the architecture; the metrics count the inputs.
    let (_, ready) = http(s.port, "GET", "/ready", None).unwrap();
    assert!(ready.contains("\"arch\":\"bert\""), "{ready}");
    let (_, metrics) = http(s.port, "GET", "/metrics", None).unwrap();
    assert!(metrics.contains("verdict_inputs_total{task=\"mr\"}"), "{metrics}");
    drop(f.dir);
}

#[test]
fn encoder_server_refuses_bad_input_with_the_same_codes() {
    let f = Fixture::new("enc-bad");
    let s = f.start(&["--default-task", "mr", "--max-inputs", "4", "--max-input-tokens", "16", "--admin-token", "t"]);
    let long = "a very long sentence about a film ".repeat(10);
    let cases: Vec<(Value, &str, u16, &str)> = vec![
        (json!({"task": "nope", "inputs": "x"}), "/v1/classify", 404, "unknown_task"),
        (json!({"task": "sst2", "inputs": "x"}), "/v1/classify", 404, "no_adapter"),
        (json!({"task": "mr"}), "/v1/classify", 400, "invalid_request"),
        (json!({"task": "mr", "inputs": "x", "extra": 1}), "/v1/classify", 400, "invalid_request"),
        (json!([1, 2]), "/v1/classify", 400, "invalid_request"),
        (json!({"task": "mr", "inputs": []}), "/v1/classify", 422, "no_inputs"),
        (json!({"task": "mr", "inputs": ["a", "b", "c", "d", "e"]}), "/v1/classify", 422, "too_many_inputs"),
        (json!({"task": "mr", "inputs": "  "}), "/v1/classify", 422, "empty_input"),
        (json!({"task": "mr", "inputs": 3}), "/v1/classify", 422, "invalid_input"),
        (json!({"task": "mr", "inputs": {"text": "x"}}), "/v1/classify", 422, "unknown_field"),
        (json!({"task": "mrpc", "inputs": {"sentence1": "x"}}), "/v1/classify", 422, "missing_field"),
        (json!({"task": "mrpc", "inputs": "x"}), "/v1/classify", 422, "invalid_input"),
        (json!({"task": "mr", "inputs": long}), "/v1/classify", 422, "input_too_long"),
        (json!({"task": "mr", "version": "v9", "inputs": "x"}), "/v1/classify", 404, "unknown_adapter_version"),
        (json!({"task": "mr", "version": "../x", "inputs": "x"}), "/v1/classify", 400, "invalid_name"),
        (json!({"task": "mr", "version": "other-encoder", "inputs": "x"}), "/v1/classify", 404, "adapter_not_loaded"),
    ];
    for (body, path, status, code) in &cases {
        let (got, v) = s.post(path, body);
        assert_eq!((got, v["error"]["code"].as_str()), (*status, Some(*code)), "{path} {body}: {v}");
    }
    // /predict answers TEI's errors: `{"error", "error_type"}` with TEI's status.
    for (body, status, error_type) in [
        (json!({"inputs": 5}), 422, "Validation"),
        (json!({"inputs": []}), 400, "Empty"),
        (json!({"inputs": ["a", "b"]}), 422, "Validation"),
    ] {
        let (got, v) = s.post("/predict", &body);
        assert_eq!((got, v["error_type"].as_str()), (status, Some(error_type)), "/predict {body}: {v}");
    }
    // Heads of other encoder weights, and LoRA adapters, are refused when an admin loads them.
    for version in ["other-encoder", "lora"] {
        let path = format!("/v1/admin/adapters/mr/{version}/load");
        let r = http_raw(s.port, "POST", &path, b"", &["Authorization: Bearer t"]).unwrap();
        assert_eq!(r.status, 422, "{path}: {}", r.text());
        assert!(r.text().contains("adapter_refused"), "{path}: {}", r.text());
    }
    let r = http_raw(s.port, "POST", "/v1/classify", b"{not json", &[]).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("malformed_json"), "{}", r.text());
    let r = http_raw(s.port, "POST", "/v1/classify", &[0x7b, 0xff, 0x7d], &[]).unwrap();
    assert!(r.text().contains("invalid_utf8"), "{}", r.text());
    // Truncation instead of refusal, and the server still answers correctly.
    let (status, v) = s.post("/v1/classify", &json!({"task": "mr", "inputs": long, "truncate": true}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["results"][0]["truncated"], true);
    let (_, ok) = s.post("/v1/classify", &json!({"task": "mr", "inputs": "fine"}));
    close(
        &ok["results"][0]["probabilities"],
        &f.expected("mr", "v1", &["fine"]).0,
        &["Negative", "Positive"],
        "after errors",
    );
}

#[test]
fn verdict_bench_counts_requests_and_refuses_other_hosts() {
    let f = Fixture::new("enc-bench");
    let s = f.start(&["--default-task", "mr"]);
    let data = f.dir.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let lines: Vec<String> =
        ["a gorgeous film", "dull, dull, dull", "the plot is thin", "quietly devastating", "I checked my watch"]
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"id": i.to_string(), "sentence": t, "label": "positive"}).to_string())
            .collect();
    std::fs::write(data.join("test.jsonl"), lines.join("\n")).unwrap();
    let out = f.dir.0.join("bench.json");
    let svg = f.dir.0.join("bench.svg");
    let md = f.dir.0.join("bench.md");
    let o = Command::new(binary("verdict-bench"))
        .args([
            "--task",
            "mr",
            "--data",
            data.to_str().unwrap(),
            "--clients",
            "1,2",
            "--requests",
            "7",
            "--seconds",
            "60",
        ])
        .args(["--endpoint", &format!("classify=http://127.0.0.1:{}/v1/classify", s.port)])
        .args(["--endpoint", &format!("predict=http://localhost:{}/predict", s.port)])
        .args(["--baseline", "classify", "--out-json", out.to_str().unwrap(), "--out-svg", svg.to_str().unwrap()])
        .args(["--out-md", md.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{v}");
    for r in rows {
        assert_eq!(
            (r["requests"].as_u64(), r["ok"].as_u64(), r["errors"].as_u64()),
            (Some(7), Some(7), Some(0)),
            "{r}"
        );
    }
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(table.contains("| classify | 1 | 7 | 0 |") && table.contains("| predict | 2 | 7 | 0 |"), "{table}");
    assert!(table.contains("1.00x"), "the baseline's own ratio: {table}");
    assert_eq!(std::fs::read_to_string(&svg).unwrap().matches("<polyline").count(), 4);

    for host in ["10.0.0.1", "192.168.1.10", "8.8.8.8", "example.com"] {
        let o = Command::new(binary("verdict-bench"))
            .args(["--task", "mr", "--data", data.to_str().unwrap(), "--requests", "1"])
            .args(["--endpoint", &format!("far=http://{host}:8080/v1/classify")])
            .output()
            .unwrap();
        assert!(!o.status.success(), "{host} was accepted");
        assert!(String::from_utf8_lossy(&o.stderr).contains("loopback"), "{}", String::from_utf8_lossy(&o.stderr));
    }
}
