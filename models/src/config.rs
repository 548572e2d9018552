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
    #[error("a Gemma 3 whose sliding layers scale their rotary frequencies has no transformers-4 config.json form")]
    LocalRopeScalingNotExportable,
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
    #[error("unsupported model_type {0:?} (llama, mistral, qwen2, qwen3, gemma2 and gemma3_text are)")]
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
    #[error("config.json: {key} {value:?} is not supported ({supported} is)")]
    Activation { key: &'static str, value: String, supported: &'static str },
    #[error("config.json: layer_types has {got} entries for {layers} layers, or an entry other than sliding_attention / full_attention")]
    LayerTypes { got: usize, layers: usize },
    #[error("config.json: use_bidirectional_attention (an encoder-style Gemma) is not supported")]
    Bidirectional,
    #[error("config.json: {key} {value} must be a positive number")]
    NotPositiveSetting { key: &'static str, value: f64 },
}

/// The decoder families Verdict runs. They share one implementation; the differences are
/// spelled out as [`DecoderConfig`] fields (q/k/v bias, tied embeddings, sliding window, GGUF
/// Q/K layout, Gemma's [`GemmaSettings`]) and [`DecoderConfig::qk_norm`].
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
    /// Gemma 2: RMS norms scaling by `1 + w`, embeddings scaled by `sqrt(hidden)`, GeGLU (tanh
    /// GELU), norms after attention and after the MLP as well as before, soft-capped attention
    /// scores and logits, sliding-window layers alternating with full ones.
    Gemma2,
    /// Gemma 3 (text): Gemma 2's layout with per-head q/k norms instead of attention
    /// soft-capping, five sliding layers per full one, and their own rotary base.
    #[serde(rename = "gemma3_text")]
    Gemma3,
}

impl Arch {
    /// Every family, for tests that cover them all.
    pub const ALL: [Arch; 6] = [Self::Llama, Self::Mistral, Self::Qwen2, Self::Qwen3, Self::Gemma2, Self::Gemma3];

    /// Name used by GGUF (`general.architecture`) and by HF's `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3_text",
        }
    }

    /// Whether this is a Gemma family ([`GemmaSettings`] apply).
    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
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
            Self::Gemma2 => "Gemma2ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
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
    /// A query sees only the keys fewer than this many positions before it (Mistral: every
    /// layer; Gemma: the layers [`GemmaSettings::sliding_layers`] names).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Gemma 2 / 3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemma: Option<GemmaSettings>,
}

