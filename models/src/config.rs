//! Hyper-parameters of a decoder-only transformer, read from GGUF metadata or a Hugging Face
//! `config.json`.

use serde::{Deserialize, Serialize};

/// Why a model config was refused: read from a `config.json`, checked, or written back.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("rope scaling {rope}: {name} must be a positive number, not {value}")]
    NotPositive { rope: &'static str, name: &'static str, value: f64 },
    #[error("rope scaling llama3: high_freq_factor {high} must exceed low_freq_factor {low}")]
    Llama3FreqOrder { high: f64, low: f64 },
    #[error("rope scaling yarn: attention_factor {0} must be >= 0")]
    YarnAttentionFactor(f64),
    #[error("rope_freqs has {got} factors, head dimension {head_dim} needs {need}")]
    FreqFactorCount { got: usize, head_dim: usize, need: usize },
    #[error(
        "a GGUF's rope_freqs.weight table has no config.json form: the model cannot be exported as a Hugging \
         Face directory"
    )]
    FreqFactorsNotExportable,
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(
        "config.json: {key} is given per layer type ({layer_type:?}): per-layer rotary settings are not supported"
    )]
    PerLayerRope { key: &'static str, layer_type: String },
    /// `key` is the path in the config (`rope_scaling.factor`, `rope_theta`).
    #[error("config.json: {key} is not a number")]
    NotANumber { key: String },
    #[error("config.json: {key} is not a string")]
    NotAString { key: String },
    #[error("config.json: {key} is not a boolean")]
    NotABoolean { key: String },
    #[error("config.json: {key} is not an integer")]
    NotAnInteger { key: String },
    #[error("config.json: missing or non-integer {key}")]
    MissingInteger { key: String },
    #[error("config.json: partial_rotary_factor {0} (rotary embedding of part of each head) is not supported")]
    PartialRotary(f64),
    #[error("config.json: rope type {rope:?} needs {key}")]
    MissingRopeParameter { rope: String, key: String },
    #[error("config.json: original_max_position_embeddings {0} is not a positive integer")]
    OriginalNotInteger(f64),
    #[error("config.json: rope type {rope:?} is not supported (default, linear, llama3 and yarn are)")]
    UnsupportedRope { rope: String },
    #[error("{heads} query heads are not a multiple of {kv_heads} key/value heads")]
    HeadsNotMultiple { heads: usize, kv_heads: usize },
    #[error("head dimension {0} must be even for rotary embeddings")]
    OddHeadDim(usize),
    #[error("hidden size, layer count and vocabulary must be non-zero")]
    ZeroSize,
    #[error("rope_theta {0} must be a number above 1")]
    RopeTheta(f64),
    #[error("a sliding window of 0 keys leaves a token nothing to attend to")]
    ZeroSlidingWindow,
    #[error("config.json has no model_type")]
    NoModelType,
    #[error("unsupported model_type {0:?} (llama, mistral, qwen2 and qwen3 are)")]
    UnsupportedModelType(String),
    #[error("config.json: num_attention_heads must be non-zero")]
    ZeroHeads,
    #[error("config.json: mlp_bias (biases on the MLP projections) is not supported")]
    MlpBias,
    #[error(
        "config.json: use_sliding_window with sliding_window {window} slides {sliding} of {layers} layers: \
         per-layer sliding windows are not supported"
    )]
    SlidingLayers { window: usize, sliding: usize, layers: usize },
}

/// The decoder families Verdict runs. They share one implementation; the differences are
/// spelled out as [`DecoderConfig`] fields (q/k/v bias, tied embeddings, sliding window, GGUF
/// Q/K layout) and [`DecoderConfig::qk_norm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama family (SmolLM2, Llama 2/3).
    Llama,
    /// Mistral: the Llama layout, with a sliding attention window when its config sets one.
    Mistral,
    /// Qwen2 family (Qwen2, Qwen2.5).
    Qwen2,
    /// Qwen3: Qwen2's layout without q/k/v biases by default, plus per-head RMS norms of the
    /// queries and keys before the rotary embedding (`q_norm`, `k_norm`).
    Qwen3,
}

