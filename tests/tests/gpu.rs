//! The binaries on a CUDA device against the same binaries on the CPU, on the tiny seeded
//! model and synthetic task: SFT, PPO, the reward model, evaluation and serving all run on the
//! GPU and agree with the CPU within stated tolerances. Built only with `--features cuda`
//! (`scripts/build_cuda.sh`) and run on the GPU machine (`scripts/gpu_check.sh`).
#![cfg(feature = "cuda")]

use serde_json::{json, Value};
use shared::registry::Registry;
use std::path::Path;
use tests::tiny::{setup, train_args, PPO_BATCH, PPO_SETTINGS, SFT_SETTINGS};
use tests::{http, metrics_series as series, train_ok, Server};

/// f32 on the GPU: different kernels and summation orders, the same math.
const F32_TOL: f64 = 1e-3;

fn sft(model: &str, data: &str, out: &Path, steps: &str, device: &[&str]) {
    let mut args = train_args("sft", model, data, out.to_str().unwrap(), steps);
    args.extend(SFT_SETTINGS);
    args.extend(device);
    train_ok(&args);
}

fn assert_series_close(got: &[(u64, f64)], want: &[(u64, f64)], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for ((s1, a), (s2, b)) in got.iter().zip(want) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() <= tol * b.abs().max(1.0), "{what} at step {s1}: gpu {a} vs cpu {b}");
    }
}

#[test]
fn sft_on_cuda_follows_the_cpu_run_and_learns() {
    let (dir, model, data) = setup("gpu-sft");
    let (cpu, gpu) = (dir.0.join("cpu"), dir.0.join("gpu"));
    sft(&model, &data, &cpu, "20", &["--device", "cpu"]);
    sft(&model, &data, &gpu, "20", &["--device", "cuda", "--dtype", "f32"]);
    // Twenty optimizer steps: the trajectories agree step by step.
    assert_series_close(&series(&gpu, "loss"), &series(&cpu, "loss"), F32_TOL, "sft loss");
    // bf16 weights (the GPU default) learn the task too.
    let bf16 = dir.0.join("bf16");
    sft(&model, &data, &bf16, "200", &["--device", "cuda", "--eval-every", "200"]);
    let dev = series(&bf16, "dev_score");
    assert!(dev.last().unwrap().1 >= 0.95, "bf16 dev accuracy {dev:?}");
}

#[test]
fn ppo_and_the_reward_model_run_on_cuda() {
    let (dir, model, data) = setup("gpu-ppo");
    let out = dir.0.join("ppo");
    let mut args = train_args("ppo", &model, &data, out.to_str().unwrap(), "20");
    args.extend(["--device", "cuda"]);
    args.extend(PPO_BATCH);
    args.extend(PPO_SETTINGS);
    train_ok(&args);
    let reward = series(&out, "reward");
    let mean = |xs: &[(u64, f64)]| xs.iter().map(|x| x.1).sum::<f64>() / xs.len() as f64;
    assert!(mean(&reward[15..]) > mean(&reward[..3]) + 0.8, "reward did not rise on cuda: {reward:?}");

    let rm = |device: &str, out: &Path| {
        let mut args = train_args("reward-model", &model, &data, out.to_str().unwrap(), "20");
        args.extend([
            "--device",
            device,
            "--dtype",
            "f32",
            "--rank",
            "32",
            "--alpha",
            "32",
            "--no-rslora",
            "--lr",
            "5e-3",
            "--batch-size",
            "32",
            "--lora-dropout",
            "0",
            "--eval-every",
            "20",
        ]);
        train_ok(&args);
    };
    let (cpu, gpu) = (dir.0.join("rm-cpu"), dir.0.join("rm-gpu"));
    rm("cpu", &cpu);
    rm("cuda", &gpu);
    assert_series_close(&series(&gpu, "loss"), &series(&cpu, "loss"), F32_TOL, "reward-model loss");
}

fn eval_report(model: &str, data: &str, adapter: &Path, out: &Path, device: &str) -> Value {
    let args = [
        "eval",
        "--model",
        model,
        "--task",
        "mr",
        "--data",
        data,
        "--split",
        "dev",
        "--adapter",
        adapter.to_str().unwrap(),
        "--device",
        device,
        "--dtype",
        "f32",
        "--predictions",
        "--resamples",
        "10",
        "--out",
        out.to_str().unwrap(),
    ];
    train_ok(&args);
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

/// `verdict-serve` on `device` (f32) over the registry.
fn serve(model: &str, registry: &Path, device: &str) -> Server {
    let registry = registry.to_str().unwrap();
    Server::start(&["--model", model, "--adapters", registry, "--device", device, "--dtype", "f32"])
}

#[test]
fn eval_and_serving_on_cuda_match_the_cpu() {
    let (dir, model, data) = setup("gpu-serve");
    let run = dir.0.join("run");
    sft(&model, &data, &run, "30", &["--device", "cpu"]);
    let adapter = run.join("adapter");

    let cpu = eval_report(&model, &data, &adapter, &dir.0.join("cpu.json"), "cpu");
    let gpu = eval_report(&model, &data, &adapter, &dir.0.join("gpu.json"), "cuda");
    let preds = |r: &Value| r["tasks"][0]["predictions"].as_array().unwrap().clone();
    let (pc, pg) = (preds(&cpu), preds(&gpu));
    assert_eq!(pc.len(), pg.len());
    for (c, g) in pc.iter().zip(&pg) {
        for (a, b) in c["probs"].as_array().unwrap().iter().zip(g["probs"].as_array().unwrap()) {
            assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < F32_TOL, "eval probs {c} vs {g}");
        }
    }

    let registry = dir.0.join("adapters");
    let reg = Registry::new(&registry);
    reg.publish("mr", "v1", |tmp| -> Result<(), Box<dyn std::error::Error>> {
        for f in std::fs::read_dir(&adapter)? {
            let f = f?;
            std::fs::copy(f.path(), tmp.join(f.file_name()))?;
        }
        Ok(())
    })
    .unwrap();
    reg.promote("mr", "v1").unwrap();
    let (s_cpu, s_gpu) = (serve(&model, &registry, "cpu"), serve(&model, &registry, "cuda"));
    let body = json!({"task": "mr", "inputs": ["a good film", "awful and dull", "the plot was fine"]}).to_string();
    let ask = |port: u16| -> Value {
        let (status, text) = http(port, "POST", "/v1/classify", Some(&body)).unwrap();
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    };
    let (vc, vg) = (ask(s_cpu.port), ask(s_gpu.port));
    for (c, g) in vc["results"].as_array().unwrap().iter().zip(vg["results"].as_array().unwrap()) {
        assert_eq!(c["label"], g["label"]);
        for (w, p) in c["probabilities"].as_object().unwrap() {
            let q = g["probabilities"][w].as_f64().unwrap();
            assert!((p.as_f64().unwrap() - q).abs() < F32_TOL, "served {w}: cpu {p} vs gpu {q}");
        }
    }
}
