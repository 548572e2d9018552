//! `verdict-train sft` end to end on a tiny seeded model: it learns a synthetic task, and a run
//! killed after a checkpoint and resumed ends exactly where an uninterrupted run ends.

use candle_core::Device;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::tiny::{setup, train_args, SFT_SETTINGS};
use tests::{binary, metrics_series as series, run};

fn sft_args<'a>(model: &'a str, data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    let mut args = train_args("sft", model, data, out, steps);
    args.extend(SFT_SETTINGS);
    args.extend(["--save-every", "5", "--keep-checkpoints", "20"]);
    args
}

#[test]
fn a_tiny_model_learns_a_synthetic_task() {
    let (dir, model, data) = setup("sft-learn");
    let out = dir.0.join("run");
    let mut args = sft_args(&model, &data, out.to_str().unwrap(), "200");
    args.extend(["--eval-every", "50"]);
    let o = run("verdict-train", &args, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let scores = series(&out, "dev_score");
    assert_eq!(scores.iter().map(|s| s.0).collect::<Vec<_>>(), vec![50, 100, 150, 200]);
    let last = scores.last().unwrap().1;
    let losses: Vec<String> = series(&out, "loss").iter().map(|(_, x)| format!("{x:.3}")).collect();
    assert!(last >= 0.95, "dev accuracy after 200 steps: {scores:?}; losses {losses:?}");
    // Before training the base model is at chance on this task.
    let base = run(
        "verdict-train",
        &["eval", "--model", &model, "--task", "mr", "--data", &data, "--split", "dev", "--resamples", "10"],
        &[],
    );
    let table = String::from_utf8_lossy(&base.stdout);
    let acc: f64 =
        table.lines().find(|l| l.starts_with("| mr")).unwrap().split('|').nth(7).unwrap().trim().parse().unwrap();
    assert!(acc < 0.8, "untrained accuracy {acc}");
    // The trained adapter evaluates the same through `eval --adapter`, and carries its manifest.
    let adapter = out.join("adapter");
    let manifest = tests::read_manifest(&adapter);
    assert_eq!(manifest["task"], "mr");
    assert_eq!(manifest["steps"], 200);
    let o = run(
        "verdict-train",
        &[
            "eval",
            "--model",
            &model,
            "--task",
            "mr",
            "--data",
            &data,
            "--split",
            "dev",
            "--adapter",
            adapter.to_str().unwrap(),
            "--resamples",
            "10",
        ],
        &[],
    );
    let table = String::from_utf8_lossy(&o.stdout);
    let acc: f64 =
        table.lines().find(|l| l.starts_with("| mr")).unwrap().split('|').nth(7).unwrap().trim().parse().unwrap();
    assert!((acc - last).abs() < 1e-9, "eval --adapter gives {acc}, training reported {last}");
    assert!(out.join("curves.svg").is_file() && out.join("best/adapter_model.safetensors").is_file());
    // The manifest refuses the adapter for another task or other base weights, with the reason.
    let a = adapter.to_str().unwrap();
    let o =
        run("verdict-train", &["eval", "--model", &model, "--task", "mr-score", "--data", &data, "--adapter", a], &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("adapter is for task mr, not mr-score"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run("verdict-train", &["eval", "--model", "smollm2", "--task", "mr", "--data", &data, "--adapter", a], &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("trained on base weights"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_killed_run_resumes_to_the_same_adapter() {
    let (dir, model, data) = setup("sft-resume");
    let whole = dir.0.join("whole");
    let o = run("verdict-train", &sft_args(&model, &data, whole.to_str().unwrap(), "25"), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The same run, killed (SIGKILL) once its step-10 checkpoint is on disk, then resumed.
    let cut = dir.0.join("cut");
    let mut child = Command::new(binary("verdict-train"))
        .args(sft_args(&model, &data, cut.to_str().unwrap(), "25"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !cut.join("checkpoints/step-000010/state.json").is_file() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!cut.join("adapter").exists(), "killed before the end");
    // The picture is redrawn at every checkpoint (step 5's is complete by step 10's).
    let svg = std::fs::read_to_string(cut.join("curves.svg")).expect("a killed run keeps its curves picture");
    assert!(svg.contains("training loss"));
    let mut args = sft_args(&model, &data, cut.to_str().unwrap(), "25");
    args.push("--resume");
    let o = run("verdict-train", &args, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resumed from"));

    let load =
        |p: &Path| candle_core::safetensors::load(p.join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (a, b) = (load(&whole), load(&cut));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let diff =
            (t - &b[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{name} differs by {diff} after resume");
    }
    // The logged losses agree step for step, and no step is logged twice.
    assert_eq!(series(&whole, "loss"), series(&cut, "loss"));
    // Starting over in a directory that holds a run is refused.
    let o = run("verdict-train", &sft_args(&model, &data, cut.to_str().unwrap(), "25"), &[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--resume"));
}

#[test]
fn a_resume_refuses_a_changed_seed_and_accepts_a_longer_run() {
    let (dir, model, data) = setup("sft-resume-flags");
    let out = dir.0.join("run");
    let o = run("verdict-train", &sft_args(&model, &data, out.to_str().unwrap(), "5"), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(recorded["command"], "sft");
    assert_eq!(recorded["settings"]["seed"], serde_json::json!(["3"]), "{recorded}");
    assert_eq!(recorded["settings"]["batch-size"], serde_json::json!(["16"]), "{recorded}");

    // Another seed (or batch size) would not continue the same run: a usage error naming it.
    for (flag, value, key) in [("--seed", "4", "seed was 3, now 4"), ("--batch-size", "8", "batch-size was 16, now 8")]
    {
        let mut args = sft_args(&model, &data, out.to_str().unwrap(), "5");
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = value;
        args.push("--resume");
        let o = run("verdict-train", &args, &[]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(key) && stderr.contains("exact resume needs the same value"), "{stderr}");
    }
    assert_eq!(series(&out, "loss").len(), 5, "a refused resume trains nothing");

    // A longer run is what --resume is for: accepted, and recorded.
    let mut args = sft_args(&model, &data, out.to_str().unwrap(), "7");
    args.push("--resume");
    let o = run("verdict-train", &args, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && stderr.contains("resumed from"), "{stderr}");
    assert_eq!(series(&out, "loss").len(), 7);
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(recorded["settings"]["max-steps"], serde_json::json!(["7"]), "{recorded}");
}
