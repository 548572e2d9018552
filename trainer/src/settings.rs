//! A training command's resolved settings (`<out>/run.json`) and which of them a `--resume`
//! may change: below the argument structs and the run directory, which both use them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The settings a `--resume` may change (long flag names): how long the run goes on, how often
/// it evaluates, checkpoints and logs, and where it is. Every other flag is part of what the
/// resumed run computes (data order, dropout, shapes, the optimizer, numerics, the dev set that
/// picks `best/`) and must keep its recorded value. docs/training.md lists them.
pub const RESUME_MAY_CHANGE: [&str; 8] =
    ["max-steps", "epochs", "eval-every", "save-every", "log-every", "keep-checkpoints", "out", "resume"];

/// A training command's resolved settings: each flag's value as given, from the environment or
/// the default (`None`: unset), keyed by its long name. Recorded in `<out>/run.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// `sft`, `ppo` or `reward-model`.
    pub command: String,
    pub settings: BTreeMap<String, Option<Vec<String>>>,
}

impl RunSettings {
    /// The settings of subcommand `cmd` as `matches` resolved them.
    pub fn from_matches(cmd: &clap::Command, matches: &clap::ArgMatches) -> Self {
        let mut settings = BTreeMap::new();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            // The hidden half of a `--x / --no-x` pair only overrides the other, which holds
            // the value.
            if matches!(id, "help" | "version") || arg.is_hide_set() {
                continue;
            }
            let Ok(raw) = matches.try_get_raw(id) else { continue };
            let value = raw.map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect());
            // `--no-x` clearing a setting that is on by default is recorded as `x` with the
            // setting's value, as runs started before the pair existed recorded it.
            let long = arg.get_long().unwrap_or(id);
            let key = match long.strip_prefix("no-") {
                Some(x) if matches!(arg.get_action(), clap::ArgAction::SetFalse) => x,
                _ => long,
            };
            settings.insert(key.to_string(), value);
        }
        Self { command: cmd.get_name().to_string(), settings }
    }

    /// Why `self` (this invocation) cannot resume a run started with `recorded`, if it cannot:
    /// one line per changed setting that exact resume needs.
    pub fn resume_conflicts(&self, recorded: &RunSettings) -> Vec<String> {
        if self.command != recorded.command {
            return vec![format!(
                "--resume: the run was started by `{}`, not `{}`; resume it with the same command",
                recorded.command, self.command
            )];
        }
        let keys: std::collections::BTreeSet<&String> = self.settings.keys().chain(recorded.settings.keys()).collect();
        let mut out = Vec::new();
        for key in keys {
            if RESUME_MAY_CHANGE.contains(&key.as_str()) {
                continue;
            }
            let (was, now) = (recorded.settings.get(key).cloned().flatten(), self.settings.get(key).cloned().flatten());
            if !same_values(was.as_deref(), now.as_deref()) {
                out.push(format!(
                    "--resume: {key} was {}, now {}; exact resume needs the same value",
                    shown(was.as_deref()),
                    shown(now.as_deref())
                ));
            }
        }
        out
    }
}

/// Equal settings: the same text, or numbers of the same value (`3e-3` and `0.003`).
fn same_values(a: Option<&[String]>, b: Option<&[String]>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| x == y || matches!((x.parse::<f64>(), y.parse::<f64>()), (Ok(p), Ok(q)) if p == q))
        }
        (a, b) => a.is_none() && b.is_none(),
    }
}

fn shown(v: Option<&[String]>) -> String {
    match v {
        None => "unset".to_string(),
        Some(vs) => vs.join(","),
    }
}

#[cfg(test)]
mod tests {
    use super::RunSettings;
    use clap::CommandFactory;

    fn settings(args: &[&str]) -> RunSettings {
        let all: Vec<&str> = ["verdict-train"].iter().chain(args).copied().collect();
        let m = crate::Cli::command().try_get_matches_from(all).unwrap();
        let (name, sub) = m.subcommand().unwrap();
        RunSettings::from_matches(crate::Cli::command().find_subcommand(name).unwrap(), sub)
    }

