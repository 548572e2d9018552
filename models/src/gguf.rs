//! GGUF files: hyper-parameters, tokenizer and weights all from the file, read through a
//! memory map.

use crate::config::{Arch, DecoderConfig, GemmaSettings, RopeScaling};
use crate::decoder::Decoder;
use crate::linear::{qtensor_to_device, BaseWeight};
use crate::loaded::{LoadedModel, ModelMeta, SpecialTokens};
use crate::tokenizer::{self, GgufVocab};
use crate::weights::{WeightMap, WeightMode};
use crate::Error;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, QTensor};
use candle_core::{DType, Device};
use shared::chat::ChatTemplate;
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
}

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value, Error> {
        self.map.get(key).ok_or_else(|| Error::Format(format!("GGUF metadata has no {key}")))
    }
    fn usize(&self, key: &str) -> Result<usize, Error> {
        let v = self.get(key)?;
        Ok(v.to_u64().or_else(|_| v.to_u32().map(u64::from)).or_else(|_| v.to_i32().map(|x| x as u64))? as usize)
    }
    fn f64(&self, key: &str) -> Result<f64, Error> {
        let v = self.get(key)?;
        Ok(v.to_f32().map(f64::from).or_else(|_| v.to_f64())?)
    }
    fn string(&self, key: &str) -> Result<String, Error> {
        Ok(self.get(key)?.to_string()?.clone())
    }
    fn strings(&self, key: &str) -> Result<Vec<String>, Error> {
        self.get(key)?.to_vec()?.iter().map(|v| Ok(v.to_string()?.clone())).collect()
    }
    fn opt_u32(&self, key: &str) -> Option<u32> {
        self.map.get(key).and_then(|v| v.to_u32().ok())
    }
}

/// What [`config`] needs from a GGUF file besides its metadata.
struct Tensors {
    vocab_size: usize,
    /// An `output.weight` (an untied LM head).
    has_output: bool,
    /// A `blk.0.attn_q.bias` (q/k/v biases).
    has_qkv_bias: bool,
    /// The values of `rope_freqs.weight`, if any.
    rope_freqs: Option<Vec<f32>>,
}

/// The architecture a GGUF file names, among those it can carry (Mistral GGUFs are `llama`
/// files; llama.cpp names Gemma 3 `gemma3` where transformers says `gemma3_text`).
fn gguf_arch(name: &str) -> Option<Arch> {
    match name {
        "llama" => Some(Arch::Llama),
        "qwen2" => Some(Arch::Qwen2),
        "qwen3" => Some(Arch::Qwen3),
        "gemma2" => Some(Arch::Gemma2),
        "gemma3" => Some(Arch::Gemma3),
        _ => None,
    }
}

