//! `verdict-train reward-model`: a reward model learned from label-sensitive pairs (RLLR).
//!
//! A pair is one training input with two responses in the answer-tag format: the gold label's
//! answer (chosen) and a wrong label's (rejected), optionally each followed by a short analysis
//! that the current policy writes for that label. The reward model is the base model plus a
//! LoRA adapter plus a scalar score head read at the last token; it trains on
//! `-log sigmoid(r_chosen - r_rejected)`. The loop, checkpoints, resume, log and curves are
//! [`crate::harness`]'s, as for SFT and PPO. At each evaluation the scores' mean and standard
//! deviation over the dev pairs are stored with the head, so PPO can use the normalised reward.

use crate::eval;
use crate::harness::{figures, DevScore, Harness, Objective, Report, Spec, Updates};
use crate::model_args::ModelArgs;
use crate::run_dir;
use crate::seeds;
use crate::train_config::{initial_adapter, LoopArgs, LoraArgs, RunArgs};
use crate::train_data::{self, BatchPlan, TaskData};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use indicatif::ProgressBar;
use models::generate::{generate, Sampling};
use models::head::HeadKind;
use models::{Decoder, LoadedModel, LogitsAt, LoraAdapter, Mode, ScalarHead};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shared::task::{Label, Task};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The reward model's default peak learning rate.
const DEFAULT_LR: f64 = 2e-4;

#[derive(Args, Clone)]
pub struct RewardModelArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Start the reward model's adapter from this one (an SFT run's `best/`, as RLLR starts from
    /// the SFT model). Default: a fresh adapter.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub train: LoopArgs,
    /// Pairs per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Follow each answer with an analysis of up to this many tokens, written greedily by the
    /// policy for that answer's label (0: answers only).
    #[arg(long, default_value_t = 0)]
    pub rationale_tokens: usize,
    /// The policy that writes the analyses (default: the base model).
    #[arg(long)]
    pub policy_adapter: Option<PathBuf>,
}

/// `-log sigmoid(r_chosen - r_rejected)`, mean over pairs.
pub fn pairwise_loss(chosen: &Tensor, rejected: &Tensor) -> candle_core::Result<Tensor> {
    // -log sigmoid(d) = log(1 + exp(-d)); beyond d = -30 it is -d to f32 precision, and the
    // exponent is capped so the branch not taken stays finite (its gradient is 0, not NaN).
    // Smooth everywhere: no |d| or relu kink whose subgradient at 0 would be wrong.
    let d = (chosen - rejected)?;
    let soft = (d.maximum(-30.0)?.neg()?.exp()? + 1.0)?.log()?;
    let far = d.lt(-30.0)?;
    far.where_cond(&d.neg()?, &soft)?.mean_all()
}

/// One scalar per row: the head at the last token of `prefix + body + response`.
#[allow(clippy::too_many_arguments)]
pub fn score_sequences(
    model: &Decoder,
    adapter: &LoraAdapter,
    head: &ScalarHead,
    prefix: &[u32],
    bodies: &[&[u32]],
    responses: &[&[u32]],
    mode: Mode,
    pad: u32,
) -> Result<Tensor> {
    let b = bodies.len();
    let seqs: Vec<Vec<u32>> =
        bodies.iter().zip(responses).map(|(x, r)| x.iter().chain(r.iter()).copied().collect()).collect();
    let (out, t) = train_data::forward_after_prefix(model, Some(adapter), prefix, &seqs, pad, mode, LogitsAt::None)?;
    let hidden = out.hidden.reshape((b * t, out.hidden.dim(2)?))?;
    let last: Vec<u32> = seqs.iter().enumerate().map(|(r, s)| (r * t + s.len() - 1) as u32).collect();
    let idx = Tensor::from_vec(last, b, hidden.device())?;
    Ok(head.forward(&hidden.index_select(&idx, 0)?)?)
}

/// A trained reward model, for PPO's learned reward.
pub struct LearnedReward {
    adapter: LoraAdapter,
    head: ScalarHead,
}

impl LearnedReward {
    /// Loads `dir` (adapter + score head), refusing one for other base weights or tasks.
    pub fn load(dir: &Path, loaded: &LoadedModel, model: &ModelArgs, tasks: &[Task], cache: &Path) -> Result<Self> {
        eval::check_adapter(dir, model, tasks, cache)?;
        let cfg = loaded.model.config();
        let device = loaded.model.device();
        let adapter = LoraAdapter::load_peft_dir(dir, cfg, DType::F32, device)?;
        let head = ScalarHead::load(HeadKind::Score, cfg.hidden_size, dir, device)?;
        if head.norm.is_none() {
            bail!(
                "{}: the score head has no normalisation (not written by `verdict-train reward-model`)",
                dir.display()
            );
        }
        Ok(Self { adapter, head })
    }

