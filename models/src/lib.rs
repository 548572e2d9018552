//! LoRA-ready decoder-only language models for Verdict.
//!
//! - [`decoder`]: the Llama / Mistral / Qwen2 / Qwen3 transformer with an inference path (fused
//!   kernels, quantized weights) and a training path (differentiable ops, gradients only for LoRA).
//! - [`lora`]: adapters kept apart from the base weights.
//! - [`load`]: GGUF files and Hugging Face directories, with their tokenizers.
//! - [`encoder`]: BERT-family encoders with a linear classification head (the baseline).

pub mod batch;
pub mod config;
pub mod cpu;
pub mod decoder;
pub mod device;
pub mod encoder;
pub mod fast;
pub mod generate;
pub mod gguf;
pub mod head;
pub mod hf;
pub mod linear;
pub mod load;
pub mod loaded;
pub mod lora;
pub mod pack;
pub mod peft;
pub mod random;
pub mod scoring;
pub mod tokenizer;
pub mod weights;

pub use batch::{KvCache, Padding, TokenBatch};
pub use config::{Arch, DecoderConfig};
pub use decoder::{Adapters, Decoder, DecoderOutput, LogitsAt, Mode};
pub use device::{DTypeSpec, DeviceSpec};
pub use encoder::{ClassifierHead, EncodedInput, Encoder, EncoderSource};
pub use head::ScalarHead;
pub use load::{load_for, load_model, load_model_with, read_config, read_meta, LoadOptions};
pub use loaded::{LoadedModel, ModelMeta, SpecialTokens};
pub use lora::{LoraAdapter, LoraConfig, Projection};
pub use shared::chat::{ChatMessage, ChatTemplate};
pub use weights::WeightMode;

/// Errors from loading and running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    File(#[from] std::io::Error),
    #[error("tensor {0} is missing from the weights")]
    MissingTensor(String),
    #[error("{0}")]
    Format(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    ChatTemplate(#[from] shared::chat::ChatError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A GGUF's metadata made a config that fails [`DecoderConfig::validate`].
    #[error("GGUF: {0}")]
    GgufConfig(config::ConfigError),
    #[error(transparent)]
    Kernels(#[from] cpu::KernelError),
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}
