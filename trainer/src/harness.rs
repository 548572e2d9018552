//! The one training loop of `sft`, `ppo` / `grpo` and `reward-model`.
//!
//! A command brings an [`Objective`]: what one step computes (its batch, its loss, its logged
//! figures) and how a snapshot of the adapter scores on the dev split. The [`Harness`] owns
//! everything else, once: resuming from the newest checkpoint (variables, optimizer state,
//! where the run stood), the learning-rate schedule, gradient accumulation and clipping
//! ([`Updates`]), optimizer steps, the metrics log, the progress bar and log lines, dev
//! evaluation and the best adapter, atomic checkpoints, the curves picture (redrawn at every
//! checkpoint and at the end) and the final adapter.
//!
//! ```text
//! for step in (resumed step + 1)..=total:
//!     lr = schedule(step)
//!     report = objective.step(step, lr, updates)     # micro-batches, clip, optimizer step(s)
//!     log {step, ..report.figures, lr, step_seconds}; progress
//!     every --eval-every: objective.dev_eval(snapshot) -> log, best/
//!     every --save-every: checkpoint, curves
//! adapter/, curves
//! ```

use crate::optim::{clip_grad_norm_of, learning_rate, Optimizer, OptimizerConfig};
use crate::run_dir::{self, MetricsLog, Recorder, RunState};
use crate::train_config::{progress_bar, LoopArgs, RunArgs};
use anyhow::Result;
use candle_core::{Tensor, Var};
use indicatif::ProgressBar;
use models::{LoraAdapter, ScalarHead};
use serde_json::{Map, Value};
use shared::task::Task;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Gradients by variable name.
pub type Grads = BTreeMap<String, Tensor>;

/// What one step logs.
pub struct Report {
    /// The metrics entry's figures (the harness adds `step`, `lr` and `step_seconds`).
    pub figures: Map<String, Value>,
    /// The progress bar's message (`loss 0.4321`).
    pub message: String,
    /// The log line between `step N/M` and the step time (`loss 0.4321 grad-norm 0.812`).
    pub line: String,
}

/// A dev evaluation of a snapshot of the adapter.
pub struct DevScore {
    /// The figure the best adapter is selected on (higher is better).
    pub score: f64,
    /// One report per task (recorded in the metrics entry and the best adapter's manifest).
    pub reports: Vec<Value>,
    /// More figures for the metrics entry.
    pub figures: Map<String, Value>,
}

/// What a training command brings to the loop.
pub trait Objective {
    /// Runs step `step` (1-based) at learning rate `lr`: its forward and backward passes and
    /// its optimizer step(s) through `updates`.
    fn step(&mut self, step: u64, lr: f64, updates: &mut Updates) -> Result<Report>;

    /// Scores `snapshot` (the adapter as it stands) on the dev split.
    fn dev_eval(&mut self, snapshot: &LoraAdapter, bar: &ProgressBar) -> Result<DevScore>;

    /// The head saved beside the adapter: PPO's value head, the reward model's score head.
    fn head(&self) -> Option<&ScalarHead> {
        None
    }

    /// Writes what the objective carries from step to step into the run state (checkpointed).
    fn save_state(&self, _state: &mut RunState) {}
}

/// The optimizer and the variables it trains, as an objective's step uses them.
pub struct Updates<'h> {
    opt: &'h mut Optimizer,
    vars: &'h [(String, Var)],
    max_grad_norm: f64,
}

