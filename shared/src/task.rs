//! The task registry: for every task, its input fields, prompt template, label words, how the
//! files spell its labels, and its metrics. Trainer, evaluator and server all read tasks from
//! here, so a prompt is rendered and an answer is parsed the same way everywhere.
//!
//! Prompts follow the method's answer-tag form: a system text that describes the task and the
//! answer format, the input, then an assistant turn that already holds the opening tag. The
//! model's answer is the label word and the closing tag: `" Positive </Judgement>"`.

use crate::chat::{ChatMessage, ChatTemplate};
use crate::metrics::Metric;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Opening answer tag; the prompt ends with it.
pub const OPEN_TAG: &str = "<Judgement>";
/// Closing answer tag; the answer ends with it.
pub const CLOSE_TAG: &str = "</Judgement>";
/// The closing tag without its final `>`: tokenizers may fuse that `>` with what follows
/// (Qwen2 has a `>\n` token), so generation stops, and answers are parsed, at the stem.
pub const CLOSE_TAG_STEM: &str = "</Judgement";

/// What constrained scoring compares between labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerScoring {
    /// The exact probability of the whole answer, label word and closing tag
    /// (`" Positive </Judgement>"`): what the model was trained to produce.
    #[default]
    Full,
    /// The probability of the label word alone (`" Positive"`), what follows it left out.
    /// Cheaper: a one-token word needs no token after the prompt (the prompt's last logits
    /// give it), where the full answer adds its tokens but the last to every input. It equals
    /// `Full` when the closing tag is certain after every word, which a trained adapter makes
    /// nearly so; measure before relying on it (docs/results.md). Refused where one word's
    /// tokens begin another's (the shorter word would also count the longer one's mass).
    Word,
}

/// Why an answer scoring was refused: an unknown name, or candidates it cannot score.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScoringError {
    #[error("answer scoring `{0}`: use `full` or `word`")]
    Unknown(String),
    #[error("task {task}: an answer tokenizes to nothing")]
    EmptyAnswer { task: String },
    /// Label word `word`'s tokens begin label word `longer`'s.
    #[error(
        "task {task}: label word {word}'s tokens begin label word {longer}'s, so scoring the word alone would \
         count both; use full answer scoring"
    )]
    WordPrefix { task: String, word: usize, longer: usize },
    /// The tokenizer failed on a candidate (its message).
    #[error("{0}")]
    Encode(String),
}

impl std::str::FromStr for AnswerScoring {
    type Err = ScoringError;
    fn from_str(s: &str) -> Result<Self, ScoringError> {
        match s {
            "full" => Ok(Self::Full),
            "word" => Ok(Self::Word),
            other => Err(ScoringError::Unknown(other.to_string())),
        }
    }
}

impl std::fmt::Display for AnswerScoring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Word => "word",
        })
    }
}

impl AnswerScoring {
    /// Checks tokenized candidates (class order) for this scoring: none may be empty, and
    /// under `Word` none may begin another.
    pub fn check(self, task: &str, candidates: &[Vec<u32>]) -> Result<(), ScoringError> {
        if candidates.iter().any(Vec::is_empty) {
            return Err(ScoringError::EmptyAnswer { task: task.to_string() });
        }
        if self == Self::Word {
            for (i, a) in candidates.iter().enumerate() {
                for (j, b) in candidates.iter().enumerate() {
                    if i != j && b.starts_with(a) {
                        return Err(ScoringError::WordPrefix { task: task.to_string(), word: i, longer: j });
                    }
                }
            }
        }
        Ok(())
    }
}

/// A task's tokenized candidates for constrained scoring ([`Task::scored_candidates`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoredCandidates {
    /// The scoring they follow (`Full` where `Word` was asked for but cannot apply).
    pub scoring: AnswerScoring,
    /// Token ids per class, in class order.
    pub candidates: Vec<Vec<u32>>,
    /// Why `Word` fell back to `Full`, if it did.
    pub fallback: Option<String>,
}

/// Where a task comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Benchmark {
    Glue,
    SuperGlue,
    /// Real data built by `verdict-train fetch-data`.
    Verdict,
    /// Defined by a user's TOML file.
    User,
}

/// How a task's data files are laid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Official GLUE TSV of the named GLUE task.
    GlueTsv(String),
    /// Official SuperGLUE JSONL of the named SuperGLUE task.
    SuperGlueJsonl(String),
    /// CSV / JSONL / Parquet whose columns are named after the task's fields and `label`
    /// (or mapped by the user's task file).
    Table,
}

/// What the model answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// One of a fixed set of classes. `words[i]` is class `i`'s label word; `raw[i]` lists how
    /// data files spell class `i` (compared case-insensitively).
    Classes { words: Vec<String>, raw: Vec<Vec<String>> },
    /// A real-valued score in `[min, max]`, answered as an integer from `min` to `max`.
    /// Constrained scoring predicts the expectation over those integers.
    Score { min: f64, max: f64 },
}

/// A gold label after mapping the file's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    Class(usize),
    Score(f64),
}

/// One task, defined once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Registry name, e.g. `sst2`, `mnli-m`, `mr`.
    pub name: String,
    pub benchmark: Benchmark,
    /// What the task is about, first sentence of the system text.
    pub description: String,
    /// Input fields the instruction uses, in the order the data gives them.
    pub fields: Vec<String>,
    /// The user's turn, with `{field}` placeholders.
    pub instruction: String,
    pub answer: Answer,
    pub metrics: Vec<Metric>,
    pub format: DataFormat,
    /// Table data: file column for each field, and for `label` / `id` (default: same name).
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// The data file of a split where it is not the format's own name (MNLI's matched and
    /// mismatched dev and test sets): split name -> file name.
    #[serde(default)]
    pub split_files: BTreeMap<String, String>,
    /// The input field that names the candidate each example judges, for tasks scored per
    /// query over its candidates (ReCoRD's metrics, [`Grouping::Candidates`]): required by
    /// them, refused elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_field: Option<String>,
    /// Bumped whenever the prompt wording changes: adapters record it and are refused when it
    /// differs.
    pub template_version: u32,
}

/// A prompt split where the example-specific text starts: `prefix` is the same for every
/// example of a task (system text, few-shot turns, the instruction's opening words), so its
/// keys and values can be computed once. Tokenize the two parts separately and concatenate
/// the ids, everywhere, so cached and uncached prompts are the same tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromptParts {
    pub prefix: String,
    pub body: String,
    /// Byte ranges of `body` that hold the example's field values (user input), in order:
    /// they are tokenized as plain text, so an input cannot spell the template's markers.
    #[serde(skip)]
    pub fields: Vec<std::ops::Range<usize>>,
}

impl PromptParts {
    /// The whole prompt text.
    pub fn text(&self) -> String {
        format!("{}{}", self.prefix, self.body)
    }
}

