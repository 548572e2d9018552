//! HTTP load generation against `verdict-serve` (or any server with its API), shared by
//! `verdict-bench` and `examples/serve_bench.rs`: requests through [`shared::http`], endpoints that
//! must be on loopback, closed-loop clients bounded in request count and time, and latency
//! percentiles.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Eight short film-review sentences of different lengths: the examples' request bodies.
pub const SAMPLE_SENTENCES: [&str; 8] = [
    "A gorgeous, moving film with wonderful performances.",
    "Dull, tedious and badly acted from start to finish.",
    "The plot is thin, but the jokes land more often than not.",
    "An ambitious mess that never finds its footing.",
    "Quietly devastating and beautifully shot.",
    "I checked my watch more than once.",
    "A crowd-pleaser that earns every one of its laughs.",
    "Neither the script nor the cast rise above the material.",
];

/// Why an endpoint or URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("{0:?}: expected NAME=http://HOST:PORT/PATH")]
    NotAnEndpoint(String),
    #[error("{0:?}: the endpoint needs a name")]
    NoName(String),
    #[error("{0:?}: only http:// URLs on loopback")]
    NotHttp(String),
    #[error("{url:?}: bad port {port:?}")]
    BadPort { url: String, port: String },
    #[error("refusing {0:?}: verdict-bench only sends requests to loopback (127.0.0.0/8, localhost, [::1])")]
    NotLoopback(String),
}

/// A named endpoint on this machine: `name=http://127.0.0.1:8080/v1/classify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub addr: SocketAddr,
    /// The request path, e.g. `/v1/classify` or `/predict`.
    pub path: String,
}

impl Endpoint {
    /// Parses `name=http://host:port/path`. Only loopback hosts are accepted (`127.0.0.0/8`,
    /// `localhost`, `[::1]`): a load generator here never sends traffic elsewhere.
    pub fn parse(spec: &str) -> Result<Self, AddressError> {
        let (name, url) = spec.split_once('=').ok_or_else(|| AddressError::NotAnEndpoint(spec.to_string()))?;
        if name.is_empty() {
            return Err(AddressError::NoName(spec.to_string()));
        }
        let (addr, path) = parse_url(url)?;
        Ok(Self { name: name.to_string(), addr, path })
    }
}

/// The address and path of `http://host:port/path` (path `/` when absent); only loopback
/// hosts are accepted ([`loopback_ip`]).
pub fn parse_url(url: &str) -> Result<(SocketAddr, String), AddressError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| AddressError::NotHttp(url.to_string()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => {
            (h, p.parse::<u16>().map_err(|_| AddressError::BadPort { url: url.to_string(), port: p.to_string() })?)
        }
        _ => (authority, 80),
    };
    Ok((SocketAddr::new(loopback_ip(host)?, port), path.to_string()))
}

/// The address of a loopback host; any other host is refused.
pub fn loopback_ip(host: &str) -> Result<IpAddr, AddressError> {
    let refuse = || AddressError::NotLoopback(host.to_string());
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    match literal.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => Ok(ip),
        _ => Err(refuse()),
    }
}

/// One HTTP/1.1 request on a new connection ([`shared::http`]); returns the status and the body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    match shared::http::request(method, &url, body.as_bytes(), headers, timeout) {
        Ok(a) => Ok((a.status, a.body)),
        Err(e) if e.is_timeout() => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, e)),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

/// The request body of one input (`values`: its fields' texts, in `fields` order) on `path`:
/// `/predict` is TEI's (`{"inputs": text}`, a pair as a list), `/classify` vLLM's
/// (`{"model": task, "input": text}`, a task of one field), anything else Verdict's
/// `/v1/classify` (`{"task", "inputs"}`: the text, or an object of the fields).
pub fn request_body(path: &str, task: &str, fields: &[String], values: &[String]) -> String {
    use serde_json::{json, Value};
    if path.ends_with("/predict") {
        let inputs = if values.len() == 1 { json!(values[0]) } else { json!(values) };
        json!({"inputs": inputs}).to_string()
    } else if path == "/classify" {
        json!({"model": task, "input": values.first()}).to_string()
    } else {
        let object: serde_json::Map<String, Value> =
            fields.iter().cloned().zip(values.iter().map(|v| Value::String(v.clone()))).collect();
        let input = if values.len() == 1 { json!(values[0]) } else { Value::Object(object) };
        json!({"task": task, "inputs": input}).to_string()
    }
}

