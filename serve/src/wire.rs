//! Wire types: the JSON bodies of every route (Verdict's `/v1`, TEI's, vLLM's), with their
//! OpenAPI schemas. No behaviour: parsing and limits are `infer`'s, handlers `http`'s.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Which end of a long input truncation keeps: `Right` cuts the end (keeps the start),
/// `Left` cuts the start (keeps the end). TEI's `truncation_direction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ToSchema)]
pub enum TruncationDirection {
    #[serde(alias = "left")]
    Left,
    #[default]
    #[serde(alias = "right")]
    Right,
}

/// `POST /v1/classify`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// Task name from the registry (`GET /v1/tasks`).
    #[schema(example = "mr")]
    pub task: String,
    /// An adapter version to answer with instead of the task's current one.
    #[serde(default)]
    pub version: Option<String>,
    /// One input or a list. An input is an object with the task's fields, or a plain string
    /// for a task with one field.
    #[schema(value_type = InputsDoc)]
    pub inputs: Value,
    /// Cut inputs longer than the token limit instead of refusing them (default: the
    /// server's `--truncate`).
    #[serde(default)]
    pub truncate: Option<bool>,
}

/// One text: not blank (documentation type).
#[allow(dead_code)]
#[derive(Deserialize, ToSchema)]
pub struct TextDoc(String);

/// One input or a list of inputs (documentation type).
#[allow(dead_code)]
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum InputsDoc {
    One(InputDoc),
    Many(InputListDoc),
}

/// One input or more (documentation type).
#[allow(dead_code)]
#[derive(Deserialize, ToSchema)]
pub struct InputListDoc(Vec<InputDoc>);

/// One input: the task's fields, or a string for a one-field task (documentation type).
#[allow(dead_code)]
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum InputDoc {
    Text(TextDoc),
    Fields(BTreeMap<String, TextDoc>),
}

/// The answer for one input.
#[derive(Serialize, ToSchema)]
pub struct Classification {
    /// The most likely label word (score tasks: the expected score, rounded).
    pub label: String,
    /// Probability of every label word (they sum to one).
    pub probabilities: BTreeMap<String, f64>,
    /// Score tasks: the expected score over the label integers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// The adapter version that answered (`null`: zero-shot, the base model alone).
    pub adapter_version: Option<String>,
    /// The input was cut to the token limit.
    pub truncated: bool,
}

/// `POST /v1/classify` answer.
#[derive(Serialize, ToSchema)]
pub struct ClassifyResponse {
    pub task: String,
    /// The adapter version that answered every input of this request (`null`: zero-shot).
    pub adapter_version: Option<String>,
    /// One per input, in order.
    pub results: Vec<Classification>,
}

/// `POST /predict` and `POST /` (Text Embeddings Inference's predict API).
#[derive(Deserialize, ToSchema)]
pub struct PredictRequest {
    /// As TEI: `"text"` or `["text"]` (one input), `["a", "b"]` (one pair: the task's first
    /// two fields), `[["a"], ["a", "b"], ...]` (a batch of single texts and pairs).
    #[schema(value_type = PredictInputDoc)]
    pub inputs: Value,
    /// Unnormalised log-probabilities of each label's answer (an encoder: the head's logits)
    /// instead of probabilities.
    #[serde(default)]
    pub raw_scores: bool,
    /// Cut long inputs instead of refusing them.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// With `truncate`: `Right` (default) cuts the end of a long input, `Left` its start.
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
}

/// TEI's `inputs` (documentation type).
#[allow(dead_code)]
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PredictInputDoc {
    /// One text.
    Text(TextDoc),
    /// One text (`["a"]`) or one pair (`["a", "b"]`).
    Sequence(SequenceDoc),
    /// A batch (at most `--max-inputs`, default 64): each item one text or one pair.
    Batch(BatchDoc),
}

/// One text or a pair: one or two strings (documentation type).
#[allow(dead_code)]
#[derive(Deserialize, ToSchema)]
pub struct SequenceDoc(Vec<TextDoc>);

/// A TEI batch (documentation type).
#[allow(dead_code)]
#[derive(Deserialize, ToSchema)]
pub struct BatchDoc(Vec<SequenceDoc>);

