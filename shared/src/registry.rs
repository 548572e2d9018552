//! The adapter registry on disk, shared by the trainer (which publishes and promotes) and the
//! server (which loads and watches):
//!
//! ```text
//! <root>/<task>/<version>/      one immutable adapter: PEFT files + verdict_manifest.json
//! <root>/<task>/CURRENT         the version that serves the task (one line)
//! <root>/<task>/HISTORY         versions promoted so far, oldest first (for rollback)
//! <root>/<task>/AUDIT.jsonl     promotions, refusals and rollbacks, one JSON line each
//! ```
//!
//! Durability (`crate::atomic`): a version is written under a hidden temporary name, every
//! file and directory flushed to disk, then renamed into a name that does not exist yet (a
//! published version is never renamed away or replaced); `HISTORY` and `CURRENT` are replaced
//! by a flushed temporary file and a rename; every rename is flushed in its directory. So a
//! reader, or the registry after a crash or a kill at any point, sees a complete version or
//! none, and `CURRENT` names a complete version. The audit log is appended one whole line per
//! write, flushed (`crate::audit`).
//! Task and version names are plain (`[A-Za-z0-9._-]`, not starting with `.`), so no name can
//! leave the registry directory.

use crate::adapter::MANIFEST_FILE;
use crate::atomic;
use crate::audit::{self, AuditRecord};
use std::io;
use std::path::{Path, PathBuf};

/// The pointer file naming a task's serving version.
pub const CURRENT_FILE: &str = "CURRENT";
/// Promotions so far, one version per line, oldest first.
pub const HISTORY_FILE: &str = "HISTORY";
/// The task's audit log ([`crate::audit`]).
pub const AUDIT_FILE: &str = "AUDIT.jsonl";
/// Longest task or version name.
pub const MAX_NAME_LEN: usize = 128;

/// What can go wrong with the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid {what} name {name:?}: use 1-{MAX_NAME_LEN} of A-Z a-z 0-9 . _ -, not starting with '.'")]
    InvalidName { what: &'static str, name: String },
    #[error("adapter {task}/{version} is not in the registry")]
    NoSuchVersion { task: String, version: String },
    #[error("adapter {task}/{version} already exists: versions are immutable, publish a new one")]
    VersionExists { task: String, version: String },
    #[error("task {task} has no earlier promoted version to roll back to")]
    NoPrevious { task: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Writing a new version failed.
    #[error(transparent)]
    Write(#[from] io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io { path: path.to_path_buf(), source }
}

/// Whether `name` is a valid task or version name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_name(what: &'static str, name: &str) -> Result<(), RegistryError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(RegistryError::InvalidName { what, name: name.to_string() })
    }
}

/// An adapter registry rooted at one directory.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

impl Registry {
    /// The registry at `root` (it need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The registry directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<task>`, after checking the name.
    pub fn task_dir(&self, task: &str) -> Result<PathBuf, RegistryError> {
        check_name("task", task)?;
        Ok(self.root.join(task))
    }

    /// `<root>/<task>/<version>`, after checking both names.
    pub fn version_dir(&self, task: &str, version: &str) -> Result<PathBuf, RegistryError> {
        check_name("version", version)?;
        Ok(self.task_dir(task)?.join(version))
    }

    /// Tasks with a directory in the registry, sorted (an absent registry has none).
    pub fn tasks(&self) -> Result<Vec<String>, RegistryError> {
        list_dirs(&self.root)
    }

    /// Complete versions of a task (directories holding a manifest), sorted by name.
    pub fn versions(&self, task: &str) -> Result<Vec<String>, RegistryError> {
        let dir = self.task_dir(task)?;
        Ok(list_dirs(&dir)?.into_iter().filter(|v| dir.join(v).join(MANIFEST_FILE).is_file()).collect())
    }

