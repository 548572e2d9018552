//! The HTTP layer: routes, middleware (request ids, the access line, the API key) and thin
//! handlers that read a request's JSON into its wire type (`wire`), hand it to the inference
//! layer (`infer`) and render the answer in the route's dialect. Every error is an
//! [`ApiError`], rendered once per dialect.

use crate::adapters::TaskAdapters;
use crate::backend::Backend;
use crate::error::{ApiError, ErrorBody, TeiErrorBody};
use crate::infer::{
    adapter_error, blocking, classification, default_task, kind, parse_inputs, prepare, resolve_version, score_inputs,
    tei_fields, tei_sequences, Access, AppState, Limits,
};
use crate::logging::ACCESS;
use crate::wire::{
    AdapterChange, Classification, ClassifyRequest, ClassifyResponse, Info, PredictInputDoc, PredictRequest,
    PredictResponseDoc, Prediction, TaskInfo, TeiToken, TeiTokenizeRequest, TokenizeRequest, TokenizeResponse,
    TokenizedInput, TruncationDirection, VllmClassification, VllmClassifyRequest, VllmClassifyResponse, VllmErrorBody,
    VllmErrorInfo, VllmUsage,
};
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use utoipa::OpenApi;

type State = web::Data<AppState>;

/// The OpenAPI document, generated from the handlers and types below.
#[derive(OpenApi)]
#[openapi(
    info(title = "verdict-serve", description = "Text classification with per-task LoRA adapters over one base model."),
    paths(classify, predict, predict_root, vllm_classify, tokenize, tei_tokenize, tasks, adapters, admin_load, admin_promote, admin_unload, admin_rollback, health, ready, info, metrics),
    components(schemas(ErrorBody, TeiErrorBody, ClassifyRequest, ClassifyResponse, Classification, PredictRequest, PredictInputDoc, TruncationDirection, Prediction, TokenizeRequest, TokenizeResponse, TokenizedInput, TeiTokenizeRequest, TeiToken, VllmClassifyRequest, VllmClassifyResponse, VllmClassification, VllmUsage, VllmErrorBody, VllmErrorInfo, TaskInfo, TaskAdapters, AdapterChange, Info, crate::tuning::Choice, crate::tuning::Timings, crate::tuning::Batching)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// Declares the admin endpoints' bearer token scheme.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// How a route renders its errors, the ones its handler never sees included (401 of
/// `--api-key`, 405 of a wrong method): Verdict's body, TEI's or vLLM's.
trait Dialect {
    const RENDER: fn(&ApiError) -> HttpResponse;
}

/// `{"error": {"code", "message"}}`.
struct Verdict;
/// TEI's `{"error", "error_type"}` ([`ApiError::tei_response`]).
struct Tei;
/// vLLM's `ErrorResponse` ([`vllm_error`]).
struct Vllm;

impl Dialect for Verdict {
    const RENDER: fn(&ApiError) -> HttpResponse = ApiError::response;
}

impl Dialect for Tei {
    const RENDER: fn(&ApiError) -> HttpResponse = ApiError::tei_response;
}

impl Dialect for Vllm {
    const RENDER: fn(&ApiError) -> HttpResponse = vllm_error;
}

/// Registers every route: each path answers one method (any other: 405 with `Allow`);
/// the inference and information routes need the `--api-key` when one is set.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        at::<Verdict, _, _>("/v1/classify", Method::POST, classify).wrap(from_fn(require_api_key::<Verdict, _>)),
    )
    .service(at::<Tei, _, _>("/predict", Method::POST, predict).wrap(from_fn(require_api_key::<Tei, _>)))
    .service(at::<Tei, _, _>("/", Method::POST, predict_root).wrap(from_fn(require_api_key::<Tei, _>)))
    .service(at::<Vllm, _, _>("/classify", Method::POST, vllm_classify).wrap(from_fn(require_api_key::<Vllm, _>)))
    .service(at::<Verdict, _, _>("/v1/tokenize", Method::POST, tokenize).wrap(from_fn(require_api_key::<Verdict, _>)))
    .service(at::<Tei, _, _>("/tokenize", Method::POST, tei_tokenize).wrap(from_fn(require_api_key::<Tei, _>)))
    .service(at::<Verdict, _, _>("/v1/tasks", Method::GET, tasks).wrap(from_fn(require_api_key::<Verdict, _>)))
    .service(at::<Verdict, _, _>("/v1/adapters", Method::GET, adapters).wrap(from_fn(require_api_key::<Verdict, _>)))
    .service(at::<Tei, _, _>("/info", Method::GET, info).wrap(from_fn(require_api_key::<Tei, _>)))
    .service(at::<Verdict, _, _>("/v1/admin/adapters/{task}/{version}/load", Method::POST, admin_load))
    .service(at::<Verdict, _, _>("/v1/admin/adapters/{task}/{version}/promote", Method::POST, admin_promote))
    .service(at::<Verdict, _, _>("/v1/admin/adapters/{task}/{version}/unload", Method::POST, admin_unload))
    .service(at::<Verdict, _, _>("/v1/admin/adapters/{task}/rollback", Method::POST, admin_rollback))
    .service(at::<Verdict, _, _>("/health", Method::GET, health))
    .service(at::<Verdict, _, _>("/ready", Method::GET, ready))
    .service(at::<Verdict, _, _>("/metrics", Method::GET, metrics))
    .service(at::<Verdict, _, _>("/openapi.json", Method::GET, openapi));
}

