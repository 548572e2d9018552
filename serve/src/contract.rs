//! What the HTTP layer, the scheduler and the engines agree on: the rows to score, the tasks
//! they belong to, and the `Compute` trait the scheduler's worker thread drives. Below all of
//! them; it imports none of them.

use crate::adapters::AdapterVersion;
use crate::backend::Backend;
use models::LoadedModel;
use shared::task::{AnswerScoring, Task};
use std::collections::BTreeMap;
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
    /// The task's constant parts for `backend`, its answers scored as `scoring` says.
    pub fn new(task: &Task, backend: &Backend, scoring: AnswerScoring) -> Result<Self, String> {
        match backend {
            Backend::Decoder(loaded) => Self::for_decoder(task, loaded, scoring),
            Backend::Encoder(_) => Ok(Self {
                task: task.clone(),
                prefix_text: String::new(),
                prefix_ids: Vec::new(),
                answers: Vec::new(),
                scoring: None,
            }),
        }
    }

    /// Renders and tokenizes the task's constant parts for `loaded`'s tokenizer and chat.
    fn for_decoder(task: &Task, loaded: &LoadedModel, scoring: AnswerScoring) -> Result<Self, String> {
        let probe: BTreeMap<String, String> = task.fields.iter().map(|f| (f.clone(), "x".to_string())).collect();
        let parts = task.prompt(loaded.chat.as_ref(), &[], &probe).map_err(|e| e.to_string())?;
        let prefix_ids = loaded.encode(&parts.prefix, true).map_err(|e| e.to_string())?;
        let scored = task.scored_candidates(scoring, |t| loaded.encode(t, false))?;
        if let Some(why) = &scored.fallback {
            tracing::warn!("{why}");
        }
        let (scoring, answers) = (scored.scoring, scored.candidates);
        Ok(Self { task: task.clone(), prefix_text: parts.prefix, prefix_ids, answers, scoring: Some(scoring) })
    }

    /// Tokens of the longest answer.
    pub fn max_answer_len(&self) -> usize {
        self.answers.iter().map(Vec::len).max().unwrap_or(0)
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

    /// Tokens this row costs (its prefix too when the prefix is not cached).
    pub fn tokens(&self, prefix_cached: bool) -> usize {
        self.body.len() + if prefix_cached { 0 } else { self.task.prefix_ids.len() }
    }
}

/// What the engine thread computes with: the decoder engine (`engine`) or the encoder engine
/// (`encoder_engine`). Runs on the engine thread only.
pub trait Compute: Send {
    /// Label scores `[row][label]` of every row (log-probabilities or logits: the HTTP layer
    /// normalises them), in the rows' order.
    fn score(&mut self, rows: &[&Row]) -> Result<Vec<Vec<f64>>, models::Error>;
    /// Whether task prefixes are cached (they then cost no batch tokens).
    fn prefix_cache(&self) -> bool;
}
