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
use crate::peft::{LayerIndexes, PeftLoraConfig, PeftModule, TargetModules};

impl std::str::FromStr for Projection {
    type Err = shared::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().trim_end_matches("_proj");
        Self::ALL.into_iter().find(|p| p.module_name().trim_end_matches("_proj") == s).ok_or_else(|| {
            shared::UnknownName { what: "projection", given: s.to_string(), known: "q, k, v, o, gate, up, down".into() }
        })
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

    /// The factor `s` applied to `B A x` (of a pair of rank `rank` and alpha `alpha`).
    pub fn scaling(&self) -> f64 {
        scaling(self.alpha, self.rank, self.use_rslora)
    }
}

/// `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA (PEFT's `LoraLayer.update_layer`).
fn scaling(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// The two factors of one adapted projection.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[rank, in]`
    pub a: Tensor,
    /// `[out, rank]`
    pub b: Tensor,
    /// This pair's alpha (the adapter's, unless PEFT's `alpha_pattern` gave it another).
    alpha: f64,
    /// The factor `s` of this pair: from its alpha and its own rank.
    scaling: f64,
    /// `A` and `scaling · B` packed for the CPU kernel, built on the first inference call of a
    /// frozen adapter (shared by clones; `None` inside: these factors cannot be packed).
    packed: Arc<OnceLock<Option<PackedLora>>>,
}

impl LoraPair {
    fn new(a: Tensor, b: Tensor, alpha: f64, scaling: f64) -> Self {
        Self { a, b, alpha, scaling, packed: Arc::default() }
    }

    /// The same alpha and scaling on other factors.
    fn with(&self, a: Tensor, b: Tensor) -> Self {
        Self::new(a, b, self.alpha, self.scaling)
    }

