//! A loopback stand-in for the Hugging Face Hub's file API, enough for `hf-hub`'s sync client:
//! `GET /api/models/{org}/{name}/revision/{rev}` (the commit and its files) and
//! `GET /{org}/{name}/resolve/{rev}/{file}` with `Range`, answering with `X-Repo-Commit`, `ETag`
//! and `Content-Range` as the Hub does (and, for LFS files if asked, the Hub's redirect to a
//! content server). Started and stopped by the test that owns it: dropping
//! it closes the port, so later requests are refused.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One commit of a repository: its files by name.
#[derive(Clone, Debug, Default)]
pub struct Commit {
    /// 40 hex digits.
    pub sha: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Commit {
    /// A commit holding every file of `dir` (not recursive), its sha made from `seed`.
    pub fn from_dir(dir: &Path, seed: u8) -> Self {
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_file() {
                files.insert(e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap());
            }
        }
        Self { sha: format!("{seed:02x}").repeat(20), files }
    }
}

/// A model repository: its branches (each naming a commit) and, if gated, the token it wants.
#[derive(Clone, Debug, Default)]
pub struct MockRepo {
    /// `org/name`.
    pub id: String,
    /// Branch or tag name → commit.
    pub refs: Vec<(String, Commit)>,
    /// Requests without `Authorization: Bearer <token>` are refused (401).
    pub token: Option<String>,
    /// Answer `*.safetensors` as the Hub answers large (LFS) files: a 302 to a content server
    /// (`/cdn/<sha256>` here) with the blob's `X-Linked-Etag` and `X-Linked-Size`.
    pub lfs_redirect: bool,
}

/// One request as the mock saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

/// The running mock; stops on drop.
pub struct MockHub {
    pub port: u16,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl MockHub {
    /// Serves `repos` on a free loopback port.
    pub fn start(repos: Vec<MockRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = serve(stream, port, &repos, &seen2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { port, stop, seen, thread: Some(thread) }
    }

    /// `http://127.0.0.1:PORT`, what `HF_ENDPOINT` is set to.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The requests so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one request and closes the connection.
fn serve(stream: TcpStream, port: u16, repos: &[MockRepo], seen: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut range, mut authorization) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => authorization = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    seen.lock().unwrap().push(Seen { path: path.clone(), range: range.clone(), authorization: authorization.clone() });
    let (status, headers, body) = answer(&path, port, range.as_deref(), authorization.as_deref(), repos);
    let mut out = stream;
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.write_all(&body)?;
    out.flush()
}

type Answer = (u16, Vec<(&'static str, String)>, Vec<u8>);

fn error(status: u16, code: &str) -> Answer {
    (status, vec![("X-Error-Code", code.to_string())], format!("{{\"error\": \"{code}\"}}").into_bytes())
}

/// The Hub's answer to `path`.
fn answer(path: &str, port: u16, range: Option<&str>, authorization: Option<&str>, repos: &[MockRepo]) -> Answer {
    let path = path.replace("%2F", "/");
    if let Some(hash) = path.strip_prefix("/cdn/") {
        // The content server: any blob by its sha256, no token needed (the Hub signs its URLs).
        let blob = repos.iter().flat_map(|r| &r.refs).flat_map(|(_, c)| c.files.values()).find(|b| sha256(b) == hash);
        return match blob {
            Some(bytes) => ranged(bytes, range, vec![("ETag", format!("\"{hash}\""))]),
            None => error(404, "EntryNotFound"),
        };
    }
    let (api, rest) = match path.strip_prefix("/api/models/") {
        Some(rest) => (true, rest.to_string()),
        None => (false, path.trim_start_matches('/').to_string()),
    };
    let Some(repo) = repos.iter().find(|r| rest.starts_with(&format!("{}/", r.id))) else {
        // The Hub does not say whether a repository it will not show exists.
        return error(401, "RepoNotFound");
    };
    if let Some(token) = &repo.token {
        if authorization != Some(&format!("Bearer {token}")) {
            return error(401, "GatedRepo");
        }
    }
    let rest = &rest[repo.id.len() + 1..];
    let find = |rev: &str| {
        repo.refs
            .iter()
            .map(|(_, c)| c)
            .find(|c| c.sha == rev)
            .or_else(|| repo.refs.iter().find(|(name, _)| name == rev).map(|(_, c)| c))
    };
    if api {
        let Some(commit) = rest.strip_prefix("revision/").and_then(find) else {
            return error(404, "RevisionNotFound");
        };
        let siblings: Vec<serde_json::Value> =
            commit.files.keys().map(|f| serde_json::json!({"rfilename": f})).collect();
        let body = serde_json::json!({"id": repo.id, "sha": commit.sha, "siblings": siblings});
        return (200, vec![("Content-Type", "application/json".into())], body.to_string().into_bytes());
    }
    let Some(rest) = rest.strip_prefix("resolve/") else { return error(404, "EntryNotFound") };
    // The revision is the longest ref name that prefixes the rest (a branch may hold `/`).
    let Some((commit, file)) = (1..rest.len())
        .rev()
        .filter(|&i| rest.as_bytes()[i] == b'/')
        .find_map(|i| find(&rest[..i]).map(|c| (c, &rest[i + 1..])))
    else {
        return error(404, "RevisionNotFound");
    };
    let Some(bytes) = commit.files.get(file) else { return error(404, "EntryNotFound") };
    let hash = sha256(bytes);
    if repo.lfs_redirect && file.ends_with(".safetensors") {
        let headers = vec![
            ("X-Repo-Commit", commit.sha.clone()),
            ("X-Linked-Etag", format!("\"{hash}\"")),
            ("X-Linked-Size", bytes.len().to_string()),
            // The pointer file's git hash, which a client must not take for the blob's.
            ("ETag", format!("\"pointer-{}\"", &hash[..16])),
            ("Location", format!("http://127.0.0.1:{port}/cdn/{hash}")),
        ];
        return (302, headers, Vec::new());
    }
    ranged(bytes, range, vec![("X-Repo-Commit", commit.sha.clone()), ("ETag", format!("\"{hash}\""))])
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// `bytes` whole (200) or the part `range` asks for (206 with `Content-Range`).
fn ranged(bytes: &[u8], range: Option<&str>, mut headers: Vec<(&'static str, String)>) -> Answer {
    let len = bytes.len();
    let wanted = range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| {
        let (a, b) = r.split_once('-')?;
        let a: usize = a.parse().ok()?;
        let b: usize = if b.is_empty() { len.saturating_sub(1) } else { b.parse::<usize>().ok()?.min(len - 1) };
        (a <= b && b < len).then_some((a, b))
    });
    match wanted {
        Some((a, b)) => {
            headers.push(("Content-Range", format!("bytes {a}-{b}/{len}")));
            (206, headers, bytes[a..=b].to_vec())
        }
        None => (200, headers, bytes.to_vec()),
    }
}