impl Updates<'_> {
    /// The gradients of the mean of `n` micro-batch losses: `loss(i)` for `i` in `0..n`, each
    /// differentiated as `loss(i) / n`, summed per variable (gradient accumulation: one
    /// micro-batch's graph in memory at a time).
    pub fn accumulate(&self, n: usize, mut loss: impl FnMut(usize) -> Result<Tensor>) -> Result<Grads> {
        let mut grads = Grads::new();
        for i in 0..n {
            let g = (loss(i)? / n as f64)?.backward()?;
            for (name, var) in self.vars {
                if let Some(gv) = g.get(var.as_tensor()) {
                    let sum = match grads.remove(name) {
                        Some(prev) => (prev + gv)?,
                        None => gv.clone(),
                    };
                    grads.insert(name.clone(), sum);
                }
            }
        }
        Ok(grads)
    }

    /// Clips the gradients `select` picks, as one group, to `--max-grad-norm`; their norm
    /// before clipping.
    pub fn clip(&self, grads: &mut Grads, select: impl Fn(&str) -> bool) -> Result<f64> {
        clip_grad_norm_of(grads, self.max_grad_norm, select)
    }

    /// One optimizer step with `grads` at learning rate `lr`.
    pub fn apply(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.opt.step(self.vars, grads, lr)
    }

    /// [`accumulate`](Self::accumulate) `n` micro-batches, clip every gradient as one group,
    /// [`apply`](Self::apply): the global gradient norm before clipping.
    pub fn step(&mut self, n: usize, lr: f64, loss: impl FnMut(usize) -> Result<Tensor>) -> Result<f64> {
        let mut grads = self.accumulate(n, loss)?;
        let norm = self.clip(&mut grads, |_| true)?;
        self.apply(&grads, lr)?;
        Ok(norm)
    }
}

/// What the harness needs to know of a run besides its objective.
pub struct Spec<'a> {
    pub run: &'a RunArgs,
    pub train: &'a LoopArgs,
    /// `sft`, `ppo`, `grpo` or `reward-model`: the progress bar's and the manifests' name.
    pub method: &'a str,
    /// The task recorded in the manifests (a mix of tasks records its first).
    pub task: &'a Task,
    pub total_steps: u64,
    /// The peak learning rate when `--lr` is not given.
    pub default_lr: f64,
    /// The curves picture: its title and `(panel title, metrics key)` per panel.
    pub curves_title: &'a str,
    pub curves: &'a [(&'a str, &'a str)],
}

/// One run of the loop.
pub struct Harness<'a> {
    spec: Spec<'a>,
    vars: Vec<(String, Var)>,
    opt: Optimizer,
    state: RunState,
    log: MetricsLog,
    rec: Recorder<'a>,
}

impl<'a> Harness<'a> {
    /// Opens the run in `spec.run.out`: a fresh optimizer over the adapter's (and `head`'s)
    /// variables, or, with `checkpoint` (what [`run_dir::prepare`] found), the variables,
    /// optimizer state and run state restored from it.
    pub fn open(
        spec: Spec<'a>,
        checkpoint: Option<&Path>,
        adapter: &LoraAdapter,
        head: Option<&ScalarHead>,
        cache: &Path,
    ) -> Result<Self> {
        let t = spec.train;
        let mut vars = adapter.vars().to_vec();
        vars.extend(head.iter().flat_map(|h| h.vars()));
        let mut opt =
            Optimizer::new(OptimizerConfig { kind: t.optimizer, weight_decay: t.weight_decay, ..Default::default() });
        let mut state = RunState::default();
        if let Some(dir) = checkpoint {
            state = run_dir::load_checkpoint(dir, adapter, head, &mut opt)?;
            eprintln!("resumed from {} (step {})", dir.display(), state.step);
        }
        let out = &spec.run.out;
        let log = MetricsLog::open(out, checkpoint.map(|_| state.step))?;
        let rec = Recorder::new(out, &spec.run.model, spec.method, spec.task, t.keep_checkpoints, cache)?;
        Ok(Self { spec, vars, opt, state, log, rec })
    }

