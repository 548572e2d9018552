//! The packed-weight cache file: every frozen weight of a model laid out for the CPU kernels in
//! one precision, written once beside the model and memory-mapped read-only.
//!
//! Packing dequantizes the GGUF blocks and reorders (and for bf16 / int8 rounds) every matrix:
//! seconds of work and a private heap copy per process. Written once to
//! `<model>.verdict/<precision>.pack` (or under the cache directory when the model's directory
//! is not writable), the panels are then shared by every process serving that model through
//! the page cache, and a warm start only maps the file. A file that does not match its source
//! (size, modification time, format or kernel layout version) is ignored and rewritten.
//!
//! Layout: `VERDICTPACK` magic and a format version, the length of a JSON header, the header
//! (source, precision, one entry per tensor with its offsets), then the tensors' bytes, each
//! aligned to 64 bytes.

use crate::cpu::packed::{PackedWeight, Panels, Precision};
use crate::cpu::store::Store;
use crate::Error;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 12] = b"VERDICTPACK\0";
/// Bump when the file format or any kernel's panel layout changes (2: int8 weights carry their
/// residual, stored as the entry `<name>+residual`).
pub const PACK_VERSION: u32 = 2;
/// The name suffix of an int8 weight's residual entry.
const RESIDUAL: &str = "+residual";
const ALIGN: usize = 64;

/// What a pack file was made from: a stale file is one whose source changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The model file or directory, canonical.
    pub path: PathBuf,
    /// Total size and latest modification time (ns since the epoch) of its weight files.
    pub size: u64,
    pub mtime_ns: u128,
    /// The sha256 of the model file when the writer knew it (reused by a warm start).
    #[serde(default)]
    pub sha256: Option<String>,
}

impl Source {
    /// The source description of a model file or Hugging Face directory as it is now.
    pub fn of(path: &Path) -> Result<Self, Error> {
        let canonical = path.canonicalize().map_err(|e| Error::io(path, e))?;
        let files: Vec<PathBuf> = if canonical.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&canonical)
                .map_err(|e| Error::io(&canonical, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors" || x == "json"))
                .collect();
            v.sort();
            v
        } else {
            vec![canonical.clone()]
        };
        let (mut size, mut mtime_ns) = (0u64, 0u128);
        for f in &files {
            let md = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
            size += md.len();
            let t = md.modified().map_err(|e| Error::io(f, e))?;
            let ns = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            mtime_ns = mtime_ns.max(ns);
        }
        Ok(Self { path: canonical, size, mtime_ns, sha256: None })
    }

    fn same_file(&self, other: &Source) -> bool {
        self.path == other.path && self.size == other.size && self.mtime_ns == other.mtime_ns
    }
}

/// How one tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Kernel panels (`data`, and for int8 `scale` and `colsum`).
    Packed,
    /// Plain f32 values, row-major (`data`): embeddings, norms, biases.
    Rows,
}

/// One tensor of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    /// `[out, inner]` (a vector is `[n, 1]`).
    pub out: usize,
    pub inner: usize,
    /// `(byte offset, element count)` of each part.
    pub data: (usize, usize),
    #[serde(default)]
    pub scale: (usize, usize),
    #[serde(default)]
    pub colsum: (usize, usize),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    version: u32,
    precision: Precision,
    /// Int8: whether every weight has its residual entry (`false`: the `--weights quantized`
    /// panels; files written before this field always had them).
    #[serde(default = "residual_default")]
    residual: bool,
    source: Source,
    entries: Vec<Entry>,
}

/// A tensor to write: packed panels or plain f32 rows.
#[derive(Clone, Copy)]
pub enum Item<'a> {
    Packed(&'a PackedWeight),
    Rows { values: &'a [f32], out: usize, inner: usize },
}

/// An open pack file.
pub struct PackFile {
    map: Arc<Mmap>,
    header: Header,
    path: PathBuf,
}

impl std::fmt::Debug for PackFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackFile({}, {} tensors)", self.path.display(), self.header.entries.len())
    }
}

fn residual_default() -> bool {
    true
}

