//! `verdict-train ppo`: reinforcement learning of a LoRA adapter, each generated token an
//! action, rewarded by agreement with the gold label (the method of arXiv 2410.11020).
//!
//! One step, top to bottom:
//! 1. take the next batch of prompts (one task, so one shared prompt prefix);
//! 2. sample responses from the policy (free text, or restricted to the label answers);
//! 3. score them with the rule reward; compute, without gradients, the policy's log-probs and
//!    values and the reference log-probs (the same base with the adapter switched off);
//! 4. PPO: per-token rewards (score on the last token, `-kl_coef * KL` on each), GAE, whitened
//!    advantages; GRPO: group-normalised scores as every token's advantage, KL in the loss;
//! 5. `ppo_epochs` passes of shuffled mini-batches: clipped policy loss (+ clipped value loss,
//!    or + the KL term), gradient accumulation, clipping, optimizer step;
//! 6. update the KL controller; [`crate::harness`] logs, evaluates on dev every N steps and
//!    checkpoints atomically.
//!
//! Sampling, shuffling and dropout depend only on the seed and the step, and checkpoints hold
//! the adapter, the value head, the optimizer state and the KL coefficient: `--resume`
//! continues exactly.

pub mod math;
pub mod reward;
pub mod rollout;

use crate::harness::{figures, DevScore, Harness, Objective, Report, Spec, Updates};
use crate::reward_model::LearnedReward;
use crate::run_dir::{self, RunState};
use crate::seeds;
use crate::train_config::{initial_adapter, LoopArgs, LoraArgs, RunArgs};
use crate::train_data::{self, BatchPlan, TaskData};
use anyhow::Result;
use candle_core::{DType, Tensor};
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use math::KlController;
use models::generate::{generate, Sampling};
use models::head::HeadKind;
use models::{LoadedModel, LoraAdapter, Mode, ScalarHead};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use reward::{Outcome, RuleReward};
use rollout::{score_responses, split_rows, Responses};
use shared::metrics::average as mean;
use shared::task::Label;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The defaults that differ between the algorithms: PPO's are the method's (arXiv 2410.11020);
/// GRPO's are TRL 1.16.0's `GRPOConfig` (`learning_rate`, `num_generations`, `beta`,
/// `num_iterations`, a fixed `beta`), so a TRL user's expectations carry over.
struct AlgorithmDefaults {
    lr: f64,
    group_size: usize,
    kl_coef: f64,
    ppo_epochs: usize,
    kl_controller: KlKind,
}

impl Algorithm {
    fn defaults(self) -> AlgorithmDefaults {
        match self {
            Algorithm::Ppo => AlgorithmDefaults {
                lr: 2e-5,
                group_size: 1,
                kl_coef: 0.2,
                ppo_epochs: 4,
                kl_controller: KlKind::Adaptive,
            },
            Algorithm::Grpo => {
                AlgorithmDefaults { lr: 1e-6, group_size: 8, kl_coef: 0.0, ppo_epochs: 1, kl_controller: KlKind::Fixed }
            }
        }
    }
}

/// How advantages are estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Algorithm {
    /// Value head, per-token KL in the reward, GAE (the method's).
    Ppo,
    /// Critic-free: several samples per prompt, advantages normalised within each group, KL
    /// to the reference as a loss term.
    Grpo,
}

/// What the policy may generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActionSpace {
    /// Any token, until the closing tag or end of text (the method's).
    Free,
    /// Only the label answers (label word plus closing tag): two or three tokens per rollout.
    Labels,
}

/// What the policy is rewarded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RewardKind {
    /// The method's rule reward (+1 / -1 / -3).
    Rule,
    /// A reward model's normalised score (`--reward-model`).
    Learned,
    /// `min(learned, --learned-reward-cap)` plus the rule reward (RLLR's mixed form).
    Mixed,
}

/// Which KL controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KlKind {
    Fixed,
    Adaptive,
}

