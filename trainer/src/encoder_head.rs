//! `verdict-train encoder-head`: the encoder baseline. A linear (multinomial logistic
//! regression) head on frozen sentence embeddings of a BERT encoder (all-MiniLM-L6-v2 by
//! default): embed the task's train, dev and test splits once (cached in the run directory),
//! fit the head by full-batch Adam on standardised features for each L2 penalty, keep the one
//! with the best dev score, score the test split with the evaluator's metrics and bootstrap
//! intervals, and write the head where `verdict-serve --model <encoder>` loads it:
//!
//! ```text
//! <out>/head.safetensors        weight [labels, hidden], bias [labels] (standardisation folded in)
//! <out>/verdict_manifest.json   the adapter manifest, method "encoder-head", naming the encoder's sha256
//! <out>/report.json             dev and test scores with 95% CIs, the chosen penalty, timings
//! <out>/embeddings/<split>.*    cached embeddings, reused when encoder and examples match
//! ```
//!
//! `--random` writes a seeded random head without data or training: the latency baseline for
//! encoders without real weights (BERT-base, BERT-large).

use crate::data::{data_dir, read_split, Item, TaskSelection};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, D};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use models::{ClassifierHead, EncodedInput, Encoder};
use serde_json::json;
use shared::adapter::{text_sha256, Manifest, HEAD_METHOD, MANIFEST_VERSION};
use shared::metrics::{score_task, Predictions, TaskScore};
use shared::task::{Label, Task};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

#[derive(Args)]
pub struct EncoderHeadArgs {
    /// The encoder: `minilm`, `bert-base`, `bert-large` (random weights) or a BERT directory.
    #[arg(long, env = "VERDICT_MODEL", default_value = "minilm")]
    pub model: String,
    /// `cpu`, `cuda` or `cuda:N` (the encoder runs f32 on either).
    #[arg(long, env = "VERDICT_DEVICE", default_value = "cpu")]
    pub device: models::DeviceSpec,
    #[command(flatten)]
    pub select: TaskSelection,
    /// The head's directory (copy it to `<registry>/<task>/<version>/` to serve it).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// L2 penalties tried (comma-separated); the best on dev is kept.
    #[arg(long, value_delimiter = ',', default_value = "0,0.0001,0.001,0.01,0.1,1")]
    pub l2: Vec<f64>,
    /// Full-batch Adam steps per penalty.
    #[arg(long, default_value_t = 500)]
    pub steps: usize,
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// Sentences per encoder forward while embedding.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// At most this many examples of each split (for quick runs).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of the bootstrap (and of `--random` heads).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Bootstrap resamples for the 95% confidence intervals.
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Write a seeded random head without training (latency baselines).
    #[arg(long)]
    pub random: bool,
}

/// One split's embeddings `[n, hidden]` and gold classes.
struct SplitData {
    x: Tensor,
    gold: Vec<usize>,
}

