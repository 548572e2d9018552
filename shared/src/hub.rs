//! Models named by a Hugging Face Hub id, `org/name` or `org/name@revision`: the files a model
//! directory needs are downloaded through `hf-hub` into the Hub's standard cache
//! (`$HF_HOME/hub/models--org--name/snapshots/<commit>/`), and that snapshot directory is what
//! the rest of Verdict loads, like any local directory.
//!
//! The environment is honoured as `huggingface_hub` does: `HF_ENDPOINT` (the server),
//! `HF_HOME` (the cache), `HF_TOKEN` (a bearer token, else the `$HF_HOME/token` file) and
//! `HF_HUB_OFFLINE` (resolve from the cache only, never touching the network).

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// The server `HF_ENDPOINT` names, default the public Hub.
pub const ENDPOINT_ENV: &str = "HF_ENDPOINT";
/// The Hub's home directory; the cache is its `hub/` folder.
pub const HOME_ENV: &str = "HF_HOME";
/// A token sent as `Authorization: Bearer <token>` (gated and private repositories).
pub const TOKEN_ENV: &str = "HF_TOKEN";
/// `1` (or `true`, `yes`, `on`): resolve from the cache only.
pub const OFFLINE_ENV: &str = "HF_HUB_OFFLINE";
/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files a model directory may have besides the required ones: fetched when the repository
/// lists them.
const OPTIONAL_FILES: [&str; 2] = ["tokenizer_config.json", "generation_config.json"];
/// Files every model directory needs.
const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
const SINGLE_WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// A Hub model id with the revision to load (a branch, tag or commit; `main` when none given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// What follows `@`, else `main`.
    pub revision: String,
}

impl HubId {
    /// Parses `org/name` or `org/name@revision`; `None` when `arg` is not of that form (exactly
    /// one `/`, both halves made of letters, digits, `-`, `_` and `.`, not starting with `.` or
    /// `-`, no `..` or `--`; a revision without spaces or `..`). Whether a path of that name
    /// exists is the caller's question: an existing path always wins.
    pub fn parse(arg: &str) -> Option<Self> {
        let (repo, revision) = match arg.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (arg, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let valid_part = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with(['.', '-'])
                && !p.ends_with('.')
                && !p.contains("..")
                && !p.contains("--")
        };
        let valid_revision = !revision.is_empty()
            && !revision.contains("..")
            && !revision.starts_with('/')
            && revision.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        (valid_part(org) && valid_part(name) && valid_revision)
            .then(|| Self { repo: repo.to_string(), revision: revision.to_string() })
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// Why a Hub model could not be had.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The Hub answered 404 for a file the model needs.
    #[error("{repo}@{revision} has no {file} ({endpoint} answered 404)")]
    MissingFile { repo: String, revision: String, file: String, endpoint: String },
    /// The Hub does not know the revision (or the repository).
    #[error("revision {revision:?} of {repo} not found at {endpoint} (404: no such branch, tag or commit, or no such repository)")]
    RevisionNotFound { repo: String, revision: String, endpoint: String },
    /// The Hub refused access: a gated or private repository.
    #[error("{endpoint} refused access to {repo} ({status}): {hint}")]
    Unauthorized { repo: String, endpoint: String, status: u16, hint: &'static str },
    /// Another status than the above.
    #[error("{endpoint} answered {status} for {what} of {repo}@{revision}")]
    Status { repo: String, revision: String, what: String, endpoint: String, status: u16 },
    /// No answer at all: refused connection, unknown host, timeout, TLS.
    #[error(
        "network failure reaching the Hub at {endpoint} ({detail}); set HF_HUB_OFFLINE=1 to load from the cache only"
    )]
    Network { endpoint: String, detail: String },
    /// Offline, and the cache lacks a file the model needs.
    #[error("HF_HUB_OFFLINE is set and {file} of {repo}@{revision} is not in the Hub cache ({cache}): run once online first")]
    NotCached { repo: String, revision: String, file: String, cache: PathBuf },
    /// The sharded weights' index could not be read.
    #[error("{file} of {repo}@{revision}: {detail}")]
    BadIndex { repo: String, revision: String, file: String, detail: String },
    /// Anything else while downloading (cache I/O, a malformed answer).
    #[error("downloading {file} of {repo}@{revision} from {endpoint}: {detail}")]
    Download { repo: String, revision: String, file: String, endpoint: String, detail: String },
}

