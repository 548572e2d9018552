//! The real SmolLM2-135M and Qwen2.5-Coder-0.5B GGUF files against llama.cpp fixtures
//! (`tests/fixtures/*.llamacpp.json`, made by `scripts/fixtures/make_llama_cpp_fixtures.py`).
//!
//! Needs the models in the cache: `verdict-train fetch smollm2 qwen0.5b` (the README's test
//! command does this first).

use candle_core::{DType, Device, Tensor};
use models::{generate, load_model, LoadedModel, LogitsAt, Mode, TokenBatch, WeightMode};
use serde_json::Value;
use std::path::PathBuf;

/// llama.cpp multiplies with 8-bit activations (and its own block kernels); we use f32
/// activations on dequantized weights (dense) or candle's 8-bit kernels (quantized). Measured
/// worst case over the fixture prompts: 0.55 on a logit scale of about 17 (SmolLM2, quantized).
const LOGIT_TOL: f32 = 0.75;
/// A greedy choice of llama.cpp may lose our argmax only to a near-tie of at most this margin
/// (measured worst: 0.22).
const GREEDY_MARGIN: f32 = 0.3;

struct Real {
    fixture: Value,
    dense: LoadedModel,
    quant: LoadedModel,
}

fn real(asset: &str, fixture: &str) -> Real {
    let m = shared::assets::find_model(asset).unwrap();
    let path = m.path();
    assert!(path.is_file(), "{} is missing: run `verdict-train fetch {}` first", path.display(), m.name);
    let fixture_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(fixture);
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(fixture_path).unwrap()).unwrap();
    assert_eq!(fixture["model_sha256"], m.sha256);
    Real {
        fixture,
        dense: load_model(&path, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap(),
        quant: load_model(&path, WeightMode::Quantized, DType::F32, &Device::Cpu).unwrap(),
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn all_logits(m: &LoadedModel, ids: &[u32]) -> Tensor {
    adapted_logits(m, None, ids)
}

/// `[seq, vocab]` logits of one unpadded sequence, with an optional adapter.
fn adapted_logits(m: &LoadedModel, adapter: Option<&models::LoraAdapter>, ids: &[u32]) -> Tensor {
    m.model
        .forward(&TokenBatch::single(ids).unwrap(), None, adapter, Mode::Inference, LogitsAt::All)
        .unwrap()
        .logits
        .unwrap()
        .squeeze(0)
        .unwrap()
}

fn check_tokenizer(r: &Real) {
    let cases = r.fixture["tokenizer"].as_array().unwrap();
    let by_text = |t: &str| cases.iter().find(|c| c["text"] == t).map(|c| ids_of(&c["ids"]));
    let mut checked = 0;
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let mut want = ids_of(&case["ids"]);
        // Qwen2's own tokenizer normalizes to NFC; llama.cpp does not. For the decomposed
        // "cafe\u{301}" the model's tokenizer must give the ids of the composed "café".
        if r.dense.model.config().arch == models::Arch::Qwen2 && text == "cafe\u{301}" {
            want = by_text("café").expect("fixture has the composed form");
        }
        let got = r.dense.encode(text, false).unwrap();
        assert_eq!(got, want, "tokenizing {text:?}");
        if text == "cafe\u{301}" {
            continue;
        }
        assert_eq!(r.dense.decode(&got).unwrap(), text, "decoding {text:?}");
        checked += 1;
    }
    assert!(checked >= 40);
}

fn check_logits(r: &Real, name: &str) {
    for p in r.fixture["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let ids = ids_of(&p["ids"]);
        assert_eq!(r.dense.encode(text, false).unwrap(), ids, "prompt ids of {text:?}");
        for (m, tol, mode) in [(&r.dense, LOGIT_TOL, "dense"), (&r.quant, LOGIT_TOL, "quantized")] {
            let logits = all_logits(m, &ids);
            let last: Vec<f32> = logits.get(ids.len() - 1).unwrap().to_vec1().unwrap();
            let top5 = p["top5"].as_array().unwrap();
            let want_top1 = top5[0][0].as_u64().unwrap() as usize;
            let got_top1 = last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            assert_eq!(got_top1, want_top1, "{name} {mode}: next token after {text:?}");
            let mut worst = 0f32;
            for e in top5 {
                let (id, logit) = (e[0].as_u64().unwrap() as usize, e[1].as_f64().unwrap() as f32);
                worst = worst.max((last[id] - logit).abs());
            }
            eprintln!("{name} {mode} {text:?}: max |top-5 logit diff| = {worst:.3}");
            assert!(worst <= tol, "{name} {mode} {text:?}: top-5 logits differ by {worst} > {tol}");

            // Teacher-forced greedy: every llama.cpp choice is our argmax or a near-tie.
            let greedy = ids_of(&p["greedy"]);
            let full: Vec<u32> = ids.iter().chain(&greedy).copied().collect();
            let logits = all_logits(m, &full);
            let mut exact = 0;
            for (k, &want) in greedy.iter().enumerate() {
                let row: Vec<f32> = logits.get(ids.len() - 1 + k).unwrap().to_vec1().unwrap();
                let max = row.iter().copied().fold(f32::MIN, f32::max);
                let gap = max - row[want as usize];
                assert!(
                    gap <= GREEDY_MARGIN,
                    "{name} {mode} {text:?}: llama.cpp's greedy token {k} ({want}) is {gap} below our best"
                );
                exact += usize::from(gap == 0.0);
            }
            eprintln!("{name} {mode} {text:?}: {exact}/{} greedy steps agree exactly", greedy.len());
            assert!(
                exact * 4 >= greedy.len() * 3,
                "{name} {mode} {text:?}: only {exact}/{} greedy steps agree",
                greedy.len()
            );
        }
    }
}

fn check_top1_agreement(r: &Real, name: &str) {
    // Dense and quantized agree on the next token at (nearly) every position of every prompt.
    let (mut agree, mut total) = (0, 0);
    for p in r.fixture["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = ids_of(&p["ids"]).into_iter().chain(ids_of(&p["greedy"])).collect();
        let a = all_logits(&r.dense, &ids).argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let b = all_logits(&r.quant, &ids).argmax(1).unwrap().to_vec1::<u32>().unwrap();
        agree += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        total += a.len();
    }
    let rate = agree as f64 / total as f64;
    eprintln!("{name}: dense and quantized top-1 agree at {agree}/{total} positions ({:.1}%)", 100.0 * rate);
    assert!(rate >= 0.95, "{name}: dense/quantized top-1 agreement {rate:.3} < 0.95 (measured 0.985)");
}

#[test]
fn smollm2_matches_llama_cpp() {
    let r = real("smollm2", "smollm2-135m-instruct-q4_1.llamacpp.json");
    check_tokenizer(&r);
    check_logits(&r, "smollm2");
    check_top1_agreement(&r, "smollm2");
    // The classic smoke test, through the generation API and the real tokenizer.
    let prompt = r.quant.encode("The capital of France is", true).unwrap();
    for m in [&r.dense, &r.quant] {
        let out = generate::greedy(&m.model, &prompt, 4, &m.special.stop, None).unwrap();
        assert!(m.decode(&out).unwrap().starts_with(" Paris"), "got {:?}", m.decode(&out));
    }
}

#[test]
fn qwen05b_matches_llama_cpp() {
    let r = real("qwen0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.llamacpp.json");
    check_tokenizer(&r);
    check_logits(&r, "qwen0.5b");
    check_top1_agreement(&r, "qwen0.5b");
}

#[test]
fn smollm2_exports_to_an_equivalent_hugging_face_directory() {
    let m = shared::assets::find_model("smollm2").unwrap();
    let gguf = load_model(&m.path(), WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let dir = std::env::temp_dir().join(format!("verdict-hf-export-{}", std::process::id()));
    models::hf::save_dir(&gguf, &dir).unwrap();
    let hf = load_model(&dir, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(hf.model.config(), gguf.model.config());
    assert_eq!(hf.special, gguf.special);
    assert_eq!(hf.chat, gguf.chat);
    let text =
        "<|im_start|>user\nIs \"a gorgeous, witty, seductive movie\" positive?<|im_end|>\n<|im_start|>assistant\n";
    let ids = gguf.encode(text, true).unwrap();
    assert_eq!(hf.encode(text, true).unwrap(), ids);
    let d = (all_logits(&gguf, &ids) - all_logits(&hf, &ids))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "same f32 weights must give identical logits");
    // Quantized mode from a Hugging Face directory quantizes projections to Q8_0.
    let q = load_model(&dir, WeightMode::Quantized, DType::F32, &Device::Cpu).unwrap();
    let a = all_logits(&gguf, &ids).argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let b = all_logits(&q, &ids).argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(agree * 10 >= a.len() * 9, "Q8_0 from HF dir agrees on {agree}/{} top-1 tokens", a.len());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Input of the PEFT interop fixtures: a chat-formatted sentiment question for SmolLM2.
fn peft_fixture_ids(m: &LoadedModel) -> Vec<u32> {
    let text = m
        .chat_prompt(
            "Is this review positive or negative? \"A gorgeous, witty, seductive movie.\"",
            Some("You are a helpful assistant."),
        )
        .unwrap();
    m.encode(&text, true).unwrap()
}

/// Top-20 (id, logit) at each of the last 4 positions.
fn top_logits(m: &LoadedModel, adapter: Option<&models::LoraAdapter>, ids: &[u32]) -> Vec<Vec<(u32, f32)>> {
    let logits = adapted_logits(m, adapter, ids);
    (ids.len() - 4..ids.len())
        .map(|p| {
            let row: Vec<f32> = logits.get(p).unwrap().to_vec1().unwrap();
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            idx[..20].iter().map(|&i| (i as u32, row[i])).collect()
        })
        .collect()
}

/// Writes `tests/fixtures/peft/verdict_adapter` (an adapter written by Verdict) and our logits
/// with it, for `scripts/fixtures/make_peft_fixtures.py` to check with PEFT. Run once:
/// `cargo test -p models --test real_models write_verdict_adapter_fixture -- --ignored`.
#[test]
#[ignore = "writes the Verdict-side PEFT fixture; run by hand, then run scripts/fixtures/make_peft_fixtures.py"]
fn write_verdict_adapter_fixture() {
    use rand::{Rng, SeedableRng};
    let m = shared::assets::find_model("smollm2").unwrap();
    let loaded = load_model(&m.path(), WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let cfg = loaded.model.config().clone();
    let lora = models::LoraConfig {
        rank: 4,
        alpha: 8.0,
        use_rslora: false,
        dropout: 0.0,
        targets: vec![models::Projection::Q, models::Projection::V, models::Projection::O, models::Projection::Down],
        layers: None,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2024);
    let mut tensors = std::collections::BTreeMap::new();
    for layer in 0..cfg.num_layers {
        for &p in &lora.targets {
            let (out, inp) = p.dims(&cfg);
            let mut rand_t = |rows: usize, cols: usize, bound: f32| {
                let v: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-bound..bound)).collect();
                Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
            };
            tensors.insert(models::lora::peft_tensor_name(layer, p, 'A'), rand_t(4, inp, 1.0 / (inp as f32).sqrt()));
            tensors.insert(models::lora::peft_tensor_name(layer, p, 'B'), rand_t(out, 4, 0.05));
        }
    }
    let adapter = models::LoraAdapter::from_tensors(lora, &cfg, &tensors).unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft");
    adapter.save_peft_dir(&dir.join("verdict_adapter"), "smollm2-135m-instruct (verdict-train export-hf)").unwrap();
    let ids = peft_fixture_ids(&loaded);
    let json = serde_json::json!({
        "input_ids": ids,
        "positions": (ids.len() - 4..ids.len()).collect::<Vec<_>>(),
        "verdict_top20": top_logits(&loaded, Some(&adapter), &ids),
        "verdict_base_top20": top_logits(&loaded, None, &ids),
    });
    std::fs::write(dir.join("verdict_logits.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// Measured agreement with PEFT (f32 both sides): 3.3e-5 with the adapter, 4.4e-5 without.
const PEFT_TOL: f32 = 1e-3;

fn fixture_json(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Our logits at the fixture's positions and ids against the reference's.
fn check_against(
    m: &LoadedModel,
    adapter: Option<&models::LoraAdapter>,
    ids: &[u32],
    positions: &[usize],
    want: &[Vec<(u32, f32)>],
    what: &str,
) {
    let logits = adapted_logits(m, adapter, ids);
    for (&p, want) in positions.iter().zip(want) {
        let row: Vec<f32> = logits.get(p).unwrap().to_vec1().unwrap();
        for &(id, logit) in want {
            let d = (row[id as usize] - logit).abs();
            assert!(d <= PEFT_TOL, "{what}: position {p} id {id}: ours {} vs {logit}", row[id as usize]);
        }
        let top = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        assert_eq!(top, want[0].0, "{what}: top-1 at position {p}");
    }
}

fn pairs(v: &Value) -> Vec<Vec<(u32, f32)>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|pos| {
            pos.as_array()
                .unwrap()
                .iter()
                .map(|e| (e[0].as_u64().unwrap() as u32, e[1].as_f64().unwrap() as f32))
                .collect()
        })
        .collect()
}

#[test]
fn peft_made_adapter_gives_peft_logits() {
    let m = shared::assets::find_model("smollm2").unwrap();
    let loaded = load_model(&m.path(), WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let fx = fixture_json("peft_logits.json");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft/peft_adapter");
    let adapter = models::LoraAdapter::load_peft_dir(&dir, loaded.model.config(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(adapter.config().layers, Some(vec![0, 1, 14, 28, 29]));
    assert!(adapter.config().use_rslora && adapter.config().rank == 8);
    let ids = ids_of(&fx["input_ids"]);
    let positions: Vec<usize> =
        fx["positions"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    check_against(&loaded, Some(&adapter), &ids, &positions, &pairs(&fx["peft_top20"]), "PEFT adapter");
    check_against(&loaded, None, &ids, &positions, &pairs(&fx["peft_base_top20"]), "base");
}

#[test]
fn verdict_written_adapter_gives_the_logits_peft_computed() {
    let m = shared::assets::find_model("smollm2").unwrap();
    let loaded = load_model(&m.path(), WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let ours = fixture_json("verdict_logits.json");
    let peft = fixture_json("verdict_adapter_checked_by_peft.json");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft/verdict_adapter");
    let adapter = models::LoraAdapter::load_peft_dir(&dir, loaded.model.config(), DType::F32, &Device::Cpu).unwrap();
    let ids = ids_of(&ours["input_ids"]);
    assert_eq!(ids, ids_of(&peft["input_ids"]));
    let positions: Vec<usize> =
        ours["positions"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    // PEFT's logits at the ids we listed when we wrote the adapter.
    let want = |ours_key: &str, peft_key: &str| -> Vec<Vec<(u32, f32)>> {
        pairs(&ours[ours_key])
            .iter()
            .zip(peft[peft_key].as_array().unwrap())
            .map(|(ids, logits)| {
                ids.iter()
                    .zip(logits.as_array().unwrap())
                    .map(|(&(id, _), l)| (id, l.as_f64().unwrap() as f32))
                    .collect()
            })
            .collect()
    };
    check_against(
        &loaded,
        Some(&adapter),
        &ids,
        &positions,
        &want("verdict_top20", "peft_logits_at_verdict_ids"),
        "Verdict adapter in PEFT",
    );
    check_against(
        &loaded,
        None,
        &ids,
        &positions,
        &want("verdict_base_top20", "peft_base_logits_at_verdict_ids"),
        "base in PEFT",
    );
}
