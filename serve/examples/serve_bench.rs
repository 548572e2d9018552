//! Load generator for `verdict-serve`: latency percentiles and throughput at several client
//! counts, with batching and the prefix cache on and off, plus cold start, resident memory and
//! adapter-swap visibility. It starts its own servers on loopback (one per configuration, all
//! loaded at once and measured one after another at each client count, so the comparisons are
//! taken minutes apart under the same background load), over a temporary adapter registry.
//!
//! ```text
//! cargo build --release -p serve --bins --examples
//! target/release/examples/serve_bench --model qwen0.5b [--adapter runs/mr/best] [--seconds 8]
//! ```

use candle_core::{DType, Device};
use models::{load_model, LoraAdapter, LoraConfig, Projection, WeightMode};
use serde_json::{json, Value};
use shared::adapter::{weights_sha256, Manifest, MANIFEST_VERSION};
use shared::registry::Registry;
use shared::task::TaskRegistry;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const TOKEN: &str = "bench";
const SENTENCES: [&str; 8] = [
    "A gorgeous, moving film with wonderful performances.",
    "Dull, tedious and badly acted from start to finish.",
    "The plot is thin, but the jokes land more often than not.",
    "An ambitious mess that never finds its footing.",
    "Quietly devastating and beautifully shot.",
    "I checked my watch more than once.",
    "A crowd-pleaser that earns every one of its laughs.",
    "Neither the script nor the cast rise above the material.",
];

struct Args {
    model: String,
    weights: String,
    adapter: Option<PathBuf>,
    seconds: f64,
    clients: Vec<usize>,
    threads: Option<String>,
}

fn args() -> Res<Args> {
    let mut a = Args {
        model: "qwen0.5b".into(),
        weights: "quantized".into(),
        adapter: None,
        seconds: 8.0,
        clients: vec![1, 8, 32],
        threads: None,
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
            _ => return Err(format!("unknown argument {k}").into()),
        }
    }
    Ok(a)
}

fn http(port: u16, method: &str, path: &str, body: &str, auth: bool) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let auth = if auth { format!("Authorization: Bearer {TOKEN}\r\n") } else { String::new() };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
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
fn measure(port: u16, clients: usize, seconds: f64) -> (Vec<f64>, f64, usize) {
    let lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(0usize));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(seconds);
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (lat, errors) = (lat.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut i = c;
                while Instant::now() < deadline {
                    let body = json!({"task": "mr", "inputs": SENTENCES[i % SENTENCES.len()]}).to_string();
                    let s = Instant::now();
                    match http(port, "POST", "/v1/classify", &body, false) {
                        Ok((200, _)) => lat.lock().map(|mut l| l.push(s.elapsed().as_secs_f64() * 1e3)).unwrap_or(()),
                        _ => *errors.lock().unwrap_or_else(|e| e.into_inner()) += 1,
                    }
                    i += clients;
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let wall = t0.elapsed().as_secs_f64();
    let mut l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_by(f64::total_cmp);
    let errors = *errors.lock().unwrap_or_else(|e| e.into_inner());
    (l, wall, errors)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

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
    let configs: [(&'static str, &[&str]); 4] = [
        ("batching on, prefix cache on", &[]),
        ("batching on, prefix cache off", &["--no-prefix-cache"]),
        ("batching off, prefix cache on", &["--no-batching"]),
        ("batching off, prefix cache off", &["--no-batching", "--no-prefix-cache"]),
    ];
    let mut servers = Vec::new();
    for (name, extra) in configs {
        let s = start(name, &bin, &common, extra)?;
        eprintln!("{name}: ready in {:.2} s", s.ready_after.as_secs_f64());
        // Warm up: the prefix cache and the first allocation.
        for s_ in SENTENCES.iter().take(2) {
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
            let (lat, wall, errors) = measure(s.port, c, a.seconds);
            println!(
                "| {} | {c} | {} | {errors} | {:.0} | {:.0} | {:.2} |",
                s.name,
                lat.len(),
                pct(&lat, 0.5),
                pct(&lat, 0.99),
                lat.len() as f64 / wall
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