#[derive(Args, Clone)]
pub struct PpoArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Start from this adapter (an SFT run's `best/`; a PPO adapter's value head comes along).
    /// Default: a fresh adapter, i.e. the base model.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub train: LoopArgs,
    #[command(flatten)]
    pub reward: RuleReward,
    /// The reward optimised: rule, learned or mixed.
    #[arg(long = "reward", value_enum, default_value_t = RewardKind::Rule)]
    pub reward_kind: RewardKind,
    /// The reward model for `--reward learned|mixed` (a `verdict-train reward-model` run's `best/`).
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// Cap on the learned reward in the mixed form (RLLR: 3.9).
    #[arg(long, default_value_t = 3.9)]
    pub learned_reward_cap: f64,
    #[arg(long, value_enum, default_value_t = Algorithm::Ppo)]
    pub algorithm: Algorithm,
    /// Prompts per rollout step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// GRPO: samples per prompt [default: 8, TRL's `num_generations`].
    #[arg(long, visible_aliases = ["num-generations"], aliases = ["num_generations"])]
    pub group_size: Option<usize>,
    /// Responses per optimizer step (split into `--grad-accum` micro-batches). The method:
    /// batch 16, mini-batch 8 with gradient accumulation 2, i.e. `--mini-batch-size 16
    /// --grad-accum 2`.
    #[arg(long, default_value_t = 8)]
    pub mini_batch_size: usize,
    /// Passes over each rollout batch [default: ppo 4, grpo 1 (TRL's `num_iterations`)].
    #[arg(long, visible_aliases = ["num-iterations"], aliases = ["num_iterations"])]
    pub ppo_epochs: Option<usize>,
    #[arg(long, value_enum, default_value_t = ActionSpace::Labels)]
    pub action_space: ActionSpace,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// 0: no top-k filter (the method's).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    #[arg(long, default_value_t = 16, visible_aliases = ["max-completion-length"], aliases = ["max_completion_length"])]
    pub max_new_tokens: usize,
    /// Initial KL coefficient (GRPO: the KL loss weight, TRL's `beta`) [default: ppo 0.2,
    /// grpo 0].
    #[arg(long, visible_aliases = ["beta", "init-kl-coef"], aliases = ["init_kl_coef"])]
    pub kl_coef: Option<f64>,
    /// [default: ppo adaptive, grpo fixed]
    #[arg(long, value_enum)]
    pub kl_controller: Option<KlKind>,
    /// Adaptive controller: the target summed KL per response.
    #[arg(long, default_value_t = 6.0)]
    pub kl_target: f64,
    /// Adaptive controller: horizon in responses.
    #[arg(long, default_value_t = 10000.0)]
    pub kl_horizon: f64,
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f64,
    #[arg(long, default_value_t = 0.95)]
    pub lam: f64,
    /// Policy ratio clip (TRL's `cliprange`, GRPO's `epsilon`).
    #[arg(long, visible_aliases = ["epsilon"], default_value_t = 0.2)]
    pub cliprange: f64,
    /// Value clip around the rollout's values.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange_value: f64,
    /// Value loss coefficient.
    #[arg(long, default_value_t = 0.1)]
    pub vf_coef: f64,
    /// Do not whiten advantages over each rollout batch (whitening is the default;
    /// `--whiten-advantages` undoes an earlier `--no-whiten-advantages`).
    #[arg(long = "no-whiten-advantages", action = clap::ArgAction::SetFalse, overrides_with = "whiten_on")]
    pub whiten_advantages: bool,
    #[arg(long = "whiten-advantages", overrides_with = "whiten_advantages", hide = true)]
    #[allow(dead_code)] // the `--x` half of `--x / --no-x`
    whiten_on: bool,
}

impl PpoArgs {
    /// Samples per prompt: `--group-size`, else the algorithm's default.
    pub fn group_size(&self) -> usize {
        self.group_size.unwrap_or(self.algorithm.defaults().group_size)
    }

