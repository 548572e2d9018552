//! The soak (`verdict-bench soak`): a bounded run of production on loopback. Closed-loop
//! clients send a task's real sentences to `/v1/classify` and vLLM's `/classify` with bad
//! requests mixed in, an admin swaps the task's serving adapter between two versions at a fixed
//! interval, and the server's resident memory (`process_resident_memory_bytes` of `/metrics`) is
//! sampled throughout. It passes when no good request failed, every answer names one of the two
//! versions (the one serving when it was sent, and with that version's probabilities), every bad
//! request got a 4xx JSON error, every swap succeeded, and resident memory grew less than the
//! bound after the warm-up.

use crate::loadgen::{closed_loop, http, percentile, request_body, Load};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one soak does.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub addr: SocketAddr,
    pub task: String,
    /// The task's input fields, in order (a task of one field is also sent to `/classify`).
    pub fields: Vec<String>,
    /// Each good input's field values; request `i` sends input `i % len`.
    pub inputs: Vec<Vec<String>>,
    /// The two adapter versions the swapper alternates (the first serves from the start).
    pub versions: [String; 2],
    pub clients: usize,
    pub duration: Duration,
    pub swap_every: Duration,
    /// The share of requests that are bad (0..1), spread evenly.
    pub bad_fraction: f64,
    /// Resident memory is compared with its first sample after this long.
    pub warmup: Duration,
    pub sample_every: Duration,
    /// Largest allowed growth of resident memory after the warm-up (0.05: 5%).
    pub max_growth: f64,
    /// Answers of one input by one version on one route agree to this (probabilities).
    pub tolerance: f64,
    pub timeout: Duration,
    /// `--admin-token` of the server (the swaps are admin calls).
    pub admin_token: String,
    /// `--api-key` of the server, if it has one.
    pub api_key: Option<String>,
}

/// One good answer.
struct Answer {
    route: usize,
    input: usize,
    sent: Instant,
    received: Instant,
    version: String,
    probs: Vec<f64>,
}

/// One admin swap: when it was called, when it returned, the version it made current.
struct Swap {
    start: Instant,
    done: Instant,
    target: usize,
}

/// One bad request: what it is, its route and body.
struct Bad {
    what: &'static str,
    path: &'static str,
    body: String,
}

/// Counts and the first few examples of each kind of failure.
#[derive(Default)]
struct Tally {
    good_ok: usize,
    good_failed: usize,
    unattributed: usize,
    bad_sent: BTreeMap<&'static str, usize>,
    bad_wrong: usize,
    latencies_ms: Vec<f64>,
    examples: BTreeMap<&'static str, Vec<String>>,
}

impl Tally {
    fn example(&mut self, kind: &'static str, what: String) {
        let list = self.examples.entry(kind).or_default();
        if list.len() < 5 {
            list.push(what);
        }
    }
}

/// The good routes: Verdict's, and vLLM's for a task of one field.
fn routes(fields: &[String]) -> Vec<&'static str> {
    if fields.len() == 1 {
        vec!["/v1/classify", "/classify"]
    } else {
        vec!["/v1/classify"]
    }
}

