//! `--config FILE.toml` on `verdict-train` and `verdict-serve`: the file's keys are flags, the
//! command line wins, unknown keys are refused naming the key and the file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::tiny::{setup, train_args, SFT_SETTINGS};
use tests::{binary, free_port, http, metrics_series, run, wait_for, TempDir};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `<out>/run.json`'s settings without `out` (the one that differs between the two runs).
fn settings(out: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    v["settings"].as_object_mut().unwrap().remove("out");
    v
}

/// SFT_SETTINGS and the rest of the tiny run, as a config file (keys both ways: `_` and `-`).
fn sft_toml(model: &str, data: &str, steps: u32) -> String {
    format!(
        "model = {model:?}\ntask = \"mr\"\ndata = {data:?}\nmax_steps = {steps}\nbatch_size = 16\nrank = 8\nalpha = 16\n\
         targets = [\"q\", \"k\", \"v\", \"o\", \"gate\", \"up\", \"down\"]\nlr = \"3e-3\"\nschedule = \"constant\"\n\
         seed = 3\nrslora = false\n\"save-every\" = 5\n"
    )
}

#[test]
fn a_config_file_and_the_same_flags_give_the_same_run() {
    let (dir, model, data) = setup("config-same");
    let flags = dir.0.join("flags");
    let mut args = train_args("sft", &model, &data, flags.to_str().unwrap(), "3");
    args.extend(SFT_SETTINGS);
    args.extend(["--no-rslora", "--save-every", "5"]);
    let o = run("verdict-train", &args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let file = dir.0.join("run.toml");
    std::fs::write(&file, sft_toml(&model, &data, 3)).unwrap();
    let cfg = dir.0.join("cfg");
    let o = run("verdict-train", &["sft", "--config", file.to_str().unwrap(), "--out", cfg.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    assert_eq!(settings(&flags), settings(&cfg));
    // `rslora = false` is `--no-rslora`, recorded as the setting `rslora`.
    assert_eq!(settings(&cfg)["settings"]["rslora"], serde_json::json!(["false"]));
    assert_eq!(adapter_config(&cfg)["use_rslora"], false);
    let bytes = |out: &Path| std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&flags), bytes(&cfg), "the two runs trained different adapters");
    assert_eq!(metrics_series(&flags, "loss"), metrics_series(&cfg, "loss"));
}

fn adapter_config(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap()
}

/// Every boolean setting is `--x` / `--no-x`, the last one given wins, and a config file's
/// `x = true` undoes nothing but what it names.
#[test]
fn booleans_are_x_and_no_x_and_the_last_one_wins() {
    let (dir, model, data) = setup("config-booleans");
    let rslora_of = |name: &str, extra: &[&str]| {
        let out = dir.0.join(name);
        let mut args = train_args("sft", &model, &data, out.to_str().unwrap(), "1");
        args.extend(extra);
        let o = run("verdict-train", &args, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        adapter_config(&out)["use_rslora"].as_bool().unwrap()
    };
    assert!(rslora_of("default", &[]), "rsLoRA is the default");
    assert!(!rslora_of("off", &["--no-rslora"]));
    assert!(rslora_of("on-again", &["--no-rslora", "--rslora"]));
    assert!(!rslora_of("off-again", &["--rslora", "--no-rslora"]));
    let file = dir.0.join("on.toml");
    std::fs::write(&file, "rslora = true\n").unwrap();
    assert!(rslora_of("file-on", &["--config", file.to_str().unwrap()]));
    // The old `--rslora false` form is refused (a usage error), not read as "on".
    let out = dir.0.join("old");
    let mut args = train_args("sft", &model, &data, out.to_str().unwrap(), "1");
    args.extend(["--rslora", "false"]);
    assert_eq!(run("verdict-train", &args, &[]).status.code(), Some(2));
}

#[test]
fn a_command_line_flag_overrides_the_file() {
    let (dir, model, data) = setup("config-override");
    let file = dir.0.join("run.toml");
    std::fs::write(&file, sft_toml(&model, &data, 3) + "log_every = 1\n").unwrap();
    let out = dir.0.join("run");
    let f = file.to_str().unwrap();
    let o = run("verdict-train", &["sft", "--out", out.to_str().unwrap(), "--max-steps", "2", "--config", f], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let steps: Vec<u64> = metrics_series(&out, "loss").iter().map(|s| s.0).collect();
    assert_eq!(steps, vec![1, 2], "the flag's 2 steps, not the file's 3");
    assert_eq!(settings(&out)["settings"]["max-steps"], serde_json::json!(["2"]));
}

#[test]
fn an_unknown_key_is_refused_naming_it_and_the_file() {
    let dir = TempDir::new("config-unknown");
    let file = dir.0.join("bad.toml");
    std::fs::write(&file, "batch_size = 8\nbatch_sise = 8\n").unwrap();
    let arg = format!("--config={}", file.display());
    let o = run("verdict-train", &["sft", &arg, "--out", dir.0.join("o").to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("unknown key `batch_sise`") && stderr(&o).contains("bad.toml"), "{}", stderr(&o));
    let o = run("verdict-serve", &["--config", file.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("unknown key `batch_sise`") && stderr(&o).contains("bad.toml"), "{}", stderr(&o));
}

#[test]
fn verdict_serve_reads_its_flags_from_a_config_file() {
    let dir = TempDir::new("config-serve");
    let model = dir.0.join("tiny");
    tests::tiny::tiny_model_dir(&model);
    std::fs::create_dir_all(dir.0.join("adapters")).unwrap();
    let port = free_port();
    let file = dir.0.join("serve.toml");
    std::fs::write(
        &file,
        format!(
            "model = {:?}\nadapters = {:?}\nport = {port}\nbatching = \"padded\"\nmax_batch_rows = 7\nmax_inputs = 9\n",
            model.to_str().unwrap(),
            dir.0.join("adapters").to_str().unwrap()
        ),
    )
    .unwrap();
    let mut child = Command::new(binary("verdict-serve"))
        .args(["--config", file.to_str().unwrap(), "--max-inputs", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = wait_for(port, "/ready", 200, Duration::from_secs(120));
    let info = http(port, "GET", "/info", None);
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(ready, Some((200, _))), "no server on the file's port {port}: {ready:?}");
    let (status, body) = info.unwrap();
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["max_batch_requests"], 7, "{info}");
    assert_eq!(info["max_client_batch_size"], 5, "the flag wins over the file: {info}");
}
