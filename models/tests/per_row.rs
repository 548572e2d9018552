//! Batches that mix adapters and prompt prefixes (what the server runs) compute, row by row,
//! what each row computes alone: per-row LoRA = the row alone with its adapter; stacked
//! prefix caches of different lengths = scoring the whole prompt without any cache.

use candle_core::{DType, Device, Tensor};
use models::random::{random_decoder, tiny_config};
use models::scoring::{normalize, score_candidates, score_packed, score_rows};
use models::{
    Adapters, Arch, Decoder, KvCache, LogitsAt, LoraAdapter, LoraConfig, Mode, Padding, Projection, TokenBatch,
    WeightMode,
};

const VOCAB: usize = 50;
/// f32, same math in a different batch shape.
const TOL: f64 = 1e-5;

fn model(arch: Arch) -> Decoder {
    random_decoder(&tiny_config(arch, VOCAB), 42, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap()
}

/// A random adapter whose B is not zero (so it really changes the output).
fn adapter(arch: Arch, seed: u64, targets: &[Projection], rank: usize) -> LoraAdapter {
    let cfg = tiny_config(arch, VOCAB);
    let lora =
        LoraConfig { rank, alpha: 16.0, use_rslora: false, dropout: 0.0, targets: targets.to_vec(), layers: None };
    LoraAdapter::init_random(lora, &cfg, seed, DType::F32, &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    f64::from((a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap())
}

#[test]
fn mixed_adapter_batch_equals_each_row_alone() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let m = model(arch);
        let a = adapter(arch, 1, &Projection::ALL, 4);
        let b = adapter(arch, 2, &[Projection::Q, Projection::V], 2);
        let seqs = vec![vec![1, 5, 9, 14, 2], vec![4, 4, 19], vec![49, 0, 12, 30, 6, 7], vec![3, 8], vec![11, 12, 13]];
        // Rows: a, a, none, b, a (a run, a gap, and a row of a again after another adapter).
        let per_row = [Some(&a), Some(&a), None, Some(&b), Some(&a)];
        let batch = TokenBatch::new(&seqs, 0, Padding::Right).unwrap();
        let mixed = m
            .forward_rows(&batch, None, Adapters::PerRow(&per_row), Mode::Inference, LogitsAt::Last)
            .unwrap()
            .logits
            .unwrap();
        let mut spread = 0f64;
        for (i, (s, ad)) in seqs.iter().zip(per_row).enumerate() {
            let alone = m.forward(&TokenBatch::single(s).unwrap(), None, ad, Mode::Inference, LogitsAt::Last).unwrap();
            let alone = alone.logits.unwrap();
            let row = mixed.narrow(0, i, 1).unwrap();
            let d = max_abs(&row, &alone);
            assert!(d < TOL, "{arch:?} row {i}: mixed batch differs from the row alone by {d}");
            // The row's adapter matters: the base model alone gives something else.
            let base = m.forward(&TokenBatch::single(s).unwrap(), None, None, Mode::Inference, LogitsAt::Last).unwrap();
            spread = spread.max(max_abs(&row, &base.logits.unwrap()));
        }
        assert!(spread > 1e-2, "{arch:?}: adapters change nothing ({spread})");
        // Same(adapter) and PerRow with that adapter everywhere are the same computation.
        let all_a = [Some(&a); 5];
        let p = m.forward_rows(&batch, None, Adapters::PerRow(&all_a), Mode::Inference, LogitsAt::All).unwrap();
        let s = m.forward(&batch, None, Some(&a), Mode::Inference, LogitsAt::All).unwrap();
        assert!(max_abs(&p.logits.unwrap(), &s.logits.unwrap()) < TOL);
        // A per-row list of the wrong length is refused, not misapplied.
        assert!(m.forward_rows(&batch, None, Adapters::PerRow(&all_a[..3]), Mode::Inference, LogitsAt::Last).is_err());
    }
}

/// The keys and values of `prefix` through `adapter`, one row.
fn prefix_cache(m: &Decoder, prefix: &[u32], adapter: Option<&LoraAdapter>) -> KvCache {
    let mut c = KvCache::new(m.config().num_layers);
    m.forward(&TokenBatch::single(prefix).unwrap(), Some(&mut c), adapter, Mode::Inference, LogitsAt::None).unwrap();
    c
}

/// (prefix 1, prefix 2, candidates 1, candidates 2).
type TwoTasks = (Vec<u32>, Vec<u32>, Vec<Vec<u32>>, Vec<Vec<u32>>);

/// Two "tasks": different prefixes (lengths 6 and 3) and different candidate sets, one with
/// shared leading tokens (a trie) and answers of different lengths.
fn two_tasks() -> TwoTasks {
    (
        vec![2, 7, 1, 8, 2, 8],
        vec![3, 1, 4],
        vec![vec![10, 11, 12], vec![10, 13, 12], vec![14]],
        vec![vec![20, 21], vec![22, 21]],
    )
}

/// (prefix, adapter, candidates, body) of one row.
type MixedRow<'a> = (&'a Vec<u32>, Option<&'a LoraAdapter>, &'a Vec<Vec<u32>>, Vec<u32>);

