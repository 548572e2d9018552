//! Readers that turn task data files into [`RawExample`]s: the official GLUE TSVs, the official
//! SuperGLUE JSONL files, and generic CSV / JSONL / Parquet tables mapped by column name.
//!
//! Readers keep the file's own label text; the task registry maps it to a class or a score.
//! A row that cannot be read is an error naming the file, the line and the problem; with
//! [`ReadOptions::skip_bad_rows`] it is reported in [`ReadReport::skipped`] instead, so nothing is
//! dropped without a trace. Blank lines hold no row and are passed over.

mod glue;
mod superglue;
mod table;

pub use glue::{read_glue_tsv, GLUE_TASKS};
pub use superglue::{read_superglue_jsonl, SUPERGLUE_TASKS};
pub use table::{read_table, read_table_as, ColumnMap, TableFormat};

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// One row as the file gives it, before the task registry maps labels to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExample {
    /// The file's id / idx, else `line-N`.
    pub id: String,
    /// Named input fields (names fixed per task, see each reader).
    pub fields: BTreeMap<String, String>,
    /// Raw label text as in the file (`entailment`, `1`, `3.8`, `true`); `None` for unlabeled test files.
    pub label: Option<String>,
    /// MultiRC: `<passage idx>-<question idx>`; ReCoRD: the query idx; else `None`.
    pub group: Option<String>,
    /// ReCoRD: the query's gold answer texts (empty otherwise).
    pub answers: Vec<String>,
    /// 1-based line (row) in the file, for messages.
    pub line: usize,
}

impl RawExample {
    /// The named field, or `""` when the example has no such field.
    pub fn field(&self, name: &str) -> &str {
        self.fields.get(name).map(String::as_str).unwrap_or("")
    }
}

/// A file or a row that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {problem}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct DataError {
    pub file: PathBuf,
    /// 1-based line (row); `None` when the problem is the whole file.
    pub line: Option<usize>,
    pub problem: String,
}

impl DataError {
    /// An error about `file` (at `line`, when it concerns one row).
    pub fn new(file: &Path, line: Option<usize>, problem: impl Into<String>) -> Self {
        Self { file: file.to_path_buf(), line, problem: problem.into() }
    }
}

/// How strict a reader is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Report malformed rows in [`ReadReport::skipped`] and go on, instead of failing on the first.
    pub skip_bad_rows: bool,
}

/// What a reader produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadReport {
    pub examples: Vec<RawExample>,
    /// Rows passed over; only ever non-empty with `skip_bad_rows` (otherwise the first is the `Err`).
    pub skipped: Vec<DataError>,
}

impl ReadReport {
    /// True when some example carries a label.
    pub fn is_labeled(&self) -> bool {
        self.examples.iter().any(|e| e.label.is_some())
    }
}

/// Gathers examples for one file and applies the bad-row policy.
struct Collector {
    file: PathBuf,
    opts: ReadOptions,
    report: ReadReport,
}

impl Collector {
    fn new(file: &Path, opts: ReadOptions) -> Self {
        Self { file: file.to_path_buf(), opts, report: ReadReport::default() }
    }

    /// An error about the whole file (never skipped).
    fn file_error(&self, problem: impl Into<String>) -> DataError {
        DataError::new(&self.file, None, problem)
    }

    /// An error at `line` that stops reading whatever the options say.
    fn fatal(&self, line: usize, problem: impl Into<String>) -> DataError {
        DataError::new(&self.file, Some(line), problem)
    }

    /// Takes a row's outcome: its examples, or its problem (an `Err` unless bad rows are skipped).
    fn row(&mut self, line: usize, outcome: Result<Vec<RawExample>, String>) -> Result<(), DataError> {
        match outcome {
            Ok(examples) => {
                self.report.examples.extend(examples);
                Ok(())
            }
            Err(problem) => {
                let err = DataError::new(&self.file, Some(line), problem);
                if self.opts.skip_bad_rows {
                    self.report.skipped.push(err);
                    Ok(())
                } else {
                    Err(err)
                }
            }
        }
    }

