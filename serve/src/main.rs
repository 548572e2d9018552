//! `verdict-serve`: one memory-mapped base model, per-task LoRA adapters from a registry
//! directory (hot-swapped while serving), and an HTTP API that answers with the probability of
//! every label. Layers, as in TEI: `http` (validation, errors, OpenAPI, metrics) ->
//! `scheduler` (queue, dynamic batching) -> `engine` (base model, per-row adapters, prefix
//! cache) with `adapters` (loaded versions, checks, registry watch).

mod adapters;
mod api;
mod engine;
mod http;
mod metrics;
mod scheduler;

use actix_web::{web, App, HttpServer};
use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use models::{load_model, DTypeSpec, DeviceSpec, WeightMode};
use shared::adapter::weights_sha256;
use shared::assets;
use shared::registry::Registry;
use shared::task::TaskRegistry;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "verdict-serve", version, about = "Serve Verdict classifiers over HTTP")]
struct Cli {
    /// A model name, .gguf file or Hugging Face directory.
    #[arg(long, env = "VERDICT_MODEL", default_value = "smollm2")]
    model: String,
    /// The adapter registry: `<dir>/<task>/<version>/` and `<dir>/<task>/CURRENT`.
    #[arg(long, env = "VERDICT_ADAPTERS", default_value = "./adapters")]
    adapters: PathBuf,
    /// `dense` (f32; the fast path for serving) or `quantized` (GGUF blocks kept in memory:
    /// less memory, but every forward of more than 4 rows dequantizes each matrix again, about
    /// 2x slower per request on Qwen2.5-0.5B, see docs/benchmarks.md).
    #[arg(long, env = "VERDICT_WEIGHTS", default_value = "dense")]
    weights: WeightMode,
    /// `cpu`, `cuda` or `cuda:N` (a binary built with the `cuda` feature; see docs/gpu.md).
    #[arg(long, env = "VERDICT_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Precision of the base weights and activations: `auto` (f32 on CPU, bf16 on a GPU),
    /// `f32`, `bf16`, `f16`. Adapters and label probabilities stay f32.
    #[arg(long, env = "VERDICT_DTYPE", default_value = "auto")]
    dtype: DTypeSpec,
    #[arg(long, env = "VERDICT_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Extra task definitions (TOML, repeatable); see docs/tasks.md.
    #[arg(long = "task-file", env = "VERDICT_TASK_FILES", value_delimiter = ',')]
    task_files: Vec<PathBuf>,
    #[arg(long, env = "VERDICT_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "VERDICT_PORT", default_value_t = 8080)]
    port: u16,
    /// Compute threads (default: all cores).
    #[arg(long, env = "VERDICT_THREADS")]
    threads: Option<usize>,
    /// HTTP worker threads (they only parse, validate and wait; compute runs on the engine).
    #[arg(long, env = "VERDICT_HTTP_WORKERS", default_value_t = 2)]
    http_workers: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "VERDICT_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Most inputs in one request (422 beyond).
    #[arg(long, env = "VERDICT_MAX_INPUTS", default_value_t = 64)]
    max_inputs: usize,
    /// Most tokens in one input, all its fields together.
    #[arg(long, env = "VERDICT_MAX_INPUT_TOKENS", default_value_t = 512)]
    max_input_tokens: usize,
    /// Cut longer inputs to --max-input-tokens instead of refusing them (422); a request's
    /// `truncate` overrides it.
    #[arg(long, env = "VERDICT_TRUNCATE")]
    truncate: bool,
    /// Most requests waiting for the engine; beyond, 503 with Retry-After.
    #[arg(long, env = "VERDICT_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    /// Time limit of one request, queueing included (504 beyond).
    #[arg(long, env = "VERDICT_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    request_timeout_ms: u64,
    /// Most tokens in one engine batch (a single larger request runs alone).
    #[arg(long, env = "VERDICT_MAX_BATCH_TOKENS", default_value_t = 8192)]
    max_batch_tokens: usize,
    /// Most rows (inputs) in one engine batch.
    #[arg(long, env = "VERDICT_MAX_BATCH_ROWS", default_value_t = 64)]
    max_batch_rows: usize,
    /// Longest wait for more requests once a batch has one.
    #[arg(long, env = "VERDICT_MAX_BATCH_WAIT_MS", default_value_t = 2)]
    max_batch_wait_ms: u64,
    /// One request per forward pass (for comparison).
    #[arg(long, env = "VERDICT_NO_BATCHING")]
    no_batching: bool,
    /// Recompute every prompt's constant prefix (for comparison).
    #[arg(long, env = "VERDICT_NO_PREFIX_CACHE")]
    no_prefix_cache: bool,
    /// Fold each adapter version into its own copy of the base weights: faster per row,
    /// one forward per version in a batch, a copy of the projections per version.
    #[arg(long, env = "VERDICT_MERGED")]
    merged: bool,
    /// Answer tasks that have no adapter with the base model alone.
    #[arg(long, env = "VERDICT_ZERO_SHOT_FALLBACK")]
    zero_shot_fallback: bool,
    /// The task `POST /predict` answers (default: the only task with an adapter).
    #[arg(long, env = "VERDICT_DEFAULT_TASK")]
    default_task: Option<String>,
    /// Bearer token for the admin endpoints; without one they are disabled.
    #[arg(long, env = "VERDICT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// How often the registry is checked for a changed CURRENT (0: never).
    #[arg(long, env = "VERDICT_WATCH_INTERVAL_MS", default_value_t = 100)]
    watch_interval_ms: u64,
    /// Longest wait for requests in flight at shutdown.
    #[arg(long, env = "VERDICT_SHUTDOWN_TIMEOUT_S", default_value_t = 30)]
    shutdown_timeout_s: u64,
}