    /// Normalised learned rewards of the responses.
    pub fn rewards(
        &self,
        loaded: &LoadedModel,
        prefix: &[u32],
        bodies: &[&[u32]],
        responses: &[&[u32]],
    ) -> Result<Vec<f64>> {
        let (mean, std) = self.head.norm.unwrap_or((0.0, 1.0));
        let r = score_sequences(
            &loaded.model,
            &self.adapter,
            &self.head,
            prefix,
            bodies,
            responses,
            Mode::Inference,
            loaded.special.pad_id(),
        )?;
        Ok(r.to_dtype(DType::F64)?.to_vec1::<f64>()?.into_iter().map(|x| (x - mean) / std).collect())
    }
}

/// Builds the responses of label-sensitive pairs: answer tokens per class, and (when asked)
/// the policy's analysis of each label for each example, written once and kept.
struct PairBuilder<'a> {
    loaded: &'a LoadedModel,
    policy: Option<LoraAdapter>,
    rationale_tokens: usize,
    /// Per task: every class's answer tokens.
    answers: Vec<Vec<Vec<u32>>>,
    /// `(task, example, class)` -> analysis tokens.
    rationales: BTreeMap<(usize, usize, usize), Vec<u32>>,
    open: Vec<u32>,
    close: Vec<u32>,
}

impl<'a> PairBuilder<'a> {
    fn new(loaded: &'a LoadedModel, data: &[TaskData], args: &RewardModelArgs) -> Result<Self> {
        let answers = data.iter().map(|d| train_data::encode_answers(loaded, &d.task)).collect::<Result<_>>()?;
        let policy = match &args.policy_adapter {
            Some(dir) => {
                Some(LoraAdapter::load_peft_dir(dir, loaded.model.config(), DType::F32, loaded.model.device())?)
            }
            None => None,
        };
        Ok(Self {
            loaded,
            policy,
            rationale_tokens: args.rationale_tokens,
            answers,
            rationales: BTreeMap::new(),
            open: loaded.encode(" <Analysis>", false)?,
            close: loaded.encode(" </Analysis>", false)?,
        })
    }

