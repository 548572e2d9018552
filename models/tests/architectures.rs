//! Every decoder family and rotary scaling against transformers 5.24: tiny seeded checkpoints
//! in `tests/fixtures/arch/` (made by `scripts/fixtures/make_arch_fixtures.py`), loaded through
//! the normal Hugging Face path, give transformers' logits and greedy tokens on every forward
//! path (inference and training, our CPU kernels and candle's, packed weights, padded
//! batches, the KV cache). Rope types Verdict does not implement are refused by name.

use candle_core::{DType, Device, Tensor};
use models::cpu::{CpuKernels, Purpose};
use models::{generate, load_model, Decoder, LoadOptions, LogitsAt, Mode, Padding, TokenBatch, WeightMode};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Every fixture directory: Llama with llama3 / linear / YaRN scaling (saved by transformers 5),
/// a Llama 3.2-style transformers-4 `config.json`, Mistral with a 24-key window over 40
/// tokens, Qwen3 with per-head q/k norms and 24-wide heads.
const FIXTURES: [&str; 6] = ["llama_llama3", "llama_linear", "llama_yarn", "llama_llama3_t4", "mistral", "qwen3"];

/// Max abs logit difference to transformers (f32 on both sides; logits are of order 10). The
/// rotary tables are computed in f64 here and in f32 there; measured worst: 1.4e-5 (YaRN).
const LOGIT_TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch").join(name)
}

struct Case {
    ids: Vec<u32>,
    /// `[position][k]`: the logit of `logits_ids[k]` at each position.
    at_ids: Vec<Vec<f32>>,
    last: Vec<f32>,
    greedy: Vec<u32>,
}

struct Reference {
    logits_ids: Vec<usize>,
    cases: Vec<Case>,
}

fn reference(dir: &Path) -> Reference {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let nums = |x: &Value| -> Vec<f64> { x.as_array().unwrap().iter().map(|n| n.as_f64().unwrap()).collect() };
    let cases = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            ids: nums(&c["ids"]).into_iter().map(|x| x as u32).collect(),
            at_ids: c["logits_at_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| nums(row).into_iter().map(|x| x as f32).collect())
                .collect(),
            last: nums(&c["last_logits"]).into_iter().map(|x| x as f32).collect(),
            greedy: nums(&c["greedy"]).into_iter().map(|x| x as u32).collect(),
        })
        .collect();
    Reference { logits_ids: nums(&v["logits_ids"]).into_iter().map(|x| x as usize).collect(), cases }
}

/// The largest difference between `logits` (`[seq, vocab]` of `case.ids`) and the reference.
fn worst_diff(logits: &Tensor, case: &Case, ids: &[usize]) -> f32 {
    let l: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    assert_eq!(l.len(), case.ids.len());
    let mut worst = 0f32;
    for (row, want) in l.iter().zip(&case.at_ids) {
        for (&id, &w) in ids.iter().zip(want) {
            worst = worst.max((row[id] - w).abs());
        }
    }
    for (g, w) in l.last().unwrap().iter().zip(&case.last) {
        worst = worst.max((g - w).abs());
    }
    worst
}

/// Checks one model on every case, alone and as one left-padded batch; returns the worst
/// difference seen.
fn check_logits(model: &Decoder, r: &Reference, mode: Mode, what: &str) -> f32 {
    let mut worst = 0f32;
    for (i, case) in r.cases.iter().enumerate() {
        let out = model.forward(&TokenBatch::single(&case.ids).unwrap(), None, None, mode, LogitsAt::All).unwrap();
        let d = worst_diff(&out.logits.unwrap().squeeze(0).unwrap(), case, &r.logits_ids);
        assert!(d < LOGIT_TOL, "{what}: case {i}: logits differ from transformers by {d}");
        worst = worst.max(d);
    }
    let seqs: Vec<Vec<u32>> = r.cases.iter().map(|c| c.ids.clone()).collect();
    let batch = TokenBatch::new(&seqs, 0, Padding::Left).unwrap();
    let all = model.forward(&batch, None, None, mode, LogitsAt::All).unwrap().logits.unwrap();
    for (i, case) in r.cases.iter().enumerate() {
        let row = all.get(i).unwrap().narrow(0, batch.seq_len() - case.ids.len(), case.ids.len()).unwrap();
        let d = worst_diff(&row, case, &r.logits_ids);
        assert!(d < LOGIT_TOL, "{what}: case {i} in a padded batch: logits differ from transformers by {d}");
        worst = worst.max(d);
    }
    worst
}

