//! `verdict-train eval` end to end on the real SmolLM2, on small files in each supported
//! layout: the report must be internally consistent (probabilities, argmax, metric values
//! recomputed from the per-example predictions, confidence intervals around them).

use serde_json::Value;
use std::path::Path;
use tests::{run, TempDir};

fn eval(args: &[&str], out: &Path) -> Value {
    let mut all =
        vec!["eval", "--model", "smollm2", "--resamples", "200", "--predictions", "--out", out.to_str().unwrap()];
    all.extend_from_slice(args);
    let o = run("verdict-train", &all, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

/// Checks one task report and returns its accuracy recomputed from the predictions.
fn check_report(task: &Value, n: usize, n_classes: usize) -> f64 {
    assert_eq!(task["examples"], n);
    let preds = task["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), n);
    let mut correct = 0;
    for p in preds {
        let gold = p["gold"]["class"].as_u64().unwrap();
        if let Some(probs) = p["probs"].as_array() {
            let probs: Vec<f64> = probs.iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(probs.len(), n_classes);
            assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            let argmax = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u64;
            assert_eq!(p["predicted"]["class"].as_u64().unwrap(), argmax);
        }
        correct += usize::from(p["predicted"]["class"].as_u64() == Some(gold));
    }
    let acc = correct as f64 / n as f64;
    let metric = task["score"]["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == "accuracy");
    if let Some(m) = metric {
        assert!((m["value"].as_f64().unwrap() - acc).abs() < 1e-12, "reported {} vs recomputed {acc}", m["value"]);
        assert!(m["ci_low"].as_f64().unwrap() <= acc && acc <= m["ci_high"].as_f64().unwrap());
    }
    acc
}

#[test]
fn eval_reads_glue_tsv_and_reports_consistently() {
    let dir = TempDir::new("eval-glue");
    let rows = [
        ("a gorgeous , witty , seductive movie .", 1),
        ("the plot is nothing but boilerplate clichés .", 0),
        ("an utterly charming and hilarious film .", 1),
        ("a dull , lifeless waste of time .", 0),
        ("one of the best films of the year .", 1),
        ("painfully boring and badly acted .", 0),
    ];
    let mut tsv = String::from("sentence\tlabel\n");
    for (s, l) in rows {
        tsv.push_str(&format!("{s}\t{l}\n"));
    }
    std::fs::write(dir.0.join("dev.tsv"), &tsv).unwrap();
    let report = eval(&["--task", "sst2", "--data", dir.0.to_str().unwrap(), "--split", "dev"], &dir.0.join("r.json"));
    check_report(&report["tasks"][0], rows.len(), 2);
    assert_eq!(report["tasks"][0]["answer_scoring"], "full");
    // The label words alone: their own probabilities (the base model is unsure of the closing
    // tag, so they differ from the full answers'), reported consistently.
    let data = ["--task", "sst2", "--data", dir.0.to_str().unwrap(), "--split", "dev"];
    let words = eval(&[&data[..], &["--answer-scoring", "word"]].concat(), &dir.0.join("w.json"));
    check_report(&words["tasks"][0], rows.len(), 2);
    assert_eq!(words["tasks"][0]["answer_scoring"], "word");
    let p0 = |r: &Value, i: usize| r["tasks"][0]["predictions"][i]["probs"][0].as_f64().unwrap();
    let apart = (0..rows.len()).map(|i| (p0(&report, i) - p0(&words, i)).abs()).fold(0f64, f64::max);
    assert!(apart > 1e-3, "word scoring gave the full answers' probabilities ({apart})");
    // Generation mode: unparseable answers are counted and count as wrong.
    let report = eval(
        &[
            "--task",
            "sst2",
            "--data",
            dir.0.to_str().unwrap(),
            "--split",
            "dev",
            "--mode",
            "generate",
            "--max-new-tokens",
            "6",
        ],
        &dir.0.join("g.json"),
    );
    let task = &report["tasks"][0];
    let nulls = task["predictions"].as_array().unwrap().iter().filter(|p| p["predicted"].is_null()).count();
    assert_eq!(task["unparseable"], nulls);
    assert!(task["predictions"][0]["generated"].is_string());
    check_report(task, rows.len(), 2);
}

#[test]
fn eval_reads_superglue_jsonl_with_shots() {
    let dir = TempDir::new("eval-sg");
    let line = |i: usize, q: &str, p: &str, l: bool| {
        format!("{{\"question\": \"{q}\", \"passage\": \"{p}\", \"idx\": {i}, \"label\": {l}}}\n")
    };
    let mut val = String::new();
    val.push_str(&line(0, "is paris the capital of france", "Paris is the capital and largest city of France.", true));
    val.push_str(&line(1, "is the sun a planet", "The Sun is the star at the center of the Solar System.", false));
    val.push_str(&line(
        2,
        "do penguins live in the arctic",
        "Penguins live almost exclusively in the Southern Hemisphere.",
        false,
    ));
    std::fs::write(dir.0.join("val.jsonl"), &val).unwrap();
    std::fs::write(dir.0.join("train.jsonl"), &val).unwrap();
    let report = eval(
        &["--task", "boolq", "--data", dir.0.to_str().unwrap(), "--split", "dev", "--shots", "2"],
        &dir.0.join("r.json"),
    );
    assert_eq!(report["tasks"][0]["shots"], 2);
    check_report(&report["tasks"][0], 3, 2);
}

#[test]
fn eval_runs_a_user_task_from_toml_on_csv() {
    let dir = TempDir::new("eval-user");
    let toml = r#"
        name = "lang"
        description = "Decide whether a sentence is written in English or in French."
        fields = ["text"]
        instruction = "Sentence: {text}\nWhich language is it?"
        labels = ["English", "French"]
        raw_labels = [["en"], ["fr"]]
        metrics = ["accuracy", "macro_f1"]
        [columns]
        text = "phrase"
        label = "lang"
    "#;
    std::fs::write(dir.0.join("lang.toml"), toml).unwrap();
    // No --split: the dev split is the default.
    std::fs::write(dir.0.join("dev.csv"), "phrase,lang\n\"Where is the station, please?\",en\nOù est la gare s'il vous plaît ?,fr\nI like cheese.,en\nJ'aime le fromage.,fr\n").unwrap();
    let report = eval(
        &[
            "--task",
            "lang",
            "--task-file",
            dir.0.join("lang.toml").to_str().unwrap(),
            "--data",
            dir.0.to_str().unwrap(),
        ],
        &dir.0.join("r.json"),
    );
    let task = &report["tasks"][0];
    check_report(task, 4, 2);
    let names: Vec<&str> =
        task["score"]["metrics"].as_array().unwrap().iter().map(|m| m["metric"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["accuracy", "macro_f1"]);
}

#[test]
fn eval_refuses_bad_input_with_a_reason() {
    let dir = TempDir::new("eval-bad");
    std::fs::write(dir.0.join("dev.tsv"), "sentence\tlabel\nfine film\t1\nbroken row without label\n").unwrap();
    let o = run("verdict-train", &["eval", "--task", "sst2", "--data", dir.0.to_str().unwrap(), "--split", "dev"], &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dev.tsv") && err.contains(":3"), "{err}");
    let o = run("verdict-train", &["eval", "--task", "sst5", "--data", dir.0.to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown task \"sst5\""));
    let o = run("verdict-train", &["tasks"], &[]);
    let listing = String::from_utf8_lossy(&o.stdout);
    for t in ["cola", "mnli-mm", "ax", "record", "axg", "mr-score", "tweets3"] {
        assert!(listing.contains(&format!("| {t} |")), "{t} missing from {listing}");
    }
}

/// ReCoRD: the prediction per query is the candidate judged most likely "Yes"; EM recomputed from
/// the per-candidate probabilities must match the report. MultiRC: EM counts whole questions.
#[test]
fn eval_groups_record_queries_and_multirc_questions() {
    let dir = TempDir::new("eval-groups");
    // Passage "Paris is in France. Berlin is in Germany." with 4 entities (character offsets).
    let passage = "Paris is in France. Berlin is in Germany.";
    let span = |e: &str| {
        let s = passage.find(e).unwrap();
        format!("{{\"start\": {s}, \"end\": {}}}", s + e.len() - 1)
    };
    let entities = ["Paris", "France", "Berlin", "Germany"];
    let ents: Vec<String> = entities.iter().map(|e| span(e)).collect();
    let record = format!(
        "{{\"idx\": 0, \"passage\": {{\"text\": \"{passage}\", \"entities\": [{}]}}, \"qas\": [\
         {{\"query\": \"@placeholder is the capital of Germany.\", \"idx\": 10, \"answers\": [{{\"start\": 20, \"end\": 25, \"text\": \"Berlin\"}}]}}, \
         {{\"query\": \"Paris is a city in @placeholder.\", \"idx\": 11, \"answers\": [{{\"start\": 12, \"end\": 17, \"text\": \"France\"}}]}}]}}\n",
        ents.join(", ")
    );
    std::fs::write(dir.0.join("val.jsonl"), &record).unwrap();
    let report =
        eval(&["--task", "record", "--data", dir.0.to_str().unwrap(), "--split", "dev"], &dir.0.join("r.json"));
    let task = &report["tasks"][0];
    assert_eq!(task["examples"], 8, "2 queries x 4 candidates");
    let preds = task["predictions"].as_array().unwrap();
    let gold = [("10", "Berlin"), ("11", "France")];
    let mut em = 0.0;
    for (query, answer) in gold {
        let best = preds
            .iter()
            .filter(|p| p["id"].as_str().unwrap().starts_with(&format!("{query}-")))
            .max_by(|a, b| a["probs"][1].as_f64().unwrap().total_cmp(&b["probs"][1].as_f64().unwrap()))
            .unwrap();
        let k: usize = best["id"].as_str().unwrap().rsplit('-').next().unwrap().parse().unwrap();
        em += f64::from(u8::from(entities[k] == answer)) / 2.0;
    }
    let reported = task["score"]["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == "record_em").unwrap();
    assert_eq!(reported["value"].as_f64().unwrap(), em);

    let multirc = "{\"idx\": 0, \"passage\": {\"text\": \"Tom has two cats and a dog.\", \"questions\": [\
        {\"question\": \"How many cats does Tom have?\", \"idx\": 0, \"answers\": [{\"text\": \"two\", \"idx\": 0, \"label\": 1}, {\"text\": \"three\", \"idx\": 1, \"label\": 0}]}, \
        {\"question\": \"What pets does Tom have?\", \"idx\": 1, \"answers\": [{\"text\": \"cats and a dog\", \"idx\": 2, \"label\": 1}, {\"text\": \"a horse\", \"idx\": 3, \"label\": 0}]}]}}\n";
    std::fs::write(dir.0.join("val.jsonl"), multirc).unwrap();
    let report =
        eval(&["--task", "multirc", "--data", dir.0.to_str().unwrap(), "--split", "dev"], &dir.0.join("m.json"));
    let task = &report["tasks"][0];
    let preds = task["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 4);
    let right = |p: &Value| p["predicted"]["class"] == p["gold"]["class"];
    let em = [0usize, 2].iter().filter(|&&q| right(&preds[q]) && right(&preds[q + 1])).count() as f64 / 2.0;
    let reported = task["score"]["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == "multirc_em").unwrap();
    assert_eq!(reported["value"].as_f64().unwrap(), em);
}

/// `--split` is `dev` unless asked otherwise, `validation` names the same split, and the test
/// split is read only when asked for (the tiny model's data has no test file).
#[test]
fn eval_scores_the_dev_split_unless_asked_for_another() {
    let (dir, model, data) = tests::tiny::setup("eval-split");
    let report = |extra: &[&str], name: &str| -> (std::process::Output, Option<Value>) {
        let out = dir.0.join(name);
        let mut args = vec![
            "eval",
            "--model",
            &model,
            "--task",
            "mr",
            "--data",
            &data,
            "--resamples",
            "10",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = run("verdict-train", &args, &[]);
        let v = std::fs::read_to_string(&out).ok().map(|t| serde_json::from_str(&t).unwrap());
        (o, v)
    };
    for (extra, name) in [(&[][..], "default.json"), (&["--split", "validation"][..], "validation.json")] {
        let (o, v) = report(extra, name);
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        let task = &v.unwrap()["tasks"][0];
        assert_eq!(task["split"], "dev", "{extra:?}: {task}");
        assert_eq!(task["examples"], 64, "{extra:?}: the 64 dev examples");
    }
    let (o, _) = report(&["--split", "test"], "test.json");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("no test file"), "{stderr}");
}
