//! `verdict-serve`: one memory-mapped base model, per-task LoRA adapters from a registry
//! directory (hot-swapped while serving), and an HTTP API that answers with the probability of
//! every label. Layers, as in TEI: `http` (routes, handlers, OpenAPI; bodies in `wire`, one
//! `error` type) -> `infer` (parsing, limits, version resolution, submit, timeout) -> `queue`
//! (dynamic batching) -> `backend` (a decoder: base model, per-row adapters, prefix cache; or
//! a BERT encoder, `--model minilm|bert-base|bert-large|<dir>`, with per-task heads), all
//! meeting in `contract`, with `adapters` (loaded versions, checks, registry watch).

mod adapters;
mod backend;
mod contract;
mod error;
mod http;
mod infer;
mod logging;
mod metrics;
mod queue;
mod tuning;
mod wire;

use actix_web::{web, App, HttpServer};
use anyhow::{anyhow, Context, Result};
use backend::Backend;
use candle_core::{DType, Device};
use clap::{CommandFactory, Parser};
use models::{DTypeSpec, DeviceSpec, Encoder, EncoderSource, WeightMode};
use shared::adapter::weights_sha256;
use shared::assets;
use shared::registry::Registry;
use shared::task::{AnswerScoring, TaskRegistry};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "verdict-serve", version, about = "Serve Verdict classifiers over HTTP")]
struct Cli {
    /// A model name (decoders: smollm2, qwen0.5b, qwen1.5b; encoders: minilm, and bert-base,
    /// bert-large with seeded random weights), a .gguf file or a Hugging Face directory (a
    /// decoder, or a BERT encoder served through classification heads).
    #[arg(long, env = "VERDICT_MODEL", default_value = "smollm2")]
    model: String,
    /// The adapter registry: `<dir>/<task>/<version>/` and `<dir>/<task>/CURRENT` (an
    /// encoder's versions are heads: `verdict-train encoder-head`).
    #[arg(long, env = "VERDICT_ADAPTERS", default_value = "./adapters")]
    adapters: PathBuf,
    /// `dense` (the model's values; `--cpu-matmul` picks f32, bf16 or int8 panels) or
    /// `quantized` (one int8 matrix per weight, 1 byte each, on the integer kernels where the
    /// CPU has VNNI; elsewhere, or with `--cpu-matmul f32|bf16`, the GGUF blocks on candle's
    /// kernels). docs/runtime.md.
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
    /// Flags from a TOML file: every key a flag's long name (`port = 9000`,
    /// `max_batch_rows = 32`); flags on the command line win (docs/serving.md).
    #[arg(long, value_name = "FILE.toml")]
    #[allow(dead_code)] // read before clap parses (shared::cli_config)
    config: Option<PathBuf>,
    #[command(flatten)]
    kernels: models::cpu::KernelArgs,
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
    #[arg(long, env = "VERDICT_TRUNCATE", overrides_with = "no_truncate")]
    truncate: bool,
    #[arg(long, overrides_with = "truncate", hide = true)]
    #[allow(dead_code)] // the `--no-x` half of `--x / --no-x`
    no_truncate: bool,
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
    /// Longest wait for more requests once a batch has one [default: 2, and only while
    /// requests come concurrently: a lone client never waits]; given, always waited.
    #[arg(long, env = "VERDICT_MAX_BATCH_WAIT_MS")]
    max_batch_wait_ms: Option<u64>,
    /// How requests are batched: `auto` (measured on the loaded model at the first start on
    /// this CPU, then cached: docs/serving.md), `packed` (one task version's inputs side by side
    /// in shared rows, no padding), `padded` (one input per padded row) or `off` (one request
    /// per forward pass). `/info` says what was chosen.
    #[arg(long, env = "VERDICT_BATCHING", default_value_t = tuning::Batching::Auto)]
    batching: tuning::Batching,
    /// The same as `--batching off`.
    #[arg(long, env = "VERDICT_NO_BATCHING", hide = true)]
    no_batching: bool,
    /// Tokens per packed row (`--batching packed`; `auto` measures packing at this size).
    #[arg(long, env = "VERDICT_PACK_TOKENS", default_value_t = 256)]
    pack_tokens: usize,
    /// Recompute every prompt's constant prefix (for comparison).
    #[arg(long, env = "VERDICT_NO_PREFIX_CACHE", overrides_with = "prefix_cache_on")]
    no_prefix_cache: bool,
    #[arg(long = "prefix-cache", overrides_with = "no_prefix_cache", hide = true)]
    #[allow(dead_code)] // the `--x` half of `--x / --no-x`
    prefix_cache_on: bool,
    /// Fold each adapter version into its own copy of the base weights: faster per row,
    /// one forward per version in a batch, a copy of the projections per version.
    #[arg(long, env = "VERDICT_MERGED", overrides_with = "no_merged")]
    merged: bool,
    #[arg(long, overrides_with = "merged", hide = true)]
    #[allow(dead_code)] // the `--no-x` half of `--x / --no-x`
    no_merged: bool,
    /// What constrained scoring compares between labels: `full` (label word and closing tag,
    /// exact) or `word` (the label word alone: no answer tokens after the prompt when every
    /// word is one token; docs/serving.md).
    #[arg(long, env = "VERDICT_ANSWER_SCORING", default_value_t = AnswerScoring::Full)]
    answer_scoring: AnswerScoring,
    /// Answer tasks that have no adapter with the base model alone.
    #[arg(long, env = "VERDICT_ZERO_SHOT_FALLBACK", overrides_with = "no_zero_shot_fallback")]
    zero_shot_fallback: bool,
    #[arg(long, overrides_with = "zero_shot_fallback", hide = true)]
    #[allow(dead_code)] // the `--no-x` half of `--x / --no-x`
    no_zero_shot_fallback: bool,
    /// The task `POST /predict` answers (default: the only task with an adapter).
    #[arg(long, env = "VERDICT_DEFAULT_TASK")]
    default_task: Option<String>,
    /// Bearer token for the admin endpoints; without one they are disabled.
    #[arg(long, env = "VERDICT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Most adapter versions loaded at once, all tasks together (0: no limit). Serving
    /// versions count and are never evicted; beyond the limit the least recently used others
    /// are freed. Only admin calls and the registry watch load versions, never a request.
    #[arg(long, env = "VERDICT_MAX_LOADED_VERSIONS", default_value_t = 8)]
    max_loaded_versions: usize,
    /// Bearer token of the inference and information routes (`/v1/classify`, `/predict`,
    /// `/v1/tokenize`, `/v1/tasks`, `/v1/adapters`, `/info`), as TEI's `--api-key`; without
    /// one they are open. Admin routes take the admin token instead.
    #[arg(long, env = "VERDICT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// How often the registry is checked for a changed CURRENT (0: never).
    #[arg(long, env = "VERDICT_WATCH_INTERVAL_MS", default_value_t = 100)]
    watch_interval_ms: u64,
    /// Longest wait for requests in flight at shutdown.
    #[arg(long, env = "VERDICT_SHUTDOWN_TIMEOUT_S", default_value_t = 30)]
    shutdown_timeout_s: u64,
    /// Log lines on stderr: `text` (`verdict-serve: <message> key=value ...`) or `json` (one
    /// object per line); which events, as `RUST_LOG` says (default `info`).
    #[arg(long, env = "VERDICT_LOG_FORMAT", value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
}