/// A path served by `handler` for `method` alone; other methods get 405 naming it in `Allow`,
/// in the route's dialect.
fn at<D: Dialect, F, Args>(path: &str, method: Method, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    let allow = method.clone();
    web::resource(path.to_string())
        .route(web::route().method(method).to(handler))
        .default_service(web::to(move |req: HttpRequest| method_not_allowed(req, allow.clone(), D::RENDER)))
}

/// Any path no route matches.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no endpoint {} {}", req.method(), req.path())).response()
}

async fn method_not_allowed(req: HttpRequest, allow: Method, render: fn(&ApiError) -> HttpResponse) -> HttpResponse {
    let mut resp = render(&ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {} (allowed: {allow})", req.method(), req.path()),
    ));
    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(allow.as_str()) {
        resp.headers_mut().insert(actix_web::http::header::ALLOW, v);
    }
    resp
}

/// Whether the request carries `Authorization: Bearer <secret>` (compared in constant time).
fn bearer_is(req: &HttpRequest, secret: &str) -> bool {
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (given.as_bytes(), secret.as_bytes());
    a.iter().zip(b).fold(a.len() ^ b.len(), |acc, (x, y)| acc | usize::from(x ^ y)) == 0
}

/// Makes a request id: the time in nanoseconds and a counter, unique within the process.
fn new_request_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:016x}{:06x}", nanos as u64, NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xff_ffff)
}

/// A request's id (`access_log` puts it in the request's extensions).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The id `access_log` gave this request.
fn request_id(req: &HttpRequest) -> String {
    req.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default()
}

/// Milliseconds, to the microsecond.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Every request's id and access line. The id is its `x-request-id` when it sends a plain one
/// (1-128 visible ASCII characters), else a new one; the response carries it in
/// `x-request-id`. Then one event (target `verdict::access`) per request: id, method, path,
/// what the handler reported ([`Access`]), status, latency and queue time.
pub async fn access_log(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let given = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string);
    let id = given.unwrap_or_else(new_request_id);
    req.extensions_mut().insert(RequestId(id.clone()));
    let (method, path) = (req.method().clone(), req.path().to_string());
    let result = next.call(req).await;
    let (status, access) = match &result {
        Ok(r) => (r.status(), r.response().extensions().get::<Access>().cloned().unwrap_or_default()),
        Err(e) => (e.as_response_error().status_code(), Access::default()),
    };
    tracing::info!(
        target: ACCESS,
        request_id = id.as_str(),
        method = method.as_str(),
        path = path.as_str(),
        task = access.task.as_deref(),
        version = access.version.as_deref(),
        inputs = access.inputs,
        tokens = access.tokens,
        status = status.as_u16(),
        latency_ms = millis(started.elapsed()),
        queue_ms = access.queued.map(millis),
        "request"
    );
    let mut resp = result?;
    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&id) {
        resp.headers_mut().insert(actix_web::http::header::HeaderName::from_static("x-request-id"), v);
    }
    Ok(resp)
}

/// A route's answer: its value as JSON, or its error as the route's dialect renders it
/// (Verdict's, TEI's, vLLM's); then [`finish`].
fn respond<T: Serialize>(
    state: &AppState,
    endpoint: &str,
    access: Access,
    result: Result<T, ApiError>,
    render: fn(&ApiError) -> HttpResponse,
    started: Instant,
) -> HttpResponse {
    let resp = match result {
        Ok(v) => HttpResponse::Ok().json(v),
        Err(e) => render(&e),
    };
    finish(state, endpoint, access, resp, started)
}

/// Counts a finished request and attaches what its handler learned for the access line.
fn finish(state: &AppState, endpoint: &str, access: Access, mut resp: HttpResponse, started: Instant) -> HttpResponse {
    state.metrics.request(endpoint, access.task.as_deref(), resp.status().as_u16(), started.elapsed());
    resp.extensions_mut().insert(access);
    resp
}

/// With `--api-key`, answers 401 (in the route's dialect) to a request without
/// `Authorization: Bearer <key>`.
async fn require_api_key<D: Dialect, B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let key = req.app_data::<State>().and_then(|s| s.api_key.clone());
    if let Some(key) = key {
        if !bearer_is(req.request(), &key) {
            let mut resp = D::RENDER(&ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API key is required: Authorization: Bearer <--api-key>",
            ));
            resp.headers_mut().insert(
                actix_web::http::header::WWW_AUTHENTICATE,
                actix_web::http::header::HeaderValue::from_static("Bearer"),
            );
            return Ok(req.into_response(resp).map_into_right_body());
        }
    }
    next.call(req).await.map(ServiceResponse::map_into_left_body)
}

