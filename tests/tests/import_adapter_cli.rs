//! `verdict-train import-adapter` end to end on adapters trained with Hugging Face PEFT
//! (tests/fixtures/peft_import, scripts/fixtures/make_peft_import_fixture.py): imported under
//! the promotion rule, served by `verdict-serve`, and the served probabilities equal PEFT's;
//! and every refusal (an unknown field, DoRA, another base, a module the model lacks, a tensor
//! the config does not account for, an unconfirmed Hub id) names what it refuses and leaves
//! the registry exactly as it was.

use serde_json::{json, Value};
use shared::registry::Registry;
use shared::task::{AnswerScoring, TaskRegistry};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tests::tiny::synthetic_split;
use tests::{http_raw, run, Server, TempDir};

/// Served probabilities vs PEFT's (PyTorch f32, one forward per answer, summed in f64):
/// measured at most 3.8e-7 over the 24 probabilities (two adapters, six inputs, two labels).
const TOL: f64 = 1e-5;
/// The Hub id the fixture adapters name (not a local directory: `--base` confirms it).
const BASE_ID: &str = "verdict-fixtures/tiny-llama-mr";
const TOKEN: &str = "s3cret";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft_import")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference.json")).unwrap()).unwrap()
}

/// A temporary directory with a copy of the fixture's base model (`base/`: loading writes a
/// packed-weight cache beside it, which must not land in the source tree), the synthetic `mr`
/// dev split (`data/`) and an empty registry path.
struct Setup {
    dir: TempDir,
    base: PathBuf,
    data: String,
    registry: PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let base = dir.0.join("base");
    copy_dir(&fixtures().join("base"), &base);
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    synthetic_split(&data.join("dev.jsonl"), 32, 2);
    let registry = dir.0.join("adapters");
    Setup { base, data: data.display().to_string(), registry, dir }
}

/// What one import did.
struct Outcome {
    code: Option<i32>,
    stderr: String,
    record: Option<Value>,
}

