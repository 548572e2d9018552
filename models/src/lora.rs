//! Low-rank adapters (LoRA), kept apart from the base weights so one base serves many adapters.
//!
//! A targeted projection computes `y = W x + b + s · B(A(dropout(x)))` with `A: [r, in]`,
//! `B: [out, r]` and `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). Tensor names follow
//! PEFT (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`).

use crate::config::DecoderConfig;
use crate::cpu::{CpuKernels, PackedWeight, Precision};
use crate::Error;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

pub use crate::config::Projection;

impl std::str::FromStr for Projection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().trim_end_matches("_proj");
        Self::ALL
            .into_iter()
            .find(|p| p.module_name().trim_end_matches("_proj") == s)
            .ok_or_else(|| format!("unknown projection {s:?}: use q, k, v, o, gate, up, down"))
    }
}

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// rsLoRA: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
    pub use_rslora: bool,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    pub targets: Vec<Projection>,
    /// Only these decoder layers are adapted (PEFT's `layers_to_transform`); `None`: all.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
}

impl Default for LoraConfig {
    /// The method's settings: r 16, alpha 32, rsLoRA, dropout 0.05, on q and v.
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            use_rslora: true,
            dropout: 0.05,
            targets: vec![Projection::Q, Projection::V],
            layers: None,
        }
    }
}

impl LoraConfig {
    /// Whether decoder layer `layer` is adapted.
    pub fn adapts_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }

    /// The factor `s` applied to `B A x`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// The two factors of one adapted projection.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[rank, in]`
    pub a: Tensor,
    /// `[out, rank]`
    pub b: Tensor,
    /// `A` and `scaling · B` packed for the CPU kernel, built on the first inference call of a
    /// frozen adapter (shared by clones; `None` inside: these factors cannot be packed).
    packed: Arc<OnceLock<Option<PackedLora>>>,
}

impl LoraPair {
    fn new(a: Tensor, b: Tensor) -> Self {
        Self { a, b, packed: Arc::default() }
    }
}

/// One projection's LoRA factors packed for [`crate::cpu`]: `A` `[rank, in]` and
/// `scaling · B` `[out, rank]`, both in f32 panels, so the delta `x Aᵀ (s B)ᵀ` is two kernel
/// calls on the caller's buffers and nothing else.
#[derive(Debug, Clone)]
pub struct PackedLora {
    pub a: PackedWeight,
    pub b_scaled: PackedWeight,
}

impl PackedLora {
    /// Adds `x Aᵀ (s B)ᵀ` to `y`: `x` is `[rows, in]` and `y` `[rows, out]`, both row-major;
    /// f32 products with `kernels`' tiles.
    ///
    /// # Panics
    /// If `kernels` runs no f32 kernel (callers check [`CpuKernels::enabled`]).
    pub fn add_delta(&self, x: &[f32], rows: usize, y: &mut [f32], kernels: &CpuKernels) {
        let tiling = |w: &PackedWeight| {
            let (out, inner) = w.dims();
            kernels.tiling(Precision::F32, out, inner, rows).expect("f32 kernels run where LoRA is fused")
        };
        let z = self.a.matmul_t(x, rows, &tiling(&self.a));
        self.b_scaled.matmul_t_into(&z, rows, y, true, &tiling(&self.b_scaled));
    }
}

/// A set of LoRA factors for some layers and projections of one model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    config: LoraConfig,
    pairs: BTreeMap<(usize, Projection), LoraPair>,
    vars: Vec<(String, Var)>,
}

/// PEFT's tensor name for one factor.
pub fn peft_tensor_name(layer: usize, proj: Projection, factor: char) -> String {
    format!("base_model.model.model.layers.{layer}.{}.lora_{factor}.weight", proj.module_path())
}