/// Reads the body up to `limit` bytes, as UTF-8 JSON.
async fn read_json(req: &HttpRequest, payload: web::Payload, limit: usize) -> Result<Value, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body exceeds {limit} bytes (--max-body-bytes)"),
        )
    };
    let declared =
        req.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let bytes = match payload.to_bytes_limited(limit).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return Err(too_large()),
        Err(e) => return Err(ApiError::bad_request("bad_body", format!("cannot read the body: {e}"))),
    };
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_utf8", format!("the body is not UTF-8: {e}")))?;
    serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("the body is not JSON: {e}")))
}

fn from_value<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    if !v.is_object() {
        return Err(ApiError::bad_request("invalid_request", format!("expected a JSON object, got {}", kind(&v))));
    }
    serde_json::from_value(v).map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))
}

/// Classify inputs of one task: every label's probability, constrained to the label words.
#[utoipa::path(post, path = "/v1/classify", request_body = ClassifyRequest, responses(
    (status = 200, body = ClassifyResponse),
    (status = 400, description = "malformed_json, invalid_utf8, invalid_request, invalid_name", body = ErrorBody),
    (status = 404, description = "unknown_task, no_adapter, unknown_adapter_version", body = ErrorBody),
    (status = 413, description = "body_too_large", body = ErrorBody),
    (status = 422, description = "no_inputs, too_many_inputs, invalid_input, unknown_field, missing_field, empty_input, input_too_long, adapter_refused", body = ErrorBody),
    (status = 503, description = "queue_full (with Retry-After), not_ready", body = ErrorBody),
    (status = 504, description = "timeout", body = ErrorBody),
))]
async fn classify(state: State, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let started = Instant::now();
    let mut access = Access::default();
    let result = classify_inner(&state, &req, payload, &mut access, started).await;
    respond(&state, "classify", access, result, ApiError::response, started)
}

async fn classify_inner(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    access: &mut Access,
    started: Instant,
) -> Result<ClassifyResponse, ApiError> {
    let ready = state.ready()?;
    let r: ClassifyRequest = from_value(read_json(req, payload, state.limits.max_body_bytes).await?)?;
    let entry = ready.tasks.get(&r.task).cloned().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "unknown_task", format!("unknown task {:?} (GET /v1/tasks)", r.task))
    })?;
    access.task = Some(r.task.clone());
    let inputs = parse_inputs(&entry, r.inputs, &state.limits)?;
    access.inputs = Some(inputs.len());
    let version = resolve_version(state, ready, &r.task, r.version).await?;
    let name = version.as_ref().map(|v| v.version.clone());
    let truncate = r.truncate.unwrap_or(state.limits.truncate).then_some(TruncationDirection::Right);
    let scored = score_inputs(state, ready, &entry, version, inputs, &state.limits, truncate, started, access).await?;
    Ok(ClassifyResponse {
        task: r.task,
        results: scored.iter().map(|s| classification(&entry, &s.logps, name.as_deref(), s.truncated)).collect(),
        adapter_version: name,
    })
}

/// The tokens the engine would run for each input (the prompt body after the task's cached
/// prefix), and which are special: input text never produces a special token.
#[utoipa::path(post, path = "/v1/tokenize", request_body = TokenizeRequest, responses(
    (status = 200, body = TokenizeResponse),
    (status = 400, body = ErrorBody), (status = 404, description = "unknown_task", body = ErrorBody),
    (status = 413, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody),
))]
async fn tokenize(state: State, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let started = Instant::now();
    let mut access = Access::default();
    let result = tokenize_inner(&state, &req, payload, &mut access).await;
    respond(&state, "tokenize", access, result, ApiError::response, started)
}

async fn tokenize_inner(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    access: &mut Access,
) -> Result<TokenizeResponse, ApiError> {
    let ready = state.ready()?;
    let r: TokenizeRequest = from_value(read_json(req, payload, state.limits.max_body_bytes).await?)?;
    let entry = ready.tasks.get(&r.task).cloned().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "unknown_task", format!("unknown task {:?} (GET /v1/tasks)", r.task))
    })?;
    access.task = Some(r.task.clone());
    let inputs = parse_inputs(&entry, r.inputs, &state.limits)?;
    access.inputs = Some(inputs.len());
    let truncate = r.truncate.unwrap_or(state.limits.truncate).then_some(TruncationDirection::Right);
    let (backend, e, limits) = (ready.backend.clone(), entry.clone(), state.limits);
    let prepared = blocking(move || prepare(&backend, &e, inputs, &limits, truncate)).await?;
    access.tokens = Some(prepared.iter().map(|p| p.body.len()).sum());
    let special = |ids: &[u32]| ids.iter().map(|&id| ready.backend.is_special(id)).collect();
    Ok(TokenizeResponse {
        task: r.task,
        prefix_ids: entry.prefix_ids.clone(),
        results: prepared
            .into_iter()
            .map(|p| TokenizedInput { special: special(&p.body), ids: p.body, truncated: p.truncated })
            .collect(),
    })
}