/// The decoder hyper-parameters in a GGUF file's metadata. Rotary scaling as llama.cpp reads
/// it: `rope.scaling.type` (`linear` when absent) with `rope.scaling.factor` (or the older
/// `rope.scale_linear`), and a `rope_freqs.weight` table of per-frequency divisors (Llama 3);
/// YaRN and every other type are refused. Gemma's settings as [`gemma_settings`] reads them.
fn config(md: &Metadata, t: &Tensors) -> Result<DecoderConfig, Error> {
    let arch_name = md.string("general.architecture")?;
    // A Qwen2/Qwen3/Gemma file keeps Hugging Face's Q/K row order; a Llama file does not.
    let arch = gguf_arch(&arch_name).ok_or_else(|| {
        Error::Format(format!(
            "GGUF architecture {arch_name:?} is not supported (llama, qwen2, qwen3, gemma2, gemma3 are)"
        ))
    })?;
    let a = |k: &str| format!("{arch_name}.{k}");
    let window_key = a("attention.sliding_window");
    if !arch.is_gemma() && md.map.contains_key(&window_key) {
        return Err(Error::Format(format!("GGUF: {window_key} (sliding-window attention) is not supported")));
    }
    let hidden_size = md.usize(&a("embedding_length"))?;
    let num_heads = md.usize(&a("attention.head_count"))?;
    if num_heads == 0 {
        return Err(Error::Format(format!("GGUF: {} is 0", a("attention.head_count"))));
    }
    // Qwen3 heads need not be hidden / heads wide: llama.cpp writes `attention.key_length`.
    let rotary_dims = md.usize(&a("rope.dimension_count")).ok();
    let head_dim = md.usize(&a("attention.key_length")).ok().or(rotary_dims).unwrap_or(hidden_size / num_heads);
    if let Some(r) = rotary_dims.filter(|&r| r != head_dim) {
        return Err(Error::Format(format!(
            "GGUF: rotary embedding over {r} of {head_dim} head dimensions (partial rotary) is not supported"
        )));
    }
    let scaling_type = a("rope.scaling.type");
    let kind = if md.map.contains_key(&scaling_type) { md.string(&scaling_type)? } else { "linear".into() };
    let factor = md.f64(&a("rope.scaling.factor")).or_else(|_| md.f64(&a("rope.scale_linear"))).unwrap_or(0.0);
    let factor = match kind.as_str() {
        "none" => 1.0,
        "linear" if factor == 0.0 => 1.0,
        "linear" => factor,
        other => {
            return Err(Error::Format(format!(
                "GGUF: {scaling_type} {other:?} is not supported (none and linear are; load the Hugging Face \
                 directory for yarn)"
            )))
        }
    };
    // llama.cpp divides frequency i by rope_freqs[i] and multiplies every one by 1 / factor.
    let rope_scaling = match &t.rope_freqs {
        Some(freqs) => RopeScaling::FreqFactors { factors: freqs.iter().map(|&x| f64::from(x) * factor).collect() },
        None if factor == 1.0 => RopeScaling::Default,
        None => RopeScaling::Linear { factor },
    };
    let num_layers = md.usize(&a("block_count"))?;
    let rope_theta = md.f64(&a("rope.freq_base")).unwrap_or(10_000.0);
    let (sliding_window, gemma) = if arch.is_gemma() {
        let global = (rope_theta, rope_scaling.clone());
        let (window, settings) =
            gemma_settings(md, (arch, &arch_name), num_layers, hidden_size / num_heads, head_dim, global)?;
        (Some(window), Some(settings))
    } else {
        (None, None)
    };
    let cfg = DecoderConfig {
        arch,
        vocab_size: t.vocab_size,
        hidden_size,
        intermediate_size: md.usize(&a("feed_forward_length"))?,
        num_layers,
        num_heads,
        num_kv_heads: md.usize(&a("attention.head_count_kv")).unwrap_or(num_heads),
        head_dim,
        rope_theta,
        rope_scaling,
        rms_norm_eps: md.f64(&a("attention.layer_norm_rms_epsilon"))?,
        max_position_embeddings: md.usize(&a("context_length"))?,
        tie_word_embeddings: !t.has_output,
        attention_bias: t.has_qkv_bias,
        sliding_window,
        gemma,
    };
    cfg.validate().map_err(Error::GgufConfig)?;
    Ok(cfg)
}

/// Gemma 2 / 3 settings as llama.cpp reads a GGUF (`llama-model.cpp`, `llama-hparams.cpp`),
/// and the sliding window. Sliding layers: `attention.sliding_window_pattern` where the file has
/// it (a period `n`: layer `i` slides unless `i % n == n - 1`; or one bool per layer), else
/// llama.cpp's fixed periods, 2 for Gemma 2 (even layers slide) and 6 for Gemma 3 (every sixth
/// sees every key), which are also transformers' defaults. Attention scores scale by
/// `head_dim^-1/2`, but by `(hidden / heads)^-1/2` for the 27B models (46 Gemma 2 layers, 62 Gemma
/// 3 layers): a GGUF has no `query_pre_attn_scalar`, and that is llama.cpp's rule (it equals the
/// released checkpoints' value). Soft-capping from `attn_logit_softcapping` /
/// `final_logit_softcapping`. Gemma 3's sliding layers rotate with base 10,000 and no scaling
/// (llama.cpp's fixed `rope_freq_base_train_swa`), its full layers with the file's rotary
/// settings; Gemma 2's layers all use the file's.
fn gemma_settings(
    md: &Metadata,
    (arch, arch_name): (Arch, &str),
    num_layers: usize,
    hidden_per_head: usize,
    head_dim: usize,
    global_rope: (f64, RopeScaling),
) -> Result<(usize, GemmaSettings), Error> {
    let a = |k: &str| format!("{arch_name}.{k}");
    let window = md.usize(&a("attention.sliding_window"))?;
    let pattern_key = a("attention.sliding_window_pattern");
    let sliding_layers = match md.map.get(&pattern_key) {
        Some(Value::Array(flags)) => {
            let flags: Vec<bool> = flags.iter().map(|v| v.to_bool()).collect::<Result<_, _>>()?;
            if flags.len() != num_layers {
                return Err(Error::Format(format!(
                    "GGUF: {pattern_key} has {} entries for {num_layers} layers",
                    flags.len()
                )));
            }
            flags
        }
        Some(_) => period_pattern(md.usize(&pattern_key)?, num_layers),
        None => period_pattern(if arch == Arch::Gemma2 { 2 } else { 6 }, num_layers),
    };
    let large = matches!((arch, num_layers), (Arch::Gemma2, 46) | (Arch::Gemma3, 62));
    let cap = |key: &str| md.map.contains_key(&a(key)).then(|| md.f64(&a(key))).transpose();
    let (local_rope_theta, local_rope_scaling) = match arch {
        Arch::Gemma3 => (10_000.0, RopeScaling::Default),
        _ => global_rope,
    };
    Ok((
        window,
        GemmaSettings {
            sliding_layers,
            local_rope_theta,
            local_rope_scaling,
            query_pre_attn_scalar: if large { hidden_per_head } else { head_dim } as f64,
            attn_logit_softcapping: cap("attn_logit_softcapping")?,
            final_logit_softcapping: cap("final_logit_softcapping")?,
        },
    ))
}

