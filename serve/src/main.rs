//! `verdict-serve`: loads one base model and answers health and readiness probes. The
//! classification API, adapter registry and batching engine are built on this.

use actix_web::{get, web, App, HttpResponse, HttpServer};
use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use models::{load_model, LoadedModel, WeightMode};
use serde_json::json;
use shared::assets;
use std::path::PathBuf;
use std::sync::OnceLock;

#[derive(Parser)]
#[command(name = "verdict-serve", version, about = "Serve Verdict classifiers over HTTP")]
struct Cli {
    /// A model name, .gguf file or Hugging Face directory.
    #[arg(long, env = "VERDICT_MODEL", default_value = "smollm2")]
    model: String,
    /// `quantized` (GGUF blocks, default for serving) or `dense` (f32).
    #[arg(long, env = "VERDICT_WEIGHTS", default_value = "quantized")]
    weights: WeightMode,
    #[arg(long, env = "VERDICT_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    #[arg(long, env = "VERDICT_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "VERDICT_PORT", default_value_t = 8080)]
    port: u16,
    /// Compute threads (default: all cores).
    #[arg(long, env = "VERDICT_THREADS")]
    threads: Option<usize>,
}

struct State {
    model_path: String,
    /// The loaded base model, set once loading finishes.
    model: OnceLock<LoadedModel>,
}

#[get("/health")]
async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[get("/ready")]
async fn ready(state: web::Data<State>) -> HttpResponse {
    match state.model.get() {
        Some(m) => HttpResponse::Ok()
            .json(json!({"ready": true, "model": state.model_path, "arch": m.model.config().arch.name()})),
        None => HttpResponse::ServiceUnavailable().json(json!({"ready": false})),
    }
}

#[actix_web::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let cache = cli.cache_dir.clone().unwrap_or_else(assets::cache_dir);
    let path = assets::resolve_model(&cli.model, &cache).map_err(|e| anyhow!(e))?;
    let state = web::Data::new(State { model_path: path.display().to_string(), model: OnceLock::new() });
    let server = {
        let state = state.clone();
        HttpServer::new(move || App::new().app_data(state.clone()).service(health).service(ready))
            .bind((cli.host.as_str(), cli.port))
            .with_context(|| format!("binding {}:{}", cli.host, cli.port))?
            .run()
    };
    // Load off the async runtime; /health answers meanwhile and /ready flips when done.
    let weights = cli.weights;
    let loaded = tokio::task::spawn_blocking(move || load_model(&path, weights, DType::F32, &Device::Cpu));
    let handle = server.handle();
    let ready_state = state.clone();
    tokio::spawn(async move {
        match loaded.await {
            Ok(Ok(m)) => {
                let _ = ready_state.model.set(m);
                eprintln!("verdict-serve: model loaded, ready");
            }
            Ok(Err(e)) => {
                eprintln!("verdict-serve: cannot load the model: {e}");
                handle.stop(false).await;
            }
            Err(e) => {
                eprintln!("verdict-serve: loader crashed: {e}");
                handle.stop(false).await;
            }
        }
    });
    eprintln!("verdict-serve: listening on http://{}:{}", cli.host, cli.port);
    server.await?;
    if state.model.get().is_none() {
        return Err(anyhow!("stopped before the model was loaded"));
    }
    Ok(())
}
