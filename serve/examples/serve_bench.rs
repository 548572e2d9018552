//! Load generator for `verdict-serve`: latency percentiles and throughput at several client
//! counts, with batching and the prefix cache on and off, plus cold start, resident memory and
//! adapter-swap visibility. It starts its own servers on loopback (one per configuration, all
//! loaded at once and measured one after another at each client count, so the comparisons are
//! taken minutes apart under the same background load), over a temporary adapter registry.
//!
//! ```text
//! cargo build --release -p serve --bins --examples
//! target/release/examples/serve_bench --model qwen0.5b [--adapter runs/mr/best] [--seconds 8]
//!     [--clients 1,8,32] [--configs on-on,on-off,off-on,off-off,padded]   # servers to start (`CONFIGS`)
//! ```

use candle_core::{DType, Device};
use models::{load_model, LoraAdapter, LoraConfig, Projection, WeightMode};
use serde_json::{json, Value};
use serve::loadgen::{self, Load, Outcome, SAMPLE_SENTENCES};
use shared::adapter::{weights_sha256, Manifest, MANIFEST_VERSION};
use shared::registry::Registry;
use shared::task::TaskRegistry;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const TOKEN: &str = "bench";

struct Args {
    model: String,
    weights: String,
    adapter: Option<PathBuf>,
    seconds: f64,
    clients: Vec<usize>,
    threads: Option<String>,
    /// Which configurations to start (keys of `CONFIGS`); all by default.
    only: Option<Vec<String>>,
}

fn args() -> Res<Args> {
    let mut a = Args {
        model: "qwen0.5b".into(),
        weights: "quantized".into(),
        adapter: None,
        seconds: 8.0,
        clients: vec![1, 8, 32],
        threads: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--model" => a.model = v()?,
            "--weights" => a.weights = v()?,
            "--adapter" => a.adapter = Some(v()?.into()),
            "--seconds" => a.seconds = v()?.parse()?,
            "--clients" => a.clients = v()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--threads" => a.threads = Some(v()?),
            "--configs" => a.only = Some(v()?.split(',').map(String::from).collect()),
            _ => return Err(format!("unknown argument {k}").into()),
        }
    }
    Ok(a)
}

fn http(port: u16, method: &str, path: &str, body: &str, auth: bool) -> std::io::Result<(u16, String)> {
    let bearer = format!("Bearer {TOKEN}");
    let headers: &[(&str, &str)] = if auth { &[("Authorization", &bearer)] } else { &[] };
    loadgen::http(([127, 0, 0, 1], port).into(), method, path, body, headers, Duration::from_secs(120))
}

/// A random adapter (rank 8 on q, k, v, o) with a manifest for `mr` on these base weights.
fn publish_random(reg: &Registry, model_path: &Path, weights: WeightMode, version: &str, seed: u64) -> Res<()> {
    let loaded = load_model(model_path, weights, DType::F32, &Device::Cpu)?;
    let task = TaskRegistry::builtin().get("mr")?.clone();
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        use_rslora: false,
        dropout: 0.0,
        targets: vec![Projection::Q, Projection::K, Projection::V, Projection::O],
        layers: None,
    };
    let adapter = LoraAdapter::init_random(lora, loaded.model.config(), seed, DType::F32, &Device::Cpu)?;
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        base_sha256: weights_sha256(model_path)?,
        base_model: model_path.display().to_string(),
        base_hub_id: None,
        task: task.name.clone(),
        template_version: task.template_version,
        template_hash: task.template_hash(),
        label_words: task.label_words(),
        method: "random".into(),
        command: "serve_bench".into(),
        steps: 0,
        dev_metrics: None,
    };
    reg.publish::<shared::registry::RegistryError>("mr", version, |d| {
        adapter.write_peft_files(d, "bench").map_err(std::io::Error::other)?;
        Ok(manifest.write(d)?)
    })?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)?.flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

