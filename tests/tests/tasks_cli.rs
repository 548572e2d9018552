//! `verdict-train tasks --show`: the prompt it prints (cached prefix, body, answers, ids) is what
//! the evaluator (`eval --show-prompts`) and the server compute on, for the real SmolLM2 and its
//! chat template.

use candle_core::{DType, Device};
use models::scoring::{normalize, score_candidates};
use models::WeightMode;
use serde_json::json;
use shared::task::{AnswerScoring, TaskRegistry};
use tests::{run, Server, TempDir};

const SENTENCES: [(&str, &str); 3] = [
    ("a gorgeous , witty , seductive movie .", "positive"),
    ("the plot is nothing but boilerplate clichés from start to finish .", "negative"),
    ("it's a charming and often affecting journey .", "positive"),
];

fn ids_after(text: &str, key: &str) -> Vec<u32> {
    let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no `{key}` line in:\n{text}"));
    serde_json::from_str(line[key.len()..].trim()).unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// The text between a `===== <title>...` marker line and the next marker.
fn section<'a>(text: &'a str, title: &str) -> &'a str {
    let start = text.find(&format!("===== {title}")).unwrap_or_else(|| panic!("no {title} in:\n{text}"));
    let body = &text[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    &body[..body.find("\n=====").unwrap()]
}