/// Loads the model, the tasks and the adapters; starts the engine.
fn load(cli: &LoadArgs, metrics: Arc<metrics::Metrics>) -> Result<http::Ready> {
    let t0 = Instant::now();
    let path = cli.path.clone();
    let weights = cli.weights;
    // Hash the weights (the adapters' manifests name them) while the model loads.
    let (loaded, sha) = std::thread::scope(|s| {
        let hasher = s.spawn(|| weights_sha256(&path));
        let loaded = load_model(&path, weights, cli.dtype, &cli.device);
        (loaded, hasher.join())
    });
    let loaded = Arc::new(loaded.map_err(|e| anyhow!("{}: {e}", path.display()))?);
    let sha = sha
        .map_err(|_| anyhow!("the hashing thread panicked"))?
        .with_context(|| format!("hashing {}", path.display()))?;
    let mut registry = TaskRegistry::builtin();
    for f in &cli.task_files {
        registry.load_file(f)?;
    }
    let registry = Arc::new(registry);
    let tasks: BTreeMap<String, Arc<engine::TaskEntry>> = registry
        .tasks()
        .iter()
        .map(|t| Ok((t.name.clone(), Arc::new(engine::TaskEntry::new(t, &loaded).map_err(anyhow::Error::msg)?))))
        .collect::<Result<_>>()?;
    let adapters = Arc::new(adapters::AdapterTable::new(
        Registry::new(&cli.adapters),
        registry,
        loaded.clone(),
        sha,
        cli.merged,
        metrics.clone(),
    ));
    for event in adapters.sync() {
        eprintln!("verdict-serve: adapters: {event}");
    }
    let engine = engine::Engine::new(
        loaded.clone(),
        engine::EngineOptions { prefix_cache: cli.prefix_cache, merged: cli.merged },
        metrics.clone(),
    );
    let scheduler = Arc::new(scheduler::Scheduler::start(engine, cli.batch, metrics)?);
    eprintln!("verdict-serve: model and adapters loaded in {:.2} s", t0.elapsed().as_secs_f64());
    Ok(http::Ready { model: loaded, tasks, adapters, scheduler })
}

/// What the loading thread needs from the command line.
struct LoadArgs {
    path: PathBuf,
    weights: WeightMode,
    device: Device,
    dtype: DType,
    adapters: PathBuf,
    task_files: Vec<PathBuf>,
    merged: bool,
    prefix_cache: bool,
    batch: scheduler::BatchOptions,
}

