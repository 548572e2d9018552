//! The model behind the server: a decoder answering with constrained scoring through per-task
//! LoRA adapters, or a BERT encoder answering through per-task linear heads. Everything above
//! it (HTTP, validation and limits, the queue and batching, the registry and hot swap,
//! metrics) is the same for both; the compute each runs is behind `contract::Compute`
//! (`decoder::Engine`, `encoder::EncoderEngine`).

pub mod decoder;
pub mod encoder;

use crate::contract::{TaskEntry, VersionWeights};
use models::{Encoder, LoadedModel};
use shared::adapter::{Manifest, ManifestError, MANIFEST_FILE};
use shared::task::{AnswerScoring, ScoringError, Task, TaskError};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The loaded model.
#[derive(Clone)]
pub enum Backend {
    /// A decoder: tasks are prompts, adapters are LoRA (`decoder`).
    Decoder(Arc<LoadedModel>),
    /// An encoder: inputs are `[CLS] text [SEP]`, adapters are classification heads
    /// (`encoder`).
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

    /// How a decoder lays out task prompts (`LoadedModel::prompt_layout`); `None` for an encoder.
    pub fn prompt_layout(&self) -> Option<&'static str> {
        match self {
            Backend::Decoder(m) => Some(m.prompt_layout()),
            Backend::Encoder(_) => None,
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

/// One input field's tokens as the limits leave them.
pub struct KeptField<'a> {
    pub name: &'a str,
    /// The tokens kept (all of them, or the end truncation keeps).
    pub ids: &'a [u32],
    /// Whether tokens were cut.
    pub cut: bool,
}

/// Why a task cannot be served on this model: its prompt does not render, or its prefix or
/// answers do not tokenize.
#[derive(Debug, thiserror::Error)]
pub enum TaskEntryError {
    #[error(transparent)]
    Prompt(#[from] TaskError),
    #[error("cannot tokenize the prompt's prefix: {0}")]
    Tokenize(models::Error),
    #[error(transparent)]
    Answers(#[from] ScoringError),
}

/// Why a version's weights are refused: its manifest is missing or does not fit, or its
/// tensors do not load, are not finite, or do not merge.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("no {MANIFEST_FILE}: the server only loads adapters tied to their base and template")]
    NoManifest,
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("cannot load the adapter: {0}")]
    Adapter(models::Error),
    #[error("tensor {0} is not finite")]
    NotFinite(String),
    #[error("cannot merge the adapter: {0}")]
    Merge(models::Error),
    #[error("cannot load the head: {0}")]
    Head(models::Error),
}

/// Why an input cannot become the engine's tokens.
#[derive(Debug)]
pub enum InputError {
    Tokenize(models::Error),
    /// The task's template refuses the fields.
    Prompt(String),
    /// The input would change the prompt's cached prefix.
    PrefixChanged,
    /// Longer than the model's context.
    TooLong {
        context: usize,
    },
}

impl Backend {
    /// One input's engine tokens and segment ids (a decoder's: none) from its fields (`fields`,
    /// the text) and their kept tokens: each backend's half of tokenization
    /// ([`decoder::prompt_body`], [`encoder::input_tokens`]).
    pub fn input_tokens(
        &self,
        entry: &TaskEntry,
        fields: BTreeMap<String, String>,
        kept: &[KeptField],
    ) -> Result<(Vec<u32>, Vec<u32>), InputError> {
        match self {
            Backend::Decoder(m) => Ok((decoder::prompt_body(m, entry, fields, kept)?, Vec::new())),
            Backend::Encoder(e) => encoder::input_tokens(e, entry, kept),
        }
    }

    /// A task's constant parts for this model, its answers scored as `scoring` says (an
    /// encoder reads no prompt: all empty).
    pub fn task_entry(&self, task: &Task, scoring: AnswerScoring) -> Result<TaskEntry, TaskEntryError> {
        match self {
            Backend::Decoder(m) => decoder::task_entry(task, m, scoring),
            Backend::Encoder(_) => Ok(encoder::task_entry(task)),
        }
    }

    /// A version's weights read from its directory `dir` and checked against this model
    /// (`base_sha256`) and `task` by its manifest: a LoRA adapter (merged into a copy of the
    /// base when `merged`) or an encoder head.
    pub fn load_weights(
        &self,
        dir: &Path,
        manifest: &Manifest,
        base_sha256: &str,
        task: &Task,
        merged: bool,
    ) -> Result<VersionWeights, WeightsError> {
        match self {
            Backend::Decoder(m) => decoder::load_lora(m, dir, manifest, base_sha256, task, merged),
            Backend::Encoder(e) => encoder::load_head(e, dir, manifest, base_sha256, task),
        }
    }
}