#[test]
fn stacked_prefix_caches_and_mixed_candidates_equal_uncached_scoring() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let m = model(arch);
        let a = adapter(arch, 3, &Projection::ALL, 4);
        let b = adapter(arch, 4, &[Projection::O, Projection::Down], 8);
        let (prefix_1, prefix_2, cands_1, cands_2) = two_tasks();
        // Rows (after the server's ordering by task and version): task 1 with a (twice),
        // task 2 with b, task 2 zero-shot.
        let rows: Vec<MixedRow> = vec![
            (&prefix_1, Some(&a), &cands_1, vec![5, 6, 7]),
            (&prefix_1, Some(&a), &cands_1, vec![9]),
            (&prefix_2, Some(&b), &cands_2, vec![30, 31, 32, 33]),
            (&prefix_2, None, &cands_2, vec![40, 41]),
        ];
        let prefix_cache = |p: &Vec<u32>, ad: Option<&LoraAdapter>| prefix_cache(&m, p, ad);
        let parts = vec![
            prefix_cache(&prefix_1, Some(&a)).expand_batch(2).unwrap(),
            prefix_cache(&prefix_2, Some(&b)).expand_batch(1).unwrap(),
            prefix_cache(&prefix_2, None).expand_batch(1).unwrap(),
        ];
        let cache = KvCache::stack(&parts).unwrap();
        assert_eq!((cache.batch_size(), cache.seq_len()), (4, 6));
        assert_eq!(cache.real_lens(), vec![6, 6, 3, 3]);
        let per_row: Vec<Option<&LoraAdapter>> = rows.iter().map(|r| r.1).collect();
        let bodies: Vec<Vec<u32>> = rows.iter().map(|r| r.3.clone()).collect();
        let cands: Vec<&[Vec<u32>]> = rows.iter().map(|r| r.2.as_slice()).collect();
        let mixed = score_rows(&m, Adapters::PerRow(&per_row), cache, &bodies, &cands, 0).unwrap();
        for (i, (prefix, ad, c, body)) in rows.iter().enumerate() {
            // Uncached: the whole prompt, alone, through the row's adapter.
            let whole = [prefix.as_slice(), body].concat();
            let alone = score_candidates(&m, *ad, None, &[whole], c, 0).unwrap();
            assert_eq!(mixed[i].len(), c.len());
            // Log-probabilities of a tiny random model reach -100: compare them relatively,
            // and the label probabilities (what the server answers) absolutely.
            for (x, y) in mixed[i].iter().zip(&alone[0]) {
                assert!((x - y).abs() < TOL * (1.0 + y.abs()), "{arch:?} row {i}: {x} vs {y}");
            }
            for (x, y) in normalize(&mixed[i]).iter().zip(normalize(&alone[0])) {
                assert!((x - y).abs() < TOL, "{arch:?} row {i}: probability {x} vs {y}");
            }
        }
        // Shared prefix cache (the evaluator's path) equals the uncached path too.
        let p1 = prefix_cache(&prefix_1, Some(&a));
        let cached = score_candidates(&m, Some(&a), Some(&p1), &[vec![5, 6, 7]], &cands_1, 0).unwrap();
        for (x, y) in cached[0].iter().zip(&mixed[0]) {
            assert!((x - y).abs() < TOL * (1.0 + y.abs()), "{arch:?}: {x} vs {y}");
        }
    }
}