#[actix_web::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if cli.max_inputs == 0 || cli.max_input_tokens == 0 || cli.max_batch_rows == 0 || cli.max_batch_tokens == 0 {
        return Err(anyhow!(
            "--max-inputs, --max-input-tokens, --max-batch-rows and --max-batch-tokens must be positive"
        ));
    }
    let device = cli.device.open()?;
    let dtype = cli.dtype.resolve(&device);
    let cache = cli.cache_dir.clone().unwrap_or_else(assets::cache_dir);
    let path = assets::resolve_model(&cli.model, &cache).map_err(|e| anyhow!(e))?;
    let metrics = Arc::new(metrics::Metrics::default());
    let state = web::Data::new(http::AppState {
        ready: OnceLock::new(),
        model_path: path.display().to_string(),
        limits: api::Limits {
            max_body_bytes: cli.max_body_bytes,
            max_inputs: cli.max_inputs,
            max_input_tokens: cli.max_input_tokens,
            truncate: cli.truncate,
            request_timeout: Duration::from_millis(cli.request_timeout_ms),
        },
        metrics: metrics.clone(),
        admin_token: cli.admin_token.clone().filter(|t| !t.is_empty()),
        zero_shot: cli.zero_shot_fallback,
        default_task: cli.default_task.clone(),
    });
    let server = {
        let state = state.clone();
        HttpServer::new(move || {
            App::new().app_data(state.clone()).configure(http::routes).default_service(web::to(http::not_found))
        })
        .workers(cli.http_workers.max(1))
        .shutdown_timeout(cli.shutdown_timeout_s)
        .bind((cli.host.as_str(), cli.port))
        .with_context(|| format!("binding {}:{}", cli.host, cli.port))?
        .run()
    };
    let args = LoadArgs {
        path,
        weights: cli.weights,
        device,
        dtype,
        adapters: cli.adapters.clone(),
        task_files: cli.task_files.clone(),
        merged: cli.merged,
        prefix_cache: !cli.no_prefix_cache,
        batch: scheduler::BatchOptions {
            batching: !cli.no_batching,
            max_batch_tokens: cli.max_batch_tokens,
            max_batch_rows: cli.max_batch_rows,
            max_wait: Duration::from_millis(cli.max_batch_wait_ms),
            max_queue: cli.max_queue,
        },
    };
    // Load off the async runtime; /health answers meanwhile and /ready flips when done.
    let loading = tokio::task::spawn_blocking(move || load(&args, metrics));
    let handle = server.handle();
    let ready_state = state.clone();
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watch_flag = stop_watch.clone();
    let watch_every = Duration::from_millis(cli.watch_interval_ms);
    tokio::spawn(async move {
        match loading.await {
            Ok(Ok(ready)) => {
                let adapters = ready.adapters.clone();
                if ready_state.ready.set(ready).is_err() {
                    eprintln!("verdict-serve: loaded twice?");
                }
                eprintln!("verdict-serve: ready");
                if !watch_every.is_zero() {
                    // Polling watch: a CURRENT changed by `promote` elsewhere is picked up here.
                    let spawned = std::thread::Builder::new().name("verdict-watch".into()).spawn(move || {
                        // A problem that persists (an unreadable CURRENT) is logged once, not per poll.
                        let mut last: Vec<String> = Vec::new();
                        while !watch_flag.load(Ordering::Relaxed) {
                            std::thread::sleep(watch_every);
                            let events = adapters.sync();
                            for event in events.iter().filter(|e| !last.contains(e)) {
                                eprintln!("verdict-serve: adapters: {event}");
                            }
                            last = events;
                        }
                    });
                    if let Err(e) = spawned {
                        eprintln!("verdict-serve: cannot start the registry watch: {e}");
                    }
                }
            }
            Ok(Err(e)) => {
                eprintln!("verdict-serve: cannot load the model: {e:#}");
                handle.stop(false).await;
            }
            Err(e) => {
                eprintln!("verdict-serve: loader crashed: {e}");
                handle.stop(false).await;
            }
        }
    });
    eprintln!("verdict-serve: listening on http://{}:{}", cli.host, cli.port);
    // actix stops on SIGINT/SIGTERM: no new connections, requests in flight finish (up to
    // --shutdown-timeout-s); then the engine finishes its queue and stops.
    server.await?;
    stop_watch.store(true, Ordering::Relaxed);
    match state.ready.get() {
        Some(ready) => {
            ready.scheduler.shutdown();
            eprintln!("verdict-serve: stopped");
            Ok(())
        }
        None => Err(anyhow!("stopped before the model was loaded")),
    }
}