/// `POST /v1/tokenize`: the tokens the engine would run for each input.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    #[schema(example = "mr")]
    pub task: String,
    /// As `/v1/classify`'s.
    #[schema(value_type = InputsDoc)]
    pub inputs: Value,
    #[serde(default)]
    pub truncate: Option<bool>,
}

/// `POST /v1/tokenize` answer.
#[derive(Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub task: String,
    /// The task's constant prompt prefix (a decoder's; empty for an encoder).
    pub prefix_ids: Vec<u32>,
    /// One per input, in order.
    pub results: Vec<TokenizedInput>,
}

/// One input's tokens: a decoder's prompt body, an encoder's whole input.
#[derive(Serialize, ToSchema)]
pub struct TokenizedInput {
    pub ids: Vec<u32>,
    /// Per id: a special token of the tokenizer (only the template's own markers; input
    /// text is read as plain text).
    pub special: Vec<bool>,
    pub truncated: bool,
}

/// `/predict`'s answer (documentation type): one list for one input, one per input of a batch.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum PredictResponseDoc {
    One(Vec<Prediction>),
    Batch(Vec<Vec<Prediction>>),
}

/// One label's score, TEI's shape.
#[derive(Serialize, ToSchema)]
pub struct Prediction {
    pub label: String,
    pub score: f64,
}

/// `GET /v1/tasks` entry.
#[derive(Serialize, ToSchema)]
pub struct TaskInfo {
    pub name: String,
    pub description: String,
    /// Input fields, in order.
    pub fields: Vec<String>,
    /// Label words, in class order.
    pub labels: Vec<String>,
    /// A score task answers a number.
    pub score_task: bool,
    pub template_version: u32,
    pub template_hash: String,
    /// The serving adapter version, if any.
    pub adapter_version: Option<String>,
    /// Whether `/v1/classify` answers it now (an adapter, or zero-shot allowed).
    pub serving: bool,
    /// What its probabilities compare: `full` answers or label `word`s alone
    /// (`--answer-scoring`); absent for an encoder's head.
    pub answer_scoring: Option<String>,
    /// How prompts are laid out: the model's chat template, or a plain layout for a model
    /// without one; absent for an encoder.
    pub prompt_layout: Option<String>,
}

/// `POST /tokenize` (TEI's).
#[derive(serde::Deserialize, ToSchema)]
pub struct TeiTokenizeRequest {
    /// One text or a list of texts.
    #[schema(value_type = InputsTextDoc)]
    pub inputs: Value,
    /// `true` (default): the tokens the engine runs for the default task (a one-field task):
    /// its prompt prefix and body around the text, the template's markers special; `false`:
    /// the text's own tokens, as the server reads input text (never a special token).
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

/// One text or a list of texts (documentation type).
#[allow(dead_code)]
#[derive(serde::Deserialize, ToSchema)]
#[serde(untagged)]
pub enum InputsTextDoc {
    One(TextDoc),
    Many(TextListDoc),
}

/// One text or more (documentation type).
#[allow(dead_code)]
#[derive(serde::Deserialize, ToSchema)]
pub struct TextListDoc(Vec<TextDoc>);

/// One token, TEI's `SimpleToken`.
#[derive(Serialize, ToSchema)]
pub struct TeiToken {
    pub id: u32,
    /// The token's text.
    pub text: String,
    /// A special token of the tokenizer.
    pub special: bool,
    /// Character offsets of the token in the input text (`null` for the prompt's own tokens).
    pub start: Option<usize>,
    pub stop: Option<usize>,
}

/// `POST /classify` (vLLM's classification API).
#[derive(serde::Deserialize, ToSchema)]
pub struct VllmClassifyRequest {
    /// `"<task>"` (its serving version) or `"<task>:<version>"` (a loaded version); absent:
    /// the default task.
    #[schema(example = "mr:v2")]
    #[serde(default)]
    pub model: Option<String>,
    /// One text or a list of texts, for a task of one field.
    #[schema(value_type = InputsTextDoc)]
    pub input: Value,
    /// Keep only the last k tokens of each input (vLLM's left truncation): k from 1 to the
    /// server's `--max-input-tokens`, or `-1` for `--max-input-tokens` itself (a larger k: 400).
    /// Absent: an input over `--max-input-tokens` is refused, or with `--truncate` cut at its end.
    #[schema(minimum = -1)]
    #[serde(default, deserialize_with = "integral")]
    pub truncate_prompt_tokens: Option<i64>,
}

/// An optional integer that may be written as a number with no fraction (`6.0`), as JSON
/// Schema's `integer` (and vLLM's pydantic) counts it.
fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
            _ => Err(D::Error::custom(format!("expected an integer, not {n}"))),
        },
    }
}

