//! The HTTP API's types (with their OpenAPI schemas), its one error type with stable codes,
//! and input validation: from a request's JSON to the prompt tokens of each input.

use crate::backend::Backend;
use crate::contract::TaskEntry;
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::task::Label;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Every error the API returns: an HTTP status, a stable machine-readable code and a message
/// for people. Rendered as `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, sent as `Retry-After` (queue full, not ready).
    pub retry_after: Option<u64>,
}

/// The JSON body of every error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable: clients may match on it (see docs/serving.md).
    pub code: String,
    pub message: String,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 422 with `code`: well-formed JSON whose content cannot be served.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// Adds a `Retry-After`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// TEI's status and `error_type` for this error, as TEI's router maps its error kinds:
    /// Validation 413 (limits), Empty 400, Overloaded 429, Unhealthy 503, Backend 424; a body
    /// of the wrong shape is 422 (as TEI's JSON extractor answers it), Validation too.
    pub fn tei_kind(&self) -> (StatusCode, &'static str) {
        match self.code {
            "queue_full" => (StatusCode::TOO_MANY_REQUESTS, "Overloaded"),
            "not_ready" | "shutting_down" => (StatusCode::SERVICE_UNAVAILABLE, "Unhealthy"),
            "internal" => (StatusCode::FAILED_DEPENDENCY, "Backend"),
            "timeout" => (self.status, "Backend"),
            "no_inputs" | "empty_input" => (StatusCode::BAD_REQUEST, "Empty"),
            "too_many_inputs" | "input_too_long" | "body_too_large" => (StatusCode::PAYLOAD_TOO_LARGE, "Validation"),
            "invalid_input" | "unknown_field" | "missing_field" | "invalid_request" => {
                (StatusCode::UNPROCESSABLE_ENTITY, "Validation")
            }
            _ => (self.status, "Validation"),
        }
    }

    /// The HTTP response of a TEI route (`/predict`, `POST /`, `/tokenize`, `/info`):
    /// TEI's body `{"error": ..., "error_type": ...}` and status ([`ApiError::tei_kind`]).
    pub fn tei_response(&self) -> HttpResponse {
        let (status, error_type) = self.tei_kind();
        let mut r = HttpResponse::build(status);
        if let Some(s) = self.retry_after {
            r.insert_header(("Retry-After", s.to_string()));
        }
        r.json(TeiErrorBody { error: self.message.clone(), error_type: error_type.to_string() })
    }

    /// The HTTP response.
    pub fn response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if let Some(s) = self.retry_after {
            r.insert_header(("Retry-After", s.to_string()));
        }
        r.json(ErrorBody { error: ErrorDetail { code: self.code.to_string(), message: self.message.clone() } })
    }
}

/// The error body of the TEI routes, TEI's `ErrorResponse`.
#[derive(Serialize, ToSchema)]
pub struct TeiErrorBody {
    pub error: String,
    /// `Validation`, `Tokenizer`, `Empty`, `Overloaded`, `Unhealthy` or `Backend`.
    pub error_type: String,
}

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
}

/// Limits on what one request may ask.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_inputs: usize,
    pub max_input_tokens: usize,
    pub truncate: bool,
    pub request_timeout: std::time::Duration,
}

/// One input's prompt body (an encoder's whole input), ready for the engine.
pub struct PreparedInput {
    pub body: Vec<u32>,
    /// An encoder input's segment ids (empty for a decoder).
    pub type_ids: Vec<u32>,
    pub truncated: bool,
}

/// A request's inputs as field maps, checked against the task's fields.
pub fn parse_inputs(
    entry: &TaskEntry,
    inputs: Value,
    limits: &Limits,
) -> Result<Vec<BTreeMap<String, String>>, ApiError> {
    let items = match inputs {
        Value::Array(items) => items,
        one => vec![one],
    };
    if items.is_empty() {
        return Err(ApiError::unprocessable("no_inputs", "`inputs` is empty"));
    }
    if items.len() > limits.max_inputs {
        return Err(ApiError::unprocessable(
            "too_many_inputs",
            format!("{} inputs, at most {} per request (--max-inputs)", items.len(), limits.max_inputs),
        ));
    }
    items.into_iter().enumerate().map(|(i, v)| input_fields(entry, v, i)).collect()
}

fn input_fields(entry: &TaskEntry, v: Value, i: usize) -> Result<BTreeMap<String, String>, ApiError> {
    let fields = &entry.task.fields;
    match v {
        Value::String(s) if fields.len() == 1 => Ok(BTreeMap::from([(fields[0].clone(), s)])),
        Value::String(_) => Err(ApiError::unprocessable(
            "invalid_input",
            format!("input {i}: task {} takes the fields {fields:?}: give an object", entry.task.name),
        )),
        Value::Object(map) => {
            let mut out = BTreeMap::new();
            for (k, v) in map {
                if !fields.contains(&k) {
                    return Err(ApiError::unprocessable(
                        "unknown_field",
                        format!("input {i}: task {} has no field {k:?} (fields: {fields:?})", entry.task.name),
                    ));
                }
                match v {
                    Value::String(s) => out.insert(k, s),
                    other => {
                        return Err(ApiError::unprocessable(
                            "invalid_input",
                            format!("input {i}: field {k:?} must be a string, not {}", kind(&other)),
                        ))
                    }
                };
            }
            if let Some(missing) = fields.iter().find(|f| !out.contains_key(*f)) {
                return Err(ApiError::unprocessable(
                    "missing_field",
                    format!("input {i}: task {} needs field {missing:?}", entry.task.name),
                ));
            }
            Ok(out)
        }
        other => Err(ApiError::unprocessable(
            "invalid_input",
            format!("input {i}: expected an object of fields or a string, not {}", kind(&other)),
        )),
    }
}