/// Errors in task definitions or in mapping examples to them.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("unknown task {0:?} (see `verdict-train tasks`)")]
    Unknown(String),
    #[error("task {task}: {problem}")]
    Invalid { task: String, problem: String },
    #[error("task {task}: label {label:?} is none of {expected}")]
    BadLabel { task: String, label: String, expected: String },
    #[error("task {task}: example has no field {field:?}")]
    MissingField { task: String, field: String },
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
    #[error("task {task}: {source}")]
    Chat { task: String, source: crate::chat::ChatError },
}

/// How the examples of a split are scored together (what the metrics need of the data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grouping {
    /// Each example on its own.
    Alone,
    /// The answer options of one question form a group (MultiRC: exact match per question).
    Questions,
    /// A group is one query with one example per candidate, named by the input field `field`;
    /// the prediction is the candidate judged most likely positive (ReCoRD).
    Candidates { field: String },
}

impl Task {
    /// The file names `split` may be read from in a data directory, in order of preference.
    pub fn split_file_names(&self, split: &str) -> Vec<String> {
        if let Some(file) = self.split_files.get(split) {
            return vec![file.clone()];
        }
        match &self.format {
            DataFormat::GlueTsv(_) => vec![format!("{split}.tsv")],
            // SuperGLUE calls its dev split `val`.
            DataFormat::SuperGlueJsonl(_) => vec![format!("{}.jsonl", if split == "dev" { "val" } else { split })],
            DataFormat::Table => ["jsonl", "csv", "tsv", "parquet"].iter().map(|e| format!("{split}.{e}")).collect(),
        }
    }

    /// Whether the task's metrics score one chosen candidate per query (ReCoRD's).
    fn scores_candidates(&self) -> bool {
        self.metrics.iter().any(|m| matches!(m, Metric::RecordF1 | Metric::RecordEm))
    }

    /// How a split's examples are scored together, as the task's metrics require: ReCoRD's
    /// metrics score one chosen candidate (named by [`Task::candidate_field`]) per query,
    /// MultiRC's exact match scores whole questions.
    pub fn grouping(&self) -> Grouping {
        let uses = |m: &[Metric]| self.metrics.iter().any(|x| m.contains(x));
        if let (true, Some(field)) = (self.scores_candidates(), &self.candidate_field) {
            Grouping::Candidates { field: field.clone() }
        } else if uses(&[Metric::MultiRcF1a, Metric::MultiRcEm]) {
            Grouping::Questions
        } else {
            Grouping::Alone
        }
    }

    /// The file column holding `name` (a field, `label` or `id`) in table data.
    pub fn column(&self, name: &str) -> String {
        self.columns.get(name).cloned().unwrap_or_else(|| name.to_string())
    }

    /// Number of classes (score tasks: the integers `min..=max`).
    pub fn num_classes(&self) -> usize {
        self.label_words().len()
    }

    /// The words the model may answer with, in class order (score tasks: `"0"`..`"5"`).
    pub fn label_words(&self) -> Vec<String> {
        match &self.answer {
            Answer::Classes { words, .. } => words.clone(),
            Answer::Score { min, max } => (min.round() as i64..=max.round() as i64).map(|k| k.to_string()).collect(),
        }
    }

