//! Training data shared by SFT and PPO: each task's training split read and tokenized once
//! (the task's constant prompt prefix apart from each example's body), and the seeded plan of
//! which examples form each batch of an epoch. Batches hold one task each, so a batch shares
//! its prefix.

use crate::data::{self, TaskSelection};
use crate::seeds;
use anyhow::{bail, Context, Result};
use models::{Decoder, DecoderOutput, KvCache, LoadedModel, LogitsAt, LoraAdapter, Mode, Padding, TokenBatch};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use shared::task::CLOSE_TAG_STEM;
use shared::task::{AnswerScoring, Label, Task};
use std::path::Path;

/// One tokenized training example.
pub struct Example {
    /// The prompt after the task's prefix.
    pub body: Vec<u32>,
    /// The gold answer's tokens (label word and closing tag).
    pub answer: Vec<u32>,
    pub label: Label,
}

/// A task's tokenized training data.
pub struct TaskData {
    pub task: Task,
    pub prefix: Vec<u32>,
    pub examples: Vec<Example>,
}

/// `(task index, example indices)` for every batch of one epoch.
pub type EpochPlan = Vec<(usize, Vec<usize>)>;

/// The batches of one epoch, from the seed.
pub fn plan_epoch(data: &[TaskData], batch_size: usize, seed: u64, epoch: u64) -> EpochPlan {
    let mut batches = Vec::new();
    for (t, d) in data.iter().enumerate() {
        let mut idx: Vec<usize> = (0..d.examples.len()).collect();
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seeds::task_order(seed, epoch, t as u64)));
        for chunk in idx.chunks(batch_size) {
            batches.push((t, chunk.to_vec()));
        }
    }
    batches.shuffle(&mut ChaCha8Rng::seed_from_u64(seeds::epoch_order(seed, epoch)));
    batches
}

/// Batches per epoch for `batch_size`.
pub fn batches_per_epoch(data: &[TaskData], batch_size: usize) -> usize {
    data.iter().map(|d| d.examples.len().div_ceil(batch_size)).sum()
}

/// The batch at global position `pos` (epochs follow one another), re-planned when the epoch
/// changes. Depends only on the seed and `pos`, so a resumed run sees the same batches.
pub struct BatchPlan {
    batch_size: usize,
    per_epoch: u64,
    seed: u64,
    current: Option<(u64, EpochPlan)>,
}

impl BatchPlan {
    pub fn new(data: &[TaskData], batch_size: usize, seed: u64) -> Self {
        Self { batch_size, per_epoch: batches_per_epoch(data, batch_size) as u64, seed, current: None }
    }

    /// `(task index, example indices)` of batch number `pos`.
    pub fn batch(&mut self, data: &[TaskData], pos: u64) -> (usize, Vec<usize>) {
        let (epoch, index) = (pos / self.per_epoch, (pos % self.per_epoch) as usize);
        if self.current.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.current = Some((epoch, plan_epoch(data, self.batch_size, self.seed, epoch)));
        }
        self.current.as_ref().expect("planned").1[index].clone()
    }
}

fn tokenize_task(loaded: &LoadedModel, task: &Task, items: &[data::Item]) -> Result<TaskData> {
    let mut prefix = None;
    let mut examples = Vec::with_capacity(items.len());
    for it in items {
        let parts = task.prompt(loaded.chat.as_ref(), &[], &it.raw.fields)?;
        match &prefix {
            None => prefix = Some(parts.prefix.clone()),
            Some(p) if p != &parts.prefix => bail!("task {}: prompts do not share one prefix", task.name),
            _ => {}
        }
        let answer = loaded.encode(&Task::answer_text(&task.label_word(it.label)), false)?;
        examples.push(Example { body: loaded.encode_body(&parts)?, answer, label: it.label });
    }
    let prefix = loaded.encode(&prefix.context("no training examples")?, true)?;
    Ok(TaskData { task: task.clone(), prefix, examples })
}

/// Reads and tokenizes the training split of every selected task.
pub fn load(
    loaded: &LoadedModel,
    select: &TaskSelection,
    train_limit: Option<usize>,
    cache: &Path,
) -> Result<Vec<TaskData>> {
    load_split(loaded, select, "train", train_limit, cache)
}

