//! The kernel options through the binary: `--kernel-plan measure` measures the model's shapes
//! and caches the plan per CPU, `auto` then reads it without measuring, `--cpu-isa` limits the
//! instruction sets the log names, and a bad plan file is refused with a reason.

use tests::run;
use tests::tiny::setup;

fn show(model: &str, data: &str, cache: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["tasks", "--show", "mr", "--model", model, "--data", data, "--cache-dir", cache];
    args.extend_from_slice(extra);
    // The test command fixes VERDICT_KERNEL_PLAN=defaults for every other test: not here.
    let o = run("verdict-train", &args, &[("VERDICT_KERNEL_PLAN", "auto")]);
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn the_plan_is_measured_once_cached_per_cpu_and_overridable() {
    if !std::arch::is_x86_feature_detected!("avx2") || !std::arch::is_x86_feature_detected!("fma") {
        eprintln!("no AVX2/FMA: the portable path has no plan");
        return;
    }
    let (dir, model, data) = setup("kernels-cli");
    let cache = dir.0.join("cache").display().to_string();
    let (ok, log) = show(&model, &data, &cache, &["--kernel-plan", "measure", "--cpu-isa", "avx2"]);
    assert!(ok, "{log}");
    assert!(log.contains("kernels: measuring tile shapes"), "{log}");
    let line = log.lines().find(|l| l.starts_with("kernels: f32 products on")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("[avx2]"), "--cpu-isa avx2 keeps AVX-512 out: {line}");
    let plans: Vec<_> =
        std::fs::read_dir(dir.0.join("cache").join("kernels")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(plans.len(), 1, "{plans:?}");
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(&plans[0]).unwrap()).unwrap();
    let measured = plan["choices"].as_object().map_or(0, |m| m.len());
    assert!(measured > 0, "{plan}");

    // auto: read back, nothing measured.
    let (ok, log) = show(&model, &data, &cache, &["--cpu-isa", "avx2"]);
    assert!(ok, "{log}");
    assert!(!log.contains("measuring"), "{log}");
    assert!(log.contains(&format!("{measured} measured shape(s)")), "{log}");

    // defaults: no measurement, no file read.
    let (ok, log) = show(&model, &data, &cache, &["--kernel-plan", "defaults", "--cpu-isa", "avx2"]);
    assert!(ok, "{log}");
    assert!(log.contains("0 measured shape(s)"), "{log}");

    // A plan file that is not one is refused, naming it.
    let bad = dir.0.join("bad-plan.json");
    std::fs::write(&bad, "{not json").unwrap();
    let (ok, log) = show(&model, &data, &cache, &["--kernel-plan", bad.to_str().unwrap()]);
    assert!(!ok, "{log}");
    assert!(log.contains("bad-plan.json") && log.contains("not a kernel plan"), "{log}");
}
