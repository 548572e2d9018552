//! Serving defaults chosen by measurement on the loaded model: whether requests are batched, and
//! whether a batch's inputs are packed side by side into shared rows or padded one per row.
//!
//! Which is fastest depends on the CPU, the model and the kernels: on an Intel Xeon a packed
//! batch of eight `mr` sentences once took 2.5x as long as the eight one at a time, on an AMD EPYC
//! it took half as long. At start-up (`--batching auto`, the default) the engine times eight real
//! sentences (`loadgen::SAMPLE_SENTENCES`) through the task's prompt and adapter: one at a time,
//! as one padded batch, and as one packed batch, each twice (the faster taken), and keeps the
//! mode with the most inputs per second. The result is cached per (CPU and kernels, model,
//! threads, scoring), so a warm start measures nothing; `/info` and the log say what was chosen
//! and why. `--batching packed|padded|off` skips the measurement.

use crate::backend::decoder::Engine;
use crate::contract::AdapterVersion;
use crate::contract::{Compute, Row, TaskEntry};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use utoipa::ToSchema;

/// How the scheduler and the engine batch requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Batching {
    /// Measured at start-up (cached per CPU, model and threads).
    Auto,
    /// Requests batched; one task version's inputs packed into shared rows without padding.
    Packed,
    /// Requests batched; one input per padded row.
    Padded,
    /// One request per forward pass.
    Off,
}

impl std::fmt::Display for Batching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Batching::Auto => "auto",
            Batching::Packed => "packed",
            Batching::Padded => "padded",
            Batching::Off => "off",
        })
    }
}

/// What was chosen, how, and the measurements behind it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Choice {
    /// `packed`, `padded` or `off`.
    pub batching: Batching,
    /// `flag` (given on the command line), `measured` (at this start) or `cached` (measured at
    /// an earlier start on this CPU, model and thread count).
    pub source: String,
    /// Milliseconds for the eight sample inputs: `one_at_a_time`, `padded`, `packed` (absent
    /// when not measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_ms: Option<Timings>,
    /// The task and adapter version measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_on: Option<String>,
    /// Most inputs per batch (`--max-batch-rows`, or fewer where the measurement says so).
    #[serde(default)]
    pub max_batch_rows: usize,
}

/// Times of one measurement, milliseconds for all sample inputs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    pub one_at_a_time: f64,
    pub padded: f64,
    pub packed: f64,
    /// Four times the inputs in one batch of the faster batched mode (absent: batching off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_of_32: Option<f64>,
}

impl Timings {
    /// The most inputs a batch should hold: all `configured` when 32 inputs cost no more each
    /// than 8 do, else 8 (larger batches fall out of the caches on some CPUs).
    pub fn batch_rows(&self, configured: usize) -> usize {
        let eight = self.padded.min(self.packed) / 8.0;
        match self.batch_of_32 {
            Some(t) if t / 32.0 > eight => configured.min(8),
            _ => configured,
        }
    }

    /// The fastest mode; batching must beat one at a time to be chosen.
    pub fn best(&self) -> Batching {
        if self.packed <= self.padded && self.packed <= self.one_at_a_time {
            Batching::Packed
        } else if self.padded <= self.one_at_a_time {
            Batching::Padded
        } else {
            Batching::Off
        }
    }
}

impl Choice {
    /// A choice given by flag.
    pub fn flag(batching: Batching) -> Self {
        Self { batching, source: "flag".into(), measured_ms: None, measured_on: None, max_batch_rows: 0 }
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        let mut s = format!("batching {} ({})", self.batching, self.source);
        if self.batching != Batching::Off && self.max_batch_rows > 0 {
            s += &format!(", at most {} inputs per batch", self.max_batch_rows);
        }
        if let Some(t) = &self.measured_ms {
            s += &format!(
                ": 8 inputs one at a time {:.0} ms, padded batch {:.0} ms, packed batch {:.0} ms",
                t.one_at_a_time, t.padded, t.packed
            );
            if let Some(t32) = t.batch_of_32 {
                s += &format!(", 32 inputs in one batch {t32:.0} ms");
            }
        }
        if let Some(on) = &self.measured_on {
            s += &format!(" on {on}");
        }
        s
    }
}

/// The cache file of a measurement made under `key` (CPU and kernels, model, threads, scoring).
pub fn cache_file(cache_dir: &Path, key: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    cache_dir.join("serving").join(format!("batching-{hex}.json"))
}

#[derive(Serialize, Deserialize)]
struct Cached {
    key: String,
    choice: Choice,
}

/// A cached choice for `key`, if one was measured before.
pub fn read_cached(file: &Path, key: &str) -> Option<Choice> {
    let c: Cached = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    (c.key == key).then(|| Choice { source: "cached".into(), ..c.choice })
}

/// Writes `choice` for `key` (temporary name, then renamed).
pub fn write_cached(file: &Path, key: &str, choice: &Choice) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension(format!("json.tmp{}", std::process::id()));
    let body = serde_json::to_vec_pretty(&Cached { key: key.into(), choice: choice.clone() })?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, file)
}

