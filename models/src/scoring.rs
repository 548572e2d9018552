//! Constrained label scoring: the exact log-probability of every candidate answer's full token
//! sequence after each prompt.
//!
//! One prefill per prompt (batched, optionally continuing from a shared prefix cache), then a
//! walk down the trie of the candidates' token sequences: every trie node is fed once per
//! prompt, so candidates that share leading tokens ("Option one" / "Option two") share that
//! work, and single-token candidates cost nothing beyond the prefill.

use crate::batch::{KvCache, Padding, TokenBatch};
use crate::decoder::{Adapters, Decoder, LogitsAt, Mode};
use crate::lora::LoraAdapter;
use crate::Error;
use candle_core::{Tensor, D};

/// Trie of candidate token sequences.
struct Trie {
    /// `(parent node, token)`; node 0 is the root (the end of the prompt).
    nodes: Vec<(usize, u32)>,
    /// For each candidate, the nodes along its path (its `k`th token's node is `path[k]`).
    paths: Vec<Vec<usize>>,
}

impl Trie {
    fn new(candidates: &[Vec<u32>]) -> Result<Self, Error> {
        let mut nodes = vec![(usize::MAX, u32::MAX)];
        let mut paths = Vec::with_capacity(candidates.len());
        for c in candidates {
            if c.is_empty() {
                return Err(Error::Invalid("a candidate answer has no tokens".into()));
            }
            let mut at = 0;
            let mut path = Vec::with_capacity(c.len());
            for &tok in c {
                at = match nodes.iter().position(|&(p, t)| p == at && t == tok) {
                    Some(n) => n,
                    None => {
                        nodes.push((at, tok));
                        nodes.len() - 1
                    }
                };
                path.push(at);
            }
            paths.push(path);
        }
        Ok(Self { nodes, paths })
    }

    fn depth(&self, mut node: usize) -> usize {
        let mut d = 0;
        while node != 0 {
            node = self.nodes[node].0;
            d += 1;
        }
        d
    }

    /// Nodes whose next-token distribution some candidate needs: every node on a path except
    /// the last one of each path. Grouped by depth.
    fn inner_nodes_by_depth(&self) -> Vec<Vec<usize>> {
        let mut by_depth: Vec<Vec<usize>> = Vec::new();
        for path in &self.paths {
            for &n in &path[..path.len() - 1] {
                let d = self.depth(n);
                if by_depth.len() < d {
                    by_depth.resize(d, Vec::new());
                }
                if !by_depth[d - 1].contains(&n) {
                    by_depth[d - 1].push(n);
                }
            }
        }
        by_depth
    }
}

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
    let tries = candidates.iter().map(|c| Trie::new(c)).collect::<Result<Vec<_>, _>>()?;
    let inner: Vec<Vec<Vec<usize>>> = tries.iter().map(Trie::inner_nodes_by_depth).collect();
    let batch = TokenBatch::new(prompts, pad_id, Padding::Right)?;
    let logits = model
        .forward_rows(&batch, Some(&mut cache), adapters, Mode::Inference, LogitsAt::Last)?
        .logits
        .ok_or_else(|| Error::Invalid("no logits".into()))?;
    // Per row, the log-probs of the tokens that follow each needed trie node: node -> token -> lp.
    let mut node_logp: Vec<Vec<Vec<(u32, f32)>>> = tries.iter().map(|t| vec![Vec::new(); t.nodes.len()]).collect();
    let keep = |lp: &[f32], trie: &Trie, node: usize| -> Vec<(u32, f32)> {
        trie.nodes.iter().filter(|&&(p, _)| p == node).map(|&(_, tok)| (tok, lp[tok as usize])).collect()
    };
    for (i, lp) in log_softmax_rows(&logits)?.iter().enumerate() {
        node_logp[i][0] = keep(lp, &tries[i], 0);
    }
    // The rows of the current level's cache: `(prompt, trie node)`.
    let mut level: Vec<(usize, usize)> = (0..b).map(|i| (i, 0)).collect();
    let mut level_cache = cache;
    let depth = inner.iter().map(Vec::len).max().unwrap_or(0);
    for d in 0..depth {
        let (mut rows, mut tokens, mut next, mut row_adapters) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, levels) in inner.iter().enumerate() {
            for &node in levels.get(d).map(Vec::as_slice).unwrap_or(&[]) {
                let (parent, tok) = tries[i].nodes[node];
                let j = level
                    .iter()
                    .position(|&x| x == (i, parent))
                    .ok_or_else(|| Error::Invalid("trie parent is not on the previous level".into()))?;
                rows.push(j);
                tokens.push(vec![tok]);
                next.push((i, node));
                row_adapters.push(adapters.row(i));
            }
        }
        let mut next_cache = level_cache.select_rows(&rows)?;
        let step = TokenBatch::from_rows(tokens)?;
        let step_adapters = match adapters {
            Adapters::Same(a) => Adapters::Same(a),
            Adapters::PerRow(_) => Adapters::PerRow(&row_adapters),
        };
        let logits = model
            .forward_rows(&step, Some(&mut next_cache), step_adapters, Mode::Inference, LogitsAt::Last)?
            .logits
            .ok_or_else(|| Error::Invalid("no logits".into()))?;
        for (lp, &(i, node)) in log_softmax_rows(&logits)?.iter().zip(&next) {
            node_logp[i][node] = keep(lp, &tries[i], node);
        }
        level_cache = next_cache;
        level = next;
    }
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let mut row = vec![0f64; candidates[i].len()];
        for (c, (cand, path)) in candidates[i].iter().zip(&tries[i].paths).enumerate() {
            for (k, &tok) in cand.iter().enumerate() {
                let from = if k == 0 { 0 } else { path[k - 1] };
                let lp = node_logp[i][from]
                    .iter()
                    .find(|&&(t, _)| t == tok)
                    .map(|&(_, lp)| lp)
                    .ok_or_else(|| Error::Invalid("a needed trie node was not computed".into()))?;
                row[c] += f64::from(lp);
            }
        }
        out.push(row);
    }
    Ok(out)
}

/// Normalises each row's candidate log-probabilities into a probability distribution.
pub fn normalize(logps: &[f64]) -> Vec<f64> {
    let max = logps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logps.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

fn log_softmax_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>, Error> {
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F32)?, D::Minus1)?;
    Ok(lp.to_vec2()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trie_shares_prefixes() {
        let t = Trie::new(&[vec![5, 6, 7], vec![5, 6, 8], vec![9]]).unwrap();
        // root, 5, 6, 7, 8, 9
        assert_eq!(t.nodes.len(), 6);
        assert_eq!(t.paths[0][..2], t.paths[1][..2]);
        // Needed inner nodes: "5" (depth 1) and "5 6" (depth 2), once each.
        let inner = t.inner_nodes_by_depth();
        assert_eq!(inner.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1]);
    }

    #[test]
    fn normalize_gives_probabilities() {
        let p = normalize(&[(0.2f64).ln(), (0.6f64).ln()]);
        assert!((p[0] - 0.25).abs() < 1e-12 && (p[1] - 0.75).abs() < 1e-12);
    }
}
