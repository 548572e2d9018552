//! `verdict-train promote` and `rollback` end to end on the tiny model and the synthetic `mr`
//! data, with a weak adapter (3 SFT steps) and a good one (100 steps): a worse candidate is
//! refused and leaves the registry as it was, a better one becomes a new serving version,
//! rollback goes back, every decision is one audit line whose numbers are the evaluator's; and
//! a server under load follows promotions and rollbacks, made through its admin API or in the
//! registry (its watch), without a failed request.

use serde_json::{json, Value};
use shared::registry::Registry;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::tiny::{setup, train_args, SFT_SETTINGS};
use tests::{binary, free_port, http, run, train_ok, wait_for, TempDir};

const TOKEN: &str = "s3cret";

/// The tiny model, its data, and two adapters trained on it.
struct Trained {
    dir: TempDir,
    model: String,
    data: String,
    weak: PathBuf,
    good: PathBuf,
}

fn train(tag: &str) -> Trained {
    let (dir, model, data) = setup(tag);
    let sft = |name: &str, steps: &str| {
        let out = dir.0.join(name);
        let mut args = train_args("sft", &model, &data, out.to_str().unwrap(), steps);
        args.extend(SFT_SETTINGS);
        args.extend(["--save-every", "1000"]);
        train_ok(&args);
        out.join("best")
    };
    let weak = sft("weak", "3");
    let good = sft("good", "100");
    Trained { dir, model, data, weak, good }
}

/// What one `promote` or `rollback` run did.
struct Outcome {
    ok: bool,
    /// The exit status (README: 0 done, 1 error, 2 usage, 3 refused).
    code: Option<i32>,
    /// The audit record it printed on stdout, if any.
    record: Option<Value>,
    stderr: String,
}

