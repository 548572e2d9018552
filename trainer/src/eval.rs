//! `verdict-train eval`: zero-shot / k-shot evaluation of a model (optionally with an adapter)
//! on tasks from the registry, in constrained mode (probability of every label's answer) or in
//! the method's free-generation mode (decode, parse the answer tag, count unparseable answers).

use crate::data::{data_dir, pick_shots, read_split, split_name, Item, TaskSelection};
use crate::model_args::ModelArgs;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use models::generate::{generate, Sampling};
use models::scoring::{normalize, score_candidates};
use models::{KvCache, LoadedModel, LogitsAt, LoraAdapter, Mode, TokenBatch};
use serde::Serialize;
use shared::adapter::{Manifest, MANIFEST_FILE};
use shared::metrics::{score_task, Predictions, TaskScore};
use shared::task::{AnswerScoring, Grouping, Label, Task};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How answers are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    /// Exact probability of every label's answer; the prediction is the most likely label.
    Constrained,
    /// Decode freely and parse the text before the closing tag (the method's evaluation).
    Generate,
}

#[derive(Args, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub select: TaskSelection,
    /// The split to score: `dev` (the default; `validation` is the same), `test` (only when
    /// you mean to report it), `train`, or any `<split>` file of the data directory.
    #[arg(long, default_value = "dev", value_parser = split_name)]
    pub split: String,
    /// Demonstrations from the training split (0 = zero-shot).
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    #[arg(long, value_enum, default_value_t = EvalMode::Constrained)]
    pub mode: EvalMode,
    /// Constrained mode: compare the whole answers (`full`, label word and closing tag) or the
    /// label words alone (`word`: fewer tokens per input; what `verdict-serve
    /// --answer-scoring word` serves).
    #[arg(long, default_value_t = AnswerScoring::Full)]
    pub answer_scoring: AnswerScoring,
    /// A LoRA adapter directory (PEFT layout).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Evaluate only the first N examples of the split.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed for shot selection, sampling and bootstrap.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Generation mode: sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Generation mode: most new tokens per answer.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Bootstrap resamples for the 95% confidence intervals.
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Skip malformed data rows (counted and reported) instead of stopping at the first.
    #[arg(long, overrides_with = "no_skip_bad_rows")]
    pub skip_bad_rows: bool,
    #[arg(long, overrides_with = "skip_bad_rows", hide = true)]
    #[allow(dead_code)] // the `--no-x` half of `--x / --no-x`
    pub no_skip_bad_rows: bool,
    /// Write a JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Include every example's prediction in the JSON report.
    #[arg(long, overrides_with = "no_predictions")]
    pub predictions: bool,
    #[arg(long, overrides_with = "predictions", hide = true)]
    #[allow(dead_code)] // the `--no-x` half of `--x / --no-x`
    pub no_predictions: bool,
    /// Print the first N prompts as the model gets them (stderr): the cached prefix once, then
    /// each input's body, with their token counts and ids.
    #[arg(long, default_value_t = 0)]
    pub show_prompts: usize,
}

/// Per-example result in the report.
#[derive(Serialize)]
struct ExampleResult {
    id: String,
    gold: Label,
    /// `None` when a generated answer could not be parsed.
    predicted: Option<Label>,
    /// Constrained mode: probability of each label word.
    probs: Option<Vec<f64>>,
    /// Generation mode: the text after the opening tag.
    generated: Option<String>,
}

