//! Constrained label scoring: the exact log-probability of every candidate answer's full token
//! sequence after each prompt (for candidates of one token each, the logit: the same label
//! distribution without the full-vocabulary product).
//!
//! One forward per batch, whatever the answers' lengths. Each row is its prompt followed by
//! every candidate of more than one token (all but its last token) as a branch of a depth-1
//! token tree ([`TokenBatch::with_branches`]): a branch sees the cache, its prompt and its own
//! earlier tokens, never another candidate, and takes the positions it would have alone after
//! the prompt. The prompt's last logits give every candidate's first token, each branch
//! position's logits the candidate's next one. On a CPU every forward streams all the weights
//! once, so one forward of a few more tokens costs far less than a second forward.

use crate::batch::{KvCache, TokenBatch};
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
    cache: KvCache,
    prompts: &[Vec<u32>],
    candidates: &[&[Vec<u32>]],
    pad_id: u32,
) -> Result<Vec<Vec<f64>>, Error> {
    let rows: Vec<usize> = (0..prompts.len()).collect();
    score_layout(model, adapters, cache, prompts, candidates, &rows, false, pad_id)
}

/// [`score_rows`] without padding: prompt `i` is packed, with its candidates, into row
/// `row_of[i]` of the batch as a segment of its own ([`TokenBatch::with_segments`]). Row `r`
/// continues `cache` row `r` through `adapters.row(r)`, so pack prompts that share a prefix and
/// an adapter into one row. Every prompt computes what it would compute alone (up to float
/// rounding): a batch of prompts of different lengths costs the sum of their lengths instead
/// of rows times the longest.
pub fn score_packed(
    model: &Decoder,
    adapters: Adapters,
    cache: KvCache,
    prompts: &[Vec<u32>],
    candidates: &[&[Vec<u32>]],
    row_of: &[usize],
    pad_id: u32,
) -> Result<Vec<Vec<f64>>, Error> {
    score_layout(model, adapters, cache, prompts, candidates, row_of, true, pad_id)
}

