//! Hyper-parameters of a decoder-only transformer, read from GGUF metadata or a Hugging Face
//! `config.json`.

use serde::{Deserialize, Serialize};

/// The decoder families Verdict runs. They share one implementation; the differences are
/// spelled out as [`DecoderConfig`] fields (q/k/v bias, tied embeddings, GGUF Q/K layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama family (SmolLM2, Llama 2/3).
    Llama,
    /// Qwen2 family (Qwen2, Qwen2.5).
    Qwen2,
}

impl Arch {
    /// Name used by GGUF (`general.architecture`) and by HF's `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    /// Parses a GGUF architecture / HF model type.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
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
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry a bias (Qwen2).
    pub attention_bias: bool,
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

    /// Query heads per key/value head (grouped-query attention).
    pub fn heads_per_kv(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head dimension {} must be even for rotary embeddings", self.head_dim));
        }
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 {
            return Err("hidden size, layer count and vocabulary must be non-zero".into());
        }
        Ok(())
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

    /// The Hugging Face `config.json` form of this config.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (model_type, architectures) = match self.arch {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        };
        serde_json::json!({
            "architectures": [architectures],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }

    /// Reads a Hugging Face `config.json` (Llama or Qwen2).
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Self, String> {
        let model_type = v["model_type"].as_str().ok_or("config.json has no model_type")?;
        let arch = Arch::from_name(model_type)
            .ok_or_else(|| format!("unsupported model_type {model_type:?} (llama and qwen2 are)"))?;
        let usize_of = |key: &str| -> Result<usize, String> {
            v[key].as_u64().map(|x| x as usize).ok_or_else(|| format!("config.json: missing or non-integer {key}"))
        };
        let hidden_size = usize_of("hidden_size")?;
        let num_heads = usize_of("num_attention_heads")?;
        let cfg = Self {
            arch,
            vocab_size: usize_of("vocab_size")?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_layers: usize_of("num_hidden_layers")?,
            num_heads,
            num_kv_heads: v["num_key_value_heads"].as_u64().map(|x| x as usize).unwrap_or(num_heads),
            head_dim: v["head_dim"].as_u64().map(|x| x as usize).unwrap_or(hidden_size / num_heads),
            rope_theta: v["rope_theta"].as_f64().unwrap_or(10_000.0),
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            max_position_embeddings: v["max_position_embeddings"].as_u64().unwrap_or(4096) as usize,
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            attention_bias: v["attention_bias"].as_bool().unwrap_or(arch == Arch::Qwen2),
        };
        cfg.validate()?;
        Ok(cfg)
    }
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