/// The model a `--model` argument resolved to.
enum ModelSource {
    Decoder(PathBuf),
    Encoder(EncoderSource),
}

impl ModelSource {
    fn describe(&self) -> String {
        match self {
            ModelSource::Decoder(p) => p.display().to_string(),
            ModelSource::Encoder(e) => e.describe(),
        }
    }
}

/// Loads the model and hashes its weights (the adapters' manifests name them) at once.
fn load_backend(cli: &LoadArgs) -> Result<(Backend, String)> {
    let (backend, sha) = std::thread::scope(|s| match &cli.model {
        ModelSource::Decoder(path) => {
            let loaded = models::load_for(
                path,
                cli.weights,
                cli.dtype,
                &cli.device,
                &cli.kernels,
                models::cpu::Purpose::Serve,
                &cli.cache_dir,
                &mut |line| tracing::info!("{line}"),
            )
            .map_err(|e| anyhow!("{}: {e}", path.display()));
            // A pack file records the weights' sha256 (checked against their size and time):
            // a warm start need not read the whole file again.
            let sha = match loaded.as_ref().map(|m| m.weights_sha256.clone()) {
                Ok(Some(sha)) => Ok(Ok(sha)),
                _ => s.spawn(|| weights_sha256(path)).join(),
            };
            (loaded.map(|m| Backend::Decoder(Arc::new(m))), sha)
        }
        ModelSource::Encoder(source) => {
            let hasher = s.spawn(|| source.weights_sha256());
            let loaded = Encoder::load(source, &cli.device)
                .map(|e| Backend::Encoder(Arc::new(e)))
                .map_err(|e| anyhow!("{}: {e}", source.describe()));
            (loaded, hasher.join())
        }
    });
    let sha = sha
        .map_err(|_| anyhow!("the hashing thread panicked"))?
        .with_context(|| format!("hashing {}", cli.model.describe()))?;
    Ok((backend?, sha))
}

