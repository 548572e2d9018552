//! A training run's directory: atomic checkpoints (adapter, optimizer state, position), the
//! JSONL metrics log and the curves picture.
//!
//! ```text
//! <out>/run.json                the command and every flag's resolved value (checked on --resume)
//! <out>/metrics.jsonl            one JSON object per logged step or evaluation
//! <out>/curves.svg               loss and dev metric, redrawn at every checkpoint and at the end
//! <out>/checkpoints/step-000050/ adapter_config.json, adapter_model.safetensors,
//!                                [value_head.safetensors,] optimizer.safetensors, state.json
//! <out>/best/                    the adapter with the best dev score (+ verdict_manifest.json)
//! <out>/adapter/                 the final adapter (+ verdict_manifest.json)
//! ```

use crate::eval;
use crate::model_args::ModelArgs;
use crate::optim::Optimizer;
use crate::settings::{RunSettings, RESUME_MAY_CHANGE};
use crate::train_config::{LoopArgs, RunArgs};
use crate::train_data::TaskData;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use models::{LoadedModel, LoraAdapter, ScalarHead};
use serde::{Deserialize, Serialize};
use shared::adapter::{Manifest, MANIFEST_VERSION};
use shared::plot::{Panel, Series};
use shared::task::Task;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the run stands; with the seed this fixes the data order and dropout of what follows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Steps done (optimizer steps for SFT, rollout steps for PPO).
    pub step: u64,
    /// Best dev score so far and its step.
    pub best_score: Option<f64>,
    pub best_step: Option<u64>,
    /// PPO's current KL coefficient (the adaptive controller's state).
    #[serde(default)]
    pub kl_coef: Option<f64>,
}

const RUN_FILE: &str = "run.json";

/// Checks `run.out` against `--resume`: the checkpoint to continue from, if any. Refuses to
/// start over a run that is there without `--resume`, and to resume one with a changed setting
/// that exact resume needs (a usage error naming each); records the settings in `run.json`.
pub fn prepare(run: &RunArgs) -> Result<Option<PathBuf>> {
    let (out, resume) = (&run.out, run.resume);
    let latest = latest_checkpoint(out)?;
    if resume && latest.is_none() {
        eprintln!("no checkpoint in {}: starting from scratch", out.display());
    }
    if !resume && latest.is_some() {
        bail!("{} already holds a run: pass --resume to continue it, or another --out", out.display());
    }
    let path = out.join(RUN_FILE);
    if latest.is_some() && !run.settings.command.is_empty() {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let recorded: RunSettings =
                    serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
                let conflicts = run.settings.resume_conflicts(&recorded);
                if !conflicts.is_empty() {
                    return Err(crate::Failure::Usage(format!(
                        "{}\n(a resume may change only {})",
                        conflicts.join("\n"),
                        RESUME_MAY_CHANGE.map(|k| format!("--{k}")).join(", ")
                    ))
                    .into());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => eprintln!(
                "warning: {} has no {RUN_FILE} (an older run): its settings cannot be checked against these",
                out.display()
            ),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
        }
    }
    std::fs::create_dir_all(out)?;
    if !run.settings.command.is_empty() {
        let tmp = path.with_extension("json.partial");
        std::fs::write(&tmp, serde_json::to_string_pretty(&run.settings)? + "\n")?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(latest)
}

/// The end-of-run words about the best adapter: `best dev score 0.8700 at step 40 (<dir>)`.
fn best_line(state: &RunState, dir: &Path) -> String {
    match (state.best_score, state.best_step) {
        (Some(score), Some(step)) => format!("best dev score {score:.4} at step {step} ({})", dir.display()),
        (Some(score), None) => format!("best dev score {score:.4} ({})", dir.display()),
        _ => "no dev evaluation, so no best adapter".to_string(),
    }
}

/// Atomic directory write (see `shared::atomic`).
pub use shared::atomic::write_dir as write_dir_atomically;

fn checkpoint_dir(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:06}"))
}

/// Saves adapter, optimizer state and run state atomically; keeps the newest `keep`.
pub fn save_checkpoint(
    out: &Path,
    adapter: &LoraAdapter,
    head: Option<&ScalarHead>,
    opt: &Optimizer,
    state: &RunState,
    base: &str,
    keep: usize,
) -> Result<()> {
    let dir = checkpoint_dir(out, state.step);
    write_dir_atomically(&dir, |tmp| {
        adapter.write_peft_files(tmp, &shared::assets::base_model_name(base))?;
        if let Some(h) = head {
            h.save(tmp)?;
        }
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (var, st) in &opt.state {
            for (k, t) in st {
                tensors.insert(format!("{var}::{k}"), t.clone());
            }
        }
        if !tensors.is_empty() {
            candle_core::safetensors::save(&tensors, tmp.join("optimizer.safetensors"))?;
        }
        let meta = serde_json::json!({"run": state, "optimizer_step": opt.step, "optimizer": opt.config});
        std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(&meta)?)?;
        Ok::<(), anyhow::Error>(())
    })?;
    let mut all = list_checkpoints(out)?;
    while all.len() > keep.max(1) {
        std::fs::remove_dir_all(all.remove(0))?;
    }
    Ok(())
}