/// Text Embeddings Inference's predict API for the default task: TEI clients work unchanged.
/// Errors are TEI's (`{"error", "error_type"}`, TEI's status codes).
#[utoipa::path(post, path = "/predict", request_body = PredictRequest, responses(
    (status = 200, description = "`[{label, score}]` sorted by score for one input (a text or a pair), or one such list per input of a batch", body = PredictResponseDoc),
    (status = 400, description = "Empty: no inputs, an empty text; or a body that is not JSON", body = TeiErrorBody),
    (status = 404, description = "no default task (--default-task)", body = TeiErrorBody),
    (status = 413, description = "Validation: over --max-inputs, --max-input-tokens (without truncate) or --max-body-bytes", body = TeiErrorBody),
    (status = 422, description = "Validation: inputs of the wrong shape, a pair for a one-field task", body = TeiErrorBody),
    (status = 424, description = "Backend: the batch failed", body = TeiErrorBody),
    (status = 429, description = "Overloaded: the queue is full (--max-queue), with Retry-After", body = TeiErrorBody),
    (status = 503, description = "Unhealthy: loading or shutting down", body = TeiErrorBody),
))]
async fn predict(state: State, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let started = Instant::now();
    let mut access = Access::default();
    let mut characters = 0;
    let resp = match predict_inner(&state, &req, payload, &mut access, &mut characters, started).await {
        Ok(v) => {
            let mut resp = HttpResponse::Ok();
            for (name, value) in timing_headers(&access, characters, started.elapsed()) {
                resp.insert_header((name, value));
            }
            resp.json(v)
        }
        Err(e) => e.tei_response(),
    };
    finish(&state, "predict", access, resp, started)
}

/// TEI's timing headers of a predict answer, in whole milliseconds: tokenization, queue
/// (the batch wait included) and inference (the batch's compute), their sum as compute
/// time, the request's total time in the server; and the tokens and characters computed.
fn timing_headers(access: &Access, characters: usize, total: Duration) -> Vec<(&'static str, String)> {
    let ms = |d: Option<Duration>| d.unwrap_or_default().as_millis();
    let (tokenization, queue, inference) = (ms(access.tokenized), ms(access.queued), ms(access.computed));
    vec![
        ("x-compute-time", (tokenization + queue + inference).to_string()),
        ("x-compute-tokens", access.tokens.unwrap_or(0).to_string()),
        ("x-compute-characters", characters.to_string()),
        ("x-tokenization-time", tokenization.to_string()),
        ("x-queue-time", queue.to_string()),
        ("x-inference-time", inference.to_string()),
        ("x-total-time", total.as_millis().to_string()),
    ]
}

/// TEI's `POST /`: the same as `/predict` for a classifier.
#[utoipa::path(post, path = "/", request_body = PredictRequest, responses(
    (status = 200, description = "as `/predict`", body = PredictResponseDoc),
    (status = 400, body = TeiErrorBody), (status = 413, body = TeiErrorBody), (status = 422, body = TeiErrorBody),
    (status = 429, body = TeiErrorBody), (status = 503, body = TeiErrorBody),
))]
async fn predict_root(state: State, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    predict(state, req, payload).await
}

async fn predict_inner(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    access: &mut Access,
    characters: &mut usize,
    started: Instant,
) -> Result<Value, ApiError> {
    let ready = state.ready()?;
    let body = read_json(req, payload, state.limits.max_body_bytes).await?;
    let r: PredictRequest = from_value(body).map_err(|e| ApiError { status: StatusCode::UNPROCESSABLE_ENTITY, ..e })?;
    let (task, entry) = default_task(state, ready)?;
    access.task = Some(task.clone());
    let (sequences, batched) = tei_sequences(r.inputs)?;
    access.inputs = Some(sequences.len());
    if sequences.len() > state.limits.max_inputs {
        return Err(ApiError::unprocessable(
            "too_many_inputs",
            format!(
                "batch size {} > maximum allowed batch size {} (--max-inputs)",
                sequences.len(),
                state.limits.max_inputs
            ),
        ));
    }
    *characters = sequences.iter().flatten().map(|t| t.chars().count()).sum();
    let inputs = sequences
        .into_iter()
        .enumerate()
        .map(|(i, texts)| tei_fields(&task, &entry.task.fields, texts, i))
        .collect::<Result<Vec<_>, _>>()?;
    let version = resolve_version(state, ready, &task, None).await?;
    let truncate = r.truncate.unwrap_or(state.limits.truncate).then_some(r.truncation_direction);
    let scored = score_inputs(state, ready, &entry, version, inputs, &state.limits, truncate, started, access).await?;
    let words = entry.task.label_words();
    let lists: Vec<Vec<Prediction>> = scored
        .iter()
        .map(|s| {
            let scores = if r.raw_scores { s.logps.clone() } else { models::scoring::normalize(&s.logps) };
            let mut p: Vec<Prediction> =
                words.iter().zip(scores).map(|(w, score)| Prediction { label: w.clone(), score }).collect();
            p.sort_by(|a, b| b.score.total_cmp(&a.score));
            p
        })
        .collect();
    let value = if batched { serde_json::to_value(lists) } else { serde_json::to_value(lists.into_iter().next()) };
    value.map_err(|e| ApiError::internal(e.to_string()))
}

