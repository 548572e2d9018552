//! What the HTTP layer, the scheduler and the engines agree on: the rows to score, the tasks
//! they belong to, and the `Compute` trait the scheduler's worker thread drives. Below all of
//! them; it imports none of them.

use models::{ClassifierHead, Decoder, LoraAdapter};
use shared::adapter::Manifest;
use shared::task::{AnswerScoring, Task};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// A task as the engine needs it: the prompt's constant prefix and every label's answer,
/// tokenized once (a decoder's; an encoder reads no prompt, so both are empty).
pub struct TaskEntry {
    pub task: Task,
    pub prefix_text: String,
    pub prefix_ids: Vec<u32>,
    /// Answer token ids per label, in class order: the whole answers or the label words alone
    /// (`--answer-scoring`).
    pub answers: Vec<Vec<u32>>,
    /// What `answers` hold (`None`: an encoder's head, no answers).
    pub scoring: Option<AnswerScoring>,
}

impl TaskEntry {
    /// Tokens of the longest answer.
    pub fn max_answer_len(&self) -> usize {
        self.answers.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// One loaded adapter version.
pub struct AdapterVersion {
    pub version: String,
    /// Unique for each load (also of the same version): keys the prefix cache.
    pub id: u64,
    pub weights: VersionWeights,
    pub manifest: Manifest,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
    /// The table's clock when a request last named this version (or it was loaded): the
    /// least recently used versions are evicted first.
    pub(crate) last_used: AtomicU64,
}

/// What a version holds, by backend.
pub enum VersionWeights {
    /// A decoder's LoRA adapter; in merged mode also the base with it folded in.
    Lora { adapter: LoraAdapter, merged: Option<Box<Decoder>> },
    /// An encoder's classification head.
    Head(ClassifierHead),
}

impl AdapterVersion {
    /// The LoRA adapter (decoder backend).
    pub fn lora(&self) -> Option<&LoraAdapter> {
        match &self.weights {
            VersionWeights::Lora { adapter, .. } => Some(adapter),
            VersionWeights::Head(_) => None,
        }
    }

    /// Merged mode: the base model with this adapter folded into its weights.
    pub fn merged(&self) -> Option<&Decoder> {
        match &self.weights {
            VersionWeights::Lora { merged, .. } => merged.as_deref(),
            VersionWeights::Head(_) => None,
        }
    }

    /// The classification head (encoder backend).
    pub fn head(&self) -> Option<&ClassifierHead> {
        match &self.weights {
            VersionWeights::Head(h) => Some(h),
            VersionWeights::Lora { .. } => None,
        }
    }
}

/// One input to score.
pub struct Row {
    pub task: Arc<TaskEntry>,
    /// `None`: zero-shot (the base model alone).
    pub version: Option<Arc<AdapterVersion>>,
    /// The prompt's body tokens (what follows the task's prefix); an encoder's whole input.
    pub body: Vec<u32>,
    /// An encoder input's segment ids (empty for a decoder).
    pub type_ids: Vec<u32>,
}

impl Row {
    /// The (task, version) this row runs as: rows of one key share a prefix and an adapter.
    pub(crate) fn key(&self) -> (&str, u64) {
        (self.task.task.name.as_str(), self.version.as_ref().map(|v| v.id).unwrap_or(0))
    }
}

/// What the engine thread computes with: the decoder engine (`backend::decoder`) or the encoder
/// engine (`backend::encoder`). Runs on the engine thread only.
pub trait Compute: Send {
    /// Label scores `[row][label]` of every row (log-probabilities or logits: the HTTP layer
    /// normalises them), in the rows' order.
    fn score(&mut self, rows: &[&Row]) -> Result<Vec<Vec<f64>>, models::Error>;
    /// The tokens `row` costs in a batch (what the queue's token budget counts): what this
    /// backend runs for it.
    fn cost(&self, row: &Row) -> usize;
}
