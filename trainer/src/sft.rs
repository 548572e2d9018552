//! `verdict-train sft`: LoRA supervised fine-tuning with the loss on the answer tokens only (the
//! label word and the closing tag), on one task or a mix.
//!
//! The loop, top to bottom: read and tokenize the training split(s); plan each epoch's batches
//! from the seed; for every optimizer step run `grad_accum` micro-batches (the task's prompt
//! prefix once per micro-batch, with gradients, broadcast to its rows), clip, step; log; evaluate
//! on the dev split every `eval_every` steps and keep the best adapter; checkpoint atomically.
//! Data order and dropout depend only on the seed and the step, so `--resume` continues exactly.

use crate::eval::{self, EvalArgs, EvalMode, Item, TaskSelection};
use crate::optim::{clip_grad_norm, learning_rate, Optimizer, OptimizerConfig, OptimizerKind, Schedule};
use crate::run_dir::{self, MetricsLog, RunState};
use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use models::{
    Decoder, KvCache, LoadedModel, LogitsAt, LoraAdapter, LoraConfig, Mode, Padding, Projection, TokenBatch, WeightMode,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use shared::adapter::{weights_sha256, Manifest, MANIFEST_VERSION};
use shared::task::Task;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Clone)]
pub struct SftArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub select: TaskSelection,
    /// Run directory: checkpoints, metrics.jsonl, curves.svg, best/ and adapter/.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in `--out`.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// rsLoRA scaling alpha/sqrt(rank) (the method's); `--rslora false` for alpha/rank.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub rslora: bool,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Projections to adapt, comma-separated: q,k,v,o,gate,up,down.
    #[arg(long, value_delimiter = ',', default_value = "q,v")]
    pub targets: Vec<Projection>,
    #[arg(long, value_enum, default_value_t = OptimizerKind::AdamW)]
    pub optimizer: OptimizerKind,
    /// Peak learning rate. The method used 9e-6 with batch 24 on 7B models; small models on a
    /// CPU budget of a few hundred steps want far more.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, value_enum, default_value_t = Schedule::Linear)]
    pub schedule: Schedule,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Stop after this many optimizer steps (overrides `--epochs`).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Evaluate on the dev split every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Dev examples per evaluation (default: the whole split).
    #[arg(long)]
    pub eval_limit: Option<usize>,
    #[arg(long, default_value = "dev")]
    pub eval_split: String,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Train on the first N examples of each task only.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Print a log line every N steps (the progress bar only shows on a terminal).
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
}

/// One tokenized training example.
struct Example {
    body: Vec<u32>,
    answer: Vec<u32>,
}

/// A task's tokenized training data.
struct TaskData {
    task: Task,
    prefix: Vec<u32>,
    examples: Vec<Example>,
}

/// `(task index, example indices)` for every batch of one epoch.
type EpochPlan = Vec<(usize, Vec<usize>)>;

/// The batches of one epoch, from the seed.
fn plan_epoch(data: &[TaskData], batch_size: usize, seed: u64, epoch: u64) -> EpochPlan {
    let mut batches = Vec::new();
    for (t, d) in data.iter().enumerate() {
        let mut idx: Vec<usize> = (0..d.examples.len()).collect();
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ (epoch << 20) ^ (t as u64) << 40));
        for chunk in idx.chunks(batch_size) {
            batches.push((t, chunk.to_vec()));
        }
    }
    batches.shuffle(&mut ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch.wrapping_mul(0x9E37_79B9))));
    batches
}

/// Mean negative log-likelihood of the answer tokens of one micro-batch, and their count.
/// The prefix is run once with gradients and broadcast to every row.
fn answer_nll(
    model: &Decoder,
    adapter: &LoraAdapter,
    data: &TaskData,
    rows: &[usize],
    pad: u32,
    dropout_seed: u64,
) -> Result<(Tensor, usize)> {
    let mut cache = KvCache::new(model.config().num_layers);
    let train = |s: u64| Mode::Train { dropout_seed: Some(s) };
    model.forward(
        &TokenBatch::single(&data.prefix)?,
        Some(&mut cache),
        Some(adapter),
        train(dropout_seed),
        LogitsAt::None,
    )?;
    let mut cache = cache.expand_batch(rows.len())?;
    let mut seqs = Vec::with_capacity(rows.len());
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for (r, &i) in rows.iter().enumerate() {
        let ex = &data.examples[i];
        for (k, &t) in ex.answer.iter().enumerate() {
            positions.push((r, ex.body.len() - 1 + k));
            targets.push(t);
        }
        seqs.push(ex.body.iter().chain(&ex.answer).copied().collect::<Vec<u32>>());
    }
    let batch = TokenBatch::new(&seqs, pad, Padding::Right)?;
    let logits = model
        .forward(&batch, Some(&mut cache), Some(adapter), train(dropout_seed ^ 0x5555), LogitsAt::Positions(positions))?
        .logits
        .expect("logits requested");
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let n = targets.len();
    let targets = Tensor::from_vec(targets, (n, 1), logp.device())?;
    let nll = (logp.gather(&targets, 1)?.sum_all()? * (-1.0 / n as f64))?;
    Ok((nll, n))
}