/// TEI's tokenize: each text's tokens, one list per text.
#[utoipa::path(post, path = "/tokenize", request_body = TeiTokenizeRequest, responses(
    (status = 200, description = "one list of tokens per text", body = Vec<Vec<TeiToken>>),
    (status = 400, description = "Empty", body = TeiErrorBody), (status = 413, body = TeiErrorBody),
    (status = 422, description = "Validation", body = TeiErrorBody), (status = 503, body = TeiErrorBody),
))]
async fn tei_tokenize(state: State, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let started = Instant::now();
    let mut access = Access::default();
    let result = tei_tokenize_inner(&state, &req, payload, &mut access).await;
    respond(&state, "tokenize", access, result, ApiError::tei_response, started)
}

async fn tei_tokenize_inner(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    access: &mut Access,
) -> Result<Vec<Vec<TeiToken>>, ApiError> {
    let ready = state.ready()?;
    let body = read_json(req, payload, state.limits.max_body_bytes).await?;
    let r: TeiTokenizeRequest =
        from_value(body).map_err(|e| ApiError { status: StatusCode::UNPROCESSABLE_ENTITY, ..e })?;
    let bad = |m: String| ApiError::unprocessable("invalid_input", m);
    let texts: Vec<String> = match r.inputs {
        Value::String(s) if s.trim().is_empty() => {
            return Err(ApiError::unprocessable("empty_input", "a text is empty or blank"))
        }
        Value::String(s) => vec![s],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::unprocessable("no_inputs", "`inputs` cannot be empty"))
        }
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) if s.trim().is_empty() => {
                    Err(ApiError::unprocessable("empty_input", "a text is empty or blank"))
                }
                Value::String(s) => Ok(s),
                other => Err(bad(format!("a text must be a string, not {}", kind(&other)))),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(bad(format!("`inputs` must be a string or a list of strings, not {}", kind(&other)))),
    };
    access.inputs = Some(texts.len());
    if texts.len() > state.limits.max_inputs {
        return Err(ApiError::unprocessable(
            "too_many_inputs",
            format!(
                "batch size {} > maximum allowed batch size {} (--max-inputs)",
                texts.len(),
                state.limits.max_inputs
            ),
        ));
    }
    let (backend, limits) = (ready.backend.clone(), state.limits);
    if !r.add_special_tokens {
        return blocking(move || {
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| text_tokens(&backend, t, i, limits.max_input_tokens))
                .collect::<Result<Vec<_>, _>>()
        })
        .await;
    }
    let (task, entry) = default_task(state, ready)?;
    access.task = Some(task.clone());
    let field = match entry.task.fields.as_slice() {
        [one] => one.clone(),
        many => {
            return Err(bad(format!(
                "task {task} takes {} fields {many:?}: tokenize a text without special tokens",
                many.len()
            )))
        }
    };
    let inputs = texts.into_iter().map(|t| BTreeMap::from([(field.clone(), t)])).collect();
    let (e, truncate) = (entry.clone(), state.limits.truncate.then_some(TruncationDirection::Right));
    blocking(move || {
        let prepared = prepare(&backend, &e, inputs, &limits, truncate)?;
        let token = |id: u32| -> Result<TeiToken, ApiError> {
            let text = backend.decode(&[id]).map_err(|e| ApiError::internal(e.to_string()))?;
            Ok(TeiToken { id, text, special: backend.is_special(id), start: None, stop: None })
        };
        prepared
            .into_iter()
            .map(|p| e.prefix_ids.iter().chain(&p.body).map(|&id| token(id)).collect::<Result<Vec<_>, _>>())
            .collect()
    })
    .await
}

/// A text's own tokens (as input text is read: never special), with character offsets; at
/// most `max` (`--max-input-tokens`).
fn text_tokens(backend: &Backend, text: &str, i: usize, max: usize) -> Result<Vec<TeiToken>, ApiError> {
    let fail = |e: models::Error| ApiError::unprocessable("invalid_input", format!("cannot tokenize: {e}"));
    let ids = backend.encode(text).map_err(fail)?;
    if ids.len() > max {
        return Err(ApiError::unprocessable(
            "input_too_long",
            format!("input {i}: {} tokens, at most {max} (--max-input-tokens)", ids.len()),
        ));
    }
    let mut out = Vec::with_capacity(ids.len());
    let mut start = 0;
    for k in 0..ids.len() {
        // Offsets from the decoded prefix: where the text so far ends.
        let stop = backend.decode(&ids[..=k]).map_err(fail)?.chars().count().max(start);
        out.push(TeiToken {
            id: ids[k],
            text: backend.decode(&ids[k..=k]).map_err(fail)?,
            special: backend.is_special(ids[k]),
            start: Some(start),
            stop: Some(stop),
        });
        start = stop;
    }
    Ok(out)
}

