//! `verdict-train bench`: prefill throughput (tokens/s, achieved GFLOP/s) and per-token decode
//! latency, next to the f32 matmul rate this machine reaches through the same kernels.

use crate::model_args::ModelArgs;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use models::{DTypeSpec, DecoderConfig, DeviceSpec, KvCache, LogitsAt, Mode, TokenBatch, WeightMode};
use std::path::Path;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Models to measure (repeatable).
    #[arg(long = "model", env = "VERDICT_MODEL", default_values_t = vec!["smollm2".to_string()])]
    models: Vec<String>,
    /// Weight modes to measure (repeatable).
    #[arg(long = "weights", env = "VERDICT_WEIGHTS", default_values_t = vec![WeightMode::Dense, WeightMode::Quantized])]
    weights: Vec<WeightMode>,
    /// Prompt length for prefill.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens to decode after the prompt.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Timed repetitions (the best is reported, as the least disturbed by other load).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "VERDICT_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Precision of dense weights: `auto` (f32 on CPU, bf16 on a GPU), `f32`, `bf16`, `f16`.
    #[arg(long, env = "VERDICT_DTYPE", default_value = "auto")]
    dtype: DTypeSpec,
    #[command(flatten)]
    kernels: models::cpu::KernelArgs,
}

/// FLOPs of one prefill of `t` tokens with logits for the last one: projections, attention
/// scores and mixing (computed over the full `t x t` square), and the LM head row.
pub fn prefill_flops(cfg: &DecoderConfig, t: usize) -> f64 {
    let t = t as f64;
    let proj = 2.0 * cfg.layer_params() as f64 * t;
    let attn = 4.0 * t * t * (cfg.head_dim * cfg.num_heads * cfg.num_layers) as f64;
    let head = 2.0 * (cfg.hidden_size * cfg.vocab_size) as f64;
    proj + attn + head
}

/// Best-of-`repeats` GFLOP/s of an `n x n x n` matmul in `dtype` through candle's kernels on
/// `dev` (GPU work is synchronised before the clock stops).
fn matmul_rate(n: usize, repeats: usize, dtype: DType, dev: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    a.matmul(&b)?;
    dev.synchronize()?;
    let mut best = f64::MAX;
    for _ in 0..repeats.max(3) {
        let t = Instant::now();
        a.matmul(&b)?;
        dev.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

pub fn run(args: &BenchArgs, cache: &Path) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let dev = args.device.open()?;
    let dtype = args.dtype.resolve(&dev);
    let n = if dev.is_cpu() { 1024 } else { 4096 };
    let peak = matmul_rate(n, args.repeats, dtype, &dev)?;
    println!(
        "{dtype:?} matmul {n}x{n}x{n} through candle on {}: {peak:.1} GFLOP/s ({threads} CPU threads)\n",
        args.device
    );
    println!("| model | weights | prompt tokens | prefill s | prefill tok/s | prefill GFLOP/s | % of matmul rate | decode ms/token |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for name in &args.models {
        for &weights in &args.weights {
            let loaded = ModelArgs {
                model: name.clone(),
                weights,
                device: args.device,
                dtype: args.dtype,
                kernels: args.kernels.clone(),
                ..Default::default()
            }
            .load(cache)?;
            let model = &loaded.model;
            let cfg = model.config().clone();
            // A prompt of ordinary text, repeated to length.
            let text = "The quick brown fox jumps over the lazy dog, and the critics loved every minute of it. ";
            let mut ids = loaded.encode(&text.repeat(64), true)?;
            ids.truncate(args.prompt_tokens);
            let prompt = TokenBatch::single(&ids)?;
            let prefill = || -> Result<(f64, KvCache)> {
                let mut cache = KvCache::new(cfg.num_layers);
                let t = Instant::now();
                model.forward(&prompt, Some(&mut cache), None, Mode::Inference, LogitsAt::Last)?;
                dev.synchronize()?;
                Ok((t.elapsed().as_secs_f64(), cache))
            };
            prefill()?;
            let mut best = f64::MAX;
            let mut cache = KvCache::new(cfg.num_layers);
            for _ in 0..args.repeats.max(1) {
                let (secs, c) = prefill()?;
                best = best.min(secs);
                cache = c;
            }
            let mut step_times = Vec::with_capacity(args.decode_tokens);
            let mut next = *ids.last().expect("non-empty prompt");
            for _ in 0..args.decode_tokens {
                let t = Instant::now();
                let out = model.forward(
                    &TokenBatch::single(&[next])?,
                    Some(&mut cache),
                    None,
                    Mode::Inference,
                    LogitsAt::Last,
                )?;
                next = out.logits.expect("logits").squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
                step_times.push(t.elapsed().as_secs_f64());
            }
            step_times.sort_by(f64::total_cmp);
            let decode_ms = step_times.get(step_times.len() / 2).copied().unwrap_or(f64::NAN) * 1e3;
            let gflops = prefill_flops(&cfg, ids.len()) / best / 1e9;
            println!(
                "| {name} | {} | {} | {best:.3} | {:.0} | {gflops:.1} | {:.0}% | {decode_ms:.1} |",
                weights,
                ids.len(),
                ids.len() as f64 / best,
                100.0 * gflops / peak
            );
            drop(loaded);
        }
    }
    println!("\nprefill: best of {} runs, batch 1, logits for the last token only; decode: median over {} tokens with the KV cache.", args.repeats, args.decode_tokens);
    Ok(())
}