/// A JSON value's type, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Tokenizes each input: a decoder's prompt body (the task's template around the fields), or
/// an encoder's `[CLS] field [SEP] field [SEP]` (fields in the task's order) with segment ids.
/// Inputs over `max_input_tokens` (all fields together) are cut, longest field first, at the
/// end (`Some(Right)`) or the start (`Some(Left)`) of each cut field; refused with `None`.
/// Runs off the async runtime.
pub fn prepare(
    backend: &Backend,
    entry: &TaskEntry,
    inputs: Vec<BTreeMap<String, String>>,
    limits: &Limits,
    truncate: Option<TruncationDirection>,
) -> Result<Vec<PreparedInput>, ApiError> {
    let tok_err = |e: models::Error| ApiError::unprocessable("invalid_input", format!("cannot tokenize: {e}"));
    let mut out = Vec::with_capacity(inputs.len());
    for (i, mut fields) in inputs.into_iter().enumerate() {
        if fields.values().any(|v| v.trim().is_empty()) {
            return Err(ApiError::unprocessable("empty_input", format!("input {i}: a field is empty")));
        }
        let ids: Vec<(String, Vec<u32>)> = fields
            .iter()
            .map(|(k, v)| Ok((k.clone(), backend.encode(v)?)))
            .collect::<Result<_, models::Error>>()
            .map_err(tok_err)?;
        let total: usize = ids.iter().map(|(_, t)| t.len()).sum();
        let mut keep: Vec<usize> = ids.iter().map(|(_, t)| t.len()).collect();
        let truncated = total > limits.max_input_tokens;
        if truncated {
            if truncate.is_none() {
                return Err(ApiError::unprocessable(
                    "input_too_long",
                    format!(
                        "input {i}: {total} tokens, at most {} (--max-input-tokens; or ask for truncation)",
                        limits.max_input_tokens
                    ),
                ));
            }
            keep = fit_lengths(keep, limits.max_input_tokens);
        }
        let too_long = |context: usize| {
            ApiError::unprocessable(
                "input_too_long",
                format!("input {i}: the prompt exceeds the model's context of {context} tokens"),
            )
        };
        match backend {
            Backend::Decoder(loaded) => {
                for ((k, t), &n) in ids.iter().zip(&keep) {
                    if n < t.len() {
                        let text = loaded.decode(kept(t, n, truncate)).map_err(tok_err)?;
                        fields.insert(k.clone(), text);
                    }
                }
                let parts = entry
                    .task
                    .prompt(loaded.chat.as_ref(), &[], &fields)
                    .map_err(|e| ApiError::unprocessable("invalid_input", format!("input {i}: {e}")))?;
                if parts.prefix != entry.prefix_text {
                    return Err(ApiError::unprocessable(
                        "invalid_input",
                        format!("input {i}: the input changes the prompt's prefix"),
                    ));
                }
                let body = loaded.encode_body(&parts).map_err(tok_err)?;
                let context = loaded.model.config().max_position_embeddings;
                if entry.prefix_ids.len() + body.len() + entry.max_answer_len() > context {
                    return Err(too_long(context));
                }
                out.push(PreparedInput { body, type_ids: Vec::new(), truncated });
            }
            Backend::Encoder(encoder) => {
                // The kept tokens themselves (no detour through text), in the task's field order.
                let texts: Vec<&[u32]> = entry
                    .task
                    .fields
                    .iter()
                    .filter_map(|f| ids.iter().position(|(k, _)| k == f))
                    .map(|j| kept(&ids[j].1, keep[j], truncate))
                    .collect();
                let input = encoder.input(&texts);
                if input.ids.len() > encoder.max_len() {
                    return Err(too_long(encoder.max_len()));
                }
                out.push(PreparedInput { body: input.ids, type_ids: input.type_ids, truncated });
            }
        }
    }
    Ok(out)
}

/// The `n` tokens of `t` that truncation keeps: the first (`Right`), or the last (`Left`).
fn kept(t: &[u32], n: usize, side: Option<TruncationDirection>) -> &[u32] {
    match side {
        Some(TruncationDirection::Left) => &t[t.len() - n.min(t.len())..],
        _ => &t[..n.min(t.len())],
    }
}

/// Field lengths cut to `budget` tokens in all: the longest field down towards the next
/// longest, until the input fits.
fn fit_lengths(mut lens: Vec<usize>, budget: usize) -> Vec<usize> {
    let total: usize = lens.iter().sum();
    let mut excess = total.saturating_sub(budget);
    while excess > 0 {
        let Some((j, &longest)) = lens.iter().enumerate().max_by_key(|(_, l)| **l) else { break };
        let second = lens.iter().enumerate().filter(|(k, _)| *k != j).map(|(_, l)| *l).max().unwrap_or(0);
        let cut = excess.min((longest - second).max(1)).min(longest);
        if cut == 0 {
            break;
        }
        lens[j] -= cut;
        excess -= cut;
    }
    lens
}

/// Label, probabilities and score of one input from its candidate log-probabilities.
pub fn classification(entry: &TaskEntry, logps: &[f64], version: Option<&str>, truncated: bool) -> Classification {
    let probs = models::scoring::normalize(logps);
    let task = &entry.task;
    let predicted = task.predict(&probs);
    Classification {
        label: task.label_word(predicted),
        probabilities: task.label_words().into_iter().zip(probs.iter().copied()).collect(),
        score: match predicted {
            Label::Score(v) => Some(v),
            Label::Class(_) => None,
        },
        adapter_version: version.map(str::to_string),
        truncated,
    }
}
