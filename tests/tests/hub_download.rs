//! `--model org/name[@revision]` end to end: the real binaries download a tiny checkpoint from a
//! loopback mock of the Hub's file API (tests::hub_mock) into the Hub's standard cache under a
//! temporary `HF_HOME`, and load it as they load the same directory given as a path.

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tests::hub_mock::{Commit, MockHub, MockRepo};
use tests::{binary, free_port, run, wait_for, Server, TempDir};

/// The environment of a run against `endpoint` with the cache in `home`.
fn hub_env<'a>(endpoint: &'a str, home: &'a Path) -> Vec<(&'a str, &'a str)> {
    vec![
        ("HF_ENDPOINT", endpoint),
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_TOKEN", ""),
        ("HF_HUB_OFFLINE", ""),
        // Loopback is never sent to a proxy the machine may have.
        ("NO_PROXY", "127.0.0.1,localhost"),
    ]
}

/// `verdict-train eval` of `model` on the first 16 dev examples: the output and the predicted
/// probabilities (none when it failed).
fn eval(model: &str, data: &str, out: &Path, envs: &[(&str, &str)]) -> (Output, Option<Vec<Value>>) {
    let _ = std::fs::remove_file(out);
    let args = [
        "eval",
        "--model",
        model,
        "--task",
        "mr",
        "--data",
        data,
        "--limit",
        "16",
        "--resamples",
        "10",
        "--predictions",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = run("verdict-train", &args, envs);
    let probs = std::fs::read_to_string(out).ok().map(|t| {
        let v: Value = serde_json::from_str(&t).unwrap();
        let probs: Vec<Value> =
            v["tasks"][0]["predictions"].as_array().unwrap().iter().map(|p| p["probs"].clone()).collect();
        assert!(probs.len() == 16 && probs.iter().all(|p| p.as_array().is_some_and(|a| a.len() == 2)), "{v}");
        probs
    });
    (o, probs)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `generate` with one new token: a cheap way to make a binary load `model`.
fn generate(model: &str, envs: &[(&str, &str)]) -> Output {
    run("verdict-train", &["generate", "--model", model, "--prompt", "good", "--max-new-tokens", "1"], envs)
}

/// The tiny model again with one more word: other weights (another vocabulary) for a second
/// revision.
fn other_model_dir(dir: &Path) {
    let words: Vec<&str> = ["Positive", "Negative", "<", ">", "</", "Judgement", "\"", ":", "Sentence", "extra"]
        .into_iter()
        .chain(tests::tiny::POSITIVE.iter().chain(&tests::tiny::NEGATIVE).chain(&tests::tiny::FILLER).copied())
        .collect();
    tests::tiny::model_dir_with_words(dir, &words);
}

/// A copy of `from` whose weights are split into two safetensors shards with an index.
fn sharded_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_name() != "model.safetensors" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let tensors = candle_core::safetensors::load(from.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, candle_core::Tensor> =
            part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&shard, to.join(&file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(to.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// `$HF_HOME/hub/models--org--name`.
fn repo_cache(home: &Path, repo: &str) -> PathBuf {
    home.join("hub").join(format!("models--{}", repo.replace('/', "--")))
}

/// Download, cache layout, same predictions as the local directory, the revision pin, offline
/// from the cache, and the network failure once the mock is gone.
#[test]
fn hub_model_downloads_into_the_hub_cache_and_loads_like_its_directory() {
    let (dir, model, data) = tests::tiny::setup("hub-main");
    let v2_dir = dir.0.join("tiny-v2");
    other_model_dir(&v2_dir);
    let (main, v2) = (Commit::from_dir(Path::new(&model), 1), Commit::from_dir(&v2_dir, 2));
    let hub = MockHub::start(vec![MockRepo {
        id: "org/tiny".into(),
        refs: vec![("main".into(), main.clone()), ("v2".into(), v2.clone())],
        token: None,
        lfs_redirect: false,
    }]);
    let home = dir.0.join("hf-home");
    let endpoint = hub.endpoint();
    let envs = hub_env(&endpoint, &home);
    let out = dir.0.join("r.json");

    let (o, local) = eval(&model, &data, &out, &[]);
    let local = local.unwrap_or_else(|| panic!("{}", stderr(&o)));
    let (o, from_hub) = eval("org/tiny", &data, &out, &envs);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(from_hub.unwrap(), local, "the Hub copy predicts as the directory does");
    let log = stderr(&o);
    assert!(log.contains("downloading model.safetensors of org/tiny@main ("), "a line per file with its size: {log}");

    // The standard layout: refs/main names the commit, its snapshot links into blobs/.
    let cached = repo_cache(&home, "org/tiny");
    assert_eq!(std::fs::read_to_string(cached.join("refs/main")).unwrap().trim(), main.sha);
    let snapshot = cached.join("snapshots").join(&main.sha);
    for file in main.files.keys() {
        let p = snapshot.join(file);
        assert!(p.symlink_metadata().unwrap().file_type().is_symlink(), "{} links into blobs/", p.display());
        assert_eq!(std::fs::read(&p).unwrap(), main.files[file], "{file}");
    }
    // Beside each blob hf-hub leaves its `.lock`.
    let blobs = std::fs::read_dir(cached.join("blobs")).unwrap().flatten();
    assert!(blobs.filter(|e| e.path().extension().is_none()).count() >= 4, "the files are blobs");
    assert!(log.contains(&format!("loaded {}", snapshot.display())), "loads from the snapshot: {log}");

    // The revision pin: v2 is the other model, in its own snapshot.
    let (o, local_v2) = eval(v2_dir.to_str().unwrap(), &data, &out, &[]);
    let local_v2 = local_v2.unwrap_or_else(|| panic!("{}", stderr(&o)));
    assert_ne!(local_v2, local, "the two revisions must predict differently for the pin to show");
    let (o, hub_v2) = eval("org/tiny@v2", &data, &out, &envs);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(hub_v2.unwrap(), local_v2);
    assert_eq!(std::fs::read_to_string(cached.join("refs/v2")).unwrap().trim(), v2.sha);
    assert!(cached.join("snapshots").join(&v2.sha).join("model.safetensors").is_file());
    // A commit named directly.
    let (o, by_commit) = eval(&format!("org/tiny@{}", v2.sha), &data, &out, &envs);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(by_commit.unwrap(), local_v2);

    // The mock gone: offline still loads from the cache, online names the network failure.
    let requests = hub.seen().len();
    drop(hub);
    let mut offline = envs.clone();
    offline[3] = ("HF_HUB_OFFLINE", "1");
    let (o, cached_main) = eval("org/tiny", &data, &out, &offline);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(cached_main.unwrap(), local);
    let (o, cached_v2) = eval("org/tiny@v2", &data, &out, &offline);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(cached_v2.unwrap(), local_v2);
    let o = generate("org/tiny", &envs);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("network failure") && err.contains(&endpoint), "names the endpoint and the network: {err}");
    assert!(requests > 0);
}

/// A checkpoint sharded in two with an index: the index and both shards (redirected to a
/// content server, as the Hub does for LFS files) are downloaded, the model predicts as the
/// unsharded directory does, and training loads it too.
#[test]
fn sharded_hub_checkpoint_downloads_every_shard() {
    let (dir, model, data) = tests::tiny::setup("hub-sharded");
    let sharded = dir.0.join("sharded");
    sharded_copy(Path::new(&model), &sharded);
    let commit = Commit::from_dir(&sharded, 3);
    assert!(!commit.files.contains_key("model.safetensors"));
    let hub = MockHub::start(vec![MockRepo {
        id: "org/sharded".into(),
        refs: vec![("main".into(), commit.clone())],
        token: None,
        // The shards come as the Hub sends large files: redirected to a content server.
        lfs_redirect: true,
    }]);
    let home = dir.0.join("hf-home");
    let endpoint = hub.endpoint();
    let out = dir.0.join("r.json");
    let (o, local) = eval(&model, &data, &out, &[]);
    let local = local.unwrap_or_else(|| panic!("{}", stderr(&o)));
    let (o, from_hub) = eval("org/sharded", &data, &out, &hub_env(&endpoint, &home));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(from_hub.unwrap(), local);
    let snapshot = repo_cache(&home, "org/sharded").join("snapshots").join(&commit.sha);
    for shard in
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    {
        assert!(snapshot.join(shard).is_file(), "{shard}");
        assert!(hub.seen().iter().any(|s| s.path.ends_with(shard)), "{shard} was requested");
    }
    let from_cdn =
        hub.seen().iter().filter(|s| s.path.starts_with("/cdn/") && s.range.as_deref() == Some("bytes=0-")).count();
    assert_eq!(from_cdn, 2, "each shard's body came from the content server the redirect named");
    // The blobs are named by the LFS hash (X-Linked-Etag), not the pointer's ETag.
    let blobs = repo_cache(&home, "org/sharded").join("blobs");
    assert!(std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().starts_with("pointer-")));
    // Training from the Hub id: two SFT steps load the same snapshot.
    let run_dir = dir.0.join("run");
    let args = tests::tiny::train_args("sft", "org/sharded", &data, run_dir.to_str().unwrap(), "2");
    let o = run("verdict-train", &args, &hub_env(&endpoint, &home));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("loaded {}", snapshot.display())), "{}", stderr(&o));
}

/// A gated repository: refused without a token (the error says to set HF_TOKEN), refused with
/// a wrong one, loaded with the right one, which is sent as a bearer token.
#[test]
fn gated_hub_repo_needs_hf_token() {
    let dir = TempDir::new("hub-gated");
    let model = dir.0.join("tiny");
    tests::tiny::tiny_model_dir(&model);
    let hub = MockHub::start(vec![MockRepo {
        id: "org/gated".into(),
        refs: vec![("main".into(), Commit::from_dir(&model, 4))],
        token: Some("hf_secret".into()),
        lfs_redirect: false,
    }]);
    let home = dir.0.join("hf-home");
    let endpoint = hub.endpoint();
    let mut envs = hub_env(&endpoint, &home);
    let o = generate("org/gated", &envs);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("org/gated") && err.contains("401") && err.contains("HF_TOKEN"),
        "{err}"
    );
    envs[2] = ("HF_TOKEN", "hf_wrong");
    let o = generate("org/gated", &envs);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("token") && err.contains("refused"), "{err}");
    envs[2] = ("HF_TOKEN", "hf_secret");
    let exported = dir.0.join("exported");
    let o = run("verdict-train", &["export-hf", "--model", "org/gated", "--out", exported.to_str().unwrap()], &envs);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(exported.join("model.safetensors").is_file());
    let seen = hub.seen();
    assert!(seen
        .iter()
        .any(|s| s.path.ends_with("/model.safetensors") && s.authorization.as_deref() == Some("Bearer hf_secret")));
    assert!(repo_cache(&home, "org/gated").join("refs/main").is_file());
}