    /// A `--x / --no-x` pair is recorded as the one setting `x`, as before the pair existed: a
    /// run started then resumes.
    #[test]
    fn a_boolean_pair_is_recorded_as_its_setting() {
        let now = settings(&["sft", "--task", "mr", "--out", "o", "--no-rslora"]);
        assert_eq!(now.settings["rslora"], Some(vec!["false".to_string()]));
        assert!(!now.settings.contains_key("no-rslora"));
        let default = settings(&["sft", "--task", "mr", "--out", "o"]);
        let mut before = default.clone();
        before.settings.insert("rslora".into(), Some(vec!["true".to_string()]));
        assert!(default.resume_conflicts(&before).is_empty());
        assert_eq!(now.resume_conflicts(&before).len(), 1);
    }

    /// TRL's and PEFT's names (and their `_` spellings) are the same settings as Verdict's:
    /// the recorded run is identical, so a resume accepts either spelling.
    #[test]
    fn trl_and_peft_names_are_the_same_settings() {
        let ours = settings(&[
            "sft",
            "--task",
            "mr",
            "--out",
            "o",
            "--lr",
            "3e-3",
            "--grad-accum",
            "2",
            "--rank",
            "8",
            "--alpha",
            "16",
            "--targets",
            "q,v,o",
            "--batch-size",
            "4",
            "--log-every",
            "5",
            "--eval-every",
            "7",
            "--save-every",
            "9",
            "--keep-checkpoints",
            "3",
            "--epochs",
            "2",
            "--schedule",
            "cosine",
        ]);
        let trl = settings(&[
            "sft",
            "--task",
            "mr",
            "--output-dir",
            "o",
            "--learning-rate",
            "3e-3",
            "--gradient_accumulation_steps",
            "2",
            "--lora-r",
            "8",
            "--lora_alpha",
            "16",
            "--lora-target-modules",
            "q_proj,v_proj,o",
            "--per-device-train-batch-size",
            "4",
            "--logging-steps",
            "5",
            "--eval_steps",
            "7",
            "--save-steps",
            "9",
            "--save-total-limit",
            "3",
            "--num-train-epochs",
            "2",
            "--lr-scheduler-type",
            "cosine",
        ]);
        let mut trl = trl;
        // The targets are recorded as typed; both spellings parse to the same projections.
        trl.settings.insert("targets".into(), ours.settings["targets"].clone());
        assert_eq!(ours, trl);
        let grpo = settings(&["ppo", "--task", "mr", "--out", "o", "--num-generations", "4", "--beta", "0.1"]);
        assert_eq!(grpo.settings["group-size"], Some(vec!["4".to_string()]));
        assert_eq!(grpo.settings["kl-coef"], Some(vec!["0.1".to_string()]));
    }

    #[test]
    fn a_resume_may_lengthen_a_run_but_not_change_what_it_computes() {
        let started = settings(&["reward-model", "--task", "mr", "--out", "o", "--lr", "3e-3"]);
        // The same number spelled otherwise, and the settings a resume may change.
        let longer = settings(&[
            "reward-model",
            "--task",
            "mr",
            "--out",
            "o",
            "--lr",
            "0.003",
            "--max-steps",
            "9",
            "--eval-every",
            "3",
            "--save-every",
            "3",
            "--log-every",
            "1",
            "--keep-checkpoints",
            "5",
            "--resume",
        ]);
        assert_eq!(longer.resume_conflicts(&started), Vec::<String>::new());
        let other = settings(&["reward-model", "--task", "mr", "--out", "o", "--seed", "2", "--resume"]);
        assert_eq!(
            other.resume_conflicts(&started),
            [
                "--resume: lr was 3e-3, now unset; exact resume needs the same value",
                "--resume: seed was 1, now 2; exact resume needs the same value"
            ]
        );
        let sft = settings(&["sft", "--task", "mr", "--out", "o", "--lr", "3e-3", "--resume"]);
        let conflicts = sft.resume_conflicts(&started);
        assert!(conflicts.len() == 1 && conflicts[0].contains("started by `reward-model`"), "{conflicts:?}");
    }
}
