//! The inference layer between the routes and the queue: the server's shared state, a
//! request's inputs parsed and checked against its task and the limits, the adapter version it
//! runs with (only loaded ones), tokenizing through the backend, submitting to the queue and
//! waiting with the request's timeout. Knows no route and no HTTP framing beyond the error type.

use crate::adapters::{AdapterError, AdapterTable};
use crate::backend::{Backend, InputError, KeptField};
use crate::contract::AdapterVersion;
use crate::contract::{Row, TaskEntry};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::queue::{Job, Scheduler, SubmitError};
use crate::wire::{Classification, TruncationDirection};
use actix_web::http::StatusCode;
use actix_web::web;
use serde_json::Value;
use shared::registry::RegistryError;
use shared::task::Label;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What exists once the model and adapters are loaded.
pub struct Ready {
    pub backend: Backend,
    pub tasks: BTreeMap<String, Arc<TaskEntry>>,
    pub adapters: Arc<AdapterTable>,
    pub scheduler: Arc<Scheduler>,
    /// The batching mode and how it was chosen (`tuning`).
    pub serving: crate::tuning::Choice,
    /// The CPU kernels the model runs on, one line.
    pub kernels: String,
}

/// Everything the handlers share.
pub struct AppState {
    /// Set once loading finishes; `/ready` is 503 until then.
    pub ready: OnceLock<Ready>,
    pub model_path: String,
    /// The weights' dtype as TEI names it (`float32`, `float16`, `bfloat16`).
    pub model_dtype: String,
    /// The engine's batch and queue limits (`/info`).
    pub batch: crate::queue::BatchOptions,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// Admin endpoints need `Authorization: Bearer <token>`; `None` disables them.
    pub admin_token: Option<String>,
    /// With a key, the inference and information routes need `Authorization: Bearer <key>`
    /// (`--api-key`, as TEI's); probes, metrics and the OpenAPI document stay open.
    pub api_key: Option<String>,
    /// Answer tasks without an adapter with the base model alone.
    pub zero_shot: bool,
    /// The task `/predict` answers (default: the only task with an adapter).
    pub default_task: Option<String>,
}

impl AppState {
    pub(crate) fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the model is still loading").retry_after(1)
        })
    }
}

/// What a handler learned about its request, for the access line: as far as the request got
/// (one refused before its task is known has no task). Handlers put it in their response's
/// extensions.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// A task the server knows, never a name from the request that is not one.
    pub task: Option<String>,
    /// The adapter version acted on or answering (none: zero-shot, or not reached).
    pub version: Option<String>,
    pub inputs: Option<usize>,
    /// Prompt-body tokens of the inputs, as the engine runs them.
    pub tokens: Option<usize>,
    /// Time in the engine's queue, the batch wait included.
    pub queued: Option<Duration>,
    /// Time tokenizing the inputs.
    pub tokenized: Option<Duration>,
    /// Compute time of the batch that answered.
    pub computed: Option<Duration>,
}

pub(crate) fn adapter_error(e: AdapterError) -> ApiError {
    let msg = e.to_string();
    match e {
        AdapterError::Registry(RegistryError::InvalidName { .. }) => ApiError::bad_request("invalid_name", msg),
        AdapterError::Registry(RegistryError::NoSuchVersion { .. }) => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_adapter_version", msg)
        }
        AdapterError::Registry(RegistryError::NoPrevious { .. }) => {
            ApiError::new(StatusCode::CONFLICT, "no_previous_version", msg)
        }
        AdapterError::Registry(RegistryError::VersionExists { .. }) => {
            ApiError::new(StatusCode::CONFLICT, "version_exists", msg)
        }
        AdapterError::Registry(RegistryError::Io { .. } | RegistryError::Write(_)) => ApiError::internal(msg),
        AdapterError::UnknownTask(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_task", msg),
        AdapterError::Refused { .. } => ApiError::unprocessable("adapter_refused", msg),
        AdapterError::IsCurrent { .. } => ApiError::new(StatusCode::CONFLICT, "adapter_is_current", msg),
        AdapterError::NotLoaded { .. } => ApiError::new(StatusCode::NOT_FOUND, "adapter_not_loaded", msg),
    }
}

/// Runs blocking work (tokenizing, adapter loading) on actix's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(f).await.map_err(|e| ApiError::internal(format!("worker failed: {e}")))?
}

/// One scored input.
pub(crate) struct Scored {
    pub logps: Vec<f64>,
    pub truncated: bool,
}

/// The adapter a request runs with: the named version (a loaded one: requests never load),
/// else the task's current one, else zero-shot when allowed.
pub(crate) async fn resolve_version(
    state: &AppState,
    ready: &Ready,
    task: &str,
    version: Option<String>,
) -> Result<Option<Arc<AdapterVersion>>, ApiError> {
    if let Some(v) = version {
        let adapters = ready.adapters.clone();
        let task = task.to_string();
        return blocking(move || adapters.get(&task, &v).map(Some).map_err(adapter_error)).await;
    }
    match ready.adapters.current(task) {
        Some(v) => Ok(Some(v)),
        None if state.zero_shot => Ok(None),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_adapter",
            format!("task {task} has no adapter (the server does not answer zero-shot: --zero-shot-fallback)"),
        )),
    }
}