fn list_checkpoints(out: &Path) -> Result<Vec<PathBuf>> {
    let dir = out.join("checkpoints");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")) && p.join("state.json").is_file()
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The newest complete checkpoint, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(out)?.pop())
}

/// Restores adapter (and head) variables, optimizer state and run state from a checkpoint.
pub fn load_checkpoint(
    dir: &Path,
    adapter: &LoraAdapter,
    head: Option<&ScalarHead>,
    opt: &mut Optimizer,
) -> Result<RunState> {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)?;
    let state: RunState = serde_json::from_value(meta["run"].clone())?;
    opt.step = meta["optimizer_step"].as_u64().context("state.json: optimizer_step")?;
    let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)?;
    for (name, var) in adapter.vars() {
        let t = tensors.get(name).with_context(|| format!("{}: no tensor {name}", dir.display()))?;
        if t.dims() != var.as_tensor().dims() {
            bail!("{}: {name} has shape {:?}, the run expects {:?}", dir.display(), t.dims(), var.as_tensor().dims());
        }
        var.set(&t.to_dtype(var.as_tensor().dtype())?.to_device(var.device())?)?;
    }
    let device = adapter.vars().first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
    if let Some(head) = head {
        head.set_from(&ScalarHead::load(head.kind(), head.width(), dir, &device)?)?;
    }
    opt.state.clear();
    let opt_file = dir.join("optimizer.safetensors");
    if opt_file.is_file() {
        for (key, t) in candle_core::safetensors::load(&opt_file, &Device::Cpu)? {
            let (var, k) = key.rsplit_once("::").context("optimizer tensor name")?;
            opt.state.entry(var.to_string()).or_default().insert(k.to_string(), t.to_device(&device)?);
        }
    }
    Ok(state)
}

/// Appends one JSON object per line to `<out>/metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens the log; on resume drops entries past `keep_through_step` (they will be redone).
    pub fn open(out: &Path, keep_through_step: Option<u64>) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        if let (Some(step), true) = (keep_through_step, path.is_file()) {
            let kept: Vec<String> = std::fs::read_to_string(&path)?
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(str::to_string)
                .collect();
            let tmp = path.with_extension("jsonl.partial");
            std::fs::write(&tmp, kept.iter().map(|l| format!("{l}\n")).collect::<String>())?;
            std::fs::rename(&tmp, &path)?;
        } else if keep_through_step.is_none() && path.exists() {
            std::fs::remove_file(&path)?;
        }
        Ok(Self { path })
    }

    pub fn append(&self, entry: &serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        writeln!(f, "{entry}")?;
        Ok(())
    }

    /// `(step, value)` of every entry that has `key`.
    pub fn series(&self, key: &str) -> Result<Vec<(f64, f64)>> {
        Ok(self.entries()?.iter().filter_map(|e| Some((e["step"].as_f64()?, e[key].as_f64()?))).collect())
    }

    /// All entries logged so far.
    pub fn entries(&self) -> Result<Vec<serde_json::Value>> {
        if !self.path.is_file() {
            return Ok(Vec::new());
        }
        Ok(std::fs::read_to_string(&self.path)?.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }
}

/// Draws one panel per series (x = step) into an SVG file.
pub fn write_curves_svg(path: &Path, title: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Result<()> {
    let panels: Vec<Panel> = series
        .iter()
        .map(|(name, pts)| Panel {
            title: name.to_string(),
            x_label: "step".into(),
            series: vec![Series { name: name.to_string(), points: pts.clone() }],
        })
        .collect();
    Ok(shared::plot::write_svg(path, title, &panels)?)
}

/// Evaluates a snapshot on every task's dev split: the average score and per-task reports.
pub fn dev_eval(
    loaded: &LoadedModel,
    snapshot: &LoraAdapter,
    data: &[TaskData],
    run: &RunArgs,
    train: &LoopArgs,
    bar: &ProgressBar,
    cache: &Path,
) -> Result<(f64, Vec<serde_json::Value>)> {
    let mut scores = Vec::new();
    let mut reports = Vec::new();
    for d in data {
        let r = bar.suspend(|| {
            eval::eval_task(loaded, Some(snapshot), &d.task, &train.dev_eval_args(run, &d.task.name), cache)
        })?;
        scores.push(r.score.score);
        reports.push(serde_json::json!({"task": d.task.name, "score": r.score}));
    }
    let score = shared::metrics::average(&scores);
    bar.suspend(|| eprintln!("dev score {score:.4}"));
    Ok((score, reports))
}

/// Where a run's adapters go and what their manifests record: one per run, it selects the best
/// adapter on the dev score, writes checkpoints and the final adapter.
pub struct Recorder<'a> {
    out: &'a Path,
    model: &'a ModelArgs,
    /// `sft`, `ppo`, `grpo` or `reward-model`.
    method: &'a str,
    /// A mix of tasks records its first task in the manifest.
    task: &'a Task,
    keep_checkpoints: usize,
    base_sha: String,
    command: String,
}

