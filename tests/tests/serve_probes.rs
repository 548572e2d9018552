//! `verdict-serve` on loopback: health before and after loading, readiness, clean refusal of a
//! model that cannot be loaded.

use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tests::{binary, free_port, http, wait_for, TempDir};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[&str]) -> (Server, u16) {
    let port = free_port();
    let child = Command::new(binary("verdict-serve"))
        .args(["--port", &port.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (Server(child), port)
}

#[test]
fn server_reports_health_and_readiness() {
    let (_server, port) = start(&["--model", "smollm2"]);
    let (status, body) = wait_for(port, "/health", 200, Duration::from_secs(30)).expect("server answers");
    assert_eq!(status, 200);
    assert!(body.contains("\"ok\""), "{body}");
    let (status, body) = wait_for(port, "/ready", 200, Duration::from_secs(60)).expect("ready answers");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["arch"], "llama");
    let (status, _) = http(port, "GET", "/no/such/endpoint", None).unwrap();
    assert_eq!(status, 404);
}

#[test]
fn server_refuses_a_corrupt_model_file() {
    let dir = TempDir::new("serve-bad");
    let bad = dir.0.join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00 truncated").unwrap();
    let (mut server, port) = start(&["--model", bad.to_str().unwrap()]);
    let status = server.0.wait_timeout(Duration::from_secs(30));
    assert!(matches!(status, Some(s) if !s.success()), "server should exit non-zero, got {status:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(server.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("cannot load the model") && err.contains("broken.gguf"), "{err}");
    assert!(http(port, "GET", "/health", None).is_err(), "nothing listens after the refusal");
}

trait WaitTimeout {
    fn wait_timeout(&mut self, d: Duration) -> Option<std::process::ExitStatus>;
}

impl WaitTimeout for Child {
    fn wait_timeout(&mut self, d: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < d {
            if let Ok(Some(s)) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}
