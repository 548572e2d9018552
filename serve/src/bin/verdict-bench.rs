//! `verdict-bench`: replays a task's real sentences (the `mr` test split by default) against
//! running classification servers on this machine, at several client counts, and reports
//! latency percentiles, throughput and errors per endpoint and client count, as a markdown
//! table (with ratios to a baseline endpoint), a JSON file and an SVG plot.
//!
//! ```text
//! verdict-bench --task mr --clients 1,4,16 --requests 200 --seconds 60 --baseline bert-large \
//!   --endpoint bert-large=http://127.0.0.1:18084/v1/classify \
//!   --endpoint qwen=http://127.0.0.1:18082/predict --out-md docs/bench.md --out-svg docs/bench.svg
//! ```
//!
//! Loopback only: any other host is refused. Every measurement is bounded by `--requests` and
//! `--seconds`; endpoints are measured one after another at each client count.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use serve::loadgen::{self, Endpoint, Load, Outcome};
use shared::data::{read_table, ColumnMap, ReadOptions};
use shared::plot::{Panel, Series};
use shared::task::TaskRegistry;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "verdict-bench", version, about = "Load-test classification servers on loopback with real sentences")]
struct Cli {
    /// `NAME=http://127.0.0.1:PORT/v1/classify` or `.../predict` (repeatable; loopback only).
    #[arg(long = "endpoint", required = true)]
    endpoints: Vec<String>,
    /// The task whose sentences are sent (`/v1/classify` names it; `/predict` answers the
    /// server's default task).
    #[arg(long, default_value = "mr")]
    task: String,
    /// The split replayed.
    #[arg(long, default_value = "test")]
    split: String,
    /// The task's data directory (default: `<cache>/data/<task>`).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, env = "VERDICT_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Client counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Requests per endpoint and client count, at most.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Seconds per endpoint and client count, at most.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Requests sent to each endpoint before measuring (not counted).
    #[arg(long, default_value_t = 4)]
    warmup: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// The endpoint the ratios compare with (default: the first).
    #[arg(long)]
    baseline: Option<String>,
    /// Write the markdown table here too.
    #[arg(long)]
    out_md: Option<PathBuf>,
    /// Write every measurement as JSON here.
    #[arg(long)]
    out_json: Option<PathBuf>,
    /// Draw p50 latency and throughput against clients here (SVG).
    #[arg(long)]
    out_svg: Option<PathBuf>,
    /// A line for the table's heading (machine, build, date).
    #[arg(long, default_value = "")]
    note: String,
}

/// One measurement.
struct Cell {
    endpoint: usize,
    clients: usize,
    outcome: Outcome,
}