impl LoraAdapter {
    /// A fresh trainable adapter initialised like PEFT: `A` Kaiming-uniform
    /// (bound `1/sqrt(in)`), `B` zero, so the adapted model starts equal to the base.
    pub fn init(
        config: LoraConfig,
        model: &DecoderConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, Error> {
        Self::init_with(config, model, seed, dtype, device, false)
    }

    /// Like [`LoraAdapter::init`] but `B` is random too: an adapter that changes the model,
    /// for tests and gradient checks.
    pub fn init_random(
        config: LoraConfig,
        model: &DecoderConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, Error> {
        Self::init_with(config, model, seed, dtype, device, true)
    }

    fn init_with(
        config: LoraConfig,
        model: &DecoderConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
        random_b: bool,
    ) -> Result<Self, Error> {
        if config.rank == 0 {
            return Err(Error::Invalid("LoRA rank must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::Invalid(format!("LoRA dropout {} is outside [0, 1)", config.dropout)));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        let mut vars = Vec::new();
        let r = config.rank;
        if let Some(bad) = config.layers.as_ref().and_then(|l| l.iter().find(|&&i| i >= model.num_layers)) {
            return Err(Error::Invalid(format!(
                "LoRA layer {bad} does not exist (the model has {})",
                model.num_layers
            )));
        }
        for layer in (0..model.num_layers).filter(|&l| config.adapts_layer(l)) {
            for &proj in &config.targets {
                let (out, inp) = proj.dims(model);
                let bound_a = 1.0 / (inp as f64).sqrt();
                let a = uniform(&mut rng, (r, inp), bound_a, dtype, device)?;
                let b = if random_b {
                    uniform(&mut rng, (out, r), 1.0 / (r as f64).sqrt(), dtype, device)?
                } else {
                    Tensor::zeros((out, r), dtype, device)?
                };
                let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
                pairs.insert((layer, proj), LoraPair::new(a.as_tensor().clone(), b.as_tensor().clone()));
                vars.push((peft_tensor_name(layer, proj, 'A'), a));
                vars.push((peft_tensor_name(layer, proj, 'B'), b));
            }
        }
        Ok(Self { config, pairs, vars })
    }

    /// An adapter from named tensors in PEFT layout (inference: nothing is trainable).
    pub fn from_tensors(
        config: LoraConfig,
        model: &DecoderConfig,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Self, Error> {
        let mut pairs = BTreeMap::new();
        for layer in (0..model.num_layers).filter(|&l| config.adapts_layer(l)) {
            for &proj in &config.targets {
                let get = |factor| {
                    let name = peft_tensor_name(layer, proj, factor);
                    tensors.get(&name).cloned().ok_or(Error::MissingTensor(name))
                };
                let (a, b) = (get('A')?, get('B')?);
                let (out, inp) = proj.dims(model);
                if a.dims() != [config.rank, inp] || b.dims() != [out, config.rank] {
                    return Err(Error::Invalid(format!(
                        "layer {layer} {}: LoRA shapes {:?} / {:?} do not fit rank {} on [{out}, {inp}]",
                        proj.module_name(),
                        a.dims(),
                        b.dims(),
                        config.rank
                    )));
                }
                pairs.insert((layer, proj), LoraPair::new(a, b));
            }
        }
        Ok(Self { config, pairs, vars: Vec::new() })
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The factors of one projection, if adapted.
    pub fn pair(&self, layer: usize, proj: Projection) -> Option<&LoraPair> {
        self.pairs.get(&(layer, proj))
    }

    /// The trainable variables with their PEFT names (empty for a loaded adapter).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// All factors with their PEFT names, for saving.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.pairs.len() * 2);
        for (&(layer, proj), pair) in &self.pairs {
            out.push((peft_tensor_name(layer, proj, 'A'), pair.a.clone()));
            out.push((peft_tensor_name(layer, proj, 'B'), pair.b.clone()));
        }
        out
    }

    /// One projection's factors packed for the CPU kernels, for inference: `None` where the
    /// adapter does not adapt it, while the adapter trains (its variables change under a
    /// cache), where `kernels` do not run, or for factors that are not f32 on the CPU. Packed
    /// (always in f32) on first use and kept with the adapter.
    pub fn packed_pair(&self, layer: usize, proj: Projection, kernels: &CpuKernels) -> Option<&PackedLora> {
        if !self.vars.is_empty() || !kernels.enabled() {
            return None;
        }
        let pair = self.pair(layer, proj)?;
        pair.packed
            .get_or_init(|| {
                let pack = |t: &Tensor| -> Option<PackedWeight> {
                    if !t.device().is_cpu() || t.dtype() != DType::F32 {
                        return None;
                    }
                    let (out, inner) = t.dims2().ok()?;
                    let values = t.flatten_all().and_then(|v| v.to_vec1::<f32>()).ok()?;
                    Some(PackedWeight::pack(&values, out, inner))
                };
                let b_scaled = (&pair.b * self.config.scaling()).ok()?;
                Some(PackedLora { a: pack(&pair.a)?, b_scaled: pack(&b_scaled)? })
            })
            .as_ref()
    }

    /// The dense weight delta `s · B A` of one projection.
    pub fn delta(&self, layer: usize, proj: Projection) -> Result<Option<Tensor>, Error> {
        match self.pair(layer, proj) {
            Some(p) => Ok(Some((p.b.matmul(&p.a)? * self.config.scaling())?)),
            None => Ok(None),
        }
    }
}

fn uniform(
    rng: &mut ChaCha8Rng,
    shape: (usize, usize),
    bound: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor, Error> {
    let data: Vec<f64> = (0..shape.0 * shape.1).map(|_| rng.random_range(-bound..bound)).collect();
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}

/// A seeded inverted-dropout mask (`0` or `1/(1-p)`) of `shape`, for LoRA inputs in training.
pub fn dropout_mask(shape: &[usize], p: f64, seed: u64, dtype: DType, device: &Device) -> Result<Tensor, Error> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep as f32 }).collect();
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}

impl LoraAdapter {
    /// Loads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    /// Refuses targets, ranks or shapes that do not fit `model`.
    pub fn load_peft_dir(
        dir: &std::path::Path,
        model: &DecoderConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, Error> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Format(format!("{}: {e}", cfg_path.display())))?;
        let rank =
            v["r"].as_u64().ok_or_else(|| Error::Format(format!("{}: no integer \"r\"", cfg_path.display())))? as usize;
        let targets = match &v["target_modules"] {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .unwrap_or("")
                        .parse::<Projection>()
                        .map_err(|e| Error::Format(format!("{}: {e}", cfg_path.display())))
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(Error::Format(format!("{}: target_modules must be a list", cfg_path.display()))),
        };
        let config = LoraConfig {
            rank,
            alpha: v["lora_alpha"].as_f64().unwrap_or(rank as f64),
            use_rslora: v["use_rslora"].as_bool().unwrap_or(false),
            dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
            targets,
            layers: match &v["layers_to_transform"] {
                serde_json::Value::Null => None,
                serde_json::Value::Number(n) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
                serde_json::Value::Array(a) => {
                    Some(a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>().ok_or_else(
                        || Error::Format(format!("{}: layers_to_transform must hold integers", cfg_path.display())),
                    )?)
                }
                _ => return Err(Error::Format(format!("{}: layers_to_transform must be a list", cfg_path.display()))),
            },
        };
        if v["use_dora"].as_bool() == Some(true) {
            return Err(Error::Format(format!("{}: DoRA adapters are not supported", cfg_path.display())));
        }
        let st_path = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&st_path, device)
            .map_err(|e| Error::Format(format!("{}: {e}", st_path.display())))?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<BTreeMap<_, _>, Error>>()?;
        Self::from_tensors(config, model, &tensors)
    }
}

impl LoraAdapter {
    /// Writes the adapter as a PEFT directory (`adapter_config.json`,
    /// `adapter_model.safetensors`) that PEFT's `PeftModel.from_pretrained` loads. The directory
    /// appears complete or not at all (written under a temporary name, then renamed).
    pub fn save_peft_dir(&self, dir: &std::path::Path, base_model: &str) -> Result<(), Error> {
        shared::atomic::write_dir(dir, |tmp| self.write_peft_files(tmp, base_model))
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into an existing directory
    /// (callers that assemble a larger directory atomically, like a checkpoint, use this).
    pub fn write_peft_files(&self, dir: &std::path::Path, base_model: &str) -> Result<(), Error> {
        let c = &self.config;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "use_rslora": c.use_rslora,
            "target_modules": c.targets.iter().map(|p| p.module_name()).collect::<Vec<_>>(),
            "layers_to_transform": c.layers,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
        });
        let cfg_path = dir.join("adapter_config.json");
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&config).expect("json"))
            .map_err(|e| Error::io(&cfg_path, e))?;
        let tensors: std::collections::HashMap<String, Tensor> = self
            .named_tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.contiguous()?)))
            .collect::<Result<_, Error>>()?;
        candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
        Ok(())
    }
}