/// One text's answer, vLLM's `ClassificationData`.
#[derive(Serialize, ToSchema)]
pub struct VllmClassification {
    pub index: usize,
    /// The most likely label word.
    pub label: String,
    /// Each label's probability, in the task's label order (`/v1/tasks`).
    pub probs: Vec<f64>,
    pub num_classes: usize,
}

/// vLLM's `UsageInfo`.
#[derive(Serialize, ToSchema)]
pub struct VllmUsage {
    /// Tokens the model read: each input's prompt, its cached prefix included.
    pub prompt_tokens: usize,
    pub total_tokens: usize,
    pub completion_tokens: usize,
}

/// `POST /classify` answer, vLLM's `ClassificationResponse`.
#[derive(Serialize, ToSchema)]
pub struct VllmClassifyResponse {
    /// `classify-<request id>`.
    pub id: String,
    /// `list`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// `<task>:<version>` that answered (`<task>` alone: zero-shot).
    pub model: String,
    pub data: Vec<VllmClassification>,
    pub usage: VllmUsage,
}

/// vLLM's `ErrorResponse`.
#[derive(Serialize, ToSchema)]
pub struct VllmErrorBody {
    pub error: VllmErrorInfo,
}

/// vLLM's `ErrorInfo`: `code` is the HTTP status.
#[derive(Serialize, ToSchema)]
pub struct VllmErrorInfo {
    pub message: String,
    /// `BadRequestError`, `NotFoundError`, `ServiceUnavailableError`, `InternalServerError`, ...
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: u16,
}

/// The outcome of an admin call.
#[derive(Serialize, ToSchema)]
pub struct AdapterChange {
    pub task: String,
    pub version: String,
    /// `loaded`, `promoted`, `unloaded`, `rolled_back`.
    pub action: String,
    /// The version serving the task after the call.
    pub current: Option<String>,
}

/// What the server runs: the model, its CPU kernels and the batching mode (with the
/// measurement that chose it), and TEI's `/info` fields.
#[derive(Serialize, ToSchema)]
pub struct Info {
    /// The model file or directory.
    pub model: String,
    /// The kernels' precision, the CPU and its instruction sets (decoders on the CPU).
    pub kernels: String,
    pub batching: crate::tuning::Choice,
    pub version: String,
    /// TEI: the model (as `model`).
    pub model_id: String,
    /// TEI: the sha256 of the base weights (the fingerprint adapters are checked against).
    pub model_sha: String,
    /// TEI: `float32`, `float16` or `bfloat16`.
    pub model_dtype: String,
    /// TEI: `{"classifier": {"id2label", "label2id"}}`, the default task's labels (empty
    /// maps without a default task).
    #[schema(value_type = Object)]
    pub model_type: Value,
    /// The task the TEI routes answer (none when it is ambiguous).
    pub default_task: Option<String>,
    /// TEI: requests waiting for the engine at most (`--max-queue`).
    pub max_concurrent_requests: usize,
    /// TEI: tokens of one input at most (`--max-input-tokens`).
    pub max_input_length: usize,
    /// TEI: tokens of one engine batch at most (`--max-batch-tokens`).
    pub max_batch_tokens: usize,
    /// TEI: inputs of one engine batch at most (`--max-batch-rows`).
    pub max_batch_requests: usize,
    /// TEI: inputs of one request at most (`--max-inputs`).
    pub max_client_batch_size: usize,
    /// TEI: whether long inputs are cut by default (`--truncate`).
    pub auto_truncate: bool,
}