/// An error as vLLM answers it: 404 `NotFoundError` (unknown model), other client errors
/// 400 `BadRequestError`, server errors with their status; the 401 of `--api-key` and the 405
/// of a wrong method keep their status (`AuthenticationError`, `MethodNotAllowedError`).
fn vllm_error(e: &ApiError) -> HttpResponse {
    let (status, kind) = match e.status.as_u16() {
        401 => (StatusCode::UNAUTHORIZED, "AuthenticationError"),
        404 => (StatusCode::NOT_FOUND, "NotFoundError"),
        405 => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowedError"),
        503 => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError"),
        504 => (StatusCode::GATEWAY_TIMEOUT, "TimeoutError"),
        500..=599 => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError"),
        _ => (StatusCode::BAD_REQUEST, "BadRequestError"),
    };
    let mut r = HttpResponse::build(status);
    if let Some(s) = e.retry_after {
        r.insert_header(("Retry-After", s.to_string()));
    }
    r.json(VllmErrorBody {
        error: VllmErrorInfo { message: e.message.clone(), kind: kind.to_string(), param: None, code: status.as_u16() },
    })
}

/// vLLM's classification API: `model` names the task (and version); errors are vLLM's.
#[utoipa::path(post, path = "/classify", request_body = VllmClassifyRequest, responses(
    (status = 200, body = VllmClassifyResponse),
    (status = 400, description = "BadRequestError: a body, input or model name that cannot be served, over a limit", body = VllmErrorBody),
    (status = 404, description = "NotFoundError: no such task, or the version is not loaded", body = VllmErrorBody),
    (status = 503, description = "ServiceUnavailableError: loading, queue full (Retry-After), shutting down", body = VllmErrorBody),
    (status = 504, body = VllmErrorBody),
))]
async fn vllm_classify(state: State, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let started = Instant::now();
    let mut access = Access::default();
    let result = vllm_classify_inner(&state, &req, payload, &mut access, started).await;
    respond(&state, "classify", access, result, vllm_error, started)
}

async fn vllm_classify_inner(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    access: &mut Access,
    started: Instant,
) -> Result<VllmClassifyResponse, ApiError> {
    let ready = state.ready()?;
    let r: VllmClassifyRequest = from_value(read_json(req, payload, state.limits.max_body_bytes).await?)?;
    // vLLM's `truncate_prompt_tokens`: keep an input's last k tokens (-1: as many as the
    // server takes, `--max-input-tokens`); absent, the server's `--truncate` applies (cutting
    // the end, as the other routes do).
    let most = state.limits.max_input_tokens;
    let (limits, truncate) = match r.truncate_prompt_tokens {
        None => (state.limits, state.limits.truncate.then_some(TruncationDirection::Right)),
        Some(-1) => (state.limits, Some(TruncationDirection::Left)),
        Some(k) if k >= 1 && k as u64 <= most as u64 => {
            (Limits { max_input_tokens: k as usize, ..state.limits }, Some(TruncationDirection::Left))
        }
        Some(k) if k > most as i64 => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!(
                    "truncate_prompt_tokens value ({k}) is greater than the most tokens of an input \
                     ({most}, --max-input-tokens). Please, select a smaller truncation size."
                ),
            ))
        }
        Some(k) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("truncate_prompt_tokens is -1 or from 1 to {most} (--max-input-tokens), not {k}"),
            ))
        }
    };
    let (task, version) = match r.model.as_deref() {
        None => (default_task(state, ready)?.0, None),
        Some(m) => match m.split_once(':') {
            Some((t, v)) => (t.to_string(), Some(v.to_string())),
            None => (m.to_string(), None),
        },
    };
    let entry = ready.tasks.get(&task).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_task",
            format!(
                "The model `{}` does not exist (models are tasks: GET /v1/tasks, `task` or `task:version`).",
                r.model.as_deref().unwrap_or_default()
            ),
        )
    })?;
    access.task = Some(task.clone());
    if let [Value::Object(_), ..] | [Value::Array(_), ..] = r.input.as_array().map(Vec::as_slice).unwrap_or(&[]) {
        return Err(ApiError::bad_request("invalid_input", "`input` is a text or a list of texts"));
    }
    if r.input.is_object() {
        return Err(ApiError::bad_request("invalid_input", "`input` is a text or a list of texts"));
    }
    let inputs = parse_inputs(&entry, r.input, &state.limits)?;
    let version = resolve_version(state, ready, &task, version).await?;
    let name = match &version {
        Some(v) => format!("{task}:{}", v.version),
        None => task.clone(),
    };
    let n = inputs.len();
    let scored = score_inputs(state, ready, &entry, version, inputs, &limits, truncate, started, access).await?;
    let prompt_tokens = access.tokens.unwrap_or(0) + n * entry.prefix_ids.len();
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(VllmClassifyResponse {
        id: format!("classify-{}", request_id(req)),
        object: "list".into(),
        created,
        model: name,
        data: scored
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let c = classification(&entry, &s.logps, None, s.truncated);
                let probs = models::scoring::normalize(&s.logps);
                VllmClassification { index, label: c.label, num_classes: probs.len(), probs }
            })
            .collect(),
        usage: VllmUsage { prompt_tokens, total_tokens: prompt_tokens, completion_tokens: 0 },
    })
}