impl Arch {
    /// Every family, for tests that cover them all.
    pub const ALL: [Arch; 4] = [Self::Llama, Self::Mistral, Self::Qwen2, Self::Qwen3];

    /// Name used by GGUF (`general.architecture`) and by HF's `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// Parses a GGUF architecture / HF model type.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The transformers class of a causal LM of this family (`architectures` in `config.json`).
    fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// How the rotary frequencies are scaled, as transformers 5.24 computes them
/// (`modeling_rope_utils.py`). Every other rope type is refused when a config is read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// `1 / theta^(2i/d)`.
    #[default]
    Default,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between
    /// `original / low_freq_factor` and `original / high_freq_factor`.
    #[serde(rename = "llama3")]
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// YaRN: interpolated and extrapolated frequencies blended by a linear ramp over the
    /// dimensions between the `beta_fast` and `beta_slow` rotation counts (rounded outwards
    /// when `truncate`); cos and sin are multiplied by `attention_factor` (resolved when read:
    /// given, or from `mscale` / `mscale_all_dim`, or `0.1 ln(factor) + 1`).
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        attention_factor: f64,
    },
    /// llama.cpp's per-frequency divisors (a GGUF's `rope_freqs.weight`, how llama.cpp stores
    /// Llama 3 scaling): frequency `i` is divided by `factors[i]`.
    FreqFactors { factors: Vec<f64> },
}