    /// Passes over each rollout batch.
    pub fn ppo_epochs(&self) -> usize {
        self.ppo_epochs.unwrap_or(self.algorithm.defaults().ppo_epochs)
    }

    /// The initial KL coefficient.
    pub fn kl_coef(&self) -> f64 {
        self.kl_coef.unwrap_or(self.algorithm.defaults().kl_coef)
    }

    /// The KL controller.
    pub fn kl_controller(&self) -> KlKind {
        self.kl_controller.unwrap_or(self.algorithm.defaults().kl_controller)
    }
}

/// One rollout batch with everything the PPO epochs need, per response row.
struct Rollout {
    bodies: Vec<Vec<u32>>,
    responses: Vec<Vec<u32>>,
    /// Per row: the summed per-token KL `logp - ref_logp` (the controller's input).
    kl: Vec<f64>,
    /// Per row, per token.
    old_logp: Vec<Vec<f64>>,
    ref_logp: Vec<Vec<f64>>,
    old_values: Vec<Vec<f64>>,
    advantages: Vec<Vec<f64>>,
    returns: Vec<Vec<f64>>,
}

/// Statistics of one step, averaged over its mini-batches.
#[derive(Default)]
struct LossStats {
    policy_loss: f64,
    value_loss: f64,
    clipfrac: f64,
    value_clipfrac: f64,
    approx_kl: f64,
    entropy: f64,
    /// The adapter's gradient norm before clipping (summed over updates).
    grad_norm: f64,
    /// The value head's, clipped on its own.
    value_grad_norm: f64,
    updates: usize,
}

/// The policy being trained, with everything a rollout step needs.
struct Ppo<'a> {
    args: &'a PpoArgs,
    loaded: &'a LoadedModel,
    adapter: &'a LoraAdapter,
    /// PPO's value head (GRPO has none).
    head: Option<ScalarHead>,
    /// The value head's variable names: its gradients are clipped apart from the adapter's.
    head_vars: std::collections::BTreeSet<String>,
    data: &'a [TaskData],
    learned: Option<LearnedReward>,
    /// Per task: every label's answer tokens.
    answers: Vec<Vec<Vec<u32>>>,
    close_tag: Vec<Vec<u32>>,
    plan: BatchPlan,
    kl_ctl: KlController,
    cache: &'a Path,
}

/// A rollout step's responses and what they scored.
struct Sampled {
    task: usize,
    bodies: Vec<Vec<u32>>,
    responses: Vec<Vec<u32>>,
    /// The reward optimised, per response.
    scores: Vec<f64>,
    rule_scores: Vec<f64>,
    learned_scores: Option<Vec<f64>>,
    outcomes: Vec<Outcome>,
    seconds: f64,
}

