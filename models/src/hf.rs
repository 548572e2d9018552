//! Hugging Face model directories: `config.json`, memory-mapped `*.safetensors`,
//! `tokenizer.json` and `tokenizer_config.json`.

use crate::config::DecoderConfig;
use crate::decoder::Decoder;
use crate::linear::{qtensor_to_device, BaseWeight};
use crate::loaded::{LoadedModel, ModelMeta, SpecialTokens};
use crate::weights::{WeightMap, WeightMode};
use crate::Error;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use shared::chat::ChatTemplate;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

fn read_json(path: &Path) -> Result<serde_json::Value, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Format(format!("{}: {e}", path.display())))
}

/// The safetensors files of a checkpoint (single file or sharded with an index).
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let map =
            v["weight_map"].as_object().ok_or_else(|| Error::Format(format!("{}: no weight_map", index.display())))?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    Err(Error::Format(format!("{}: no model.safetensors or model.safetensors.index.json", dir.display())))
}

fn candle_dtype(dt: safetensors::Dtype) -> Result<DType, Error> {
    Ok(match dt {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        other => return Err(Error::Format(format!("unsupported safetensors dtype {other:?}"))),
    })
}

/// The hyper-parameters alone (`config.json`).
pub fn read_config(dir: &Path) -> Result<DecoderConfig, Error> {
    Ok(DecoderConfig::from_hf_json(&read_json(&dir.join("config.json"))?)?)
}

/// Everything but the weights: `config.json`, the tokenizer, special tokens, chat template.
pub fn read_meta(dir: &Path) -> Result<ModelMeta, Error> {
    let cfg = DecoderConfig::from_hf_json(&read_json(&dir.join("config.json"))?)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer =
        Tokenizer::from_file(&tok_path).map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() { read_json(&tc_path)? } else { serde_json::Value::Null };
    let id_of = |key: &str| -> Option<u32> {
        let v = &tc[key];
        let s = v.as_str().or_else(|| v["content"].as_str())?;
        tokenizer.token_to_id(s)
    };
    let special = SpecialTokens {
        bos: id_of("bos_token"),
        eos: id_of("eos_token"),
        pad: id_of("pad_token"),
        add_bos: tc["add_bos_token"].as_bool().unwrap_or(false),
        stop: Vec::new(),
    }
    .with_stop_tokens(&tokenizer);
    let chat = match tc["chat_template"].as_str() {
        Some(source) => Some(
            ChatTemplate::from_jinja(source, special.chat_tokens(&tokenizer))
                .map_err(|e| Error::Invalid(format!("{}: {e}", tc_path.display())))?,
        ),
        None => None,
    };
    Ok(ModelMeta { cfg, tokenizer, special, chat })
}

/// Loads a Hugging Face directory.
pub fn load_dir(dir: &Path, mode: WeightMode, dtype: DType, device: &Device) -> Result<LoadedModel, Error> {
    let ModelMeta { cfg, tokenizer, special, chat } = read_meta(dir)?;
    let mut tensors = HashMap::new();
    for file in safetensors_files(dir)? {
        let f = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
        // SAFETY: read-only map of a file we do not modify.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&file, e))?;
        let st = safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::Format(format!("{}: {e}", file.display())))?;
        for (name, view) in st.tensors() {
            // Read and quantize on the CPU; only the finished weight moves to `device`.
            let t = Tensor::from_raw_buffer(view.data(), candle_dtype(view.dtype())?, view.shape(), &Device::Cpu)?;
            let quantizable = mode == WeightMode::Quantized
                && t.rank() == 2
                && name.ends_with("_proj.weight")
                && t.dim(1)?.is_multiple_of(GgmlDType::Q8_0.block_size());
            let w = if quantizable {
                let q = QTensor::quantize(&t.to_dtype(DType::F32)?, GgmlDType::Q8_0)?;
                BaseWeight::Quantized(Arc::new(qtensor_to_device(q, device)?))
            } else {
                BaseWeight::Dense(t.to_dtype(dtype)?.to_device(device)?)
            };
            tensors.insert(name, w);
        }
    }
    let model = Decoder::new(cfg, &WeightMap::new(tensors, mode, dtype, device.clone()))?;
    Ok(LoadedModel { model, tokenizer, special, chat, path: dir.to_path_buf(), weights_sha256: None })
}

/// Writes `loaded` as a Hugging Face directory with dense f32 weights, so tools such as
/// transformers and PEFT can load exactly the weights Verdict runs. The directory appears
/// complete or not at all (written under a temporary name, then renamed).
pub fn save_dir(loaded: &LoadedModel, dir: &Path) -> Result<(), Error> {
    shared::atomic::write_dir(dir, |tmp| {
        let write = |file: &str, text: String| -> Result<(), Error> {
            let p = tmp.join(file);
            std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
        };
        let cfg = loaded.model.config();
        let config = cfg.to_hf_json()?;
        write("config.json", serde_json::to_string_pretty(&config).expect("json"))?;
        let state: HashMap<String, Tensor> = loaded.model.dense_state()?.into_iter().collect();
        candle_core::safetensors::save(&state, tmp.join("model.safetensors"))?;
        let tok_json = loaded.tokenizer.to_string(true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        write("tokenizer.json", tok_json)?;
        let token = |id: Option<u32>| id.and_then(|i| loaded.tokenizer.id_to_token(i));
        let tc = serde_json::json!({
            "bos_token": token(loaded.special.bos),
            "eos_token": token(loaded.special.eos),
            "pad_token": token(loaded.special.pad),
            "add_bos_token": loaded.special.add_bos,
            "add_eos_token": false,
            "chat_template": loaded.chat.as_ref().map(ChatTemplate::source),
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_position_embeddings,
        });
        write("tokenizer_config.json", serde_json::to_string_pretty(&tc).expect("json"))
    })
}
