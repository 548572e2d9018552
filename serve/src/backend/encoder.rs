//! The encoder engine: one BERT forward for every row of a batch (rows of different tasks and
//! head versions alike: the encoder is shared), mean pooling, then each run of rows through its
//! own task head. Answers are the head's logits; the HTTP layer turns them into probabilities
//! exactly as it does a decoder's answer log-probabilities.

use super::{InputError, KeptField, WeightsError};
use crate::contract::{Compute, Row, TaskEntry, VersionWeights};
use models::encoder::rows_f64;
use models::ClassifierHead;
use models::{EncodedInput, Encoder};
use shared::adapter::Manifest;
use shared::task::Task;
use std::path::Path;
use std::sync::Arc;

/// The encoder, on the engine thread.
pub struct EncoderEngine {
    encoder: Arc<Encoder>,
}

impl EncoderEngine {
    /// An engine over `encoder`.
    pub fn new(encoder: Arc<Encoder>) -> Self {
        Self { encoder }
    }
}

impl Compute for EncoderEngine {
    fn score(&mut self, rows: &[&Row]) -> Result<Vec<Vec<f64>>, models::Error> {
        let inputs: Vec<EncodedInput> =
            rows.iter().map(|r| EncodedInput { ids: r.body.clone(), type_ids: r.type_ids.clone() }).collect();
        let refs: Vec<&EncodedInput> = inputs.iter().collect();
        let embeddings = self.encoder.embed(&refs)?;
        // Rows of one head version form one matmul.
        let mut out: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].version.as_ref().map(|v| v.id).unwrap_or(0));
        let id = |i: usize| rows[i].version.as_ref().map(|v| v.id);
        for group in order.chunk_by(|&a, &b| id(a) == id(b)) {
            let head = rows[group[0]]
                .version
                .as_ref()
                .and_then(|v| v.head())
                .ok_or_else(|| models::Error::Invalid("an encoder row without a head".into()))?;
            let index: Vec<u32> = group.iter().map(|&i| i as u32).collect();
            let index = candle_core::Tensor::from_vec(index, group.len(), embeddings.device())?;
            let logits = head.logits(&embeddings.index_select(&index, 0)?)?;
            for (&i, row) in group.iter().zip(rows_f64(&logits)?) {
                out[i] = row;
            }
        }
        Ok(out)
    }

    /// No prompt, no prefix: a row costs its own tokens.
    fn cost(&self, row: &Row) -> usize {
        row.body.len()
    }
}

/// An encoder input: `[CLS] field [SEP] field [SEP]` of the kept tokens themselves (no detour
/// through text), fields in the task's order, with segment ids.
pub fn input_tokens(
    encoder: &Encoder,
    entry: &TaskEntry,
    kept: &[KeptField],
) -> Result<(Vec<u32>, Vec<u32>), InputError> {
    let texts: Vec<&[u32]> =
        entry.task.fields.iter().filter_map(|f| kept.iter().find(|k| k.name == f)).map(|k| k.ids).collect();
    let input = encoder.input(&texts);
    if input.ids.len() > encoder.max_len() {
        return Err(InputError::TooLong { context: encoder.max_len() });
    }
    Ok((input.ids, input.type_ids))
}

/// An encoder's task entry: no prompt and no answers (the head scores the classes).
pub fn task_entry(task: &Task) -> TaskEntry {
    TaskEntry {
        task: task.clone(),
        prefix_text: String::new(),
        prefix_ids: Vec::new(),
        answers: Vec::new(),
        scoring: None,
    }
}

/// A version's classification head from `dir`, its manifest checked against the encoder and
/// the task.
pub fn load_head(
    encoder: &Encoder,
    dir: &Path,
    manifest: &Manifest,
    encoder_sha256: &str,
    task: &Task,
) -> Result<VersionWeights, WeightsError> {
    manifest.check_head(encoder_sha256, task)?;
    let head = ClassifierHead::load(dir, encoder.hidden_size(), task.num_classes(), encoder.device())
        .map_err(WeightsError::Head)?;
    Ok(VersionWeights::Head(head))
}