/// Times the three modes on `rows` (built by the caller from real sentences) and returns the
/// milliseconds each took for all rows, the faster of two rounds.
pub fn measure(engine: &mut Engine, rows: &[Row]) -> Result<Timings, models::Error> {
    let all: Vec<&Row> = rows.iter().collect();
    // Warm-up: the prefix cache and the first-touch of every panel.
    engine.score(&all[..1])?;
    let mut best =
        Timings { one_at_a_time: f64::INFINITY, padded: f64::INFINITY, packed: f64::INFINITY, batch_of_32: None };
    let time = |f: &mut dyn FnMut() -> Result<(), models::Error>| -> Result<f64, models::Error> {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let pack = engine.pack_tokens();
    for _ in 0..2 {
        let one = time(&mut || {
            for r in &all {
                engine.score(std::slice::from_ref(r))?;
            }
            Ok(())
        })?;
        engine.set_pack_tokens(0);
        let padded = time(&mut || engine.score(&all).map(|_| ()))?;
        engine.set_pack_tokens(pack.max(1));
        let packed = time(&mut || engine.score(&all).map(|_| ()))?;
        best.one_at_a_time = best.one_at_a_time.min(one);
        best.padded = best.padded.min(padded);
        best.packed = best.packed.min(packed);
    }
    // The faster batched mode again with four times the inputs: does a larger batch still pay?
    let mode = best.best();
    if mode != Batching::Off {
        engine.set_pack_tokens(if mode == Batching::Padded { 0 } else { pack.max(1) });
        let many: Vec<&Row> = (0..4).flat_map(|_| rows.iter()).collect();
        let mut t32 = f64::INFINITY;
        for _ in 0..2 {
            t32 = t32.min(time(&mut || engine.score(&many).map(|_| ()))?);
        }
        best.batch_of_32 = Some(t32 * rows.len() as f64 * 4.0 / many.len() as f64);
    }
    engine.set_pack_tokens(pack);
    Ok(best)
}

/// The rows of the measurement: every sample sentence in each of the task's fields, through
/// the task's current adapter version.
pub fn sample_rows(
    entry: &Arc<TaskEntry>,
    version: Option<Arc<AdapterVersion>>,
    encode_body: impl Fn(&std::collections::BTreeMap<String, String>) -> Result<Vec<u32>, String>,
) -> Result<Vec<Row>, String> {
    serve::loadgen::SAMPLE_SENTENCES
        .iter()
        .map(|s| {
            let fields = entry.task.fields.iter().map(|f| (f.clone(), s.to_string())).collect();
            Ok(Row { task: entry.clone(), version: version.clone(), body: encode_body(&fields)?, type_ids: Vec::new() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastest_mode_wins_and_batching_must_beat_one_at_a_time() {
        let t = |one, padded, packed| Timings { one_at_a_time: one, padded, packed, batch_of_32: None }.best();
        assert_eq!(t(100.0, 90.0, 80.0), Batching::Packed);
        assert_eq!(t(100.0, 70.0, 80.0), Batching::Padded);
        assert_eq!(t(60.0, 70.0, 80.0), Batching::Off);
        assert_eq!(t(80.0, 80.0, 80.0), Batching::Packed, "ties keep batching (it never costs more)");
    }

    #[test]
    fn batches_are_capped_at_eight_where_larger_ones_cost_more_per_input() {
        let t = |t32| Timings { one_at_a_time: 100.0, padded: 90.0, packed: 80.0, batch_of_32: t32 };
        assert_eq!(t(Some(320.0)).batch_rows(64), 64, "32 inputs at 10 ms each beat 8 at 10 ms: no cap");
        assert_eq!(t(Some(321.0)).batch_rows(64), 8, "dearer per input: capped");
        assert_eq!(t(Some(400.0)).batch_rows(4), 4, "never above the flag");
        assert_eq!(t(None).batch_rows(64), 64);
    }

    #[test]
    fn a_cached_choice_is_read_back_only_under_its_own_key() {
        let dir = std::env::temp_dir().join(format!("verdict-tuning-{}", std::process::id()));
        let file = cache_file(&dir, "cpu A / model B / 2 threads");
        let choice = Choice {
            batching: Batching::Padded,
            source: "measured".into(),
            measured_ms: Some(Timings { one_at_a_time: 3.0, padded: 1.0, packed: 2.0, batch_of_32: Some(5.0) }),
            measured_on: Some("mr v1".into()),
            max_batch_rows: 8,
        };
        write_cached(&file, "cpu A / model B / 2 threads", &choice).unwrap();
        let back = read_cached(&file, "cpu A / model B / 2 threads").unwrap();
        assert_eq!((back.batching, back.source.as_str()), (Batching::Padded, "cached"));
        assert!(read_cached(&file, "cpu C / model B / 2 threads").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
