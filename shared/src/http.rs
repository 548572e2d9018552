//! The HTTP client of Verdict's tools: the load generator and soak (`verdict-bench`),
//! `verdict-train promote --server`, and the integration tests. One request per connection
//! (nothing pooled, so every measured request pays the same connection cost), every status
//! returned as an answer rather than raised, on `ureq`.

use std::time::Duration;

/// A server's answer: its status, headers and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Why no answer came: no connection, a timeout, or a malformed response.
#[derive(Debug, thiserror::Error)]
#[error("{method} {url}: {source}")]
pub struct HttpError {
    method: String,
    url: String,
    #[source]
    source: ureq::Error,
}

impl HttpError {
    /// Whether the request ran out of time (the server took longer than the timeout).
    pub fn is_timeout(&self) -> bool {
        matches!(self.source, ureq::Error::Timeout(_))
    }
}

/// Sends `method url` with a JSON `body` (none for an empty one) and extra `headers`, and
/// waits at most `timeout` for the whole answer.
pub fn request(
    method: &str,
    url: &str,
    body: &[u8],
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Answer, HttpError> {
    let fail = |source| HttpError { method: method.to_string(), url: url.to_string(), source };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .max_idle_connections(0)
        .allow_non_standard_methods(true)
        .build()
        .into();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let sent = if body.is_empty() {
        req.body(()).map_err(|e| fail(e.into())).and_then(|r| agent.run(r).map_err(fail))
    } else {
        req.body(body).map_err(|e| fail(e.into())).and_then(|r| agent.run(r).map_err(fail))
    };
    let mut resp = sent?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = resp.body_mut().read_to_string().map_err(fail)?;
    Ok(Answer { status, headers, body })
}