/// The requests that must be refused with a 4xx JSON error: each kind of client mistake.
fn bad_requests(task: &str, fields: &[String], max_input_tokens: usize) -> Vec<Bad> {
    let long = vec!["film"; max_input_tokens + 64].join(" ");
    let long_input = if fields.len() == 1 {
        json!(long)
    } else {
        Value::Object(fields.iter().map(|f| (f.clone(), json!(long))).collect())
    };
    let mut bad = vec![
        Bad { what: "malformed JSON", path: "/v1/classify", body: format!("{{\"task\": \"{task}\", \"inputs\": [") },
        Bad {
            what: "unknown task",
            path: "/v1/classify",
            body: json!({"task": "no-such-task", "inputs": "x"}).to_string(),
        },
        Bad { what: "empty inputs", path: "/v1/classify", body: json!({"task": task, "inputs": []}).to_string() },
        Bad { what: "blank text", path: "/v1/classify", body: json!({"task": task, "inputs": "   "}).to_string() },
        Bad {
            what: "over-long input",
            path: "/v1/classify",
            body: json!({"task": task, "inputs": long_input}).to_string(),
        },
        Bad { what: "wrong type", path: "/v1/classify", body: json!({"task": task, "inputs": 5}).to_string() },
        Bad {
            what: "unknown field",
            path: "/v1/classify",
            body: json!({"task": task, "inputs": {"no_such_field": "x"}}).to_string(),
        },
        Bad {
            what: "unknown version",
            path: "/v1/classify",
            body: json!({"task": task, "version": "no-such-version", "inputs": "x"}).to_string(),
        },
        Bad { what: "not an object", path: "/v1/classify", body: "[1, 2]".into() },
        Bad { what: "TEI empty inputs", path: "/predict", body: json!({"inputs": []}).to_string() },
    ];
    if fields.len() == 1 {
        bad.push(Bad {
            what: "vLLM unknown model",
            path: "/classify",
            body: json!({"model": "no-such-task", "input": "x"}).to_string(),
        });
        bad.push(Bad {
            what: "vLLM truncate_prompt_tokens 0",
            path: "/classify",
            body: json!({"model": task, "input": "x", "truncate_prompt_tokens": 0}).to_string(),
        });
    }
    bad
}

/// The version an answer names and its probabilities; `Err` says why it is not attributed to
/// one of `versions`.
fn attribution(path: &str, task: &str, v: &Value, versions: &[String; 2]) -> Result<(String, Vec<f64>), String> {
    let (version, probs) = if path == "/classify" {
        let model = v["model"].as_str().ok_or("no `model`")?;
        let version =
            model.strip_prefix(&format!("{task}:")).ok_or_else(|| format!("model {model:?} names no version"))?;
        let data = v["data"].as_array().filter(|d| d.len() == 1).ok_or("not one answer in `data`")?;
        let probs: Vec<f64> =
            data[0]["probs"].as_array().ok_or("no `probs`")?.iter().filter_map(Value::as_f64).collect();
        (version.to_string(), probs)
    } else {
        let version = v["adapter_version"].as_str().ok_or("no `adapter_version`")?;
        let results = v["results"].as_array().filter(|r| r.len() == 1).ok_or("not one answer in `results`")?;
        if results[0]["adapter_version"].as_str() != Some(version) {
            return Err(format!("the answer names {} and its result {}", version, results[0]["adapter_version"]));
        }
        let probs = results[0]["probabilities"].as_object().ok_or("no `probabilities`")?;
        (version.to_string(), probs.values().filter_map(Value::as_f64).collect())
    };
    if !versions.contains(&version) {
        return Err(format!("version {version:?} is neither {} nor {}", versions[0], versions[1]));
    }
    if probs.is_empty() {
        return Err("no probabilities".into());
    }
    Ok((version, probs))
}

/// `process_resident_memory_bytes` of a `/metrics` text.
fn resident_bytes(metrics: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes ")).and_then(|v| v.trim().parse().ok())
}

