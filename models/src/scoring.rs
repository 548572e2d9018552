//! Constrained label scoring: the exact log-probability of every candidate answer's full token
//! sequence after each prompt.
//!
//! Two forwards per batch, whatever the answers' lengths: one prefill of the prompts (optionally
//! continuing from a prefix cache), whose last logits give every candidate's first token; then
//! one teacher-forced forward of all candidates at once (each prompt's cache repeated once per
//! candidate of more than one token), whose logits give the rest. A forward of a few tokens
//! costs about as much as one of one token (per-op overhead dominates), so this beats walking
//! the candidates token by token.

use crate::batch::{KvCache, Padding, TokenBatch};
use crate::decoder::{Adapters, Decoder, LogitsAt, Mode};
use crate::lora::LoraAdapter;
use crate::Error;
use candle_core::{Tensor, D};

/// Log-probabilities `[prompt][candidate]` of each candidate continuing each prompt.
///
/// `prefix` is a one-row cache of text shared by every prompt (a task's constant prompt start);
/// `prompts` then hold only what follows it. Without a prefix, `prompts` are whole prompts.
pub fn score_candidates(
    model: &Decoder,
    adapter: Option<&LoraAdapter>,
    prefix: Option<&KvCache>,
    prompts: &[Vec<u32>],
    candidates: &[Vec<u32>],
    pad_id: u32,
) -> Result<Vec<Vec<f64>>, Error> {
    let cache = match prefix {
        Some(p) => p.expand_batch(prompts.len())?,
        None => KvCache::new(model.config().num_layers),
    };
    let per_row: Vec<&[Vec<u32>]> = vec![candidates; prompts.len()];
    score_rows(model, Adapters::Same(adapter), cache, prompts, &per_row, pad_id)
}

/// The general form of [`score_candidates`], for a batch that mixes tasks and adapters: row
/// `i` continues `cache` row `i` (an empty cache: no prefix; rows of different lengths:
/// [`KvCache::stack`]) with `prompts[i]` through adapter `adapters.row(i)`, and its candidates
/// are `candidates[i]`. Row `i`'s answer is the one it gets scored alone.
pub fn score_rows(
    model: &Decoder,
    adapters: Adapters,
    mut cache: KvCache,
    prompts: &[Vec<u32>],
    candidates: &[&[Vec<u32>]],
    pad_id: u32,
) -> Result<Vec<Vec<f64>>, Error> {
    let b = prompts.len();
    if candidates.len() != b || (cache.batch_size() != 0 && cache.batch_size() != b) {
        return Err(Error::Invalid(format!(
            "{b} prompts, {} candidate sets, a cache of {} rows",
            candidates.len(),
            cache.batch_size()
        )));
    }
    if candidates.iter().flat_map(|c| c.iter()).any(Vec::is_empty) {
        return Err(Error::Invalid("a candidate answer has no tokens".into()));
    }
    let batch = TokenBatch::new(prompts, pad_id, Padding::Right)?;
    let logits = model
        .forward_rows(&batch, Some(&mut cache), adapters, Mode::Inference, LogitsAt::Last)?
        .logits
        .ok_or_else(|| Error::Invalid("no logits".into()))?;
    // First tokens, from the prefill's last position.
    let (mut rows, mut toks) = (Vec::new(), Vec::new());
    for (i, cands) in candidates.iter().enumerate() {
        for c in cands.iter() {
            rows.push(i);
            toks.push(c[0]);
        }
    }
    let first = pick_log_probs(&logits, &rows, &toks)?;
    let mut out: Vec<Vec<f64>> = candidates.iter().map(|c| vec![0f64; c.len()]).collect();
    let mut k = 0;
    for (i, cands) in candidates.iter().enumerate() {
        for slot in out[i].iter_mut().take(cands.len()) {
            *slot = first[k];
            k += 1;
        }
    }
    // The rest: every longer candidate fed (but its last token) after its prompt, one forward.
    let mut owners = Vec::new();
    let mut feeds = Vec::new();
    for (i, cands) in candidates.iter().enumerate() {
        for (c, cand) in cands.iter().enumerate() {
            if cand.len() > 1 {
                owners.push((i, c));
                feeds.push(cand[..cand.len() - 1].to_vec());
            }
        }
    }
    if feeds.is_empty() {
        return Ok(out);
    }
    let mut rest_cache = cache.select_rows(&owners.iter().map(|&(i, _)| i).collect::<Vec<_>>())?;
    let row_adapters: Vec<Option<&LoraAdapter>> = owners.iter().map(|&(i, _)| adapters.row(i)).collect();
    let rest_adapters = match adapters {
        Adapters::Same(a) => Adapters::Same(a),
        Adapters::PerRow(_) => Adapters::PerRow(&row_adapters),
    };
    let (mut positions, mut logit_rows, mut next_toks) = (Vec::new(), Vec::new(), Vec::new());
    for (r, (&(i, c), feed)) in owners.iter().zip(&feeds).enumerate() {
        for j in 0..feed.len() {
            positions.push((r, j));
            logit_rows.push(positions.len() - 1);
            next_toks.push(candidates[i][c][j + 1]);
        }
    }
    let step = TokenBatch::new(&feeds, pad_id, Padding::Right)?;
    let logits = model
        .forward_rows(&step, Some(&mut rest_cache), rest_adapters, Mode::Inference, LogitsAt::Positions(positions))?
        .logits
        .ok_or_else(|| Error::Invalid("no logits".into()))?;
    let rest = pick_log_probs(&logits, &logit_rows, &next_toks)?;
    let mut k = 0;
    for (&(i, c), feed) in owners.iter().zip(&feeds) {
        for _ in 0..feed.len() {
            out[i][c] += rest[k];
            k += 1;
        }
    }
    Ok(out)
}

/// `log_softmax(logits[rows[n]])[tokens[n]]` for each `n`, without copying whole vocabularies.
fn pick_log_probs(logits: &Tensor, rows: &[usize], tokens: &[u32]) -> Result<Vec<f64>, Error> {
    let device = logits.device();
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F32)?, D::Minus1)?;
    let rows = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), device)?;
    let toks = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), device)?;
    let picked = lp.index_select(&rows, 0)?.gather(&toks, D::Minus1)?.squeeze(1)?;
    Ok(picked.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

/// Normalises each row's candidate log-probabilities into a probability distribution.
pub fn normalize(logps: &[f64]) -> Vec<f64> {
    let max = logps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logps.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_gives_probabilities() {
        let p = normalize(&[(0.2f64).ln(), (0.6f64).ln()]);
        assert!((p[0] - 0.25).abs() < 1e-12 && (p[1] - 0.75).abs() < 1e-12);
    }
}