/// Layer `i` slides unless it ends a period of `n` (`n = 0`: every layer slides), as
/// llama.cpp's `set_swa_pattern`.
fn period_pattern(n: usize, layers: usize) -> Vec<bool> {
    (0..layers).map(|i| n == 0 || i % n < n - 1).collect()
}

/// Hugging Face name of a GGUF tensor of an `arch` file (Gemma's four norms per layer are
/// `attn_norm`, `post_attention_norm`, `ffn_norm`, `post_ffw_norm`; the others' two).
fn hf_name(gguf: &str, arch: Arch) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" if arch.is_gemma() => "pre_feedforward_layernorm",
        "post_attention_norm" if arch.is_gemma() => "post_attention_layernorm",
        "post_ffw_norm" if arch.is_gemma() => "post_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

/// Undoes llama.cpp's rotary row order for Llama Q/K (`w.reshape(heads, hd/2, 2, in)
/// .swap(1, 2)`), so the weights are in Hugging Face order and work with half-rotation
/// rope and PEFT adapters. Works on the raw rows, so quantized blocks stay as they are.
fn unpermute_rows(t: &QTensor, heads: usize, device: &Device) -> Result<QTensor, Error> {
    let dims = t.shape().dims().to_vec();
    let rows = dims[0];
    if !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(Error::Format(format!("cannot split {rows} rows into {heads} rotary heads")));
    }
    let hd = rows / heads;
    let half = hd / 2;
    let raw = t.data()?;
    let row_bytes = raw.len() / rows;
    let mut out = vec![0u8; raw.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let dst = h * hd + s * half + j;
                let src = h * hd + 2 * j + s;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&raw[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(qtensor_from_ggml(t.dtype(), &out, dims, device)?)
}

/// The memory map of a GGUF file and its parsed header.
fn open(path: &Path) -> Result<(memmap2::Mmap, Content), Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only and not modified while mapped.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut Cursor::new(&mmap[..]))
        .map_err(|e| Error::Format(format!("{}: not a readable GGUF file: {e}", path.display())))?;
    Ok((mmap, content))
}

