//! The registry's audit log: one JSON line per promotion, refused promotion and rollback of a
//! task, in `<registry>/<task>/AUDIT.jsonl` (`Registry::append_audit`). Lines are only ever
//! appended, one write each, and flushed to disk before the command reports success. A line
//! cut short by a crash of its writer (a torn line: its command never reported success) is
//! closed by the next append and skipped by readers ([`is_torn`]).

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// What a line of the audit log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditAction {
    /// A candidate became a new version and serves the task.
    Promote,
    /// A candidate did not beat the incumbent by the margin; nothing changed.
    Refuse,
    /// The version promoted before the current one serves again.
    Rollback,
}

/// One decision about a task's serving version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, RFC 3339 in UTC with milliseconds ([`rfc3339_utc`]).
    pub time: String,
    pub action: AuditAction,
    pub task: String,
    /// The version serving before (`None`: no adapter, the base model zero-shot).
    pub from_version: Option<String>,
    /// The version serving after (`None` when refused).
    pub to_version: Option<String>,
    /// The candidate adapter directory (promote and refuse).
    pub candidate: Option<String>,
    /// The split both sides were evaluated on, and how many examples of it.
    pub split: Option<String>,
    pub examples: Option<usize>,
    /// The metrics whose mean is the task's score (the GLUE convention, as `eval` reports it).
    pub metrics: Vec<String>,
    /// The candidate's score on `split`.
    pub candidate_score: Option<f64>,
    /// The incumbent's score (the serving version, or zero-shot) on the same examples; `None`
    /// when it was not evaluated.
    pub incumbent_score: Option<f64>,
    /// The candidate had to score at least `incumbent_score + margin`.
    pub margin: Option<f64>,
    /// Promoted only because `--force` overrode a failed comparison.
    pub forced: bool,
    /// sha256 of the base weights (as in adapter manifests) the versions are for.
    pub base_sha256: String,
    /// The command line that made the decision (secrets redacted).
    pub command: String,
}

/// Appends `record` as one JSON line to `path` (created if absent): one write of the whole
/// line to a file opened for appending, then fsync (and, for a new file, its directory), so
/// concurrent writers never interleave within a line and a reported action is on disk. A file
/// that does not end in a newline (a torn last line) gets one first, in the same write, so the
/// new record is a line of its own.
pub fn append(path: &Path, record: &AuditRecord) -> io::Result<()> {
    let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
    line.push('\n');
    let mut file = std::fs::OpenOptions::new().create(true).read(true).append(true).open(path)?;
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0u8];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            line.insert(0, '\n');
        }
    }
    file.write_all(line.as_bytes())?;
    file.sync_all()?;
    if len == 0 {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::atomic::sync_dir(dir)?;
        }
    }
    Ok(())
}

/// Whether `line` is a torn record: JSON cut short (it ends before the object does), as a
/// writer killed mid-write leaves it. Other malformed lines are not torn.
pub fn is_torn(line: &str) -> bool {
    line.trim_start().starts_with('{') && serde_json::from_str::<serde_json::Value>(line).is_err_and(|e| e.is_eof())
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T09:30:00.250Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60,
        since.subsec_millis()
    )
}

/// (year, month, day) of a day count since 1970-01-01 in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`): eras of 400 years, years starting in March.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_utc() {
        let at = |secs: u64, ms: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_millis(secs * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(951_868_799, 999), "2000-02-29T23:59:59.999Z");
        assert_eq!(at(1_700_000_000, 5), "2023-11-14T22:13:20.005Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
        assert_eq!(at(1_709_164_800, 0), "2024-02-29T00:00:00.000Z");
    }

    #[test]
    fn records_are_single_json_lines_appended() {
        let dir = std::env::temp_dir().join(format!("verdict-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("AUDIT.jsonl");
        let record = AuditRecord {
            time: rfc3339_utc(UNIX_EPOCH),
            action: AuditAction::Refuse,
            task: "mr".into(),
            from_version: Some("v1".into()),
            to_version: None,
            candidate: Some("runs/mr/best".into()),
            split: Some("dev".into()),
            examples: Some(64),
            metrics: vec!["accuracy".into()],
            candidate_score: Some(0.5),
            incumbent_score: Some(0.75),
            margin: Some(0.005),
            forced: false,
            base_sha256: "ab".repeat(32),
            command: "verdict-train promote --task mr\n--admin-token ***".into(),
        };
        append(&path, &record).unwrap();
        let mut rollback = record.clone();
        rollback.action = AuditAction::Rollback;
        append(&path, &rollback).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "a newline inside a field stays escaped: {text}");
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["action"], "refuse");
        assert_eq!(first["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(first["to_version"], serde_json::Value::Null);
        assert_eq!(first["incumbent_score"], 0.75);
        assert_eq!(serde_json::from_str::<AuditRecord>(lines[1]).unwrap(), rollback);
        // A writer killed mid-line leaves a torn last line: the next record still gets a line
        // of its own, and the torn one is recognised as such.
        let torn = &lines[0][..lines[0].len() / 2];
        std::fs::write(&path, format!("{}\n{torn}", lines[0])).unwrap();
        append(&path, &rollback).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(is_torn(lines[1]) && !is_torn(lines[0]) && !is_torn(lines[2]), "{text}");
        assert_eq!(serde_json::from_str::<AuditRecord>(lines[2]).unwrap(), rollback);
        assert!(!is_torn("not json") && !is_torn("{\"a\": 1}") && !is_torn("{\"a\" 1}"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
