//! One-pass constrained scoring (prompt and candidates in one sequence, a depth-1 token tree)
//! against an independent reference: each candidate scored alone by a plain full forward of
//! prefix + prompt + candidate with every position's logits and a log-softmax.

use candle_core::{DType, Device, Tensor, D};
use models::random::{random_decoder, tiny_config};
use models::scoring::{normalize, score_candidates, score_rows};
use models::{
    Adapters, Arch, Decoder, KvCache, LogitsAt, LoraAdapter, LoraConfig, Mode, Projection, TokenBatch, WeightMode,
};

const VOCAB: usize = 50;
/// f32: the same math in a different batch shape.
const TOL: f64 = 1e-5;
const ARCHS: [Arch; 2] = [Arch::Llama, Arch::Qwen2];

fn model(arch: Arch) -> Decoder {
    random_decoder(&tiny_config(arch, VOCAB), 7, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap()
}

/// A random adapter whose B is not zero (so it really changes the output).
fn adapter(arch: Arch, seed: u64, targets: &[Projection]) -> LoraAdapter {
    let lora =
        LoraConfig { rank: 4, alpha: 8.0, use_rslora: false, dropout: 0.0, targets: targets.to_vec(), layers: None };
    LoraAdapter::init_random(lora, &tiny_config(arch, VOCAB), seed, DType::F32, &Device::Cpu).unwrap()
}

/// log P(candidate | context): one forward of context + candidate, alone, no cache.
fn reference(m: &Decoder, ad: Option<&LoraAdapter>, context: &[u32], cand: &[u32]) -> f64 {
    let full = [context, cand].concat();
    let logits = m
        .forward(&TokenBatch::single(&full).unwrap(), None, ad, Mode::Inference, LogitsAt::All)
        .unwrap()
        .logits
        .unwrap();
    let lp: Vec<Vec<f32>> =
        candle_nn::ops::log_softmax(&logits.squeeze(0).unwrap(), D::Minus1).unwrap().to_vec2().unwrap();
    cand.iter().enumerate().map(|(k, &t)| f64::from(lp[context.len() - 1 + k][t as usize])).sum()
}

fn prefix_cache(m: &Decoder, ad: Option<&LoraAdapter>, prefix: &[u32]) -> KvCache {
    let mut c = KvCache::new(m.config().num_layers);
    m.forward(&TokenBatch::single(prefix).unwrap(), Some(&mut c), ad, Mode::Inference, LogitsAt::None).unwrap();
    c
}

/// Log-probabilities of a tiny random model reach -100: compared relatively; the label
/// probabilities (what the server answers) absolutely.
fn assert_matches(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (c, (x, y)) in got.iter().zip(want).enumerate() {
        assert!((x - y).abs() < TOL * (1.0 + y.abs()), "{what} candidate {c}: {x} vs {y}");
    }
    for (x, y) in normalize(got).iter().zip(normalize(want)) {
        assert!((x - y).abs() < TOL, "{what}: probability {x} vs {y}");
    }
}

/// Prompts of different lengths (padding), one of a single token.
fn prompts() -> Vec<Vec<u32>> {
    vec![vec![1, 2, 3, 4, 5, 6], vec![7], vec![9, 10, 11, 12], vec![13, 14]]
}

/// Candidates of lengths 3, 3 (sharing two leading tokens), 2, 1, 4 and 1.
fn candidates() -> Vec<Vec<u32>> {
    vec![vec![20, 21, 22], vec![20, 21, 23], vec![24, 20], vec![30], vec![31, 32, 33, 34], vec![35]]
}

#[test]
fn one_pass_equals_each_candidate_alone_without_a_prefix() {
    for arch in ARCHS {
        let m = model(arch);
        let a = adapter(arch, 1, &Projection::ALL);
        for ad in [None, Some(&a)] {
            let got = score_candidates(&m, ad, None, &prompts(), &candidates(), 0).unwrap();
            for (i, p) in prompts().iter().enumerate() {
                let want: Vec<f64> = candidates().iter().map(|c| reference(&m, ad, p, c)).collect();
                assert_matches(&got[i], &want, &format!("{arch:?} adapter {} prompt {i}", ad.is_some()));
            }
        }
    }
}

#[test]
fn one_pass_equals_each_candidate_alone_after_a_prefix_cache() {
    for arch in ARCHS {
        let m = model(arch);
        let a = adapter(arch, 2, &[Projection::Q, Projection::K, Projection::V, Projection::Down]);
        let prefix = vec![40, 41, 42, 43, 44, 45, 46];
        let cache = prefix_cache(&m, Some(&a), &prefix);
        let got = score_candidates(&m, Some(&a), Some(&cache), &prompts(), &candidates(), 0).unwrap();
        for (i, body) in prompts().iter().enumerate() {
            let whole = [prefix.as_slice(), body].concat();
            let want: Vec<f64> = candidates().iter().map(|c| reference(&m, Some(&a), &whole, c)).collect();
            assert_matches(&got[i], &want, &format!("{arch:?} prompt {i}"));
        }
        // The caller's prefix cache is untouched: scoring again gives the same answer.
        assert_eq!(cache.seq_len(), prefix.len());
        assert_eq!(got, score_candidates(&m, Some(&a), Some(&cache), &prompts(), &candidates(), 0).unwrap());
    }
}

/// (prefix, adapter, candidates, body) of one row.
type Row<'a> = (&'a [u32], Option<&'a LoraAdapter>, &'a [Vec<u32>], Vec<u32>);