    /// Where the run stands (after [`open`](Self::open): the resumed step, the KL coefficient).
    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// Runs the remaining steps of `objective` on `adapter`, then writes the final adapter.
    pub fn train(mut self, objective: &mut impl Objective, adapter: &LoraAdapter) -> Result<()> {
        let t = self.spec.train;
        let total = self.spec.total_steps;
        let peak_lr = t.lr.unwrap_or(self.spec.default_lr);
        let bar = progress_bar(self.spec.method, total, self.state.step);
        let start = Instant::now();
        while self.state.step < total {
            let step = self.state.step + 1;
            let step_start = Instant::now();
            let lr = learning_rate(t.schedule, peak_lr, step, t.warmup_steps, total);
            let mut updates = Updates { opt: &mut self.opt, vars: &self.vars, max_grad_norm: t.max_grad_norm };
            let report = objective.step(step, lr, &mut updates)?;
            self.state.step = step;
            objective.save_state(&mut self.state);
            let secs = step_start.elapsed().as_secs_f64();
            let mut entry = Map::new();
            entry.insert("step".into(), step.into());
            entry.extend(report.figures);
            entry.insert("lr".into(), lr.into());
            entry.insert("step_seconds".into(), secs.into());
            self.log.append(&Value::Object(entry))?;
            bar.set_message(report.message);
            bar.set_position(step);
            if t.log_due(step, total) {
                bar.suspend(|| eprintln!("step {step}/{total} {} lr {lr:.2e} {secs:.2}s/step", report.line));
            }
            if t.eval_due(step, total) {
                let snapshot = adapter.snapshot()?;
                let dev = objective.dev_eval(&snapshot, &bar)?;
                let mut entry = Map::new();
                entry.insert("step".into(), step.into());
                entry.insert("dev_score".into(), dev.score.into());
                entry.insert("dev".into(), Value::Array(dev.reports.clone()));
                entry.extend(dev.figures);
                self.log.append(&Value::Object(entry))?;
                self.rec.dev_result(&mut self.state, dev.score, &dev.reports, &snapshot, objective.head())?;
            }
            if t.save_due(step, total) {
                self.rec.checkpoint(adapter, objective.head(), &self.opt, &self.state)?;
                // The picture follows the checkpoints: current while the run goes on, and after a kill.
                self.draw_curves()?;
            }
        }
        bar.finish_and_clear();
        self.rec.finish(adapter, objective.head(), &self.state, start.elapsed().as_secs_f64())?;
        self.draw_curves()
    }

    fn draw_curves(&self) -> Result<()> {
        let mut series = Vec::with_capacity(self.spec.curves.len());
        for &(title, key) in self.spec.curves {
            series.push((title, self.log.series(key)?));
        }
        run_dir::write_curves_svg(&self.spec.run.out.join("curves.svg"), self.spec.curves_title, &series)
    }
}

/// A JSON object from `(key, value)` pairs: a [`Report`]'s or [`DevScore`]'s figures.
pub fn figures<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Accumulating `n` micro-batches gives the gradient of their mean loss, by hand:
    /// losses `w * x_i` (x = 1, 2, 3) -> d mean / dw = 2; clipping to 0.5 scales it to 0.5.
    #[test]
    fn accumulation_is_the_gradient_of_the_mean_and_clipping_scales_it() {
        let w = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut opt = Optimizer::new(OptimizerConfig::default());
        let updates = Updates { opt: &mut opt, vars: &vars, max_grad_norm: 0.5 };
        let xs = [1.0f64, 2.0, 3.0];
        let mut grads = updates.accumulate(3, |i| Ok((w.as_tensor() * xs[i])?.sum_all()?)).unwrap();
        let g = grads["w"].to_vec1::<f32>().unwrap()[0];
        assert!((g - 2.0).abs() < 1e-6, "{g}");
        let norm = updates.clip(&mut grads, |_| true).unwrap();
        assert!((norm - 2.0).abs() < 1e-6, "{norm}");
        let clipped = grads["w"].to_vec1::<f32>().unwrap()[0];
        assert!((clipped - 0.5).abs() < 1e-5, "{clipped}");
        // A group that selects nothing is left alone and has norm 0.
        let mut again = updates.accumulate(1, |_| Ok(w.as_tensor().sum_all()?)).unwrap();
        assert_eq!(updates.clip(&mut again, |k| k != "w").unwrap(), 0.0);
        assert_eq!(again["w"].to_vec1::<f32>().unwrap()[0], 1.0);
    }
}
