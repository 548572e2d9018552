//! In-process latency of one classification request on a real decoder, without HTTP: the
//! engine's work for one `mr` sentence (the task's prompt body on top of its cached prefix, both
//! answers scored in one forward) through a real adapter, per-row (as `verdict-serve` runs it:
//! LoRA fused into the packed products), the same with the LoRA deltas as separate tensor ops
//! (the path of an adapter that trains), with the adapter as the whole batch's, merged into the
//! weights, with no prefix cache, and with `--answer-scoring word` (the label words alone).
//! Then a batch of eight sentences (`serve::loadgen::SAMPLE_SENTENCES`, the HTTP benchmark's):
//! one at a time, in one forward of padded rows, and in one forward packed without padding;
//! eight single forwards over the batched forward bounds what batching can gain on this machine.
//! Median and minimum of 7 runs each, side by side in one process.
//!
//! ```text
//! cargo build --release -p serve --example score_latency
//! target/release/examples/score_latency smollm2 runs/mr-smollm2/best
//! VERDICT_CPU_MATMUL=bf16 target/release/examples/score_latency qwen0.5b runs/mr-qwen05/best
//! VERDICT_CPU_ISA=none target/release/examples/score_latency smollm2 runs/mr-smollm2/best   # candle's kernels
//! VERDICT_WEIGHTS=quantized target/release/examples/score_latency qwen0.5b runs/mr-qwen05/best
//! ```