impl RopeScaling {
    /// The name transformers (or, for [`RopeScaling::FreqFactors`], llama.cpp) gives it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Linear { .. } => "linear",
            Self::Llama3 { .. } => "llama3",
            Self::Yarn { .. } => "yarn",
            Self::FreqFactors { .. } => "rope_freqs",
        }
    }

    /// The rotary inverse frequencies (`head_dim / 2` of them) for `theta`, and the factor cos
    /// and sin are multiplied by.
    pub fn frequencies(&self, theta: f64, head_dim: usize) -> (Vec<f64>, f64) {
        let d = head_dim as f64;
        let base: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / d)).collect();
        match self {
            Self::Default => (base, 1.0),
            Self::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            Self::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = *original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let scaled = base.iter().map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                });
                (scaled.collect(), 1.0)
            }
            Self::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                let old = *original_max_position_embeddings as f64;
                // The dimension at which a wavelength makes `rotations` turns over `old` positions.
                let dim_of =
                    |rotations: f64| d * (old / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
                let (mut low, mut high) = (dim_of(*beta_fast), dim_of(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let blended = base.iter().enumerate().map(|(i, &f)| {
                    // 1 where the frequency is extrapolated (kept), 0 where interpolated.
                    let extrapolate = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    f / factor * (1.0 - extrapolate) + f * extrapolate
                });
                (blended.collect(), *attention_factor)
            }
            Self::FreqFactors { factors } => (base.iter().zip(factors).map(|(f, k)| f / k).collect(), 1.0),
        }
    }

    /// Checks the parameters the frequencies divide by or count with.
    fn validate(&self, head_dim: usize) -> Result<(), ConfigError> {
        let positive = |name: &'static str, x: f64| {
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(ConfigError::NotPositive { rope: self.name(), name, value: x })
            }
        };
        match self {
            Self::Default => Ok(()),
            Self::Linear { factor } => positive("factor", *factor),
            Self::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("original_max_position_embeddings", *original_max_position_embeddings as f64)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(ConfigError::Llama3FreqOrder { high: *high_freq_factor, low: *low_freq_factor });
                }
                Ok(())
            }
            Self::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor, .. } => {
                positive("factor", *factor)?;
                positive("original_max_position_embeddings", *original_max_position_embeddings as f64)?;
                positive("beta_fast", *beta_fast)?;
                positive("beta_slow", *beta_slow)?;
                if !(attention_factor.is_finite() && *attention_factor >= 0.0) {
                    return Err(ConfigError::YarnAttentionFactor(*attention_factor));
                }
                Ok(())
            }
            Self::FreqFactors { factors } => {
                if factors.len() != head_dim / 2 {
                    return Err(ConfigError::FreqFactorCount { got: factors.len(), head_dim, need: head_dim / 2 });
                }
                factors.iter().try_for_each(|&k| positive("each factor", k))
            }
        }
    }

    /// The `rope_scaling` object of a `config.json` (`null` for the default), as transformers
    /// 4 and 5 both read it.
    fn to_hf_json(&self) -> Result<serde_json::Value, ConfigError> {
        Ok(match self {
            Self::Default => serde_json::Value::Null,
            Self::FreqFactors { .. } => return Err(ConfigError::FreqFactorsNotExportable),
            _ => serde_json::to_value(self)?,
        })
    }

    /// Reads the rotary settings of a `config.json` in the transformers-4 form (top-level
    /// `rope_theta`, `rope_scaling` with `type` or `rope_type`) or the transformers-5 form
    /// (`rope_parameters` with `rope_type` and `rope_theta`), with transformers' precedence:
    /// a non-empty `rope_scaling` over `rope_parameters`, their `rope_theta` over the top-level
    /// one, a top-level `original_max_position_embeddings` over theirs. Returns `(theta,
    /// scaling)`.
    fn from_hf_json(v: &serde_json::Value, max_position_embeddings: usize) -> Result<(f64, Self), ConfigError> {
        let non_empty = |key: &str| v[key].as_object().filter(|o| !o.is_empty());
        let (key, params) = match (non_empty("rope_scaling"), non_empty("rope_parameters")) {
            (Some(p), _) => ("rope_scaling", Some(p)),
            (None, Some(p)) => ("rope_parameters", Some(p)),
            (None, None) => ("rope_scaling", None),
        };
        let empty = serde_json::Map::new();
        let p = params.unwrap_or(&empty);
        if let Some((layer_type, _)) = p.iter().find(|(_, x)| x.is_object()) {
            return Err(ConfigError::PerLayerRope { key, layer_type: layer_type.clone() });
        }
        let number = |name: &str| -> Result<Option<f64>, ConfigError> {
            match &p.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x.as_f64().map(Some).ok_or_else(|| ConfigError::NotANumber { key: format!("{key}.{name}") }),
            }
        };
        let top_number = |name: &str| -> Result<Option<f64>, ConfigError> {
            match &v[name] {
                serde_json::Value::Null => Ok(None),
                x => x.as_f64().map(Some).ok_or_else(|| ConfigError::NotANumber { key: name.to_string() }),
            }
        };
        let theta = match number("rope_theta")? {
            Some(t) => t,
            None => top_number("rope_theta")?.unwrap_or(10_000.0),
        };
        let partial = match number("partial_rotary_factor")? {
            Some(f) => Some(f),
            None => top_number("partial_rotary_factor")?,
        };
        if let Some(f) = partial.filter(|&f| f != 1.0) {
            return Err(ConfigError::PartialRotary(f));
        }
        let kind = match (p.get("rope_type"), p.get("type")) {
            (Some(t), _) | (None, Some(t)) => {
                t.as_str().ok_or_else(|| ConfigError::NotAString { key: format!("{key}.rope_type") })?
            }
            (None, None) => "default",
        };
        let required = |name: &str| -> Result<f64, ConfigError> {
            number(name)?.ok_or_else(|| ConfigError::MissingRopeParameter {
                rope: kind.to_string(),
                key: format!("{key}.{name}"),
            })
        };
        // transformers moves the pre-training length into the parameters for these types,
        // preferring a top-level value, else theirs, else max_position_embeddings.
        let original = || -> Result<usize, ConfigError> {
            let o = match top_number("original_max_position_embeddings")? {
                Some(o) => o,
                None => number("original_max_position_embeddings")?.unwrap_or(max_position_embeddings as f64),
            };
            if o.fract() != 0.0 || o < 1.0 {
                return Err(ConfigError::OriginalNotInteger(o));
            }
            Ok(o as usize)
        };
        let scaling = match kind {
            "default" => Self::Default,
            "linear" => Self::Linear { factor: required("factor")? },
            "llama3" => Self::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: original()?,
            },
            "yarn" => {
                let original_max_position_embeddings = original()?;
                // transformers requires the key; a null factor is the ratio of the lengths.
                let factor = match p.get("factor") {
                    Some(serde_json::Value::Null) => {
                        max_position_embeddings as f64 / original_max_position_embeddings as f64
                    }
                    _ => required("factor")?,
                };
                let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let attention_factor = match (number("attention_factor")?, number("mscale")?, number("mscale_all_dim")?)
                {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
                    _ => mscale(factor, 1.0),
                };
                // transformers: `beta_fast or 32`, `beta_slow or 1` (a 0 takes the default too).
                let or = |x: Option<f64>, default: f64| x.filter(|&b| b != 0.0).unwrap_or(default);
                // transformers: `get("truncate", True)`, so an explicit null does not truncate.
                let truncate = match p.get("truncate") {
                    None => true,
                    Some(serde_json::Value::Null) => false,
                    Some(t) => {
                        t.as_bool().ok_or_else(|| ConfigError::NotABoolean { key: format!("{key}.truncate") })?
                    }
                };
                Self::Yarn {
                    factor,
                    original_max_position_embeddings,
                    beta_fast: or(number("beta_fast")?, 32.0),
                    beta_slow: or(number("beta_slow")?, 1.0),
                    truncate,
                    attention_factor,
                }
            }
            other => return Err(ConfigError::UnsupportedRope { rope: other.to_string() }),
        };
        Ok((theta, scaling))
    }
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    /// How the rotary frequencies are scaled (Llama 3.1, YaRN, ...).
    #[serde(default)]
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// A query sees only the keys fewer than this many positions before it (Mistral).
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

