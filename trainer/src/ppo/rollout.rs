//! Rollouts and the log-probabilities of responses.
//!
//! A rollout batch holds examples of one task, so the task's constant prompt prefix is run
//! once (one row) and its KV broadcast to every row, in sampling and in every scoring pass. The
//! same [`score_responses`] gives the old policy's log-probs and values (no gradients), the
//! reference log-probs (the same base with the adapter switched off: no second copy of the
//! weights) and, in training mode, the log-probs and values the PPO loss differentiates.

use crate::train_data::forward_after_prefix;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use models::generate::allowed_next;
use models::{Decoder, LogitsAt, LoraAdapter, Mode, ScalarHead};

/// Added to the logits of tokens outside the allowed set: finite, so `p * log p` stays 0.
const MASKED: f32 = -1e9;

/// Responses to score: each row is `prefix + body + response`.
pub struct Responses<'a> {
    pub prefix: &'a [u32],
    pub bodies: Vec<&'a [u32]>,
    pub responses: Vec<&'a [u32]>,
    /// When not empty, the action space: the policy is renormalised over the tokens that
    /// continue one of these sequences (as in restricted sampling).
    pub restrict_to: &'a [Vec<u32>],
}

impl Responses<'_> {
    /// Response tokens in all rows.
    pub fn num_tokens(&self) -> usize {
        self.responses.iter().map(|r| r.len()).sum()
    }
}

/// Per response token, rows one after another.
pub struct ResponseScores {
    /// `[n]` log-probability of each response token.
    pub logp: Tensor,
    /// `[n, vocab]` the whole (restricted) log-distribution at each response token.
    pub logp_all: Tensor,
    /// `[n]` the value head's estimate before each response token.
    pub values: Option<Tensor>,
}

/// Scores `r` under `model` with `adapter` (None: the reference policy) and an optional value
/// head. In `Mode::Train` the results carry gradients to the adapter's and the head's variables.
pub fn score_responses(
    model: &Decoder,
    adapter: Option<&LoraAdapter>,
    head: Option<&ScalarHead>,
    r: &Responses,
    mode: Mode,
    pad: u32,
) -> Result<ResponseScores> {
    let b = r.bodies.len();
    if b == 0 || r.responses.len() != b {
        bail!("score_responses: {} bodies, {} responses", b, r.responses.len());
    }
    if r.bodies.iter().any(|x| x.is_empty()) || r.responses.iter().any(|x| x.is_empty()) {
        bail!("score_responses: empty body or response");
    }
    let mut seqs = Vec::with_capacity(b);
    let mut positions = Vec::with_capacity(r.num_tokens());
    let mut targets = Vec::with_capacity(r.num_tokens());
    for (row, (body, resp)) in r.bodies.iter().zip(&r.responses).enumerate() {
        for (k, &t) in resp.iter().enumerate() {
            positions.push((row, body.len() - 1 + k));
            targets.push(t);
        }
        seqs.push(body.iter().chain(resp.iter()).copied().collect::<Vec<u32>>());
    }
    let (out, t) =
        forward_after_prefix(model, adapter, r.prefix, &seqs, pad, mode, LogitsAt::Positions(positions.clone()))?;
    let mut logits = out.logits.expect("logits requested").to_dtype(DType::F32)?;
    let n = targets.len();
    if !r.restrict_to.is_empty() {
        let vocab = logits.dim(1)?;
        let mut mask = vec![MASKED; n * vocab];
        let mut i = 0;
        for resp in &r.responses {
            for k in 0..resp.len() {
                let allowed = allowed_next(r.restrict_to, &resp[..k]);
                if !allowed.contains(&resp[k]) {
                    bail!("response {:?} leaves the restricted action space at token {k}", resp);
                }
                for a in allowed {
                    mask[i * vocab + a as usize] = 0.0;
                }
                i += 1;
            }
        }
        logits = logits.broadcast_add(&Tensor::from_vec(mask, (n, vocab), logits.device())?)?;
    }
    let logp_all = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let idx = Tensor::from_vec(targets, (n, 1), logp_all.device())?;
    let logp = logp_all.gather(&idx, 1)?.squeeze(1)?;
    let values = match head {
        Some(h) => {
            let hidden = out.hidden.reshape((b * t, out.hidden.dim(2)?))?;
            let rows: Vec<u32> = positions.iter().map(|&(row, col)| (row * t + col) as u32).collect();
            let idx = Tensor::from_vec(rows, n, hidden.device())?;
            Some(h.forward(&hidden.index_select(&idx, 0)?)?)
        }
        None => None,
    };
    Ok(ResponseScores { logp, logp_all, values })
}

