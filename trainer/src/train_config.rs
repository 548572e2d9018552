//! Settings every training command shares (SFT, PPO): the LoRA shape, the optimizer and the
//! run loop (steps, evaluation, checkpoints), and the pieces of the loop built from them.

use crate::data::TaskSelection;
use crate::eval::{EvalArgs, EvalMode};
use crate::model_args::ModelArgs;
use crate::optim::{OptimizerKind, Schedule};
use candle_core::DType;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use models::{LoadedModel, LoraAdapter, LoraConfig, Projection};
use shared::task::{AnswerScoring, Task};
use std::path::{Path, PathBuf};

/// Which model, which tasks, which run directory: the head of every training command.
#[derive(Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub select: TaskSelection,
    /// Run directory: checkpoints, metrics.jsonl, curves.svg, best/ and adapter/.
    #[arg(long, visible_aliases = ["output-dir"], aliases = ["output_dir"])]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in `--out` (with the settings the run started with;
    /// only those in `settings::RESUME_MAY_CHANGE` may differ).
    #[arg(long)]
    pub resume: bool,
    /// Every flag's resolved value, recorded in `<out>/run.json` and checked on `--resume`
    /// (filled in from the parsed command line by `main`).
    #[arg(skip)]
    pub settings: crate::settings::RunSettings,
}

/// A fresh adapter's shape (ignored when training continues from an existing adapter).
#[derive(Args, Clone, Debug)]
pub struct LoraArgs {
    #[arg(long, default_value_t = 16, visible_aliases = ["lora-r"], aliases = ["lora_r"])]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0, visible_aliases = ["lora-alpha"], aliases = ["lora_alpha"])]
    pub alpha: f64,
    /// Plain LoRA scaling alpha/rank instead of rsLoRA's alpha/sqrt(rank) (the method's, and
    /// the default; `--rslora` undoes an earlier `--no-rslora`).
    #[arg(long = "no-rslora", action = clap::ArgAction::SetFalse, overrides_with = "rslora_on")]
    pub rslora: bool,
    #[arg(long = "rslora", alias = "use-rslora", overrides_with = "rslora", hide = true)]
    #[allow(dead_code)] // the `--x` half of `--x / --no-x`: it only overrides `--no-rslora`
    rslora_on: bool,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Projections to adapt, comma-separated: q,k,v,o,gate,up,down.
    #[arg(long, value_delimiter = ',', default_value = "q,v", visible_aliases = ["lora-target-modules"], aliases = ["lora_target_modules"])]
    pub targets: Vec<Projection>,
}

impl LoraArgs {
    pub fn config(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            use_rslora: self.rslora,
            dropout: self.lora_dropout,
            targets: self.targets.clone(),
            layers: None,
        }
    }
}

/// Optimizer, schedule, length, evaluation and checkpointing of a training run.
#[derive(Args, Clone, Debug)]
pub struct LoopArgs {
    #[arg(long, value_enum, default_value_t = OptimizerKind::AdamW)]
    pub optimizer: OptimizerKind,
    /// Peak learning rate (default: sft 2e-4, ppo 2e-5). The method used 9e-6 on 7B models;
    /// small models on a CPU budget of a few hundred steps want more.
    #[arg(long, visible_aliases = ["learning-rate"], aliases = ["learning_rate"])]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, value_enum, default_value_t = Schedule::Linear, visible_aliases = ["lr-scheduler-type"], aliases = ["lr_scheduler_type"])]
    pub schedule: Schedule,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Passes over the training data.
    #[arg(long, default_value_t = 1.0, visible_aliases = ["num-train-epochs"], aliases = ["num_train_epochs"])]
    pub epochs: f64,
    /// Stop after this many optimizer (sft) or rollout (ppo) steps; overrides `--epochs`.
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 1, visible_aliases = ["gradient-accumulation-steps"], aliases = ["gradient_accumulation_steps"])]
    pub grad_accum: usize,
    /// Clip the global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Evaluate on the dev split every N steps (0: only at the end).
    #[arg(long, default_value_t = 0, visible_aliases = ["eval-steps"], aliases = ["eval_steps"])]
    pub eval_every: u64,
    /// Dev examples per evaluation (default: the whole split).
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// The split of the in-training evaluations (`validation` is `dev`).
    #[arg(long, default_value = "dev", value_parser = crate::data::split_name)]
    pub eval_split: String,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 50, visible_aliases = ["save-steps"], aliases = ["save_steps"])]
    pub save_every: u64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 2, visible_aliases = ["save-total-limit"], aliases = ["save_total_limit"])]
    pub keep_checkpoints: usize,
    /// Train on the first N examples of each task only.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Print a log line every N steps (the progress bar only shows on a terminal).
    #[arg(long, default_value_t = 10, visible_aliases = ["logging-steps"], aliases = ["logging_steps"])]
    pub log_every: u64,
}