/// Where and how to reach the Hub: normally [`HubSettings::from_env`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The server, without a trailing `/`.
    pub endpoint: String,
    /// The cache directory (`$HF_HOME/hub`).
    pub cache: PathBuf,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// Resolve from the cache only.
    pub offline: bool,
    /// Report each download on stderr (a line with its size, and a bar on a terminal).
    pub progress: bool,
}

impl HubSettings {
    /// The settings the environment gives: `HF_ENDPOINT`, `HF_HOME` (else
    /// `~/.cache/huggingface`), `HF_TOKEN` (else the token file), `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        // An empty HF_HOME is unset (hf-hub would make it the relative path `hub`).
        let cache = match var(HOME_ENV) {
            Some(home) => Cache::new(PathBuf::from(home).join("hub")),
            // hf-hub's default, without its panic when there is no home directory.
            None => Cache::new(dirs::home_dir().unwrap_or_else(std::env::temp_dir).join(".cache/huggingface/hub")),
        };
        let endpoint =
            var(ENDPOINT_ENV).unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()).trim_end_matches('/').to_string();
        let token = var(TOKEN_ENV).map(|t| t.trim().to_string()).or_else(|| cache.token());
        let offline = var(OFFLINE_ENV)
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Self { endpoint, cache: cache.path().clone(), token, offline, progress: true }
    }
}

/// The snapshot directory of `id` in the Hub cache, downloading what it lacks (unless offline).
pub fn resolve(id: &HubId, settings: &HubSettings) -> Result<PathBuf, HubError> {
    if settings.offline {
        from_cache(id, &settings.cache)
    } else {
        download(id, settings)
    }
}

/// What the cache says `id` is: its snapshot directory, every needed file present.
fn from_cache(id: &HubId, cache_dir: &Path) -> Result<PathBuf, HubError> {
    let cache = Cache::new(cache_dir.to_path_buf());
    let not_cached = |file: &str| HubError::NotCached {
        repo: id.repo.clone(),
        revision: id.revision.clone(),
        file: file.to_string(),
        cache: cache_dir.to_path_buf(),
    };
    let repo_dir = cache_dir.join(Repo::model(id.repo.clone()).folder_name());
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(&id.revision)) {
        Ok(c) => c.trim().to_string(),
        // A commit named directly needs no ref.
        Err(_) if is_commit(&id.revision) => id.revision.clone(),
        Err(_) => return Err(not_cached(REQUIRED_FILES[0])),
    };
    let snapshot =
        cache.repo(Repo::with_revision(id.repo.clone(), RepoType::Model, commit.clone())).pointer_path(&commit);
    for file in REQUIRED_FILES {
        if !snapshot.join(file).is_file() {
            return Err(not_cached(file));
        }
    }
    if snapshot.join(SINGLE_WEIGHTS).is_file() {
        return Ok(snapshot);
    }
    let index = snapshot.join(WEIGHTS_INDEX);
    if !index.is_file() {
        return Err(not_cached(SINGLE_WEIGHTS));
    }
    for shard in shards(id, &index)? {
        if !snapshot.join(&shard).is_file() {
            return Err(not_cached(&shard));
        }
    }
    Ok(snapshot)
}