pub fn run(args: &EncoderHeadArgs, cache: &Path) -> Result<()> {
    let started = Instant::now();
    let registry = args.select.registry()?;
    let [task_name] = args.select.tasks.as_slice() else {
        return Err(crate::Failure::Usage("encoder-head trains one task at a time".into()).into());
    };
    let task = registry.get(task_name)?.clone();
    if task.is_score() {
        bail!("task {} is a score task; encoder heads classify", task.name);
    }
    let source = models::encoder::resolve(&args.model, cache)?.ok_or_else(|| {
        anyhow!("{} is not an encoder (minilm, bert-base, bert-large or a BERT directory)", args.model)
    })?;
    let sha = source.weights_sha256().context("hashing the encoder weights")?;
    let device = args.device.open()?;
    let encoder = Encoder::load(&source, &device)?;
    eprintln!("encoder {} loaded in {:.1}s", source.describe(), started.elapsed().as_secs_f64());
    std::fs::create_dir_all(&args.out)?;
    let manifest = |steps: u64, dev: Option<serde_json::Value>| Manifest {
        manifest_version: MANIFEST_VERSION,
        base_sha256: sha.clone(),
        base_model: args.model.clone(),
        base_hub_id: shared::assets::hub_id_of(&args.model).map(str::to_string),
        task: task.name.clone(),
        template_version: task.template_version,
        template_hash: task.template_hash(),
        label_words: task.label_words(),
        method: HEAD_METHOD.into(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        steps,
        dev_metrics: dev,
    };
    if args.random {
        let head = ClassifierHead::random(encoder.hidden_size(), task.num_classes(), args.seed, &device)?;
        head.save(&args.out)?;
        manifest(0, None).write(&args.out)?;
        println!("{}", args.out.display());
        return Ok(());
    }

    let dir = data_dir(&task, args.select.data.as_deref(), cache)?;
    let t_embed = Instant::now();
    let mut splits = HashMap::new();
    for split in ["train", "dev", "test"] {
        let (mut items, _) = read_split(&task, &dir, split, false)?;
        if let Some(n) = args.limit {
            items.truncate(n);
        }
        splits.insert(split, embed_split(&encoder, &task, &items, &sha, &args.out, split, args.batch_size)?);
    }
    let embed_seconds = t_embed.elapsed().as_secs_f64();

    // Standardise with the training statistics; folded into the head when saved.
    let train = &splits["train"];
    let mean = train.x.mean_keepdim(0)?;
    let std = train.x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?.sqrt()?.clamp(1e-6, f64::MAX)?;
    let standardise = |x: &Tensor| -> Result<Tensor> { Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?) };
    let (xtr, xdev) = (standardise(&train.x)?, standardise(&splits["dev"].x)?);
    let t_fit = Instant::now();
    let mut best: Option<(f64, f64, Tensor, Tensor, TaskScore)> = None;
    for &l2 in &args.l2 {
        let (w, b) = fit(&xtr, &train.gold, task.num_classes(), l2, args.steps, args.lr)?;
        let dev = evaluate(&task, &xdev, &w, &b, &splits["dev"].gold, 0, args.seed)?;
        eprintln!("l2 {l2}: dev {:.4}", dev.score);
        if best.as_ref().is_none_or(|(s, ..)| dev.score > *s) {
            best = Some((dev.score, l2, w, b, dev));
        }
    }
    let fit_seconds = t_fit.elapsed().as_secs_f64();
    let (_, l2, w, b, _) = best.ok_or_else(|| anyhow!("no --l2 given"))?;
    // Fold the standardisation in: W' = W / std, b' = b - W' mean.
    let w_folded = w.broadcast_div(&std.t()?)?; // [hidden, labels]
    let b_folded = (b - mean.matmul(&w_folded)?.squeeze(0)?)?;
    let head = ClassifierHead::new(w_folded.t()?.contiguous()?, b_folded)?;
    let scores = |split: &str, resamples: usize| -> Result<TaskScore> {
        let s = &splits[split];
        let logits = head.logits(&s.x)?;
        score_split(&task, &logits, &s.gold, resamples, args.seed)
    };
    let dev = scores("dev", args.resamples)?;
    let test = scores("test", args.resamples)?;
    head.save(&args.out)?;
    manifest(args.steps as u64, Some(json!({"task": task.name, "score": dev}))).write(&args.out)?;
    let report = json!({
        "encoder": source.describe(),
        "encoder_sha256": sha,
        "task": task.name,
        "examples": {"train": train.gold.len(), "dev": splits["dev"].gold.len(), "test": splits["test"].gold.len()},
        "l2": l2,
        "steps": args.steps,
        "lr": args.lr,
        "dev": dev,
        "test": test,
        "embed_seconds": embed_seconds,
        "fit_seconds": fit_seconds,
        "seconds": started.elapsed().as_secs_f64(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    });
    std::fs::write(args.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    let ci = |s: &TaskScore| format!("{:.4} [{:.4}, {:.4}]", s.score, s.score_ci.0, s.score_ci.1);
    println!(
        "{} {}: l2 {l2}, dev {}, test {} ({} test examples; embedding {embed_seconds:.0}s, fit {fit_seconds:.1}s, total {:.0}s)",
        task.name,
        args.model,
        ci(&dev),
        ci(&test),
        splits["test"].gold.len(),
        started.elapsed().as_secs_f64()
    );
    println!("{}", args.out.display());
    Ok(())
}

/// The gold class of each item.
fn classes(items: &[Item]) -> Result<Vec<usize>> {
    items
        .iter()
        .map(|it| match it.label {
            Label::Class(c) => Ok(c),
            Label::Score(_) => bail!("a score label in a classification task"),
        })
        .collect()
}

/// Embeds a split (the cached embeddings when encoder and examples are the same).
fn embed_split(
    encoder: &Encoder,
    task: &Task,
    items: &[Item],
    encoder_sha: &str,
    out: &Path,
    split: &str,
    batch_size: usize,
) -> Result<SplitData> {
    let gold = classes(items)?;
    let texts: Vec<Vec<&str>> =
        items.iter().map(|it| task.fields.iter().map(|f| it.raw.fields[f].as_str()).collect()).collect();
    let key = text_sha256(&format!(
        "{encoder_sha}\n{}",
        texts.iter().map(|t| t.join("\u{1}")).collect::<Vec<_>>().join("\n")
    ));
    let cache_dir = out.join("embeddings");
    let (file, key_file) = (cache_dir.join(format!("{split}.safetensors")), cache_dir.join(format!("{split}.key")));
    if std::fs::read_to_string(&key_file).is_ok_and(|k| k.trim() == key) {
        if let Some(x) = candle_core::safetensors::load(&file, encoder.device())?.remove("embeddings") {
            eprintln!("{split}: {} cached embeddings", gold.len());
            return Ok(SplitData { x, gold });
        }
    }
    let max = encoder.max_len();
    let inputs: Vec<EncodedInput> = texts
        .iter()
        .map(|t| {
            let mut input = encoder.encode_input(t)?;
            if input.ids.len() > max {
                // Keep the start and the final [SEP].
                let sep = *input.ids.last().expect("an input has [CLS] and [SEP]");
                input.ids.truncate(max - 1);
                input.ids.push(sep);
                input.type_ids.truncate(max);
            }
            Ok(input)
        })
        .collect::<Result<_, models::Error>>()?;
    // Similar lengths together: less padding.
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&i| inputs[i].ids.len());
    let bar = ProgressBar::new(inputs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("embed {split}"));
    let t = Instant::now();
    let mut rows: Vec<Option<Tensor>> = vec![None; inputs.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let refs: Vec<&EncodedInput> = chunk.iter().map(|&i| &inputs[i]).collect();
        let e = encoder.embed(&refs)?;
        for (k, &i) in chunk.iter().enumerate() {
            rows[i] = Some(e.get(k)?);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let rows: Vec<Tensor> = rows.into_iter().map(|r| r.expect("every input embedded")).collect();
    let x = Tensor::stack(&rows, 0)?;
    eprintln!("{split}: embedded {} examples in {:.1}s", gold.len(), t.elapsed().as_secs_f64());
    std::fs::create_dir_all(&cache_dir)?;
    candle_core::safetensors::save(&HashMap::from([("embeddings".to_string(), x.clone())]), &file)?;
    std::fs::write(&key_file, &key)?;
    Ok(SplitData { x, gold })
}

/// Multinomial logistic regression by full-batch Adam from zero: mean cross-entropy plus
/// `l2/2 |W|^2`. Returns `W [hidden, labels]` and `b [labels]`.
fn fit(x: &Tensor, gold: &[usize], labels: usize, l2: f64, steps: usize, lr: f64) -> Result<(Tensor, Tensor)> {
    let (n, hidden) = x.dims2()?;
    let dev = x.device();
    let onehot: Vec<f32> =
        gold.iter().flat_map(|&g| (0..labels).map(move |c| if c == g { 1.0 } else { 0.0 })).collect();
    let y = Tensor::from_vec(onehot, (n, labels), dev)?;
    let mut w = Tensor::zeros((hidden, labels), DType::F32, dev)?;
    let mut b = Tensor::zeros(labels, DType::F32, dev)?;
    let (mut mw, mut vw) = (w.zeros_like()?, w.zeros_like()?);
    let (mut mb, mut vb) = (b.zeros_like()?, b.zeros_like()?);
    let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    for t in 1..=steps {
        let p = candle_nn::ops::softmax(&x.matmul(&w)?.broadcast_add(&b)?, D::Minus1)?;
        let err = ((p - &y)? / n as f64)?;
        let gw = (x.t()?.matmul(&err)? + (&w * l2)?)?;
        let gb = err.sum(0)?;
        let c1 = 1.0 - beta1.powi(t as i32);
        let c2 = 1.0 - beta2.powi(t as i32);
        for (param, g, m, v) in [(&mut w, &gw, &mut mw, &mut vw), (&mut b, &gb, &mut mb, &mut vb)] {
            *m = ((&*m * beta1)? + (g * (1.0 - beta1))?)?;
            *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let step = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + eps)?)?;
            *param = (&*param - (step * lr)?)?;
        }
    }
    Ok((w, b))
}

/// The task's score of `x W + b` against `gold`.
fn evaluate(
    task: &Task,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    gold: &[usize],
    resamples: usize,
    seed: u64,
) -> Result<TaskScore> {
    score_split(task, &x.matmul(w)?.broadcast_add(b)?, gold, resamples, seed)
}

/// The evaluator's metrics and bootstrap interval of the predictions `argmax logits`.
fn score_split(task: &Task, logits: &Tensor, gold: &[usize], resamples: usize, seed: u64) -> Result<TaskScore> {
    let pred: Vec<usize> = logits.argmax(D::Minus1)?.to_vec1::<u32>()?.into_iter().map(|c| c as usize).collect();
    let preds = Predictions::Classes { pred, gold: gold.to_vec(), n_classes: task.num_classes(), groups: None };
    score_task(&task.metrics, &preds, resamples, seed).map_err(|e| anyhow!("task {}: {e}", task.name))
}