/// The request body for `sentence` on `path`: `/v1/classify` names the task, `/predict` is TEI's.
fn body(path: &str, task: &str, fields: &[String], values: &[String]) -> String {
    let object: serde_json::Map<String, Value> =
        fields.iter().cloned().zip(values.iter().map(|v| Value::String(v.clone()))).collect();
    if path.ends_with("/predict") {
        let inputs = if values.len() == 1 { json!(values[0]) } else { json!(values) };
        json!({"inputs": inputs}).to_string()
    } else {
        let input = if values.len() == 1 { json!(values[0]) } else { Value::Object(object) };
        json!({"task": task, "inputs": input}).to_string()
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let endpoints: Vec<Endpoint> =
        cli.endpoints.iter().map(|e| Endpoint::parse(e)).collect::<Result<_, _>>().map_err(|e| anyhow!(e))?;
    let mut names: Vec<&str> = endpoints.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    if names.windows(2).any(|w| w[0] == w[1]) {
        bail!("endpoint names must be distinct");
    }
    let baseline = match &cli.baseline {
        Some(b) => endpoints.iter().position(|e| &e.name == b).ok_or_else(|| anyhow!("no endpoint named {b}"))?,
        None => 0,
    };
    if cli.clients.is_empty() || cli.clients.contains(&0) || cli.requests == 0 || cli.seconds <= 0.0 {
        bail!("--clients, --requests and --seconds must be positive");
    }
    let task = TaskRegistry::builtin().get(&cli.task)?.clone();
    let cache = cli.cache_dir.clone().unwrap_or_else(shared::assets::cache_dir);
    let dir = cli.data.clone().unwrap_or_else(|| cache.join("data").join(&task.name));
    let file = ["jsonl", "csv", "tsv", "parquet"]
        .iter()
        .map(|e| dir.join(format!("{}.{e}", cli.split)))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!("no {} split in {} (verdict-train fetch-data {})", cli.split, dir.display(), task.name)
        })?;
    let mapping = ColumnMap {
        fields: task.fields.iter().map(|f| (task.column(f), f.clone())).collect(),
        label: None,
        id: None,
        group: None,
    };
    let examples =
        read_table(&file, &mapping, ReadOptions::default()).with_context(|| file.display().to_string())?.examples;
    if examples.is_empty() {
        bail!("{} has no examples", file.display());
    }
    let values: Vec<Vec<String>> =
        examples.iter().map(|ex| task.fields.iter().map(|f| ex.fields[f].clone()).collect()).collect();
    let timeout = Duration::from_secs_f64(cli.timeout);
    let bodies: Vec<Vec<String>> =
        endpoints.iter().map(|e| values.iter().map(|v| body(&e.path, &task.name, &task.fields, v)).collect()).collect();
    eprintln!("{} {} sentences from {}", values.len(), cli.split, file.display());

    for (e, b) in endpoints.iter().zip(&bodies) {
        // Warm-up: first allocations, caches; a server that refuses its first request is reported now.
        let warm = loadgen::run(
            e.addr,
            &e.path,
            &[],
            &b[b.len() - cli.warmup.min(b.len())..],
            &Load { clients: 1, max_requests: cli.warmup, max_time: timeout, timeout },
        );
        if let Some(err) = warm.first_error {
            eprintln!("{}: warm-up error: {err}", e.name);
        }
    }
    let mut cells = Vec::new();
    for &clients in &cli.clients {
        for (i, (e, b)) in endpoints.iter().zip(&bodies).enumerate() {
            let load =
                Load { clients, max_requests: cli.requests, max_time: Duration::from_secs_f64(cli.seconds), timeout };
            let outcome = loadgen::run(e.addr, &e.path, &[], b, &load);
            eprintln!(
                "{} x{clients}: {} requests, {} errors, p50 {:.1} ms, {:.2} req/s",
                e.name,
                outcome.requests(),
                outcome.errors,
                outcome.percentile(0.5),
                outcome.throughput()
            );
            if let Some(err) = &outcome.first_error {
                eprintln!("{}: first error: {err}", e.name);
            }
            cells.push(Cell { endpoint: i, clients, outcome });
        }
    }

    let base_name = &endpoints[baseline].name;
    let mut md = String::new();
    if !cli.note.is_empty() {
        md.push_str(&format!("{}\n\n", cli.note));
    }
    md.push_str(&format!(
        "| endpoint | clients | requests | errors | p50 ms | p95 ms | p99 ms | req/s | p50 speed-up vs {base_name} | throughput vs {base_name} |\n"
    ));
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for c in &cells {
        let base = cells.iter().find(|b| b.endpoint == baseline && b.clients == c.clients).map(|b| &b.outcome);
        let o = &c.outcome;
        let ratio = |x: f64| if x.is_finite() { format!("{x:.2}x") } else { "-".into() };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {} |\n",
            endpoints[c.endpoint].name,
            c.clients,
            o.requests(),
            o.errors,
            o.percentile(0.5),
            o.percentile(0.95),
            o.percentile(0.99),
            o.throughput(),
            ratio(base.map(|b| b.percentile(0.5) / o.percentile(0.5)).unwrap_or(f64::NAN)),
            ratio(base.map(|b| o.throughput() / b.throughput()).unwrap_or(f64::NAN)),
        ));
    }
    print!("{md}");
    if let Some(p) = &cli.out_md {
        std::fs::write(p, &md).with_context(|| p.display().to_string())?;
    }
    if let Some(p) = &cli.out_json {
        let rows: Vec<Value> = cells
            .iter()
            .map(|c| {
                let o = &c.outcome;
                json!({
                    "endpoint": endpoints[c.endpoint].name, "path": endpoints[c.endpoint].path, "clients": c.clients,
                    "requests": o.requests(), "ok": o.latencies_ms.len(), "errors": o.errors,
                    "p50_ms": o.percentile(0.5), "p95_ms": o.percentile(0.95), "p99_ms": o.percentile(0.99),
                    "throughput": o.throughput(), "wall_s": o.wall.as_secs_f64(), "first_error": o.first_error,
                })
            })
            .collect();
        let doc =
            json!({"task": task.name, "split": cli.split, "baseline": base_name, "note": cli.note, "results": rows});
        std::fs::write(p, serde_json::to_string_pretty(&doc)?).with_context(|| p.display().to_string())?;
    }
    if let Some(p) = &cli.out_svg {
        let series = |f: &dyn Fn(&Outcome) -> f64| -> Vec<Series> {
            endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| Series {
                    name: e.name.clone(),
                    points: cells
                        .iter()
                        .filter(|c| c.endpoint == i && f(&c.outcome).is_finite())
                        .map(|c| (c.clients as f64, f(&c.outcome)))
                        .collect(),
                })
                .collect()
        };
        let panels = [
            Panel {
                title: "p50 latency (ms)".into(),
                x_label: "clients".into(),
                series: series(&|o| o.percentile(0.5)),
            },
            Panel {
                title: "throughput (req/s)".into(),
                x_label: "clients".into(),
                series: series(&|o| o.throughput()),
            },
        ];
        let title = format!("verdict-bench: {} {} sentences", task.name, cli.split);
        shared::plot::write_svg(p, &title, &panels).with_context(|| p.display().to_string())?;
    }
    Ok(())
}
