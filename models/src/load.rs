//! One entry point for every model source: a GGUF file or a Hugging Face directory.

use crate::cpu::{CpuKernels, Purpose};
use crate::decoder::Decoder;
use crate::loaded::{LoadedModel, ModelMeta};
use crate::pack::{Item, PackFile, Source};
use crate::weights::{WeightMap, WeightMode};
use crate::{gguf, hf, Error};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// How [`load_model_with`] loads a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub mode: WeightMode,
    pub dtype: DType,
    pub device: Device,
    /// How products run on the CPU: carried by the loaded model.
    pub kernels: CpuKernels,
    /// Inference loads (serving, evaluation) on the CPU take their weights from the pack file,
    /// memory-mapped; training loads keep dense weights.
    pub purpose: Purpose,
    /// Where pack files go when the model's own directory is not writable.
    pub cache_dir: PathBuf,
}

/// Loads a `.gguf` file or a Hugging Face directory (`config.json`, `*.safetensors`,
/// `tokenizer.json`). Dense weights use `dtype`; quantized mode keeps GGUF blocks (and
/// quantizes a Hugging Face checkpoint's projections to Q8_0).
pub fn load_model(path: &Path, mode: WeightMode, dtype: DType, device: &Device) -> Result<LoadedModel, Error> {
    if path.is_dir() {
        hf::load_dir(path, mode, dtype, device)
    } else if path.is_file() {
        gguf::load_file(path, mode, dtype, device)
    } else {
        Err(Error::Invalid(format!("{}: no such model file or directory", path.display())))
    }
}

/// The hyper-parameters of a `.gguf` file or a Hugging Face directory, without its weights
/// or tokenizer.
pub fn read_config(path: &Path) -> Result<crate::config::DecoderConfig, Error> {
    if path.is_dir() {
        hf::read_config(path)
    } else if path.is_file() {
        gguf::read_config(path)
    } else {
        Err(Error::Invalid(format!("{}: no such model file or directory", path.display())))
    }
}