impl Ppo<'_> {
    /// What the policy may answer for task `ti`: its labels' answers, or anything (empty).
    fn restrict(&self, ti: usize) -> &[Vec<u32>] {
        match self.args.action_space {
            ActionSpace::Labels => &self.answers[ti],
            ActionSpace::Free => &[],
        }
    }

    /// 1-3. The step's prompts, the policy's sampled responses and their rewards.
    fn sample(&mut self, step: u64, policy: &LoraAdapter) -> Result<Sampled> {
        let (args, loaded) = (self.args, self.loaded);
        let started = Instant::now();
        let (ti, rows) = self.plan.batch(self.data, step - 1);
        let d = &self.data[ti];
        let group = if self.head.is_some() { 1 } else { args.group_size() };
        let restrict = self.restrict(ti);
        let prefix_kv = train_data::prefix_cache(&loaded.model, Some(policy), &d.prefix)?;
        let bodies: Vec<Vec<u32>> =
            rows.iter().flat_map(|&i| std::iter::repeat_n(d.examples[i].body.clone(), group)).collect();
        let golds: Vec<Label> = rows.iter().flat_map(|&i| std::iter::repeat_n(d.examples[i].label, group)).collect();
        let longest_answer = self.answers[ti].iter().map(Vec::len).max().unwrap_or(1);
        let sampling = Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_new_tokens: args.min_new_tokens,
            max_new_tokens: if restrict.is_empty() { args.max_new_tokens } else { longest_answer },
            // Restricted rollouts end with a whole answer; the tag's stem must not cut them short.
            stop_sequences: if restrict.is_empty() { self.close_tag.clone() } else { Vec::new() },
            restrict_to: restrict.to_vec(),
        };
        let seed = seeds::rollout(args.train.seed, step);
        let responses =
            generate(&loaded.model, Some(policy), Some(&prefix_kv), &bodies, &sampling, &loaded.special.stop, seed)?;
        let seconds = started.elapsed().as_secs_f64();
        let mut rule_scores = Vec::with_capacity(responses.len());
        let mut outcomes = Vec::with_capacity(responses.len());
        for (resp, gold) in responses.iter().zip(&golds) {
            let (r, o) = match self.answers[ti].iter().position(|a| a == resp) {
                // A label's answer tokens (always, in the restricted action space).
                Some(class) => args.reward.reward_answer(&d.task, Some(d.task.label_of_class(class)), *gold),
                None => {
                    let shown: Vec<u32> = resp.iter().copied().filter(|t| !loaded.special.stop.contains(t)).collect();
                    args.reward.reward(&d.task, &loaded.decode(&shown)?, *gold)
                }
            };
            rule_scores.push(r);
            outcomes.push(o);
        }
        let learned_scores = match &self.learned {
            Some(rm) => {
                let b: Vec<&[u32]> = bodies.iter().map(Vec::as_slice).collect();
                let r: Vec<&[u32]> = responses.iter().map(Vec::as_slice).collect();
                Some(rm.rewards(loaded, &d.prefix, &b, &r)?)
            }
            None => None,
        };
        let scores: Vec<f64> = match (&learned_scores, args.reward_kind) {
            (Some(l), RewardKind::Learned) => l.clone(),
            (Some(l), RewardKind::Mixed) => {
                l.iter().zip(&rule_scores).map(|(l, r)| l.min(args.learned_reward_cap) + r).collect()
            }
            _ => rule_scores.clone(),
        };
        Ok(Sampled { task: ti, bodies, responses, scores, rule_scores, learned_scores, outcomes, seconds })
    }

    /// 5. `ppo_epochs` passes of shuffled mini-batches over the rollout, each an optimizer step.
    fn optimise(&self, step: u64, lr: f64, ti: usize, rollout: &Rollout, updates: &mut Updates) -> Result<LossStats> {
        let (args, t) = (self.args, &self.args.train);
        let is_head = |name: &str| self.head_vars.contains(name);
        let mut stats = LossStats::default();
        for epoch in 0..args.ppo_epochs() {
            let mut order: Vec<usize> = (0..rollout.bodies.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seeds::ppo_shuffle(t.seed, step, epoch as u64)));
            for (mb_no, mb) in order.chunks(args.mini_batch_size).enumerate() {
                let micro_size = mb.len().div_ceil(t.grad_accum);
                let micros: Vec<&[usize]> = mb.chunks(micro_size).collect();
                let n_micro = micros.len();
                let mut grads = updates.accumulate(n_micro, |mi| {
                    let dropout_seed = seeds::ppo_dropout(t.seed, step, epoch as u64, mb_no as u64, mi as u64);
                    let (loss, s) = micro_loss(
                        args,
                        self.loaded,
                        self.adapter,
                        self.head.as_ref(),
                        &self.data[ti],
                        rollout,
                        micros[mi],
                        self.restrict(ti),
                        self.kl_ctl.coef(),
                        dropout_seed,
                    )?;
                    stats.add(&s, 1.0 / n_micro as f64);
                    Ok(loss)
                })?;
                // The adapter and the value head are clipped as two groups: the head's gradient
                // scales with the hidden states' norm and would otherwise throttle the policy.
                stats.grad_norm += updates.clip(&mut grads, |k| !is_head(k))?;
                stats.value_grad_norm += updates.clip(&mut grads, is_head)?;
                stats.updates += 1;
                updates.apply(&grads, lr)?;
            }
        }
        Ok(stats)
    }
}