/// Loads the model, the tasks and the adapters; starts the engine.
fn load(cli: &LoadArgs, metrics: Arc<metrics::Metrics>) -> Result<infer::Ready> {
    let t0 = Instant::now();
    let (backend, sha) = load_backend(cli)?;
    let mut registry = TaskRegistry::builtin();
    for f in &cli.task_files {
        registry.load_file(f)?;
    }
    let registry = Arc::new(registry);
    let tasks: BTreeMap<String, Arc<contract::TaskEntry>> = registry
        .tasks()
        .iter()
        .map(|t| Ok((t.name.clone(), Arc::new(backend.task_entry(t, cli.answer_scoring)?))))
        .collect::<Result<_>>()?;
    let adapters = Arc::new(adapters::AdapterTable::new(
        Registry::new(&cli.adapters),
        registry,
        backend.clone(),
        sha.clone(),
        cli.merged,
        cli.max_loaded_versions,
        metrics.clone(),
    ));
    for event in adapters.sync() {
        tracing::info!("adapters: {event}");
    }
    let mut batch = cli.batch;
    let (compute, serving): (Box<dyn contract::Compute>, tuning::Choice) = match &backend {
        Backend::Decoder(loaded) => {
            let mut engine = backend::decoder::Engine::new(
                loaded.clone(),
                backend::decoder::EngineOptions {
                    prefix_cache: cli.prefix_cache,
                    merged: cli.merged,
                    pack_tokens: cli.pack_tokens,
                },
                metrics.clone(),
            );
            let choice = choose_batching(cli, loaded, &tasks, &adapters, &mut engine, &sha)?;
            match choice.batching {
                tuning::Batching::Padded => engine.set_pack_tokens(0),
                tuning::Batching::Off => batch.batching = false,
                _ => {}
            }
            if choice.max_batch_rows > 0 {
                batch.max_batch_rows = batch.max_batch_rows.min(choice.max_batch_rows);
            }
            (Box::new(engine), choice)
        }
        // An encoder's batch is padded rows; batching is on unless asked off.
        Backend::Encoder(encoder) => {
            let mode =
                if cli.batching == tuning::Batching::Off { tuning::Batching::Off } else { tuning::Batching::Padded };
            batch.batching = mode != tuning::Batching::Off;
            (Box::new(backend::encoder::EncoderEngine::new(encoder.clone())), tuning::Choice::flag(mode))
        }
    };
    tracing::info!("{}", serving.describe());
    if let Some(layout) = backend.prompt_layout() {
        tracing::info!("task prompts: {layout}");
    }
    let scheduler = Arc::new(queue::Scheduler::start(compute, batch, metrics)?);
    // Loading parses the model file's metadata and vocabulary: the allocator keeps the freed
    // pages resident (about 100 MiB on Qwen2.5-0.5B), private to this process where the packed
    // weights are shared. Give them back.
    shared::memory::release_free_pages();
    tracing::info!("model and adapters loaded in {:.2} s", t0.elapsed().as_secs_f64());
    let kernels = match &backend {
        Backend::Decoder(loaded) => loaded.model.kernels().describe(),
        Backend::Encoder(_) => "candle's kernels".into(),
    };
    Ok(infer::Ready { backend, tasks, adapters, scheduler, serving, kernels })
}