    fn finish(self) -> ReadReport {
        self.report
    }
}

/// Calls `each(line_number, line)` for every non-blank line of a text file, with the line's end
/// (`\n` or `\r\n`) and a leading UTF-8 byte-order mark removed. A line that is not UTF-8 arrives
/// as `Err(problem)`.
fn for_each_line(
    path: &Path,
    mut each: impl FnMut(usize, Result<&str, String>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = File::open(path).map_err(|e| DataError::new(path, None, format!("cannot open: {e}")))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut buf = Vec::new();
    let mut number = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::new(path, Some(number + 1), format!("read failed: {e}")))?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        let mut bytes = buf.as_slice();
        if number == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        if bytes.is_empty() {
            continue;
        }
        let line = std::str::from_utf8(bytes).map_err(|e| format!("not valid UTF-8 ({e})"));
        each(number, line)?;
    }
}

/// Turns byte offsets into 1-based line numbers (lines end at `\n`), for readers such as the CSV
/// one whose own line count misses line breaks inside quoted fields. Offsets must not decrease.
pub(crate) struct LineCounter<'a> {
    bytes: &'a [u8],
    offset: usize,
    line: usize,
}

impl<'a> LineCounter<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, offset: 0, line: 1 }
    }

    /// The line of the record that starts at byte `offset`. Line-end bytes there are passed
    /// over first: the csv crate may place a record after `\r\n` at the `\n`.
    pub(crate) fn line_at(&mut self, offset: u64) -> usize {
        let mut offset = (offset as usize).clamp(self.offset, self.bytes.len());
        while offset < self.bytes.len() && matches!(self.bytes[offset], b'\r' | b'\n') {
            offset += 1;
        }
        self.line += self.bytes[self.offset..offset].iter().filter(|b| **b == b'\n').count();
        self.offset = offset;
        self.line
    }
}

/// `line-N`, the id of a row whose file gives none.
fn line_id(line: usize) -> String {
    format!("line-{line}")
}

/// Lower case without `-` and `_`, so `SST-2`, `sst_2` and `sst2` name the same task.
fn task_key(task: &str) -> String {
    task.chars().filter(|c| *c != '-' && *c != '_').flat_map(char::to_lowercase).collect()
}

#[cfg(test)]
pub(crate) mod test_files {
    //! Small files written to a per-process temporary directory.

    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// Writes `contents` to a fresh file whose name ends in `name`.
    pub fn write(name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = fresh_path(name);
        std::fs::write(&path, contents).expect("write test file");
        path
    }

    /// A path (not yet created) in the test directory whose name ends in `name`.
    pub fn fresh_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("verdict-data-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create test dir");
        dir.join(format!("{}-{name}", COUNTER.fetch_add(1, Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display_names_file_line_and_problem() {
        let e = DataError::new(Path::new("dir/train.tsv"), Some(7), "expected 4 columns, found 3");
        assert_eq!(e.to_string(), "dir/train.tsv:7: expected 4 columns, found 3");
        let e = DataError::new(Path::new("x.jsonl"), None, "cannot open");
        assert_eq!(e.to_string(), "x.jsonl: cannot open");
    }

    #[test]
    fn lines_drop_bom_crlf_and_blank_lines_but_keep_numbers() {
        let path = test_files::write("lines.txt", b"\xEF\xBB\xBFa\r\n\nb\n\xFF\nc");
        let mut seen = Vec::new();
        for_each_line(&path, |n, l| {
            seen.push((n, l.map(str::to_string)));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0], (1, Ok("a".to_string())));
        assert_eq!(seen[1], (3, Ok("b".to_string())));
        assert!(seen[2].0 == 4 && seen[2].1.as_ref().unwrap_err().contains("UTF-8"));
        assert_eq!(seen[3], (5, Ok("c".to_string())));
    }

    #[test]
    fn task_names_ignore_case_and_separators() {
        assert_eq!(task_key("SST-2"), "sst2");
        assert_eq!(task_key("sts_b"), "stsb");
    }
}
