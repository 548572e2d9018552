//! The server's one error type: an HTTP status, a stable code and a message, rendered once per
//! dialect (Verdict's `{"error": {"code", "message"}}`, TEI's `{"error", "error_type"}`; vLLM's
//! in `http`).

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use serde::Serialize;
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