fn tokenize_task(loaded: &LoadedModel, task: &Task, items: &[Item]) -> Result<TaskData> {
    let mut prefix = None;
    let mut examples = Vec::with_capacity(items.len());
    for it in items {
        let parts = task.prompt(loaded.chat.as_ref(), &[], &it.raw.fields)?;
        match &prefix {
            None => prefix = Some(parts.prefix.clone()),
            Some(p) if p != &parts.prefix => bail!("task {}: prompts do not share one prefix", task.name),
            _ => {}
        }
        let answer = loaded.encode(&Task::answer_text(&task.label_word(it.label)), false)?;
        examples.push(Example { body: loaded.encode(&parts.body, false)?, answer });
    }
    let prefix = loaded.encode(&prefix.context("no training examples")?, true)?;
    Ok(TaskData { task: task.clone(), prefix, examples })
}

fn eval_args(args: &SftArgs, task: &str) -> EvalArgs {
    EvalArgs {
        model: args.model.clone(),
        select: TaskSelection { tasks: vec![task.to_string()], ..args.select.clone() },
        split: args.eval_split.clone(),
        shots: 0,
        mode: EvalMode::Constrained,
        adapter: None,
        batch_size: 16,
        limit: args.eval_limit,
        seed: args.seed,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: 16,
        resamples: 200,
        skip_bad_rows: false,
        out: None,
        predictions: false,
    }
}