impl Objective for Ppo<'_> {
    fn step(&mut self, step: u64, lr: f64, updates: &mut Updates) -> Result<Report> {
        // 1-4. Rollout, rewards, scores without gradients, advantages.
        let policy = self.adapter.snapshot()?;
        let s = self.sample(step, &policy)?;
        let rollout = build_rollout(
            self.args,
            self.loaded,
            &policy,
            self.head.as_ref(),
            &self.data[s.task],
            s.bodies,
            s.responses,
            &s.scores,
            self.restrict(s.task),
            &self.kl_ctl,
        )?;
        let mean_kl = mean(&rollout.kl);
        // 5. The PPO epochs.
        let stats = self.optimise(step, lr, s.task, &rollout, updates)?;
        let updates = stats.updates.max(1) as f64;
        // 6. The KL controller.
        let kl_coef_used = self.kl_ctl.coef();
        self.kl_ctl.update(mean_kl, rollout.bodies.len());
        let n = s.outcomes.len() as f64;
        let count = |f: &dyn Fn(&Outcome) -> bool| s.outcomes.iter().filter(|o| f(o)).count() as f64 / n;
        let new_tokens: usize = rollout.responses.iter().map(Vec::len).sum();
        let (reward, accuracy) = (mean(&s.scores), count(&|o| *o == Outcome::Correct));
        let (policy_loss, value_loss) = (stats.policy_loss / updates, stats.value_loss / updates);
        let (clipfrac, entropy) = (stats.clipfrac / updates, stats.entropy / updates);
        Ok(Report {
            figures: figures([
                ("reward", reward.into()),
                ("reward_rule", mean(&s.rule_scores).into()),
                ("reward_learned", s.learned_scores.as_deref().map(mean).into()),
                ("accuracy", accuracy.into()),
                ("unparseable", count(&|o| *o == Outcome::Unparseable).into()),
                ("kl", mean_kl.into()),
                ("kl_coef", kl_coef_used.into()),
                ("policy_loss", policy_loss.into()),
                ("value_loss", value_loss.into()),
                ("clipfrac", clipfrac.into()),
                ("value_clipfrac", (stats.value_clipfrac / updates).into()),
                ("approx_kl", (stats.approx_kl / updates).into()),
                ("entropy", entropy.into()),
                ("grad_norm", (stats.grad_norm / updates).into()),
                ("value_grad_norm", (stats.value_grad_norm / updates).into()),
                ("returns", mean(&rollout.returns.concat()).into()),
                ("values", mean(&rollout.old_values.concat()).into()),
                ("response_tokens", (new_tokens as f64 / n).into()),
                ("rollout_seconds", s.seconds.into()),
                ("rollout_tokens_per_second", (new_tokens as f64 / s.seconds).into()),
            ]),
            message: format!("reward {reward:.3} kl {mean_kl:.3}"),
            line: format!(
                "reward {reward:.3} acc {accuracy:.3} kl {mean_kl:.3} coef {kl_coef_used:.4} pg {policy_loss:.4} \
                 vf {value_loss:.4} clip {clipfrac:.3} entropy {entropy:.3}"
            ),
        })
    }

    fn dev_eval(&mut self, snapshot: &LoraAdapter, bar: &ProgressBar) -> Result<DevScore> {
        let (score, reports) =
            run_dir::dev_eval(self.loaded, snapshot, self.data, &self.args.run, &self.args.train, bar, self.cache)?;
        Ok(DevScore { score, reports, figures: Default::default() })
    }

    fn head(&self) -> Option<&ScalarHead> {
        self.head.as_ref()
    }

    fn save_state(&self, state: &mut RunState) {
        state.kl_coef = Some(self.kl_ctl.coef());
    }
}