    /// A wrong class for `gold`, seeded (score tasks: a word at least 2 away from the gold).
    fn wrong_class(task: &Task, gold: Label, seed: u64) -> usize {
        let gold_class = Self::gold_class(task, gold);
        let candidates: Vec<usize> = (0..task.num_classes())
            .filter(|&c| match gold {
                Label::Class(_) => c != gold_class,
                Label::Score(v) => (label_value(task.label_of_class(c)) - v).abs() >= 2.0,
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        candidates[rng.random_range(0..candidates.len())]
    }

    /// The gold class of an example (score tasks: the nearest word).
    fn gold_class(task: &Task, gold: Label) -> usize {
        match gold {
            Label::Class(c) => c,
            Label::Score(v) => (0..task.num_classes())
                .min_by(|&a, &b| {
                    let dist = |c: usize| (label_value(task.label_of_class(c)) - v).abs();
                    dist(a).total_cmp(&dist(b))
                })
                .unwrap_or(0),
        }
    }

    /// `(chosen, rejected)` responses of examples `rows` of task `ti`.
    fn pairs(&mut self, data: &[TaskData], ti: usize, rows: &[usize], seed: u64) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let d = &data[ti];
        let classes: Vec<(usize, usize)> = rows
            .iter()
            .map(|&i| {
                let gold = d.examples[i].label;
                let wrong = Self::wrong_class(&d.task, gold, seed ^ ((ti as u64) << 40) ^ i as u64);
                (Self::gold_class(&d.task, gold), wrong)
            })
            .collect();
        if self.rationale_tokens > 0 {
            let need: Vec<(usize, usize)> = rows
                .iter()
                .zip(&classes)
                .flat_map(|(&i, &(c, w))| [(i, c), (i, w)])
                .filter(|&(i, c)| !self.rationales.contains_key(&(ti, i, c)))
                .collect();
            if !need.is_empty() {
                self.write_rationales(d, ti, &need)?;
            }
        }
        Ok(rows.iter().zip(&classes).map(|(&i, &(c, w))| (self.response(ti, i, c), self.response(ti, i, w))).collect())
    }

    fn response(&self, ti: usize, i: usize, class: usize) -> Vec<u32> {
        let mut r = self.answers[ti][class].clone();
        if let Some(a) = self.rationales.get(&(ti, i, class)) {
            r.extend(&self.open);
            r.extend(a);
            r.extend(&self.close);
        }
        r
    }

    /// Greedy analyses by the policy, after each label's answer and the opening analysis tag.
    fn write_rationales(&mut self, d: &TaskData, ti: usize, need: &[(usize, usize)]) -> Result<()> {
        let policy = self.policy.as_ref();
        let prefix = train_data::prefix_cache(&self.loaded.model, policy, &d.prefix)?;
        let prompts: Vec<Vec<u32>> = need
            .iter()
            .map(|&(i, c)| {
                let mut p = d.examples[i].body.clone();
                p.extend(&self.answers[ti][c]);
                p.extend(&self.open);
                p
            })
            .collect();
        let stop_seq = self.loaded.encode(" </Analysis", false)?;
        let settings = Sampling {
            max_new_tokens: self.rationale_tokens,
            stop_sequences: vec![stop_seq.clone()],
            ..Sampling::greedy()
        };
        let outs =
            generate(&self.loaded.model, policy, Some(&prefix), &prompts, &settings, &self.loaded.special.stop, 0)?;
        for (&(i, c), mut out) in need.iter().zip(outs) {
            out.retain(|t| !self.loaded.special.stop.contains(t));
            if out.ends_with(&stop_seq) {
                out.truncate(out.len() - stop_seq.len());
            }
            self.rationales.insert((ti, i, c), out);
        }
        Ok(())
    }
}

fn label_value(l: Label) -> f64 {
    match l {
        Label::Class(c) => c as f64,
        Label::Score(v) => v,
    }
}

/// Scores of chosen and rejected responses for `pairs` of task `d`, in `mode`.
#[allow(clippy::too_many_arguments)]
fn score_pairs(
    loaded: &LoadedModel,
    adapter: &LoraAdapter,
    head: &ScalarHead,
    d: &TaskData,
    rows: &[usize],
    pairs: &[(Vec<u32>, Vec<u32>)],
    mode: Mode,
) -> Result<(Tensor, Tensor)> {
    let n = rows.len();
    let bodies: Vec<&[u32]> = rows.iter().chain(rows).map(|&i| d.examples[i].body.as_slice()).collect();
    let responses: Vec<&[u32]> =
        pairs.iter().map(|p| p.0.as_slice()).chain(pairs.iter().map(|p| p.1.as_slice())).collect();
    let r =
        score_sequences(&loaded.model, adapter, head, &d.prefix, &bodies, &responses, mode, loaded.special.pad_id())?;
    Ok((r.narrow(0, 0, n)?, r.narrow(0, n, n)?))
}

/// Pairwise accuracy on each task's dev pairs (ties count as wrong), and the mean and standard
/// deviation of all dev scores (the normalisation PPO uses).
fn dev_eval(
    args: &RewardModelArgs,
    loaded: &LoadedModel,
    adapter: &LoraAdapter,
    head: &ScalarHead,
    dev: &[TaskData],
    builder: &mut PairBuilder,
) -> Result<(f64, Vec<serde_json::Value>, (f64, f64))> {
    let mut accs = Vec::new();
    let mut reports = Vec::new();
    let mut all = Vec::new();
    for (ti, d) in dev.iter().enumerate() {
        let (mut right, mut total) = (0usize, 0usize);
        let rows: Vec<usize> = (0..d.examples.len()).collect();
        for chunk in rows.chunks(16) {
            let pairs = builder.pairs(dev, ti, chunk, seeds::dev_pairs(args.train.seed))?;
            let (c, r) = score_pairs(loaded, adapter, head, d, chunk, &pairs, Mode::Inference)?;
            let (c, r): (Vec<f32>, Vec<f32>) = (c.to_vec1()?, r.to_vec1()?);
            right += c.iter().zip(&r).filter(|(a, b)| a > b).count();
            total += c.len();
            all.extend(c.iter().chain(&r).map(|&x| x as f64));
        }
        let acc = right as f64 / total.max(1) as f64;
        accs.push(acc);
        reports.push(serde_json::json!({"task": d.task.name, "pairwise_accuracy": acc, "pairs": total}));
    }
    let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
    let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (all.len().max(2) - 1) as f64;
    Ok((shared::metrics::average(&accs), reports, (mean, var.sqrt().max(1e-6))))
}

/// One step: `grad_accum` micro-batches of label-sensitive pairs, their mean pairwise loss.
struct RewardModel<'a> {
    args: &'a RewardModelArgs,
    loaded: &'a LoadedModel,
    adapter: &'a LoraAdapter,
    head: ScalarHead,
    data: &'a [TaskData],
    dev: &'a [TaskData],
    plan: BatchPlan,
    builder: PairBuilder<'a>,
    dev_builder: PairBuilder<'a>,
}