impl LoopArgs {
    /// The run's length in steps: `--max-steps`, else `--epochs` over `steps_per_epoch`.
    pub fn total_steps(&self, steps_per_epoch: f64) -> u64 {
        self.max_steps.unwrap_or((self.epochs * steps_per_epoch).ceil() as u64).max(1)
    }

    /// The run's length in optimizer steps when an epoch is `batches_per_epoch` micro-batches
    /// taken `--grad-accum` at a time (SFT, the reward model).
    pub fn optimizer_steps(&self, batches_per_epoch: usize) -> u64 {
        self.total_steps(batches_per_epoch as f64 / self.grad_accum as f64)
    }

    /// Whether `step` evaluates on the dev split.
    pub fn eval_due(&self, step: u64, total: u64) -> bool {
        (self.eval_every > 0 && step.is_multiple_of(self.eval_every)) || step == total
    }

    /// Whether `step` writes a checkpoint.
    pub fn save_due(&self, step: u64, total: u64) -> bool {
        step.is_multiple_of(self.save_every.max(1)) || step == total
    }

    /// Whether `step` prints a log line.
    pub fn log_due(&self, step: u64, total: u64) -> bool {
        step.is_multiple_of(self.log_every.max(1)) || step == total
    }

    /// The in-training dev evaluation: constrained answers, zero-shot prompt, as served.
    pub fn dev_eval_args(&self, run: &RunArgs, task: &str) -> EvalArgs {
        EvalArgs {
            model: run.model.clone(),
            select: TaskSelection { tasks: vec![task.to_string()], ..run.select.clone() },
            split: self.eval_split.clone(),
            shots: 0,
            mode: EvalMode::Constrained,
            answer_scoring: AnswerScoring::Full,
            adapter: None,
            batch_size: 16,
            limit: self.eval_limit,
            seed: self.seed,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 16,
            resamples: 200,
            skip_bad_rows: false,
            no_skip_bad_rows: false,
            out: None,
            predictions: false,
            no_predictions: false,
            show_prompts: 0,
        }
    }
}

/// The adapter a run trains: `init` (an earlier run's adapter, whose manifest must fit this
/// model and these tasks) as trainable variables, else a fresh one of `lora`'s shape.
pub fn initial_adapter(
    init: Option<&Path>,
    lora: &LoraArgs,
    run: &RunArgs,
    loaded: &LoadedModel,
    tasks: &[Task],
    seed: u64,
    cache: &Path,
) -> anyhow::Result<LoraAdapter> {
    let cfg = loaded.model.config();
    Ok(match init {
        Some(dir) => {
            crate::eval::check_adapter(dir, &run.model, tasks, cache)?;
            eprintln!("starting from adapter {}", dir.display());
            LoraAdapter::load_peft_dir(dir, cfg, DType::F32, loaded.model.device())?.trainable()?
        }
        None => LoraAdapter::init(lora.config(), cfg, seed, DType::F32, loaded.model.device())?,
    })
}

/// The training progress bar: position, rate and ETA (hidden when stderr is not a terminal).
pub fn progress_bar(what: &str, total: u64, at: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!("{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} {{per_sec}} ETA {{eta}}"))
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_position(at);
    bar
}
