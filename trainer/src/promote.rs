//! `verdict-train promote` and `rollback`: change which adapter version serves a task.
//!
//! `promote` evaluates a candidate adapter and the incumbent (the registry's `CURRENT`, or the
//! base model zero-shot when there is none) on the same examples with the evaluator of `eval`,
//! and publishes the candidate as a new version and makes it current only when it scores at
//! least the incumbent's score plus `--margin` (or with `--force`). `rollback` goes back along
//! the registry's history. Each decision is appended to the task's audit log. With `--server`
//! the switch goes through the server's admin API (the server checks the version against its
//! own model first and swaps synchronously); otherwise the registry is written here and
//! servers pick up `CURRENT` with their registry watch.

use crate::data::{self, TaskSelection};
use crate::eval::{self, EvalArgs, EvalMode, TaskReport};
use crate::model_args::ModelArgs;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use clap::Args;
use models::{LoadedModel, LoraAdapter};
use shared::adapter::MANIFEST_FILE;
use shared::audit::{rfc3339_utc, AuditAction, AuditRecord};
use shared::registry::{Registry, RegistryError};
use shared::task::{AnswerScoring, Task};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Scores this close count as equal: scores are means of ratios, and `0.5 + 0.005` need not
/// be exactly the float `0.505`.
const SCORE_TOLERANCE: f64 = 1e-9;