impl<'a> Recorder<'a> {
    pub fn new(
        out: &'a Path,
        model: &'a ModelArgs,
        method: &'a str,
        task: &'a Task,
        keep_checkpoints: usize,
        cache: &Path,
    ) -> Result<Self> {
        Ok(Self {
            out,
            model,
            method,
            task,
            keep_checkpoints,
            base_sha: model.weights_sha256(cache)?,
            command: std::env::args().collect::<Vec<_>>().join(" "),
        })
    }

    /// Records a dev evaluation of `snapshot`: keeps it as `best/` when it beats the best so far.
    pub fn dev_result(
        &self,
        state: &mut RunState,
        score: f64,
        reports: &[serde_json::Value],
        snapshot: &LoraAdapter,
        head: Option<&ScalarHead>,
    ) -> Result<()> {
        if state.best_score.is_none_or(|b| score > b) {
            state.best_score = Some(score);
            state.best_step = Some(state.step);
            self.save(&self.out.join("best"), snapshot, head, state.step, reports)?;
        }
        Ok(())
    }

    /// Writes a checkpoint of the run (adapter, head, optimizer, state).
    pub fn checkpoint(
        &self,
        adapter: &LoraAdapter,
        head: Option<&ScalarHead>,
        opt: &Optimizer,
        state: &RunState,
    ) -> Result<()> {
        save_checkpoint(self.out, adapter, head, opt, state, &self.model.model, self.keep_checkpoints)
    }

    /// Writes the final adapter to `adapter/` and says where the best one is.
    pub fn finish(
        &self,
        adapter: &LoraAdapter,
        head: Option<&ScalarHead>,
        state: &RunState,
        seconds: f64,
    ) -> Result<()> {
        self.save(&self.out.join("adapter"), &adapter.snapshot()?, head, state.step, &[])?;
        eprintln!(
            "done: {} steps in {seconds:.1}s; {}; final adapter in {}",
            state.step,
            best_line(state, &self.out.join("best")),
            self.out.join("adapter").display()
        );
        Ok(())
    }

    /// An adapter directory: PEFT files, head if any, Verdict manifest; atomically.
    fn save(
        &self,
        dir: &Path,
        adapter: &LoraAdapter,
        head: Option<&ScalarHead>,
        step: u64,
        dev: &[serde_json::Value],
    ) -> Result<()> {
        write_dir_atomically(dir, |tmp| {
            adapter.write_peft_files(tmp, &shared::assets::base_model_name(&self.model.model))?;
            if let Some(h) = head {
                h.save(tmp)?;
            }
            let manifest = Manifest {
                manifest_version: MANIFEST_VERSION,
                base_sha256: self.base_sha.clone(),
                base_model: self.model.model.clone(),
                base_hub_id: shared::assets::hub_id_of(&self.model.model).map(str::to_string),
                task: self.task.name.clone(),
                template_version: self.task.template_version,
                template_hash: self.task.template_hash(),
                label_words: self.task.label_words(),
                method: self.method.into(),
                command: self.command.clone(),
                steps: step,
                dev_metrics: if dev.is_empty() { None } else { Some(serde_json::Value::Array(dev.to_vec())) },
            };
            manifest.write(tmp)?;
            Ok::<(), anyhow::Error>(())
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_best_adapter_is_reported_in_words_not_debug_forms() {
        let dir = std::path::Path::new("runs/x/best");
        let state = super::RunState { step: 40, best_score: Some(0.87), best_step: Some(40), kl_coef: None };
        assert_eq!(super::best_line(&state, dir), "best dev score 0.8700 at step 40 (runs/x/best)");
        let none = super::best_line(&super::RunState::default(), dir);
        assert!(!none.contains("None") && !none.contains("Some"), "{none}");
    }
}