/// Loads a model for `purpose` with the kernel options of a command line: reads its
/// hyper-parameters, resolves the kernels on its product shapes (measuring what this CPU's
/// plan lacks), then [`load_model_with`]. The one loading path of both binaries.
#[allow(clippy::too_many_arguments)]
pub fn load_for(
    path: &Path,
    mode: WeightMode,
    dtype: DType,
    device: &Device,
    kernels: &crate::cpu::KernelArgs,
    purpose: Purpose,
    cache_dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<LoadedModel, Error> {
    let kernels = if device.is_cpu() {
        let shapes = read_config(path)?.product_shapes(purpose == Purpose::Train);
        // Quantized weights run on integer kernels where the CPU has them (else on candle's
        // kernels for the blocks, as with an explicit f32 or bf16).
        let kernels = match mode {
            WeightMode::Quantized if purpose != Purpose::Train => kernels.preferring(crate::cpu::Precision::Int8),
            _ => kernels.clone(),
        };
        kernels.resolve(&shapes, purpose, cache_dir, log)?
    } else {
        CpuKernels::portable()
    };
    let opts =
        LoadOptions { mode, dtype, device: device.clone(), kernels, purpose, cache_dir: cache_dir.to_path_buf() };
    load_model_with(path, &opts, log)
}

/// The hyper-parameters, tokenizer and chat template of a `.gguf` file or a Hugging Face
/// directory, without reading its weights.
pub fn read_meta(path: &Path) -> Result<ModelMeta, Error> {
    if path.is_dir() {
        hf::read_meta(path)
    } else if path.is_file() {
        gguf::read_meta(path)
    } else {
        Err(Error::Invalid(format!("{}: no such model file or directory", path.display())))
    }
}

/// Loads a model as `opts` say. An inference load on the CPU maps the model's pack file
/// ([`crate::pack`]) when one matches, and otherwise loads the weights, packs them, writes the
/// pack and maps it, so no dense copy of the projections stays on the heap and later processes
/// start from the map. `log` hears what happened.
pub fn load_model_with(path: &Path, opts: &LoadOptions, log: &mut dyn FnMut(&str)) -> Result<LoadedModel, Error> {
    let Some(panels) = pack_panels(opts) else {
        let mut loaded = load_model(path, opts.mode, opts.dtype, &opts.device)?;
        loaded.model.set_kernels(opts.kernels.clone());
        return Ok(loaded);
    };
    let source = Source::of(path)?;
    let pack_path = crate::pack::path_for(path, panels, &opts.cache_dir);
    match PackFile::open(&pack_path, panels, &source) {
        Ok(Some(pack)) => {
            let meta = read_meta(path)?;
            let model = decoder_from_pack(meta.cfg, &pack, &opts.kernels)?;
            log(&format!("weights: {panels} panels mapped from {}", pack_path.display()));
            return Ok(LoadedModel {
                model,
                tokenizer: meta.tokenizer,
                special: meta.special,
                chat: meta.chat,
                path: path.to_path_buf(),
                weights_sha256: pack.source().sha256.clone(),
            });
        }
        Ok(None) => {}
        Err(e) => log(&format!("weights: ignoring unreadable pack {}: {e}", pack_path.display())),
    }
    let started = std::time::Instant::now();
    let mut loaded = load_model(path, opts.mode, opts.dtype, &opts.device)?;
    let sha = if path.is_file() { shared::adapter::weights_sha256(path).ok() } else { None };
    let source = Source { sha256: sha.clone(), ..source };
    match write_pack(&loaded.model, &pack_path, panels, &source) {
        Ok(()) => match PackFile::open(&pack_path, panels, &source)? {
            Some(pack) => {
                loaded.model = decoder_from_pack(loaded.model.config().clone(), &pack, &opts.kernels)?;
                log(&format!(
                    "weights: packed as {panels} in {:.1} s into {} (later starts map it)",
                    started.elapsed().as_secs_f64(),
                    pack_path.display()
                ));
            }
            None => {
                return Err(Error::Format(format!("{}: the pack just written does not read back", pack_path.display())))
            }
        },
        Err(e) => {
            log(&format!("weights: could not write {} ({e}): packing in memory", pack_path.display()));
            loaded.model.set_kernels(opts.kernels.clone());
        }
    }
    loaded.weights_sha256 = sha;
    Ok(loaded)
}

/// The panels an inference load packs its weights as: dense f32 weights in the kernels'
/// precision (int8 with residuals), quantized ones (GGUF blocks) as one int8 matrix per weight
/// when the kernels are int8; `None` where the weights stay as loaded (training, another
/// device, kernels off, quantized blocks on f32 or bf16 kernels).
fn pack_panels(opts: &LoadOptions) -> Option<crate::cpu::Panels> {
    if opts.purpose == Purpose::Train || !opts.device.is_cpu() || !opts.kernels.enabled() {
        return None;
    }
    if opts.mode == WeightMode::Dense && opts.dtype != DType::F32 {
        return None;
    }
    crate::cpu::Panels::for_weight(opts.kernels.precision, opts.mode == WeightMode::Quantized)
}

/// Whether a tensor is a frozen projection the kernels multiply (else plain rows).
fn is_linear(name: &str) -> bool {
    name.ends_with("_proj.weight") || name == "lm_head.weight"
}

/// Writes every base tensor of `model` to a pack: projections and the LM head (also a tied
/// one) as `panels`, the rest as f32 rows (GGUF blocks dequantized).
fn write_pack(model: &Decoder, path: &Path, panels: crate::cpu::Panels, source: &Source) -> Result<(), Error> {
    let mut state = model.dense_state()?;
    if model.config().tie_word_embeddings && !state.iter().any(|(n, _)| n == "lm_head.weight") {
        let embed = state.iter().find(|(n, _)| n == "model.embed_tokens.weight").map(|(_, t)| t.clone());
        if let Some(e) = embed {
            state.push(("lm_head.weight".into(), e));
        }
    }
    let mut packed = Vec::new();
    let mut rows = Vec::new();
    for (name, t) in &state {
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        let (out, inner) = match t.dims() {
            [o, i] => (*o, *i),
            [n] => (*n, 1),
            d => return Err(Error::Format(format!("tensor {name} of rank {} cannot be packed", d.len()))),
        };
        if is_linear(name) {
            packed.push((name.clone(), crate::cpu::PackedWeight::pack_kind(&values, out, inner, panels)));
        } else {
            rows.push((name.clone(), values, out, inner));
        }
    }
    let mut items: Vec<(String, Item)> = packed.iter().map(|(n, p)| (n.clone(), Item::Packed(p))).collect();
    items.extend(rows.iter().map(|(n, v, o, i)| (n.clone(), Item::Rows { values: v, out: *o, inner: *i })));
    PackFile::write(path, panels, source, &items)
}

/// A decoder whose weights are the pack's: projections as mapped panels, the embedding as
/// mapped rows, norms and biases copied (they are small).
fn decoder_from_pack(
    cfg: crate::config::DecoderConfig,
    pack: &PackFile,
    kernels: &CpuKernels,
) -> Result<Decoder, Error> {
    let mut tensors = std::collections::HashMap::new();
    let mut mapped = Vec::new();
    for name in pack.names() {
        if pack.is_packed(name) {
            tensors.insert(name.to_string(), crate::linear::BaseWeight::Packed(pack.packed(name)?));
        } else if name == "model.embed_tokens.weight" {
            let (store, out, inner) = pack.rows(name)?;
            mapped.push((name.to_string(), store, out, inner));
        } else {
            let (store, out, inner) = pack.rows(name)?;
            let t = if inner == 1 {
                candle_core::Tensor::from_slice(&store, out, &Device::Cpu)?
            } else {
                candle_core::Tensor::from_slice(&store, (out, inner), &Device::Cpu)?
            };
            tensors.insert(name.to_string(), crate::linear::BaseWeight::Dense(t));
        }
    }
    let mut weights = WeightMap::new(tensors, WeightMode::Dense, DType::F32, Device::Cpu);
    for (name, store, out, inner) in mapped {
        weights.insert_mapped(&name, store, out, inner);
    }
    let mut model = Decoder::new(cfg, &weights)?;
    model.set_kernels(kernels.clone());
    Ok(model)
}