/// A slice of a flat per-token vector per row.
pub fn split_rows<T: Clone>(flat: &[T], lens: &[usize]) -> Vec<Vec<T>> {
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &l in lens {
        out.push(flat[at..at + l].to_vec());
        at += l;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use models::random::{random_decoder, tiny_config};
    use models::{Arch, LoraConfig, Projection, TokenBatch, WeightMode};

    const VOCAB: usize = 64;

    fn model() -> Decoder {
        random_decoder(&tiny_config(Arch::Qwen2, VOCAB), 5, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap()
    }

    fn lora(random: bool) -> LoraAdapter {
        let cfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            use_rslora: false,
            dropout: 0.0,
            targets: vec![Projection::Q, Projection::V, Projection::Up],
            layers: None,
        };
        let m = tiny_config(Arch::Qwen2, VOCAB);
        if random {
            LoraAdapter::init_random(cfg, &m, 9, DType::F32, &Device::Cpu).unwrap()
        } else {
            LoraAdapter::init(cfg, &m, 9, DType::F32, &Device::Cpu).unwrap()
        }
    }

    /// Log-probs of each response token from one plain forward of the whole sequence, no
    /// prefix cache, no padding, no adapter: the independent reference.
    fn direct_logps(
        model: &Decoder,
        adapter: Option<&LoraAdapter>,
        prefix: &[u32],
        body: &[u32],
        resp: &[u32],
    ) -> Vec<f32> {
        let seq: Vec<u32> = prefix.iter().chain(body).chain(resp).copied().collect();
        let logits = model
            .forward(&TokenBatch::single(&seq).unwrap(), None, adapter, Mode::Inference, LogitsAt::All)
            .unwrap()
            .logits
            .unwrap()
            .squeeze(0)
            .unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().to_vec2::<f32>().unwrap();
        let start = prefix.len() + body.len();
        resp.iter().enumerate().map(|(k, &t)| logp[start - 1 + k][t as usize]).collect()
    }

    fn example() -> (Vec<u32>, Vec<Vec<u32>>, Vec<Vec<u32>>) {
        let prefix = vec![3, 4, 5, 6];
        let bodies = vec![vec![10, 11, 12], vec![13], vec![14, 15, 16, 17, 18]];
        let responses = vec![vec![40, 41, 42], vec![43], vec![44, 45]];
        (prefix, bodies, responses)
    }

    #[test]
    fn reference_policy_log_probs_equal_the_base_models() {
        let m = model();
        let adapter = lora(true);
        let (prefix, bodies, responses) = example();
        let r = Responses {
            prefix: &prefix,
            bodies: bodies.iter().map(|b| b.as_slice()).collect(),
            responses: responses.iter().map(|b| b.as_slice()).collect(),
            restrict_to: &[],
        };
        let lens: Vec<usize> = responses.iter().map(|x| x.len()).collect();
        // Adapter switched off: the plain base model's log-probs, row by row.
        let reference = score_responses(&m, None, None, &r, Mode::Inference, 0).unwrap();
        let got = split_rows(&reference.logp.to_vec1::<f32>().unwrap(), &lens);
        for i in 0..3 {
            let want = direct_logps(&m, None, &prefix, &bodies[i], &responses[i]);
            for (a, b) in got[i].iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "row {i}: {:?} vs {want:?}", got[i]);
            }
        }
        // The adapter on: different numbers (so the check above can fail), equal to the
        // direct forward with the adapter, in training mode too.
        for mode in [Mode::Inference, Mode::Train { dropout_seed: None }] {
            let policy = score_responses(&m, Some(&adapter), None, &r, mode, 0).unwrap();
            let got = split_rows(&policy.logp.to_vec1::<f32>().unwrap(), &lens);
            let mut max_diff_to_ref = 0f32;
            for i in 0..3 {
                let want = direct_logps(&m, Some(&adapter), &prefix, &bodies[i], &responses[i]);
                let base = direct_logps(&m, None, &prefix, &bodies[i], &responses[i]);
                for ((a, b), c) in got[i].iter().zip(&want).zip(&base) {
                    assert!((a - b).abs() < 1e-4, "row {i}: {:?} vs {want:?}", got[i]);
                    max_diff_to_ref = max_diff_to_ref.max((a - c).abs());
                }
            }
            assert!(max_diff_to_ref > 1e-3, "the adapter changes nothing: {max_diff_to_ref}");
        }
        // A fresh adapter (B = 0) is the reference policy exactly: KL starts at zero.
        let fresh = score_responses(&m, Some(&lora(false)), None, &r, Mode::Inference, 0).unwrap();
        let diff = (fresh.logp - reference.logp).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn restricted_log_probs_renormalise_over_the_allowed_tokens() {
        let m = model();
        let (prefix, bodies, _) = example();
        let allowed = vec![vec![40u32, 41, 50], vec![40, 42, 50], vec![43, 50]];
        let responses = [vec![40u32, 42, 50], vec![43, 50], vec![40, 41, 50]];
        let r = Responses {
            prefix: &prefix,
            bodies: bodies.iter().map(|b| b.as_slice()).collect(),
            responses: responses.iter().map(|b| b.as_slice()).collect(),
            restrict_to: &allowed,
        };
        let got = score_responses(&m, None, None, &r, Mode::Inference, 0).unwrap().logp.to_vec1::<f32>().unwrap();
        let got = split_rows(&got, &[3, 2, 3]);
        // By hand from the full distribution: p(first) / (p(40) + p(43)), then p(42) / (p(41) + p(42)),
        // then the forced closing token: log 1 = 0.
        let full = |i: usize, resp: &[u32], k: usize| -> Vec<f32> {
            let seq: Vec<u32> = prefix.iter().chain(&bodies[i]).chain(&resp[..k]).copied().collect();
            let logits = m
                .forward(&TokenBatch::single(&seq).unwrap(), None, None, Mode::Inference, LogitsAt::Last)
                .unwrap()
                .logits
                .unwrap()
                .squeeze(0)
                .unwrap();
            candle_nn::ops::softmax(&logits, D::Minus1).unwrap().to_vec1::<f32>().unwrap()
        };
        let p = full(0, &responses[0], 0);
        assert!((got[0][0] - (p[40] / (p[40] + p[43])).ln()).abs() < 1e-4);
        let p = full(0, &responses[0], 1);
        assert!((got[0][1] - (p[42] / (p[41] + p[42])).ln()).abs() < 1e-4);
        assert!(got[0][2].abs() < 1e-6 && got[1][1].abs() < 1e-6 && got[2][2].abs() < 1e-6);
        let p = full(1, &responses[1], 0);
        assert!((got[1][0] - (p[43] / (p[40] + p[43])).ln()).abs() < 1e-4);
        // A response outside the action space is refused.
        let bad = [vec![41u32, 50]];
        let r =
            Responses { prefix: &prefix, bodies: vec![&bodies[0]], responses: vec![&bad[0]], restrict_to: &allowed };
        assert!(score_responses(&m, None, None, &r, Mode::Inference, 0).is_err());
    }
}