pub fn run(args: &PpoArgs, cache: &Path) -> Result<()> {
    let t = &args.train;
    if args.batch_size == 0 || args.mini_batch_size == 0 || t.grad_accum == 0 || args.ppo_epochs() == 0 {
        return Err(crate::Failure::Usage(
            "--batch-size, --mini-batch-size, --grad-accum and --ppo-epochs must be at least 1".into(),
        )
        .into());
    }
    if args.algorithm == Algorithm::Grpo && args.group_size() < 2 {
        return Err(crate::Failure::Usage(
            "GRPO needs --group-size of at least 2 (advantages compare samples of one prompt)".into(),
        )
        .into());
    }
    if args.reward_kind != RewardKind::Rule && args.reward_model.is_none() {
        return Err(crate::Failure::Usage("--reward learned|mixed needs --reward-model DIR".into()).into());
    }
    let ckpt = run_dir::prepare(&args.run)?;
    let loaded = args.run.model.load_for_training(cache)?;
    let data = train_data::load(&loaded, &args.run.select, t.train_limit, cache)?;
    let tasks: Vec<_> = data.iter().map(|d| d.task.clone()).collect();
    let learned = match (&args.reward_model, args.reward_kind) {
        (Some(dir), RewardKind::Learned | RewardKind::Mixed) => {
            Some(LearnedReward::load(dir, &loaded, &args.run.model, &tasks, cache)?)
        }
        _ => None,
    };
    let adapter = initial_adapter(args.init_adapter.as_deref(), &args.lora, &args.run, &loaded, &tasks, t.seed, cache)?;
    // PPO's critic: a PPO adapter's value head comes along; otherwise it starts fresh, at zero.
    let hidden = loaded.model.config().hidden_size;
    let head = match args.init_adapter.as_deref().filter(|d| d.join(HeadKind::Value.file()).is_file()) {
        _ if args.algorithm == Algorithm::Grpo => None,
        Some(dir) => Some(ScalarHead::load(HeadKind::Value, hidden, dir, loaded.model.device())?),
        None => Some(ScalarHead::zeros(HeadKind::Value, hidden, loaded.model.device())?),
    };
    let method = match args.algorithm {
        Algorithm::Ppo => "ppo",
        Algorithm::Grpo => "grpo",
    };
    let title = method.to_uppercase();
    let spec = Spec {
        run: &args.run,
        train: t,
        method,
        task: &data[0].task,
        total_steps: t.total_steps(train_data::batches_per_epoch(&data, args.batch_size) as f64),
        default_lr: args.algorithm.defaults().lr,
        curves_title: &title,
        curves: &[
            ("reward optimised (mean per response)", "reward"),
            ("rule reward", "reward_rule"),
            ("learned reward (normalised)", "reward_learned"),
            ("dev score", "dev_score"),
            ("KL to the reference (summed per response)", "kl"),
            ("KL coefficient", "kl_coef"),
            ("policy loss", "policy_loss"),
            ("value loss", "value_loss"),
            ("clip fraction", "clipfrac"),
            ("entropy", "entropy"),
        ],
    };
    let harness = Harness::open(spec, ckpt.as_deref(), &adapter, head.as_ref(), cache)?;
    // The KL coefficient as the run left it (the adaptive controller's state), else the initial one.
    let coef = harness.state().kl_coef.unwrap_or(args.kl_coef());
    let kl_ctl = match args.kl_controller() {
        KlKind::Fixed => KlController::Fixed { coef },
        KlKind::Adaptive => KlController::Adaptive { coef, target: args.kl_target, horizon: args.kl_horizon },
    };
    let head_vars = head.iter().flat_map(|h| h.vars()).map(|(name, _)| name).collect();
    let mut ppo = Ppo {
        args,
        loaded: &loaded,
        adapter: &adapter,
        head,
        head_vars,
        data: &data,
        learned,
        answers: data.iter().map(|d| train_data::encode_answers(&loaded, &d.task)).collect::<Result<_>>()?,
        close_tag: train_data::close_tag_stops(&loaded)?,
        plan: BatchPlan::new(&data, args.batch_size, t.seed),
        kl_ctl,
        cache,
    };
    harness.train(&mut ppo, &adapter)
}

