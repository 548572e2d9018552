//! Decoding with the KV cache: greedy for smoke tests, and batched sampling (temperature,
//! top-k, top-p) for the free-generation evaluation mode and for rollouts.

use crate::batch::{KvCache, Padding, TokenBatch};
use crate::decoder::{Decoder, LogitsAt, Mode};
use crate::lora::LoraAdapter;
use crate::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Greedily extends `prompt` by up to `max_new` tokens, stopping after a token in `stop`.
/// Returns only the new tokens.
pub fn greedy(
    model: &Decoder,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    adapter: Option<&LoraAdapter>,
) -> Result<Vec<u32>, Error> {
    let settings = Sampling { max_new_tokens: max_new, ..Sampling::greedy() };
    Ok(generate(model, adapter, None, &[prompt.to_vec()], &settings, stop, 0)?.remove(0))
}

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f64,
    /// Never stop before this many new tokens (stop tokens are masked until then).
    pub min_new_tokens: usize,
    pub max_new_tokens: usize,
    /// A row also stops once its output ends with one of these token sequences (e.g. the
    /// closing answer tag, in the tokenizations it can take).
    pub stop_sequences: Vec<Vec<u32>>,
    /// When not empty, every output is one of these token sequences: each token is sampled
    /// from the model's distribution renormalised over the tokens that continue one of them
    /// (see [`allowed_next`]), and a row stops once it has produced a whole one.
    pub restrict_to: Vec<Vec<u32>>,
}

impl Sampling {
    /// Argmax decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_new_tokens: 0,
            max_new_tokens: 32,
            stop_sequences: Vec::new(),
            restrict_to: Vec::new(),
        }
    }
}

/// Extends every prompt (after an optional one-row shared `prefix` cache) until a stop token
/// or `max_new_tokens`; returns each row's new tokens, the stop token included. Rows are
/// independent: padding never changes what a row generates. Seeded, so reruns are identical.
pub fn generate(
    model: &Decoder,
    adapter: Option<&LoraAdapter>,
    prefix: Option<&KvCache>,
    prompts: &[Vec<u32>],
    settings: &Sampling,
    stop: &[u32],
    seed: u64,
) -> Result<Vec<Vec<u32>>, Error> {
    let b = prompts.len();
    let mut cache = match prefix {
        Some(p) => p.expand_batch(b)?,
        None => KvCache::new(model.config().num_layers),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let pad = stop.first().copied().unwrap_or(0);
    let mut batch = TokenBatch::new(prompts, pad, Padding::Right)?;
    for step in 0..settings.max_new_tokens {
        let logits =
            model.forward(&batch, Some(&mut cache), adapter, Mode::Inference, LogitsAt::Last)?.logits.expect("logits");
        let rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for (i, mut row) in rows.into_iter().enumerate() {
            if step < settings.min_new_tokens {
                for &s in stop {
                    row[s as usize] = f32::NEG_INFINITY;
                }
            }
            if !settings.restrict_to.is_empty() && !done[i] {
                restrict_row(&mut row, &allowed_next(&settings.restrict_to, &out[i]));
            }
            let tok = if done[i] { pad } else { pick(&row, settings, &mut rng) };
            if !done[i] {
                out[i].push(tok);
                done[i] = stop.contains(&tok)
                    || settings.stop_sequences.iter().any(|seq| !seq.is_empty() && out[i].ends_with(seq))
                    || settings.restrict_to.iter().any(|seq| seq == &out[i]);
            }
            next.push(tok);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        // Finished rows keep feeding padding, masked out, so they cost one token per step.
        let ids: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        let mask: Vec<bool> = done.iter().map(|&d| !d).collect();
        batch = TokenBatch::with_mask(ids, mask.into_iter().map(|m| vec![m]).collect())?;
    }
    Ok(out)
}

/// The tokens that may follow `so_far` when the output must be one of `sequences`: the next
/// token of every sequence that starts with `so_far`, in first-seen order. Rollouts and the PPO
/// loss both renormalise the policy over exactly this set.
pub fn allowed_next(sequences: &[Vec<u32>], so_far: &[u32]) -> Vec<u32> {
    let mut next = Vec::new();
    for s in sequences {
        if s.len() > so_far.len() && s.starts_with(so_far) && !next.contains(&s[so_far.len()]) {
            next.push(s[so_far.len()]);
        }
    }
    next
}

/// Masks every logit outside `allowed` to -inf.
fn restrict_row(row: &mut [f32], allowed: &[u32]) {
    for (t, x) in row.iter_mut().enumerate() {
        if !allowed.contains(&(t as u32)) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Picks a token from one row of logits.
fn pick(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap_or(0);
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / s.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= s.top_p
        });
        let keep = keep.map(|k| k + 1).unwrap_or(probs.len());
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u: f64 = rng.random();
    for (p, &i) in probs.iter().zip(&idx) {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    idx[idx.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_and_zero_temperature_are_argmax() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(pick(&logits, &Sampling::greedy(), &mut rng), 1);
        let k1 = Sampling { temperature: 1.0, top_k: 1, ..Sampling::greedy() };
        for _ in 0..20 {
            assert_eq!(pick(&logits, &k1, &mut rng), 1);
        }
    }

    #[test]
    fn allowed_next_follows_the_sequences() {
        let seqs = vec![vec![5, 6, 9], vec![5, 7, 9], vec![8, 9]];
        assert_eq!(allowed_next(&seqs, &[]), vec![5, 8]);
        assert_eq!(allowed_next(&seqs, &[5]), vec![6, 7]);
        assert_eq!(allowed_next(&seqs, &[5, 7]), vec![9]);
        assert!(allowed_next(&seqs, &[5, 7, 9]).is_empty());
        assert!(allowed_next(&seqs, &[6]).is_empty());
        let mut row = vec![1.0f32; 10];
        restrict_row(&mut row, &[6, 7]);
        assert_eq!(row.iter().filter(|x| x.is_finite()).count(), 2);
        assert!(row[6].is_finite() && row[7].is_finite());
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]
        let logits = [0.0f32, 3f32.ln()];
        let s = Sampling { temperature: 1.0, ..Sampling::greedy() };
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let ones = (0..4000).filter(|_| pick(&logits, &s, &mut rng) == 1).count();
        assert!((ones as f64 / 4000.0 - 0.75).abs() < 0.03, "{ones}");
        // top_p 0.5 keeps only the 0.75 token.
        let p = Sampling { top_p: 0.5, ..s };
        assert!((0..50).all(|_| pick(&logits, &p, &mut rng) == 1));
    }
}
