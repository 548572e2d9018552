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
//!
//! `verdict-bench soak` runs one server through a bounded stretch of production instead
//! (`serve::soak`): clients, an adapter swap every few seconds, bad requests mixed in, resident
//! memory sampled; it exits 1 when a check fails.
//!
//! ```text
//! verdict-bench soak --url http://127.0.0.1:8080 --task mr --versions v1,v2 --admin-token T \
//!   --seconds 600 --clients 4 --swap-every 10 --bad-fraction 0.05 --out-json soak.json
//! ```

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use serve::loadgen::{self, request_body, Endpoint, Load, Outcome};
use serve::soak::{self, SoakConfig};
use shared::data::{read_table, ColumnMap, ReadOptions};
use shared::plot::{Panel, Series};
use shared::task::{Task, TaskRegistry};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "verdict-bench", version, about = "Load-test classification servers on loopback with real sentences")]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `NAME=http://127.0.0.1:PORT/v1/classify` or `.../predict` (repeatable; loopback only).
    #[arg(long = "endpoint", required = true)]
    endpoints: Vec<String>,
    #[command(flatten)]
    sentences: Sentences,
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

/// Where the sentences come from.
#[derive(clap::Args)]
struct Sentences {
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
}

#[derive(Subcommand)]
enum Command {
    /// A bounded soak of one server: clients on `/v1/classify` and vLLM's `/classify` with bad
    /// requests mixed in, the task's adapter swapped between two versions through the admin
    /// API, resident memory sampled from `/metrics`; exits 1 when a check fails.
    Soak(SoakArgs),
}

#[derive(clap::Args)]
struct SoakArgs {
    /// The server, `http://127.0.0.1:PORT` (loopback only).
    #[arg(long)]
    url: String,
    #[command(flatten)]
    sentences: Sentences,
    /// The two adapter versions of the task the swapper alternates (the first serves first).
    #[arg(long, value_delimiter = ',', required = true)]
    versions: Vec<String>,
    /// Length of the run.
    #[arg(long, default_value_t = 600.0)]
    seconds: f64,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seconds between swaps.
    #[arg(long, default_value_t = 10.0)]
    swap_every: f64,
    /// Share of the requests that are bad (malformed JSON, unknown task, empty, over-long, ...).
    #[arg(long, default_value_t = 0.05)]
    bad_fraction: f64,
    /// Memory growth is measured from the first sample after this many seconds [default: a
    /// tenth of the run, at most 60].
    #[arg(long)]
    warmup: Option<f64>,
    /// Seconds between resident memory samples.
    #[arg(long, default_value_t = 5.0)]
    sample_every: f64,
    /// Most growth of resident memory after the warm-up (0.05: 5%).
    #[arg(long, default_value_t = 0.05)]
    max_growth: f64,
    /// Answers of one sentence by one version agree to this (probabilities). Batches of other
    /// shapes move a probability by up to about 0.01 on SmolLM2 with bf16 or int8 products;
    /// two trained versions differ by far more on some sentence (the soak checks they do).
    #[arg(long, default_value_t = 0.05)]
    tolerance: f64,
    /// Distinct sentences sent (spread over the split), each many times.
    #[arg(long, default_value_t = 32)]
    distinct: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// The server's `--admin-token`.
    #[arg(long, env = "VERDICT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The server's `--api-key`, if it has one.
    #[arg(long, env = "VERDICT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Write the report here (JSON: counts, versions, latency, every memory sample).
    #[arg(long)]
    out_json: Option<PathBuf>,
}

/// One measurement.
struct Cell {
    endpoint: usize,
    clients: usize,
    outcome: Outcome,
}