/// Reads and tokenizes split `split` (its first `limit` examples) of every selected task.
pub fn load_split(
    loaded: &LoadedModel,
    select: &TaskSelection,
    split: &str,
    limit: Option<usize>,
    cache: &Path,
) -> Result<Vec<TaskData>> {
    if select.data.is_some() && select.tasks.len() > 1 {
        return Err(crate::Failure::Usage(
            "--data names one task's directory; a mix reads each task's default data".into(),
        )
        .into());
    }
    let registry = select.registry()?;
    let mut data = Vec::new();
    for name in &select.tasks {
        let task = registry.get(name)?.clone();
        let dir = data::data_dir(&task, select.data.as_deref(), cache)?;
        let (mut items, _) = data::read_split(&task, &dir, split, false)?;
        if let Some(n) = limit {
            items.truncate(n);
        }
        data.push(tokenize_task(loaded, &task, &items)?);
        eprintln!("task {}: {} {split} examples", name, items.len());
    }
    Ok(data)
}

/// Runs the one-row `prefix` once and its KV broadcast to every row of `seqs` (right-padded),
/// the way every training pass (SFT loss, PPO scores, reward-model scores) runs a batch of one
/// task. In training mode the rows get their own dropout masks (`seed ^ 0x5555`). Returns the
/// output for the rows and their padded length.
pub fn forward_after_prefix(
    model: &Decoder,
    adapter: Option<&LoraAdapter>,
    prefix: &[u32],
    seqs: &[Vec<u32>],
    pad: u32,
    mode: Mode,
    logits_at: LogitsAt,
) -> Result<(DecoderOutput, usize)> {
    let body_mode = match mode {
        Mode::Train { dropout_seed: Some(s) } => Mode::Train { dropout_seed: Some(s ^ 0x5555) },
        m => m,
    };
    let batch = TokenBatch::new(seqs, pad, Padding::Right)?;
    let t = batch.seq_len();
    if prefix.is_empty() {
        return Ok((model.forward(&batch, None, adapter, body_mode, logits_at)?, t));
    }
    let mut cache = KvCache::new(model.config().num_layers);
    model.forward(&TokenBatch::single(prefix)?, Some(&mut cache), adapter, mode, LogitsAt::None)?;
    let mut cache = cache.expand_batch(seqs.len())?;
    Ok((model.forward(&batch, Some(&mut cache), adapter, body_mode, logits_at)?, t))
}

/// Every class's answer continuation (label word and closing tag), tokenized, in class order.
pub fn encode_answers(loaded: &LoadedModel, task: &Task) -> Result<Vec<Vec<u32>>> {
    Ok(encode_scored(loaded, task, AnswerScoring::Full)?.1)
}

/// What constrained scoring compares for each class under `scoring`, tokenized, in class
/// order, and the scoring used ([`Task::scored_candidates`]: word scoring falls back to full
/// answers, with a warning, where the words cannot be told apart alone).
pub fn encode_scored(
    loaded: &LoadedModel,
    task: &Task,
    scoring: AnswerScoring,
) -> Result<(AnswerScoring, Vec<Vec<u32>>)> {
    let scored = task.scored_candidates(scoring, |t| loaded.encode(t, false))?;
    if let Some(why) = &scored.fallback {
        eprintln!("warning: {why}");
    }
    Ok((scored.scoring, scored.candidates))
}

/// The closing tag's stem in the tokenizations it can take after an answer: generation stops
/// once its output ends with one of these.
pub fn close_tag_stops(loaded: &LoadedModel) -> Result<Vec<Vec<u32>>> {
    Ok([format!(" {CLOSE_TAG_STEM}"), CLOSE_TAG_STEM.to_string()]
        .iter()
        .map(|t| loaded.encode(t, false))
        .collect::<Result<_, _>>()?)
}

/// The one-row prefix's KV under `adapter` (inference), for sampling after it.
pub fn prefix_cache(model: &Decoder, adapter: Option<&LoraAdapter>, prefix: &[u32]) -> Result<KvCache> {
    let mut cache = KvCache::new(model.config().num_layers);
    model.forward(&TokenBatch::single(prefix)?, Some(&mut cache), adapter, Mode::Inference, LogitsAt::None)?;
    Ok(cache)
}
