//! Helpers for integration tests that run the real `verdict-train` and `verdict-serve`
//! binaries: locating them, running them, and talking HTTP to a server on loopback.

pub mod hub_mock;
pub mod tiny;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary, built by `cargo build --bins` into the same target directory
/// as the running test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --bins` before the tests (the README's test command does)",
        path.display()
    );
    path
}

/// Runs a binary with arguments and returns its output (never panics on a non-zero exit).
pub fn run(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary(name));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn binary")
}

/// Runs `verdict-train` with `args`, requires success and returns its stderr.
pub fn train_ok(args: &[&str]) -> String {
    let o = run("verdict-train", args, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "verdict-train {args:?} failed:\n{stderr}");
    stderr
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `method path` on the loopback port with an optional JSON body ([`shared::http`]): the
/// status and the body as text.
pub fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let a = shared::http::request(method, &url, body.unwrap_or("").as_bytes(), &[], Duration::from_secs(30))
        .map_err(std::io::Error::other)?;
    Ok((a.status, a.body))
}

/// A raw HTTP response: status, header block and body bytes.
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request written byte for byte, with any body bytes and extra headers (`Name:
/// value` lines): the hostile requests a well-behaved client will not send (a body the server
/// stops reading at its limit, bytes that are not UTF-8, made-up methods), read back as far as
/// the server answered before closing. Everything else goes through [`http`].
pub fn http_raw(port: u16, method: &str, path: &str, body: &[u8], headers: &[&str]) -> std::io::Result<RawResponse> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    // The server may answer (413) before reading a large body; a failed write is not an error.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    // A server that refuses early may reset the connection after its answer: keep what came.
    if let Err(e) = s.read_to_end(&mut raw) {
        if raw.is_empty() {
            return Err(e);
        }
    }
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw.get(split + 4..).map(<[u8]>::to_vec).unwrap_or_default();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok(RawResponse { status, head, body })
}

/// Polls `path` until it answers `want` or `timeout` passes; returns the last answer.
pub fn wait_for(port: u16, path: &str, want: u16, timeout: Duration) -> Option<(u16, String)> {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        if let Ok(r) = http(port, "GET", path, None) {
            if r.0 == want {
                return Some(r);
            }
            last = Some(r);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("verdict-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `(step, value)` of every `metrics.jsonl` entry that has `key`.
pub fn metrics_series(out: &std::path::Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v[key].as_f64()?)))
        .collect()
}

/// An adapter directory's Verdict manifest, as JSON.
pub fn read_manifest(adapter: &std::path::Path) -> serde_json::Value {
    let path = adapter.join(shared::adapter::MANIFEST_FILE);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A `verdict-serve` on a free loopback port, started with the given arguments and killed on
/// drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Server {
    /// Starts `verdict-serve --port P <args>` and waits up to two minutes for `/ready`.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        Self::start_with_stderr(args, Stdio::inherit())
    }

    /// [`Server::start`] with its stderr (the log) going to `stderr`.
    pub fn start_with_stderr<S: AsRef<std::ffi::OsStr>>(args: &[S], stderr: Stdio) -> Self {
        let s = Self::spawn(args, stderr);
        let r = wait_for(s.port, "/ready", 200, Duration::from_secs(120));
        assert!(matches!(&r, Some((200, _))), "server not ready: {r:?}");
        s
    }

    /// Starts `verdict-serve --port P <args>` with its stderr going to `stderr`, without waiting.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S], stderr: Stdio) -> Self {
        let port = free_port();
        let child = Command::new(binary("verdict-serve"))
            .args(["--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Self { child, port }
    }

    /// `POST path` with a JSON body; the status and the JSON answer (a non-JSON answer fails).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, text) = http(self.port, "POST", path, Some(&body.to_string())).unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text:?}")))
    }

    /// `GET path`: the status and the body as text.
    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.port, "GET", path, None).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
