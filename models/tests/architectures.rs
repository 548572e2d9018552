//! Every decoder family and rotary scaling against transformers 5.24: tiny seeded checkpoints
//! in `tests/fixtures/arch/` (made by `scripts/fixtures/make_arch_fixtures.py`), loaded through
//! the normal Hugging Face path, give transformers' logits and greedy tokens on every forward
//! path (inference and training, our CPU kernels and candle's, packed weights, padded
//! batches, the KV cache), also when written as GGUF files the way llama.cpp's converter
//! does. Rope types Verdict does not implement are refused by name.

use candle_core::{DType, Device, Tensor};
use models::cpu::{Caps, CpuKernels, Precision, Purpose};
use models::{generate, load_model, Decoder, LoadOptions, LogitsAt, Mode, Padding, TokenBatch, WeightMode};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Every fixture directory: Llama with llama3 / linear / YaRN scaling (saved by transformers 5),
/// a Llama 3.2-style transformers-4 `config.json`, Mistral with a 24-key window over 40
/// tokens, Qwen3 with per-head q/k norms and 24-wide heads, Gemma 2 (soft-capped scores and
/// logits, `query_pre_attn_scalar`, sliding and full layers) and Gemma 3 (q/k norms, its own
/// rotary settings per layer type).
const FIXTURES: [&str; 8] =
    ["llama_llama3", "llama_linear", "llama_yarn", "llama_llama3_t4", "mistral", "qwen3", "gemma2", "gemma3"];

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

/// The largest difference between `model`'s logits and `other`'s over every case.
fn logits_gap(model: &Decoder, other: &Decoder, r: &Reference) -> f32 {
    let logits = |m: &Decoder, ids: &[u32]| -> Tensor {
        m.forward(&TokenBatch::single(ids).unwrap(), None, None, Mode::Inference, LogitsAt::All)
            .unwrap()
            .logits
            .unwrap()
    };
    r.cases
        .iter()
        .map(|c| {
            let d = (logits(model, &c.ids) - logits(other, &c.ids)).unwrap().abs().unwrap();
            d.max_all().unwrap().to_scalar::<f32>().unwrap()
        })
        .fold(0f32, f32::max)
}

#[test]
fn quantized_weights_run_on_one_int8_matrix_each_from_their_own_pack() {
    let Ok(int8) = CpuKernels::with_caps(Precision::Int8, Caps::detect()) else {
        eprintln!("skipped: no int8 kernels on this CPU ({})", Caps::detect().describe());
        return;
    };
    for name in ["llama_llama3", "qwen3"] {
        let dir = temp_dir(&format!("quantized-{name}"));
        copy_dir(&fixture(name), &dir);
        let r = reference(&dir);
        // The reference: the same Q8_0 blocks through candle's quantized kernels.
        let mut blocks = load_model(&dir, WeightMode::Quantized, DType::F32, &Device::Cpu).unwrap().model;
        blocks.set_kernels(CpuKernels::portable());
        let scale = r.cases.iter().flat_map(|c| c.last.iter()).fold(0f32, |m, v| m.max(v.abs()));
        let opts = |mode| LoadOptions {
            mode,
            dtype: DType::F32,
            device: Device::Cpu,
            kernels: int8.clone(),
            purpose: Purpose::Serve,
            cache_dir: dir.join("cache"),
        };
        for load in ["packing", "mapped"] {
            let mut log = Vec::new();
            let loaded =
                models::load_model_with(&dir, &opts(WeightMode::Quantized), &mut |l| log.push(l.to_string())).unwrap();
            assert!(
                log.iter().any(|l| l.contains("int8 (one matrix per weight)") && l.contains("int8-alone.pack")),
                "{name}, {load}: {log:?}"
            );
            // One int8 matrix of Q8_0 values: within 1/254 of each row's peak of the blocks.
            let gap = logits_gap(&loaded.model, &blocks, &r);
            assert!(gap > 0.0, "{name}, {load}: equal to candle's Q8_0 product bit for bit: not our kernels");
            assert!(gap < 0.02 * scale, "{name}, {load}: logits {gap} from the Q8_0 blocks' (scale {scale})");
            for (i, case) in r.cases.iter().enumerate() {
                let out = loaded.model.forward(
                    &TokenBatch::single(&case.ids).unwrap(),
                    None,
                    None,
                    Mode::Inference,
                    LogitsAt::All,
                );
                let d = worst_diff(&out.unwrap().logits.unwrap().squeeze(0).unwrap(), case, &r.logits_ids);
                assert!(d < 0.05 * scale, "{name}, {load}: case {i}: {d} from transformers' f32 (scale {scale})");
            }
        }
        // One byte per weight: the projections take half of what dense int8 (with residuals) takes.
        let dense = models::load_model_with(&dir, &opts(WeightMode::Dense), &mut |_| {}).unwrap();
        let pack = |file: &str| std::fs::metadata(dir.with_extension("verdict").join(file)).unwrap().len();
        let (alone, with) = (pack("int8-alone.pack"), pack("int8.pack"));
        assert!(alone < with, "{name}: int8-alone.pack {alone} bytes, int8.pack {with}");
        assert!(logits_gap(&dense.model, &blocks, &r) > 0.0);
        std::fs::remove_dir_all(&dir).unwrap();
        let _ = std::fs::remove_dir_all(dir.with_extension("verdict"));
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

/// The GGUF name of a Hugging Face tensor name (llama.cpp's).
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, suffix) = rest.rsplit_once('.').unwrap();
    let module = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{module}.{suffix}")
}