/// How much load one measurement sends.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Concurrent closed-loop clients (each sends its next request when the last returns).
    pub clients: usize,
    /// Requests in all, at most.
    pub max_requests: usize,
    /// Stop sending after this long (requests in flight finish).
    pub max_time: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// What one measurement saw.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Latencies of the successful (2xx) requests in milliseconds, sorted.
    pub latencies_ms: Vec<f64>,
    /// Requests that failed (connection error or a non-2xx status).
    pub errors: usize,
    /// The first failure, for the log.
    pub first_error: Option<String>,
    pub wall: Duration,
}

impl Outcome {
    /// Requests sent.
    pub fn requests(&self) -> usize {
        self.latencies_ms.len() + self.errors
    }

    /// Successful requests per second of wall time.
    pub fn throughput(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Latency percentile (`p` in 0..=1) of the successful requests, ms; NaN with none.
    pub fn percentile(&self, p: f64) -> f64 {
        percentile(&self.latencies_ms, p)
    }
}

/// The `p` percentile (0..=1) of sorted values: the nearest rank, NaN for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize]
}

/// The closed loop of every measurement: `load.clients` threads, each calling `send(i)` for the
/// next request number `i` (0, 1, ... across all clients) as soon as its last call returned,
/// until `load.max_requests` were started or `load.max_time` passed (calls in flight finish).
/// Returns the wall time.
pub fn closed_loop(load: &Load, send: impl Fn(usize) + Sync) -> Duration {
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    let deadline = t0 + load.max_time;
    std::thread::scope(|s| {
        for _ in 0..load.clients.max(1) {
            s.spawn(|| {
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= load.max_requests {
                        break;
                    }
                    send(i);
                }
            });
        }
    });
    t0.elapsed()
}

/// Sends `bodies` (request `i` sends `bodies[i % len]`) to `addr` + `path` with `load.clients`
/// closed-loop clients, until `max_requests` were sent or `max_time` passed.
pub fn run(addr: SocketAddr, path: &str, headers: &[(&str, &str)], bodies: &[String], load: &Load) -> Outcome {
    let seen = Mutex::new(Outcome::default());
    if bodies.is_empty() {
        return Outcome::default();
    }
    let wall = closed_loop(load, |i| {
        let s = Instant::now();
        let result = http(addr, "POST", path, &bodies[i % bodies.len()], headers, load.timeout);
        let ms = s.elapsed().as_secs_f64() * 1e3;
        let mut o = seen.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok((200..=299, _)) => o.latencies_ms.push(ms),
            Ok((status, body)) => {
                o.errors += 1;
                o.first_error.get_or_insert_with(|| format!("HTTP {status}: {}", body.trim()));
            }
            Err(e) => {
                o.errors += 1;
                o.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    });
    let mut o = seen.into_inner().unwrap_or_else(|e| e.into_inner());
    o.wall = wall;
    o.latencies_ms.sort_by(f64::total_cmp);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_on_loopback() {
        let e = Endpoint::parse("bert=http://127.0.0.1:8081/v1/classify").unwrap();
        assert_eq!((e.name.as_str(), e.addr.port(), e.path.as_str()), ("bert", 8081, "/v1/classify"));
        assert!(Endpoint::parse("x=http://localhost:9/predict").unwrap().addr.ip().is_loopback());
        assert!(Endpoint::parse("x=http://127.3.2.1:9/predict").is_ok());
        assert!(Endpoint::parse("x=http://[::1]:9/predict").unwrap().addr.is_ipv6());
        for bad in [
            "x=http://10.0.0.1:8080/v1/classify",
            "x=http://192.168.1.2:8080/predict",
            "x=http://example.com:80/predict",
            "x=http://0.0.0.0:8080/predict",
            "x=https://127.0.0.1:8080/predict",
            "http://127.0.0.1:8080/predict",
            "x=http://127.0.0.1:notaport/predict",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
