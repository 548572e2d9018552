//! `verdict-train tasks`: the task registry, the exact prompt a task sends to a model
//! (`--show`), and a task's tokenized training examples for outside tools (`--dump`).

use crate::data::TaskSelection;
use crate::model_args::ModelArgs;
use crate::train_data;
use anyhow::{Context, Result};
use clap::Args;
use shared::task::{AnswerScoring, TaskRegistry};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TasksArgs {
    /// Extra task definitions (TOML; repeatable or comma-separated, as in `verdict-serve`).
    #[arg(long = "task-file", env = "VERDICT_TASK_FILES", value_delimiter = ',')]
    pub task_files: Vec<PathBuf>,
    /// Print the prompt of this task's first dev example as `--model` sees it: the cached
    /// prefix and the per-input body marked, then the answers scored, with token counts.
    #[arg(long)]
    pub show: Option<String>,
    /// Few-shot examples in the shown prompt.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// What the shown answers are: `full` or `word`.
    #[arg(long, default_value_t = AnswerScoring::Full)]
    pub answer_scoring: AnswerScoring,
    /// Write the token ids of the first N training examples of the `--show` task as JSON lines
    /// (`prefix`, `body`, `answer`, `label`) to `--out`: the same tokens training uses, for
    /// side-by-side runs of other trainers (scripts/torch_train_step.py).
    #[arg(long, requires = "out", requires = "show")]
    pub dump: Option<usize>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The `--show` task's data directory (default: `<cache>/data/<task>`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: &TasksArgs, cache: &Path) -> Result<()> {
    let Some(name) = &args.show else {
        let mut registry = TaskRegistry::builtin();
        for f in &args.task_files {
            registry.load_file(f)?;
        }
        println!("| task | benchmark | fields | labels | metrics |");
        println!("|---|---|---|---|---|");
        for t in registry.tasks() {
            let metrics: Vec<&str> = t.metrics.iter().map(|m| m.name()).collect();
            println!(
                "| {} | {:?} | {} | {} | {} |",
                t.name,
                t.benchmark,
                t.fields.join(", "),
                t.label_words().join(" / "),
                metrics.join(", ")
            );
        }
        return Ok(());
    };
    let select =
        TaskSelection { tasks: vec![name.clone()], task_files: args.task_files.clone(), data: args.data.clone() };
    let loaded = args.model.load(cache)?;
    if let Some(n) = args.dump {
        let out = args.out.as_ref().expect("clap requires --out with --dump");
        let data = train_data::load(&loaded, &select, Some(n), cache)?;
        let d = &data[0];
        let mut text = Vec::new();
        for ex in &d.examples {
            let line = serde_json::json!({"prefix": d.prefix, "body": ex.body, "answer": ex.answer, "label": ex.label});
            writeln!(text, "{line}")?;
        }
        shared::atomic::write_file(out, &text).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("{} examples of {name} written to {}", d.examples.len(), out.display());
        return Ok(());
    }
    let view = crate::eval::prompt_view(&loaded, &select, args.shots, args.answer_scoring, cache)?;
    print!("{view}");
    Ok(())
}