/// Whether a revision is a full commit hash.
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The shard files a sharded checkpoint's index lists, each once, in order.
fn shards(id: &HubId, index: &Path) -> Result<Vec<String>, HubError> {
    let bad = |detail: String| HubError::BadIndex {
        repo: id.repo.clone(),
        revision: id.revision.clone(),
        file: WEIGHTS_INDEX.to_string(),
        detail,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json["weight_map"].as_object().ok_or_else(|| bad("no weight_map object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for v in map.values() {
        let f = v.as_str().ok_or_else(|| bad("a weight_map value is not a file name".into()))?;
        // The shards land next to the index: a name that climbs out is refused.
        if f.contains("..") || f.starts_with('/') || f.contains('\\') {
            return Err(bad(format!("shard name {f:?} leaves the repository")));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    if files.is_empty() {
        return Err(bad("the weight_map is empty".into()));
    }
    files.sort();
    Ok(files)
}

/// Which request a failure came from, for its error.
#[derive(Clone, Copy)]
enum Asked<'a> {
    Revision,
    File(&'a str),
}

/// The typed error of one failed hf-hub call.
fn classify(err: ApiError, id: &HubId, settings: &HubSettings, asked: Asked) -> HubError {
    let endpoint = settings.endpoint.clone();
    let (repo, revision) = (id.repo.clone(), id.revision.clone());
    let what = match asked {
        Asked::Revision => "the revision".to_string(),
        Asked::File(f) => f.to_string(),
    };
    match err {
        ApiError::RequestError(e) => match *e {
            ureq::Error::StatusCode(404) => match asked {
                Asked::Revision => HubError::RevisionNotFound { repo, revision, endpoint },
                Asked::File(f) => HubError::MissingFile { repo, revision, file: f.to_string(), endpoint },
            },
            ureq::Error::StatusCode(status @ (401 | 403)) => HubError::Unauthorized {
                repo,
                endpoint,
                status,
                hint: if settings.token.is_some() {
                    "the token (HF_TOKEN or the token file) was refused: check that it may read this repository"
                } else {
                    "a gated or private repository needs a token: set HF_TOKEN"
                },
            },
            ureq::Error::StatusCode(status) => HubError::Status { repo, revision, what, endpoint, status },
            other => HubError::Network { endpoint, detail: other.to_string() },
        },
        other => HubError::Download { repo, revision, file: what, endpoint, detail: other.to_string() },
    }
}

/// Online: asks the Hub which commit the revision is and which files it has, downloads the
/// needed files of that commit the cache lacks, and points the revision's ref at the commit.
fn download(id: &HubId, settings: &HubSettings) -> Result<PathBuf, HubError> {
    let api = ApiBuilder::from_cache(Cache::new(settings.cache.clone()))
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        .with_progress(false)
        .build()
        .map_err(|e| classify(e, id, settings, Asked::Revision))?;
    let info = api
        .repo(Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone()))
        .info()
        .map_err(|e| classify(e, id, settings, Asked::Revision))?;
    let commit = info.sha.clone();
    let listed = |f: &str| info.siblings.iter().any(|s| s.rfilename == f);
    // Every file from the one commit, so a branch that moves mid-download cannot mix two.
    let at_commit = Repo::with_revision(id.repo.clone(), RepoType::Model, commit.clone());
    let cached = Cache::new(settings.cache.clone()).repo(at_commit.clone());
    let remote = api.repo(at_commit);
    let fetch = |file: &str| -> Result<PathBuf, HubError> {
        if let Some(path) = cached.get(file) {
            return Ok(path);
        }
        let progress = FileProgress::new(id, settings.progress);
        remote.download_with_progress(file, progress).map_err(|e| classify(e, id, settings, Asked::File(file)))
    };
    let mut files: Vec<String> = REQUIRED_FILES.iter().map(|f| f.to_string()).collect();
    files.extend(OPTIONAL_FILES.iter().filter(|f| listed(f)).map(|f| f.to_string()));
    for file in &files {
        fetch(file)?;
    }
    // Sharded weights when the repository has an index and no single file.
    if listed(WEIGHTS_INDEX) && !listed(SINGLE_WEIGHTS) {
        let index = fetch(WEIGHTS_INDEX)?;
        for shard in shards(id, &index)? {
            fetch(&shard)?;
        }
    } else {
        fetch(SINGLE_WEIGHTS)?;
    }
    let named = Cache::new(settings.cache.clone()).repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision.clone(),
    ));
    named.create_ref(&commit).map_err(|e| HubError::Download {
        repo: id.repo.clone(),
        revision: id.revision.clone(),
        file: format!("refs/{}", id.revision),
        endpoint: settings.endpoint.clone(),
        detail: e.to_string(),
    })?;
    Ok(cached.pointer_path(&commit))
}

/// One download's report: a line with the file and its size, then a bar (drawn only on a
/// terminal).
struct FileProgress {
    label: String,
    show: bool,
    started: bool,
    bar: indicatif::ProgressBar,
}

impl FileProgress {
    fn new(id: &HubId, show: bool) -> Self {
        Self { label: id.to_string(), show, started: false, bar: indicatif::ProgressBar::hidden() }
    }
}

impl Progress for FileProgress {
    fn init(&mut self, size: usize, filename: &str) {
        // hf-hub calls init again when the body starts: one line per file.
        if self.show && !self.started {
            self.started = true;
            eprintln!("downloading {filename} of {} ({})", self.label, indicatif::HumanBytes(size as u64));
            self.bar = indicatif::ProgressBar::new(size as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template("  [{bar:40}] {bytes}/{total_bytes} {eta}") {
                self.bar.set_style(style);
            }
        }
    }

    fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(repo: &str, revision: &str) -> Option<HubId> {
        Some(HubId { repo: repo.into(), revision: revision.into() })
    }

    #[test]
    fn hub_ids_are_org_slash_name_with_an_optional_revision() {
        assert_eq!(
            HubId::parse("HuggingFaceTB/SmolLM2-135M-Instruct"),
            id("HuggingFaceTB/SmolLM2-135M-Instruct", "main")
        );
        assert_eq!(HubId::parse("org/tiny@v2"), id("org/tiny", "v2"));
        assert_eq!(HubId::parse("org/tiny@refs/pr/3"), id("org/tiny", "refs/pr/3"));
        assert_eq!(HubId::parse("Qwen/Qwen2.5-0.5B@0123abc"), id("Qwen/Qwen2.5-0.5B", "0123abc"));
        assert_eq!(HubId::parse("org/tiny").unwrap().to_string(), "org/tiny@main");
        for not_an_id in [
            "smollm2",
            "runs/x/y",
            "/abs/path",
            "./runs",
            "../up/x",
            ".hidden/x",
            "org/",
            "/name",
            "org/na me",
            "org/tiny@",
            "org/tiny@a b",
            "org/tiny@../x",
            "org/a..b",
            "org/a--b",
            "-org/name",
            "org/name.",
            "model.gguf",
            "C:\\models\\x",
        ] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id}");
        }
    }

    /// A hand-made cache: `refs/<revision>` and a snapshot with `files`.
    fn cache_with(root: &Path, revision: &str, commit: &str, files: &[(&str, &str)]) {
        let repo = root.join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join(revision), commit).unwrap();
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for (f, text) in files {
            std::fs::write(snap.join(f), text).unwrap();
        }
    }

    fn temp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("verdict-hub-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn offline_resolves_the_snapshot_the_ref_names_or_names_the_missing_file() {
        let root = temp("offline");
        let commit = "a".repeat(40);
        let index = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#;
        cache_with(
            &root,
            "main",
            &commit,
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                (WEIGHTS_INDEX, index),
                ("model-00001-of-00002.safetensors", ""),
            ],
        );
        let main = HubId::parse("org/tiny").unwrap();
        let err = from_cache(&main, &root).unwrap_err();
        assert!(
            matches!(&err, HubError::NotCached { file, .. } if file == "model-00002-of-00002.safetensors"),
            "{err}"
        );
        assert!(err.to_string().contains("org/tiny@main") && err.to_string().contains(OFFLINE_ENV), "{err}");
        std::fs::write(
            root.join("models--org--tiny/snapshots").join(&commit).join("model-00002-of-00002.safetensors"),
            "",
        )
        .unwrap();
        let snap = from_cache(&main, &root).unwrap();
        assert_eq!(snap, root.join("models--org--tiny/snapshots").join(&commit));
        // A commit named directly needs no ref; an unknown branch names the first file.
        assert_eq!(from_cache(&HubId::parse(&format!("org/tiny@{commit}")).unwrap(), &root).unwrap(), snap);
        let err = from_cache(&HubId::parse("org/tiny@v9").unwrap(), &root).unwrap_err();
        assert!(
            matches!(&err, HubError::NotCached { file, revision, .. } if file == "config.json" && revision == "v9")
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn shards_are_listed_once_and_may_not_leave_the_repository() {
        let root = temp("shards");
        std::fs::create_dir_all(&root).unwrap();
        let index = root.join(WEIGHTS_INDEX);
        let main = HubId::parse("org/tiny").unwrap();
        std::fs::write(&index, r#"{"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}"#)
            .unwrap();
        assert_eq!(shards(&main, &index).unwrap(), ["a.safetensors", "b.safetensors"]);
        std::fs::write(&index, r#"{"weight_map": {"x": "../../etc/passwd"}}"#).unwrap();
        assert!(matches!(shards(&main, &index), Err(HubError::BadIndex { .. })));
        std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
        assert!(shards(&main, &index).unwrap_err().to_string().contains("weight_map"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
