//! What a command reads: which tasks from which definitions and data directories, split
//! naming, and each split read and labelled. Shared by evaluation, training and promotion.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use shared::data::{self, ColumnMap, RawExample, ReadOptions};
use shared::task::{DataFormat, Label, Task, TaskRegistry};
use std::path::{Path, PathBuf};

/// Which tasks, from which definitions and data: shared by `eval` and `sft`.
#[derive(Args, Clone)]
pub struct TaskSelection {
    /// Tasks by registry name (repeatable; `sft` trains on the mix).
    #[arg(long = "task", required = true)]
    pub tasks: Vec<String>,
    /// Extra task definitions (TOML; repeatable or comma-separated, as in `verdict-serve`);
    /// see docs/tasks.md.
    #[arg(long = "task-file", env = "VERDICT_TASK_FILES", value_delimiter = ',')]
    pub task_files: Vec<PathBuf>,
    /// Data directory of one task (GLUE task dir, SuperGLUE task dir, or a dir of
    /// `<split>.jsonl|csv|parquet`). Default for the real datasets: `<cache>/data/<task>`.
    #[arg(long)]
    pub data: Option<PathBuf>,
}

impl TaskSelection {
    /// The built-in registry plus the task files.
    pub fn registry(&self) -> Result<TaskRegistry> {
        let mut registry = TaskRegistry::builtin();
        for f in &self.task_files {
            registry.load_file(f)?;
        }
        Ok(registry)
    }
}

/// One example ready to score.
pub(crate) struct Item {
    pub raw: RawExample,
    pub label: Label,
}

/// A `--split` value: `validation` is another name for `dev`.
pub fn split_name(s: &str) -> Result<String, String> {
    match s.trim() {
        "" => Err("give a split name (dev, test, train)".into()),
        "validation" => Ok("dev".into()),
        s => Ok(s.to_string()),
    }
}

/// The data file of `split` for `task` (the names come from the task registry).
fn split_file(task: &Task, dir: &Path, split: &str) -> Result<PathBuf> {
    let candidates = task.split_file_names(split);
    candidates.iter().map(|c| dir.join(c)).find(|p| p.is_file()).ok_or_else(|| {
        anyhow!("{}: no {} file for task {} (looked for {})", dir.display(), split, task.name, candidates.join(", "))
    })
}

pub(crate) fn data_dir(task: &Task, data: Option<&Path>, cache: &Path) -> Result<PathBuf> {
    match (data, &task.format) {
        (Some(d), _) => Ok(d.to_path_buf()),
        (None, DataFormat::Table) => {
            let d = cache.join("data").join(&task.name);
            if !d.is_dir() {
                bail!("{} not found: run `verdict-train fetch-data {}` or pass --data", d.display(), task.name);
            }
            Ok(d)
        }
        (None, _) => bail!("task {} needs --data <directory with the official files>", task.name),
    }
}

/// Reads and labels a split.
pub(crate) fn read_split(task: &Task, dir: &Path, split: &str, skip_bad_rows: bool) -> Result<(Vec<Item>, usize)> {
    let path = split_file(task, dir, split)?;
    let opts = ReadOptions { skip_bad_rows };
    let report = match &task.format {
        DataFormat::GlueTsv(name) => data::read_glue_tsv(name, &path, opts),
        DataFormat::SuperGlueJsonl(name) => data::read_superglue_jsonl(name, &path, opts),
        DataFormat::Table => {
            let mapping = ColumnMap {
                fields: task.fields.iter().map(|f| (task.column(f), f.clone())).collect(),
                label: Some(task.column("label")),
                // Ids from an `id` column where the data has one (our datasets, or a mapped
                // column); otherwise rows are named by their line.
                id: (task.columns.contains_key("id") || task.benchmark == shared::task::Benchmark::Verdict)
                    .then(|| task.column("id")),
                group: None,
            };
            data::read_table(&path, &mapping, opts)
        }
    }?;
    let mut items = Vec::with_capacity(report.examples.len());
    for raw in report.examples {
        let Some(text) = raw.label.clone() else {
            bail!("{}:{}: no label: the {split} split cannot be evaluated", path.display(), raw.line);
        };
        let label = task.parse_label(&text).with_context(|| format!("{}:{}", path.display(), raw.line))?;
        items.push(Item { raw, label });
    }
    for s in &report.skipped {
        eprintln!("skipped: {s}");
    }
    Ok((items, report.skipped.len()))
}

/// Picks `k` demonstrations from the training split, seeded, balanced over no class.
pub(crate) fn pick_shots(task: &Task, dir: &Path, k: usize, seed: u64, skip_bad_rows: bool) -> Result<Vec<Item>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    let (mut train, _) = read_split(task, dir, "train", skip_bad_rows)?;
    if train.len() < k {
        bail!("task {}: {} shots asked, the training split has {}", task.name, k, train.len());
    }
    train.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    train.truncate(k);
    Ok(train)
}
