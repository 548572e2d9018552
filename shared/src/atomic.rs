//! Writing files and directories so that readers see the old content or the new, never half
//! of it, and so that what a call wrote survives a crash once it returns: the content is
//! written under a hidden temporary sibling name, flushed to disk (every file, then every
//! directory), renamed into place, and the parent directory flushed so the rename is on disk
//! too. A process killed part-way leaves at most a hidden `.<name>.partial-*` sibling.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Flushes a file's content and metadata to disk.
pub fn sync_file(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Flushes a directory's entries (names created, renamed or removed in it) to disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    // Elsewhere a directory cannot be opened for syncing; its entries are the filesystem's.
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Flushes every file and directory under `dir` (and `dir` itself), deepest first.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            sync_file(&entry.path())?;
        }
    }
    sync_dir(dir)
}

/// `path`'s parent directory (`.` for a bare name) and file name.
fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a file name", path.display())))?
        .to_string_lossy()
        .into_owned();
    Ok((parent.to_path_buf(), name))
}

/// A hidden sibling name unique to this call (process id and a counter), so concurrent
/// writers never share one.
fn temp_sibling(parent: &Path, name: &str, kind: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    parent.join(format!(".{name}.{kind}-{}-{n}", std::process::id()))
}

/// Creates the directory `parent` and its missing ancestors, each new name flushed in its
/// own parent.
pub fn create_dir_all(parent: &Path) -> io::Result<()> {
    // The missing ones, deepest first.
    let missing: Vec<&Path> = parent.ancestors().take_while(|p| !p.as_os_str().is_empty() && !p.is_dir()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(parent)?;
    for p in missing.iter().rev() {
        sync_dir(p.parent().filter(|u| !u.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// Fills a fresh hidden temporary sibling of `dir` with `write` and flushes it; returns its
/// path. On failure nothing is left behind.
fn fill_temp<E: From<io::Error>>(dir: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<PathBuf, E> {
    let (parent, name) = split(dir)?;
    create_dir_all(&parent)?;
    let tmp = temp_sibling(&parent, &name, "partial");
    std::fs::create_dir(&tmp)?;
    let filled = write(&tmp).and_then(|()| sync_tree(&tmp).map_err(E::from));
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Creates the directory `dir`, complete or not at all: filled with `write` under a temporary
/// name, flushed, then renamed to `dir`. An existing `dir` is never replaced: then nothing is
/// written and the answer is `false`. Registry versions are published this way.
pub fn create_dir<E: From<io::Error>>(dir: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<bool, E> {
    if dir.exists() {
        return Ok(false);
    }
    let tmp = fill_temp(dir, write)?;
    // rename(2) onto an existing non-empty directory fails (ENOTEMPTY or EEXIST): a
    // concurrent creator of the same name wins and this copy is dropped.
    if let Err(e) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        let taken = matches!(e.kind(), io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty);
        return if taken { Ok(false) } else { Err(e.into()) };
    }
    sync_dir(&split(dir)?.0)?;
    Ok(true)
}

/// Fills a fresh temporary directory with `write`, flushes it, then puts it at `dir`,
/// replacing an existing `dir`. On Linux the two are exchanged in one step
/// (`renameat2(RENAME_EXCHANGE)`), so `dir` is never absent; elsewhere (or on a filesystem
/// without it) the old one is renamed away first. On failure the temporary directory is
/// removed and `dir` is untouched.
pub fn write_dir<E: From<io::Error>>(dir: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let (parent, name) = split(dir)?;
    let tmp = fill_temp(dir, write)?;
    let placed = if dir.exists() {
        match exchange(&tmp, dir) {
            // `tmp` now holds the old content.
            Ok(()) => std::fs::remove_dir_all(&tmp),
            Err(_) => {
                let old = temp_sibling(&parent, &name, "old");
                std::fs::rename(dir, &old)
                    .and_then(|()| std::fs::rename(&tmp, dir))
                    .and_then(|()| std::fs::remove_dir_all(&old))
            }
        }
    } else {
        std::fs::rename(&tmp, dir)
    };
    if let Err(e) = placed {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.into());
    }
    sync_dir(&parent)?;
    Ok(())
}

/// Swaps two paths in one step (Linux `renameat2` with `RENAME_EXCHANGE`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are NUL-terminated C strings that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no atomic exchange here"))
}

/// Writes `bytes` to `path` through a temporary sibling that is flushed, renamed over `path`,
/// and the rename flushed: readers see the old content or the new one, never a partial file,
/// and the new one survives a crash once this returns.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (parent, name) = split(path)?;
    let tmp = temp_sibling(&parent, &name, "partial");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(&parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_whole_directories_and_leaves_nothing_on_failure() {
        let root = std::env::temp_dir().join(format!("verdict-atomic-{}", std::process::id()));
        let dir = root.join("d");
        write_dir::<io::Error>(&dir, |t| std::fs::write(t.join("a"), "1")).unwrap();
        write_dir::<io::Error>(&dir, |t| std::fs::write(t.join("b"), "2")).unwrap();
        assert!(!dir.join("a").exists() && dir.join("b").is_file());
        let err = write_dir::<io::Error>(&dir, |t| {
            std::fs::write(t.join("c"), "3")?;
            Err(io::Error::other("boom"))
        });
        assert!(err.is_err());
        assert!(dir.join("b").is_file() && !dir.join("c").exists());
        assert_eq!(entries(&root), vec!["d"], "no temporary directory left behind");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn create_dir_never_replaces_and_write_file_leaves_no_temporary() {
        let root = std::env::temp_dir().join(format!("verdict-atomic-create-{}", std::process::id()));
        let dir = root.join("deep").join("v1");
        let created = create_dir::<io::Error>(&dir, |t| {
            std::fs::create_dir(t.join("sub"))?;
            std::fs::write(t.join("sub").join("x"), "1")
        });
        assert!(created.unwrap());
        assert!(!create_dir::<io::Error>(&dir, |t| std::fs::write(t.join("y"), "2")).unwrap());
        assert_eq!(entries(&dir), vec!["sub"], "the published directory is unchanged");
        assert_eq!(entries(&root.join("deep")), vec!["v1"], "the refused copy is removed");
        let p = root.join("CURRENT");
        write_file(&p, b"v1\n").unwrap();
        write_file(&p, b"v2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "v2\n");
        assert_eq!(entries(&root), vec!["CURRENT", "deep"]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