/// Where the registry is, and optionally a server to make the change through.
#[derive(Args, Clone)]
pub struct RegistryArgs {
    /// The adapter registry directory (as `verdict-serve --adapters`).
    #[arg(long, env = "VERDICT_ADAPTERS", default_value = "./adapters")]
    pub adapters: PathBuf,
    /// A running verdict-serve on this registry (`http://host:port`): switch through its admin
    /// API (checked against the server's model, swapped when the call returns). Without it the
    /// registry is written here and the server's registry watch picks up CURRENT.
    #[arg(long, requires = "admin_token")]
    pub server: Option<String>,
    /// The server's `--admin-token`.
    #[arg(long, env = "VERDICT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Args, Clone)]
pub struct PromoteArgs {
    /// The adapter to promote: PEFT files + verdict_manifest.json (e.g. a run's `best/`).
    #[arg(long)]
    pub candidate: PathBuf,
    #[command(flatten)]
    pub rules: Promotion,
}

/// Everything `promote` and `import-adapter` share: the model, the task, the evaluation both
/// sides get, the registry and the promotion rule.
#[derive(Args, Clone)]
pub struct Promotion {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The task (registry name).
    #[arg(long)]
    pub task: String,
    /// Extra task definitions (TOML; repeatable or comma-separated, as in `verdict-serve`);
    /// see docs/tasks.md.
    #[arg(long = "task-file", env = "VERDICT_TASK_FILES", value_delimiter = ',')]
    pub task_files: Vec<PathBuf>,
    /// The task's data directory (default for the real datasets: `<cache>/data/<task>`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Name of the new version (default: the next `vN`).
    #[arg(long)]
    pub version: Option<String>,
    /// The candidate must score at least the incumbent's score plus this (absolute, on the
    /// task's score: the mean of its metrics).
    #[arg(long, default_value_t = 0.005, allow_negative_numbers = true)]
    pub margin: f64,
    /// Promote even when the candidate does not beat the incumbent by the margin (both are
    /// still evaluated and the override is logged).
    #[arg(long)]
    pub force: bool,
    /// The split both are evaluated on.
    #[arg(long, default_value = "dev", value_parser = data::split_name)]
    pub split: String,
    /// Evaluate on the first N examples of the split only.
    #[arg(long)]
    pub eval_limit: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Compare whole answers or label words alone, as the server scores them
    /// (`verdict-serve --answer-scoring`).
    #[arg(long, default_value_t = AnswerScoring::Full)]
    pub answer_scoring: AnswerScoring,
}

#[derive(Args, Clone)]
pub struct RollbackArgs {
    /// The task (registry name).
    #[arg(long)]
    pub task: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// What `promote` does with a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It beats the incumbent by the margin.
    Promote,
    /// It does not, but `--force` was given.
    Forced,
    /// It does not: nothing changes.
    Refuse,
}

/// The promotion rule: the candidate must score at least `incumbent + margin`; an incumbent
/// that was not evaluated (`None`) or a NaN score is never beaten. `force` overrides a failure.
pub fn decide(candidate: f64, incumbent: Option<f64>, margin: f64, force: bool) -> Decision {
    let beats = incumbent.is_some_and(|i| candidate >= i + margin - SCORE_TOLERANCE);
    match (beats, force) {
        (true, _) => Decision::Promote,
        (false, true) => Decision::Forced,
        (false, false) => Decision::Refuse,
    }
}

/// This process's command line for the audit log, with the admin token replaced by `***`.
pub(crate) fn command_line(args: impl IntoIterator<Item = String>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut secret_next = false;
    for a in args {
        if secret_next {
            out.push("***".into());
            secret_next = false;
        } else if a == "--admin-token" {
            secret_next = true;
            out.push(a);
        } else if a.starts_with("--admin-token=") {
            out.push("--admin-token=***".into());
        } else {
            out.push(a);
        }
    }
    out.join(" ")
}

/// A copy of the candidate in a temporary directory, removed on drop: what is evaluated is
/// exactly what is published, even if a training run rewrites the candidate meanwhile.
pub(crate) struct Staged(pub(crate) PathBuf);

impl Staged {
    /// An empty temporary directory `verdict-<tag>-...`.
    pub(crate) fn new(tag: &str) -> Result<Self> {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let dir = std::env::temp_dir().join(format!("verdict-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn copy_of(candidate: &Path) -> Result<Self> {
        let staged = Self::new("promote")?;
        copy_adapter(candidate, &staged.0)?;
        Ok(staged)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies an adapter directory's files (not its sub-directories or hidden leftovers);
/// `Registry::publish` flushes them to disk before the version appears.
fn copy_adapter(from: &Path, to: &Path) -> Result<()> {
    let entries = std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if !entry.file_type()?.is_file() || name.to_string_lossy().starts_with('.') {
            continue;
        }
        let dest = to.join(&name);
        std::fs::copy(entry.path(), &dest).with_context(|| format!("copying {}", entry.path().display()))?;
    }
    Ok(())
}

impl Promotion {
    /// The evaluation both sides get: `eval`'s constrained, zero-shot evaluation, as served.
    fn eval_args(&self) -> EvalArgs {
        EvalArgs {
            model: self.model.clone(),
            select: TaskSelection {
                tasks: vec![self.task.clone()],
                task_files: self.task_files.clone(),
                data: self.data.clone(),
            },
            split: self.split.clone(),
            shots: 0,
            mode: EvalMode::Constrained,
            answer_scoring: self.answer_scoring,
            adapter: None,
            batch_size: self.batch_size,
            limit: self.eval_limit,
            seed: 1,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 16,
            resamples: 1000,
            skip_bad_rows: false,
            no_skip_bad_rows: false,
            out: None,
            predictions: false,
            no_predictions: false,
            show_prompts: 0,
        }
    }
}

/// Evaluates the base model with the adapter in `dir` (none: zero-shot) and prints the score.
fn evaluate(
    loaded: &LoadedModel,
    dir: Option<&Path>,
    task: &Task,
    args: &EvalArgs,
    who: &str,
    cache: &Path,
) -> Result<TaskReport> {
    let adapter = match dir {
        Some(d) => Some(
            LoraAdapter::load_peft_dir(d, loaded.model.config(), DType::F32, loaded.model.device())
                .with_context(|| format!("loading adapter {who}"))?,
        ),
        None => None,
    };
    let r = eval::eval_task(loaded, adapter.as_ref(), task, args, cache)?;
    let (lo, hi) = r.score.score_ci;
    eprintln!("{who}: score {:.4} (95% CI [{lo:.4}, {hi:.4}]) on {} {} examples", r.score.score, r.examples, r.split);
    Ok(r)
}

/// `verdict-train promote`.
pub fn promote(args: &PromoteArgs, cache: &Path) -> Result<()> {
    publish_candidate(&args.candidate, &args.candidate, &args.rules, cache, None)
}

/// The task `args` name, from the built-in registry and `--task-file`s.
pub(crate) fn task_of(args: &Promotion) -> Result<Task> {
    let mut tasks = shared::task::TaskRegistry::builtin();
    for f in &args.task_files {
        tasks.load_file(f)?;
    }
    Ok(tasks.get(&args.task)?.clone())
}

/// Evaluates the adapter in `candidate` against the incumbent and, under the promotion rule,
/// publishes it as the task's new version (both ways, `promote` and `import-adapter`, publish
/// through here). `shown` is what the audit log names as the candidate; `loaded`, the model if
/// the caller has it already.
pub(crate) fn publish_candidate(
    candidate: &Path,
    shown: &Path,
    args: &Promotion,
    cache: &Path,
    loaded: Option<&LoadedModel>,
) -> Result<()> {
    if !args.margin.is_finite() {
        return Err(crate::Failure::Usage(format!("--margin must be a number, not {}", args.margin)).into());
    }
    let registry = Registry::new(&args.registry.adapters);
    let task = task_of(args)?;
    // Names and an existing version fail before any evaluation.
    let version = match &args.version {
        Some(v) => v.clone(),
        None => registry.next_version(&task.name)?,
    };
    if registry.version_dir(&task.name, &version)?.exists() {
        return Err(RegistryError::VersionExists { task: task.name.clone(), version }.into());
    }
    if !candidate.join(MANIFEST_FILE).is_file() {
        bail!(
            "{} has no {MANIFEST_FILE}: the server serves only adapters whose manifest ties them to the base \
             weights and template (train with verdict-train, or import a PEFT adapter with import-adapter)",
            candidate.display()
        );
    }
    let staged = Staged::copy_of(candidate)?;
    let sha = args.model.weights_sha256(cache)?;
    eval::check_manifest(&staged.0, &sha, std::slice::from_ref(&task))?;

    let incumbent = registry.current(&task.name)?;
    let incumbent_dir = match &incumbent {
        Some(v) => Some(registry.version_dir(&task.name, v)?),
        None => None,
    };
    // A serving version that no longer fits this model cannot be compared; --force replaces it.
    let mut comparable = true;
    if let Some(d) = &incumbent_dir {
        if let Err(e) = eval::check_manifest(d, &sha, std::slice::from_ref(&task)) {
            if !args.force {
                return Err(e.context(format!(
                    "the serving version {}/{} cannot be compared with the candidate on this model \
                     (--force replaces it without comparison)",
                    task.name,
                    incumbent.as_deref().unwrap_or_default()
                )));
            }
            eprintln!("warning: {e:#}; not comparing (--force)");
            comparable = false;
        }
    }

    let owned;
    let loaded = match loaded {
        Some(l) => l,
        None => {
            owned = args.model.load(cache)?;
            &owned
        }
    };
    let eval_args = args.eval_args();
    let candidate_report =
        evaluate(loaded, Some(&staged.0), &task, &eval_args, &format!("candidate {}", shown.display()), cache)?;
    let incumbent_name = match &incumbent {
        Some(v) => format!("incumbent {}/{v}", task.name),
        None => "incumbent zero-shot (no version serving)".to_string(),
    };
    let incumbent_score = if comparable {
        Some(evaluate(loaded, incumbent_dir.as_deref(), &task, &eval_args, &incumbent_name, cache)?.score.score)
    } else {
        None
    };
    let candidate_score = candidate_report.score.score;
    let decision = decide(candidate_score, incumbent_score, args.margin, args.force);

    let mut record = AuditRecord {
        time: String::new(),
        action: AuditAction::Refuse,
        task: task.name.clone(),
        from_version: incumbent.clone(),
        to_version: None,
        candidate: Some(std::fs::canonicalize(shown).unwrap_or_else(|_| shown.to_path_buf()).display().to_string()),
        split: Some(args.split.clone()),
        examples: Some(candidate_report.examples),
        metrics: task.metrics.iter().map(|m| m.name().to_string()).collect(),
        candidate_score: Some(candidate_score),
        incumbent_score,
        margin: Some(args.margin),
        forced: decision == Decision::Forced,
        base_sha256: sha,
        command: command_line(std::env::args()),
    };
    let comparison = format!(
        "candidate {candidate_score:.4} vs {} + margin {}",
        incumbent_score.map_or("(not evaluated)".to_string(), |s| format!("{s:.4}")),
        args.margin
    );
    if decision == Decision::Refuse {
        record.time = rfc3339_utc(SystemTime::now());
        registry.append_audit(&task.name, &record)?;
        println!("{}", serde_json::to_string(&record)?);
        return Err(crate::Failure::Refused(format!(
            "refused: {comparison}: the candidate does not beat {incumbent_name}; the registry is unchanged \
             (--force promotes anyway)"
        ))
        .into());
    }
    // Another promotion since we read CURRENT would make this comparison stale.
    if registry.current(&task.name)? != incumbent {
        bail!("{}/CURRENT changed during the evaluation: run promote again", task.name);
    }
    registry.publish::<anyhow::Error>(&task.name, &version, |tmp| copy_adapter(&staged.0, tmp))?;
    let serving = match (&args.registry.server, &args.registry.admin_token) {
        (Some(server), Some(token)) => {
            let path = format!("/v1/admin/adapters/{}/{version}/promote", task.name);
            admin_post(server, token, &path).with_context(|| {
                format!("published {}/{version}, but {server} did not promote it: CURRENT is unchanged", task.name)
            })?
        }
        _ => {
            registry.promote(&task.name, &version)?;
            version.clone()
        }
    };
    if serving != version {
        bail!("published {}/{version}, but the server reports {serving} serving", task.name);
    }
    record.action = AuditAction::Promote;
    record.to_version = Some(version.clone());
    record.time = rfc3339_utc(SystemTime::now());
    registry.append_audit(&task.name, &record)?;
    println!("{}", serde_json::to_string(&record)?);
    let how = if decision == Decision::Forced { "forced" } else { "beats the incumbent" };
    eprintln!("promoted {}/{version} ({comparison}: {how})", task.name);
    Ok(())
}

/// `verdict-train rollback`.
pub fn rollback(args: &RollbackArgs) -> Result<()> {
    let registry = Registry::new(&args.registry.adapters);
    let task = &args.task;
    let from = registry.current(task)?;
    let (previous, _) = registry.previous(task)?;
    // The fingerprint of the weights the restored version was made for; read first, so a
    // version no server would load is refused before anything changes.
    let base_sha256 = shared::adapter::Manifest::read(&registry.version_dir(task, &previous)?)
        .map(|m| m.base_sha256)
        .map_err(|e| anyhow!("cannot roll {task} back to {previous}: {e}"))?;
    let serving = match (&args.registry.server, &args.registry.admin_token) {
        (Some(server), Some(token)) => admin_post(server, token, &format!("/v1/admin/adapters/{task}/rollback"))
            .with_context(|| format!("{server} did not roll {task} back: CURRENT is unchanged"))?,
        _ => registry.rollback(task)?,
    };
    if serving != previous {
        bail!("rolled {task} back to {serving}, expected {previous}: did another promotion run meanwhile?");
    }
    let record = AuditRecord {
        time: rfc3339_utc(SystemTime::now()),
        action: AuditAction::Rollback,
        task: task.clone(),
        from_version: from.clone(),
        to_version: Some(serving.clone()),
        candidate: None,
        split: None,
        examples: None,
        metrics: Vec::new(),
        candidate_score: None,
        incumbent_score: None,
        margin: None,
        forced: false,
        base_sha256,
        command: command_line(std::env::args()),
    };
    registry.append_audit(task, &record)?;
    println!("{}", serde_json::to_string(&record)?);
    eprintln!("rolled {task} back from {} to {serving}", from.as_deref().unwrap_or("(none)"));
    Ok(())
}

/// POSTs to a verdict-serve admin endpoint (routes: serve/src/http.rs) and returns the version
/// serving the task afterwards ([`shared::http`]; the server speaks plain HTTP, no TLS).
fn admin_post(server: &str, token: &str, path: &str) -> Result<String> {
    if !server.starts_with("http://") {
        bail!("--server {server}: give an http:// URL (verdict-serve speaks plain HTTP)");
    }
    let url = format!("{}{path}", server.trim_end_matches('/'));
    let auth = format!("Bearer {token}");
    // Loading and checking an adapter can take a while on a big model.
    let answer = shared::http::request("POST", &url, b"", &[("authorization", &auth)], Duration::from_secs(300))
        .with_context(|| format!("calling {server}"))?;
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
    if answer.status != 200 {
        bail!(
            "POST {path}: {} {}: {}",
            answer.status,
            body["error"]["code"].as_str().unwrap_or("?"),
            body["error"]["message"].as_str().unwrap_or("no error message")
        );
    }
    body["current"].as_str().map(str::to_string).ok_or_else(|| anyhow!("POST {path}: no current version in {body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_candidate_must_beat_the_incumbent_by_the_margin() {
        assert_eq!(decide(0.90, Some(0.80), 0.005, false), Decision::Promote);
        // Exactly the margin is enough, however the floats round.
        assert_eq!(decide(0.505, Some(0.5), 0.005, false), Decision::Promote);
        assert_eq!(decide(0.7, Some(0.6), 0.1, false), Decision::Promote);
        assert_eq!(decide(0.504, Some(0.5), 0.005, false), Decision::Refuse);
        assert_eq!(decide(0.80, Some(0.80), 0.005, false), Decision::Refuse, "a tie is not an improvement");
        assert_eq!(decide(0.80, Some(0.80), 0.0, false), Decision::Promote);
        assert_eq!(decide(0.79, Some(0.80), -0.02, false), Decision::Promote, "a negative margin tolerates a loss");
        assert_eq!(decide(0.70, Some(0.80), 0.005, true), Decision::Forced);
        assert_eq!(decide(0.90, Some(0.80), 0.005, true), Decision::Promote, "--force changes nothing that passes");
        assert_eq!(decide(0.90, None, 0.005, false), Decision::Refuse, "an incumbent not evaluated is not beaten");
        assert_eq!(decide(0.90, None, 0.005, true), Decision::Forced);
        assert_eq!(decide(f64::NAN, Some(0.5), 0.005, false), Decision::Refuse);
        assert_eq!(decide(0.9, Some(f64::NAN), 0.005, false), Decision::Refuse);
    }

    #[test]
    fn the_logged_command_line_hides_the_admin_token() {
        let args = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            command_line(args("verdict-train promote --task mr --admin-token s3cret --server http://h:1")),
            "verdict-train promote --task mr --admin-token *** --server http://h:1"
        );
        assert_eq!(
            command_line(args("verdict-train rollback --admin-token=s3cret --task mr")),
            "verdict-train rollback --admin-token=*** --task mr"
        );
    }
}
