//! The official SuperGLUE JSONL files: one JSON object per line. Test files have no `label`
//! (nor MultiRC answer labels, nor ReCoRD `answers`); their examples come back unlabeled.

use super::{for_each_line, line_id, task_key, Collector, DataError, RawExample, ReadOptions, ReadReport};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// SuperGLUE tasks [`read_superglue_jsonl`] knows.
pub const SUPERGLUE_TASKS: &[&str] = &["boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc", "axb", "axg"];

/// Reads an official SuperGLUE JSONL file of `task` (one of [`SUPERGLUE_TASKS`]).
///
/// Fields: boolq `passage`, `question`; cb/rte/axg `premise`, `hypothesis`; copa `premise`,
/// `choice1`, `choice2`, `question`; wic `word`, `sentence1`, `sentence2`; wsc `text`,
/// `span1_text`, `span2_text`; axb `sentence1`, `sentence2`. Labels become text: `true`/`false`,
/// `0`/`1`, or the file's string.
///
/// MultiRC gives one example per answer option (`paragraph`, `question`, `answer`; label `0`/`1`;
/// group `<passage idx>-<question idx>`; id `<passage>-<question>-<answer>`).
///
/// ReCoRD gives one example per distinct candidate entity of each query (`passage`, `query` with
/// `@placeholder` kept, `entity`; label `yes`/`no` for whether the entity is a gold answer; group
/// = the query idx; id `<query idx>-<candidate number>`; `answers` = the gold answer texts). Entity
/// texts are cut from the original passage (offsets count characters, `end` inclusive); the
/// `passage` field is then made readable by [`record_passage`].
pub fn read_superglue_jsonl(task: &str, path: &Path, opts: ReadOptions) -> Result<ReadReport, DataError> {
    let key = task_key(task);
    if !SUPERGLUE_TASKS.contains(&key.as_str()) {
        return Err(DataError::new(
            path,
            None,
            format!("unknown SuperGLUE task {task:?} (known: {})", SUPERGLUE_TASKS.join(", ")),
        ));
    }
    let mut rows = Collector::new(path, opts);
    for_each_line(path, |number, line| {
        let outcome = line.and_then(|l| {
            if l.trim().is_empty() {
                return Ok(Vec::new());
            }
            match serde_json::from_str::<Value>(l) {
                Ok(Value::Object(obj)) => examples(&key, &obj, number),
                Ok(_) => Err("expected a JSON object".to_string()),
                Err(e) => Err(format!("bad JSON: {e}")),
            }
        });
        rows.row(number, outcome)
    })?;
    Ok(rows.finish())
}

fn examples(task: &str, obj: &Map<String, Value>, line: usize) -> Result<Vec<RawExample>, String> {
    let simple = |fields: &[&str]| -> Result<Vec<RawExample>, String> {
        let mut out = BTreeMap::new();
        for key in fields {
            out.insert(key.to_string(), string(obj, key)?);
        }
        Ok(vec![RawExample {
            id: idx(obj, line)?,
            fields: out,
            label: label(obj)?,
            group: None,
            answers: Vec::new(),
            line,
        }])
    };
    match task {
        "boolq" => simple(&["passage", "question"]),
        "cb" | "rte" | "axg" => simple(&["premise", "hypothesis"]),
        "copa" => simple(&["premise", "choice1", "choice2", "question"]),
        "wic" => simple(&["word", "sentence1", "sentence2"]),
        "axb" => simple(&["sentence1", "sentence2"]),
        "wsc" => {
            let target = object(obj, "target")?;
            let mut out = simple(&["text"])?;
            for key in ["span1_text", "span2_text"] {
                out[0].fields.insert(key.to_string(), string(target, key).map_err(|e| format!("target: {e}"))?);
            }
            Ok(out)
        }
        "multirc" => multirc(obj, line),
        "record" => record(obj, line),
        _ => unreachable!("task checked by the caller"),
    }
}

fn multirc(obj: &Map<String, Value>, line: usize) -> Result<Vec<RawExample>, String> {
    let passage_idx = idx(obj, line)?;
    let passage = object(obj, "passage")?;
    let paragraph = string(passage, "text").map_err(|e| format!("passage: {e}"))?;
    let mut out = Vec::new();
    for (qi, q) in array(passage, "questions")?.iter().enumerate() {
        let q = q.as_object().ok_or_else(|| format!("passage.questions[{qi}] is not an object"))?;
        let at = |e: String| format!("passage.questions[{qi}]: {e}");
        let question = string(q, "question").map_err(at)?;
        let question_idx = idx(q, qi).map_err(at)?;
        let group = format!("{passage_idx}-{question_idx}");
        for (ai, a) in array(q, "answers").map_err(at)?.iter().enumerate() {
            let a = a.as_object().ok_or_else(|| at(format!("answers[{ai}] is not an object")))?;
            let at = |e: String| format!("passage.questions[{qi}].answers[{ai}]: {e}");
            let answer_idx = idx(a, ai).map_err(at)?;
            let fields = BTreeMap::from([
                ("paragraph".to_string(), paragraph.clone()),
                ("question".to_string(), question.clone()),
                ("answer".to_string(), string(a, "text").map_err(at)?),
            ]);
            out.push(RawExample {
                id: format!("{group}-{answer_idx}"),
                fields,
                label: label(a).map_err(at)?,
                group: Some(group.clone()),
                answers: Vec::new(),
                line,
            });
        }
    }
    Ok(out)
}

