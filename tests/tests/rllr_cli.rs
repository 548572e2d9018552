//! RLLR end to end on a tiny seeded model and a synthetic sentiment task: `verdict-train
//! reward-model` learns to rank the gold label's answer above a wrong one, and PPO on that
//! learned reward (alone or mixed with the rule reward) raises the policy's accuracy.

use std::path::Path;
use tests::tiny::{setup, train_args, PPO_BATCH, PPO_SETTINGS};
use tests::{metrics_series as series, run, train_ok};

fn mean(xs: &[(u64, f64)]) -> f64 {
    xs.iter().map(|x| x.1).sum::<f64>() / xs.len() as f64
}

fn reward_model(model: &str, data: &str, out: &Path, extra: &[&str]) {
    let mut args = train_args("reward-model", model, data, out.to_str().unwrap(), "60");
    args.extend([
        "--batch-size",
        "32",
        "--rank",
        "32",
        "--alpha",
        "32",
        "--no-rslora",
        "--lora-dropout",
        "0",
        "--targets",
        "q,k,v,o,gate,up,down",
        "--lr",
        "5e-3",
        "--schedule",
        "constant",
        "--eval-every",
        "30",
        "--seed",
        "2",
    ]);
    args.extend(extra);
    train_ok(&args);
}

#[test]
fn a_reward_model_learns_label_sensitive_pairs_and_ppo_optimises_it() {
    let (dir, model, data) = setup("rllr");
    let rm = dir.0.join("rm");
    reward_model(&model, &data, &rm, &[]);
    let dev = series(&rm, "dev_score");
    assert_eq!(dev.iter().map(|d| d.0).collect::<Vec<_>>(), vec![30, 60]);
    assert!(dev[1].1 >= 0.9, "dev pairwise accuracy {dev:?}");
    let loss = series(&rm, "loss");
    assert!(mean(&loss[50..]) < 0.5 * mean(&loss[..5]), "pairwise loss did not fall: {loss:?}");
    let best = rm.join("best");
    assert!(best.join("score_head.safetensors").is_file());
    let manifest = tests::read_manifest(&best);
    assert_eq!(manifest["method"], "reward-model");

    // PPO on the learned reward alone: the rule accuracy of the rollouts rises.
    let ppo = |out: &Path, kind: &str| {
        let mut args = train_args("ppo", &model, &data, out.to_str().unwrap(), "20");
        args.extend([
            "--reward",
            kind,
            "--reward-model",
            best.to_str().unwrap(),
            "--kl-coef",
            "0.05",
            "--kl-controller",
            "fixed",
        ]);
        // PPO_SETTINGS adds `--ppo-epochs 4`, the default, to what this test ran before.
        args.extend(PPO_BATCH);
        args.extend(PPO_SETTINGS);
        train_ok(&args)
    };
    let learned = dir.0.join("ppo-learned");
    ppo(&learned, "learned");
    let acc = series(&learned, "accuracy");
    assert!(mean(&acc[15..]) > mean(&acc[..3]) + 0.25, "accuracy on the learned reward: {acc:?}");
    // The optimised reward is the learned one; the rule reward is logged beside it.
    assert_eq!(series(&learned, "reward"), series(&learned, "reward_learned"));
    assert_eq!(series(&learned, "reward_rule").len(), 20);

    // Mixed: min(learned, 3.9) + rule, step by step.
    let mixed = dir.0.join("ppo-mixed");
    ppo(&mixed, "mixed");
    let (r, l, rule) = (series(&mixed, "reward"), series(&mixed, "reward_learned"), series(&mixed, "reward_rule"));
    // Per-response capping happens before averaging; the learned scores here stay under the cap.
    for i in 0..r.len() {
        assert!(
            (r[i].1 - (l[i].1 + rule[i].1)).abs() < 1e-6,
            "step {}: {} vs {} + {}",
            r[i].0,
            r[i].1,
            l[i].1,
            rule[i].1
        );
    }
    let acc = series(&mixed, "accuracy");
    assert!(mean(&acc[15..]) > mean(&acc[..3]) + 0.25, "accuracy on the mixed reward: {acc:?}");

    // A learned reward without a reward model is refused.
    let o = run(
        "verdict-train",
        &[
            "ppo",
            "--model",
            &model,
            "--task",
            "mr",
            "--data",
            &data,
            "--out",
            dir.0.join("x").to_str().unwrap(),
            "--reward",
            "learned",
        ],
        &[],
    );
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--reward-model"));
}

#[test]
fn pairs_with_policy_written_analyses_train_too() {
    let (dir, model, data) = setup("rllr-rationale");
    let rm = dir.0.join("rm");
    reward_model(&model, &data, &rm, &["--rationale-tokens", "4", "--train-limit", "128", "--eval-limit", "32"]);
    let dev = series(&rm, "dev_score");
    assert!(dev.last().unwrap().1 >= 0.9, "dev pairwise accuracy with analyses {dev:?}");
}
