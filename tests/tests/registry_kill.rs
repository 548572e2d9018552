//! The registry survives `verdict-train promote` and `rollback` killed (SIGKILL) at random
//! points: after each of 50 kills, `CURRENT` names a complete version (every file of the
//! candidate, byte for byte, and a manifest that parses), every visible version directory is
//! complete, `HISTORY` names only complete versions, and `AUDIT.jsonl` has no torn line.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shared::registry::Registry;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::tiny::{setup, train_args, SFT_SETTINGS};
use tests::{binary, train_ok};

const TRIALS: usize = 50;

/// The non-hidden files of an adapter directory, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file() && !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// Panics unless the registry of task `mr` is consistent (see the module doc).
fn check(reg: &Registry, candidate: &BTreeMap<String, Vec<u8>>, when: &str) {
    let task = reg.root().join("mr");
    let complete = |version: &str, what: &str| {
        let dir = task.join(version);
        let got = files(&dir);
        let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&got), names(candidate), "{when}: {what} {version} lacks files");
        assert!(got == *candidate, "{when}: {what} {version} differs from the candidate");
        shared::adapter::Manifest::read(&dir).unwrap_or_else(|e| panic!("{when}: {what} {version}: {e}"));
    };
    if !task.exists() {
        return;
    }
    // Every visible directory is a whole version (half-written ones are hidden temporaries).
    for entry in std::fs::read_dir(&task).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().unwrap().is_dir() && !name.starts_with('.') {
            complete(&name, "version");
        }
    }
    match std::fs::read_to_string(task.join("CURRENT")) {
        Ok(text) => {
            let current = reg.current("mr").unwrap_or_else(|e| panic!("{when}: CURRENT {text:?}: {e}"));
            complete(&current.unwrap_or_default(), "CURRENT");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{when}: CURRENT: {e}"),
    }
    for version in reg.history("mr").unwrap() {
        complete(&version, "HISTORY's");
    }
    let audit = std::fs::read_to_string(task.join("AUDIT.jsonl")).unwrap_or_default();
    assert!(audit.is_empty() || audit.ends_with('\n'), "{when}: AUDIT.jsonl ends in a torn line: {audit:?}");
    for line in audit.lines() {
        let parsed = serde_json::from_str::<shared::audit::AuditRecord>(line);
        assert!(parsed.is_ok(), "{when}: AUDIT.jsonl line {line:?}: {parsed:?}");
    }
    assert_eq!(reg.audit("mr").unwrap().len(), audit.lines().count(), "{when}");
}

fn visible_versions(root: &Path) -> usize {
    Registry::new(root).versions("mr").map_or(0, |v| v.len())
}

fn audit_lines(root: &Path) -> usize {
    std::fs::read_to_string(root.join("mr/AUDIT.jsonl")).map_or(0, |t| t.lines().count())
}

/// Hidden temporary copies a kill left in the task directory.
fn hidden_copies(root: &Path) -> usize {
    std::fs::read_dir(root.join("mr"))
        .map_or(0, |d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).count())
}

/// Removes them (as an operator may: they are never read), so each trial counts its own.
fn remove_hidden_copies(root: &Path) {
    for e in std::fs::read_dir(root.join("mr")).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
        }
    }
}

#[test]
fn promote_and_rollback_killed_at_random_points_leave_a_consistent_registry() {
    let (dir, model, data) = setup("registry-kill");
    let out = dir.0.join("sft");
    let mut args = train_args("sft", &model, &data, out.to_str().unwrap(), "2");
    args.extend(SFT_SETTINGS);
    train_ok(&args);
    let candidate_dir = out.join("best");
    // A large extra file (promote copies every file of the candidate) makes copying and
    // flushing a version take long enough for the kills to land inside it.
    let pad: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(candidate_dir.join("padding.bin"), pad).unwrap();
    let candidate = files(&candidate_dir);
    // The staged copies of killed promotions land here, removed with the test's directory.
    let tmp = dir.0.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let root = dir.0.join("adapters");
    let reg = Registry::new(&root);
    let (root_s, cand_s) = (root.to_str().unwrap(), candidate_dir.to_str().unwrap());
    // --force: every promotion publishes a new version (a copy of the candidate) and serves it.
    let promote: Vec<&str> = vec![
        "promote",
        "--model",
        &model,
        "--task",
        "mr",
        "--data",
        &data,
        "--adapters",
        root_s,
        "--candidate",
        cand_s,
        "--force",
        "--eval-limit",
        "4",
    ];
    let rollback: Vec<&str> = vec!["rollback", "--task", "mr", "--adapters", root_s];
    let spawn = |args: &[&str]| {
        Command::new(binary("verdict-train"))
            .args(args)
            .env("TMPDIR", &tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // How long each runs unkilled (the faster of two promotions: on a noisy machine a slow first
    // run made most later runs finish before their kill): the kills fall anywhere in that time.
    let timed = |args: &[&str]| {
        let t = Instant::now();
        assert!(spawn(args).wait().unwrap().success(), "{args:?}");
        t.elapsed()
    };
    let promote_time = timed(&promote).min(timed(&promote));
    let rollback_time = timed(&rollback);
    check(&reg, &candidate, "unkilled");
    assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v1"));

    let mut rng = ChaCha8Rng::seed_from_u64(18);
    let (mut killed, mut finished, mut mid_publish, mut published_unaudited) = (0, 0, 0, 0);
    for trial in 0..TRIALS {
        let back = reg.previous("mr").is_ok() && rng.random_bool(0.4);
        let (args, took) = if back { (&rollback, rollback_time) } else { (&promote, promote_time) };
        // The writes come last, after the evaluation: most kills fall in the second half.
        let delay = Duration::from_secs_f64(took.as_secs_f64() * rng.random_range(0.1..1.0));
        let (versions_before, audit_before) = (visible_versions(&root), audit_lines(&root));
        let mut child = spawn(args);
        std::thread::sleep(delay);
        let done = child.try_wait().unwrap().is_some();
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if done {
            finished += 1;
        } else {
            killed += 1;
        }
        // Where the kill fell: mid-publish (a hidden copy left), or after publishing and
        // before the audit line (a new version without its line).
        if hidden_copies(&root) > 0 {
            mid_publish += 1;
            remove_hidden_copies(&root);
        } else if visible_versions(&root) > versions_before && audit_lines(&root) == audit_before {
            published_unaudited += 1;
        }
        let what = if back { "rollback" } else { "promote" };
        check(&reg, &candidate, &format!("trial {trial}: {what} killed after {delay:?} ({status})"));
    }
    eprintln!(
        "{killed} runs killed part-way ({mid_publish} mid-write, leaving a hidden temporary; {published_unaudited} between publishing and \
         the audit line), {finished} finished first (promote {promote_time:?}, rollback {rollback_time:?})"
    );
    assert!(killed >= TRIALS / 2, "most runs must be killed part-way: {killed} of {TRIALS}");
    // And the registry still works: a promotion and a rollback after all the kills.
    assert!(spawn(&promote).wait().unwrap().success());
    assert!(spawn(&rollback).wait().unwrap().success());
    check(&reg, &candidate, "after the kills");
}