fn record(obj: &Map<String, Value>, line: usize) -> Result<Vec<RawExample>, String> {
    let passage = object(obj, "passage")?;
    let text = string(passage, "text").map_err(|e| format!("passage: {e}"))?;
    // Offsets count characters (Python string indices), not bytes.
    let chars: Vec<char> = text.chars().collect();
    let mut entities: Vec<String> = Vec::new();
    for (i, ent) in array(passage, "entities").map_err(|e| format!("passage: {e}"))?.iter().enumerate() {
        let ent = ent.as_object().ok_or_else(|| format!("passage.entities[{i}] is not an object"))?;
        let at = |e: String| format!("passage.entities[{i}]: {e}");
        let (start, end) = (offset(ent, "start").map_err(at)?, offset(ent, "end").map_err(at)?);
        if start > end || end >= chars.len() {
            return Err(at(format!("span {start}..={end} lies outside the passage ({} characters)", chars.len())));
        }
        let entity: String = chars[start..=end].iter().collect();
        if !entities.contains(&entity) {
            entities.push(entity);
        }
    }
    let passage_text = record_passage(&text);
    let mut out = Vec::new();
    for (qi, qa) in array(obj, "qas")?.iter().enumerate() {
        let qa = qa.as_object().ok_or_else(|| format!("qas[{qi}] is not an object"))?;
        let at = |e: String| format!("qas[{qi}]: {e}");
        let query = string(qa, "query").map_err(at)?;
        let query_idx = idx(qa, line).map_err(at)?;
        // Test files have no `answers`; their candidates stay unlabeled.
        let answers: Option<Vec<String>> = match qa.get("answers") {
            None | Some(Value::Null) => None,
            Some(Value::Array(list)) => {
                let mut texts: Vec<String> = Vec::new();
                for (ai, a) in list.iter().enumerate() {
                    let a = a.as_object().ok_or_else(|| at(format!("answers[{ai}] is not an object")))?;
                    let t = string(a, "text").map_err(|e| at(format!("answers[{ai}]: {e}")))?;
                    if !texts.contains(&t) {
                        texts.push(t);
                    }
                }
                Some(texts)
            }
            Some(_) => return Err(at("`answers` is not a list".to_string())),
        };
        for (k, entity) in entities.iter().enumerate() {
            let label = answers.as_ref().map(|a| if a.contains(entity) { "yes" } else { "no" }.to_string());
            out.push(RawExample {
                id: format!("{query_idx}-{k}"),
                fields: BTreeMap::from([
                    ("passage".to_string(), passage_text.clone()),
                    ("query".to_string(), query.clone()),
                    ("entity".to_string(), entity.clone()),
                ]),
                label,
                group: Some(query_idx.clone()),
                answers: answers.clone().unwrap_or_default(),
                line,
            });
        }
    }
    Ok(out)
}

/// A ReCoRD passage made readable: the article and each `@highlight` line become sentences,
/// joined by single spaces, and a highlight without closing punctuation gets a full stop
/// (`"Story.\n@highlight\nBig news"` → `"Story. Big news."`).
pub fn record_passage(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for piece in text.split("@highlight\n").map(str::trim).filter(|p| !p.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(piece);
        if !piece.ends_with(['.', '!', '?', '"', '\'', '\u{201d}', '\u{2019}']) {
            out.push('.');
        }
    }
    out
}

fn string(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("`{key}` is not a string")),
        None => Err(format!("missing `{key}`")),
    }
}

fn object<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Map<String, Value>, String> {
    match obj.get(key) {
        Some(Value::Object(o)) => Ok(o),
        Some(_) => Err(format!("`{key}` is not an object")),
        None => Err(format!("missing `{key}`")),
    }
}

fn array<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Vec<Value>, String> {
    match obj.get(key) {
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(format!("`{key}` is not a list")),
        None => Err(format!("missing `{key}`")),
    }
}