/// Runs the soak; returns its report (JSON) and the reasons it failed (none: it passed).
/// `Err`: it could not start (the server's `/info`, or making the first version current).
pub fn run(cfg: &SoakConfig) -> Result<(Value, Vec<String>), String> {
    if cfg.inputs.is_empty() || cfg.fields.is_empty() {
        return Err("no inputs to send".into());
    }
    let bearer = cfg.api_key.as_ref().map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("Authorization", b.as_str())).collect();
    let admin_bearer = format!("Bearer {}", cfg.admin_token);
    let admin_headers = [("Authorization", admin_bearer.as_str())];
    let (status, info) =
        http(cfg.addr, "GET", "/info", "", &headers, cfg.timeout).map_err(|e| format!("/info: {e}"))?;
    let info: Value = serde_json::from_str(&info).unwrap_or(Value::Null);
    let max_input_tokens = info["max_input_length"]
        .as_u64()
        .filter(|_| status == 200)
        .ok_or_else(|| format!("/info answered {status}: {info}"))? as usize;
    let promote = |v: &str| -> Result<(), String> {
        let path = format!("/v1/admin/adapters/{}/{v}/promote", cfg.task);
        match http(cfg.addr, "POST", &path, "", &admin_headers, cfg.timeout) {
            Ok((200, body)) => {
                let current =
                    serde_json::from_str::<Value>(&body).ok().and_then(|b| b["current"].as_str().map(str::to_string));
                if current.as_deref() == Some(v) {
                    Ok(())
                } else {
                    Err(format!("{path}: current is {current:?}"))
                }
            }
            Ok((status, body)) => Err(format!("{path}: HTTP {status}: {}", body.trim())),
            Err(e) => Err(format!("{path}: {e}")),
        }
    };
    promote(&cfg.versions[0])?;

    let routes = routes(&cfg.fields);
    let good: Vec<Vec<String>> = routes
        .iter()
        .map(|path| cfg.inputs.iter().map(|v| request_body(path, &cfg.task, &cfg.fields, v)).collect())
        .collect();
    let bad = bad_requests(&cfg.task, &cfg.fields, max_input_tokens);
    let tally = Mutex::new(Tally::default());
    let answers = Mutex::new(Vec::<Answer>::new());
    let swaps = Mutex::new(Vec::<Swap>::new());
    let swap_errors = Mutex::new(Vec::<String>::new());
    let samples = Mutex::new(Vec::<(f64, f64)>::new());
    let done = AtomicBool::new(false);
    let t0 = Instant::now();
    let deadline = t0 + cfg.duration;
    let sample = || {
        if let Ok((200, text)) = http(cfg.addr, "GET", "/metrics", "", &[], cfg.timeout) {
            if let Some(b) = resident_bytes(&text) {
                samples.lock().unwrap_or_else(|e| e.into_inner()).push((t0.elapsed().as_secs_f64(), b));
            }
        }
    };
    // Sleeps until `until` or the end of the run, whichever is first; false at the end.
    let nap = |until: Instant| {
        while Instant::now() < until {
            if done.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())));
        }
        !done.load(Ordering::Relaxed)
    };
    let wall = std::thread::scope(|s| {
        s.spawn(|| {
            let mut k = 1u32;
            while nap(t0 + cfg.swap_every * k) && Instant::now() < deadline {
                let target = k as usize % 2;
                let start = Instant::now();
                match promote(&cfg.versions[target]) {
                    Ok(()) => swaps.lock().unwrap_or_else(|e| e.into_inner()).push(Swap {
                        start,
                        done: Instant::now(),
                        target,
                    }),
                    Err(e) => swap_errors.lock().unwrap_or_else(|e| e.into_inner()).push(e),
                }
                k += 1;
            }
        });
        s.spawn(|| {
            sample();
            let mut k = 1u32;
            while nap(t0 + cfg.sample_every * k) {
                sample();
                k += 1;
            }
        });
        let load =
            Load { clients: cfg.clients, max_requests: usize::MAX, max_time: cfg.duration, timeout: cfg.timeout };
        let wall = closed_loop(&load, |i| {
            let f = cfg.bad_fraction.clamp(0.0, 1.0);
            let (before, after) = ((i as f64 * f).floor(), ((i + 1) as f64 * f).floor());
            if after > before {
                let b = &bad[before as usize % bad.len()];
                let result = http(cfg.addr, "POST", b.path, &b.body, &headers, cfg.timeout);
                let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                *t.bad_sent.entry(b.what).or_default() += 1;
                let refused = match &result {
                    Ok((status @ 400..=499, body)) => serde_json::from_str::<Value>(body)
                        .ok()
                        .filter(|v| v.get("error").is_some())
                        .map(|_| *status)
                        .ok_or_else(|| format!("HTTP {status} without a JSON error: {}", body.trim())),
                    Ok((status, body)) => Err(format!("HTTP {status}: {}", body.trim())),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = refused {
                    t.bad_wrong += 1;
                    t.example(
                        "bad_not_4xx_json",
                        format!("{} ({} {}): {e}", b.what, b.path, b.body.chars().take(80).collect::<String>()),
                    );
                }
                return;
            }
            let input = i % cfg.inputs.len();
            let route = input % routes.len();
            let sent = Instant::now();
            let result = http(cfg.addr, "POST", routes[route], &good[route][input], &headers, cfg.timeout);
            let received = Instant::now();
            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
            let body = match result {
                Ok((200, body)) => body,
                Ok((status, body)) => {
                    t.good_failed += 1;
                    t.example("good_failed", format!("{}: HTTP {status}: {}", routes[route], body.trim()));
                    return;
                }
                Err(e) => {
                    t.good_failed += 1;
                    t.example("good_failed", format!("{}: {e}", routes[route]));
                    return;
                }
            };
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            match attribution(routes[route], &cfg.task, &v, &cfg.versions) {
                Ok((version, probs)) => {
                    t.good_ok += 1;
                    t.latencies_ms.push((received - sent).as_secs_f64() * 1e3);
                    drop(t);
                    answers.lock().unwrap_or_else(|e| e.into_inner()).push(Answer {
                        route,
                        input,
                        sent,
                        received,
                        version,
                        probs,
                    });
                }
                Err(e) => {
                    t.unattributed += 1;
                    t.example("unattributed", format!("{}: {e}: {}", routes[route], body.trim()));
                }
            }
        });
        done.store(true, Ordering::Relaxed);
        wall
    });
    sample();

    let mut t = tally.into_inner().unwrap_or_else(|e| e.into_inner());
    let answers = answers.into_inner().unwrap_or_else(|e| e.into_inner());
    let swaps = swaps.into_inner().unwrap_or_else(|e| e.into_inner());
    let swap_errors = swap_errors.into_inner().unwrap_or_else(|e| e.into_inner());
    let samples = samples.into_inner().unwrap_or_else(|e| e.into_inner());

    // The version serving when each answer was sent: sent after a swap returned and answered
    // before the next one began, it must be that swap's (the first version before any swap).
    let mut stale = 0;
    for a in &answers {
        let in_swap = swaps.iter().any(|s| a.sent >= s.start && a.sent < s.done);
        let next_start = swaps.iter().find(|s| s.start > a.sent).map(|s| s.start);
        if in_swap || next_start.is_some_and(|n| a.received >= n) {
            continue;
        }
        let target = swaps.iter().rev().find(|s| a.sent >= s.done).map(|s| s.target).unwrap_or(0);
        if a.version != cfg.versions[target] {
            stale += 1;
            t.example(
                "stale",
                format!("input {} sent while {} served was answered by {}", a.input, cfg.versions[target], a.version),
            );
        }
    }
    // Each (route, input, version) answers alike; the two versions answer some input apart, so
    // a name on another version's answer would be seen.
    let mut groups: BTreeMap<(usize, usize, &str), Vec<&[f64]>> = BTreeMap::new();
    for a in &answers {
        groups.entry((a.route, a.input, a.version.as_str())).or_default().push(&a.probs);
    }
    let diff = |x: &[f64], y: &[f64]| {
        if x.len() != y.len() {
            return f64::INFINITY;
        }
        x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
    };
    let mut inconsistent = 0;
    let mut within = 0.0f64;
    for ((route, input, version), list) in &groups {
        for p in &list[1..] {
            let d = diff(list[0], p);
            within = within.max(d);
            if d > cfg.tolerance {
                inconsistent += 1;
                t.example(
                    "inconsistent",
                    format!("{} input {input}: two answers named {version} differ by {d:.2e}", routes[*route]),
                );
            }
        }
    }
    let mut between = 0.0f64;
    for ((route, input, version), list) in &groups {
        if version == &cfg.versions[0] {
            if let Some(other) = groups.get(&(*route, *input, cfg.versions[1].as_str())) {
                between = between.max(diff(list[0], other[0]));
            }
        }
    }
    let mut per_version: BTreeMap<&str, usize> = cfg.versions.iter().map(|v| (v.as_str(), 0)).collect();
    for a in &answers {
        *per_version.entry(a.version.as_str()).or_default() += 1;
    }

    let warm = samples.iter().find(|(s, _)| *s >= cfg.warmup.as_secs_f64()).copied();
    let last = samples.last().copied();
    let after: Vec<f64> = samples.iter().filter(|(s, _)| *s >= cfg.warmup.as_secs_f64()).map(|(_, b)| *b).collect();
    let peak = after.iter().copied().fold(f64::NAN, f64::max);
    let growth = match (warm, last) {
        (Some((_, w)), Some((_, l))) if w > 0.0 => Some((l - w) / w),
        _ => None,
    };

    let mut failures = Vec::new();
    if t.good_failed > 0 {
        failures.push(format!("{} good requests failed", t.good_failed));
    }
    if t.unattributed > 0 {
        failures.push(format!(
            "{} answers were not attributed to {} or {}",
            t.unattributed, cfg.versions[0], cfg.versions[1]
        ));
    }
    if stale > 0 {
        failures.push(format!("{stale} answers named another version than the one serving"));
    }
    if inconsistent > 0 {
        failures.push(format!(
            "{inconsistent} answers differ from other answers named with their version (> {:e})",
            cfg.tolerance
        ));
    }
    if !swaps.is_empty() && per_version.values().any(|&n| n == 0) {
        failures.push(format!("a version never answered: {per_version:?}"));
    }
    if !swaps.is_empty() && between <= cfg.tolerance {
        failures.push(format!(
            "the two versions answered every input alike (within {between:.2e}): attribution is unchecked"
        ));
    }
    if !swap_errors.is_empty() {
        failures.push(format!("{} swaps failed: {}", swap_errors.len(), swap_errors[0]));
    }
    if t.bad_wrong > 0 {
        failures.push(format!("{} bad requests did not get a 4xx JSON error", t.bad_wrong));
    }
    match growth {
        None => failures.push(format!("no resident memory sample after the warm-up ({} samples)", samples.len())),
        Some(g) if g >= cfg.max_growth => failures.push(format!(
            "resident memory grew {:.2}% after the warm-up (bound {:.2}%)",
            g * 100.0,
            cfg.max_growth * 100.0
        )),
        Some(_) => {}
    }

    t.latencies_ms.sort_by(f64::total_cmp);
    let bad_sent: usize = t.bad_sent.values().sum();
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let report = json!({
        "task": cfg.task,
        "versions": cfg.versions,
        "clients": cfg.clients,
        "seconds": cfg.duration.as_secs_f64(),
        "wall_s": wall.as_secs_f64(),
        "swap_every_s": cfg.swap_every.as_secs_f64(),
        "bad_fraction": cfg.bad_fraction,
        "routes": routes,
        "distinct_inputs": cfg.inputs.len(),
        "requests": t.good_ok + t.good_failed + t.unattributed + bad_sent,
        "good": {
            "sent": t.good_ok + t.good_failed + t.unattributed,
            "ok": t.good_ok,
            "failed": t.good_failed,
            "unattributed": t.unattributed,
            "stale": stale,
            "inconsistent": inconsistent,
            "per_version": per_version,
            "p50_ms": percentile(&t.latencies_ms, 0.5),
            "p99_ms": percentile(&t.latencies_ms, 0.99),
            "throughput": t.good_ok as f64 / wall.as_secs_f64().max(1e-9),
            "max_diff_within_version": within,
            "max_diff_between_versions": between,
        },
        "bad": {"sent": bad_sent, "not_4xx_json": t.bad_wrong, "kinds": t.bad_sent},
        "swaps": {"ok": swaps.len(), "failed": swap_errors.len()},
        "rss": {
            "samples": samples.iter().map(|(s, b)| json!([s, b])).collect::<Vec<_>>(),
            "sample_every_s": cfg.sample_every.as_secs_f64(),
            "warmup_s": cfg.warmup.as_secs_f64(),
            "after_warmup_mib": warm.map(|(_, b)| mib(b)),
            "end_mib": last.map(|(_, b)| mib(b)),
            "peak_after_warmup_mib": if peak.is_finite() { Some(mib(peak)) } else { None },
            "growth": growth,
            "max_growth": cfg.max_growth,
        },
        "examples": t.examples,
        "failures": failures,
        "passed": failures.is_empty(),
    });
    Ok((report, failures))
}