/// The errors name what is missing: a file the repository lacks (repo, revision, file), an
/// unknown revision, and offline with an empty cache (the file, and no request made).
#[test]
fn hub_errors_name_the_missing_file_revision_or_cache() {
    let dir = TempDir::new("hub-errors");
    let model = dir.0.join("tiny");
    tests::tiny::tiny_model_dir(&model);
    let mut no_tokenizer = Commit::from_dir(&model, 5);
    no_tokenizer.files.remove("tokenizer.json");
    let hub = MockHub::start(vec![
        MockRepo {
            id: "org/tiny".into(),
            refs: vec![("main".into(), Commit::from_dir(&model, 6))],
            token: None,
            lfs_redirect: false,
        },
        MockRepo {
            id: "org/notok".into(),
            refs: vec![("main".into(), no_tokenizer)],
            token: None,
            lfs_redirect: false,
        },
    ]);
    let home = dir.0.join("hf-home");
    let endpoint = hub.endpoint();
    let envs = hub_env(&endpoint, &home);

    let o = generate("org/notok", &envs);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("org/notok@main has no tokenizer.json"), "{err}");
    assert!(hub.seen().iter().any(|s| s.path.ends_with("/tokenizer.json")), "the 404 came from the mock");

    let o = generate("org/tiny@nope", &envs);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("revision \"nope\" of org/tiny not found"), "{err}");

    let before = hub.seen().len();
    let mut offline = envs.clone();
    offline[3] = ("HF_HUB_OFFLINE", "1");
    let o = generate("org/tiny", &offline);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("HF_HUB_OFFLINE") && err.contains("config.json of org/tiny@main"),
        "{err}"
    );
    assert_eq!(hub.seen().len(), before, "offline makes no request");
}

