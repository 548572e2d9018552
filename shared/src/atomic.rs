//! Writing directories so that readers see the old version or the new one, never half of one:
//! the content is written under a temporary sibling name, then renamed into place.

use std::io;
use std::path::Path;

/// Fills a fresh temporary directory with `write`, then renames it to `dir` (replacing an
/// existing `dir`). On failure the temporary directory is removed and `dir` is untouched.
pub fn write_dir<E: From<io::Error>>(dir: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = dir
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a directory name", dir.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old)?;
        std::fs::rename(&tmp, dir)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, dir)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary sibling and a rename: readers see the old
/// content or the new one, never a partial file.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a file name", path.display())))?
        .to_string_lossy()
        .into_owned();
    // Unique per call, so concurrent writers in one process never share a temporary file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = parent.join(format!(".{name}.partial-{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1, "no temporary directory left behind");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