#[test]
fn one_pass_with_per_row_adapters_stacked_prefixes_and_candidate_sets_equals_each_alone() {
    for arch in ARCHS {
        let m = model(arch);
        let a = adapter(arch, 3, &Projection::ALL);
        let b = adapter(arch, 4, &[Projection::O, Projection::Gate, Projection::Up]);
        let (prefix_1, prefix_2): (Vec<u32>, Vec<u32>) = (vec![2, 7, 1, 8, 2, 8], vec![3, 1, 4]);
        let cands_1 = candidates();
        // Only single-token candidates: a row without branches.
        let cands_2: Vec<Vec<u32>> = vec![vec![20], vec![21], vec![22]];
        // One long candidate alone.
        let cands_3: Vec<Vec<u32>> = vec![vec![25, 26, 27, 28, 29]];
        // Rows in the server's order (by task and version): runs of a, b and no adapter.
        let rows: Vec<Row> = vec![
            (&prefix_1, Some(&a), &cands_1, vec![5, 6, 7]),
            (&prefix_1, Some(&a), &cands_1, vec![9]),
            (&prefix_2, Some(&b), &cands_2, vec![30, 31, 32, 33]),
            (&prefix_2, Some(&b), &cands_3, vec![34, 35]),
            (&prefix_2, None, &cands_1, vec![40, 41]),
        ];
        let per_row: Vec<Option<&LoraAdapter>> = rows.iter().map(|r| r.1).collect();
        let cands: Vec<&[Vec<u32>]> = rows.iter().map(|r| r.2).collect();
        let want: Vec<Vec<f64>> = rows
            .iter()
            .map(|(prefix, ad, cs, body)| cs.iter().map(|c| reference(&m, *ad, &[*prefix, body].concat(), c)).collect())
            .collect();
        // Stacked prefix caches of different lengths, bodies after them.
        let cache = KvCache::stack(&[
            prefix_cache(&m, Some(&a), &prefix_1).expand_batch(2).unwrap(),
            prefix_cache(&m, Some(&b), &prefix_2).expand_batch(2).unwrap(),
            prefix_cache(&m, None, &prefix_2),
        ])
        .unwrap();
        let bodies: Vec<Vec<u32>> = rows.iter().map(|r| r.3.clone()).collect();
        let got = score_rows(&m, Adapters::PerRow(&per_row), cache, &bodies, &cands, 0).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_matches(g, w, &format!("{arch:?} cached row {i}"));
        }
        // No cache: whole prompts of different lengths.
        let whole: Vec<Vec<u32>> = rows.iter().map(|(p, _, _, body)| [*p, body].concat()).collect();
        let empty = KvCache::new(m.config().num_layers);
        let got = score_rows(&m, Adapters::PerRow(&per_row), empty, &whole, &cands, 0).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_matches(g, w, &format!("{arch:?} uncached row {i}"));
        }
    }
}

