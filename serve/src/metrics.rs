//! Prometheus metrics, kept by hand (a few counters and histograms need no framework) and
//! rendered in the text exposition format at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latency buckets in seconds.
const LATENCY_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0];
/// The `task` label of requests that name no task the server knows.
pub const UNKNOWN_TASK: &str = "unknown";
/// Batch-size buckets in rows.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, buckets: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; buckets.len()];
        }
        for (c, &le) in self.counts.iter_mut().zip(buckets) {
            if v <= le {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, buckets: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, le) in self.counts.iter().zip(buckets) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    /// (endpoint, task, status) -> latency histogram (its count is the request count).
    requests: BTreeMap<(String, String, u16), Histogram>,
    /// task -> inputs classified.
    inputs: BTreeMap<String, u64>,
    batch_rows: Histogram,
    /// task -> adapter swaps (a new current version).
    swaps: BTreeMap<String, u64>,
    /// task -> refused adapter versions.
    refusals: BTreeMap<String, u64>,
    /// task -> versions evicted (`--max-loaded-versions`).
    evictions: BTreeMap<String, u64>,
}

/// Every metric the server exports.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Requests waiting in the scheduler's queue.
    pub queue_depth: AtomicU64,
    batches: AtomicU64,
    tokens: AtomicU64,
    /// Engine compute time in microseconds.
    compute_us: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_misses: AtomicU64,
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere never makes the metrics unusable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One finished request. `task`: a task the server knows, else `None` (labelled
    /// [`UNKNOWN_TASK`]): a client's made-up names never become label values, so no request
    /// can grow the metrics.
    pub fn request(&self, endpoint: &str, task: Option<&str>, status: u16, latency: Duration) {
        self.inner()
            .requests
            .entry((endpoint.to_string(), task.unwrap_or(UNKNOWN_TASK).to_string(), status))
            .or_default()
            .observe(&LATENCY_BUCKETS, latency.as_secs_f64());
    }

    /// Inputs classified for a task.
    pub fn inputs(&self, task: &str, n: usize) {
        *self.inner().inputs.entry(task.to_string()).or_default() += n as u64;
    }

    /// One engine batch: its rows, the tokens it ran and how long it took.
    pub fn batch(&self, rows: usize, tokens: usize, took: Duration) {
        self.inner().batch_rows.observe(&BATCH_BUCKETS, rows as f64);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.compute_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// A prefix cache lookup.
    pub fn prefix_lookup(&self, hit: bool) {
        let c = if hit { &self.prefix_hits } else { &self.prefix_misses };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A task's current adapter changed.
    pub fn swap(&self, task: &str) {
        *self.inner().swaps.entry(task.to_string()).or_default() += 1;
    }

    /// An adapter version was refused.
    pub fn refusal(&self, task: &str) {
        *self.inner().refusals.entry(task.to_string()).or_default() += 1;
    }

    /// A loaded version was evicted to stay within `--max-loaded-versions`.
    pub fn eviction(&self, task: &str) {
        *self.inner().evictions.entry(task.to_string()).or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let inner = self.inner();
        let mut out = String::new();
        out.push_str("# HELP verdict_request_duration_seconds Request latency by endpoint, task and HTTP status.\n");
        out.push_str("# TYPE verdict_request_duration_seconds histogram\n");
        for ((endpoint, task, status), h) in &inner.requests {
            let labels = format!("endpoint=\"{}\",task=\"{}\",status=\"{status}\"", esc(endpoint), esc(task));
            h.render(&mut out, "verdict_request_duration_seconds", &labels, &LATENCY_BUCKETS);
        }
        out.push_str("# HELP verdict_requests_total Requests by endpoint, task and HTTP status.\n");
        out.push_str("# TYPE verdict_requests_total counter\n");
        for ((endpoint, task, status), h) in &inner.requests {
            let _ = writeln!(
                out,
                "verdict_requests_total{{endpoint=\"{}\",task=\"{}\",status=\"{status}\"}} {}",
                esc(endpoint),
                esc(task),
                h.count
            );
        }
        out.push_str("# HELP verdict_inputs_total Inputs classified, by task.\n# TYPE verdict_inputs_total counter\n");
        for (task, n) in &inner.inputs {
            let _ = writeln!(out, "verdict_inputs_total{{task=\"{}\"}} {n}", esc(task));
        }
        out.push_str("# HELP verdict_queue_depth Requests waiting for the engine.\n# TYPE verdict_queue_depth gauge\n");
        let _ = writeln!(out, "verdict_queue_depth {}", self.queue_depth.load(Ordering::Relaxed));
        out.push_str(
            "# HELP verdict_batch_size_rows Rows per engine batch.\n# TYPE verdict_batch_size_rows histogram\n",
        );
        inner.batch_rows.render(&mut out, "verdict_batch_size_rows", "", &BATCH_BUCKETS);
        let tokens = self.tokens.load(Ordering::Relaxed);
        let secs = self.compute_us.load(Ordering::Relaxed) as f64 / 1e6;
        out.push_str(
            "# HELP verdict_tokens_total Tokens run through the model.\n# TYPE verdict_tokens_total counter\n",
        );
        let _ = writeln!(out, "verdict_tokens_total {tokens}");
        out.push_str("# HELP verdict_compute_seconds_total Engine compute time.\n");
        out.push_str("# TYPE verdict_compute_seconds_total counter\n");
        let _ = writeln!(out, "verdict_compute_seconds_total {secs}");
        out.push_str("# HELP verdict_tokens_per_second Tokens per second of engine compute so far.\n");
        out.push_str("# TYPE verdict_tokens_per_second gauge\n");
        let _ = writeln!(out, "verdict_tokens_per_second {}", if secs > 0.0 { tokens as f64 / secs } else { 0.0 });
        out.push_str("# HELP verdict_adapter_swaps_total Changes of a task's serving adapter version.\n");
        out.push_str("# TYPE verdict_adapter_swaps_total counter\n");
        for (task, n) in &inner.swaps {
            let _ = writeln!(out, "verdict_adapter_swaps_total{{task=\"{}\"}} {n}", esc(task));
        }
        out.push_str(
            "# HELP verdict_adapter_refusals_total Adapter versions refused (corrupt, other base or template).\n",
        );
        out.push_str("# TYPE verdict_adapter_refusals_total counter\n");
        for (task, n) in &inner.refusals {
            let _ = writeln!(out, "verdict_adapter_refusals_total{{task=\"{}\"}} {n}", esc(task));
        }
        out.push_str(
            "# HELP verdict_adapter_evictions_total Loaded versions freed to stay within --max-loaded-versions.\n",
        );
        out.push_str("# TYPE verdict_adapter_evictions_total counter\n");
        for (task, n) in &inner.evictions {
            let _ = writeln!(out, "verdict_adapter_evictions_total{{task=\"{}\"}} {n}", esc(task));
        }
        out.push_str("# HELP verdict_prefix_cache_hits_total Prefix KV cache lookups that found the prefix.\n");
        out.push_str("# TYPE verdict_prefix_cache_hits_total counter\n");
        let _ = writeln!(out, "verdict_prefix_cache_hits_total {}", self.prefix_hits.load(Ordering::Relaxed));
        out.push_str("# HELP verdict_prefix_cache_misses_total Prefix KV cache lookups that computed it.\n");
        out.push_str("# TYPE verdict_prefix_cache_misses_total counter\n");
        let _ = writeln!(out, "verdict_prefix_cache_misses_total {}", self.prefix_misses.load(Ordering::Relaxed));
        out.push_str("# HELP verdict_batches_total Engine batches run.\n# TYPE verdict_batches_total counter\n");
        let _ = writeln!(out, "verdict_batches_total {}", self.batches.load(Ordering::Relaxed));
        render_process(&mut out);
        out
    }
}

/// The process's own resource use, with the names of Prometheus' process collector: resident
/// and virtual memory, threads, open file descriptors and their limit, CPU time. Read from
/// `/proc/self` at each scrape (Linux; elsewhere none are written).
fn render_process(out: &mut String) {
    let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let Some(kb) = field("VmRSS:") {
            gauge("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge", kb * 1024.0);
        }
        if let Some(kb) = field("VmSize:") {
            gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge", kb * 1024.0);
        }
        if let Some(n) = field("Threads:") {
            gauge("process_threads", "OS threads of the process.", "gauge", n);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge("process_open_fds", "Open file descriptors.", "gauge", fds.count() as f64);
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|l| {
        l.lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    });
    if let Some(n) = max_fds {
        gauge("process_max_fds", "Maximum number of open file descriptors.", "gauge", n);
    }
    // utime and stime, fields 14 and 15 of /proc/self/stat, counted after the parenthesised name.
    let ticks = std::fs::read_to_string("/proc/self/stat").ok().and_then(|stat| {
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
    });
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if let (Some(t), true) = (ticks, per_second > 0) {
        gauge("process_cpu_seconds_total", "User and system CPU time in seconds.", "counter", t / per_second as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("classify", Some("mr"), 200, Duration::from_millis(20));
        m.request("classify", Some("mr"), 200, Duration::from_millis(200));
        m.request("admin", None, 401, Duration::from_millis(1));
        m.batch(3, 30, Duration::from_millis(10));
        m.prefix_lookup(true);
        let text = m.render();
        assert!(text.contains("verdict_requests_total{endpoint=\"classify\",task=\"mr\",status=\"200\"} 2"), "{text}");
        assert!(
            text.contains("verdict_requests_total{endpoint=\"admin\",task=\"unknown\",status=\"401\"} 1"),
            "{text}"
        );
        assert!(text.contains("le=\"0.025\"} 1") && text.contains("le=\"0.25\"} 2"), "{text}");
        assert!(text.contains("verdict_batch_size_rows_bucket{le=\"4\"} 1"), "{text}");
        assert!(text.contains("verdict_tokens_per_second 3000"), "{text}");
        assert!(text.contains("verdict_prefix_cache_hits_total 1"), "{text}");
        if cfg!(target_os = "linux") {
            for name in [
                "process_resident_memory_bytes ",
                "process_threads ",
                "process_open_fds ",
                "process_cpu_seconds_total ",
            ] {
                assert!(text.contains(name), "{name}: {text}");
            }
        }
    }
}
