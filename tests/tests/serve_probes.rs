//! `verdict-serve` on loopback: health before and after loading, readiness, clean refusal of a
//! model that cannot be loaded.

use std::process::{Child, Stdio};
use std::time::Duration;
use tests::{http, wait_for, Server, TempDir};

#[test]
fn server_reports_health_and_readiness() {
    let server = Server::spawn(&["--model", "smollm2"], Stdio::piped());
    let port = server.port;
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
    let mut server = Server::spawn(&["--model", bad.to_str().unwrap()], Stdio::piped());
    let port = server.port;
    let status = server.child.wait_timeout(Duration::from_secs(30));
    assert!(matches!(status, Some(s) if !s.success()), "server should exit non-zero, got {status:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(server.child.stderr.as_mut().unwrap(), &mut err).unwrap();
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