/// Scores the sampled responses without gradients and turns rewards into advantages.
#[allow(clippy::too_many_arguments)]
fn build_rollout(
    args: &PpoArgs,
    loaded: &LoadedModel,
    policy: &LoraAdapter,
    head: Option<&ScalarHead>,
    d: &TaskData,
    bodies: Vec<Vec<u32>>,
    responses: Vec<Vec<u32>>,
    scores: &[f64],
    restrict: &[Vec<u32>],
    kl_ctl: &KlController,
) -> Result<Rollout> {
    let pad = loaded.special.pad_id();
    let lens: Vec<usize> = responses.iter().map(Vec::len).collect();
    let r = Responses {
        prefix: &d.prefix,
        bodies: bodies.iter().map(Vec::as_slice).collect(),
        responses: responses.iter().map(Vec::as_slice).collect(),
        restrict_to: restrict,
    };
    let old = score_responses(&loaded.model, Some(policy), head, &r, Mode::Inference, pad)?;
    let reference = score_responses(&loaded.model, None, None, &r, Mode::Inference, pad)?;
    let to_rows = |t: &Tensor| -> Result<Vec<Vec<f64>>> {
        let flat: Vec<f64> = t.to_dtype(DType::F64)?.to_vec1()?;
        Ok(split_rows(&flat, &lens))
    };
    let old_logp = to_rows(&old.logp.detach())?;
    let ref_logp = to_rows(&reference.logp)?;
    let old_values = match &old.values {
        Some(v) => to_rows(&v.detach())?,
        None => lens.iter().map(|&l| vec![0.0; l]).collect(),
    };
    let mut kl = Vec::with_capacity(lens.len());
    for i in 0..lens.len() {
        kl.push(old_logp[i].iter().zip(&ref_logp[i]).map(|(a, b)| a - b).sum());
    }
    let (mut advantages, mut returns) = (Vec::with_capacity(lens.len()), Vec::with_capacity(lens.len()));
    match args.algorithm {
        Algorithm::Ppo => {
            for i in 0..lens.len() {
                let (rewards, _) = math::token_rewards(scores[i], &old_logp[i], &ref_logp[i], kl_ctl.coef());
                let (a, ret) = math::gae(&rewards, &old_values[i], args.gamma, args.lam);
                advantages.push(a);
                returns.push(ret);
            }
        }
        Algorithm::Grpo => {
            let adv = math::group_advantages(scores, args.group_size());
            for (i, &l) in lens.iter().enumerate() {
                advantages.push(vec![adv[i]; l]);
                returns.push(vec![scores[i]; l]);
            }
        }
    }
    if args.whiten_advantages && args.algorithm == Algorithm::Ppo {
        let mut flat = advantages.concat();
        math::whiten(&mut flat, true);
        advantages = split_rows(&flat, &lens);
    }
    Ok(Rollout { bodies, responses, kl, old_logp, ref_logp, old_values, advantages, returns })
}