#[test]
fn the_shown_prompt_is_what_the_evaluator_and_the_server_compute_on() {
    let dir = TempDir::new("tasks-show");
    let data = dir.0.join("mr");
    std::fs::create_dir_all(&data).unwrap();
    let rows: String = SENTENCES
        .iter()
        .enumerate()
        .map(|(i, (s, l))| format!("{}\n", json!({"id": format!("d{i}"), "sentence": s, "label": l})))
        .collect();
    for split in ["train", "dev", "test"] {
        std::fs::write(data.join(format!("{split}.jsonl")), &rows).unwrap();
    }
    let data = data.display().to_string();

    let shown = run("verdict-train", &["tasks", "--show", "mr", "--model", "smollm2", "--data", &data], &[]);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let shown = String::from_utf8(shown.stdout).unwrap();
    let (prefix, body) = (ids_after(&shown, "prefix "), ids_after(&shown, "body "));
    assert!(shown.contains("the model's chat template"), "{shown}");
    // The marked parts: the constant prefix ends where the input starts; the body holds it.
    let prefix_text = section(&shown, "cached prefix");
    let body_text = section(&shown, "body");
    assert!(prefix_text.contains("<|im_start|>system") && !prefix_text.contains(SENTENCES[0].0), "{shown}");
    assert!(body_text.starts_with(SENTENCES[0].0), "{shown}");
    assert!(body_text.contains("<|im_start|>assistant"), "the answer tag follows the input: {shown}");
    assert!(shown.contains(&format!("===== cached prefix: {} tokens", prefix.len())), "{shown}");
    assert!(shown.contains(&format!("===== body: {} tokens", body.len())), "{shown}");

    // The evaluator: the same ids for the same example.
    let ev = run(
        "verdict-train",
        &[
            "eval",
            "--model",
            "smollm2",
            "--task",
            "mr",
            "--data",
            &data,
            "--split",
            "dev",
            "--limit",
            "1",
            "--show-prompts",
            "1",
        ],
        &[],
    );
    assert!(ev.status.success(), "{}", String::from_utf8_lossy(&ev.stderr));
    let ev = String::from_utf8(ev.stderr).unwrap();
    assert_eq!(ids_after(&ev, "prefix ids "), prefix, "{ev}");
    assert_eq!(ids_after(&ev, "body ids "), body, "{ev}");
    let ev_answers: Vec<String> = ev.lines().filter(|l| l.starts_with("answer ")).map(str::to_string).collect();

    // The server: its probabilities are those of exactly these ids (f32 products; another body,
    // one token shorter, gives other probabilities, so the comparison can tell).
    let cache = shared::assets::cache_dir();
    let path = shared::assets::resolve_model("smollm2", &cache).unwrap();
    let loaded = models::load_model(&path, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let registry = TaskRegistry::builtin();
    let task = registry.get("mr").unwrap();
    let answers: Vec<Vec<u32>> =
        task.scored_texts(AnswerScoring::Full).iter().map(|a| loaded.encode(a, false).unwrap()).collect();
    for (word, ids) in task.label_words().iter().zip(&answers) {
        assert!(shown.contains(&format!("= {} token(s) {ids:?}", ids.len())), "{word}: {shown}");
        let line = format!("answer {word}: {} token(s) {ids:?} (full)", ids.len());
        assert!(ev_answers.contains(&line), "{line} not in {ev_answers:?}");
    }
    let pad = loaded.special.pad_id();
    let probs_of = |ids: Vec<u32>| -> Vec<f64> {
        normalize(&score_candidates(&loaded.model, None, None, &[ids], &answers, pad).unwrap().remove(0))
    };
    let want = probs_of([prefix.clone(), body.clone()].concat());
    let mut shorter = body.clone();
    shorter.remove(body.len() / 2);
    let other = probs_of([prefix.clone(), shorter].concat());
    let registry_dir = dir.0.join("adapters");
    std::fs::create_dir_all(&registry_dir).unwrap();
    let server = Server::start(&[
        "--model",
        "smollm2",
        "--cpu-matmul",
        "f32",
        "--adapters",
        registry_dir.to_str().unwrap(),
        "--zero-shot-fallback",
    ]);
    let (status, v) = server.post("/v1/classify", &json!({"task": "mr", "inputs": [SENTENCES[0].0]}));
    assert_eq!(status, 200, "{v}");
    let got: Vec<f64> = task
        .label_words()
        .iter()
        .map(|w| v["results"][0]["probabilities"][w].as_f64().unwrap_or_else(|| panic!("{w}: {v}")))
        .collect::<Vec<_>>();
    let apart = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(apart(&got, &want) < 1e-3, "server {got:?}, the shown ids give {want:?}");
    assert!(apart(&other, &want) > 1e-3, "a different body gives {other:?}: the check cannot tell: {want:?}");
}

/// A user task in TOML, named `name`.
fn user_task(name: &str) -> String {
    format!(
        "name = \"{name}\"\ndescription = \"English or French.\"\nfields = [\"text\"]\n\
         instruction = \"Sentence: {{text}}\\nWhich language is it?\"\nlabels = [\"English\", \"French\"]\nmetrics = [\"accuracy\"]\n"
    )
}

/// `verdict-train` reads the model and the task files from the variables `verdict-serve` reads,
/// with the same meaning: the flag wins over the variable, and task files split on commas.
#[test]
fn verdict_train_takes_the_model_and_task_files_from_the_servers_variables() {
    let (dir, model, data) = tests::tiny::setup("tasks-env");
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let o = run("verdict-train", &["tasks", "--show", "mr", "--data", &data], &[("VERDICT_MODEL", &model)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("loaded {model} ")), "VERDICT_MODEL ignored: {}", stderr(&o));
    let o = run(
        "verdict-train",
        &["tasks", "--show", "mr", "--data", &data, "--model", &model],
        &[("VERDICT_MODEL", "/nonexistent/model")],
    );
    assert!(o.status.success() && stderr(&o).contains(&format!("loaded {model} ")), "{}", stderr(&o));
    let o =
        run("verdict-train", &["tasks", "--show", "mr", "--data", &data], &[("VERDICT_MODEL", "/nonexistent/model")]);
    assert!(!o.status.success() && stderr(&o).contains("/nonexistent/model"), "{}", stderr(&o));

    let (a, b) = (dir.0.join("a.toml"), dir.0.join("b.toml"));
    std::fs::write(&a, user_task("lang-a")).unwrap();
    std::fs::write(&b, user_task("lang-b")).unwrap();
    let both = format!("{},{}", a.display(), b.display());
    for (args, envs) in
        [(vec!["tasks"], vec![("VERDICT_TASK_FILES", both.as_str())]), (vec!["tasks", "--task-file", &both], vec![])]
    {
        let o = run("verdict-train", &args, &envs);
        let table = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(table.contains("| lang-a |") && table.contains("| lang-b |"), "{args:?}:\n{table}");
    }
}

/// A model directory whose `tokenizer_config.json` carries Llama 3.1's real chat template (and
/// BOS, which that template prints): `tasks --show` lays the task out in it, with BOS once,
/// and says which layout it used; the same model without a template says "plain layout".
#[test]
fn a_model_with_llama_3_s_template_gets_its_prompts_in_that_template() {
    let dir = TempDir::new("tasks-llama-template");
    let markers = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"];
    let plain = dir.0.join("plain");
    let words: Vec<&str> = markers.iter().copied().chain(["Sentence", ":", "\"", "good", "movie"]).collect();
    tests::tiny::model_dir_with_words(&plain, &words);
    let mut loaded = models::load_model(&plain, WeightMode::Dense, DType::F32, &Device::Cpu).unwrap();
    let specials: Vec<tokenizers::AddedToken> =
        markers.iter().map(|m| tokenizers::AddedToken::from(m.to_string(), true)).collect();
    let _ = loaded.tokenizer.add_special_tokens(specials);
    loaded.special.bos = loaded.tokenizer.token_to_id(markers[0]);
    loaded.special.add_bos = true;
    let source = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/chat_templates/llama3.1.jinja"),
    )
    .unwrap();
    let tokens = shared::chat::ChatTokens { bos: Some(markers[0].into()), eos: Some("<|eot_id|>".into()) };
    loaded.chat = Some(shared::chat::ChatTemplate::from_jinja(&source, tokens).unwrap());
    let llama = dir.0.join("llama");
    models::hf::save_dir(&loaded, &llama).unwrap();
    let data = dir.0.join("mr");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("dev.jsonl"), "{\"id\": \"d0\", \"sentence\": \"good movie\", \"label\": \"positive\"}\n")
        .unwrap();
    let show = |model: &std::path::Path| {
        let out = run(
            "verdict-train",
            &["tasks", "--show", "mr", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()],
            &[],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let shown = show(&llama);
    assert!(shown.lines().next().unwrap().contains("(the model's chat template)"), "{shown}");
    let prefix = section(&shown, "cached prefix");
    assert!(
        prefix.starts_with(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are an assistant"
        ),
        "{shown}"
    );
    assert!(prefix.contains("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"), "{shown}");
    let body = section(&shown, "body");
    assert!(body.ends_with("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<Judgement>"), "{shown}");
    // The template prints BOS; the tokenizer wants BOS too: it is there once.
    let bos = loaded.special.bos.unwrap();
    let ids = ids_after(&shown, "prefix ");
    assert_eq!(ids[0], bos, "{shown}");
    assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 1, "{shown}");

    let shown = show(&plain);
    assert!(shown.lines().next().unwrap().contains("(a plain layout (the model has no chat template))"), "{shown}");
}