    /// The version `CURRENT` names, if the task has one.
    pub fn current(&self, task: &str) -> Result<Option<String>, RegistryError> {
        let p = self.task_dir(task)?.join(CURRENT_FILE);
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                let v = text.trim();
                check_name("version", v)?;
                Ok(Some(v.to_string()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// Versions promoted so far, oldest first.
    pub fn history(&self, task: &str) -> Result<Vec<String>, RegistryError> {
        let p = self.task_dir(task)?.join(HISTORY_FILE);
        match std::fs::read_to_string(&p) {
            Ok(text) => Ok(text.lines().map(str::trim).filter(|l| valid_name(l)).map(str::to_string).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// The next free `vN` name: one past the highest `vN` among the task's version
    /// directories, complete or not (`v1` for none).
    pub fn next_version(&self, task: &str) -> Result<String, RegistryError> {
        let last = list_dirs(&self.task_dir(task)?)?
            .iter()
            .filter_map(|v| v.strip_prefix('v')?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        Ok(format!("v{}", last + 1))
    }

    /// Writes a new version with `write` (given a temporary directory), flushes it and renames
    /// it into place: it appears complete or not at all, and stays once this returns. An
    /// existing version is never replaced (`VersionExists`, also when another writer wins).
    pub fn publish<E: From<io::Error> + From<RegistryError>>(
        &self,
        task: &str,
        version: &str,
        write: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, E> {
        let dir = self.version_dir(task, version)?;
        let exists = || RegistryError::VersionExists { task: task.into(), version: version.into() };
        if dir.exists() {
            return Err(exists().into());
        }
        if !atomic::create_dir(&dir, write)? {
            return Err(exists().into());
        }
        Ok(dir)
    }

    /// Makes `version` the task's serving version (and appends it to the history).
    pub fn promote(&self, task: &str, version: &str) -> Result<(), RegistryError> {
        let dir = self.version_dir(task, version)?;
        if !dir.join(MANIFEST_FILE).is_file() {
            return Err(RegistryError::NoSuchVersion { task: task.into(), version: version.into() });
        }
        let mut history = self.history(task)?;
        if history.last().map(String::as_str) != Some(version) {
            history.push(version.to_string());
        }
        self.write_pointers(task, version, &history)
    }

    /// The version [`Registry::rollback`] would go back to, and the history it would leave.
    pub fn previous(&self, task: &str) -> Result<(String, Vec<String>), RegistryError> {
        let mut history = self.history(task)?;
        let current = self.current(task)?;
        // Drop the current version (the history's end) and anything no longer on disk.
        if current.is_some() && history.last() == current.as_ref() {
            history.pop();
        }
        while let Some(prev) = history.last() {
            if self.version_dir(task, prev)?.join(MANIFEST_FILE).is_file() && Some(prev) != current.as_ref() {
                return Ok((prev.clone(), history));
            }
            history.pop();
        }
        Err(RegistryError::NoPrevious { task: task.into() })
    }

    /// Points `CURRENT` back at the version promoted before the current one; returns it.
    pub fn rollback(&self, task: &str) -> Result<String, RegistryError> {
        let (prev, history) = self.previous(task)?;
        self.write_pointers(task, &prev, &history)?;
        Ok(prev)
    }

    /// Appends one record to the task's audit log (`<root>/<task>/AUDIT.jsonl`).
    pub fn append_audit(&self, task: &str, record: &AuditRecord) -> Result<(), RegistryError> {
        let dir = self.task_dir(task)?;
        atomic::create_dir_all(&dir).map_err(io_err(&dir))?;
        let p = dir.join(AUDIT_FILE);
        audit::append(&p, record).map_err(io_err(&p))
    }

    /// The task's audit log, oldest first (none yet: empty). A torn line (a record cut short
    /// by a crash of its writer, [`audit::is_torn`]) is skipped; any other line that is not a
    /// record is an error.
    pub fn audit(&self, task: &str) -> Result<Vec<AuditRecord>, RegistryError> {
        let p = self.task_dir(task)?.join(AUDIT_FILE);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&p)(e)),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !audit::is_torn(l))
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| {
                    let msg = format!("line {}: not an audit record: {e}", i + 1);
                    io_err(&p)(io::Error::new(io::ErrorKind::InvalidData, msg))
                })
            })
            .collect()
    }

    fn write_pointers(&self, task: &str, version: &str, history: &[String]) -> Result<(), RegistryError> {
        let dir = self.task_dir(task)?;
        // HISTORY first: a crash between the two leaves CURRENT on the old, still valid version.
        let h = dir.join(HISTORY_FILE);
        atomic::write_file(&h, format!("{}\n", history.join("\n")).as_bytes()).map_err(io_err(&h))?;
        let c = dir.join(CURRENT_FILE);
        atomic::write_file(&c, format!("{version}\n").as_bytes()).map_err(io_err(&c))
    }
}

/// Sub-directories of `dir` with valid names (temporary `.x.partial-*` ones are skipped).
fn list_dirs(dir: &Path) -> Result<Vec<String>, RegistryError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| valid_name(n))
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(reg: &Registry, task: &str, version: &str) {
        reg.publish::<RegistryError>(task, version, |d| {
            std::fs::write(d.join(MANIFEST_FILE), "{}").map_err(io_err(d))?;
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn versions_promote_and_roll_back() {
        let root = std::env::temp_dir().join(format!("verdict-registry-{}", std::process::id()));
        let reg = Registry::new(&root);
        assert!(reg.tasks().unwrap().is_empty(), "an absent registry is empty");
        add(&reg, "mr", "v1");
        add(&reg, "mr", "v2");
        assert!(matches!(
            reg.publish::<RegistryError>("mr", "v1", |_| Ok(())),
            Err(RegistryError::VersionExists { .. })
        ));
        // A half-written version (a hidden temporary directory) is never listed.
        std::fs::create_dir_all(root.join("mr").join(".v3.partial-1")).unwrap();
        std::fs::create_dir_all(root.join("mr").join("v3")).unwrap();
        assert_eq!(reg.versions("mr").unwrap(), vec!["v1", "v2"], "v3 has no manifest yet");
        assert_eq!(reg.current("mr").unwrap(), None);
        assert_eq!(reg.next_version("mr").unwrap(), "v4", "v3's directory is taken, complete or not");
        assert_eq!(reg.next_version("sst2").unwrap(), "v1");
        assert!(matches!(reg.promote("mr", "v3"), Err(RegistryError::NoSuchVersion { .. })));
        reg.promote("mr", "v1").unwrap();
        reg.promote("mr", "v2").unwrap();
        assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v2"));
        assert_eq!(reg.history("mr").unwrap(), vec!["v1", "v2"]);
        assert_eq!(reg.rollback("mr").unwrap(), "v1");
        assert_eq!(reg.current("mr").unwrap().as_deref(), Some("v1"));
        assert!(matches!(reg.rollback("mr"), Err(RegistryError::NoPrevious { .. })));
        assert_eq!(reg.tasks().unwrap(), vec!["mr"]);
        let leftovers: Vec<_> = std::fs::read_dir(root.join("mr"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && !n.starts_with(".v3"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary files left: {leftovers:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn names_cannot_leave_the_registry() {
        let reg = Registry::new("/srv/adapters");
        for bad in ["..", "../x", "a/b", ".hidden", "", "a\\b", "x\0", &"v".repeat(200)] {
            assert!(reg.version_dir("mr", bad).is_err(), "{bad:?}");
            assert!(reg.task_dir(bad).is_err(), "{bad:?}");
        }
        assert_eq!(reg.version_dir("mr", "2024-05-01_v1.2").unwrap(), Path::new("/srv/adapters/mr/2024-05-01_v1.2"));
    }
}