use candle_core::{DType, Device};
use models::scoring::{score_packed, score_rows};
use models::{load_for, Adapters, KvCache, LogitsAt, LoraAdapter, Mode, TokenBatch, WeightMode};
use serve::loadgen::SAMPLE_SENTENCES;
use shared::task::{AnswerScoring, TaskRegistry};
use std::collections::BTreeMap;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const SENTENCE: &str =
    "an ambitious mess that never finds its footing , though the cast does what it can with a thin script .";

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(adapter_dir)) = (args.get(1), args.get(2)) else {
        return Err("usage: score_latency <model> <adapter dir>".into());
    };
    // Kernel and weight options from the environment, as the binaries read them
    // (VERDICT_CPU_MATMUL, VERDICT_CPU_ISA, VERDICT_KERNEL_PLAN, VERDICT_WEIGHTS); `auto`
    // precision is the server's choice.
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let kargs = models::cpu::KernelArgs {
        cpu_matmul: env("VERDICT_CPU_MATMUL", "auto").parse()?,
        cpu_isa: env("VERDICT_CPU_ISA", "all").parse()?,
        kernel_plan: env("VERDICT_KERNEL_PLAN", "auto").parse()?,
    };
    let cache = shared::assets::cache_dir();
    let path = shared::assets::resolve_model(model, &cache)?;
    let weights: WeightMode = env("VERDICT_WEIGHTS", "dense").parse()?;
    // The server's loading path: kernels resolved on the model's shapes, weights from the pack.
    let purpose = models::cpu::Purpose::Serve;
    let loaded =
        load_for(&path, weights, DType::F32, &Device::Cpu, &kargs, purpose, &cache, &mut |l| eprintln!("{l}"))?;
    let dec = &loaded.model;
    let adapter = LoraAdapter::load_peft_dir(adapter_dir.as_ref(), dec.config(), DType::F32, &Device::Cpu)?;
    let tasks = TaskRegistry::builtin();
    let task = tasks.get("mr")?;
    let fields = BTreeMap::from([(task.fields[0].clone(), SENTENCE.to_string())]);
    let parts = task.prompt(loaded.chat.as_ref(), &[], &fields)?;
    let prefix = loaded.encode(&parts.prefix, true)?;
    let body = loaded.encode_body(&parts)?;
    let encode = |scoring| task.scored_candidates(scoring, |t| loaded.encode(t, false));
    let answers = encode(AnswerScoring::Full)?.candidates;
    let word = encode(AnswerScoring::Word)?;
    let (word_scoring, words) = (word.scoring, word.candidates);
    println!(
        "{model}, kernels {}: prefix {} tokens, body {} tokens, answers {:?} tokens, label words {:?} tokens ({word_scoring})",
        dec.kernels().describe(),
        prefix.len(),
        body.len(),
        answers.iter().map(Vec::len).collect::<Vec<_>>(),
        words.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let pad = loaded.special.pad_id();
    let mut cached = KvCache::new(dec.config().num_layers);
    dec.forward(&TokenBatch::single(&prefix)?, Some(&mut cached), Some(&adapter), Mode::Inference, LogitsAt::None)?;
    let merged = dec.merged(&adapter)?;
    let cands: Vec<&[Vec<u32>]> = vec![answers.as_slice()];
    let whole = [prefix.clone(), body.clone()].concat();
    let per_row = [Some(&adapter)];
    // The same factors as variables: the unfused path (a delta of tensor ops per projection).
    let as_ops = adapter.trainable()?;
    let per_row_ops = [Some(&as_ops)];
    let word_cands: Vec<&[Vec<u32>]> = vec![words.as_slice()];
    let time = |name: &str, f: &dyn Fn() -> Res<()>| -> Res<f64> {
        f()?;
        let mut ts = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            f()?;
            ts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ts.sort_by(|a, b| a.total_cmp(b));
        println!("{name:34} median {:7.1} ms  min {:7.1} ms", ts[3], ts[0]);
        Ok(ts[3])
    };
    let prefixed = || cached.expand_batch(1);
    time("prefix cache, per-row adapter", &|| {
        score_rows(dec, Adapters::PerRow(&per_row), prefixed()?, std::slice::from_ref(&body), &cands, pad)?;
        Ok(())
    })?;
    time("prefix cache, per-row adapter, ops", &|| {
        score_rows(dec, Adapters::PerRow(&per_row_ops), prefixed()?, std::slice::from_ref(&body), &cands, pad)?;
        Ok(())
    })?;
    time("prefix cache, per-row, word scoring", &|| {
        score_rows(dec, Adapters::PerRow(&per_row), prefixed()?, std::slice::from_ref(&body), &word_cands, pad)?;
        Ok(())
    })?;
    time("prefix cache, batch adapter", &|| {
        score_rows(dec, Adapters::Same(Some(&adapter)), prefixed()?, std::slice::from_ref(&body), &cands, pad)?;
        Ok(())
    })?;
    time("prefix cache, merged adapter", &|| {
        score_rows(&merged, Adapters::Same(None), prefixed()?, std::slice::from_ref(&body), &cands, pad)?;
        Ok(())
    })?;
    time("no prefix cache, merged adapter", &|| {
        let empty = KvCache::new(dec.config().num_layers);
        score_rows(&merged, Adapters::Same(None), empty, std::slice::from_ref(&whole), &cands, pad)?;
        Ok(())
    })?;

    let bodies: Vec<Vec<u32>> = SAMPLE_SENTENCES
        .iter()
        .map(|s| {
            let fields = BTreeMap::from([(task.fields[0].clone(), s.to_string())]);
            Ok(loaded.encode_body(&task.prompt(loaded.chat.as_ref(), &[], &fields)?)?)
        })
        .collect::<Res<_>>()?;
    let n = bodies.len();
    println!("batch of {n}: bodies {:?} tokens", bodies.iter().map(Vec::len).collect::<Vec<_>>());
    let cands_n: Vec<&[Vec<u32>]> = vec![answers.as_slice(); n];
    let single = time(&format!("{n} one at a time"), &|| {
        for b in &bodies {
            score_rows(dec, Adapters::PerRow(&per_row), prefixed()?, std::slice::from_ref(b), &cands, pad)?;
        }
        Ok(())
    })?;
    let per_row_n = vec![Some(&adapter); n];
    let padded = time(&format!("{n} in one forward, padded rows"), &|| {
        score_rows(dec, Adapters::PerRow(&per_row_n), cached.expand_batch(n)?, &bodies, &cands_n, pad)?;
        Ok(())
    })?;
    let packed = time(&format!("{n} in one forward, packed"), &|| {
        score_packed(dec, Adapters::PerRow(&per_row), prefixed()?, &bodies, &cands_n, &vec![0; n], pad)?;
        Ok(())
    })?;
    println!(
        "most throughput batching can add here: {:.2}x padded, {:.2}x packed (one at a time / batched)",
        single / padded,
        single / packed
    );
    Ok(())
}