#[test]
fn candidates_do_not_see_each_other() {
    for arch in ARCHS {
        let m = model(arch);
        let a = adapter(arch, 5, &Projection::ALL);
        let cands = candidates();
        let base = score_candidates(&m, Some(&a), None, &prompts(), &cands, 0).unwrap();
        // Candidate 1 changed, same length: the batch has the same shape, so every other
        // candidate's score is bit for bit the same.
        let mut same_len = cands.clone();
        same_len[1] = vec![44, 45, 46];
        let changed = score_candidates(&m, Some(&a), None, &prompts(), &same_len, 0).unwrap();
        // Candidate 1 longer: the rows grow, later candidates move to other columns.
        let mut longer = cands.clone();
        longer[1] = vec![44, 45, 46, 47, 48, 49];
        let moved = score_candidates(&m, Some(&a), None, &prompts(), &longer, 0).unwrap();
        for i in 0..prompts().len() {
            assert!((base[i][1] - changed[i][1]).abs() > 1e-3, "{arch:?}: candidate 1's change is not seen");
            for c in (0..cands.len()).filter(|&c| c != 1) {
                assert_eq!(base[i][c], changed[i][c], "{arch:?} prompt {i}: candidate {c} saw candidate 1");
                let (x, y) = (moved[i][c], base[i][c]);
                assert!((x - y).abs() < TOL * (1.0 + y.abs()), "{arch:?} prompt {i} candidate {c}: {x} vs {y}");
            }
        }
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    f64::from((a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap())
}

#[test]
fn a_branched_forward_equals_each_branch_alone_and_leaves_the_cache_unchanged() {
    let (m, arch) = (model(Arch::Qwen2), Arch::Qwen2);
    let a = adapter(arch, 6, &Projection::ALL);
    let prefix = [40u32, 41, 42];
    // Trunk 1 2 3, branch 1: 10 11, branch 2: 12 13 14, then a padding column.
    let ids = vec![vec![1, 2, 3, 10, 11, 12, 13, 14, 0]];
    let mask = vec![vec![true, true, true, true, true, true, true, true, false]];
    let branches = vec![vec![0, 0, 0, 1, 1, 2, 2, 2, 0]];
    let batch = TokenBatch::with_branches(ids, mask, branches).unwrap();
    for mode in [Mode::Inference, Mode::Train { dropout_seed: None }] {
        let mut cache = prefix_cache(&m, Some(&a), &prefix);
        let before = cache.layer(0).unwrap().0.clone();
        let tree = m.forward(&batch, Some(&mut cache), Some(&a), mode, LogitsAt::All).unwrap().logits.unwrap();
        assert_eq!(cache.seq_len(), prefix.len(), "{mode:?}: branch tokens reached the cache");
        assert_eq!(cache.mask(), &[vec![true; prefix.len()]]);
        assert_eq!(max_abs(&cache.layer(0).unwrap().0, &before), 0.0);
        // Each branch after the trunk, alone and without any cache.
        for (branch, cols) in [(vec![10u32, 11], 3..5), (vec![12, 13, 14], 5..8)] {
            let alone = [prefix.as_slice(), &[1, 2, 3], &branch].concat();
            let want = m.forward(&TokenBatch::single(&alone).unwrap(), None, Some(&a), mode, LogitsAt::All).unwrap();
            let want = want.logits.unwrap().squeeze(0).unwrap();
            let trunk = tree.squeeze(0).unwrap().narrow(0, 0, 3).unwrap();
            assert!(max_abs(&trunk, &want.narrow(0, 3, 3).unwrap()) < 1e-4, "{mode:?}: trunk");
            let got = tree.squeeze(0).unwrap().narrow(0, cols.start, cols.len()).unwrap();
            let d = max_abs(&got, &want.narrow(0, 6, branch.len()).unwrap());
            assert!(d < 1e-4, "{mode:?}: branch {branch:?} differs from the branch alone by {d}");
        }
    }
    // Branch ids must have the ids' shape.
    assert!(TokenBatch::with_branches(vec![vec![1, 2]], vec![vec![true, true]], vec![vec![0]]).is_err());
}