/// The loss of one micro-batch (rows `micro` of the rollout), with gradients.
#[allow(clippy::too_many_arguments)]
fn micro_loss(
    args: &PpoArgs,
    loaded: &LoadedModel,
    adapter: &LoraAdapter,
    head: Option<&ScalarHead>,
    d: &TaskData,
    rollout: &Rollout,
    micro: &[usize],
    restrict: &[Vec<u32>],
    kl_coef: f64,
    dropout_seed: u64,
) -> Result<(Tensor, LossStats)> {
    let r = Responses {
        prefix: &d.prefix,
        bodies: micro.iter().map(|&i| rollout.bodies[i].as_slice()).collect(),
        responses: micro.iter().map(|&i| rollout.responses[i].as_slice()).collect(),
        restrict_to: restrict,
    };
    let mode = Mode::Train { dropout_seed: Some(dropout_seed) };
    let s = score_responses(&loaded.model, Some(adapter), head, &r, mode, loaded.special.pad_id())?;
    let dev = s.logp.device().clone();
    let gather = |rows: &Vec<Vec<f64>>| -> Result<Tensor> {
        let flat: Vec<f32> = micro.iter().flat_map(|&i| rows[i].iter().map(|&x| x as f32)).collect();
        let n = flat.len();
        Ok(Tensor::from_vec(flat, n, &dev)?)
    };
    let old_logp = gather(&rollout.old_logp)?;
    let (pg, clipfrac) = math::policy_loss(&s.logp, &old_logp, &gather(&rollout.advantages)?, args.cliprange)?;
    let mut stats = LossStats {
        policy_loss: pg.to_scalar::<f32>()? as f64,
        clipfrac,
        approx_kl: ((&s.logp - &old_logp)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64) * 0.5,
        entropy: math::mean_entropy(&s.logp_all.detach())?,
        ..Default::default()
    };
    let loss = match (&s.values, args.algorithm) {
        (Some(v), Algorithm::Ppo) => {
            let (vf, vclip) =
                math::value_loss(v, &gather(&rollout.old_values)?, &gather(&rollout.returns)?, args.cliprange_value)?;
            stats.value_loss = vf.to_scalar::<f32>()? as f64;
            stats.value_clipfrac = vclip;
            (pg + (vf * args.vf_coef)?)?
        }
        _ => {
            let kl = math::grpo_kl(&s.logp, &gather(&rollout.ref_logp)?)?;
            (pg + (kl * kl_coef)?)?
        }
    };
    Ok((loss, stats))
}

impl LossStats {
    fn add(&mut self, s: &LossStats, w: f64) {
        self.policy_loss += s.policy_loss * w;
        self.value_loss += s.value_loss * w;
        self.clipfrac += s.clipfrac * w;
        self.value_clipfrac += s.value_clipfrac * w;
        self.approx_kl += s.approx_kl * w;
        self.entropy += s.entropy * w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parsed(args: &[&str]) -> PpoArgs {
        let all: Vec<&str> =
            ["verdict-train", "ppo", "--task", "mr", "--out", "o"].iter().chain(args).copied().collect();
        match crate::Cli::try_parse_from(all).unwrap().command {
            crate::Command::Ppo(a) => a,
            _ => unreachable!("a ppo command"),
        }
    }

    /// GRPO's defaults are TRL 1.16.0's `GRPOConfig` (learning_rate 1e-6, num_generations 8,
    /// beta 0.0, num_iterations 1, epsilon 0.2, temperature 1.0, top_p 1.0, top_k 0), PPO's the
    /// method's; TRL's names are accepted for the same settings.
    #[test]
    fn grpo_defaults_are_trl_s_and_trl_s_names_are_aliases() {
        let g = parsed(&["--algorithm", "grpo"]);
        assert_eq!((g.group_size(), g.kl_coef(), g.ppo_epochs(), g.kl_controller()), (8, 0.0, 1, KlKind::Fixed));
        assert_eq!(g.algorithm.defaults().lr, 1e-6);
        assert_eq!((g.cliprange, g.temperature, g.top_p, g.top_k), (0.2, 1.0, 1.0, 0));
        let p = parsed(&[]);
        assert_eq!((p.kl_coef(), p.ppo_epochs(), p.kl_controller()), (0.2, 4, KlKind::Adaptive));
        assert_eq!(p.algorithm.defaults().lr, 2e-5);
        let trl = parsed(&["--algorithm", "grpo", "--num-generations", "4", "--beta", "0.04", "--num-iterations", "2"]);
        assert_eq!((trl.group_size(), trl.kl_coef(), trl.ppo_epochs()), (4, 0.04, 2));
        assert_eq!(parsed(&["--epsilon", "0.3"]).cliprange, 0.3);
    }
}
