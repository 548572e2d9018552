//! The inference and training paths, padded batches, the KV cache, prefix reuse, merged
//! adapters and quantized weights all compute the same function (tiny seeded models).

use candle_core::{DType, Device, Tensor};
use models::random::{random_decoder, tiny_config};
use models::{
    Arch, Decoder, KvCache, LogitsAt, LoraAdapter, LoraConfig, Mode, Padding, Projection, TokenBatch, WeightMode,
};

const VOCAB: usize = 50;

fn setup(arch: Arch) -> (Decoder, LoraAdapter) {
    let cfg = tiny_config(arch, VOCAB);
    let model = random_decoder(&cfg, 42, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        use_rslora: true,
        dropout: 0.05,
        targets: Projection::ALL.to_vec(),
        layers: None,
    };
    let adapter = LoraAdapter::init_random(lora, &cfg, 9, DType::F32, &Device::Cpu).unwrap();
    (model, adapter)
}

fn logits(model: &Decoder, batch: &TokenBatch, adapter: Option<&LoraAdapter>, mode: Mode) -> Tensor {
    model.forward(batch, None, adapter, mode, LogitsAt::All).unwrap().logits.unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn seqs() -> Vec<Vec<u32>> {
    vec![vec![1, 5, 9, 14, 2, 33, 7, 8], vec![4, 4, 19], vec![49, 0, 12, 30, 6]]
}

/// Tolerance for f32 paths that differ only in summation order (fused vs composed kernels).
const F32_TOL: f32 = 1e-4;

#[test]
fn inference_and_training_paths_agree() {
    for arch in Arch::ALL {
        let (model, adapter) = setup(arch);
        let batch = TokenBatch::new(&seqs(), 0, Padding::Right).unwrap();
        // No dropout on the training path, so both compute the same function.
        let train = logits(&model, &batch, Some(&adapter), Mode::Train { dropout_seed: None });
        let infer = logits(&model, &batch, Some(&adapter), Mode::Inference);
        let d = max_abs_diff(&train, &infer);
        assert!(d < F32_TOL, "{arch:?}: train vs inference logits differ by {d}");
        // The adapter really changes the output (so the comparison above means something).
        let base = logits(&model, &batch, None, Mode::Inference);
        assert!(max_abs_diff(&base, &infer) > 1e-2);
    }
}

#[test]
fn padded_batches_equal_single_sequences() {
    for arch in Arch::ALL {
        let (model, adapter) = setup(arch);
        for padding in [Padding::Left, Padding::Right] {
            let batch = TokenBatch::new(&seqs(), 3, padding).unwrap();
            let all = logits(&model, &batch, Some(&adapter), Mode::Inference);
            let t = batch.seq_len();
            for (r, s) in seqs().iter().enumerate() {
                let single = logits(&model, &TokenBatch::single(s).unwrap(), Some(&adapter), Mode::Inference)
                    .squeeze(0)
                    .unwrap();
                let start = if padding == Padding::Left { t - s.len() } else { 0 };
                let row = all.get(r).unwrap().narrow(0, start, s.len()).unwrap();
                let d = max_abs_diff(&row, &single);
                assert!(d < F32_TOL, "{arch:?} {padding:?} row {r}: {d}");
            }
            // Last-token logits pick each row's last real token.
            let last =
                model.forward(&batch, None, Some(&adapter), Mode::Inference, LogitsAt::Last).unwrap().logits.unwrap();
            for (r, s) in seqs().iter().enumerate() {
                let single = logits(&model, &TokenBatch::single(s).unwrap(), Some(&adapter), Mode::Inference);
                let want = single.get(0).unwrap().get(s.len() - 1).unwrap();
                assert!(max_abs_diff(&last.get(r).unwrap(), &want) < F32_TOL, "{arch:?} {padding:?} last row {r}");
            }
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    for arch in Arch::ALL {
        let (model, adapter) = setup(arch);
        // Left-padded batch, prompt of 5 columns, then 3 decode steps one token at a time.
        let prompts = vec![vec![3, 8, 1, 22, 5], vec![7, 9]];
        let steps: Vec<Vec<u32>> = vec![vec![11, 12], vec![13, 14], vec![15, 16]];
        let mut cache = KvCache::new(model.config().num_layers);
        let batch = TokenBatch::new(&prompts, 0, Padding::Left).unwrap();
        model.forward(&batch, Some(&mut cache), Some(&adapter), Mode::Inference, LogitsAt::Last).unwrap();
        let mut full: Vec<Vec<u32>> = prompts.clone();
        for step in &steps {
            let next = TokenBatch::from_rows(step.iter().map(|&id| vec![id]).collect()).unwrap();
            let inc = model
                .forward(&next, Some(&mut cache), Some(&adapter), Mode::Inference, LogitsAt::Last)
                .unwrap()
                .logits
                .unwrap();
            for (r, &id) in step.iter().enumerate() {
                full[r].push(id);
                let want = logits(&model, &TokenBatch::single(&full[r]).unwrap(), Some(&adapter), Mode::Inference);
                let want = want.get(0).unwrap().get(full[r].len() - 1).unwrap();
                let d = max_abs_diff(&inc.get(r).unwrap(), &want);
                assert!(d < F32_TOL, "{arch:?} row {r} after {} tokens: {d}", full[r].len());
            }
        }
        assert_eq!(cache.seq_len(), 5 + steps.len());
        assert_eq!(cache.real_lens(), vec![8, 5]);
    }
}

#[test]
fn shared_prefix_reuse_equals_recomputation() {
    for arch in Arch::ALL {
        let (model, adapter) = setup(arch);
        let prefix = vec![2, 40, 41, 42, 43, 44];
        let suffixes = vec![vec![5, 6, 7], vec![8], vec![9, 10]];
        for mode in [Mode::Inference, Mode::Train { dropout_seed: None }] {
            let mut one = KvCache::new(model.config().num_layers);
            model
                .forward(&TokenBatch::single(&prefix).unwrap(), Some(&mut one), Some(&adapter), mode, LogitsAt::None)
                .unwrap();
            let mut cache = one.expand_batch(suffixes.len()).unwrap();
            let batch = TokenBatch::new(&suffixes, 0, Padding::Right).unwrap();
            let got =
                model.forward(&batch, Some(&mut cache), Some(&adapter), mode, LogitsAt::All).unwrap().logits.unwrap();
            for (r, s) in suffixes.iter().enumerate() {
                let full: Vec<u32> = prefix.iter().chain(s).copied().collect();
                let want =
                    logits(&model, &TokenBatch::single(&full).unwrap(), Some(&adapter), mode).squeeze(0).unwrap();
                let want = want.narrow(0, prefix.len(), s.len()).unwrap();
                let d = max_abs_diff(&got.get(r).unwrap().narrow(0, 0, s.len()).unwrap(), &want);
                assert!(d < F32_TOL, "{arch:?} {mode:?} row {r}: {d}");
            }
        }
    }
}

#[test]
fn merged_adapter_equals_unmerged() {
    for arch in Arch::ALL {
        let (model, adapter) = setup(arch);
        let batch = TokenBatch::new(&seqs(), 0, Padding::Right).unwrap();
        let unmerged = logits(&model, &batch, Some(&adapter), Mode::Inference);
        let merged = logits(&model.merged(&adapter).unwrap(), &batch, None, Mode::Inference);
        let d = max_abs_diff(&unmerged, &merged);
        assert!(d < F32_TOL, "{arch:?}: merged differs by {d}");
    }
}

#[test]
fn quantized_weights_track_dense_weights() {
    for arch in Arch::ALL {
        let cfg = tiny_config(arch, VOCAB);
        let dense = random_decoder(&cfg, 42, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
        let quant = random_decoder(&cfg, 42, WeightMode::Quantized, DType::F32, &Device::Cpu).unwrap();
        let batch = TokenBatch::new(&seqs(), 0, Padding::Right).unwrap();
        let a = logits(&dense, &batch, None, Mode::Inference);
        let b = logits(&quant, &batch, None, Mode::Inference);
        // Q8_0 weights and activations: small but non-zero error, relative to the logit scale
        // (a random tiny model has logits up to ~15).
        let scale = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let d = max_abs_diff(&a, &b) / scale(&a);
        assert!(d > 0.0 && d < 0.02, "{arch:?}: Q8_0 vs dense logits differ by {d} of the scale");
        // A LoRA adapter applies on top of quantized weights too.
        let (_, adapter) = setup(arch);
        let qa = logits(&quant, &batch, Some(&adapter), Mode::Inference);
        let da = logits(&dense, &batch, Some(&adapter), Mode::Inference);
        let dq = max_abs_diff(&qa, &da) / scale(&da);
        // This adapter perturbs every projection strongly, which amplifies the error.
        assert!(dq < 0.1, "{arch:?}: with adapter Q8_0 vs dense differ by {dq} of the scale");
        assert!(max_abs_diff(&qa, &b) > 1e-2);
    }
}

#[test]
fn fresh_adapter_starts_as_the_base_model() {
    let cfg = tiny_config(Arch::Qwen2, VOCAB);
    let model = random_decoder(&cfg, 42, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let adapter = LoraAdapter::init(LoraConfig::default(), &cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let batch = TokenBatch::new(&seqs(), 0, Padding::Right).unwrap();
    let d = max_abs_diff(
        &logits(&model, &batch, None, Mode::Inference),
        &logits(&model, &batch, Some(&adapter), Mode::Inference),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn peft_directory_round_trips() {
    let (model, adapter) = setup(Arch::Llama);
    let dir = std::env::temp_dir().join(format!("verdict-peft-{}", std::process::id()));
    adapter.save_peft_dir(&dir, "tiny").unwrap();
    let back = LoraAdapter::load_peft_dir(&dir, model.config(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.config(), adapter.config());
    let batch = TokenBatch::new(&seqs(), 0, Padding::Right).unwrap();
    let d = max_abs_diff(
        &logits(&model, &batch, Some(&adapter), Mode::Inference),
        &logits(&model, &batch, Some(&back), Mode::Inference),
    );
    assert_eq!(d, 0.0);
    // An adapter for another shape is refused with a reason.
    let other = tiny_config(Arch::Qwen2, VOCAB + 1);
    let mut bigger = other.clone();
    bigger.hidden_size = 96;
    let err = LoraAdapter::load_peft_dir(&dir, &bigger, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