/// The batching mode: the flag's, a cached measurement's, or one measured now (`tuning`).
fn choose_batching(
    cli: &LoadArgs,
    loaded: &Arc<models::LoadedModel>,
    tasks: &BTreeMap<String, Arc<contract::TaskEntry>>,
    adapters: &adapters::AdapterTable,
    engine: &mut backend::decoder::Engine,
    sha: &str,
) -> Result<tuning::Choice> {
    if cli.batching != tuning::Batching::Auto {
        return Ok(tuning::Choice { max_batch_rows: cli.batch.max_batch_rows, ..tuning::Choice::flag(cli.batching) });
    }
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let key = format!(
        "verdict {} | {} | model {sha} | {threads} threads | scoring {} | prefix cache {} | merged {} | pack {} | rows {}",
        env!("CARGO_PKG_VERSION"),
        loaded.model.kernels().identity(),
        cli.answer_scoring,
        cli.prefix_cache,
        cli.merged,
        cli.pack_tokens,
        cli.batch.max_batch_rows
    );
    let file = tuning::cache_file(&cli.cache_dir, &key);
    if let Some(choice) = tuning::read_cached(&file, &key) {
        return Ok(choice);
    }
    // Measured on the default task, else the first task that serves an adapter, else the first.
    let pick = cli
        .default_task
        .as_ref()
        .and_then(|t| tasks.get(t))
        .or_else(|| tasks.values().find(|e| adapters.current(&e.task.name).is_some()))
        .or_else(|| tasks.values().next());
    let Some(entry) = pick else { return Ok(tuning::Choice::flag(tuning::Batching::Packed)) };
    let version = adapters.current(&entry.task.name);
    let on =
        format!("{} {}", entry.task.name, version.as_ref().map_or("(no adapter)".to_string(), |v| v.version.clone()));
    let encode = |fields: &BTreeMap<String, String>| -> Result<Vec<u32>, String> {
        let parts = entry.task.prompt(loaded.chat.as_ref(), &[], fields).map_err(|e| e.to_string())?;
        loaded.encode_body(&parts).map_err(|e| e.to_string())
    };
    let rows = tuning::sample_rows(entry, version, encode).map_err(|e| anyhow!("batching measurement: {e}"))?;
    tracing::info!("measuring batching on {on} (once per CPU, model and thread count) ...");
    let t = tuning::measure(engine, &rows).map_err(|e| anyhow!("batching measurement: {e}"))?;
    let choice = tuning::Choice {
        batching: t.best(),
        source: "measured".into(),
        measured_ms: Some(t),
        measured_on: Some(on),
        max_batch_rows: t.batch_rows(cli.batch.max_batch_rows),
    };
    if let Err(e) = tuning::write_cached(&file, &key, &choice) {
        tracing::warn!("cannot cache the batching choice in {}: {e}", file.display());
    }
    Ok(choice)
}

/// What the loading thread needs from the command line.
struct LoadArgs {
    model: ModelSource,
    weights: WeightMode,
    device: Device,
    dtype: DType,
    adapters: PathBuf,
    task_files: Vec<PathBuf>,
    merged: bool,
    max_loaded_versions: usize,
    kernels: models::cpu::KernelArgs,
    cache_dir: PathBuf,
    prefix_cache: bool,
    pack_tokens: usize,
    answer_scoring: AnswerScoring,
    batching: tuning::Batching,
    default_task: Option<String>,
    batch: queue::BatchOptions,
}

