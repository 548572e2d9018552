//! `verdict-train sft`: LoRA supervised fine-tuning with the loss on the answer tokens only (the
//! label word and the closing tag), on one task or a mix.
//!
//! The loop, top to bottom: read and tokenize the training split(s); plan each epoch's batches
//! from the seed; for every optimizer step run `grad_accum` micro-batches (the task's prompt
//! prefix once per micro-batch, with gradients, broadcast to its rows), clip, step; log; evaluate
//! on the dev split every `eval_every` steps and keep the best adapter; checkpoint atomically.
//! Data order and dropout depend only on the seed and the step, so `--resume` continues exactly.

use crate::optim::{clip_grad_norm, learning_rate, Optimizer, OptimizerConfig};
use crate::run_dir::{self, MetricsLog, Recorder, RunState};
use crate::train_config::{progress_bar, LoopArgs, LoraArgs, RunArgs};
use crate::train_data::{self, BatchPlan, TaskData};
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use clap::Args;
use models::{Decoder, LogitsAt, LoraAdapter, Mode};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

#[derive(Args, Clone)]
pub struct SftArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub train: LoopArgs,
    #[arg(long, default_value_t = 8, visible_aliases = ["per-device-train-batch-size"], aliases = ["per_device_train_batch_size"])]
    pub batch_size: usize,
}

/// SFT's default peak learning rate.
const DEFAULT_LR: f64 = 2e-4;

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
    let mode = Mode::Train { dropout_seed: Some(dropout_seed) };
    let (out, _) = train_data::forward_after_prefix(
        model,
        Some(adapter),
        &data.prefix,
        &seqs,
        pad,
        mode,
        LogitsAt::Positions(positions),
    )?;
    let logits = out.logits.expect("logits requested");
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let n = targets.len();
    let targets = Tensor::from_vec(targets, (n, 1), logp.device())?;
    let nll = (logp.gather(&targets, 1)?.sum_all()? * (-1.0 / n as f64))?;
    Ok((nll, n))
}

pub fn run(args: &SftArgs, cache: &Path) -> Result<()> {
    let ckpt = run_dir::prepare(&args.run)?;
    let loaded = args.run.model.load_for_training(cache)?;
    let data = train_data::load(&loaded, &args.run.select, args.train.train_limit, cache)?;
    let t = &args.train;
    let batches_per_epoch = train_data::batches_per_epoch(&data, args.batch_size);
    let total_steps = t.total_steps(batches_per_epoch as f64 / t.grad_accum as f64);

    let adapter =
        LoraAdapter::init(args.lora.config(), loaded.model.config(), t.seed, DType::F32, loaded.model.device())?;
    let mut opt =
        Optimizer::new(OptimizerConfig { kind: t.optimizer, weight_decay: t.weight_decay, ..Default::default() });
    let mut state = RunState::default();
    if let Some(dir) = &ckpt {
        state = run_dir::load_checkpoint(dir, &adapter, None, &mut opt)?;
        eprintln!("resumed from {} (step {})", dir.display(), state.step);
    }
    let log = MetricsLog::open(&args.run.out, ckpt.as_ref().map(|_| state.step))?;
    let rec = Recorder::new(&args.run.out, &args.run.model, "sft", &data[0].task, t.keep_checkpoints, cache)?;
    let pad = loaded.special.pad_id();
    let peak_lr = t.lr.unwrap_or(DEFAULT_LR);

    let bar = progress_bar("sft", total_steps, state.step);
    let start = Instant::now();
    let mut tokens_done = 0usize;
    let mut plan = BatchPlan::new(&data, args.batch_size, t.seed);
    while state.step < total_steps {
        let step = state.step + 1;
        let step_start = Instant::now();
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0.0;
        for micro in 0..t.grad_accum {
            let pos = (step - 1) * t.grad_accum as u64 + micro as u64;
            let (task, rows) = plan.batch(&data, pos);
            let dropout_seed = t.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ pos;
            let (nll, n) = answer_nll(&loaded.model, &adapter, &data[task], &rows, pad, dropout_seed)?;
            tokens_done +=
                n + rows.iter().map(|&i| data[task].examples[i].body.len()).sum::<usize>() + data[task].prefix.len();
            loss_sum += nll.to_scalar::<f32>()? as f64;
            let g = (nll / t.grad_accum as f64)?.backward()?;
            run_dir::accumulate_grads(&mut grads, &g, adapter.vars())?;
        }
        let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
        let lr = learning_rate(t.schedule, peak_lr, step, t.warmup_steps, total_steps);
        opt.step(adapter.vars(), &grads, lr)?;
        state.step = step;
        let loss = loss_sum / t.grad_accum as f64;
        let step_secs = step_start.elapsed().as_secs_f64();
        log.append(&serde_json::json!({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_seconds": step_secs}))?;
        bar.set_message(format!("loss {loss:.4}"));
        bar.set_position(step);
        if t.log_due(step, total_steps) {
            let rate = tokens_done as f64 / start.elapsed().as_secs_f64();
            bar.suspend(|| eprintln!("step {step}/{total_steps} loss {loss:.4} lr {lr:.2e} grad-norm {grad_norm:.3} {step_secs:.2}s/step {rate:.0} tok/s"));
        }
        if t.eval_due(step, total_steps) {
            let snapshot = adapter.snapshot()?;
            let (score, reports) = run_dir::dev_eval(&loaded, &snapshot, &data, &args.run, &args.train, &bar, cache)?;
            log.append(&serde_json::json!({"step": step, "dev_score": score, "dev": reports}))?;
            rec.dev_result(&mut state, score, &reports, &snapshot, None)?;
        }
        if t.save_due(step, total_steps) {
            rec.checkpoint(&adapter, None, &opt, &state)?;
            // The picture follows the checkpoints: current while the run goes on, and after a kill.
            draw_curves(&args.run.out, &log)?;
        }
    }
    bar.finish_and_clear();
    rec.finish(&adapter, None, &state, start.elapsed().as_secs_f64())?;
    draw_curves(&args.run.out, &log)?;
    Ok(())
}

fn draw_curves(out: &Path, log: &MetricsLog) -> Result<()> {
    run_dir::write_curves_svg(
        &out.join("curves.svg"),
        "SFT",
        &[
            ("training loss", log.series("loss")?),
            ("dev score", log.series("dev_score")?),
            ("learning rate", log.series("lr")?),
        ],
    )
}