pub fn run(args: &SftArgs, cache: &Path) -> Result<()> {
    if args.model.weights != WeightMode::Dense {
        bail!("training needs dense weights (--weights dense)");
    }
    if args.select.data.is_some() && args.select.tasks.len() > 1 {
        bail!("--data names one task's directory; a mix reads each task's default data");
    }
    let ckpt = if args.resume { run_dir::latest_checkpoint(&args.out)? } else { None };
    if args.resume && ckpt.is_none() {
        eprintln!("no checkpoint in {}: starting from scratch", args.out.display());
    }
    if !args.resume && run_dir::latest_checkpoint(&args.out)?.is_some() {
        bail!("{} already holds a run: pass --resume to continue it, or another --out", args.out.display());
    }
    std::fs::create_dir_all(&args.out)?;
    let registry = args.select.registry()?;
    let loaded = args.model.load(cache)?;
    let model_path = shared::assets::resolve_model(&args.model.model, cache).map_err(anyhow::Error::msg)?;
    let base_sha = weights_sha256(&model_path)?;

    let mut data = Vec::new();
    for name in &args.select.tasks {
        let task = registry.get(name)?.clone();
        let dir = eval::data_dir(&task, args.select.data.as_deref(), cache)?;
        let (mut items, _) = eval::read_split(&task, &dir, "train", false)?;
        if let Some(n) = args.train_limit {
            items.truncate(n);
        }
        data.push(tokenize_task(&loaded, &task, &items)?);
        eprintln!("task {}: {} training examples", name, items.len());
    }
    let batches_per_epoch: usize = data.iter().map(|d| d.examples.len().div_ceil(args.batch_size)).sum();
    let total_steps = args
        .max_steps
        .unwrap_or(((args.epochs * batches_per_epoch as f64) / args.grad_accum as f64).ceil() as u64)
        .max(1);

    let cfg = loaded.model.config().clone();
    let lora = LoraConfig {
        rank: args.rank,
        alpha: args.alpha,
        use_rslora: args.rslora,
        dropout: args.lora_dropout,
        targets: args.targets.clone(),
        layers: None,
    };
    let adapter = LoraAdapter::init(lora, &cfg, args.seed, DType::F32, &Device::Cpu)?;
    let mut opt =
        Optimizer::new(OptimizerConfig { kind: args.optimizer, weight_decay: args.weight_decay, ..Default::default() });
    let mut state = RunState { step: 0, best_score: None, best_step: None };
    if let Some(dir) = &ckpt {
        state = run_dir::load_checkpoint(dir, &adapter, &mut opt)?;
        eprintln!("resumed from {} (step {})", dir.display(), state.step);
    }
    let log = MetricsLog::open(&args.out, ckpt.as_ref().map(|_| state.step))?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let pad = loaded.special.pad_id();

    let bar = ProgressBar::new(total_steps);
    bar.set_style(
        ProgressStyle::with_template("sft [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_position(state.step);
    let start = Instant::now();
    let mut tokens_done = 0usize;
    let mut plan: Option<(u64, EpochPlan)> = None;
    while state.step < total_steps {
        let step = state.step + 1;
        let step_start = Instant::now();
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0.0;
        for micro in 0..args.grad_accum {
            let pos = (step - 1) * args.grad_accum as u64 + micro as u64;
            let (epoch, index) = (pos / batches_per_epoch as u64, (pos % batches_per_epoch as u64) as usize);
            if plan.as_ref().is_none_or(|(e, _)| *e != epoch) {
                plan = Some((epoch, plan_epoch(&data, args.batch_size, args.seed, epoch)));
            }
            let (t, rows) = &plan.as_ref().expect("planned").1[index];
            let dropout_seed = args.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ pos;
            let (nll, n) = answer_nll(&loaded.model, &adapter, &data[*t], rows, pad, dropout_seed)?;
            tokens_done +=
                n + rows.iter().map(|&i| data[*t].examples[i].body.len()).sum::<usize>() + data[*t].prefix.len();
            loss_sum += nll.to_scalar::<f32>()? as f64;
            let g = (nll / args.grad_accum as f64)?.backward()?;
            for (name, var) in adapter.vars() {
                if let Some(gv) = g.get(var.as_tensor()) {
                    let acc = match grads.remove(name) {
                        Some(prev) => (prev + gv)?,
                        None => gv.clone(),
                    };
                    grads.insert(name.clone(), acc);
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, args.max_grad_norm)?;
        let lr = learning_rate(args.schedule, args.lr, step, args.warmup_steps, total_steps);
        opt.step(adapter.vars(), &grads, lr)?;
        state.step = step;
        let loss = loss_sum / args.grad_accum as f64;
        let step_secs = step_start.elapsed().as_secs_f64();
        log.append(&serde_json::json!({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_seconds": step_secs}))?;
        bar.set_message(format!("loss {loss:.4}"));
        bar.set_position(step);
        if step.is_multiple_of(args.log_every.max(1)) || step == total_steps {
            let rate = tokens_done as f64 / start.elapsed().as_secs_f64();
            bar.suspend(|| eprintln!("step {step}/{total_steps} loss {loss:.4} lr {lr:.2e} grad-norm {grad_norm:.3} {step_secs:.2}s/step {rate:.0} tok/s"));
        }
        let eval_now = (args.eval_every > 0 && step.is_multiple_of(args.eval_every)) || step == total_steps;
        if eval_now {
            let snapshot = adapter.snapshot()?;
            let mut scores = Vec::new();
            let mut reports = Vec::new();
            for d in &data {
                let r = bar.suspend(|| {
                    eval::eval_task(&loaded, Some(&snapshot), &d.task, &eval_args(args, &d.task.name), cache)
                })?;
                scores.push(r.score.score);
                reports.push(serde_json::json!({"task": d.task.name, "score": r.score}));
            }
            let score = shared::metrics::average(&scores);
            log.append(&serde_json::json!({"step": step, "dev_score": score, "dev": reports}))?;
            bar.suspend(|| eprintln!("step {step}: dev score {score:.4}"));
            if state.best_score.is_none_or(|b| score > b) {
                state.best_score = Some(score);
                state.best_step = Some(step);
                save_adapter(&args.out.join("best"), &snapshot, &data, args, &base_sha, &command, step, &reports)?;
            }
        }
        if step.is_multiple_of(args.save_every.max(1)) || step == total_steps {
            run_dir::save_checkpoint(&args.out, &adapter, &opt, &state, &args.model.model, args.keep_checkpoints)?;
        }
    }
    bar.finish_and_clear();
    save_adapter(&args.out.join("adapter"), &adapter.snapshot()?, &data, args, &base_sha, &command, state.step, &[])?;
    draw_curves(&args.out, &log)?;
    eprintln!(
        "done: {} steps in {:.1}s; best dev score {:?} at step {:?}; adapter in {}",
        state.step,
        start.elapsed().as_secs_f64(),
        state.best_score,
        state.best_step,
        args.out.join("adapter").display()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn save_adapter(
    dir: &Path,
    adapter: &LoraAdapter,
    data: &[TaskData],
    args: &SftArgs,
    base_sha: &str,
    command: &str,
    step: u64,
    dev: &[serde_json::Value],
) -> Result<()> {
    run_dir::write_dir_atomically(dir, |tmp| {
        adapter.write_peft_files(tmp, &args.model.model)?;
        // One manifest per adapter: a mix records its first task; each task's template is listed.
        let task = &data[0].task;
        let manifest = Manifest {
            manifest_version: MANIFEST_VERSION,
            base_sha256: base_sha.to_string(),
            base_model: args.model.model.clone(),
            task: task.name.clone(),
            template_version: task.template_version,
            template_hash: task.template_hash(),
            label_words: task.label_words(),
            method: "sft".into(),
            command: command.to_string(),
            steps: step,
            dev_metrics: if dev.is_empty() { None } else { Some(serde_json::Value::Array(dev.to_vec())) },
        };
        manifest.write(tmp)?;
        Ok::<(), anyhow::Error>(())
    })
}

fn draw_curves(out: &Path, log: &MetricsLog) -> Result<()> {
    let entries = log.entries()?;
    let series = |key: &str| -> Vec<(f64, f64)> {
        entries.iter().filter_map(|e| Some((e["step"].as_f64()?, e[key].as_f64()?))).collect()
    };
    run_dir::write_curves_svg(
        &out.join("curves.svg"),
        "SFT",
        &[("training loss", series("loss")), ("dev score", series("dev_score")), ("learning rate", series("lr"))],
    )
}