/// What one task's evaluation produced.
#[derive(Serialize)]
pub struct TaskReport {
    pub task: String,
    pub split: String,
    pub examples: usize,
    pub shots: usize,
    pub mode: EvalMode,
    /// Constrained mode: what was compared between labels.
    pub answer_scoring: AnswerScoring,
    pub score: TaskScore,
    /// Generation mode: answers without a parseable label.
    pub unparseable: usize,
    pub seconds: f64,
    pub examples_per_second: f64,
    pub skipped_rows: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    predictions: Vec<ExampleResult>,
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template("{msg:18} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// Evaluates one task.
pub fn eval_task(
    loaded: &LoadedModel,
    adapter: Option<&LoraAdapter>,
    task: &Task,
    args: &EvalArgs,
    cache: &Path,
) -> Result<TaskReport> {
    let dir = data_dir(task, args.select.data.as_deref(), cache)?;
    let (mut items, skipped_rows) = read_split(task, &dir, &args.split, args.skip_bad_rows)?;
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    if items.is_empty() {
        bail!("task {}: the {} split is empty", task.name, args.split);
    }
    let shots = pick_shots(task, &dir, args.shots, args.seed, args.skip_bad_rows)?;
    let shot_refs: Vec<(&BTreeMap<String, String>, Label)> = shots.iter().map(|s| (&s.raw.fields, s.label)).collect();
    let parts = items
        .iter()
        .map(|it| task.prompt(loaded.chat.as_ref(), &shot_refs, &it.raw.fields))
        .collect::<Result<Vec<_>, _>>()?;
    let prefix_text = &parts[0].prefix;
    if parts.iter().any(|p| &p.prefix != prefix_text) {
        bail!("task {}: prompts do not share one prefix", task.name);
    }
    let prefix_ids = loaded.encode(prefix_text, true)?;
    let bodies: Vec<Vec<u32>> = parts.iter().map(|p| loaded.encode_body(p)).collect::<Result<_, _>>()?;
    let (answer_scoring, answers) = crate::train_data::encode_scored(loaded, task, args.answer_scoring)?;
    if args.show_prompts > 0 {
        eprintln!("===== {}: cached prefix, {} tokens =====\n{prefix_text}", task.name, prefix_ids.len());
        eprintln!("prefix ids {prefix_ids:?}");
        for (i, (p, b)) in parts.iter().zip(&bodies).take(args.show_prompts).enumerate() {
            eprintln!(
                "===== prompt {} (example {}): body, {} tokens =====\n{}",
                i + 1,
                items[i].raw.id,
                b.len(),
                p.body
            );
            eprintln!("body ids {b:?}");
        }
        for (word, ids) in task.label_words().iter().zip(&answers) {
            eprintln!("answer {word}: {} token(s) {ids:?} ({answer_scoring})", ids.len());
        }
    }

    let start = Instant::now();
    let model = &loaded.model;
    // The task's constant prefix (system text, shots, instruction start) once per run.
    let mut prefix = KvCache::new(model.config().num_layers);
    model.forward(&TokenBatch::single(&prefix_ids)?, Some(&mut prefix), adapter, Mode::Inference, LogitsAt::None)?;

    // Similar lengths together: less padding. Results go back to their examples.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| bodies[i].len());
    let progress = bar(items.len(), &format!("{} {}", task.name, args.split));
    let mut results: Vec<Option<ExampleResult>> = (0..items.len()).map(|_| None).collect();
    let settings = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_new_tokens: 0,
        max_new_tokens: args.max_new_tokens,
        // Stop at the closing tag, however it is split into tokens here.
        stop_sequences: crate::train_data::close_tag_stops(loaded)?,
        restrict_to: Vec::new(),
    };
    for (batch_no, chunk) in order.chunks(args.batch_size.max(1)).enumerate() {
        let batch_bodies: Vec<Vec<u32>> = chunk.iter().map(|&i| bodies[i].clone()).collect();
        match args.mode {
            EvalMode::Constrained => {
                let logps =
                    score_candidates(model, adapter, Some(&prefix), &batch_bodies, &answers, loaded.special.pad_id())?;
                for (&i, lp) in chunk.iter().zip(logps) {
                    let probs = normalize(&lp);
                    let predicted = task.predict(&probs);
                    results[i] = Some(ExampleResult {
                        id: items[i].raw.id.clone(),
                        gold: items[i].label,
                        predicted: Some(predicted),
                        probs: Some(probs),
                        generated: None,
                    });
                }
            }
            EvalMode::Generate => {
                let seed = args.seed.wrapping_mul(1_000_003).wrapping_add(batch_no as u64);
                let outs =
                    generate(model, adapter, Some(&prefix), &batch_bodies, &settings, &loaded.special.stop, seed)?;
                for (&i, ids) in chunk.iter().zip(outs) {
                    let shown: Vec<u32> = ids.into_iter().filter(|t| !loaded.special.stop.contains(t)).collect();
                    let text = loaded.decode(&shown)?;
                    let predicted = task.parse_answer(&text);
                    results[i] = Some(ExampleResult {
                        id: items[i].raw.id.clone(),
                        gold: items[i].label,
                        predicted,
                        probs: None,
                        generated: Some(text),
                    });
                }
            }
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let results: Vec<ExampleResult> = results.into_iter().map(|r| r.expect("every example scored")).collect();
    let unparseable = results.iter().filter(|r| r.predicted.is_none()).count();
    let preds = predictions(task, &items, &results)?;
    let score =
        score_task(&task.metrics, &preds, args.resamples, args.seed).map_err(|e| anyhow!("task {}: {e}", task.name))?;
    Ok(TaskReport {
        task: task.name.clone(),
        split: args.split.clone(),
        examples: items.len(),
        shots: args.shots,
        mode: args.mode,
        answer_scoring,
        score,
        unparseable,
        seconds,
        examples_per_second: items.len() as f64 / seconds,
        skipped_rows,
        predictions: if args.predictions { results } else { Vec::new() },
    })
}

/// Turns per-example results into the metrics' input. An unparseable generated answer counts
/// as wrong: it gets an extra "invalid" class (score tasks: the middle of the range).
fn predictions(task: &Task, items: &[Item], results: &[ExampleResult]) -> Result<Predictions> {
    let grouping = task.grouping();
    if let Grouping::Candidates { field } = &grouping {
        // One query = one group of candidate entities; the prediction is the candidate judged
        // most likely "Yes".
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, it) in items.iter().enumerate() {
            groups.entry(it.raw.group.clone().unwrap_or_else(|| it.raw.id.clone())).or_default().push(i);
        }
        let yes = |r: &ExampleResult| match (&r.probs, r.predicted) {
            (Some(p), _) => p[1],
            (None, Some(Label::Class(1))) => 1.0,
            _ => 0.0,
        };
        let (mut predicted, mut gold_answers) = (Vec::new(), Vec::new());
        for members in groups.values() {
            let best = members
                .iter()
                .copied()
                .max_by(|&a, &b| yes(&results[a]).total_cmp(&yes(&results[b])))
                .expect("non-empty group");
            predicted.push(items[best].raw.fields.get(field).cloned().unwrap_or_default());
            gold_answers.push(items[members[0]].raw.answers.clone());
        }
        return Ok(Predictions::Record { predicted, gold_answers });
    }
    if let shared::task::Answer::Score { min, max } = task.answer {
        let value = |l: Option<Label>| match l {
            Some(Label::Score(v)) => v,
            _ => (min + max) / 2.0,
        };
        return Ok(Predictions::Scores {
            pred: results.iter().map(|r| value(r.predicted)).collect(),
            gold: items.iter().map(|it| value(Some(it.label))).collect(),
        });
    }
    let n = task.num_classes();
    let class = |l: Option<Label>| match l {
        Some(Label::Class(c)) => c,
        _ => n,
    };
    let any_invalid = results.iter().any(|r| r.predicted.is_none());
    let groups = if grouping == Grouping::Questions {
        let mut ids: BTreeMap<String, usize> = BTreeMap::new();
        Some(
            items
                .iter()
                .map(|it| {
                    let next = ids.len();
                    *ids.entry(it.raw.group.clone().unwrap_or_default()).or_insert(next)
                })
                .collect(),
        )
    } else {
        None
    };
    Ok(Predictions::Classes {
        pred: results.iter().map(|r| class(r.predicted)).collect(),
        gold: items.iter().map(|it| class(Some(it.label))).collect(),
        n_classes: if any_invalid { n + 1 } else { n },
        groups,
    })
}

/// Refuses an adapter whose manifest names other base weights, another task or another
/// template; a plain PEFT adapter (no manifest) is accepted with a note.
pub(crate) fn check_adapter(dir: &Path, model: &ModelArgs, tasks: &[Task], cache: &Path) -> Result<()> {
    if !dir.join(MANIFEST_FILE).is_file() {
        eprintln!(
            "note: {} has no {MANIFEST_FILE} (a plain PEFT adapter): base model and template are not checked",
            dir.display()
        );
        return Ok(());
    }
    check_manifest(dir, &model.weights_sha256(cache)?, tasks)
}

/// Refuses an adapter whose manifest is missing or names other base weights (`base_sha256`),
/// another task or another template.
pub(crate) fn check_manifest(dir: &Path, base_sha256: &str, tasks: &[Task]) -> Result<()> {
    let manifest = Manifest::read(dir).map_err(|e| anyhow!("refusing adapter {}: {e}", dir.display()))?;
    for task in tasks {
        manifest.check(base_sha256, task).map_err(|e| anyhow!("refusing adapter {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Runs `eval` for every task and prints a table.
pub fn run(args: &EvalArgs, cache: &Path) -> Result<()> {
    let registry = args.select.registry()?;
    let tasks: Vec<Task> = args.select.tasks.iter().map(|t| registry.get(t).cloned()).collect::<Result<_, _>>()?;
    let loaded = args.model.load(cache)?;
    if let Some(dir) = &args.adapter {
        check_adapter(dir, &args.model, &tasks, cache)?;
    }
    let adapter = match &args.adapter {
        Some(dir) => Some(
            LoraAdapter::load_peft_dir(dir, loaded.model.config(), DType::F32, loaded.model.device())
                .with_context(|| format!("loading adapter {}", dir.display()))?,
        ),
        None => None,
    };
    let mut reports = Vec::new();
    for task in &tasks {
        let r = eval_task(&loaded, adapter.as_ref(), task, args, cache)?;
        reports.push(r);
    }
    println!("| task | split | n | shots | mode | metric | value | 95% CI | unparseable | ex/s |");
    println!("|---|---|---:|---:|---|---|---:|---|---:|---:|");
    for r in &reports {
        for m in &r.score.metrics {
            println!(
                "| {} | {} | {} | {} | {:?} | {} | {:.4} | [{:.4}, {:.4}] | {} | {:.2} |",
                r.task,
                r.split,
                r.examples,
                r.shots,
                r.mode,
                m.metric.name(),
                m.value,
                m.ci_low,
                m.ci_high,
                r.unparseable,
                r.examples_per_second
            );
        }
    }
    if let Some(out) = &args.out {
        let report = serde_json::json!({
            "model": args.model.model,
            "weights": args.model.weights.to_string(),
            "adapter": args.adapter,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "tasks": reports,
        });
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let tmp = out.with_extension("partial");
        std::fs::write(&tmp, serde_json::to_string_pretty(&report)?)?;
        std::fs::rename(&tmp, out)?;
        eprintln!("report written to {}", out.display());
    }
    Ok(())
}

/// The prompt of `select`'s task for its first dev example (the first training example when
/// there is no dev split) as the evaluator renders and tokenizes it: the cached prefix and the
/// body marked, then each scored answer, with their token ids.
pub fn prompt_view(
    loaded: &LoadedModel,
    select: &TaskSelection,
    shots: usize,
    scoring: AnswerScoring,
    cache: &Path,
) -> Result<String> {
    use std::fmt::Write as _;
    let registry = select.registry()?;
    let task = registry.get(&select.tasks[0])?;
    let dir = data_dir(task, select.data.as_deref(), cache)?;
    let (items, _) = read_split(task, &dir, "dev", false).or_else(|_| read_split(task, &dir, "train", false))?;
    let item = items.first().ok_or_else(|| anyhow!("task {}: no examples to show", task.name))?;
    let shots = pick_shots(task, &dir, shots, 0, false)?;
    let shot_refs: Vec<(&BTreeMap<String, String>, Label)> = shots.iter().map(|s| (&s.raw.fields, s.label)).collect();
    let parts = task.prompt(loaded.chat.as_ref(), &shot_refs, &item.raw.fields)?;
    let prefix = loaded.encode(&parts.prefix, true)?;
    let body = loaded.encode_body(&parts)?;
    let (scoring_used, answers) = crate::train_data::encode_scored(loaded, task, scoring)?;
    let template = loaded.prompt_layout();
    let mut s = String::new();
    writeln!(s, "task {} on {} ({template}), example {}", task.name, loaded.path.display(), item.raw.id)?;
    writeln!(s, "===== cached prefix: {} tokens (computed once per task and adapter version) =====", prefix.len())?;
    writeln!(s, "{}", parts.prefix)?;
    writeln!(s, "===== body: {} tokens (per input) =====", body.len())?;
    writeln!(s, "{}", parts.body)?;
    writeln!(s, "===== answers scored ({scoring_used}) =====")?;
    let texts = task.scored_texts(scoring_used);
    for ((word, text), ids) in task.label_words().iter().zip(&texts).zip(&answers) {
        writeln!(s, "{word:>12}: {text:?} = {} token(s) {ids:?}", ids.len())?;
    }
    writeln!(s, "===== token ids =====")?;
    writeln!(s, "prefix {prefix:?}")?;
    writeln!(s, "body {body:?}")?;
    Ok(s)
}