impl LoraAdapter {
    /// A trainable copy: every factor becomes a fresh variable holding the current values. PPO
    /// starting from an SFT adapter trains this.
    pub fn trainable(&self) -> Result<Self, Error> {
        let mut pairs = BTreeMap::new();
        let mut vars = Vec::with_capacity(self.pairs.len() * 2);
        for (&(layer, proj), p) in &self.pairs {
            let (a, b) = (Var::from_tensor(&p.a.detach().copy()?)?, Var::from_tensor(&p.b.detach().copy()?)?);
            pairs.insert((layer, proj), LoraPair::new(a.as_tensor().clone(), b.as_tensor().clone()));
            vars.push((peft_tensor_name(layer, proj, 'A'), a));
            vars.push((peft_tensor_name(layer, proj, 'B'), b));
        }
        Ok(Self { config: self.config.clone(), pairs, vars })
    }

    /// A detached copy of the current values (no variables): for evaluation during training and
    /// for saving a best checkpoint while training goes on.
    pub fn snapshot(&self) -> Result<Self, Error> {
        let pairs = self
            .pairs
            .iter()
            .map(|(k, p)| Ok((*k, LoraPair::new(p.a.detach().copy()?, p.b.detach().copy()?))))
            .collect::<Result<_, Error>>()?;
        Ok(Self { config: self.config.clone(), pairs, vars: Vec::new() })
    }
}