/// `verdict-serve --model org/name` downloads, comes up, and classifies as a server on the
/// local directory does.
#[test]
fn serve_loads_a_hub_model() {
    let dir = TempDir::new("hub-serve");
    let model = dir.0.join("tiny");
    tests::tiny::tiny_model_dir(&model);
    let adapters = dir.0.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    let hub = MockHub::start(vec![MockRepo {
        id: "org/tiny".into(),
        refs: vec![("main".into(), Commit::from_dir(&model, 7))],
        token: None,
        lfs_redirect: false,
    }]);
    let home = dir.0.join("hf-home");
    let endpoint = hub.endpoint();
    let start = |name: &str, envs: &[(&str, &str)]| -> Server {
        let port = free_port();
        let mut cmd = Command::new(binary("verdict-serve"));
        cmd.args([
            "--port",
            &port.to_string(),
            "--model",
            name,
            "--weights",
            "dense",
            "--zero-shot-fallback",
            "--adapters",
        ])
        .arg(&adapters)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let server = Server { child: cmd.spawn().unwrap(), port };
        let r = wait_for(port, "/ready", 200, Duration::from_secs(120));
        assert!(matches!(&r, Some((200, _))), "{name}: not ready: {r:?}");
        server
    };
    let body = serde_json::json!({"task": "mr", "inputs": ["good movie", "the plot was awful"]});
    let from_hub = start("org/tiny", &hub_env(&endpoint, &home));
    let (status, hub_answer) = from_hub.post("/v1/classify", &body);
    assert_eq!(status, 200, "{hub_answer}");
    drop(from_hub);
    let local = start(model.to_str().unwrap(), &[]);
    let (status, local_answer) = local.post("/v1/classify", &body);
    assert_eq!(status, 200, "{local_answer}");
    assert_eq!(hub_answer["results"], local_answer["results"]);
    assert!(repo_cache(&home, "org/tiny").join("refs/main").is_file());
}