struct Server {
    name: &'static str,
    child: Child,
    port: u16,
    ready_after: Duration,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn start(name: &'static str, bin: &Path, common: &[String], extra: &[&str]) -> Res<Server> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let t0 = Instant::now();
    let child = Command::new(bin)
        .args(common)
        .args(["--port", &port.to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut server = Server { name, child, port, ready_after: Duration::ZERO };
    while t0.elapsed() < Duration::from_secs(300) {
        if let Ok((200, _)) = http(port, "GET", "/ready", "", false) {
            server.ready_after = t0.elapsed();
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{name}: not ready after 300 s").into())
}

/// One measurement: `clients` threads sending single-input requests for `seconds`.
fn measure(port: u16, clients: usize, seconds: f64) -> Outcome {
    let bodies: Vec<String> = SAMPLE_SENTENCES.iter().map(|s| json!({"task": "mr", "inputs": s}).to_string()).collect();
    let load = Load {
        clients,
        max_requests: usize::MAX,
        max_time: Duration::from_secs_f64(seconds),
        timeout: Duration::from_secs(120),
    };
    loadgen::run(([127, 0, 0, 1], port).into(), "/v1/classify", &[], &bodies, &load)
}

/// (key for `--configs`, name, the server's extra flags).
const CONFIGS: [(&str, &str, &[&str]); 5] = [
    ("on-on", "batching on, prefix cache on", &[]),
    ("on-off", "batching on, prefix cache off", &["--no-prefix-cache"]),
    ("off-on", "batching off, prefix cache on", &["--no-batching"]),
    ("off-off", "batching off, prefix cache off", &["--no-batching", "--no-prefix-cache"]),
    // Batches as before padding-free packing: one input per padded row.
    ("padded", "batching on (padded rows), prefix cache on", &["--pack-tokens", "0"]),
];

fn main() -> Res<()> {
    let a = args()?;
    let exe = std::env::current_exe()?;
    let bin = exe.parent().and_then(Path::parent).ok_or("no target dir")?.join("verdict-serve");
    let cache = shared::assets::cache_dir();
    let model_path = shared::assets::resolve_model(&a.model, &cache)?;
    let weights: WeightMode = a.weights.parse().map_err(|e| format!("{e:?}"))?;
    let dir = std::env::temp_dir().join(format!("verdict-serve-bench-{}", std::process::id()));
    let reg = Registry::new(dir.join("adapters"));
    match &a.adapter {
        Some(src) => copy_dir(src, &reg.version_dir("mr", "v1")?)?,
        None => publish_random(&reg, &model_path, weights, "v1", 1)?,
    }
    publish_random(&reg, &model_path, weights, "v2", 2)?;
    reg.promote("mr", "v1")?;
    let mut common: Vec<String> = vec![
        "--model".into(),
        model_path.display().to_string(),
        "--weights".into(),
        a.weights.clone(),
        "--adapters".into(),
        reg.root().display().to_string(),
        "--admin-token".into(),
        TOKEN.into(),
        "--watch-interval-ms".into(),
        "50".into(),
    ];
    if let Some(t) = &a.threads {
        common.extend(["--threads".into(), t.clone()]);
    }
    let configs = CONFIGS.iter().filter(|(key, ..)| a.only.as_ref().is_none_or(|o| o.iter().any(|k| k == key)));
    let mut servers = Vec::new();
    for &(_, name, extra) in configs {
        let s = start(name, &bin, &common, extra)?;
        eprintln!("{name}: ready in {:.2} s", s.ready_after.as_secs_f64());
        // Warm up: the prefix cache and the first allocation.
        for s_ in SAMPLE_SENTENCES.iter().take(2) {
            http(s.port, "POST", "/v1/classify", &json!({"task": "mr", "inputs": s_}).to_string(), false)?;
        }
        servers.push(s);
    }
    println!("machine: {} cores, {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), a.model);
    println!("| configuration | clients | requests | errors | p50 ms | p99 ms | req/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for &c in &a.clients {
        for s in &servers {
            // 32 clients without batching adds little and takes long: measured only for the
            // prefix-cached pair.
            if c > 8 && s.name.ends_with("prefix cache off") {
                continue;
            }
            let o = measure(s.port, c, a.seconds);
            println!(
                "| {} | {c} | {} | {} | {:.0} | {:.0} | {:.2} |",
                s.name,
                o.latencies_ms.len(),
                o.errors,
                o.percentile(0.5),
                o.percentile(0.99),
                o.throughput()
            );
        }
    }
    for s in &servers {
        println!(
            "{}: cold start to ready {:.2} s, resident {:.0} MiB",
            s.name,
            s.ready_after.as_secs_f64(),
            rss_mib(s.child.id())
        );
    }
    // Adapter swap: the admin call, then the very next request.
    let s = &servers[0];
    let t0 = Instant::now();
    let (status, _) = http(s.port, "POST", "/v1/admin/adapters/mr/v2/promote", "", true)?;
    let swap = t0.elapsed();
    let (_, body) = http(s.port, "POST", "/v1/classify", &json!({"task": "mr", "inputs": "fine"}).to_string(), false)?;
    let v: Value = serde_json::from_str(&body)?;
    println!(
        "admin promote: {status} in {:.1} ms; the next request answered with {}",
        swap.as_secs_f64() * 1e3,
        v["adapter_version"]
    );
    // Registry watch: CURRENT rewritten by another process, until the server serves it.
    let t0 = Instant::now();
    reg.promote("mr", "v1")?;
    let seen = loop {
        let (_, body) = http(s.port, "GET", "/v1/adapters", "", false)?;
        let v: Value = serde_json::from_str(&body)?;
        if v.as_array().and_then(|a| a.iter().find(|t| t["task"] == "mr")).is_some_and(|t| t["current"] == "v1") {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err("the watch did not pick up CURRENT".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    println!("registry CURRENT rewritten -> serving it after {:.1} ms (watch every 50 ms)", seen.as_secs_f64() * 1e3);
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