/// Greedy decoding with the KV cache gives transformers' tokens.
fn check_greedy(model: &Decoder, r: &Reference, what: &str) {
    for (i, case) in r.cases.iter().enumerate() {
        let got = generate::greedy(model, &case.ids, case.greedy.len(), &[], None).unwrap();
        assert_eq!(got, case.greedy, "{what}: case {i}: greedy tokens");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("verdict-arch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn every_family_and_rope_scaling_matches_transformers() {
    for name in FIXTURES {
        let dir = fixture(name);
        let r = reference(&dir);
        let mut loaded = load_model(&dir, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
        let mut worst = 0f32;
        for (kernels, k) in [(CpuKernels::auto(), "our kernels"), (CpuKernels::portable(), "candle's kernels")] {
            loaded.model.set_kernels(kernels);
            for mode in [Mode::Inference, Mode::Train { dropout_seed: None }] {
                worst = worst.max(check_logits(&loaded.model, &r, mode, &format!("{name}, {k}, {mode:?}")));
            }
            check_greedy(&loaded.model, &r, &format!("{name}, {k}"));
        }
        eprintln!("{name}: worst logit difference to transformers {worst:.2e}");
    }
}

#[test]
fn packed_weights_match_transformers() {
    let kernels = CpuKernels::auto();
    if !kernels.enabled() {
        eprintln!("skipped: our kernels do not run on this CPU");
        return;
    }
    for name in FIXTURES {
        // A copy: the pack file is written beside the model.
        let dir = temp_dir(name);
        copy_dir(&fixture(name), &dir);
        let opts = LoadOptions {
            mode: WeightMode::Dense,
            dtype: DType::F32,
            device: Device::Cpu,
            kernels: kernels.clone(),
            purpose: Purpose::Evaluate,
            cache_dir: dir.join("cache"),
        };
        let r = reference(&dir);
        // The first load writes the pack, the second maps it.
        for load in ["packing", "mapped"] {
            let mut log = Vec::new();
            let loaded = models::load_model_with(&dir, &opts, &mut |l| log.push(l.to_string())).unwrap();
            assert!(log.iter().any(|l| l.contains("weights:")), "{name}: {log:?}");
            check_logits(&loaded.model, &r, Mode::Inference, &format!("{name}, {load} pack"));
            check_greedy(&loaded.model, &r, &format!("{name}, {load} pack"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn exported_directories_load_back_the_same() {
    for name in FIXTURES {
        let dir = fixture(name);
        let r = reference(&dir);
        let loaded = load_model(&dir, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
        let out = temp_dir(&format!("export-{name}"));
        models::hf::save_dir(&loaded, &out).unwrap();
        let back = load_model(&out, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.model.config(), loaded.model.config(), "{name}");
        check_logits(&back.model, &r, Mode::Inference, &format!("{name}, exported"));
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// A copy of the llama3 fixture whose `config.json` is changed by `edit`.
fn edited(tag: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = temp_dir(tag);
    copy_dir(&fixture("llama_llama3"), &dir);
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    match load_model(dir, WeightMode::Dense, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_rope_types_are_refused_by_name() {
    for kind in ["dynamic", "longrope", "su", "proportional"] {
        // transformers 5 form, and transformers 4 with the old `type` key.
        let t5 = edited(&format!("{kind}-t5"), |v| v["rope_parameters"]["rope_type"] = kind.into());
        let t4 = edited(&format!("{kind}-t4"), |v| {
            v.as_object_mut().unwrap().remove("rope_parameters");
            v["rope_theta"] = 500.0.into();
            v["rope_scaling"] = serde_json::json!({"type": kind, "factor": 2.0});
        });
        for dir in [t5, t4] {
            let e = load_error(&dir);
            assert!(e.contains(&format!("rope type {kind:?} is not supported")), "{kind}: {e}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn ignoring_the_rope_scaling_would_be_caught() {
    // The fixtures are sensitive to what this file checks: the same weights with the scaling
    // dropped from config.json miss transformers' logits by far more than the tolerance.
    for name in ["llama_llama3", "llama_linear", "llama_yarn", "llama_llama3_t4"] {
        let dir = temp_dir(&format!("unscaled-{name}"));
        copy_dir(&fixture(name), &dir);
        let path = dir.join("config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let theta = v["rope_parameters"]["rope_theta"].as_f64().or(v["rope_theta"].as_f64()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.remove("rope_scaling");
        o.insert("rope_theta".into(), theta.into());
        std::fs::write(&path, v.to_string()).unwrap();
        let r = reference(&fixture(name));
        let loaded = load_model(&dir, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
        let case = &r.cases[0];
        let out =
            loaded.model.forward(&TokenBatch::single(&case.ids).unwrap(), None, None, Mode::Inference, LogitsAt::All);
        let d = worst_diff(&out.unwrap().logits.unwrap().squeeze(0).unwrap(), case, &r.logits_ids);
        assert!(d > 100.0 * LOGIT_TOL, "{name}: without its scaling the logits move only {d}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