fn offset(obj: &Map<String, Value>, key: &str) -> Result<usize, String> {
    match obj.get(key) {
        Some(Value::Number(n)) => {
            n.as_u64().map(|v| v as usize).ok_or_else(|| format!("`{key}` is not a non-negative integer"))
        }
        Some(_) => Err(format!("`{key}` is not a number")),
        None => Err(format!("missing `{key}`")),
    }
}

/// The object's `idx` as text; `fallback` (a line or position) when it has none.
fn idx(obj: &Map<String, Value>, fallback: usize) -> Result<String, String> {
    match obj.get("idx") {
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Ok(line_id(fallback)),
        Some(_) => Err("`idx` is neither a number nor a string".to_string()),
    }
}

/// The `label` as text: strings as they are, `true`/`false`, numbers as written; absent → `None`.
fn label(obj: &Map<String, Value>) -> Result<Option<String>, String> {
    match obj.get("label") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err("`label` is neither a string, a number nor a boolean".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_files;
    use super::*;

    fn read(task: &str, text: &str) -> ReadReport {
        read_superglue_jsonl(task, &test_files::write(&format!("{task}.jsonl"), text), ReadOptions::default()).unwrap()
    }

    #[test]
    fn boolq_cb_rte_axg_axb() {
        let r = read(
            "boolq",
            r#"{"question": "do iran and afghanistan speak the same language", "passage": "Persian language -- Persian is ...", "idx": 0, "label": true}
{"question": "is elder scrolls online the same as skyrim", "passage": "The Elder Scrolls Online ...", "idx": 1, "label": false}
"#,
        );
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.examples[0].label.as_deref(), Some("true"));
        assert_eq!(r.examples[1].label.as_deref(), Some("false"));
        assert_eq!(r.examples[1].id, "1");
        assert_eq!(r.examples[0].field("question"), "do iran and afghanistan speak the same language");
        let r = read(
            "cb",
            r#"{"premise": "It was a complex language.", "hypothesis": "the language was peeled down", "label": "contradiction", "idx": 0}"#,
        );
        assert_eq!(r.examples[0].label.as_deref(), Some("contradiction"));
        assert_eq!(r.examples[0].field("hypothesis"), "the language was peeled down");
        let r = read("rte", r#"{"premise": "No Weapons Found.", "hypothesis": "Weapons Found.", "idx": 0}"#);
        assert_eq!(r.examples[0].label, None);
        let r = read(
            "axg",
            r#"{"hypothesis": "The accountant sought help filing taxes.", "premise": "The taxpayer met with the accountant to get help filing his taxes.", "idx": 0, "pair_id": 551646, "label": "not_entailment"}"#,
        );
        assert_eq!(r.examples[0].label.as_deref(), Some("not_entailment"));
        let r = read(
            "axb",
            r#"{"sentence1": "The cat sat on the mat.", "sentence2": "The cat did not sit on the mat.", "label": "not_entailment", "idx": 0}"#,
        );
        assert_eq!(r.examples[0].field("sentence2"), "The cat did not sit on the mat.");
    }

    #[test]
    fn copa_wic_wsc() {
        let r = read(
            "copa",
            r#"{"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.", "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0}"#,
        );
        let e = &r.examples[0];
        assert_eq!(e.label.as_deref(), Some("0"));
        assert_eq!(e.field("question"), "cause");
        assert_eq!(e.field("choice2"), "The grass was cut.");
        let r = read(
            "wic",
            r#"{"word": "place", "sentence1": "Do you want to come over to my place later?", "sentence2": "A political system with no place for the less prominent groups.", "idx": 0, "label": false, "start1": 31, "start2": 27, "end1": 36, "end2": 32, "version": 1.1}"#,
        );
        assert_eq!(r.examples[0].field("word"), "place");
        assert_eq!(r.examples[0].label.as_deref(), Some("false"));
        let r = read(
            "wsc",
            r#"{"text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been more truthful.", "target": {"span2_index": 13, "span1_index": 0, "span1_text": "Mark", "span2_text": "He"}, "idx": 0, "label": true}"#,
        );
        assert_eq!(r.examples[0].field("span1_text"), "Mark");
        assert_eq!(r.examples[0].field("span2_text"), "He");
        assert_eq!(r.examples[0].label.as_deref(), Some("true"));
    }

    #[test]
    fn multirc_gives_one_example_per_answer() {
        let line = r#"{"idx": 4, "version": 1.1, "passage": {"text": "<b>Sent 1: </b>Susan wanted a party.<br>", "questions": [{"question": "Who wanted a party?", "answers": [{"text": "Susan", "idx": 0, "label": 1}, {"text": "Tom", "idx": 1, "label": 0}], "idx": 0}, {"question": "What did Susan want?", "answers": [{"text": "A party", "idx": 2, "label": 1}], "idx": 1}]}}"#;
        let r = read("multirc", line);
        assert_eq!(r.examples.len(), 3);
        let e = &r.examples[1];
        assert_eq!(e.id, "4-0-1");
        assert_eq!(e.group.as_deref(), Some("4-0"));
        assert_eq!(e.label.as_deref(), Some("0"));
        assert_eq!(e.field("answer"), "Tom");
        assert_eq!(e.field("question"), "Who wanted a party?");
        assert_eq!(e.field("paragraph"), "<b>Sent 1: </b>Susan wanted a party.<br>");
        assert_eq!(r.examples[2].group.as_deref(), Some("4-1"));
        let test = line.replace(r#", "label": 1"#, "").replace(r#", "label": 0"#, "");
        let r = read("multirc", &test);
        assert_eq!(r.examples.len(), 3);
        assert!(r.examples.iter().all(|e| e.label.is_none()));
    }

    const RECORD: &str = r#"{"source": "Daily mail", "passage": {"text": "Zoë Ball met Ed Sheeran in Bristol. Ed Sheeran sang.\n@highlight\nZoë Ball interviews Ed Sheeran\n@highlight\nThe show was live!", "entities": [{"start": 0, "end": 7}, {"start": 13, "end": 22}, {"start": 27, "end": 33}, {"start": 36, "end": 45}]}, "qas": [{"query": "@placeholder was the singer.", "answers": [{"start": 13, "end": 22, "text": "Ed Sheeran"}, {"start": 36, "end": 45, "text": "Ed Sheeran"}], "idx": 17}], "idx": 3}"#;

    #[test]
    fn record_gives_one_example_per_distinct_entity() {
        let r = read("record", RECORD);
        // "Ed Sheeran" appears twice among the entities but is one candidate.
        let entities: Vec<&str> = r.examples.iter().map(|e| e.field("entity")).collect();
        assert_eq!(entities, vec!["Zoë Ball", "Ed Sheeran", "Bristol"]);
        let labels: Vec<&str> = r.examples.iter().map(|e| e.label.as_deref().unwrap()).collect();
        assert_eq!(labels, vec!["no", "yes", "no"]);
        let e = &r.examples[1];
        assert_eq!(e.id, "17-1");
        assert_eq!(e.group.as_deref(), Some("17"));
        assert_eq!(e.answers, vec!["Ed Sheeran".to_string()]);
        assert_eq!(e.field("query"), "@placeholder was the singer.");
        assert_eq!(
            e.field("passage"),
            "Zoë Ball met Ed Sheeran in Bristol. Ed Sheeran sang. Zoë Ball interviews Ed Sheeran. The show was live!"
        );
        // Test files: no answers, unlabeled.
        let test = RECORD.replace(
            r#""answers": [{"start": 13, "end": 22, "text": "Ed Sheeran"}, {"start": 36, "end": 45, "text": "Ed Sheeran"}], "#,
            "",
        );
        let r = read("record", &test);
        assert_eq!(r.examples.len(), 3);
        assert!(r.examples.iter().all(|e| e.label.is_none() && e.answers.is_empty()));
    }

    #[test]
    fn record_span_outside_passage_is_a_row_error() {
        let bad = RECORD.replace(r#"{"start": 27, "end": 33}"#, r#"{"start": 27, "end": 900}"#);
        let path = test_files::write("record.jsonl", format!("{RECORD}\n{bad}\n"));
        let e = read_superglue_jsonl("record", &path, ReadOptions::default()).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.problem.contains("passage.entities[2]"), "{e}");
    }

    #[test]
    fn bad_json_names_the_line_and_can_be_skipped() {
        let text = concat!(
            r#"{"premise": "a", "hypothesis": "b", "label": "entailment", "idx": 0}"#,
            "\n",
            r#"{"premise": "a", "hypothesis": "b", "label": "entailment", "idx": 1"#,
            "\n\n",
            r#"{"premise": "a", "label": "entailment", "idx": 2}"#,
            "\n",
            r#"{"premise": "a", "hypothesis": "b", "label": "neutral", "idx": 3}"#,
            "\n"
        );
        let path = test_files::write("cb.jsonl", text);
        let e = read_superglue_jsonl("cb", &path, ReadOptions::default()).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.problem.starts_with("bad JSON"), "{e}");
        let r = read_superglue_jsonl("cb", &path, ReadOptions { skip_bad_rows: true }).unwrap();
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.skipped.len(), 2);
        assert_eq!(r.skipped[1].line, Some(4));
        assert!(r.skipped[1].problem.contains("missing `hypothesis`"));
        assert_eq!(r.examples[1].line, 5);
    }

    #[test]
    fn unknown_task_is_refused() {
        let path = test_files::write("x.jsonl", "{}\n");
        assert!(read_superglue_jsonl("squad", &path, ReadOptions::default()).unwrap_err().problem.contains("unknown"));
    }
}