/// Where the pack of `model` in `panels` lives: beside the model when that directory is
/// writable, else under `cache_dir/packs/`. `int8.pack` holds residuals, `int8-alone.pack` not.
pub fn path_for(model: &Path, panels: Panels, cache_dir: &Path) -> PathBuf {
    let canonical = model.canonicalize().unwrap_or_else(|_| model.to_path_buf());
    let file = match (panels.precision, panels.residual) {
        (Precision::Int8, false) => "int8-alone.pack".to_string(),
        (p, _) => format!("{p}.pack"),
    };
    let beside = {
        let mut name = canonical.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".verdict");
        canonical.with_file_name(name)
    };
    let parent_writable = beside
        .parent()
        .map(|p| std::fs::metadata(p).map(|m| !m.permissions().readonly()).unwrap_or(false))
        .unwrap_or(false);
    if parent_writable && (beside.is_dir() || std::fs::create_dir_all(&beside).is_ok()) {
        return beside.join(file);
    }
    let key: String =
        canonical.display().to_string().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    cache_dir.join("packs").join(key).join(file)
}

impl PackFile {
    /// Opens `path` if it is a pack of `panels` made from `source` as it is now; `Ok(None)`
    /// when it is missing or stale (the caller rewrites it), `Err` when it exists but cannot be
    /// read.
    pub fn open(path: &Path, panels: Panels, source: &Source) -> Result<Option<Self>, Error> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        // SAFETY: pack files are only ever replaced by rename, never written in place, so the
        // mapped inode does not change under us.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let Some(header) = read_header(&map) else { return Ok(None) };
        if header.version != PACK_VERSION || header.panels() != panels || !header.source.same_file(source) {
            return Ok(None);
        }
        let end = header.entries.iter().map(|e| e.data.0 + e.data.1 * 4).max().unwrap_or(0);
        if end > map.len() {
            return Ok(None);
        }
        Ok(Some(Self { map: Arc::new(map), header, path: path.to_path_buf() }))
    }

    /// Writes a pack of `items` (name, tensor) for `source` in `panels` to `path`: to a
    /// temporary name, synced, then renamed, so a reader sees the old file or the whole new one.
    /// Every packed item must be of `panels`.
    pub fn write(path: &Path, panels: Panels, source: &Source, items: &[(String, Item)]) -> Result<(), Error> {
        // An int8 weight's residual is an entry of its own, right after the weight.
        let mut expanded: Vec<(String, Item)> = Vec::with_capacity(items.len());
        for (name, item) in items {
            if let Item::Packed(p) = item {
                if Panels::of_weight(p) != panels {
                    return Err(Error::Invalid(format!(
                        "{name}: {} panels in a pack of {panels}",
                        Panels::of_weight(p)
                    )));
                }
            }
            expanded.push((name.clone(), *item));
            if let Item::Packed(p) = item {
                if let Some(r) = p.residual() {
                    expanded.push((format!("{name}{RESIDUAL}"), Item::Packed(r)));
                }
            }
        }
        let items = &expanded[..];
        let dir = path.parent().ok_or_else(|| Error::Invalid(format!("{}: no directory", path.display())))?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // Offsets relative to the start of the data section, fixed up once the header's size is known.
        let mut entries = Vec::with_capacity(items.len());
        let mut cursor = 0usize;
        let mut place = |len: usize| -> (usize, usize) {
            let at = cursor.div_ceil(ALIGN) * ALIGN;
            cursor = at + len * 4;
            (at, len)
        };
        for (name, item) in items {
            entries.push(match item {
                Item::Packed(p) => {
                    let (data, scale, colsum) = p.parts();
                    let (out, inner) = p.dims();
                    Entry {
                        name: name.clone(),
                        kind: Kind::Packed,
                        out,
                        inner,
                        data: place(data.len()),
                        scale: place(scale.len()),
                        colsum: place(colsum.len()),
                    }
                }
                Item::Rows { values, out, inner } => Entry {
                    name: name.clone(),
                    kind: Kind::Rows,
                    out: *out,
                    inner: *inner,
                    data: place(values.len()),
                    scale: (0, 0),
                    colsum: (0, 0),
                },
            });
        }
        // The header's length depends on the offsets' digits: fix the data start generously.
        let mut header = Header {
            version: PACK_VERSION,
            precision: panels.precision,
            residual: panels.residual,
            source: source.clone(),
            entries,
        };
        let draft = serde_json::to_vec(&header).map_err(|e| Error::Format(e.to_string()))?;
        let data_start = (MAGIC.len() + 4 + 8 + draft.len() + 4096).div_ceil(ALIGN) * ALIGN;
        for e in &mut header.entries {
            e.data.0 += data_start;
            e.scale.0 += data_start;
            e.colsum.0 += data_start;
        }
        let json = serde_json::to_vec(&header).map_err(|e| Error::Format(e.to_string()))?;
        assert!(MAGIC.len() + 12 + json.len() <= data_start, "pack header outgrew its reserve");
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let result = (|| -> std::io::Result<()> {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            f.write_all(MAGIC)?;
            f.write_all(&PACK_VERSION.to_le_bytes())?;
            f.write_all(&(json.len() as u64).to_le_bytes())?;
            f.write_all(&json)?;
            let mut written = MAGIC.len() + 12 + json.len();
            let pad_to =
                |f: &mut std::io::BufWriter<std::fs::File>, at: usize, written: &mut usize| -> std::io::Result<()> {
                    f.write_all(&vec![0u8; at - *written])?;
                    *written = at;
                    Ok(())
                };
            for ((_, item), e) in items.iter().zip(&header.entries) {
                let parts: Vec<(&[u8], usize)> = match item {
                    Item::Packed(p) => {
                        let (d, s, c) = p.parts();
                        vec![(bytes_of(d), e.data.0), (bytes_of(s), e.scale.0), (bytes_of(c), e.colsum.0)]
                    }
                    Item::Rows { values, .. } => vec![(bytes_of(values), e.data.0)],
                };
                for (b, at) in parts {
                    if b.is_empty() {
                        continue;
                    }
                    pad_to(&mut f, at, &mut written)?;
                    f.write_all(b)?;
                    written += b.len();
                }
            }
            let f = f.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The source the file was made from (its sha256 when the writer knew it).
    pub fn source(&self) -> &Source {
        &self.header.source
    }

    /// Names of the tensors (an int8 weight's residual is part of its weight, not a tensor).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.header.entries.iter().map(|e| e.name.as_str()).filter(|n| !n.ends_with(RESIDUAL))
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.header.entries.iter().find(|e| e.name == name)
    }

    /// The packed weight `name`, borrowed from the map.
    pub fn packed(&self, name: &str) -> Result<PackedWeight, Error> {
        let residual = match self.header.panels().residual {
            true => Some(self.packed_part(&format!("{name}{RESIDUAL}"), None)?),
            false => None,
        };
        self.packed_part(name, residual)
    }

    fn packed_part(&self, name: &str, residual: Option<PackedWeight>) -> Result<PackedWeight, Error> {
        let e = self.entry(name).filter(|e| e.kind == Kind::Packed).ok_or_else(|| Error::MissingTensor(name.into()))?;
        let bad = || Error::Format(format!("{}: tensor {name} does not fit the file", self.path.display()));
        let data = Store::mapped(self.map.clone(), e.data.0, e.data.1).ok_or_else(bad)?;
        let scale = Store::mapped(self.map.clone(), e.scale.0, e.scale.1).ok_or_else(bad)?;
        let colsum = Store::mapped(self.map.clone(), e.colsum.0, e.colsum.1).ok_or_else(bad)?;
        PackedWeight::from_parts(e.out, e.inner, self.header.precision, data, scale, colsum, residual).ok_or_else(bad)
    }

    /// The f32 rows `name` (`[out, inner]`), borrowed from the map.
    pub(crate) fn rows(&self, name: &str) -> Result<(Store<f32>, usize, usize), Error> {
        let e = self.entry(name).filter(|e| e.kind == Kind::Rows).ok_or_else(|| Error::MissingTensor(name.into()))?;
        let store = Store::mapped(self.map.clone(), e.data.0, e.data.1)
            .filter(|s| s.len() == e.out * e.inner)
            .ok_or_else(|| Error::Format(format!("{}: tensor {name} does not fit the file", self.path.display())))?;
        Ok((store, e.out, e.inner))
    }

    /// Whether `name` is stored packed.
    pub fn is_packed(&self, name: &str) -> bool {
        self.entry(name).is_some_and(|e| e.kind == Kind::Packed)
    }
}

fn bytes_of<T: crate::cpu::store::Plain>(v: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding; the bytes are read only.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl Header {
    /// The panels the file holds (a residual only ever for int8).
    fn panels(&self) -> Panels {
        Panels { precision: self.precision, residual: self.precision == Precision::Int8 && self.residual }
    }
}

fn read_header(map: &[u8]) -> Option<Header> {
    if map.len() < MAGIC.len() + 12 || &map[..MAGIC.len()] != MAGIC {
        return None;
    }
    let at = MAGIC.len();
    let version = u32::from_le_bytes(map[at..at + 4].try_into().ok()?);
    if version != PACK_VERSION {
        return None;
    }
    let len = u64::from_le_bytes(map[at + 4..at + 12].try_into().ok()?) as usize;
    let json = map.get(at + 12..at + 12 + len)?;
    serde_json::from_slice(json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_int8_weight_reads_back_with_its_residual_and_a_quantized_one_without() {
        let dir = std::env::temp_dir().join(format!("verdict-pack-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("model.gguf");
        std::fs::write(&model, b"weights").unwrap();
        let source = Source::of(&model).unwrap();
        let (out, inner) = (21, 70);
        let w: Vec<f32> = (0..out * inner).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let with = Panels::of(Precision::Int8);
        let packed = PackedWeight::pack_as(&w, out, inner, Precision::Int8);
        let path = path_for(&model, with, &dir);
        assert_eq!(path.file_name().unwrap(), "int8.pack");
        PackFile::write(&path, with, &source, &[("w".into(), Item::Packed(&packed))]).unwrap();
        let pack = PackFile::open(&path, with, &source).unwrap().expect("a fresh pack opens");
        assert_eq!(pack.names().collect::<Vec<_>>(), ["w"], "the residual is part of its weight");
        let back = pack.packed("w").unwrap();
        assert!(back.is_mapped() && back.residual().is_some_and(|r| r.is_mapped()));
        assert_eq!(back.unpack(), packed.unpack(), "the residual's values come back");
        assert_eq!(back.bytes(), packed.bytes());
        // The same file is not the quantized mode's pack (it would be rewritten, not misread).
        assert!(PackFile::open(&path, Panels::INT8_ALONE, &source).unwrap().is_none());

        // A weight without its residual is refused in a pack that promises residuals.
        let alone = packed.clone().without_residual();
        let err = PackFile::write(&path, with, &source, &[("w".into(), Item::Packed(&alone))]).unwrap_err();
        assert!(err.to_string().contains("one matrix per weight"), "{err}");
        assert!(PackFile::open(&path, with, &source).unwrap().is_some(), "the old file is still whole");

        // The quantized mode's pack: one matrix per weight, half the bytes, its own file name.
        let single = PackedWeight::pack_kind(&w, out, inner, Panels::INT8_ALONE);
        assert_eq!(single.unpack(), alone.unpack(), "the same first matrix");
        let path = path_for(&model, Panels::INT8_ALONE, &dir);
        assert_eq!(path.file_name().unwrap(), "int8-alone.pack");
        PackFile::write(&path, Panels::INT8_ALONE, &source, &[("w".into(), Item::Packed(&single))]).unwrap();
        let pack = PackFile::open(&path, Panels::INT8_ALONE, &source).unwrap().expect("opens");
        let back = pack.packed("w").unwrap();
        assert!(back.residual().is_none());
        assert_eq!(back.unpack(), single.unpack());
        assert_eq!(2 * back.bytes(), packed.bytes());
        assert!(PackFile::open(&path, with, &source).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
