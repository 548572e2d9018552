//! `verdict-train sft`: LoRA supervised fine-tuning with the loss on the answer tokens only (the
//! label word and the closing tag), on one task or a mix.
//!
//! Read and tokenize the training split(s); plan each epoch's batches from the seed; each step
//! runs `grad_accum` micro-batches (the task's prompt prefix once per micro-batch, with
//! gradients, broadcast to its rows) and one optimizer step. The rest of the loop (resume,
//! schedule, clipping, log, dev evaluation and best adapter, checkpoints, curves) is
//! [`crate::harness`]'s. Data order and dropout depend only on the seed and the step
//! ([`crate::seeds`]), so `--resume` continues exactly.

use crate::harness::{figures, DevScore, Harness, Objective, Report, Spec, Updates};
use crate::run_dir;
use crate::seeds;
use crate::train_config::{LoopArgs, LoraArgs, RunArgs};
use crate::train_data::{self, BatchPlan, TaskData};
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use clap::Args;
use indicatif::ProgressBar;
use models::{Decoder, LoadedModel, LogitsAt, LoraAdapter, Mode};
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

/// One step: `grad_accum` micro-batches of the seeded plan, their mean answer NLL.
struct Sft<'a> {
    args: &'a SftArgs,
    loaded: &'a LoadedModel,
    adapter: &'a LoraAdapter,
    data: &'a [TaskData],
    plan: BatchPlan,
    cache: &'a Path,
    /// Tokens through the model since this process started the run (the log's rate).
    tokens: usize,
    start: Instant,
}

impl Objective for Sft<'_> {
    fn step(&mut self, step: u64, lr: f64, updates: &mut Updates) -> Result<Report> {
        let t = &self.args.train;
        let mut loss_sum = 0.0;
        let grad_norm = updates.step(t.grad_accum, lr, |micro| {
            let pos = (step - 1) * t.grad_accum as u64 + micro as u64;
            let (task, rows) = self.plan.batch(self.data, pos);
            let d = &self.data[task];
            let pad = self.loaded.special.pad_id();
            let (nll, n) = answer_nll(&self.loaded.model, self.adapter, d, &rows, pad, seeds::dropout(t.seed, pos))?;
            self.tokens += n + rows.iter().map(|&i| d.examples[i].body.len()).sum::<usize>() + d.prefix.len();
            loss_sum += nll.to_scalar::<f32>()? as f64;
            Ok(nll)
        })?;
        let loss = loss_sum / t.grad_accum as f64;
        let rate = self.tokens as f64 / self.start.elapsed().as_secs_f64();
        Ok(Report {
            figures: figures([("loss", loss.into()), ("grad_norm", grad_norm.into())]),
            message: format!("loss {loss:.4}"),
            line: format!("loss {loss:.4} grad-norm {grad_norm:.3} {rate:.0} tok/s"),
        })
    }

    fn dev_eval(&mut self, snapshot: &LoraAdapter, bar: &ProgressBar) -> Result<DevScore> {
        let (score, reports) =
            run_dir::dev_eval(self.loaded, snapshot, self.data, &self.args.run, &self.args.train, bar, self.cache)?;
        Ok(DevScore { score, reports, figures: Default::default() })
    }
}

pub fn run(args: &SftArgs, cache: &Path) -> Result<()> {
    let ckpt = run_dir::prepare(&args.run)?;
    let loaded = args.run.model.load_for_training(cache)?;
    let data = train_data::load(&loaded, &args.run.select, args.train.train_limit, cache)?;
    let t = &args.train;
    let adapter =
        LoraAdapter::init(args.lora.config(), loaded.model.config(), t.seed, DType::F32, loaded.model.device())?;
    let spec = Spec {
        run: &args.run,
        train: t,
        method: "sft",
        task: &data[0].task,
        total_steps: t.optimizer_steps(train_data::batches_per_epoch(&data, args.batch_size)),
        default_lr: DEFAULT_LR,
        curves_title: "SFT",
        curves: &[("training loss", "loss"), ("dev score", "dev_score"), ("learning rate", "lr")],
    };
    let harness = Harness::open(spec, ckpt.as_deref(), &adapter, None, cache)?;
    let plan = BatchPlan::new(&data, args.batch_size, t.seed);
    let mut sft =
        Sft { args, loaded: &loaded, adapter: &adapter, data: &data, plan, cache, tokens: 0, start: Instant::now() };
    harness.train(&mut sft, &adapter)
}