#[test]
fn packed_rows_equal_each_prompt_alone() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let m = model(arch);
        let a = adapter(arch, 5, &Projection::ALL, 4);
        let b = adapter(arch, 6, &[Projection::Q, Projection::Up], 4);
        let (prefix_1, prefix_2, cands_1, cands_2) = two_tasks();
        // Packed rows: task 1 with a (three prompts of lengths 3, 1 and 7), task 2 with b (two),
        // task 2 zero-shot (one).
        let rows: Vec<(usize, MixedRow)> = vec![
            (0, (&prefix_1, Some(&a), &cands_1, vec![5, 6, 7])),
            (0, (&prefix_1, Some(&a), &cands_1, vec![9])),
            (0, (&prefix_1, Some(&a), &cands_1, vec![1, 2, 3, 4, 5, 6, 7])),
            (1, (&prefix_2, Some(&b), &cands_2, vec![30, 31, 32, 33])),
            (1, (&prefix_2, Some(&b), &cands_2, vec![8, 8])),
            (2, (&prefix_2, None, &cands_2, vec![40, 41])),
        ];
        let prefix_cache = |p: &Vec<u32>, ad: Option<&LoraAdapter>| prefix_cache(&m, p, ad);
        let cache = KvCache::stack(&[
            prefix_cache(&prefix_1, Some(&a)),
            prefix_cache(&prefix_2, Some(&b)),
            prefix_cache(&prefix_2, None),
        ])
        .unwrap();
        let row_adapters = [Some(&a), Some(&b), None];
        let row_of: Vec<usize> = rows.iter().map(|r| r.0).collect();
        let bodies: Vec<Vec<u32>> = rows.iter().map(|r| r.1 .3.clone()).collect();
        let cands: Vec<&[Vec<u32>]> = rows.iter().map(|r| r.1 .2.as_slice()).collect();
        let packed =
            score_packed(&m, Adapters::PerRow(&row_adapters), cache.clone(), &bodies, &cands, &row_of, 0).unwrap();
        for (i, (_, (prefix, ad, c, body))) in rows.iter().enumerate() {
            let whole = [prefix.as_slice(), body].concat();
            let alone = score_candidates(&m, *ad, None, &[whole], c, 0).unwrap();
            assert_eq!(packed[i].len(), c.len());
            for (x, y) in packed[i].iter().zip(&alone[0]) {
                assert!((x - y).abs() < TOL * (1.0 + y.abs()), "{arch:?} prompt {i}: {x} vs {y}");
            }
            for (x, y) in normalize(&packed[i]).iter().zip(normalize(&alone[0])) {
                assert!((x - y).abs() < TOL, "{arch:?} prompt {i}: probability {x} vs {y}");
            }
        }
        // Not vacuous: prompts packed into one row still get answers of their own.
        let spread: f64 = packed[0].iter().zip(&packed[2]).map(|(x, y)| (x - y).abs()).sum();
        assert!(spread > 1e-3, "{arch:?}: different prompts scored alike ({spread})");
        // Assignments that do not match the cache's rows are refused.
        let bad = vec![0, 0, 0, 1, 1, 3];
        assert!(score_packed(&m, Adapters::PerRow(&row_adapters), cache.clone(), &bodies, &cands, &bad, 0).is_err());
        assert!(score_packed(&m, Adapters::PerRow(&row_adapters), cache, &bodies, &cands, &row_of[..5], 0).is_err());
    }
}

/// Frozen adapters (loaded or snapshotted: no variables) take the fused path at inference: the
/// packed kernel adds each run's LoRA delta into the base product's buffer. It must compute
/// what the tensor ops compute for the same factors held as variables, and what the model with
/// the delta merged into its weights computes, in a mixed batch as for one adapter.
#[test]
fn fused_lora_equals_tensor_ops_and_merged_weights() {
    let kernels = models::cpu::CpuKernels::auto();
    if !kernels.enabled() {
        eprintln!("skipped: no AVX2/FMA, the fused path never runs");
        return;
    }
    for arch in [Arch::Llama, Arch::Qwen2] {
        let m = model(arch);
        let a = adapter(arch, 3, &Projection::ALL, 4);
        let b = adapter(arch, 4, &[Projection::Q, Projection::V, Projection::Down], 2);
        let (fa, fb) = (a.snapshot().unwrap(), b.snapshot().unwrap());
        let (l, p) = (Projection::Gate, Projection::Q);
        assert!(a.packed_pair(0, l, &kernels).is_none(), "an adapter with variables must not be cached");
        assert!(fa.packed_pair(0, l, &kernels).is_some() && fb.packed_pair(0, p, &kernels).is_some());
        assert!(fb.packed_pair(0, l, &kernels).is_none(), "b does not adapt gate");
        let seqs = vec![vec![1, 5, 9, 14, 2], vec![4, 4, 19], vec![49, 0, 12, 30, 6, 7], vec![3, 8]];
        let batch = TokenBatch::new(&seqs, 0, Padding::Right).unwrap();
        let run = |ads: &[Option<&LoraAdapter>]| {
            m.forward_rows(&batch, None, Adapters::PerRow(ads), Mode::Inference, LogitsAt::All).unwrap().logits.unwrap()
        };
        let fused = run(&[Some(&fa), None, Some(&fb), Some(&fa)]);
        let ops = run(&[Some(&a), None, Some(&b), Some(&a)]);
        let d = max_abs(&fused, &ops);
        assert!(d < TOL, "{arch:?}: fused mixed batch differs from the tensor ops by {d}");
        let base = m.forward(&batch, None, None, Mode::Inference, LogitsAt::All).unwrap().logits.unwrap();
        assert!(max_abs(&fused, &base) > 1e-2, "{arch:?}: the adapters change nothing");
        // One adapter for the whole batch against its merged weights.
        let fused = m.forward(&batch, None, Some(&fa), Mode::Inference, LogitsAt::All).unwrap().logits.unwrap();
        let merged = m.merged(&a).unwrap().forward(&batch, None, None, Mode::Inference, LogitsAt::All).unwrap();
        let d = max_abs(&fused, &merged.logits.unwrap());
        assert!(d < 1e-4, "{arch:?}: fused adapter differs from the merged model by {d}");
    }
}