    /// The prediction from the probability of every label word (class order, as constrained
    /// scoring gives them): the most likely class, or for a score task the expected value over
    /// its integers. Evaluator and server both answer through this.
    pub fn predict(&self, probs: &[f64]) -> Label {
        match &self.answer {
            Answer::Score { min, .. } => {
                let low = min.round();
                Label::Score(probs.iter().enumerate().map(|(k, p)| (low + k as f64) * p).sum())
            }
            Answer::Classes { .. } => {
                Label::Class(probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(c, _)| c).unwrap_or(0))
            }
        }
    }

    /// Whether this is a regression task.
    pub fn is_score(&self) -> bool {
        matches!(self.answer, Answer::Score { .. })
    }

    /// The continuation the model should produce for answer word `word`, right after the
    /// prompt's opening tag.
    pub fn answer_text(word: &str) -> String {
        format!("{} {CLOSE_TAG}", Self::word_text(word))
    }

    /// Label word `word` as it follows the opening tag: the start of its answer.
    pub fn word_text(word: &str) -> String {
        format!(" {word}")
    }

    /// Every class's answer continuation, in class order.
    pub fn answer_texts(&self) -> Vec<String> {
        self.label_words().iter().map(|w| Self::answer_text(w)).collect()
    }

    /// The tokenized candidates constrained scoring compares for this task under `scoring`, and
    /// the scoring they follow: `Word` falls back to `Full` for a task whose words cannot be
    /// scored alone ([`AnswerScoring::check`]; the reason comes back too, for a warning), so
    /// one such task does not stop a server of many. Errors: tokenizer failures, empty answers.
    pub fn scored_candidates<E: std::fmt::Display>(
        &self,
        scoring: AnswerScoring,
        encode: impl Fn(&str) -> Result<Vec<u32>, E>,
    ) -> Result<ScoredCandidates, ScoringError> {
        let encode_all = |s: AnswerScoring| -> Result<Vec<Vec<u32>>, ScoringError> {
            self.scored_texts(s).iter().map(|t| encode(t).map_err(|e| ScoringError::Encode(e.to_string()))).collect()
        };
        let candidates = encode_all(scoring)?;
        match scoring.check(&self.name, &candidates) {
            Ok(()) => Ok(ScoredCandidates { scoring, candidates, fallback: None }),
            Err(why) if scoring == AnswerScoring::Word => {
                let full = encode_all(AnswerScoring::Full)?;
                AnswerScoring::Full.check(&self.name, &full)?;
                let fallback = Some(format!("{why}: scored in full"));
                Ok(ScoredCandidates { scoring: AnswerScoring::Full, candidates: full, fallback })
            }
            Err(why) => Err(why),
        }
    }

    /// What constrained scoring compares for each class, in class order: the whole answer
    /// ([`Task::answer_texts`]) or the label word alone, as it follows the opening tag.
    pub fn scored_texts(&self, scoring: AnswerScoring) -> Vec<String> {
        match scoring {
            AnswerScoring::Full => self.answer_texts(),
            AnswerScoring::Word => self.label_words().iter().map(|w| Self::word_text(w)).collect(),
        }
    }

    /// The system text: the description and the answer format, generated from the label words.
    pub fn system_text(&self) -> String {
        let words = self.label_words();
        let choice = match &self.answer {
            Answer::Classes { .. } => {
                let quoted: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
                format!("only one of {}", quoted.join(", "))
            }
            Answer::Score { min, max } => format!("only a whole number from {min} to {max}"),
        };
        format!(
            "{}\nAnswer in exactly this form:\n{OPEN_TAG} {{{choice}}} {CLOSE_TAG}\n<Analysis> {{a short explanation}} </Analysis>",
            self.description
        )
    }

    /// Maps a file's label spelling to a label.
    pub fn parse_label(&self, raw: &str) -> Result<Label, TaskError> {
        let raw_t = raw.trim();
        match &self.answer {
            Answer::Classes { raw: spellings, words } => spellings
                .iter()
                .position(|alts| alts.iter().any(|a| a.eq_ignore_ascii_case(raw_t)))
                .map(Label::Class)
                .ok_or_else(|| TaskError::BadLabel {
                    task: self.name.clone(),
                    label: raw.to_string(),
                    expected: format!("{spellings:?} (classes {words:?})"),
                }),
            Answer::Score { min, max } => match raw_t.parse::<f64>() {
                Ok(v) if v >= *min && v <= *max => Ok(Label::Score(v)),
                _ => Err(TaskError::BadLabel {
                    task: self.name.clone(),
                    label: raw.to_string(),
                    expected: format!("a number in [{min}, {max}]"),
                }),
            },
        }
    }

    /// The label word of a gold label, as a demonstration answer (scores are rounded).
    pub fn label_word(&self, label: Label) -> String {
        match label {
            Label::Class(c) => self.label_words()[c].clone(),
            Label::Score(v) => format!("{}", v.round() as i64),
        }
    }

    /// The label that answer number `index` (in [`Task::label_words`] order) stands for.
    pub fn label_of_class(&self, index: usize) -> Label {
        match &self.answer {
            Answer::Classes { .. } => Label::Class(index),
            Answer::Score { min, .. } => Label::Score(min.round() + index as f64),
        }
    }

    /// The user's turn for one example.
    pub fn instruction_text(&self, fields: &BTreeMap<String, String>) -> Result<String, TaskError> {
        fill(&self.instruction, fields, |f| TaskError::MissingField { task: self.name.clone(), field: f.to_string() })
    }

    /// The prompt for `fields`, after `shots` demonstrations (each an example's fields and its
    /// gold label), laid out by `chat` (or as plain text for a model without one). The prompt
    /// ends with the opening tag; the model continues with [`Task::answer_text`].
    pub fn prompt(
        &self,
        chat: Option<&ChatTemplate>,
        shots: &[(&BTreeMap<String, String>, Label)],
        fields: &BTreeMap<String, String>,
    ) -> Result<PromptParts, TaskError> {
        // Render with each field's value replaced by a sentinel; split at the earliest
        // placeholder's, then put the values in, recording where each lands.
        const SENTINEL: char = '\u{1}';
        let first = self
            .fields
            .iter()
            .filter_map(|f| self.instruction.find(&format!("{{{f}}}")).map(|i| (i, f)))
            .min()
            .map(|(_, f)| f.clone())
            .ok_or_else(|| TaskError::Invalid {
                task: self.name.clone(),
                problem: "instruction uses no field".into(),
            })?;
        let sentinel = |i: usize| format!("{SENTINEL}VERDICT-FIELD-{i}{SENTINEL}");
        let mut marked = fields.clone();
        for (i, f) in self.fields.iter().enumerate() {
            if !fields.contains_key(f) {
                return Err(TaskError::MissingField { task: self.name.clone(), field: f.clone() });
            }
            marked.insert(f.clone(), sentinel(i));
        }
        let user = self.instruction_text(&marked)?;
        let system = self.system_text();
        let mut turns = Vec::with_capacity(2 + 2 * shots.len());
        for (shot_fields, label) in shots {
            turns.push(ChatMessage::new("user", &self.instruction_text(shot_fields)?));
            turns.push(ChatMessage::new(
                "assistant",
                &format!("{OPEN_TAG}{}", Self::answer_text(&self.label_word(*label))),
            ));
        }
        turns.push(ChatMessage::new("user", &user));
        let text = match chat {
            Some(chat) => {
                let mut messages = vec![ChatMessage::new("system", &system)];
                messages.extend(turns);
                let rendered = chat
                    .render(&messages, true)
                    .map_err(|source| TaskError::Chat { task: self.name.clone(), source })?;
                format!("{rendered}{OPEN_TAG}")
            }
            None => {
                let mut out = format!("{system}\n\n");
                for t in &turns {
                    let who = if t.role == "user" { "User" } else { "Assistant" };
                    out.push_str(&format!("{who}: {}\n", t.content));
                }
                format!("{out}Assistant: {OPEN_TAG}")
            }
        };
        let first_index = self.fields.iter().position(|f| *f == first).expect("first is a field");
        let (prefix, mut rest) =
            text.split_once(&sentinel(first_index)).expect("the sentinel is in the rendered prompt");
        let mut body = String::with_capacity(rest.len() + 64);
        let mut ranges = Vec::with_capacity(self.fields.len());
        let mut next = Some(first_index);
        loop {
            if let Some(i) = next {
                let value = &fields[&self.fields[i]];
                ranges.push(body.len()..body.len() + value.len());
                body.push_str(value);
            }
            // The next sentinel, if any: `\u{1}VERDICT-FIELD-<i>\u{1}`.
            let Some(at) = rest.find(&format!("{SENTINEL}VERDICT-FIELD-")) else { break };
            body.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let end = after.find(SENTINEL).expect("a sentinel is closed");
            next = after["VERDICT-FIELD-".len()..end].parse::<usize>().ok();
            rest = &after[end + 1..];
        }
        body.push_str(rest);
        Ok(PromptParts { prefix: prefix.to_string(), body, fields: ranges })
    }

    /// Parses a generated answer (the text after the opening tag): the text before the closing
    /// tag must contain exactly one label word (whole word, case-insensitive) or, for score
    /// tasks, a number. `None` means unparseable: no closing tag, no label word, or several.
    pub fn parse_answer(&self, generated: &str) -> Option<Label> {
        let (inside, _) = generated.split_once(CLOSE_TAG_STEM)?;
        match &self.answer {
            Answer::Classes { words, .. } => {
                let lower = inside.to_lowercase();
                let found: Vec<usize> =
                    (0..words.len()).filter(|&i| contains_word(&lower, &words[i].to_lowercase())).collect();
                // A longer word containing a shorter one ("Not entailment" vs "entailment")
                // counts once, as the longer.
                let found: Vec<usize> = found
                    .iter()
                    .copied()
                    .filter(|&i| {
                        !found.iter().any(|&j| {
                            j != i
                                && words[j].len() > words[i].len()
                                && contains_word(&words[j].to_lowercase(), &words[i].to_lowercase())
                        })
                    })
                    .collect();
                match found.as_slice() {
                    [one] => Some(Label::Class(*one)),
                    _ => None,
                }
            }
            Answer::Score { min, max } => first_number(inside).map(|v| Label::Score(v.clamp(*min, *max))),
        }
    }

    /// A digest of everything that shapes the prompt and the answers: adapters trained on one
    /// template are refused under another.
    pub fn template_hash(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.system_text(),
            self.instruction.clone(),
            self.answer_texts().join("\u{1}"),
            self.template_version.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        format!("{:x}", h.finalize())[..16].to_string()
    }

    fn validate(&self) -> Result<(), TaskError> {
        let bad = |problem: String| Err(TaskError::Invalid { task: self.name.clone(), problem });
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return bad("name must be non-empty ASCII letters, digits, '-' or '_'".into());
        }
        for f in &self.fields {
            if !self.instruction.contains(&format!("{{{f}}}")) {
                return bad(format!("instruction does not use field {{{f}}}"));
            }
        }
        if self.fields.is_empty() {
            return bad("a task needs at least one input field".into());
        }
        match &self.answer {
            Answer::Classes { words, raw } => {
                if words.len() < 2 || raw.len() != words.len() {
                    return bad("needs at least two label words and one list of raw spellings per word".into());
                }
                let mut lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
                lower.sort();
                lower.dedup();
                if lower.len() != words.len() || words.iter().any(|w| w.trim().is_empty() || w.contains(CLOSE_TAG)) {
                    return bad("label words must be distinct, non-empty and free of the closing tag".into());
                }
            }
            Answer::Score { min, max } => {
                if min.partial_cmp(max) != Some(std::cmp::Ordering::Less) || (max - min) > 100.0 {
                    return bad(format!("score range [{min}, {max}] must be increasing and at most 100 wide"));
                }
            }
        }
        if self.metrics.is_empty() {
            return bad("a task needs at least one metric".into());
        }
        if let Some(k) = self.columns.keys().find(|k| !self.fields.contains(k) && *k != "label" && *k != "id") {
            return bad(format!("columns maps {k:?}, which is neither a field nor label/id"));
        }
        match (&self.candidate_field, self.scores_candidates()) {
            (None, true) => {
                return bad(
                    "record_f1 / record_em score one candidate per query: name its field in candidate_field".into()
                )
            }
            (Some(c), false) => {
                return bad(format!("candidate_field {c:?} is only for record_f1 / record_em tasks"));
            }
            (Some(c), true) if !self.fields.contains(c) => {
                return bad(format!("candidate_field {c:?} is not one of the fields"));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Replaces `{field}` placeholders.
fn fill<E>(template: &str, fields: &BTreeMap<String, String>, missing: impl Fn(&str) -> E) -> Result<String, E> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(len) = rest[open + 1..].find('}') else { break };
        let name = &rest[open + 1..open + 1 + len];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push_str(&rest[..=open]);
            rest = &rest[open + 1..];
            continue;
        }
        out.push_str(&rest[..open]);
        out.push_str(fields.get(name).ok_or_else(|| missing(name))?);
        rest = &rest[open + 2 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

fn contains_word(haystack: &str, word: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    haystack.match_indices(word).any(|(i, _)| {
        let before = haystack[..i].chars().next_back();
        let after = haystack[i + word.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

fn first_number(text: &str) -> Option<f64> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let tail = &text[start..];
    let end = tail.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(tail.len());
    tail[..end].trim_end_matches('.').parse().ok()
}

fn classes(words: &[&str], raw: &[&[&str]]) -> Answer {
    Answer::Classes {
        words: words.iter().map(|w| w.to_string()).collect(),
        raw: raw.iter().map(|alts| alts.iter().map(|a| a.to_string()).collect()).collect(),
    }
}

struct Def<'a> {
    name: &'a str,
    benchmark: Benchmark,
    description: &'a str,
    fields: &'a [&'a str],
    instruction: &'a str,
    answer: Answer,
    metrics: &'a [Metric],
    format: DataFormat,
}

impl Def<'_> {
    fn build(self) -> Task {
        Task {
            name: self.name.into(),
            benchmark: self.benchmark,
            description: self.description.into(),
            fields: self.fields.iter().map(|f| f.to_string()).collect(),
            instruction: self.instruction.into(),
            answer: self.answer,
            metrics: self.metrics.to_vec(),
            format: self.format,
            columns: BTreeMap::new(),
            split_files: BTreeMap::new(),
            candidate_field: None,
            template_version: 1,
        }
    }
}

/// Every built-in task: all of GLUE and SuperGLUE, and the real data this project builds.
pub fn builtin_tasks() -> Vec<Task> {
    use Benchmark::{Glue, SuperGlue, Verdict};
    use Metric::*;
    let glue = |n: &str| DataFormat::GlueTsv(n.into());
    let sg = |n: &str| DataFormat::SuperGlueJsonl(n.into());
    let yes_no_entail = || classes(&["Yes", "No"], &[&["entailment", "0"], &["not_entailment", "1"]]);
    let nli3 = || {
        classes(
            &["Entailment", "Neutral", "Contradiction"],
            &[&["entailment", "0"], &["neutral", "1"], &["contradiction", "2"]],
        )
    };
    let nli_instruction = "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis, contradict it, or neither?";
    let nli_description = "You are an assistant that judges natural-language inference. Decide whether the premise entails the hypothesis (Entailment), contradicts it (Contradiction), or neither (Neutral).";
    let rte_description = "You are an assistant that judges textual entailment. Decide whether the first text entails the second: answer Yes if it does, No if it does not.";
    let sentiment = "You are an assistant that analyses the sentiment of a sentence from a movie review. Decide whether it expresses a positive or a negative opinion.";
    let defs = vec![
        Def { name: "cola", benchmark: Glue, description: "You are an assistant that judges English grammar. Decide whether the sentence is grammatically acceptable: Yes if it is, No if it is not.", fields: &["sentence"], instruction: "Sentence: \"{sentence}\"\nIs this sentence grammatically acceptable?", answer: classes(&["No", "Yes"], &[&["0"], &["1"]]), metrics: &[Matthews], format: glue("cola") },
        Def { name: "sst2", benchmark: Glue, description: sentiment, fields: &["sentence"], instruction: "Sentence: \"{sentence}\"\nWhat is the sentiment of this sentence?", answer: classes(&["Negative", "Positive"], &[&["0"], &["1"]]), metrics: &[Accuracy], format: glue("sst2") },
        Def { name: "mrpc", benchmark: Glue, description: "You are an assistant that detects paraphrases. Decide whether the two sentences mean the same thing: Yes if they do, No if they do not.", fields: &["sentence1", "sentence2"], instruction: "Sentence 1: \"{sentence1}\"\nSentence 2: \"{sentence2}\"\nAre these two sentences paraphrases of each other?", answer: classes(&["No", "Yes"], &[&["0"], &["1"]]), metrics: &[F1, Accuracy], format: glue("mrpc") },
        Def { name: "qqp", benchmark: Glue, description: "You are an assistant that detects duplicate questions. Decide whether the two questions ask the same thing: Yes if they do, No if they do not.", fields: &["question1", "question2"], instruction: "Question 1: \"{question1}\"\nQuestion 2: \"{question2}\"\nDo these two questions ask the same thing?", answer: classes(&["No", "Yes"], &[&["0"], &["1"]]), metrics: &[F1, Accuracy], format: glue("qqp") },
        Def { name: "stsb", benchmark: Glue, description: "You are an assistant that rates semantic similarity. Rate how similar in meaning the two sentences are, from 0 (unrelated) to 5 (equivalent).", fields: &["sentence1", "sentence2"], instruction: "Sentence 1: \"{sentence1}\"\nSentence 2: \"{sentence2}\"\nHow similar are these two sentences in meaning?", answer: Answer::Score { min: 0.0, max: 5.0 }, metrics: &[Pearson, Spearman], format: glue("stsb") },
        Def { name: "mnli-m", benchmark: Glue, description: nli_description, fields: &["premise", "hypothesis"], instruction: nli_instruction, answer: nli3(), metrics: &[Accuracy], format: glue("mnli") },
        Def { name: "mnli-mm", benchmark: Glue, description: nli_description, fields: &["premise", "hypothesis"], instruction: nli_instruction, answer: nli3(), metrics: &[Accuracy], format: glue("mnli") },
        Def { name: "qnli", benchmark: Glue, description: "You are an assistant that judges question answering. Decide whether the sentence contains the answer to the question: Yes if it does, No if it does not.", fields: &["question", "sentence"], instruction: "Question: \"{question}\"\nSentence: \"{sentence}\"\nDoes the sentence answer the question?", answer: yes_no_entail(), metrics: &[Accuracy], format: glue("qnli") },
        Def { name: "rte", benchmark: Glue, description: rte_description, fields: &["sentence1", "sentence2"], instruction: "Text: \"{sentence1}\"\nHypothesis: \"{sentence2}\"\nDoes the text entail the hypothesis?", answer: yes_no_entail(), metrics: &[Accuracy], format: glue("rte") },
        Def { name: "wnli", benchmark: Glue, description: "You are an assistant that resolves pronouns. Decide whether the second sentence follows from the first once its pronoun is resolved: Yes if it does, No if it does not.", fields: &["sentence1", "sentence2"], instruction: "Sentence 1: \"{sentence1}\"\nSentence 2: \"{sentence2}\"\nDoes sentence 2 follow from sentence 1?", answer: classes(&["No", "Yes"], &[&["0"], &["1"]]), metrics: &[Accuracy], format: glue("wnli") },
        Def { name: "ax", benchmark: Glue, description: nli_description, fields: &["premise", "hypothesis"], instruction: nli_instruction, answer: nli3(), metrics: &[Matthews], format: glue("ax") },
        Def { name: "boolq", benchmark: SuperGlue, description: "You are an assistant that answers yes/no questions about a passage. Answer Yes or No according to the passage.", fields: &["passage", "question"], instruction: "Passage: \"{passage}\"\nQuestion: \"{question}?\"\nWhat is the answer according to the passage?", answer: classes(&["No", "Yes"], &[&["false", "0"], &["true", "1"]]), metrics: &[Accuracy], format: sg("boolq") },
        Def { name: "cb", benchmark: SuperGlue, description: nli_description, fields: &["premise", "hypothesis"], instruction: nli_instruction, answer: classes(&["Entailment", "Contradiction", "Neutral"], &[&["entailment"], &["contradiction"], &["neutral"]]), metrics: &[Accuracy, MacroF1], format: sg("cb") },
        Def { name: "copa", benchmark: SuperGlue, description: "You are an assistant that reasons about causes and effects. Given a premise, choose the more plausible of two options: Option one or Option two.", fields: &["premise", "question", "choice1", "choice2"], instruction: "Premise: \"{premise}\"\nWhich option is the more plausible {question}?\nOption one: \"{choice1}\"\nOption two: \"{choice2}\"", answer: classes(&["Option one", "Option two"], &[&["0"], &["1"]]), metrics: &[Accuracy], format: sg("copa") },
        Def { name: "multirc", benchmark: SuperGlue, description: "You are an assistant that checks answers against a paragraph. Decide whether the proposed answer to the question is correct according to the paragraph: True or False.", fields: &["paragraph", "question", "answer"], instruction: "Paragraph: \"{paragraph}\"\nQuestion: \"{question}\"\nProposed answer: \"{answer}\"\nIs the proposed answer correct?", answer: classes(&["False", "True"], &[&["0", "false"], &["1", "true"]]), metrics: &[MultiRcF1a, MultiRcEm], format: sg("multirc") },
        Def { name: "record", benchmark: SuperGlue, description: "You are an assistant that reads news passages. Decide whether the candidate entity correctly fills the @placeholder in the query: Yes or No.", fields: &["passage", "query", "entity"], instruction: "Passage: \"{passage}\"\nQuery: \"{query}\"\nCandidate for @placeholder: \"{entity}\"\nDoes the candidate fill the placeholder correctly?", answer: classes(&["No", "Yes"], &[&["no", "0", "false"], &["yes", "1", "true"]]), metrics: &[RecordF1, RecordEm], format: sg("record") },
        Def { name: "rte-sg", benchmark: SuperGlue, description: rte_description, fields: &["premise", "hypothesis"], instruction: "Text: \"{premise}\"\nHypothesis: \"{hypothesis}\"\nDoes the text entail the hypothesis?", answer: yes_no_entail(), metrics: &[Accuracy], format: sg("rte") },
        Def { name: "wic", benchmark: SuperGlue, description: "You are an assistant that compares word senses. Decide whether the word is used with the same meaning in both sentences: Same or Different.", fields: &["word", "sentence1", "sentence2"], instruction: "Word: \"{word}\"\nSentence 1: \"{sentence1}\"\nSentence 2: \"{sentence2}\"\nIs the word used with the same meaning in both sentences?", answer: classes(&["Different", "Same"], &[&["false", "0"], &["true", "1"]]), metrics: &[Accuracy], format: sg("wic") },
        Def { name: "wsc", benchmark: SuperGlue, description: "You are an assistant that resolves pronouns. Decide whether the pronoun refers to the given noun phrase: Yes or No.", fields: &["text", "span2_text", "span1_text"], instruction: "Text: \"{text}\"\nDoes \"{span2_text}\" refer to \"{span1_text}\"?", answer: classes(&["No", "Yes"], &[&["false", "0"], &["true", "1"]]), metrics: &[Accuracy], format: sg("wsc") },
        Def { name: "axb", benchmark: SuperGlue, description: rte_description, fields: &["sentence1", "sentence2"], instruction: "Text: \"{sentence1}\"\nHypothesis: \"{sentence2}\"\nDoes the text entail the hypothesis?", answer: yes_no_entail(), metrics: &[Matthews], format: sg("axb") },
        Def { name: "axg", benchmark: SuperGlue, description: rte_description, fields: &["premise", "hypothesis"], instruction: "Text: \"{premise}\"\nHypothesis: \"{hypothesis}\"\nDoes the text entail the hypothesis?", answer: yes_no_entail(), metrics: &[Accuracy], format: sg("axg") },
        Def { name: "mr", benchmark: Verdict, description: sentiment, fields: &["sentence"], instruction: "Sentence: \"{sentence}\"\nWhat is the sentiment of this sentence?", answer: classes(&["Negative", "Positive"], &[&["negative", "0"], &["positive", "1"]]), metrics: &[Accuracy], format: DataFormat::Table },
        Def { name: "mr-score", benchmark: Verdict, description: "You are an assistant that rates movie-review sentences. Rate how positive the sentence is, from 0 (very negative) to 5 (very positive).", fields: &["sentence"], instruction: "Sentence: \"{sentence}\"\nHow positive is this sentence?", answer: Answer::Score { min: 0.0, max: 5.0 }, metrics: &[Pearson, Spearman], format: DataFormat::Table },
        Def { name: "tweets3", benchmark: Verdict, description: "You are an assistant that analyses the sentiment of tweets. Decide whether the tweet is positive, negative or neutral.", fields: &["sentence"], instruction: "Tweet: \"{sentence}\"\nWhat is the sentiment of this tweet?", answer: classes(&["Negative", "Neutral", "Positive"], &[&["negative"], &["neutral"], &["positive"]]), metrics: &[Accuracy, MacroF1], format: DataFormat::Table },
    ];
    // MNLI ships its matched and mismatched dev and test sets as files of their own.
    let split_files = |kind: &str| -> BTreeMap<String, String> {
        ["dev", "test"].iter().map(|s| (s.to_string(), format!("{s}_{kind}.tsv"))).collect()
    };
    let mut tasks: Vec<Task> = defs.into_iter().map(Def::build).collect();
    for t in &mut tasks {
        match t.name.as_str() {
            "mnli-m" => t.split_files = split_files("matched"),
            "mnli-mm" => t.split_files = split_files("mismatched"),
            // One ReCoRD example judges one entity for the query's placeholder.
            "record" => t.candidate_field = Some("entity".into()),
            _ => {}
        }
    }
    tasks
}

/// A user's task file (TOML). See `docs/tasks.md`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    name: String,
    description: String,
    fields: Vec<String>,
    instruction: String,
    /// Label words, for a classification task.
    labels: Option<Vec<String>>,
    /// How data files spell each label (default: the label word itself).
    raw_labels: Option<Vec<Vec<String>>>,
    /// `{ min, max }`, for a score task.
    score: Option<ScoreRange>,
    metrics: Vec<String>,
    #[serde(default = "one")]
    template_version: u32,
    /// File column for each field, `label` and `id`, when they differ from the names.
    #[serde(default)]
    columns: BTreeMap<String, String>,
    /// A split's file name when it is not `<split>.jsonl|csv|tsv|parquet`.
    #[serde(default)]
    split_files: BTreeMap<String, String>,
    /// The field naming each example's candidate, for `record_f1` / `record_em` tasks.
    candidate_field: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreRange {
    min: f64,
    max: f64,
}

fn one() -> u32 {
    1
}

/// Built-in tasks plus any loaded from user task files.
#[derive(Debug, Clone)]
pub struct TaskRegistry {
    tasks: Vec<Task>,
}

impl Default for TaskRegistry {
    fn default() -> Self {
        Self::builtin()
    }
}

impl TaskRegistry {
    /// The built-in tasks.
    pub fn builtin() -> Self {
        Self { tasks: builtin_tasks() }
    }

    /// Parses a user task from TOML text.
    pub fn parse_task_toml(text: &str, origin: &str) -> Result<Task, TaskError> {
        let file_err = |problem: String| TaskError::File { path: origin.to_string(), problem };
        let f: TaskFile = toml::from_str(text).map_err(|e| file_err(e.to_string()))?;
        let answer = match (f.labels, f.score) {
            (Some(words), None) => {
                let raw = match f.raw_labels {
                    Some(raw) => raw,
                    None => words.iter().map(|w| vec![w.clone()]).collect(),
                };
                Answer::Classes { words, raw }
            }
            (None, Some(s)) => Answer::Score { min: s.min, max: s.max },
            _ => return Err(file_err("give exactly one of `labels` (classification) or `score` (regression)".into())),
        };
        let metrics = f
            .metrics
            .iter()
            .map(|m| m.parse::<Metric>().map_err(|e| file_err(format!("metric {m:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let task = Task {
            name: f.name,
            benchmark: Benchmark::User,
            description: f.description,
            fields: f.fields,
            instruction: f.instruction,
            answer,
            metrics,
            format: DataFormat::Table,
            columns: f.columns,
            split_files: f.split_files,
            candidate_field: f.candidate_field,
            template_version: f.template_version,
        };
        task.validate()?;
        Ok(task)
    }

    /// Adds the task defined in a TOML file; a name already taken is refused.
    pub fn load_file(&mut self, path: &Path) -> Result<&Task, TaskError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TaskError::File { path: path.display().to_string(), problem: e.to_string() })?;
        let task = Self::parse_task_toml(&text, &path.display().to_string())?;
        if self.get(&task.name).is_ok() {
            return Err(TaskError::Invalid { task: task.name, problem: "a task with this name already exists".into() });
        }
        self.tasks.push(task);
        Ok(self.tasks.last().expect("just pushed"))
    }

    /// A task by name.
    pub fn get(&self, name: &str) -> Result<&Task, TaskError> {
        self.tasks.iter().find(|t| t.name == name).ok_or_else(|| TaskError::Unknown(name.to_string()))
    }

    /// All tasks.
    pub fn tasks(&self) -> &[Task] {
        &self.tasks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_builtin_task_is_valid_and_unique() {
        let tasks = builtin_tasks();
        for t in &tasks {
            t.validate().unwrap();
        }
        let mut names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), tasks.len());
        for name in ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli-m", "mnli-mm", "qnli", "rte", "wnli", "ax"] {
            assert_eq!(TaskRegistry::builtin().get(name).unwrap().benchmark, Benchmark::Glue, "{name}");
        }
        for name in ["boolq", "cb", "copa", "multirc", "record", "rte-sg", "wic", "wsc", "axb", "axg"] {
            assert_eq!(TaskRegistry::builtin().get(name).unwrap().benchmark, Benchmark::SuperGlue, "{name}");
        }
    }

    #[test]
    fn prompt_splits_into_a_constant_prefix_and_a_body() {
        let reg = TaskRegistry::builtin();
        let mr = reg.get("mr").unwrap();
        let chat = ChatTemplate::from_jinja(
            "{% if messages[0].role != 'system' %}<|im_start|>system\nignored when a system turn is given<|im_end|>\n{% endif %}{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            Default::default(),
        )
        .unwrap();
        let a = mr.prompt(Some(&chat), &[], &fields(&[("sentence", "a gorgeous film")])).unwrap();
        let b = mr.prompt(Some(&chat), &[], &fields(&[("sentence", "dull, dull, dull")])).unwrap();
        assert_eq!(a.prefix, b.prefix);
        assert!(a.prefix.starts_with("<|im_start|>system\nYou are an assistant that analyses the sentiment"));
        assert!(a.prefix.ends_with("<|im_start|>user\nSentence: \""));
        assert_eq!(
            a.body,
            "a gorgeous film\"\nWhat is the sentiment of this sentence?<|im_end|>\n<|im_start|>assistant\n<Judgement>"
        );
        assert!(a.text().contains("{only one of \"Negative\", \"Positive\"}"));
        assert_eq!(a.fields, vec![0.."a gorgeous film".len()]);
        // Shots go into the prefix as earlier turns.
        let shot = fields(&[("sentence", "awful")]);
        let c = mr.prompt(Some(&chat), &[(&shot, Label::Class(0))], &fields(&[("sentence", "x")])).unwrap();
        assert!(c.prefix.contains("Sentence: \"awful\"\nWhat is the sentiment of this sentence?<|im_end|>\n<|im_start|>assistant\n<Judgement> Negative </Judgement><|im_end|>\n"));
        assert_eq!(c.body, b.body.replace("dull, dull, dull", "x"));
    }

    #[test]
    fn prompt_splits_at_the_earliest_field_even_if_listed_later() {
        let reg = TaskRegistry::builtin();
        let copa = reg.get("copa").unwrap();
        let f = fields(&[("premise", "P"), ("question", "effect"), ("choice1", "A"), ("choice2", "B")]);
        let p = copa.prompt(None, &[], &f).unwrap();
        assert!(p.prefix.ends_with("User: Premise: \""));
        assert!(p
            .body
            .starts_with("P\"\nWhich option is the more plausible effect?\nOption one: \"A\"\nOption two: \"B\""));
        assert!(p.body.ends_with("Assistant: <Judgement>"));
        let spans: Vec<&str> = p.fields.iter().map(|r| &p.body[r.clone()]).collect();
        assert_eq!(spans, ["P", "effect", "A", "B"], "the field values' ranges, in body order");
    }

    #[test]
    fn labels_map_from_file_spellings() {
        let reg = TaskRegistry::builtin();
        assert_eq!(reg.get("mnli-m").unwrap().parse_label("neutral").unwrap(), Label::Class(1));
        assert_eq!(reg.get("qnli").unwrap().parse_label("not_entailment").unwrap(), Label::Class(1));
        assert_eq!(reg.get("boolq").unwrap().parse_label("True").unwrap(), Label::Class(1));
        assert_eq!(reg.get("stsb").unwrap().parse_label("3.8").unwrap(), Label::Score(3.8));
        assert!(reg.get("stsb").unwrap().parse_label("7").is_err());
        let err = reg.get("sst2").unwrap().parse_label("positive").unwrap_err().to_string();
        assert!(err.contains("sst2") && err.contains("positive"), "{err}");
    }

    #[test]
    fn scored_texts_are_the_answers_or_their_words() {
        let reg = TaskRegistry::builtin();
        let mr = reg.get("mr").unwrap();
        assert_eq!(mr.scored_texts(AnswerScoring::Full), [" Negative </Judgement>", " Positive </Judgement>"]);
        assert_eq!(mr.scored_texts(AnswerScoring::Word), [" Negative", " Positive"]);
        for (text, want) in [("full", AnswerScoring::Full), ("word", AnswerScoring::Word)] {
            assert_eq!(text.parse::<AnswerScoring>().unwrap(), want);
            assert_eq!(want.to_string(), text);
        }
        assert_eq!("label".parse::<AnswerScoring>(), Err(ScoringError::Unknown("label".into())));
        // A word whose tokens begin another's cannot be scored alone; full answers can.
        let prefixed = [vec![5, 7], vec![5, 7, 9]];
        assert!(AnswerScoring::Word.check("t", &prefixed).unwrap_err().to_string().contains("full answer scoring"));
        assert_eq!(
            AnswerScoring::Word.check("t", &prefixed),
            Err(ScoringError::WordPrefix { task: "t".into(), word: 0, longer: 1 })
        );
        assert!(AnswerScoring::Full.check("t", &prefixed).is_ok());
        assert!(AnswerScoring::Word.check("t", &[vec![5], vec![6, 7]]).is_ok());
        assert_eq!(
            AnswerScoring::Full.check("t", &[vec![5], vec![]]),
            Err(ScoringError::EmptyAnswer { task: "t".into() })
        );
        // A task whose words cannot be scored alone falls back to its full answers, saying why.
        let by_len = |t: &str| Ok::<_, String>(vec![7; t.len()]);
        let got = mr.scored_candidates(AnswerScoring::Word, by_len).unwrap();
        assert_eq!((got.scoring, got.candidates.len()), (AnswerScoring::Full, 2));
        assert!(got.fallback.unwrap().contains("scored in full"));
        let by_first = |t: &str| Ok::<_, String>(vec![t.as_bytes()[1] as u32]);
        let got = mr.scored_candidates(AnswerScoring::Word, by_first).unwrap();
        let want = vec![vec![u32::from(b'N')], vec![u32::from(b'P')]];
        assert_eq!(got, ScoredCandidates { scoring: AnswerScoring::Word, candidates: want, fallback: None });
    }

    #[test]
    fn answers_parse_only_when_unambiguous() {
        let reg = TaskRegistry::builtin();
        let mr = reg.get("mr").unwrap();
        assert_eq!(mr.parse_answer(" Positive </Judgement>\n<Analysis> ..."), Some(Label::Class(1)));
        assert_eq!(mr.parse_answer(" negative.</Judgement>"), Some(Label::Class(0)));
        assert_eq!(mr.parse_answer(" Positive"), None, "no closing tag");
        assert_eq!(mr.parse_answer(" Positive </Judgement"), Some(Label::Class(1)), "stopped at the stem");
        assert_eq!(mr.parse_answer(" Positive or Negative </Judgement>"), None, "both words");
        assert_eq!(mr.parse_answer(" Positively </Judgement>"), None, "not the whole word");
        let copa = reg.get("copa").unwrap();
        assert_eq!(copa.parse_answer(" Option two </Judgement>"), Some(Label::Class(1)));
        let stsb = reg.get("stsb").unwrap();
        assert_eq!(stsb.parse_answer(" 3.5 </Judgement>"), Some(Label::Score(3.5)));
        assert_eq!(stsb.parse_answer(" 9 </Judgement>"), Some(Label::Score(5.0)));
        assert_eq!(stsb.parse_answer(" none </Judgement>"), None);
    }

    #[test]
    fn predictions_are_the_argmax_or_the_expected_score() {
        let reg = TaskRegistry::builtin();
        let tweets = reg.get("tweets3").unwrap();
        assert_eq!(tweets.predict(&[0.2, 0.5, 0.3]), Label::Class(1));
        assert_eq!(tweets.predict(&[0.6, 0.1, 0.3]), Label::Class(0));
        let score = reg.get("mr-score").unwrap();
        let Label::Score(v) = score.predict(&[0.0, 0.0, 0.5, 0.0, 0.5, 0.0]) else { panic!("a score") };
        assert!((v - 3.0).abs() < 1e-12, "{v}");
        let Label::Score(v) = score.predict(&[0.1, 0.1, 0.1, 0.1, 0.1, 0.5]) else { panic!("a score") };
        assert!((v - 3.5).abs() < 1e-12, "{v}");
    }

    #[test]
    fn score_tasks_answer_with_integers() {
        let reg = TaskRegistry::builtin();
        let t = reg.get("mr-score").unwrap();
        assert_eq!(t.label_words(), vec!["0", "1", "2", "3", "4", "5"]);
        assert_eq!(t.answer_texts()[3], " 3 </Judgement>");
        assert_eq!(t.label_word(Label::Score(3.6)), "4");
        assert_eq!(t.label_of_class(3), Label::Score(3.0));
        assert_eq!(reg.get("mr").unwrap().label_of_class(1), Label::Class(1));
    }

    #[test]
    fn user_tasks_load_from_toml_and_bad_ones_are_refused() {
        let good = r#"
            name = "tickets"
            description = "Route a support ticket to the right team."
            fields = ["subject", "body"]
            instruction = "Subject: {subject}\nBody: {body}\nWhich team should handle it?"
            labels = ["Billing", "Technical"]
            raw_labels = [["billing"], ["tech", "technical"]]
            metrics = ["accuracy", "macro_f1"]
        "#;
        let t = TaskRegistry::parse_task_toml(good, "tickets.toml").unwrap();
        assert_eq!(t.parse_label("TECH").unwrap(), Label::Class(1));
        assert_eq!(t.column("subject"), "subject");
        let mapped = TaskRegistry::parse_task_toml(
            &format!("{good}\n[columns]\nsubject = \"title\"\nlabel = \"team\""),
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            (mapped.column("subject"), mapped.column("label"), mapped.column("body")),
            ("title".into(), "team".into(), "body".into())
        );
        assert_eq!(t.benchmark, Benchmark::User);
        assert_eq!(t.split_file_names("dev"), ["dev.jsonl", "dev.csv", "dev.tsv", "dev.parquet"]);
        let named =
            TaskRegistry::parse_task_toml(&format!("{good}\n[split_files]\ndev = \"held_out.csv\""), "t.toml").unwrap();
        assert_eq!(named.split_file_names("dev"), ["held_out.csv"]);
        assert_eq!(named.split_file_names("train")[0], "train.jsonl");
        let p = t.prompt(None, &[], &fields(&[("subject", "refund"), ("body", "please")])).unwrap();
        assert!(p.body.starts_with("refund\nBody: please\n"));
        for (bad, why) in [
            (good.replace("{subject}\\nBody: {body}", "{subject}"), "instruction does not use field"),
            (
                good.replace("labels = [\"Billing\", \"Technical\"]", "labels = [\"Billing\"]"),
                "at least two label words",
            ),
            (good.replace("\"macro_f1\"", "\"bleu\""), "bleu"),
            (good.replace("name = \"tickets\"", "name = \"../etc\""), "name must be"),
            (format!("{good}\nscore = {{ min = 0, max = 5 }}"), "exactly one of"),
            (format!("{good}\ncolour = \"red\""), "unknown field"),
            (format!("{good}\n[columns]\nheadline = \"title\""), "neither a field"),
        ] {
            let err = TaskRegistry::parse_task_toml(&bad, "t.toml").unwrap_err().to_string();
            assert!(err.contains(why), "expected {why:?} in {err}");
        }
        let mut reg = TaskRegistry::builtin();
        let dir = std::env::temp_dir().join(format!("verdict-task-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(&path, good.replace("tickets", "mr")).unwrap();
        assert!(reg.load_file(&path).unwrap_err().to_string().contains("already exists"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn template_hash_changes_with_the_wording() {
        let reg = TaskRegistry::builtin();
        let mut t = reg.get("mr").unwrap().clone();
        let h = t.template_hash();
        assert_eq!(h, reg.get("mr").unwrap().template_hash());
        t.instruction = t.instruction.replace("sentiment", "feeling");
        assert_ne!(h, t.template_hash());
    }

    /// The registry, not the readers, knows each task's file names and how its examples group.
    #[test]
    fn the_registry_names_split_files_and_groupings() {
        let reg = TaskRegistry::builtin();
        let files = |task: &str, split: &str| reg.get(task).unwrap().split_file_names(split);
        assert_eq!(files("mnli-m", "dev"), ["dev_matched.tsv"]);
        assert_eq!(files("mnli-mm", "dev"), ["dev_mismatched.tsv"]);
        assert_eq!(files("mnli-mm", "test"), ["test_mismatched.tsv"]);
        assert_eq!(files("mnli-m", "train"), ["train.tsv"]);
        assert_eq!(files("sst2", "dev"), ["dev.tsv"]);
        assert_eq!(files("boolq", "dev"), ["val.jsonl"]);
        assert_eq!(files("boolq", "train"), ["train.jsonl"]);
        assert_eq!(files("mr", "test")[0], "test.jsonl");
        let grouping = |task: &str| reg.get(task).unwrap().grouping();
        assert_eq!(grouping("record"), Grouping::Candidates { field: "entity".into() });
        assert_eq!(grouping("multirc"), Grouping::Questions);
        assert_eq!(grouping("sst2"), Grouping::Alone);
        assert_eq!(grouping("mr"), Grouping::Alone);
    }

    /// A user task scored as ReCoRD is grouped by the field it names, which need not be the
    /// last; without one, or with one that is not a field, or on other metrics, it is refused.
    #[test]
    fn candidate_tasks_name_their_candidate_field() {
        let file = |extra: &str, metrics: &str| {
            format!(
                "name = \"cands\"\ndescription = \"d\"\nfields = [\"option\", \"question\"]\n\
                 instruction = \"Q: {{question}} A: {{option}}\"\nlabels = [\"No\", \"Yes\"]\n\
                 metrics = [{metrics}]\n{extra}"
            )
        };
        let t =
            TaskRegistry::parse_task_toml(&file("candidate_field = \"option\"", "\"record_f1\""), "t.toml").unwrap();
        assert_eq!(t.grouping(), Grouping::Candidates { field: "option".into() });
        let err = |text: String| TaskRegistry::parse_task_toml(&text, "t.toml").unwrap_err().to_string();
        assert!(err(file("", "\"record_em\"")).contains("candidate_field"));
        assert!(err(file("candidate_field = \"entity\"", "\"record_f1\"")).contains("not one of the fields"));
        assert!(err(file("candidate_field = \"option\"", "\"accuracy\"")).contains("only for record_f1"));
    }
}