/// The tensor facts [`config`] needs (reads `rope_freqs.weight` when there is one).
fn tensors(content: &Content, mmap: &[u8], vocab_size: usize) -> Result<Tensors, Error> {
    let rope_freqs = if content.tensor_infos.contains_key("rope_freqs.weight") {
        let t = content.tensor(&mut Cursor::new(mmap), "rope_freqs.weight", &Device::Cpu)?;
        Some(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    } else {
        None
    };
    Ok(Tensors {
        vocab_size,
        has_output: content.tensor_infos.contains_key("output.weight"),
        has_qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        rope_freqs,
    })
}

/// The hyper-parameters alone (no tokenizer is built).
pub fn read_config(path: &Path) -> Result<DecoderConfig, Error> {
    let (mmap, content) = open(path)?;
    let md = Metadata { map: &content.metadata };
    let vocab = md.get("tokenizer.ggml.tokens")?.to_vec()?.len();
    config(&md, &tensors(&content, &mmap, vocab)?)
}

/// Everything but the weights: hyper-parameters, tokenizer, special tokens, chat template.
pub fn read_meta(path: &Path) -> Result<ModelMeta, Error> {
    let (mmap, content) = open(path)?;
    meta(&content, &mmap)
}

fn meta(content: &Content, mmap: &[u8]) -> Result<ModelMeta, Error> {
    let md = Metadata { map: &content.metadata };

    let model = md.string("tokenizer.ggml.model")?;
    let spm = model == "llama";
    let vocab = GgufVocab {
        pre: md.string("tokenizer.ggml.pre").unwrap_or_else(|_| "default".into()),
        tokens: md.strings("tokenizer.ggml.tokens")?,
        // SentencePiece vocabularies have scores instead of merges.
        merges: if spm {
            md.strings("tokenizer.ggml.merges").unwrap_or_default()
        } else {
            md.strings("tokenizer.ggml.merges")?
        },
        token_types: md
            .get("tokenizer.ggml.token_type")?
            .to_vec()?
            .iter()
            .map(|v| v.to_i32())
            .collect::<Result<_, _>>()?,
        scores: match md.map.get("tokenizer.ggml.scores") {
            Some(v) => v.to_vec()?.iter().map(|s| s.to_f32()).collect::<Result<_, _>>()?,
            None => Vec::new(),
        },
        add_space_prefix: md.map.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true),
        unk: md.opt_u32("tokenizer.ggml.unknown_token_id"),
        model,
    };
    let tok = tokenizer::from_gguf_vocab(&vocab)?;
    let special = SpecialTokens {
        bos: md.opt_u32("tokenizer.ggml.bos_token_id"),
        eos: md.opt_u32("tokenizer.ggml.eos_token_id"),
        pad: md.opt_u32("tokenizer.ggml.padding_token_id"),
        add_bos: md.map.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
        stop: Vec::new(),
    }
    .with_stop_tokens(&tok);
    let chat = match md.string("tokenizer.chat_template").ok() {
        Some(source) => Some(ChatTemplate::from_jinja(&source, special.chat_tokens(&tok))?),
        None => None,
    };
    let cfg = config(&md, &tensors(content, mmap, vocab.tokens.len())?)?;
    Ok(ModelMeta { cfg, tokenizer: tok, special, chat })
}

