//! Constrained label scoring: the exact log-probability of every candidate answer's full token
//! sequence after each prompt.
//!
//! One prefill per prompt (batched, optionally continuing from a shared prefix cache), then a
//! walk down the trie of the candidates' token sequences: every trie node is fed once per
//! prompt, so candidates that share leading tokens ("Option one" / "Option two") share that
//! work, and single-token candidates cost nothing beyond the prefill.

use crate::batch::{KvCache, Padding, TokenBatch};
use crate::decoder::{Decoder, LogitsAt, Mode};
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
    let trie = Trie::new(candidates)?;
    let b = prompts.len();
    let mut cache = match prefix {
        Some(p) => p.expand_batch(b)?,
        None => KvCache::new(model.config().num_layers),
    };
    let batch = TokenBatch::new(prompts, pad_id, Padding::Right)?;
    let logits =
        model.forward(&batch, Some(&mut cache), adapter, Mode::Inference, LogitsAt::Last)?.logits.expect("logits");
    // Next-token log-probs at each node, per prompt: node -> [b, vocab].
    let mut node_logp: Vec<Option<Vec<Vec<f32>>>> = vec![None; trie.nodes.len()];
    node_logp[0] = Some(log_softmax_rows(&logits)?);
    // Each node's cache row block: row `i * n + j` is prompt `i` at the `j`th node of a level.
    let mut level_cache = cache;
    let mut level_nodes = vec![0usize];
    for nodes in trie.inner_nodes_by_depth() {
        let n = nodes.len();
        let mut rows = Vec::with_capacity(b * n);
        let mut tokens = Vec::with_capacity(b * n);
        for i in 0..b {
            for &node in &nodes {
                let parent = trie.nodes[node].0;
                let j = level_nodes.iter().position(|&x| x == parent).expect("parent is on the previous level");
                rows.push(i * level_nodes.len() + j);
                tokens.push(vec![trie.nodes[node].1]);
            }
        }
        let mut next = level_cache.select_rows(&rows)?;
        let step = TokenBatch::from_rows(tokens)?;
        let logits =
            model.forward(&step, Some(&mut next), adapter, Mode::Inference, LogitsAt::Last)?.logits.expect("logits");
        let logp = log_softmax_rows(&logits)?;
        for (j, &node) in nodes.iter().enumerate() {
            node_logp[node] = Some((0..b).map(|i| logp[i * n + j].clone()).collect());
        }
        level_cache = next;
        level_nodes = nodes;
    }
    let mut out = vec![vec![0f64; candidates.len()]; b];
    for (c, (cand, path)) in candidates.iter().zip(&trie.paths).enumerate() {
        for (k, &tok) in cand.iter().enumerate() {
            let from = if k == 0 { 0 } else { path[k - 1] };
            let lp = node_logp[from].as_ref().expect("every needed node was computed");
            for (i, row) in out.iter_mut().enumerate() {
                row[c] += f64::from(lp[i][tok as usize]);
            }
        }
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