impl Objective for RewardModel<'_> {
    fn step(&mut self, step: u64, lr: f64, updates: &mut Updates) -> Result<Report> {
        let t = &self.args.train;
        let (mut loss_sum, mut right, mut seen, mut margin) = (0.0, 0usize, 0usize, 0.0);
        let grad_norm = updates.step(t.grad_accum, lr, |micro| {
            let pos = (step - 1) * t.grad_accum as u64 + micro as u64;
            let (ti, rows) = self.plan.batch(self.data, pos);
            let pairs = self.builder.pairs(self.data, ti, &rows, seeds::pairs(t.seed, pos))?;
            let mode = Mode::Train { dropout_seed: Some(seeds::dropout(t.seed, pos)) };
            let (c, r) = score_pairs(self.loaded, self.adapter, &self.head, &self.data[ti], &rows, &pairs, mode)?;
            let loss = pairwise_loss(&c, &r)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let (cv, rv): (Vec<f32>, Vec<f32>) = (c.to_vec1()?, r.to_vec1()?);
            right += cv.iter().zip(&rv).filter(|(a, b)| a > b).count();
            margin += cv.iter().zip(&rv).map(|(a, b)| (a - b) as f64).sum::<f64>();
            seen += cv.len();
            Ok(loss)
        })?;
        let loss = loss_sum / t.grad_accum as f64;
        let (acc, margin) = (right as f64 / seen as f64, margin / seen as f64);
        Ok(Report {
            figures: figures([
                ("loss", loss.into()),
                ("pairwise_accuracy", acc.into()),
                ("margin", margin.into()),
                ("grad_norm", grad_norm.into()),
            ]),
            message: format!("loss {loss:.4} acc {acc:.2}"),
            line: format!("loss {loss:.4} pairwise-acc {acc:.3} margin {margin:.3}"),
        })
    }

    /// Pairwise accuracy on the dev pairs; the scores' mean and deviation go with the head.
    fn dev_eval(&mut self, snapshot: &LoraAdapter, bar: &ProgressBar) -> Result<DevScore> {
        let (score, reports, norm) =
            bar.suspend(|| dev_eval(self.args, self.loaded, snapshot, &self.head, self.dev, &mut self.dev_builder))?;
        bar.suspend(|| eprintln!("dev pairwise accuracy {score:.4}"));
        self.head.norm = Some(norm);
        Ok(DevScore { score, reports, figures: figures([("score_mean", norm.0.into()), ("score_std", norm.1.into())]) })
    }

    fn head(&self) -> Option<&ScalarHead> {
        Some(&self.head)
    }
}