/// Every task in the registry, with its fields, labels and serving adapter.
#[utoipa::path(get, path = "/v1/tasks", responses((status = 200, body = Vec<TaskInfo>), (status = 503, body = ErrorBody)))]
async fn tasks(state: State) -> HttpResponse {
    let ready = match state.ready() {
        Ok(r) => r,
        Err(e) => return e.response(),
    };
    let list: Vec<TaskInfo> = ready
        .tasks
        .values()
        .map(|e| {
            let version = ready.adapters.current(&e.task.name).map(|v| v.version.clone());
            TaskInfo {
                name: e.task.name.clone(),
                description: e.task.description.clone(),
                fields: e.task.fields.clone(),
                labels: e.task.label_words(),
                score_task: e.task.is_score(),
                template_version: e.task.template_version,
                template_hash: e.task.template_hash(),
                serving: version.is_some() || state.zero_shot,
                adapter_version: version,
                answer_scoring: e.scoring.map(|s| s.to_string()),
                prompt_layout: ready.backend.prompt_layout().map(str::to_string),
            }
        })
        .collect();
    HttpResponse::Ok().json(list)
}

/// Every task's adapter versions: serving, loaded, on disk, refused.
#[utoipa::path(get, path = "/v1/adapters", responses((status = 200, body = Vec<TaskAdapters>), (status = 503, body = ErrorBody)))]
async fn adapters(state: State) -> HttpResponse {
    match state.ready() {
        Ok(r) => {
            let a = r.adapters.clone();
            match blocking(move || Ok(a.snapshot())).await {
                Ok(s) => HttpResponse::Ok().json(s),
                Err(e) => e.response(),
            }
        }
        Err(e) => e.response(),
    }
}

/// Checks `Authorization: Bearer <--admin-token>` (in constant time).
fn authorize(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let Some(token) = &state.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "admin endpoints are off (no --admin-token)",
        ));
    };
    if !bearer_is(req, token) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid admin bearer token is required"));
    }
    Ok(())
}

async fn admin(
    state: State,
    req: HttpRequest,
    action: &'static str,
    task: String,
    version: Option<String>,
) -> HttpResponse {
    let started = Instant::now();
    let result = async {
        authorize(&state, &req)?;
        let ready = state.ready()?;
        let adapters = ready.adapters.clone();
        let t = task.clone();
        blocking(move || {
            let v = version.unwrap_or_default();
            let done = match action {
                "loaded" => adapters.load(&t, &v).map(|a| a.version.clone()),
                "promoted" => adapters.promote(&t, &v).map(|a| a.version.clone()),
                "unloaded" => adapters.unload(&t, &v).map(|()| v.clone()),
                _ => adapters.rollback(&t).map(|a| a.version.clone()),
            }
            .map_err(adapter_error)?;
            Ok(AdapterChange {
                current: adapters.current(&t).map(|c| c.version.clone()),
                task: t,
                version: done,
                action: action.to_string(),
            })
        })
        .await
    }
    .await;
    // Only a task the server knows is a label value (unknown names must not grow /metrics)
    // or goes to the log.
    let known = state.ready.get().is_some_and(|r| r.tasks.contains_key(&task));
    let mut access = Access { task: known.then_some(task), ..Access::default() };
    let resp = match result {
        Ok(c) => {
            tracing::info!(request_id = request_id(&req).as_str(), "admin: {} {}/{}", c.action, c.task, c.version);
            access.version = Some(c.version.clone());
            HttpResponse::Ok().json(c)
        }
        Err(e) => e.response(),
    };
    finish(&state, "admin", access, resp, started)
}

/// Loads and checks an adapter version without making it current.
#[utoipa::path(post, path = "/v1/admin/adapters/{task}/{version}/load", security(("bearer" = [])), responses(
    (status = 200, body = AdapterChange), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 422, description = "adapter_refused", body = ErrorBody)))]
async fn admin_load(state: State, req: HttpRequest, path: web::Path<(String, String)>) -> HttpResponse {
    let (task, version) = path.into_inner();
    admin(state, req, "loaded", task, Some(version)).await
}

/// Makes a version the task's serving one (in memory and in the registry's CURRENT).
#[utoipa::path(post, path = "/v1/admin/adapters/{task}/{version}/promote", security(("bearer" = [])), responses(
    (status = 200, body = AdapterChange), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 422, description = "adapter_refused", body = ErrorBody)))]
async fn admin_promote(state: State, req: HttpRequest, path: web::Path<(String, String)>) -> HttpResponse {
    let (task, version) = path.into_inner();
    admin(state, req, "promoted", task, Some(version)).await
}

/// Frees a loaded version that is not serving.
#[utoipa::path(post, path = "/v1/admin/adapters/{task}/{version}/unload", security(("bearer" = [])), responses(
    (status = 200, body = AdapterChange), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, description = "adapter_is_current", body = ErrorBody)))]