/// llama.cpp's interleaved rotary row order of a Llama Q/K weight (its converter's `permute`).
fn permute_rows(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    let (hd, half) = (rows / heads, rows / heads / 2);
    let idx: Vec<u32> = (0..rows).map(|r| (r / hd * hd + (r % hd) % 2 * half + (r % hd) / 2) as u32).collect();
    let out = t.index_select(&Tensor::new(idx.as_slice(), t.device()).unwrap(), 0).unwrap();
    assert_eq!(out.dims2().unwrap(), (rows, cols));
    out
}

/// The fixture `name` written as a GGUF file the way llama.cpp's converter would: float32
/// tensors, Llama Q/K rows interleaved, Llama 3 scaling as a `rope_freqs.weight` table.
fn gguf_of(name: &str, path: &Path) {
    use candle_core::quantized::gguf_file::Value as V;
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = fixture(name);
    let cfg = models::read_config(&dir).unwrap();
    let arch = cfg.arch.name();
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(n, t)| {
            let t = match (cfg.arch, n.ends_with("q_proj.weight"), n.ends_with("k_proj.weight")) {
                (models::Arch::Llama, true, _) => permute_rows(t, cfg.num_heads),
                (models::Arch::Llama, _, true) => permute_rows(t, cfg.num_kv_heads),
                _ => t.clone(),
            };
            (gguf_name(n), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    if let models::config::RopeScaling::Llama3 {
        factor,
        low_freq_factor: lff,
        high_freq_factor: hff,
        original_max_position_embeddings: old,
    } = cfg.rope_scaling
    {
        // convert_hf_to_gguf.py's Llama 3 rope_factors.
        let old = old as f64;
        let d = cfg.head_dim as f64;
        let factors: Vec<f32> = (0..cfg.head_dim / 2)
            .map(|i| {
                let wavelen = 2.0 * std::f64::consts::PI * cfg.rope_theta.powf(2.0 * i as f64 / d);
                let f = if wavelen < old / hff {
                    1.0
                } else if wavelen > old / lff {
                    factor
                } else {
                    let smooth = (old / wavelen - lff) / (hff - lff);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                f as f32
            })
            .collect();
        let t = Tensor::new(factors.as_slice(), &Device::Cpu).unwrap();
        tensors.push(("rope_freqs.weight".into(), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let u = |x: usize| V::U32(x as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let metadata: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        (key("embedding_length"), u(cfg.hidden_size)),
        (key("feed_forward_length"), u(cfg.intermediate_size)),
        (key("block_count"), u(cfg.num_layers)),
        (key("attention.head_count"), u(cfg.num_heads)),
        (key("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (key("attention.key_length"), u(cfg.head_dim)),
        (key("attention.value_length"), u(cfg.head_dim)),
        (key("rope.freq_base"), V::F32(cfg.rope_theta as f32)),
        (key("attention.layer_norm_rms_epsilon"), V::F32(cfg.rms_norm_eps as f32)),
        (key("context_length"), u(cfg.max_position_embeddings)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), V::Array((0..cfg.vocab_size).map(|i| V::String(format!("w{i}"))).collect())),
        ("tokenizer.ggml.merges".into(), V::Array(Vec::new())),
        ("tokenizer.ggml.token_type".into(), V::Array(vec![V::I32(1); cfg.vocab_size])),
    ];
    let md: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md, &ts).unwrap();
}

#[test]
fn gguf_files_match_transformers() {
    // Llama 3 scaling as llama.cpp stores it (rope_freqs.weight, interleaved Q/K rows), and
    // Qwen3 (attn_q_norm / attn_k_norm, attention.key_length).
    for name in ["llama_llama3", "qwen3"] {
        let dir = temp_dir(&format!("gguf-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.gguf"));
        gguf_of(name, &path);
        let loaded = load_model(&path, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
        let r = reference(&fixture(name));
        for mode in [Mode::Inference, Mode::Train { dropout_seed: None }] {
            check_logits(&loaded.model, &r, mode, &format!("{name}.gguf, {mode:?}"));
        }
        check_greedy(&loaded.model, &r, &format!("{name}.gguf"));
        std::fs::remove_dir_all(&dir).unwrap();
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