fn import(s: &Setup, from: &Path, extra: &[&str]) -> Outcome {
    let mut args = vec![
        "import-adapter",
        "--model",
        s.base.to_str().unwrap(),
        "--task",
        "mr",
        "--data",
        &s.data,
        "--adapters",
        s.registry.to_str().unwrap(),
        "--from",
        from.to_str().unwrap(),
    ];
    args.extend(extra);
    let o = run("verdict-train", &args, &[("RUST_BACKTRACE", "1")]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    Outcome {
        code: o.status.code(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        record: stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()),
    }
}

/// Every file under `root` with its bytes: the registry's whole state.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), Vec::new());
                walk(&p, root, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn peft_adapters_import_under_the_promotion_rule_and_serve_peft_probabilities() {
    let s = setup("import-serve");
    let reg = Registry::new(&s.registry);
    let fx = fixtures();
    let regex_dir = fx.join("adapter_regex");

    // The promotion rule applies: a margin nobody clears refuses the import (exit 3), logged,
    // nothing published.
    let o = import(&s, &regex_dir, &["--base", BASE_ID, "--margin", "1"]);
    assert_eq!(o.code, Some(3), "{}", o.stderr);
    assert!(o.stderr.contains("refused") && !o.stderr.contains("backtrace"), "{}", o.stderr);
    assert!(reg.versions("mr").unwrap().is_empty());
    let refused = o.record.expect("the refusal's audit record");
    assert_eq!(refused["action"], "refuse");
    assert_eq!(refused["candidate"].as_str(), Some(std::fs::canonicalize(&regex_dir).unwrap().to_str().unwrap()));

    // --force publishes it, as promote does: v1, serving.
    let o = import(&s, &regex_dir, &["--base", BASE_ID, "--force"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v1"));
    let v1 = s.registry.join("mr/v1");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(v1.join(f)).unwrap(),
            std::fs::read(regex_dir.join(f)).unwrap(),
            "{f} as PEFT wrote it"
        );
    }
    let m = tests::read_manifest(&v1);
    let mr = TaskRegistry::builtin().get("mr").unwrap().clone();
    assert_eq!(m["method"], "peft-import");
    assert_eq!(m["base_hub_id"], BASE_ID);
    assert_eq!(m["base_sha256"].as_str().unwrap(), shared::adapter::weights_sha256(&fx.join("base")).unwrap());
    assert_eq!(m["base_sha256"].as_str().unwrap(), shared::adapter::weights_sha256(&s.base).unwrap());
    assert_eq!(m["template_hash"].as_str().unwrap(), mr.template_hash());
    assert_eq!(m["task"], "mr");

    // A base named by its local path is fingerprinted: no --base needed.
    let layers_dir = s.dir.0.join("adapter_layers");
    copy_dir(&fx.join("adapter_layers"), &layers_dir);
    edit_config(&layers_dir, |c| c["base_model_name_or_path"] = json!(s.base.display().to_string()));
    let o = import(&s, &layers_dir, &["--force", "--version", "layers"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(tests::read_manifest(&s.registry.join("mr/layers"))["base_hub_id"].is_null());
    assert_eq!(reg.history("mr").unwrap(), vec!["v1", "layers"]);
    let audit: Vec<Value> = std::fs::read_to_string(s.registry.join("mr/AUDIT.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<(&str, bool)> =
        audit.iter().map(|a| (a["action"].as_str().unwrap(), a["forced"] == true)).collect();
    assert_eq!(actions[..2], [("refuse", false), ("promote", true)]);
    // The second import is compared with v1 like any candidate: forced only if it does not beat it.
    let (cand, inc) = (audit[2]["candidate_score"].as_f64().unwrap(), audit[2]["incumbent_score"].as_f64().unwrap());
    assert_eq!(audit[2]["action"], "promote");
    assert_eq!(audit[2]["forced"], cand < inc + 0.005 - 1e-9, "{}", audit[2]);

    // Served: the prompt and answers are the token ids PEFT scored, the probabilities PEFT's.
    let r = reference();
    let base = &s.base;
    let server = Server::start(&[
        "--model",
        base.to_str().unwrap(),
        "--weights",
        "dense",
        "--cpu-matmul",
        "f32",
        "--adapters",
        s.registry.to_str().unwrap(),
        "--admin-token",
        TOKEN,
    ]);
    // CURRENT (`layers`) serves from the start; v1 is loaded through the admin API.
    let auth = format!("Authorization: Bearer {TOKEN}");
    let loaded_v1 = http_raw(server.port, "POST", "/v1/admin/adapters/mr/v1/load", b"", &[&auth]).unwrap();
    assert_eq!(loaded_v1.status, 200, "{}", loaded_v1.text());
    let sentences: Vec<&str> =
        r["inputs"].as_array().unwrap().iter().map(|i| i["sentence"].as_str().unwrap()).collect();
    let (status, tok) = server.post("/v1/tokenize", &json!({"task": "mr", "inputs": sentences}));
    assert_eq!(status, 200, "{tok}");
    for (i, input) in r["inputs"].as_array().unwrap().iter().enumerate() {
        let mut ids: Vec<Value> = tok["prefix_ids"].as_array().unwrap().clone();
        ids.extend(tok["results"][i]["ids"].as_array().unwrap().iter().cloned());
        assert_eq!(Value::Array(ids), input["prompt_ids"], "prompt {i}: Verdict's ids are the ones PEFT scored");
    }
    let loaded =
        models::load_model(base, models::WeightMode::Dense, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let answers: Vec<Vec<u32>> =
        mr.scored_texts(AnswerScoring::Full).iter().map(|t| loaded.encode_text(t).unwrap()).collect();
    assert_eq!(json!(answers), r["answer_ids"], "answer ids");

    let labels: Vec<&str> = r["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert_eq!(labels, mr.label_words());
    let mut worst: f64 = 0.0;
    for (version, name) in [("v1", "adapter_regex"), ("layers", "adapter_layers")] {
        let (status, v) = server.post("/v1/classify", &json!({"task": "mr", "version": version, "inputs": sentences}));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["adapter_version"], version);
        let peft = &r["adapters"][name]["probabilities"];
        for (i, sentence) in sentences.iter().enumerate() {
            for (c, label) in labels.iter().enumerate() {
                let served = v["results"][i]["probabilities"][label].as_f64().unwrap();
                let want = peft[i][c].as_f64().unwrap();
                let base_p = r["base_probabilities"][i][c].as_f64().unwrap();
                assert!(
                    (served - want).abs() <= TOL,
                    "{name} {sentence:?} {label}: served {served}, PEFT {want} (base alone {base_p})"
                );
                worst = worst.max((served - want).abs());
            }
        }
    }
    eprintln!("max |served - PEFT| = {worst:.3e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let p = dir.join("adapter_config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&p, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

#[test]
fn refusals_name_what_they_refuse_and_change_nothing() {
    let s = setup("import-refuse");
    let fx = fixtures();
    // A registry with a version in it, so "unchanged" covers versions, CURRENT, history, audit.
    let o = import(&s, &fx.join("adapter_regex"), &["--base", BASE_ID, "--force"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let before = snapshot(&s.registry);
    assert!(before.keys().any(|k| k.ends_with("AUDIT.jsonl")) && before.keys().any(|k| k.ends_with("v1")));

    /// What a case does to a copy of the fixture adapter, the flags, the exit status and what
    /// the error must say.
    type Edit = Box<dyn Fn(&Path)>;
    type Case<'a> = (&'a str, Edit, &'a [&'a str], i32, &'a [&'a str]);
    let config = |f: fn(&mut Value)| -> Edit { Box::new(move |d: &Path| edit_config(d, f)) };
    let other_base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/arch/qwen3");
    let cases: Vec<Case> = vec![
        (
            "unknown field",
            config(|c| c["frobnicate"] = json!(true)),
            &["--base", BASE_ID],
            1,
            &["\"frobnicate\"", "unknown field"],
        ),
        ("DoRA", config(|c| c["use_dora"] = json!(true)), &["--base", BASE_ID], 1, &["use_dora"]),
        (
            "another base",
            Box::new(move |d: &Path| {
                let other = other_base.display().to_string();
                edit_config(d, |c| c["base_model_name_or_path"] = json!(other))
            }),
            &[],
            1,
            &["base_model_name_or_path", "another base"],
        ),
        ("an unconfirmed Hub id", Box::new(|_: &Path| {}), &[], 2, &["--base verdict-fixtures/tiny-llama-mr"]),
        (
            "--base that is not the adapter's",
            Box::new(|_: &Path| {}),
            &["--base", "org/other"],
            1,
            &["--base", "org/other"],
        ),
        (
            "a module the model lacks",
            config(|c| c["target_modules"] = json!(r"transformer\.h\.[0-9]+\.attn\.c_attn")),
            &["--base", BASE_ID],
            1,
            &["target_modules", "matches no module"],
        ),
        (
            "a listed module the model lacks",
            config(|c| {
                c["target_modules"] = json!(["q_proj", "v_proj", "down_proj", "c_attn"]);
                c["rank_pattern"] = json!({});
            }),
            &["--base", BASE_ID],
            1,
            &["target_modules", "\"c_attn\""],
        ),
        (
            "a tensor the config does not account for",
            Box::new(|d: &Path| {
                let p = d.join("adapter_model.safetensors");
                let mut t = candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap();
                let name = "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector";
                t.insert(
                    name.into(),
                    candle_core::Tensor::ones(64, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
                );
                candle_core::safetensors::save(&t, &p).unwrap();
            }),
            &["--base", BASE_ID],
            1,
            &["lora_magnitude_vector", "not a LoRA factor"],
        ),
    ];
    for (i, (what, edit, extra, code, needles)) in cases.iter().enumerate() {
        let dir = s.dir.0.join(format!("case{i}"));
        copy_dir(&fx.join("adapter_regex"), &dir);
        edit(&dir);
        let o = import(&s, &dir, extra);
        assert_eq!(o.code, Some(*code), "{what}: {}", o.stderr);
        for n in *needles {
            assert!(o.stderr.contains(n), "{what}: {n:?} not in {}", o.stderr);
        }
        assert!(!o.stderr.contains("backtrace") && !o.stderr.contains("panicked"), "{what}: {}", o.stderr);
        assert!(o.record.is_none(), "{what}: no decision was made, nothing audited");
        assert!(snapshot(&s.registry) == before, "{what}: the registry changed");
    }
}