async fn admin_unload(state: State, req: HttpRequest, path: web::Path<(String, String)>) -> HttpResponse {
    let (task, version) = path.into_inner();
    admin(state, req, "unloaded", task, Some(version)).await
}

/// Goes back to the version promoted before the current one.
#[utoipa::path(post, path = "/v1/admin/adapters/{task}/rollback", security(("bearer" = [])), responses(
    (status = 200, body = AdapterChange), (status = 401, body = ErrorBody),
    (status = 409, description = "no_previous_version", body = ErrorBody)))]
async fn admin_rollback(state: State, req: HttpRequest, path: web::Path<String>) -> HttpResponse {
    admin(state, req, "rolled_back", path.into_inner(), None).await
}

/// Liveness: answers as soon as the server listens.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// The model, kernels and batching mode, and TEI's `/info`; 503 `Unhealthy` while loading.
#[utoipa::path(get, path = "/info", responses((status = 200, body = Info), (status = 503, body = TeiErrorBody)))]
async fn info(state: State) -> HttpResponse {
    let r = match state.ready() {
        Ok(r) => r,
        Err(e) => return e.tei_response(),
    };
    let default = default_task(&state, r).ok();
    let labels = default.as_ref().map(|(_, e)| e.task.label_words()).unwrap_or_default();
    let id2label: serde_json::Map<String, Value> =
        labels.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect();
    let label2id: serde_json::Map<String, Value> =
        labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect();
    HttpResponse::Ok().json(Info {
        model: state.model_path.clone(),
        kernels: r.kernels.clone(),
        batching: r.serving.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        model_id: state.model_path.clone(),
        model_sha: r.adapters.base_sha256().to_string(),
        model_dtype: state.model_dtype.clone(),
        model_type: json!({"classifier": {"id2label": id2label, "label2id": label2id}}),
        default_task: default.map(|(t, _)| t),
        max_concurrent_requests: state.batch.max_queue,
        max_input_length: state.limits.max_input_tokens,
        max_batch_tokens: state.batch.max_batch_tokens,
        max_batch_requests: state.batch.max_batch_rows,
        max_client_batch_size: state.limits.max_inputs,
        auto_truncate: state.limits.truncate,
    })
}

/// Readiness: 200 once the model and the adapters are loaded, 503 before.
#[utoipa::path(get, path = "/ready", responses((status = 200), (status = 503, body = ErrorBody)))]
async fn ready(state: State) -> HttpResponse {
    match state.ready.get() {
        Some(r) => HttpResponse::Ok().json(json!({
            "ready": true,
            "model": state.model_path,
            "arch": r.backend.arch(),
            "tasks_with_adapters": r.adapters.tasks_with_current(),
        })),
        None => HttpResponse::ServiceUnavailable().json(json!({
            "ready": false,
            "error": {"code": "not_ready", "message": "the model is still loading"}
        })),
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain")))]
async fn metrics(state: State) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}

/// The OpenAPI document, with what the derive cannot say: texts are not blank, lists hold
/// one input or more and at most this server's `--max-inputs`.
async fn openapi(state: State) -> HttpResponse {
    let mut doc = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(d) => d,
        Err(e) => return ApiError::internal(e.to_string()).response(),
    };
    let max = state.limits.max_inputs;
    let limits = [
        ("TextDoc", json!({"minLength": 1, "pattern": "\\S"})),
        ("InputListDoc", json!({"minItems": 1, "maxItems": max})),
        ("TextListDoc", json!({"minItems": 1, "maxItems": max})),
        ("BatchDoc", json!({"minItems": 1, "maxItems": max})),
        ("SequenceDoc", json!({"minItems": 1, "maxItems": 2})),
    ];
    for (name, extra) in limits {
        if let (Some(schema), Value::Object(extra)) = (doc["components"]["schemas"][name].as_object_mut(), extra) {
            schema.extend(extra);
        }
    }
    // vLLM's truncate_prompt_tokens: -1, or 1 to this server's --max-input-tokens.
    if let Some(p) =
        doc["components"]["schemas"]["VllmClassifyRequest"]["properties"]["truncate_prompt_tokens"].as_object_mut()
    {
        for k in ["type", "format", "minimum", "maximum"] {
            p.remove(k);
        }
        p.insert(
            "oneOf".into(),
            json!([{"type": "null"}, {"const": -1}, {"type": "integer", "minimum": 1, "maximum": state.limits.max_input_tokens}]),
        );
    }
    // TEI's sequences as the default task reads them: one text, or a pair (no lone text).
    let fields = state.ready.get().and_then(|r| default_task(&state, r).ok()).map(|(_, e)| e.task.fields.len());
    if let Some(n @ (1 | 2)) = fields {
        let sequence = &mut doc["components"]["schemas"]["SequenceDoc"];
        sequence["minItems"] = json!(n);
        sequence["maxItems"] = json!(n);
        if let (2, Some(variants)) = (n, doc["components"]["schemas"]["PredictInputDoc"]["oneOf"].as_array_mut()) {
            variants.retain(|v| v["$ref"] != "#/components/schemas/TextDoc");
        }
    }
    HttpResponse::Ok().json(doc)
}