impl DecoderConfig {
    /// Every distinct `(out, inner, uses per forward)` of the frozen projections, and the LM
    /// head's with 0 uses (its rows are few and vary): the shapes a kernel plan measures. With
    /// `gradients`, also the transposed shapes of the input gradients (`g W`).
    pub fn product_shapes(&self, gradients: bool) -> Vec<(usize, usize, usize)> {
        let mut shapes: std::collections::BTreeMap<(usize, usize), usize> = Default::default();
        let mut add = |(out, inner): (usize, usize), uses: usize| {
            *shapes.entry((out, inner)).or_default() += uses;
            if gradients {
                shapes.entry((inner, out)).or_default();
            }
        };
        for proj in Projection::ALL {
            add(proj.dims(self), self.num_layers);
        }
        add((self.vocab_size, self.hidden_size), 0);
        shapes.into_iter().map(|((o, i), n)| (o, i, n)).collect()
    }

    /// Queries and keys get a per-head RMS norm before the rotary embedding (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.arch == Arch::Qwen3
    }

    /// The rotary inverse frequencies and the factor cos and sin are multiplied by.
    pub fn rope_frequencies(&self) -> (Vec<f64>, f64) {
        self.rope_scaling.frequencies(self.rope_theta, self.head_dim)
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ConfigError::HeadsNotMultiple { heads: self.num_heads, kv_heads: self.num_kv_heads });
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError::OddHeadDim(self.head_dim));
        }
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 {
            return Err(ConfigError::ZeroSize);
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(ConfigError::RopeTheta(self.rope_theta));
        }
        if self.sliding_window == Some(0) {
            return Err(ConfigError::ZeroSlidingWindow);
        }
        self.rope_scaling.validate(self.head_dim)
    }

    /// Parameters that multiply activations per token (all projections, excluding embeddings
    /// and the LM head): `2 * this` is the dense FLOPs per token of the layer stack.
    pub fn layer_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * self.intermediate_size;
        self.num_layers * (attn + mlp)
    }

    /// The Hugging Face `config.json` form of this config (rotary settings in the
    /// transformers-4 form, which transformers 5 reads too). Fails for settings a
    /// `config.json` cannot express (a GGUF's `rope_freqs.weight` table).
    pub fn to_hf_json(&self) -> Result<serde_json::Value, ConfigError> {
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf_json()?,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if self.arch == Arch::Mistral {
            v["sliding_window"] = serde_json::json!(self.sliding_window);
        }
        Ok(v)
    }

    /// Reads a Hugging Face `config.json` (Llama, Mistral, Qwen2 or Qwen3), with
    /// transformers' defaults for absent keys. Refuses what the forward pass would otherwise
    /// silently get wrong: other rope types, partial rotary, MLP biases, per-layer sliding
    /// windows.
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Self, ConfigError> {
        let model_type = v["model_type"].as_str().ok_or(ConfigError::NoModelType)?;
        let arch =
            Arch::from_name(model_type).ok_or_else(|| ConfigError::UnsupportedModelType(model_type.to_string()))?;
        let usize_of = |key: &str| -> Result<usize, ConfigError> {
            v[key].as_u64().map(|x| x as usize).ok_or_else(|| ConfigError::MissingInteger { key: key.to_string() })
        };
        let opt_usize = |key: &str| -> Result<Option<usize>, ConfigError> {
            match &v[key] {
                serde_json::Value::Null => Ok(None),
                x => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| ConfigError::NotAnInteger { key: key.to_string() }),
            }
        };
        let flag = |key: &str, default: bool| -> Result<bool, ConfigError> {
            match &v[key] {
                serde_json::Value::Null => Ok(default),
                x => x.as_bool().ok_or_else(|| ConfigError::NotABoolean { key: key.to_string() }),
            }
        };
        let hidden_size = usize_of("hidden_size")?;
        let num_heads = usize_of("num_attention_heads")?;
        let num_layers = usize_of("num_hidden_layers")?;
        if num_heads == 0 {
            return Err(ConfigError::ZeroHeads);
        }
        if flag("mlp_bias", false)? {
            return Err(ConfigError::MlpBias);
        }
        let max_position_embeddings = opt_usize("max_position_embeddings")?.unwrap_or(4096);
        let (rope_theta, rope_scaling) = RopeScaling::from_hf_json(v, max_position_embeddings)?;
        // transformers' defaults: Qwen3 heads are 128 wide whatever the hidden size; Mistral
        // slides a 4096-key window unless the config says null; Qwen2 and Qwen3 slide only
        // with use_sliding_window.
        let head_dim =
            opt_usize("head_dim")?.unwrap_or(if arch == Arch::Qwen3 { 128 } else { hidden_size / num_heads });
        let sliding_window = match arch {
            Arch::Llama => None,
            Arch::Mistral => match v.get("sliding_window") {
                None => Some(4096),
                Some(_) => opt_usize("sliding_window")?,
            },
            Arch::Qwen2 | Arch::Qwen3 => {
                qwen_sliding_layers(v, num_layers, flag("use_sliding_window", false)?, opt_usize("sliding_window")?)?;
                None
            }
        };
        let cfg = Self {
            arch,
            vocab_size: usize_of("vocab_size")?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads: opt_usize("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            max_position_embeddings,
            tie_word_embeddings: flag("tie_word_embeddings", false)?,
            // Mistral's q/k/v never carry biases, whatever the flag says (transformers').
            attention_bias: match arch {
                Arch::Qwen2 => flag("attention_bias", true)?,
                Arch::Mistral => false,
                Arch::Llama | Arch::Qwen3 => flag("attention_bias", false)?,
            },
            sliding_window,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Refuses a Qwen2 / Qwen3 config whose layers would slide a window (`use_sliding_window`
/// with `sliding_window` set, on the layers `layer_types` names, or else those from
/// `max_window_layers` on): one window for only some layers is not implemented.
fn qwen_sliding_layers(
    v: &serde_json::Value,
    num_layers: usize,
    use_sliding_window: bool,
    window: Option<usize>,
) -> Result<(), ConfigError> {
    let Some(window) = window.filter(|_| use_sliding_window) else { return Ok(()) };
    let sliding = match v["layer_types"].as_array() {
        Some(types) => types.iter().filter(|t| t.as_str() == Some("sliding_attention")).count(),
        None => {
            let full = v["max_window_layers"].as_u64().map(|x| x as usize).unwrap_or(28);
            num_layers.saturating_sub(full)
        }
    };
    if sliding > 0 {
        return Err(ConfigError::SlidingLayers { window, sliding, layers: num_layers });
    }
    Ok(())
}

/// A dense projection inside a decoder layer (LoRA can target any of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    /// Every targetable projection.
    pub const ALL: [Projection; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// PEFT / Hugging Face module name (`q_proj`).
    pub fn module_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// Path inside a decoder layer (`self_attn.q_proj`).
    pub fn module_path(self) -> String {
        let parent = match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        };
        format!("{parent}.{}", self.module_name())
    }

    /// `(out, in)` of this projection for a model.
    pub fn dims(self, cfg: &DecoderConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        match self {
            Self::Q => (q, h),
            Self::K | Self::V => (kv, h),
            Self::O => (h, q),
            Self::Gate | Self::Up => (cfg.intermediate_size, h),
            Self::Down => (h, cfg.intermediate_size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A small Llama `config.json` with `extra` merged in.
    fn config(extra: serde_json::Value) -> serde_json::Value {
        let mut v = json!({
            "model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn read(extra: serde_json::Value) -> Result<DecoderConfig, ConfigError> {
        DecoderConfig::from_hf_json(&config(extra))
    }

    const LLAMA3: RopeScaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
    };

    #[test]
    fn transformers_4_and_5_forms_read_the_same() {
        let params = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16});
        let mut t5 = params.clone();
        t5["rope_type"] = json!("llama3");
        t5["rope_theta"] = json!(500.0);
        let mut t4 = params.clone();
        t4["rope_type"] = json!("llama3");
        let mut t4_type = params;
        t4_type["type"] = json!("llama3");
        let a = read(json!({"rope_parameters": t5})).unwrap();
        let b = read(json!({"rope_theta": 500.0, "rope_scaling": t4})).unwrap();
        let c = read(json!({"rope_theta": 500.0, "rope_scaling": t4_type})).unwrap();
        assert_eq!((a.rope_theta, &a.rope_scaling), (500.0, &LLAMA3));
        assert_eq!(a, b);
        assert_eq!(a, c);
        // Nothing given: theta 10 000, no scaling (an empty rope_scaling is nothing).
        let d = read(json!({"rope_scaling": {}})).unwrap();
        assert_eq!((d.rope_theta, d.rope_scaling), (10_000.0, RopeScaling::Default));
    }

    #[test]
    fn precedence_follows_transformers() {
        // A non-empty rope_scaling wins over rope_parameters; their rope_theta over the
        // top-level one; a top-level original_max_position_embeddings over theirs.
        let c = read(json!({
            "rope_theta": 700.0,
            "rope_scaling": {"type": "linear", "factor": 3.0},
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 900.0},
        }))
        .unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (700.0, RopeScaling::Linear { factor: 3.0 }));
        let c = read(json!({"rope_theta": 700.0, "rope_parameters": {"rope_type": "default", "rope_theta": 900.0}}))
            .unwrap();
        assert_eq!(c.rope_theta, 900.0);
        let c = read(json!({
            "original_max_position_embeddings": 32,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        }))
        .unwrap();
        let RopeScaling::Yarn { original_max_position_embeddings, .. } = c.rope_scaling else { panic!() };
        assert_eq!(original_max_position_embeddings, 32);
    }

    #[test]
    fn yarn_defaults_and_attention_factor_are_transformers() {
        let c = read(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})).unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 128,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
                attention_factor: 0.1 * 4f64.ln() + 1.0,
            }
        );
        // A null factor is the ratio of the lengths; mscale / mscale_all_dim set the factor.
        let c =
            read(json!({"rope_scaling": {"rope_type": "yarn", "factor": null, "original_max_position_embeddings": 32,
                                             "mscale": 2.0, "mscale_all_dim": 1.0, "beta_fast": 0, "truncate": false}}))
            .unwrap();
        let RopeScaling::Yarn { factor, beta_fast, truncate, attention_factor, .. } = c.rope_scaling else { panic!() };
        assert_eq!((factor, beta_fast, truncate), (4.0, 32.0, false));
        assert!((attention_factor - (0.2 * 4f64.ln() + 1.0) / (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        let c = read(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.5}})).unwrap();
        assert!(matches!(c.rope_scaling, RopeScaling::Yarn { attention_factor: 0.5, .. }));
        let e = read(json!({"rope_scaling": {"rope_type": "yarn"}})).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.factor"), "{e}");
    }

    #[test]
    fn untruncated_yarn_with_mscale_matches_transformers() {
        // transformers 5.24's _compute_yarn_parameters for this config (float32): frequencies
        // 3 to 5 lie inside the ramp (dimensions 2.6 to 5.6), where the blend is fractional.
        let c = read(json!({"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 4096, "truncate": false, "mscale": 2.0, "mscale_all_dim": 1.0}}))
        .unwrap();
        let want = [
            1.0,
            0.3162277638912201,
            0.10000000149011612,
            0.028613610193133354,
            0.006556970998644829,
            0.0012856319081038237,
            0.0002500000118743628,
            7.905694656074047e-05,
        ];
        let (got, scale) = c.rope_frequencies();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-7 * w, "{got:?}");
        }
        assert!((scale - 1.121751143713058).abs() < 1e-12, "{scale}");
    }

    #[test]
    fn other_rope_types_and_settings_are_refused_by_name() {
        for kind in ["dynamic", "longrope", "su", "proportional", "ntk"] {
            for key in ["rope_scaling", "rope_parameters"] {
                let e = read(json!({key: {"rope_type": kind, "factor": 2.0}})).unwrap_err().to_string();
                assert!(e.contains(&format!("{kind:?}")) && e.contains("not supported"), "{e}");
            }
            let e = read(json!({"rope_scaling": {"type": kind, "factor": 2.0}})).unwrap_err().to_string();
            assert!(e.contains(&format!("{kind:?}")), "{e}");
        }
        let e = read(json!({"rope_scaling": {"rope_type": "linear"}})).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.factor"), "{e}");
        let e = read(json!({"partial_rotary_factor": 0.5})).unwrap_err().to_string();
        assert!(e.contains("partial_rotary_factor"), "{e}");
        let e = read(json!({"rope_parameters": {"full_attention": {"rope_type": "default"}}})).unwrap_err().to_string();
        assert!(e.contains("per layer"), "{e}");
        let e = read(json!({"mlp_bias": true})).unwrap_err().to_string();
        assert!(e.contains("mlp_bias"), "{e}");
        let e = read(json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                             "high_freq_factor": 1.0}}))
        .unwrap_err()
        .to_string();
        assert!(e.contains("high_freq_factor"), "{e}");
    }

    #[test]
    fn refusals_are_typed() {
        let e = read(json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})).unwrap_err();
        assert!(matches!(&e, ConfigError::UnsupportedRope { rope } if rope == "dynamic"), "{e:?}");
        let e = read(json!({"rope_scaling": {"rope_type": "linear"}})).unwrap_err();
        assert!(
            matches!(&e, ConfigError::MissingRopeParameter { rope, key } if rope == "linear" && key == "rope_scaling.factor"),
            "{e:?}"
        );
        let e = read(json!({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 16,
                            "max_window_layers": 1}))
        .unwrap_err();
        assert!(matches!(e, ConfigError::SlidingLayers { window: 16, sliding: 1, layers: 2 }), "{e:?}");
        let e = read(json!({"num_key_value_heads": 3})).unwrap_err();
        assert!(matches!(e, ConfigError::HeadsNotMultiple { heads: 4, kv_heads: 3 }), "{e:?}");
        let mut c = read(json!({})).unwrap();
        c.rope_scaling = RopeScaling::FreqFactors { factors: vec![1.0; 8] };
        assert!(matches!(c.to_hf_json(), Err(ConfigError::FreqFactorsNotExportable)));
    }

    #[test]
    fn family_defaults_are_transformers() {
        let q = read(json!({"model_type": "qwen3"})).unwrap();
        assert_eq!((q.arch, q.head_dim, q.attention_bias, q.qk_norm()), (Arch::Qwen3, 128, false, true));
        let q = read(json!({"model_type": "qwen3", "head_dim": 24, "attention_bias": true})).unwrap();
        assert_eq!((q.head_dim, q.attention_bias), (24, true));
        let q = read(json!({"model_type": "qwen2"})).unwrap();
        assert_eq!((q.head_dim, q.attention_bias, q.qk_norm()), (16, true, false));
        let m = read(json!({"model_type": "mistral", "attention_bias": true})).unwrap();
        assert_eq!((m.sliding_window, m.attention_bias), (Some(4096), false));
        assert_eq!(read(json!({"model_type": "mistral", "sliding_window": null})).unwrap().sliding_window, None);
        assert_eq!(read(json!({"model_type": "mistral", "sliding_window": 24})).unwrap().sliding_window, Some(24));
        assert_eq!(read(json!({"sliding_window": 24})).unwrap().sliding_window, None, "Llama never slides");
    }

    #[test]
    fn qwen_sliding_layers_are_refused() {
        for model_type in ["qwen2", "qwen3"] {
            // Off, or on for no layer: fine.
            read(json!({"model_type": model_type, "use_sliding_window": false, "sliding_window": 16})).unwrap();
            read(json!({"model_type": model_type, "use_sliding_window": true, "sliding_window": 16,
                        "max_window_layers": 2}))
            .unwrap();
            let e = read(json!({"model_type": model_type, "use_sliding_window": true, "sliding_window": 16,
                                "max_window_layers": 1}))
            .unwrap_err()
            .to_string();
            assert!(e.contains("slides 1 of 2 layers"), "{e}");
            let e = read(json!({"model_type": model_type, "use_sliding_window": true, "sliding_window": 16,
                                "layer_types": ["sliding_attention", "sliding_attention"]}))
            .unwrap_err()
            .to_string();
            assert!(e.contains("slides 2 of 2 layers"), "{e}");
        }
    }

    #[test]
    fn hf_json_round_trips_and_freq_factors_do_not_export() {
        let yarn = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 16,
            beta_fast: 16.0,
            beta_slow: 2.0,
            truncate: false,
            attention_factor: 1.25,
        };
        for (model_type, scaling) in [
            ("llama", RopeScaling::Default),
            ("llama", RopeScaling::Linear { factor: 2.5 }),
            ("qwen3", LLAMA3),
            ("mistral", yarn),
            ("qwen2", RopeScaling::Default),
        ] {
            let mut c = read(json!({"model_type": model_type, "rope_theta": 500.0})).unwrap();
            c.rope_scaling = scaling;
            let back = DecoderConfig::from_hf_json(&c.to_hf_json().unwrap()).unwrap();
            assert_eq!(back, c);
        }
        let mut c = read(json!({})).unwrap();
        c.rope_scaling = RopeScaling::FreqFactors { factors: vec![1.0; 8] };
        assert!(c.to_hf_json().unwrap_err().to_string().contains("rope_freqs"));
    }

    #[test]
    fn configs_serialized_before_rope_scaling_still_read() {
        let old = json!({
            "arch": "qwen2", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 96, "num_layers": 2,
            "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 512, "tie_word_embeddings": false, "attention_bias": true,
        });
        let c: DecoderConfig = serde_json::from_value(old).unwrap();
        assert_eq!((c.rope_scaling, c.sliding_window), (RopeScaling::Default, None));
    }

    #[test]
    fn llama3_frequencies_equal_llama_cpp_rope_freqs_divisors() {
        // llama.cpp's converter writes rope_freqs[i] = the divisor of frequency i.
        let (theta, d, factor, lff, hff, old) = (500.0f64, 16usize, 8.0, 1.0, 4.0, 16.0);
        let factors: Vec<f64> = (0..d / 2)
            .map(|i| {
                let wavelen = 2.0 * std::f64::consts::PI * theta.powf(2.0 * i as f64 / d as f64);
                if wavelen < old / hff {
                    1.0
                } else if wavelen > old / lff {
                    factor
                } else {
                    let smooth = (old / wavelen - lff) / (hff - lff);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect();
        assert!(factors.iter().any(|&f| f > 1.0 && f < factor), "some frequency is blended: {factors:?}");
        let (want, s1) = LLAMA3.frequencies(theta, d);
        let (got, s2) = RopeScaling::FreqFactors { factors }.frequencies(theta, d);
        assert_eq!((s1, s2), (1.0, 1.0));
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() <= 1e-15 * a.abs(), "{a} vs {b}");
        }
    }
}