fn main() -> std::process::ExitCode {
    let allocator = shared::memory::reuse_freed_memory();
    let cli = Cli::parse_from(shared::cli_config::expand_or_exit(Cli::command(), std::env::args_os()));
    if let Err(e) = logging::init(cli.log_format) {
        eprintln!("verdict-serve: {e:#}");
        return std::process::ExitCode::from(2);
    }
    if let Some(a) = allocator {
        tracing::info!("{a}");
    }
    // Limits that cannot work are a usage error, like clap's own (exit 2).
    if cli.max_inputs == 0 || cli.max_input_tokens == 0 || cli.max_batch_rows == 0 || cli.max_batch_tokens == 0 {
        tracing::error!("--max-inputs, --max-input-tokens, --max-batch-rows and --max-batch-tokens must be positive");
        return std::process::ExitCode::from(2);
    }
    // Every failure is a log line too (one JSON object with --log-format json).
    match actix_web::rt::System::new().block_on(serve(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let device = cli.device.open()?;
    let dtype = cli.dtype.resolve(&device);
    let cache = cli.cache_dir.clone().unwrap_or_else(assets::cache_dir);
    let model = match models::encoder::resolve(&cli.model, &cache)? {
        Some(source) => {
            // Heads classify from f32 embeddings: nothing to merge, no base model to fall back on.
            if cli.merged || cli.zero_shot_fallback || cli.weights != WeightMode::Dense {
                return Err(anyhow!(
                    "{} is an encoder: --merged, --zero-shot-fallback and --weights quantized are for decoders",
                    cli.model
                ));
            }
            ModelSource::Encoder(source)
        }
        None => ModelSource::Decoder(assets::resolve_model(&cli.model, &cache)?),
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let batch = queue::BatchOptions {
        batching: true,
        max_batch_tokens: cli.max_batch_tokens,
        max_batch_rows: cli.max_batch_rows,
        max_wait: Duration::from_millis(cli.max_batch_wait_ms.unwrap_or(2)),
        always_wait: cli.max_batch_wait_ms.is_some(),
        max_queue: cli.max_queue,
    };
    let state = web::Data::new(infer::AppState {
        ready: OnceLock::new(),
        model_path: model.describe(),
        model_dtype: match dtype {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        }
        .to_string(),
        batch,
        limits: infer::Limits {
            max_body_bytes: cli.max_body_bytes,
            max_inputs: cli.max_inputs,
            max_input_tokens: cli.max_input_tokens,
            truncate: cli.truncate,
            request_timeout: Duration::from_millis(cli.request_timeout_ms),
        },
        metrics: metrics.clone(),
        admin_token: cli.admin_token.clone().filter(|t| !t.is_empty()),
        api_key: cli.api_key.clone().filter(|k| !k.is_empty()),
        zero_shot: cli.zero_shot_fallback,
        default_task: cli.default_task.clone(),
    });
    let server = {
        let state = state.clone();
        HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(actix_web::middleware::from_fn(http::access_log))
                .configure(http::routes)
                .default_service(web::to(http::not_found))
        })
        .workers(cli.http_workers.max(1))
        .shutdown_timeout(cli.shutdown_timeout_s)
        .bind((cli.host.as_str(), cli.port))
        .with_context(|| format!("binding {}:{}", cli.host, cli.port))?
        .run()
    };
    let args = LoadArgs {
        model,
        weights: cli.weights,
        device,
        dtype,
        adapters: cli.adapters.clone(),
        task_files: cli.task_files.clone(),
        merged: cli.merged,
        max_loaded_versions: cli.max_loaded_versions,
        kernels: cli.kernels.clone(),
        cache_dir: cache.clone(),
        prefix_cache: !cli.no_prefix_cache,
        pack_tokens: cli.pack_tokens,
        answer_scoring: cli.answer_scoring,
        batching: if cli.no_batching { tuning::Batching::Off } else { cli.batching },
        default_task: cli.default_task.clone(),
        batch,
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
                    tracing::error!("loaded twice?");
                }
                tracing::info!("ready");
                if !watch_every.is_zero() {
                    // Polling watch: a CURRENT changed by `promote` elsewhere is picked up here.
                    let spawned = std::thread::Builder::new().name("verdict-watch".into()).spawn(move || {
                        // A problem that persists (an unreadable CURRENT) is logged once, not per poll.
                        let mut last: Vec<String> = Vec::new();
                        while !watch_flag.load(Ordering::Relaxed) {
                            std::thread::sleep(watch_every);
                            let events = adapters.sync();
                            for event in events.iter().filter(|e| !last.contains(e)) {
                                tracing::info!("adapters: {event}");
                            }
                            last = events;
                        }
                    });
                    if let Err(e) = spawned {
                        tracing::error!("cannot start the registry watch: {e}");
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::error!("cannot load the model: {e:#}");
                handle.stop(false).await;
            }
            Err(e) => {
                tracing::error!("loader crashed: {e}");
                handle.stop(false).await;
            }
        }
    });
    tracing::info!("listening on http://{}:{}", cli.host, cli.port);
    // actix stops on SIGINT/SIGTERM: no new connections, requests in flight finish (up to
    // --shutdown-timeout-s); then the engine finishes its queue and stops.
    server.await?;
    stop_watch.store(true, Ordering::Relaxed);
    match state.ready.get() {
        Some(ready) => {
            ready.scheduler.shutdown();
            tracing::info!("stopped");
            Ok(())
        }
        None => Err(anyhow!("stopped before the model was loaded")),
    }
}
