//! The model behind the server: a decoder answering with constrained scoring through per-task
//! LoRA adapters, or a BERT encoder answering through per-task linear heads. Everything above
//! it (HTTP, validation and limits, the queue and batching, the registry and hot swap,
//! metrics) is the same for both; the compute each runs is behind `scheduler::Compute`.

use models::{Encoder, LoadedModel};
use std::sync::Arc;

/// The loaded model.
#[derive(Clone)]
pub enum Backend {
    /// A decoder: tasks are prompts, adapters are LoRA (`engine`).
    Decoder(Arc<LoadedModel>),
    /// An encoder: inputs are `[CLS] text [SEP]`, adapters are classification heads
    /// (`encoder_engine`).
    Encoder(Arc<Encoder>),
}

impl Backend {
    /// The architecture, for `/ready`.
    pub fn arch(&self) -> String {
        match self {
            Backend::Decoder(m) => m.model.config().arch.name().to_string(),
            Backend::Encoder(_) => "bert".to_string(),
        }
    }

    /// Token ids of one input field, read as plain text (it cannot spell a special token).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, models::Error> {
        match self {
            Backend::Decoder(m) => m.encode_text(text),
            Backend::Encoder(e) => e.encode(text),
        }
    }

    /// The text of token ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String, models::Error> {
        match self {
            Backend::Decoder(m) => m.decode(ids),
            Backend::Encoder(e) => e.decode(ids),
        }
    }

    /// Whether `id` is a special token of the tokenizer (a chat marker, `[SEP]`, ...).
    pub fn is_special(&self, id: u32) -> bool {
        match self {
            Backend::Decoder(m) => models::tokenizer::is_added(&m.tokenizer, id),
            Backend::Encoder(e) => e.is_special(id),
        }
    }
}