fn registry_command(args: &[&str]) -> Outcome {
    // With backtraces asked for, as a developer's shell often has them: a refusal must still
    // read as an answer, not a crash report.
    let o = run("verdict-train", args, &[("RUST_BACKTRACE", "1")]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    Outcome {
        ok: o.status.success(),
        code: o.status.code(),
        record: stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn promote(t: &Trained, registry: &Path, candidate: &Path, extra: &[&str]) -> Outcome {
    let mut args = vec![
        "promote",
        "--model",
        &t.model,
        "--task",
        "mr",
        "--data",
        &t.data,
        "--adapters",
        registry.to_str().unwrap(),
        "--candidate",
        candidate.to_str().unwrap(),
    ];
    args.extend(extra);
    registry_command(&args)
}

fn rollback(registry: &Path, extra: &[&str]) -> Outcome {
    let mut args = vec!["rollback", "--task", "mr", "--adapters", registry.to_str().unwrap()];
    args.extend(extra);
    registry_command(&args)
}

/// The task score `verdict-train eval` reports on the dev split (with an adapter, or zero-shot).
fn eval_score(t: &Trained, adapter: Option<&Path>) -> f64 {
    let report = t.dir.0.join("eval.json");
    let mut args =
        vec!["eval", "--model", &t.model, "--task", "mr", "--data", &t.data, "--split", "dev", "--resamples", "10"];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    args.extend(["--out", report.to_str().unwrap()]);
    train_ok(&args);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    v["tasks"][0]["score"]["score"].as_f64().unwrap()
}

fn audit_lines(registry: &Path) -> Vec<Value> {
    match std::fs::read_to_string(registry.join("mr/AUDIT.jsonl")) {
        Ok(text) => text.lines().map(|l| serde_json::from_str(l).unwrap()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn promote_refuses_worse_promotes_better_rolls_back_and_audits_each_decision() {
    let t = train("promote-cli");
    let root = t.dir.0.join("adapters");
    let reg = Registry::new(&root);
    let base_sha = tests::read_manifest(&t.good)["base_sha256"].as_str().unwrap().to_string();
    let zero_shot = eval_score(&t, None);
    let good_score = eval_score(&t, Some(&t.good));

    // 1. An empty registry: the incumbent is the base model zero-shot. A margin nobody can
    // clear refuses the weak adapter and leaves the registry without versions.
    let o = promote(&t, &root, &t.weak, &["--margin", "1"]);
    assert!(!o.ok && o.stderr.contains("refused"), "{}", o.stderr);
    assert_eq!(o.code, Some(3), "a refusal has its own exit status: {}", o.stderr);
    assert!(!o.stderr.contains("backtrace") && !o.stderr.contains(".rs:"), "no backtrace: {}", o.stderr);
    assert_eq!(reg.current("mr").unwrap(), None);
    assert!(reg.versions("mr").unwrap().is_empty());
    let refused_first = o.record.expect("the refusal's audit record on stdout");
    assert_eq!(refused_first["incumbent_score"].as_f64(), Some(zero_shot), "zero-shot as `eval` reports it");
    let weak_score = refused_first["candidate_score"].as_f64().unwrap();
    eprintln!("dev scores: zero-shot {zero_shot}, weak {weak_score}, good {good_score}");
    assert!(good_score > weak_score + 0.05, "the good adapter {good_score} is clearly better than {weak_score}");

    // --force overrides, and says so.
    let o = promote(&t, &root, &t.weak, &["--margin", "1", "--force"]);
    assert!(o.ok, "{}", o.stderr);
    assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v1"));
    assert_eq!(reg.history("mr").unwrap(), vec!["v1"]);
    let published = |v: &str| std::fs::read(root.join("mr").join(v).join("adapter_model.safetensors")).unwrap();
    let weights = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(published("v1"), weights(&t.weak), "v1 is a copy of the candidate");
    assert_eq!(tests::read_manifest(&root.join("mr/v1")), tests::read_manifest(&t.weak));

    // 2. The good adapter beats v1 by the default margin: v2.
    let o = promote(&t, &root, &t.good, &[]);
    assert!(o.ok, "{}", o.stderr);
    assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v2"));
    assert_eq!(reg.history("mr").unwrap(), vec!["v1", "v2"]);
    assert_eq!(published("v2"), weights(&t.good));
    let promoted = o.record.unwrap();
    assert_eq!(promoted["candidate_score"].as_f64(), Some(good_score), "the score `eval --adapter` reports");
    assert_eq!(promoted["incumbent_score"].as_f64(), Some(weak_score), "v1 scores what it scored as a candidate");

    // 3. The weak adapter over the good one: refused, nothing changes but the audit log.
    let o = promote(&t, &root, &t.weak, &[]);
    assert!(!o.ok, "a worse candidate must be refused");
    assert_eq!(o.code, Some(3), "{}", o.stderr);
    assert!(o.stderr.contains("refused") && o.stderr.contains("registry is unchanged"), "{}", o.stderr);
    assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v2"));
    assert_eq!(reg.versions("mr").unwrap(), vec!["v1", "v2"]);
    assert_eq!(reg.history("mr").unwrap(), vec!["v1", "v2"]);

    // An existing version name fails before any evaluation, and is not a decision.
    let o = promote(&t, &root, &t.good, &["--version", "v2"]);
    assert!(!o.ok && o.stderr.contains("already exists"), "{}", o.stderr);
    assert_eq!(o.code, Some(1), "an error, not a refusal: {}", o.stderr);
    assert_eq!(audit_lines(&root).len(), 4);

    // 4. Rollback restores v1 and trims the history; with nothing earlier, it fails.
    let o = rollback(&root, &[]);
    assert!(o.ok, "{}", o.stderr);
    assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v1"));
    assert_eq!(reg.history("mr").unwrap(), vec!["v1"]);
    let o = rollback(&root, &[]);
    assert!(!o.ok && o.stderr.contains("no earlier promoted version"), "{}", o.stderr);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v1"));

    // 5. One audit line per decision, the same record each command printed.
    let lines = audit_lines(&root);
    let expected = [
        // (action, from, to, forced, candidate score, incumbent score, margin)
        ("refuse", None, None, false, Some(weak_score), Some(zero_shot), Some(1.0)),
        ("promote", None, Some("v1"), true, Some(weak_score), Some(zero_shot), Some(1.0)),
        ("promote", Some("v1"), Some("v2"), false, Some(good_score), Some(weak_score), Some(0.005)),
        ("refuse", Some("v2"), None, false, Some(weak_score), Some(good_score), Some(0.005)),
        ("rollback", Some("v2"), Some("v1"), false, None, None, None),
    ];
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
    assert_eq!(lines[0], refused_first);
    assert_eq!(lines[2], promoted);
    for (line, (action, from, to, forced, cand, inc, margin)) in lines.iter().zip(expected) {
        let what = format!("{line}");
        assert_eq!(line["action"], action, "{what}");
        assert_eq!(line["task"], "mr", "{what}");
        assert_eq!(line["from_version"].as_str(), from, "{what}");
        assert_eq!(line["to_version"].as_str(), to, "{what}");
        assert_eq!(line["forced"], forced, "{what}");
        assert_eq!(line["candidate_score"].as_f64(), cand, "{what}");
        assert_eq!(line["incumbent_score"].as_f64(), inc, "{what}");
        assert_eq!(line["base_sha256"], base_sha.as_str(), "{what}");
        let command = line["command"].as_str().unwrap();
        assert!(command.contains(&format!("verdict-train {action}").replace("refuse", "promote")), "{what}");
        let time = line["time"].as_str().unwrap();
        assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
        assert_eq!(line["margin"].as_f64(), margin, "{what}");
        if action != "rollback" {
            assert_eq!(line["split"], "dev", "{what}");
            assert_eq!(line["examples"], 64, "{what}");
            assert_eq!(line["metrics"], json!(["accuracy"]), "{what}");
        }
    }
    let times: Vec<&str> = lines.iter().map(|l| l["time"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "in order: {times:?}");
    assert_eq!(reg.audit("mr").unwrap().len(), lines.len(), "the registry reads its own log");
}

/// Exit statuses without any training: a failure is 1, a usage error 2, never a refusal's 3.
#[test]
fn a_failed_promotion_exits_1_and_a_usage_error_2() {
    let dir = tests::TempDir::new("promote-exit");
    let missing = dir.0.join("no-registry");
    let candidate = dir.0.join("no-candidate");
    let (reg, cand) = (missing.to_str().unwrap(), candidate.to_str().unwrap());
    let base = ["promote", "--model", "smollm2", "--task", "mr", "--adapters", reg, "--candidate", cand];
    // A registry and candidate that are not there: an error, exit 1.
    let o = registry_command(&base);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("verdict_manifest.json"), "{}", o.stderr);
    assert!(o.record.is_none(), "no decision, no audit record");
    let o = rollback(&missing, &[]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    // Flags that cannot work: usage errors, exit 2 (clap's own, and the margin's check).
    let o = registry_command(&[&base[..], &["--margin", "NaN"]].concat());
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("--margin"), "{}", o.stderr);
    let o = registry_command(&[&base[..], &["--no-such-flag"]].concat());
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    assert!(!missing.exists(), "a failed promotion creates no registry");
}

/// One client request while versions switch.
struct Answer {
    sent: Instant,
    received: Instant,
    status: u16,
    version: Option<String>,
}

#[test]
fn a_server_under_load_follows_promotions_and_rollbacks_without_failures() {
    let t = train("promote-serve");
    let root = t.dir.0.join("adapters");
    let reg = Registry::new(&root);
    let o = promote(&t, &root, &t.weak, &["--force", "--eval-limit", "16"]);
    assert!(o.ok, "{}", o.stderr);

    let port = free_port();
    let server = Server(
        Command::new(binary("verdict-serve"))
            .args(["--port", &port.to_string(), "--model", &t.model, "--adapters", root.to_str().unwrap()])
            .args(["--admin-token", TOKEN, "--watch-interval-ms", "50"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let r = wait_for(port, "/ready", 200, Duration::from_secs(60));
    assert!(matches!(&r, Some((200, _))), "server not ready: {r:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, answers) = (stop.clone(), answers.clone());
            std::thread::spawn(move || {
                let body = json!({"task": "mr", "inputs": "the movie was really good"}).to_string();
                let deadline = Instant::now() + Duration::from_secs(300);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let sent = Instant::now();
                    let (status, text) = http(port, "POST", "/v1/classify", Some(&body)).unwrap_or((0, String::new()));
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let version = v["results"][0]["adapter_version"].as_str().map(str::to_string);
                    answers.lock().unwrap().push(Answer { sent, received: Instant::now(), status, version });
                }
            })
        })
        .collect();
    let pause = || std::thread::sleep(Duration::from_millis(400));
    // The first answer from `version` to a request sent after `done`: when the server switched.
    let switched = |done: Instant, version: &str| loop {
        let seen = answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.sent >= done && a.version.as_deref() == Some(version))
            .map(|a| a.received)
            .min();
        if let Some(at) = seen {
            break at;
        }
        assert!(done.elapsed() < Duration::from_secs(2), "the server did not serve {version} within 2 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    pause();
    let url = format!("http://127.0.0.1:{port}");
    let through_server = ["--server", url.as_str(), "--admin-token", TOKEN];
    // (when the command started, when the server switched, the version serving from then on)
    let mut switches: Vec<(Instant, Instant, &str)> = Vec::new();

    // Promote through the admin API: swapped when the command returns.
    let started = Instant::now();
    let o = promote(&t, &root, &t.good, &[&["--eval-limit", "32"][..], &through_server].concat());
    let done = Instant::now();
    assert!(o.ok, "{}", o.stderr);
    let record = o.record.unwrap();
    assert_eq!(record["to_version"], "v2");
    assert!(!record["command"].as_str().unwrap().contains(TOKEN), "the token stays out of the log");
    assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v2"), "the server wrote CURRENT");
    assert_eq!(reg.history("mr").unwrap(), vec!["v1", "v2"]);
    switches.push((started, done, "v2"));
    pause();

    // Roll back through the registry: the server's watch picks up CURRENT.
    let started = Instant::now();
    let o = rollback(&root, &[]);
    assert!(o.ok, "{}", o.stderr);
    let at = switched(Instant::now(), "v1");
    eprintln!("rollback in the registry -> first v1 answer: {} ms", at.duration_since(started).as_millis());
    switches.push((started, at, "v1"));
    pause();

    // Promote in the registry (the watch again), then roll back through the admin API.
    let started = Instant::now();
    let o = promote(&t, &root, &t.good, &["--eval-limit", "32"]);
    assert!(o.ok, "{}", o.stderr);
    let at = switched(Instant::now(), "v3");
    switches.push((started, at, "v3"));
    pause();
    let started = Instant::now();
    let o = rollback(&root, &through_server);
    assert!(o.ok, "{}", o.stderr);
    switches.push((started, Instant::now(), "v1"));
    assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v1"), "the server wrote CURRENT");
    pause();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    drop(server);

    let answers = answers.lock().unwrap();
    assert!(answers.len() >= 10, "only {} answers under load", answers.len());
    let failed = answers.iter().filter(|a| a.status != 200).count();
    assert_eq!(failed, 0, "{failed} of {} requests failed during the switches", answers.len());
    let mut checked = vec![0usize; switches.len()];
    for a in answers.iter() {
        let v = a.version.as_deref().expect("every answer names its version");
        assert!(["v1", "v2", "v3"].contains(&v), "unknown version {v}");
        // Sent once a switch was done and answered before the next began: that switch's version.
        let Some(i) = switches.iter().rposition(|(_, done, _)| a.sent >= *done) else { continue };
        if switches.get(i + 1).is_some_and(|(next, _, _)| a.received >= *next) {
            continue;
        }
        assert_eq!(v, switches[i].2, "a request sent after the switch to {} got {v}", switches[i].2);
        checked[i] += 1;
    }
    eprintln!("{} answers, all 200; checked after each switch: {checked:?}", answers.len());
    assert!(checked.iter().all(|&n| n > 0), "answers after every switch: {checked:?}");
    let actions: Vec<Value> = audit_lines(&root).iter().map(|l| l["action"].clone()).collect();
    assert_eq!(actions, ["promote", "promote", "rollback", "promote", "rollback"].map(|a| json!(a)).to_vec());
}

/// A `verdict-serve` child, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