/// The report's figures as a few lines for people.
pub fn summary(r: &Value) -> String {
    let g = &r["good"];
    let m = &r["rss"];
    let mib = |v: &Value| v.as_f64().map(|x| format!("{x:.1} MiB")).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "soak: {} requests in {:.0} s ({} clients): {} good ({} ok, {} failed, {} unattributed, {} stale, {} inconsistent), {} bad ({} not a 4xx JSON error)\n",
        r["requests"], r["wall_s"].as_f64().unwrap_or(0.0), r["clients"], g["sent"], g["ok"], g["failed"],
        g["unattributed"], g["stale"], g["inconsistent"], r["bad"]["sent"], r["bad"]["not_4xx_json"],
    );
    out.push_str(&format!(
        "soak: answers per version {}; {} swaps ({} failed); p50 {:.1} ms, p99 {:.1} ms, {:.2} req/s\n",
        g["per_version"],
        r["swaps"]["ok"],
        r["swaps"]["failed"],
        g["p50_ms"].as_f64().unwrap_or(f64::NAN),
        g["p99_ms"].as_f64().unwrap_or(f64::NAN),
        g["throughput"].as_f64().unwrap_or(0.0),
    ));
    out.push_str(&format!(
        "soak: resident memory {} after the {} s warm-up, {} at the end (peak {}): growth {} ({} samples)\n",
        mib(&m["after_warmup_mib"]),
        m["warmup_s"],
        mib(&m["end_mib"]),
        mib(&m["peak_after_warmup_mib"]),
        m["growth"].as_f64().map(|x| format!("{:+.2}%", x * 100.0)).unwrap_or_else(|| "-".into()),
        m["samples"].as_array().map(Vec::len).unwrap_or(0),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_attributed_to_one_of_the_two_versions() {
        let versions = ["v1".to_string(), "v2".to_string()];
        let ok = json!({"adapter_version": "v2", "results": [{"adapter_version": "v2", "probabilities": {"a": 0.25, "b": 0.75}}]});
        assert_eq!(attribution("/v1/classify", "mr", &ok, &versions).unwrap(), ("v2".into(), vec![0.25, 0.75]));
        let vllm = json!({"model": "mr:v1", "data": [{"probs": [0.5, 0.5]}]});
        assert_eq!(attribution("/classify", "mr", &vllm, &versions).unwrap().0, "v1");
        for (path, bad) in [
            (
                "/v1/classify",
                json!({"adapter_version": "v3", "results": [{"adapter_version": "v3", "probabilities": {"a": 1.0}}]}),
            ),
            (
                "/v1/classify",
                json!({"adapter_version": "v1", "results": [{"adapter_version": "v2", "probabilities": {"a": 1.0}}]}),
            ),
            (
                "/v1/classify",
                json!({"adapter_version": null, "results": [{"adapter_version": null, "probabilities": {"a": 1.0}}]}),
            ),
            ("/classify", json!({"model": "mr", "data": [{"probs": [1.0]}]})),
            ("/classify", json!({"model": "rte:v1", "data": [{"probs": [1.0]}]})),
        ] {
            assert!(attribution(path, "mr", &bad, &versions).is_err(), "{bad}");
        }
    }

    #[test]
    fn resident_memory_is_read_from_the_metrics_text() {
        let text =
            "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 1048576\nprocess_threads 3\n";
        assert_eq!(resident_bytes(text), Some(1048576.0));
        assert_eq!(resident_bytes("process_threads 3\n"), None);
    }
}