/// The task and every example's field values of the split.
fn sentences(args: &Sentences) -> Result<(Task, Vec<Vec<String>>)> {
    let task = TaskRegistry::builtin().get(&args.task)?.clone();
    let cache = args.cache_dir.clone().unwrap_or_else(shared::assets::cache_dir);
    let dir = args.data.clone().unwrap_or_else(|| cache.join("data").join(&task.name));
    let file = ["jsonl", "csv", "tsv", "parquet"]
        .iter()
        .map(|e| dir.join(format!("{}.{e}", args.split)))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!("no {} split in {} (verdict-train fetch-data {})", args.split, dir.display(), task.name)
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
    eprintln!("{} {} sentences from {}", values.len(), args.split, file.display());
    Ok((task, values))
}

fn soak_main(a: &SoakArgs) -> Result<()> {
    let versions: [String; 2] = a
        .versions
        .clone()
        .try_into()
        .map_err(|v: Vec<String>| anyhow!("--versions takes two versions, got {}", v.len()))?;
    if versions[0] == versions[1] {
        bail!("--versions must name two different versions");
    }
    let positive = [a.seconds, a.swap_every, a.sample_every, a.timeout];
    if a.clients == 0 || a.distinct == 0 || positive.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        bail!("--clients, --distinct, --seconds, --swap-every, --sample-every and --timeout must be positive");
    }
    if !(0.0..1.0).contains(&a.bad_fraction) {
        bail!("--bad-fraction is a share in [0, 1)");
    }
    let (addr, _) = loadgen::parse_url(&a.url)?;
    let (task, values) = sentences(&a.sentences)?;
    let step = (values.len() / a.distinct).max(1);
    let inputs: Vec<Vec<String>> = values.into_iter().step_by(step).take(a.distinct).collect();
    let warmup = a.warmup.unwrap_or((a.seconds / 10.0).min(60.0));
    let cfg = SoakConfig {
        addr,
        task: task.name.clone(),
        fields: task.fields.clone(),
        inputs,
        versions,
        clients: a.clients,
        duration: Duration::from_secs_f64(a.seconds),
        swap_every: Duration::from_secs_f64(a.swap_every),
        bad_fraction: a.bad_fraction,
        warmup: Duration::from_secs_f64(warmup.max(0.0)),
        sample_every: Duration::from_secs_f64(a.sample_every),
        max_growth: a.max_growth,
        tolerance: a.tolerance,
        timeout: Duration::from_secs_f64(a.timeout),
        admin_token: a.admin_token.clone(),
        api_key: a.api_key.clone(),
    };
    eprintln!(
        "soak: {} for {} s, {} clients, a swap between {} and {} every {} s, {}% bad requests",
        a.url,
        a.seconds,
        a.clients,
        cfg.versions[0],
        cfg.versions[1],
        a.swap_every,
        a.bad_fraction * 100.0
    );
    let (report, failures) = soak::run(&cfg).map_err(|e| anyhow!("soak: {e}"))?;
    print!("{}", soak::summary(&report));
    if let Some(p) = &a.out_json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?).with_context(|| p.display().to_string())?;
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("soak: FAILED: {f}");
        }
        std::process::exit(1);
    }
    eprintln!("soak: passed");
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Soak(a)) = &cli.command {
        return soak_main(a);
    }
    let endpoints: Vec<Endpoint> = cli.endpoints.iter().map(|e| Endpoint::parse(e)).collect::<Result<_, _>>()?;
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
    let (task, values) = sentences(&cli.sentences)?;
    let timeout = Duration::from_secs_f64(cli.timeout);
    let bodies: Vec<Vec<String>> = endpoints
        .iter()
        .map(|e| values.iter().map(|v| request_body(&e.path, &task.name, &task.fields, v)).collect())
        .collect();

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
        let doc = json!({"task": task.name, "split": cli.sentences.split, "baseline": base_name, "note": cli.note, "results": rows});
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
        let title = format!("verdict-bench: {} {} sentences", task.name, cli.sentences.split);
        shared::plot::write_svg(p, &title, &panels).with_context(|| p.display().to_string())?;
    }
    Ok(())
}