/// Tokenizes, queues and awaits the inputs of one request (its tokens and queue time go to
/// `access`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn score_inputs(
    state: &AppState,
    ready: &Ready,
    entry: &Arc<TaskEntry>,
    version: Option<Arc<AdapterVersion>>,
    inputs: Vec<BTreeMap<String, String>>,
    limits: &Limits,
    truncate: Option<TruncationDirection>,
    started: Instant,
    access: &mut Access,
) -> Result<Vec<Scored>, ApiError> {
    access.version = version.as_ref().map(|v| v.version.clone());
    access.inputs = Some(inputs.len());
    let (backend, e, limits) = (ready.backend.clone(), entry.clone(), *limits);
    let tokenizing = Instant::now();
    let prepared = blocking(move || prepare(&backend, &e, inputs, &limits, truncate)).await?;
    access.tokenized = Some(tokenizing.elapsed());
    access.tokens = Some(prepared.iter().map(|p| p.body.len()).sum());
    let truncated: Vec<bool> = prepared.iter().map(|p| p.truncated).collect();
    let rows = prepared
        .into_iter()
        .map(|p| Row { task: entry.clone(), version: version.clone(), body: p.body, type_ids: p.type_ids })
        .collect();
    let (tx, rx) = oneshot::channel();
    ready.scheduler.submit(Job::new(rows, tx)).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            "the queue is full (--max-queue); retry shortly",
        )
        .retry_after(1),
        SubmitError::Stopped => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the server is shutting down")
        }
    })?;
    let left = state.limits.request_timeout.saturating_sub(started.elapsed());
    let logps = match tokio::time::timeout(left, rx).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("no answer within {} ms (--request-timeout-ms)", state.limits.request_timeout.as_millis()),
            ))
        }
        Ok(Err(_)) => return Err(ApiError::internal("the engine dropped the request")),
        Ok(Ok(Err(msg))) => return Err(ApiError::internal(format!("scoring failed: {msg}"))),
        Ok(Ok(Ok(answer))) => {
            access.queued = Some(answer.queued);
            access.computed = Some(answer.computed);
            answer.scores
        }
    };
    state.metrics.inputs(&entry.task.name, logps.len());
    Ok(logps.into_iter().zip(truncated).map(|(logps, truncated)| Scored { logps, truncated }).collect())
}

/// TEI's `inputs` as TEI reads them: a string or `["a"]` is one text, `["a", "b"]` one pair,
/// a list of lists a batch (each one text or a pair); `true` when it was a batch.
pub(crate) fn tei_sequences(inputs: Value) -> Result<(Vec<Vec<String>>, bool), ApiError> {
    let bad = |m: String| ApiError::unprocessable("invalid_input", m);
    let sequence = |items: &[Value]| -> Result<Vec<String>, ApiError> {
        if !(1..=2).contains(&items.len()) {
            return Err(bad(format!("a sequence is one text or a pair of texts, not {} items", items.len())));
        }
        items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| bad(format!("a text must be a string, not {}", kind(v))))
            })
            .collect()
    };
    match inputs {
        Value::String(s) => Ok((vec![vec![s]], false)),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::unprocessable("no_inputs", "`inputs` cannot be empty"))
        }
        Value::Array(items) if items[0].is_array() => {
            let batch = items
                .iter()
                .map(|v| match v {
                    Value::Array(inner) => sequence(inner),
                    other => Err(bad(format!(
                        "a batch holds [text] or [text, text] lists, not {} (TEI: [[string], [string, string], ...])",
                        kind(other)
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((batch, true))
        }
        Value::Array(items) => Ok((vec![sequence(&items)?], false)),
        other => Err(bad(format!("`inputs` must be a string, a pair or a batch, not {}", kind(&other)))),
    }
}

/// A TEI sequence as the task's fields: one text fills a one-field task, a pair the task's
/// first two fields (a task of two fields).
pub(crate) fn tei_fields(
    task: &str,
    fields: &[String],
    texts: Vec<String>,
    i: usize,
) -> Result<BTreeMap<String, String>, ApiError> {
    if texts.len() != fields.len() {
        let what = if texts.len() == 2 { "a pair" } else { "one text" };
        return Err(ApiError::unprocessable(
            "invalid_input",
            format!("input {i}: {what} for task {task}, whose inputs have {} fields {fields:?}", fields.len()),
        ));
    }
    Ok(fields.iter().cloned().zip(texts).collect())
}

/// The task the TEI routes answer: `--default-task`, else the only task with an adapter.
pub(crate) fn default_task(state: &AppState, ready: &Ready) -> Result<(String, Arc<TaskEntry>), ApiError> {
    let task = match &state.default_task {
        Some(t) => t.clone(),
        None => match ready.adapters.tasks_with_current().as_slice() {
            [one] => one.clone(),
            many => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "no_default_task",
                    format!("the TEI routes need --default-task: {} tasks have adapters", many.len()),
                ))
            }
        },
    };
    let entry = ready.tasks.get(&task).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_task",
            format!("the default task {task:?} is not in the registry"),
        )
    })?;
    Ok((task, entry))
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
    for (i, fields) in inputs.into_iter().enumerate() {
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
        let kept_ids: Vec<KeptField> = ids
            .iter()
            .zip(&keep)
            .map(|((k, t), &n)| KeptField { name: k, ids: kept(t, n, truncate), cut: n < t.len() })
            .collect();
        let (body, type_ids) = backend.input_tokens(entry, fields, &kept_ids).map_err(|e| match e {
            InputError::Tokenize(e) => tok_err(e),
            InputError::Prompt(msg) => ApiError::unprocessable("invalid_input", format!("input {i}: {msg}")),
            InputError::PrefixChanged => {
                ApiError::unprocessable("invalid_input", format!("input {i}: the input changes the prompt's prefix"))
            }
            InputError::TooLong { context } => ApiError::unprocessable(
                "input_too_long",
                format!("input {i}: the prompt exceeds the model's context of {context} tokens"),
            ),
        })?;
        out.push(PreparedInput { body, type_ids, truncated });
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