    /// The rank of this pair (PEFT's `rank_pattern` may give pairs different ranks).
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }

    /// This pair's alpha.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The factor `s` applied to this pair's `B A x`.
    pub fn scaling(&self) -> f64 {
        self.scaling
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
                let pair = LoraPair::new(a.as_tensor().clone(), b.as_tensor().clone(), config.alpha, config.scaling());
                pairs.insert((layer, proj), pair);
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
                pairs.insert((layer, proj), LoraPair::new(a, b, config.alpha, config.scaling()));
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
                let b_scaled = (&pair.b * pair.scaling).ok()?;
                Some(PackedLora { a: pack(&pair.a)?, b_scaled: pack(&b_scaled)? })
            })
            .as_ref()
    }

    /// The dense weight delta `s · B A` of one projection.
    pub fn delta(&self, layer: usize, proj: Projection) -> Result<Option<Tensor>, Error> {
        match self.pair(layer, proj) {
            Some(p) => Ok(Some((p.b.matmul(&p.a)? * p.scaling)?)),
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
    /// Loads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`),
    /// strictly ([`crate::peft`]): every field of the config is honoured or refused by name,
    /// every tensor of the file must be a factor of an adapted module with the shape its rank
    /// gives, and targets, ranks or shapes that do not fit `model` are refused.
    pub fn load_peft_dir(
        dir: &std::path::Path,
        model: &DecoderConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, Error> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let peft = PeftLoraConfig::parse(&text).map_err(|e| Error::Format(format!("{}: {e}", cfg_path.display())))?;
        let modules = peft.resolve(model).map_err(|e| Error::Format(format!("{}: {e}", cfg_path.display())))?;
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.is_file() && dir.join("adapter_model.bin").is_file() {
            return Err(Error::Format(format!(
                "{}: a pickled adapter_model.bin; save the adapter with safetensors (PEFT's default)",
                dir.display()
            )));
        }
        let tensors = candle_core::safetensors::load(&st_path, device)
            .map_err(|e| Error::Format(format!("{}: {e}", st_path.display())))?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<BTreeMap<_, _>, Error>>()?;
        Self::from_peft_modules(&peft, &modules, model, &tensors)
            .map_err(|e| Error::Format(format!("{}: {e}", st_path.display())))
    }

    /// An adapter from named tensors and the modules a PEFT config resolved to (inference).
    /// Every tensor must be used.
    pub fn from_peft_modules(
        peft: &PeftLoraConfig,
        modules: &[PeftModule],
        model: &DecoderConfig,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Self, Error> {
        let mut pairs = BTreeMap::new();
        for m in modules {
            let get = |factor| {
                let name = peft_tensor_name(m.layer, m.proj, factor);
                tensors.get(&name).cloned().ok_or(Error::MissingTensor(name))
            };
            let (a, b) = (get('A')?, get('B')?);
            let (out, inp) = m.proj.dims(model);
            if a.dims() != [m.rank, inp] || b.dims() != [out, m.rank] {
                return Err(Error::Invalid(format!(
                    "{}: LoRA shapes {:?} / {:?} do not fit rank {} on [{out}, {inp}]",
                    crate::peft::module_key(m.layer, m.proj),
                    a.dims(),
                    b.dims(),
                    m.rank
                )));
            }
            pairs.insert((m.layer, m.proj), LoraPair::new(a, b, m.alpha, scaling(m.alpha, m.rank, peft.use_rslora)));
        }
        if let Some(extra) = tensors.keys().find(|k| {
            !pairs.keys().any(|&(l, p)| **k == peft_tensor_name(l, p, 'A') || **k == peft_tensor_name(l, p, 'B'))
        }) {
            return Err(Error::Invalid(format!(
                "tensor {extra} is not a LoRA factor of a module adapter_config.json adapts (refused, not ignored)"
            )));
        }
        // The hyper-parameters as the file states them where it can (a list of projections,
        // layers_to_transform), else what the adapted modules add up to.
        let listed: Option<Vec<Projection>> = match &peft.target_modules {
            Some(TargetModules::List(v)) => v.iter().map(|t| t.parse().ok()).collect(),
            _ => None,
        };
        let targets =
            listed.unwrap_or_else(|| Projection::ALL.into_iter().filter(|p| pairs.keys().any(|k| k.1 == *p)).collect());
        let layers = match (&peft.target_modules, &peft.layers_to_transform) {
            (Some(TargetModules::List(_)), Some(LayerIndexes::One(i))) => Some(vec![*i]),
            (Some(TargetModules::List(_)), Some(LayerIndexes::Many(v))) if !v.is_empty() => Some(v.clone()),
            (Some(TargetModules::List(_)), _) => None,
            _ => {
                let mut layers: Vec<usize> = pairs.keys().map(|k| k.0).collect();
                layers.dedup();
                (layers.len() < model.num_layers).then_some(layers)
            }
        };
        let config = LoraConfig {
            rank: peft.r,
            alpha: peft.lora_alpha,
            use_rslora: peft.use_rslora,
            dropout: peft.lora_dropout,
            targets,
            layers,
        };
        Ok(Self { config, pairs, vars: Vec::new() })
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
        let mut config = serde_json::json!({
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
        // An adapter loaded from PEFT may adapt a set of modules that targets x layers does
        // not describe, and give pairs their own ranks and alphas: then the exact module names.
        let key = |&(l, p): &(usize, Projection)| regex::escape(&crate::peft::module_key(l, p));
        let rectangular = self.pairs.len()
            == c.targets.len() * self.pairs.keys().map(|k| k.0).collect::<std::collections::BTreeSet<_>>().len()
            && self.pairs.keys().all(|k| c.targets.contains(&k.1));
        if !rectangular {
            let names: Vec<String> = self.pairs.keys().map(key).collect();
            config["target_modules"] = serde_json::json!(names.join("|"));
            config["layers_to_transform"] = serde_json::Value::Null;
        }
        let ranks: serde_json::Map<String, serde_json::Value> =
            self.pairs.iter().filter(|(_, p)| p.rank() != c.rank).map(|(k, p)| (key(k), p.rank().into())).collect();
        let alphas: serde_json::Map<String, serde_json::Value> =
            self.pairs.iter().filter(|(_, p)| p.alpha != c.alpha).map(|(k, p)| (key(k), p.alpha.into())).collect();
        if !ranks.is_empty() {
            config["rank_pattern"] = ranks.into();
        }
        if !alphas.is_empty() {
            config["alpha_pattern"] = alphas.into();
        }
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
            pairs.insert((layer, proj), p.with(a.as_tensor().clone(), b.as_tensor().clone()));
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
            .map(|(k, p)| Ok((*k, p.with(p.a.detach().copy()?, p.b.detach().copy()?))))
            .collect::<Result<_, Error>>()?;
        Ok(Self { config: self.config.clone(), pairs, vars: Vec::new() })
    }
}