pub fn run(args: &RewardModelArgs, cache: &Path) -> Result<()> {
    let t = &args.train;
    if args.batch_size == 0 || t.grad_accum == 0 {
        return Err(crate::Failure::Usage("--batch-size and --grad-accum must be at least 1".into()).into());
    }
    let ckpt = run_dir::prepare(&args.run)?;
    let loaded = args.run.model.load_for_training(cache)?;
    let data = train_data::load(&loaded, &args.run.select, t.train_limit, cache)?;
    let dev = train_data::load_split(&loaded, &args.run.select, &t.eval_split, t.eval_limit, cache)?;
    if data.iter().any(|d| d.task.num_classes() < 2) {
        bail!("label-sensitive pairs need at least two labels");
    }
    let tasks: Vec<Task> = data.iter().map(|d| d.task.clone()).collect();
    let adapter = initial_adapter(args.init_adapter.as_deref(), &args.lora, &args.run, &loaded, &tasks, t.seed, cache)?;
    let head = ScalarHead::init(HeadKind::Score, loaded.model.config().hidden_size, t.seed, loaded.model.device())?;
    let spec = Spec {
        run: &args.run,
        train: t,
        method: "reward-model",
        task: &data[0].task,
        total_steps: t.optimizer_steps(train_data::batches_per_epoch(&data, args.batch_size)),
        default_lr: DEFAULT_LR,
        curves_title: "Reward model",
        curves: &[
            ("pairwise loss", "loss"),
            ("training pairwise accuracy", "pairwise_accuracy"),
            ("dev pairwise accuracy", "dev_score"),
            ("margin r_chosen - r_rejected", "margin"),
        ],
    };
    let harness = Harness::open(spec, ckpt.as_deref(), &adapter, Some(&head), cache)?;
    let mut objective = RewardModel {
        args,
        loaded: &loaded,
        adapter: &adapter,
        head,
        data: &data,
        dev: &dev,
        plan: BatchPlan::new(&data, args.batch_size, t.seed),
        builder: PairBuilder::new(&loaded, &data, args)?,
        dev_builder: PairBuilder::new(&loaded, &dev, args)?,
    };
    harness.train(&mut objective, &adapter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_score_is_the_head_at_the_last_real_token() {
        use models::random::{random_decoder, tiny_config};
        use models::{Arch, LoraConfig, Projection, TokenBatch, WeightMode};
        let cfg = tiny_config(Arch::Qwen2, 64);
        let model = random_decoder(&cfg, 5, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            use_rslora: false,
            dropout: 0.0,
            targets: vec![Projection::Q, Projection::V],
            layers: None,
        };
        let adapter = LoraAdapter::init_random(lora, &cfg, 3, DType::F32, &Device::Cpu).unwrap();
        let head = ScalarHead::init(HeadKind::Score, cfg.hidden_size, 4, &Device::Cpu).unwrap();
        let prefix = [1u32, 2, 3];
        let bodies: [&[u32]; 3] = [&[10, 11, 12], &[13], &[10, 11, 12]];
        let responses: [&[u32]; 3] = [&[20, 21], &[22, 23, 24, 25], &[30, 21]];
        let got = score_sequences(&model, &adapter, &head, &prefix, &bodies, &responses, Mode::Inference, 0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for i in 0..3 {
            let seq: Vec<u32> = prefix.iter().chain(bodies[i]).chain(responses[i]).copied().collect();
            let out = model
                .forward(&TokenBatch::single(&seq).unwrap(), None, Some(&adapter), Mode::Inference, LogitsAt::None)
                .unwrap();
            let last = out.hidden.squeeze(0).unwrap().narrow(0, seq.len() - 1, 1).unwrap();
            let want = head.forward(&last).unwrap().to_vec1::<f32>().unwrap()[0];
            assert!((got[i] - want).abs() < 1e-4, "row {i}: {got:?} vs {want}");
        }
        // Rows 0 and 2 differ only in the first response token: their scores must differ.
        assert!((got[0] - got[2]).abs() > 1e-3, "the score ignores the answer: {got:?}");
    }

    #[test]
    fn pairwise_loss_and_gradient_by_hand() {
        let dev = Device::Cpu;
        // d = [2, -1, 0]: loss = mean(log(1 + e^-2), log(1 + e^1), log 2).
        let c = Var::new(&[3.0f32, 0.0, 1.5], &dev).unwrap();
        let r = Var::new(&[1.0f32, 1.0, 1.5], &dev).unwrap();
        let loss = pairwise_loss(c.as_tensor(), r.as_tensor()).unwrap();
        let want = ((1.0 + (-2f64).exp()).ln() + (1.0 + 1f64.exp()).ln() + 2f64.ln()) / 3.0;
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
        // d/dr_c = -(1 - sigmoid(d)) / n = -sigmoid(-d) / n; d/dr_r the opposite.
        let g = loss.backward().unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want_c: Vec<f64> = [2.0, -1.0, 0.0].iter().map(|d: &f64| -sig(-d) / 3.0).collect();
        let gc = g.get(c.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let gr = g.get(r.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for i in 0..3 {
            assert!((gc[i] as f64 - want_c[i]).abs() < 1e-6, "{gc:?} vs {want_c:?}");
            assert!((gr[i] as f64 + want_c[i]).abs() < 1e-6, "{gr:?}");
        }
        // Large margins stay finite (the stable form).
        let big = pairwise_loss(&Tensor::new(&[-100.0f32], &dev).unwrap(), &Tensor::new(&[100.0f32], &dev).unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((big - 200.0).abs() < 1e-3, "{big}");
    }
}