/// What Gemma 2 and 3 add to the shared layout (transformers 5.24's `modeling_gemma2.py` and
/// `modeling_gemma3.py`). Every RMS norm scales by `1 + w` (folded into the weights when
/// loaded), the embeddings are multiplied by `sqrt(hidden_size)`, the MLP is GeGLU with the
/// tanh GELU, and each layer norms the attention's and the MLP's outputs before adding them
/// (`post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmaSettings {
    /// Per layer: whether it slides [`DecoderConfig::sliding_window`] (else it sees every key).
    pub sliding_layers: Vec<bool>,
    /// The sliding layers' rotary base and scaling (Gemma 3's `rope_local_base_freq`; Gemma 2:
    /// the full layers').
    pub local_rope_theta: f64,
    #[serde(default)]
    pub local_rope_scaling: RopeScaling,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`, not `head_dim^-1/2`.
    pub query_pre_attn_scalar: f64,
    /// `cap · tanh(score / cap)` on the attention scores before the mask (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// `cap · tanh(logit / cap)` on the LM head's output (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
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

    /// Queries and keys get a per-head RMS norm before the rotary embedding (Qwen3, Gemma 3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.arch, Arch::Qwen3 | Arch::Gemma3)
    }

    /// The rotary inverse frequencies and the factor cos and sin are multiplied by.
    pub fn rope_frequencies(&self) -> (Vec<f64>, f64) {
        self.rope_scaling.frequencies(self.rope_theta, self.head_dim)
    }

    /// The sliding layers' rotary frequencies where they differ from the full layers' (Gemma 3).
    pub fn local_rope_frequencies(&self) -> Option<(Vec<f64>, f64)> {
        let g = self.gemma.as_ref()?;
        if g.local_rope_theta == self.rope_theta && g.local_rope_scaling == self.rope_scaling {
            return None;
        }
        Some(g.local_rope_scaling.frequencies(g.local_rope_theta, self.head_dim))
    }

    /// The RMS norms of one layer, by checkpoint name (Gemma's four, the others' two).
    pub fn layer_norms(&self) -> &'static [&'static str] {
        if self.arch.is_gemma() {
            &["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
        } else {
            &["input_layernorm", "post_attention_layernorm"]
        }
    }

    /// Whether layer `i` is one of a Gemma's `sliding_attention` layers (its own mask and, on
    /// Gemma 3, its own rotary tables).
    pub fn local_layer(&self, layer: usize) -> bool {
        self.gemma.as_ref().is_some_and(|g| g.sliding_layers.get(layer).copied().unwrap_or(false))
    }

    /// Whether layer `i` slides the attention window (every layer of a Mistral with a window;
    /// the sliding layers of a Gemma).
    pub fn slides(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && (self.gemma.is_none() || self.local_layer(layer))
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
        if let Some(g) = &self.gemma {
            if g.sliding_layers.len() != self.num_layers {
                return Err(ConfigError::LayerTypes { got: g.sliding_layers.len(), layers: self.num_layers });
            }
            if !(g.local_rope_theta.is_finite() && g.local_rope_theta > 1.0) {
                return Err(ConfigError::RopeTheta(g.local_rope_theta));
            }
            let positive = |key: &'static str, x: f64| {
                if x.is_finite() && x > 0.0 {
                    Ok(())
                } else {
                    Err(ConfigError::NotPositiveSetting { key, value: x })
                }
            };
            positive("query_pre_attn_scalar", g.query_pre_attn_scalar)?;
            if let Some(c) = g.attn_logit_softcapping {
                positive("attn_logit_softcapping", c)?;
            }
            if let Some(c) = g.final_logit_softcapping {
                positive("final_logit_softcapping", c)?;
            }
            g.local_rope_scaling.validate(self.head_dim)?;
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
        if let Some(g) = &self.gemma {
            let o = v.as_object_mut().expect("an object");
            o.remove("hidden_act");
            o.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
            o.insert("sliding_window".into(), serde_json::json!(self.sliding_window));
            let types: Vec<&str> =
                g.sliding_layers.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
            o.insert("layer_types".into(), serde_json::json!(types));
            // transformers 5.24 declares it an int and refuses `8.0`.
            let scalar = g.query_pre_attn_scalar;
            let scalar =
                if scalar.fract() == 0.0 { serde_json::json!(scalar as u64) } else { serde_json::json!(scalar) };
            o.insert("query_pre_attn_scalar".into(), scalar);
            o.insert("attn_logit_softcapping".into(), serde_json::json!(g.attn_logit_softcapping));
            o.insert("final_logit_softcapping".into(), serde_json::json!(g.final_logit_softcapping));
            if self.arch == Arch::Gemma3 {
                // The transformers-4 form, which transformers 5 reads: the top-level rope
                // settings are the full layers', rope_local_base_freq the sliding layers'.
                if g.local_rope_scaling != RopeScaling::Default {
                    return Err(ConfigError::LocalRopeScalingNotExportable);
                }
                o.insert("rope_local_base_freq".into(), serde_json::json!(g.local_rope_theta));
            }
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
        let max_position_embeddings = opt_usize("max_position_embeddings")?.unwrap_or(match arch {
            Arch::Gemma2 => 8192,
            Arch::Gemma3 => 131_072,
            _ => 4096,
        });
        // The MLP's activation: SiLU (SwiGLU) for every family but Gemma's tanh GELU (GeGLU).
        let (act_key, want) =
            if arch.is_gemma() { ("hidden_activation", "gelu_pytorch_tanh") } else { ("hidden_act", "silu") };
        let act = match (&v[act_key], &v["hidden_act"]) {
            (serde_json::Value::Null, serde_json::Value::Null) => want,
            (serde_json::Value::Null, x) | (x, _) => {
                x.as_str().ok_or_else(|| ConfigError::NotAString { key: act_key.to_string() })?
            }
        };
        if act != want {
            return Err(ConfigError::Activation { key: act_key, value: act.to_string(), supported: want });
        }
        let (rope_theta, rope_scaling, local_rope) = if arch == Arch::Gemma3 {
            gemma3_rope(v, max_position_embeddings)?
        } else {
            let (theta, scaling) = RopeScaling::from_hf_json(v, max_position_embeddings)?;
            (theta, scaling, None)
        };
        // transformers' defaults: Qwen3 heads are 128 wide whatever the hidden size; Mistral
        // slides a 4096-key window unless the config says null; Qwen2 and Qwen3 slide only
        // with use_sliding_window.
        let head_dim = opt_usize("head_dim")?.unwrap_or(match arch {
            Arch::Qwen3 => 128,
            Arch::Gemma2 | Arch::Gemma3 => 256,
            _ => hidden_size / num_heads,
        });
        let sliding_window = match arch {
            Arch::Llama => None,
            Arch::Mistral | Arch::Gemma2 | Arch::Gemma3 => match v.get("sliding_window") {
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
            tie_word_embeddings: flag("tie_word_embeddings", arch.is_gemma())?,
            // Mistral's q/k/v never carry biases, whatever the flag says (transformers').
            attention_bias: match arch {
                Arch::Qwen2 => flag("attention_bias", true)?,
                Arch::Mistral => false,
                Arch::Llama | Arch::Qwen3 | Arch::Gemma2 | Arch::Gemma3 => flag("attention_bias", false)?,
            },
            sliding_window,
            gemma: None,
        };
        let cfg = if arch.is_gemma() {
            if flag("use_bidirectional_attention", false)? {
                return Err(ConfigError::Bidirectional);
            }
            let number = |key: &str, default: Option<f64>| -> Result<Option<f64>, ConfigError> {
                match v.get(key) {
                    None => Ok(default),
                    Some(serde_json::Value::Null) => Ok(None),
                    Some(x) => x.as_f64().map(Some).ok_or_else(|| ConfigError::NotANumber { key: key.to_string() }),
                }
            };
            let (local_rope_theta, local_rope_scaling) =
                local_rope.unwrap_or_else(|| (cfg.rope_theta, cfg.rope_scaling.clone()));
            let soft = if arch == Arch::Gemma2 { (Some(50.0), Some(30.0)) } else { (None, None) };
            let gemma = GemmaSettings {
                sliding_layers: gemma_sliding_layers(v, arch, num_layers)?,
                local_rope_theta,
                local_rope_scaling,
                query_pre_attn_scalar: number("query_pre_attn_scalar", Some(256.0))?.unwrap_or(256.0),
                attn_logit_softcapping: number("attn_logit_softcapping", soft.0)?,
                final_logit_softcapping: number("final_logit_softcapping", soft.1)?,
            };
            Self { gemma: Some(gemma), ..cfg }
        } else {
            cfg
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Gemma 3's rotary settings: `(theta, scaling)` of the full layers and, separately, of the
/// sliding ones. transformers 5 writes `rope_parameters: {full_attention: {...},
/// sliding_attention: {...}}`; transformers 4 the full layers' as usual and the sliding ones'
/// base as `rope_local_base_freq` (default 10,000, never scaled).
type RopeSettings = (f64, RopeScaling);
fn gemma3_rope(v: &serde_json::Value, max_pos: usize) -> Result<(f64, RopeScaling, Option<RopeSettings>), ConfigError> {
    let per_type = v["rope_parameters"].as_object().filter(|p| p.values().any(|x| x.is_object()));
    if let Some(p) = per_type {
        let one = |layer_type: &str| -> Result<RopeSettings, ConfigError> {
            let mut alone = v.clone();
            let o = alone.as_object_mut().expect("an object");
            o.remove("rope_scaling");
            o.insert("rope_parameters".into(), p.get(layer_type).cloned().unwrap_or_default());
            RopeScaling::from_hf_json(&alone, max_pos)
        };
        if let Some(other) = p.keys().find(|k| !matches!(k.as_str(), "full_attention" | "sliding_attention")) {
            return Err(ConfigError::PerLayerRope { key: "rope_parameters", layer_type: other.clone() });
        }
        let (theta, scaling) = one("full_attention")?;
        return Ok((theta, scaling, Some(one("sliding_attention")?)));
    }
    let (theta, scaling) = RopeScaling::from_hf_json(v, max_pos)?;
    let local = match &v["rope_local_base_freq"] {
        serde_json::Value::Null => 10_000.0,
        x => x.as_f64().ok_or_else(|| ConfigError::NotANumber { key: "rope_local_base_freq".into() })?,
    };
    Ok((theta, scaling, Some((local, RopeScaling::Default))))
}

/// Which Gemma layers slide the window: `layer_types` where given, else transformers'
/// defaults (Gemma 2: every other layer from the first; Gemma 3: all but every
/// `sliding_window_pattern`-th, 6 by default).
fn gemma_sliding_layers(v: &serde_json::Value, arch: Arch, layers: usize) -> Result<Vec<bool>, ConfigError> {
    if let Some(types) = v["layer_types"].as_array() {
        let parsed: Option<Vec<bool>> = types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Some(true),
                Some("full_attention") => Some(false),
                _ => None,
            })
            .collect();
        return match parsed {
            Some(p) if p.len() == layers => Ok(p),
            _ => Err(ConfigError::LayerTypes { got: types.len(), layers }),
        };
    }
    if arch == Arch::Gemma2 {
        return Ok((0..layers).map(|i| i % 2 == 0).collect());
    }
    let pattern =
        ["sliding_window_pattern", "_sliding_window_pattern"].iter().find_map(|k| v[k].as_u64()).unwrap_or(6).max(1)
            as usize;
    Ok((0..layers).map(|i| (i + 1) % pattern != 0).collect())
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
    fn gemma_defaults_and_transformers_4_forms_are_transformers() {
        // Gemma 2 without layer_types or soft-caps: every other layer slides, from the first;
        // scores capped at 50, logits at 30; 256-wide heads; tied embeddings.
        let g = read(json!({"model_type": "gemma2", "num_hidden_layers": 4, "hidden_activation": "gelu_pytorch_tanh"}))
            .unwrap();
        let s = g.gemma.clone().unwrap();
        assert_eq!((g.head_dim, g.tie_word_embeddings, g.sliding_window), (256, true, Some(4096)));
        assert_eq!(s.sliding_layers, vec![true, false, true, false]);
        assert_eq!((s.attn_logit_softcapping, s.final_logit_softcapping), (Some(50.0), Some(30.0)));
        assert_eq!((s.query_pre_attn_scalar, s.local_rope_theta), (256.0, g.rope_theta));
        assert!(g.local_rope_frequencies().is_none());
        assert_eq!((0..4).map(|i| g.slides(i)).collect::<Vec<_>>(), vec![true, false, true, false]);
        // Explicit nulls switch the caps and the window off.
        let g = read(json!({"model_type": "gemma2", "attn_logit_softcapping": null, "final_logit_softcapping": null,
                            "sliding_window": null}))
        .unwrap();
        let s = g.gemma.clone().unwrap();
        assert_eq!((s.attn_logit_softcapping, s.final_logit_softcapping, g.sliding_window), (None, None, None));
        assert!(!g.slides(0));
        // Gemma 3, transformers-4 form: pattern 3 slides all but every third layer; the full
        // layers get rope_theta + rope_scaling, the sliding ones rope_local_base_freq unscaled.
        let g = read(json!({"model_type": "gemma3_text", "num_hidden_layers": 6, "sliding_window_pattern": 3,
                            "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}))
        .unwrap();
        let s = g.gemma.clone().unwrap();
        assert_eq!(s.sliding_layers, vec![true, true, false, true, true, false]);
        assert_eq!((g.rope_theta, &g.rope_scaling), (1e6, &RopeScaling::Linear { factor: 8.0 }));
        assert_eq!((s.local_rope_theta, &s.local_rope_scaling), (1e4, &RopeScaling::Default));
        assert_eq!((s.attn_logit_softcapping, s.final_logit_softcapping), (None, None));
        assert!(g.qk_norm());
        let (local, _) = g.local_rope_frequencies().unwrap();
        assert_eq!(local[1], 1.0 / 1e4f64.powf(2.0 / 256.0));
        // The same in the transformers-5 form reads the same.
        let t5 = read(json!({"model_type": "gemma3_text", "num_hidden_layers": 6,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                            "sliding_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}))
        .unwrap();
        assert_eq!(t5, g);
        // Written back (transformers-4 form) and read again: the same config; an integral
        // query_pre_attn_scalar as an integer (transformers 5.24 refuses 256.0).
        let written = g.to_hf_json().unwrap();
        assert!(written["query_pre_attn_scalar"].is_u64(), "{written}");
        assert_eq!(DecoderConfig::from_hf_json(&written).unwrap(), g);
        // The default pattern is 6.
        let g = read(json!({"model_type": "gemma3_text", "num_hidden_layers": 7})).unwrap();
        assert_eq!(g.gemma.unwrap().sliding_layers, vec![true, true, true, true, true, false, true]);
    }

    #[test]
    fn what_gemma_would_get_wrong_is_refused_by_name() {
        let e = read(json!({"model_type": "gemma2", "hidden_activation": "gelu"})).unwrap_err();
        assert!(e.to_string().contains("hidden_activation \"gelu\""), "{e}");
        let e = read(json!({"model_type": "llama", "hidden_act": "gelu"})).unwrap_err();
        assert!(e.to_string().contains("hidden_act \"gelu\""), "{e}");
        let e = read(json!({"model_type": "gemma3_text", "use_bidirectional_attention": true})).unwrap_err();
        assert!(matches!(e, ConfigError::Bidirectional), "{e}");
        let e = read(json!({"model_type": "gemma2", "layer_types": ["sliding_attention"]})).unwrap_err();
        assert!(matches!(e, ConfigError::LayerTypes { got: 1, layers: 2 }), "{e}");
        let e =
            read(json!({"model_type": "gemma2", "layer_types": ["chunked_attention", "full_attention"]})).unwrap_err();
        assert!(matches!(e, ConfigError::LayerTypes { .. }), "{e}");
        let e = read(json!({"model_type": "gemma3_text",
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                "chunked_attention": {"rope_type": "default", "rope_theta": 1e4}}}))
        .unwrap_err();
        assert!(e.to_string().contains("chunked_attention"), "{e}");
        let e = read(json!({"model_type": "gemma2", "query_pre_attn_scalar": 0})).unwrap_err();
        assert!(e.to_string().contains("query_pre_attn_scalar"), "{e}");
        // Per-layer rotary settings stay refused outside Gemma 3.
        let e = read(json!({"model_type": "gemma2",
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}))
        .unwrap_err();
        assert!(matches!(e, ConfigError::PerLayerRope { .. }), "{e}");
        let e = read(json!({"model_type": "gemma3"})).unwrap_err();
        assert!(e.to_string().contains("gemma3_text are"), "{e}");
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