/// Lays out prompt `i` and its candidates in row `row_of[i]` (as a segment when `segmented`,
/// else alone in its row) and runs one forward.
#[allow(clippy::too_many_arguments)]
fn score_layout(
    model: &Decoder,
    adapters: Adapters,
    mut cache: KvCache,
    prompts: &[Vec<u32>],
    candidates: &[&[Vec<u32>]],
    row_of: &[usize],
    segmented: bool,
    pad_id: u32,
) -> Result<Vec<Vec<f64>>, Error> {
    let b = prompts.len();
    let n_rows = row_of.iter().max().map_or(0, |m| m + 1);
    if candidates.len() != b || row_of.len() != b || (cache.batch_size() != 0 && cache.batch_size() != n_rows) {
        return Err(Error::Invalid(format!(
            "{b} prompts, {} candidate sets, {} row assignments for {n_rows} rows, a cache of {} rows",
            candidates.len(),
            row_of.len(),
            cache.batch_size()
        )));
    }
    if candidates.iter().flat_map(|c| c.iter()).any(Vec::is_empty) {
        return Err(Error::Invalid("a candidate answer has no tokens".into()));
    }
    if prompts.iter().any(Vec::is_empty) {
        // The first answer token is read from the prompt's last logits.
        return Err(Error::Invalid("a prompt has no tokens".into()));
    }
    if !segmented && (0..b).any(|i| row_of[i] != i) {
        return Err(Error::Invalid("unsegmented rows hold one prompt each".into()));
    }
    // Prompt i: its tokens on its row's trunk (branch 0), then candidate c's tokens but the
    // last as branch c + 1, all in segment i + 1. `columns` are the (row, column) positions
    // that get logits; `picks` (logit row, prompt, candidate, token) the log-probabilities
    // summed into each candidate's score.
    let mut ids = vec![Vec::new(); n_rows];
    let mut branches = vec![Vec::new(); n_rows];
    let mut segments = vec![Vec::new(); n_rows];
    let (mut columns, mut picks) = (Vec::new(), Vec::new());
    for (i, (prompt, cands)) in prompts.iter().zip(candidates).enumerate() {
        let r = row_of[i];
        let (row, branch, segment) = (&mut ids[r], &mut branches[r], &mut segments[r]);
        let seg = i as u32 + 1;
        row.extend_from_slice(prompt);
        branch.resize(row.len(), 0);
        segment.resize(row.len(), seg);
        let last = columns.len();
        columns.push((r, row.len() - 1));
        for (c, cand) in cands.iter().enumerate() {
            picks.push((last, i, c, cand[0]));
            for j in 0..cand.len() - 1 {
                picks.push((columns.len(), i, c, cand[j + 1]));
                columns.push((r, row.len()));
                row.push(cand[j]);
                branch.push(c as u32 + 1);
                segment.push(seg);
            }
        }
    }
    if ids.iter().any(Vec::is_empty) {
        return Err(Error::Invalid("a packed row holds no prompt".into()));
    }
    // Right padding: masked, on the trunk of the row's last segment.
    let len = ids.iter().map(Vec::len).max().unwrap_or(0);
    let mask = ids.iter().map(|r| (0..len).map(|k| k < r.len()).collect()).collect();
    for ((row, branch), segment) in ids.iter_mut().zip(&mut branches).zip(&mut segments) {
        let last_segment = segment.last().copied().unwrap_or(0);
        row.resize(len, pad_id);
        branch.resize(len, 0);
        segment.resize(len, last_segment);
    }
    let batch = if segmented {
        TokenBatch::with_segments(ids, mask, branches, segments)?
    } else {
        TokenBatch::with_branches(ids, mask, branches)?
    };
    // One-token candidates (label words alone): the label distribution needs only those
    // tokens' logits at each prompt's last position, since the log-softmax normaliser is the
    // same for every candidate of a prompt. Scores are then the logits (log-probabilities up
    // to a constant per prompt); `normalize` gives the same probabilities.
    if candidates.iter().all(|cs| cs.iter().all(|c| c.len() == 1)) {
        let mut tokens: Vec<u32> = candidates.iter().flat_map(|cs| cs.iter().map(|c| c[0])).collect();
        tokens.sort_unstable();
        tokens.dedup();
        let logits = model
            .forward_rows(
                &batch,
                Some(&mut cache),
                adapters,
                Mode::Inference,
                LogitsAt::PositionsAt { positions: columns, tokens: tokens.clone() },
            )?
            .logits
            .ok_or_else(|| Error::Invalid("no logits".into()))?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        let mut out: Vec<Vec<f64>> = candidates.iter().map(|c| vec![0f64; c.len()]).collect();
        for &(row, i, c, tok) in &picks {
            let k = tokens.binary_search(&tok).expect("every candidate token was asked for");
            out[i][c] = f64::from(logits[row][k]);
        }
        return Ok(out);
    }
    // A branched forward leaves `cache` as it was: it is only read.
    let logits = model
        .forward_rows(&batch, Some(&mut cache), adapters, Mode::Inference, LogitsAt::Positions(columns))?
        .logits
        .ok_or_else(|| Error::Invalid("no logits".into()))?;
    let rows: Vec<usize> = picks.iter().map(|p| p.0).collect();
    let toks: Vec<u32> = picks.iter().map(|p| p.3).collect();
    let log_probs = match crate::fast::pick_log_probs(&logits, &rows, &toks, model.kernels())? {
        Some(lp) => lp,
        None => pick_log_probs(&logits, &rows, &toks)?,
    };
    let mut out: Vec<Vec<f64>> = candidates.iter().map(|c| vec![0f64; c.len()]).collect();
    for (&(_, i, c, _), lp) in picks.iter().zip(log_probs) {
        out[i][c] += lp;
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