/// Loads a GGUF model file.
pub fn load_file(path: &Path, mode: WeightMode, dtype: DType, device: &Device) -> Result<LoadedModel, Error> {
    let (mmap, content) = open(path)?;
    let mut reader = Cursor::new(&mmap[..]);
    let ModelMeta { cfg, tokenizer: tok, special, chat } = meta(&content, &mmap)?;
    let mut tensors = HashMap::new();
    for gguf_name in content.tensor_infos.keys() {
        let Some(name) = hf_name(gguf_name, cfg.arch) else { continue };
        // Blocks are read and reordered on the CPU; only the finished weight moves to `device`.
        let cpu = &Device::Cpu;
        let mut t = content.tensor(&mut reader, gguf_name, cpu)?;
        if cfg.arch == Arch::Llama {
            if name.ends_with("q_proj.weight") {
                t = unpermute_rows(&t, cfg.num_heads, cpu)?;
            } else if name.ends_with("k_proj.weight") {
                t = unpermute_rows(&t, cfg.num_kv_heads, cpu)?;
            }
        }
        // llama.cpp's converter stores Gemma's norm scales as `1 + w`; the decoder takes `w`
        // (as the checkpoint has it) and adds the one itself. `(1 + w) - 1` is exact in f32
        // for scales in [0.5, 2^24], and within 2^-24 of `w` for the rest.
        let norm_shift = cfg.arch.is_gemma() && gguf_name.ends_with("norm.weight");
        let w = match mode {
            WeightMode::Quantized if t.rank() == 2 => BaseWeight::Quantized(Arc::new(qtensor_to_device(t, device)?)),
            _ if norm_shift => BaseWeight::Dense((t.dequantize(cpu)? - 1.0)?.to_dtype(dtype)?.to_device(device)?),
            _ => BaseWeight::Dense(t.dequantize(cpu)?.to_dtype(dtype)?.to_device(device)?),
        };
        tensors.insert(name, w);
    }
    let model = Decoder::new(cfg, &WeightMap::new(tensors, mode, dtype, device.clone()))?;
    Ok(LoadedModel { model, tokenizer: tok, special, chat, path: path.to_path_buf(), weights_sha256: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        let name = |n: &str| hf_name(n, Arch::Llama);
        assert_eq!(name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(name("blk.0.attn_k.bias").unwrap(), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(name("blk.11.ffn_down.weight").unwrap(), "model.layers.11.mlp.down_proj.weight");
        assert_eq!(name("blk.1.ffn_norm.weight").unwrap(), "model.layers.1.post_attention_layernorm.weight");
        assert_eq!(name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(name("rope_freqs.weight"), None);
        assert_eq!(name("blk.1.post_ffw_norm.weight"), None);
        // Gemma's four norms per layer.
        for (gguf, hf) in [
            ("attn_norm", "input_layernorm"),
            ("post_attention_norm", "post_attention_layernorm"),
            ("ffn_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ] {
            for arch in [Arch::Gemma2, Arch::Gemma3] {
                assert_eq!(
                    hf_name(&format!("blk.2.{gguf}.weight"), arch).unwrap(),
                    format!("model.layers.2.{hf}.weight")
                );
            }
        }
    }

    /// A llama-style metadata map (`arch`, 64 wide, 4 heads of 16) with `extra` keys.
    fn metadata(arch: &str, extra: &[(&str, Value)]) -> HashMap<String, Value> {
        let mut m: HashMap<String, Value> = [
            ("general.architecture".to_string(), Value::String(arch.into())),
            (format!("{arch}.embedding_length"), Value::U32(64)),
            (format!("{arch}.attention.head_count"), Value::U32(4)),
            (format!("{arch}.attention.head_count_kv"), Value::U32(2)),
            (format!("{arch}.feed_forward_length"), Value::U32(96)),
            (format!("{arch}.block_count"), Value::U32(2)),
            (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
            (format!("{arch}.context_length"), Value::U32(128)),
        ]
        .into_iter()
        .collect();
        for (k, v) in extra {
            m.insert(format!("{arch}.{k}"), v.clone());
        }
        m
    }

    fn read(arch: &str, extra: &[(&str, Value)], rope_freqs: Option<Vec<f32>>) -> Result<DecoderConfig, Error> {
        let map = metadata(arch, extra);
        let t = Tensors { vocab_size: 300, has_output: false, has_qkv_bias: false, rope_freqs };
        config(&Metadata { map: &map }, &t)
    }

    #[test]
    fn rope_scaling_is_read_as_llama_cpp_does() {
        assert_eq!(read("llama", &[], None).unwrap().rope_scaling, RopeScaling::Default);
        let linear = |extra: &[(&str, Value)]| read("llama", extra, None).unwrap().rope_scaling;
        let four = RopeScaling::Linear { factor: 4.0 };
        // The type defaults to linear; the factor may be the older `rope.scale_linear`.
        assert_eq!(linear(&[("rope.scaling.factor", Value::F32(4.0))]), four);
        assert_eq!(linear(&[("rope.scale_linear", Value::F32(4.0))]), four);
        assert_eq!(
            linear(&[("rope.scaling.type", Value::String("linear".into())), ("rope.scaling.factor", Value::F32(4.0))]),
            four
        );
        assert_eq!(
            linear(&[("rope.scaling.type", Value::String("none".into())), ("rope.scaling.factor", Value::F32(4.0))]),
            RopeScaling::Default
        );
        // Llama 3: the rope_freqs.weight divisors (times a linear factor, if any).
        let c = read(
            "llama",
            &[("rope.scaling.factor", Value::F32(2.0))],
            Some(vec![1.0, 1.5, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]),
        )
        .unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::FreqFactors { factors: vec![2.0, 3.0, 16.0, 16.0, 16.0, 16.0, 16.0, 16.0] }
        );
        let e = read("llama", &[], Some(vec![1.0; 4])).unwrap_err().to_string();
        assert!(e.contains("rope_freqs has 4 factors"), "{e}");
        for kind in ["yarn", "longrope"] {
            let e = read("llama", &[("rope.scaling.type", Value::String(kind.into()))], None).unwrap_err().to_string();
            assert!(e.contains(&format!("{kind:?}")) && e.contains("not supported"), "{e}");
        }
    }

    #[test]
    fn qwen3_heads_come_from_key_length_and_other_layouts_are_refused() {
        let c = read("qwen3", &[("attention.key_length", Value::U32(32))], None).unwrap();
        assert_eq!((c.arch, c.head_dim, c.qk_norm()), (Arch::Qwen3, 32, true));
        let e =
            read("qwen3", &[("attention.key_length", Value::U32(32)), ("rope.dimension_count", Value::U32(16))], None)
                .unwrap_err()
                .to_string();
        assert!(e.contains("partial rotary"), "{e}");
        let e = read("mistral", &[], None).unwrap_err().to_string();
        assert!(e.contains("\"mistral\" is not supported"), "{e}");
        let e = read("llama", &[("attention.sliding_window", Value::U32(8))], None).unwrap_err().to_string();
        assert!(e.contains("sliding"), "{e}");
        assert_eq!(hf_name("blk.1.attn_q_norm.weight", Arch::Qwen3).unwrap(), "model.layers.1.self_attn.q_norm.weight");
        assert_eq!(hf_name("blk.1.attn_k_norm.weight", Arch::Qwen3).unwrap(), "model.layers.1.self_attn.k_norm.weight");
    }

    #[test]
    fn gemma_settings_are_read_as_llama_cpp_does() {
        let window = ("attention.sliding_window", Value::U32(8));
        let key_length = ("attention.key_length", Value::U32(32));
        // Gemma 2: even layers slide, both soft-caps from the file, rope as the file says for
        // every layer, scores by head_dim^-1/2 (32 here, not hidden / heads = 16).
        let c = read(
            "gemma2",
            &[
                window.clone(),
                key_length.clone(),
                ("attn_logit_softcapping", Value::F32(50.0)),
                ("final_logit_softcapping", Value::F32(30.0)),
                ("rope.scaling.factor", Value::F32(2.0)),
            ],
            None,
        )
        .unwrap();
        let g = c.gemma.clone().unwrap();
        assert_eq!((c.arch, c.sliding_window, c.head_dim), (Arch::Gemma2, Some(8), 32));
        assert_eq!(g.sliding_layers, vec![true, false]);
        assert_eq!((g.attn_logit_softcapping, g.final_logit_softcapping), (Some(50.0), Some(30.0)));
        assert_eq!(g.query_pre_attn_scalar, 32.0);
        assert_eq!((g.local_rope_theta, &g.local_rope_scaling), (10_000.0, &RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(c.local_rope_frequencies(), None);

        // Gemma 3: one full layer in six, no soft-caps, the sliding layers at base 10,000
        // unscaled whatever the full layers use.
        let mut extra = vec![
            window.clone(),
            key_length.clone(),
            ("block_count", Value::U32(7)),
            ("rope.freq_base", Value::F32(1e6)),
            ("rope.scaling.factor", Value::F32(8.0)),
        ];
        let c = read("gemma3", &extra, None).unwrap();
        let g = c.gemma.clone().unwrap();
        assert_eq!(c.arch, Arch::Gemma3);
        assert_eq!(g.sliding_layers, vec![true, true, true, true, true, false, true]);
        assert_eq!((g.attn_logit_softcapping, g.final_logit_softcapping), (None, None));
        assert_eq!((c.rope_theta, &c.rope_scaling), (1e6, &RopeScaling::Linear { factor: 8.0 }));
        assert_eq!((g.local_rope_theta, &g.local_rope_scaling), (10_000.0, &RopeScaling::Default));
        // The 27B model (62 layers): hidden / heads.
        extra[2] = ("block_count", Value::U32(62));
        assert_eq!(read("gemma3", &extra, None).unwrap().gemma.unwrap().query_pre_attn_scalar, 16.0);

        // A pattern in the file wins: a period, or one flag per layer (checked against the layers).
        let with = |pattern: Value| {
            read("gemma3", &[window.clone(), key_length.clone(), ("attention.sliding_window_pattern", pattern)], None)
        };
        assert_eq!(with(Value::U32(2)).unwrap().gemma.unwrap().sliding_layers, vec![true, false]);
        let flags = Value::Array(vec![Value::Bool(false), Value::Bool(true)]);
        assert_eq!(with(flags).unwrap().gemma.unwrap().sliding_layers, vec![false, true]);
        let e = with(Value::Array(vec![Value::Bool(true)])).unwrap_err().to_string();
        assert!(e.contains("sliding_window_pattern has 1 entries for 2 layers"), "{e}");
        // A Gemma without its window is refused, naming the key.
        let e = read("gemma2", &[key_length], None).unwrap_err().to_string();
        assert!(e.contains("gemma2.attention.sliding_window"), "{e}");
    }

    #[test]
    fn unpermute_inverts_the_gguf_row_order() {
        // 2 heads of dim 4, 1 column: HF rows r; GGUF row order per head is [0, 2, 1, 3].
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let gguf: Vec<f32> = vec![0., 2., 1., 3., 4., 6., 5., 7.];
        let t = candle_core::Tensor::from_vec(gguf, (8, 1), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap();
        let back = unpermute_rows(&q, 2, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), hf);
    }
}
