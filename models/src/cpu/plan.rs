//! Which kernel and tile shape each product takes on this CPU: chosen by measuring the
//! candidates on the model's real shapes, kept in a cache file per CPU, overridable.
//!
//! The best tiling differs between microarchitectures (an Intel core with two 512-bit FMA
//! ports wants more independent accumulators than an AMD Zen 4 core that splits 512-bit FMAs)
//! and between row counts (one decoded token streams the weights once; a batch of 512 rows is
//! compute-bound), so a [`Plan`] holds one [`Tiling`] per (precision, shape, row bucket).
//! Measurement takes a few seconds per model on a new CPU; the result is written to
//! `<cache>/kernels/<cpu>.json` and reused by every later process on the same CPU.

use super::caps::{cpu_model, Caps};
use super::packed::{Kernel, PackedWeight, Precision, Tiling};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Upper ends of the row buckets a plan distinguishes (the last covers everything above).
pub const ROW_BUCKETS: [usize; 8] = [1, 4, 16, 48, 128, 256, 512, 2048];

/// The row bucket of `rows`: the index of the first bucket bound at or above it.
pub fn bucket(rows: usize) -> usize {
    ROW_BUCKETS.iter().position(|&b| rows <= b).unwrap_or(ROW_BUCKETS.len() - 1)
}

/// One product shape: `[rows, inner] × [inner, out]` in a precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Shape {
    pub precision: Precision,
    pub out: usize,
    pub inner: usize,
}

impl Shape {
    fn key(&self) -> String {
        format!("{} {}x{}", self.precision, self.out, self.inner)
    }
}

/// The chosen tiling of every measured (shape, row bucket), for one CPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The CPU the choices were measured on (`cpu_model`) and its capabilities then.
    pub cpu: String,
    pub caps: Caps,
    /// `"f32 4864x896"` → the choice per row bucket (`None`: not measured).
    pub choices: BTreeMap<String, Vec<Option<Choice>>>,
    /// Seconds the measurements took.
    #[serde(default)]
    pub seconds: f64,
}

/// The tiling chosen for one (shape, row bucket) and the rate it reached when measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub tiling: Tiling,
    pub gflops: f64,
}

/// Format version of plan files: bump when kernels change so old choices are measured again
/// (and measurements keyed by [`super::CpuKernels::identity`], as the server's batching choice).
pub(crate) const PLAN_VERSION: u32 = 3;

impl Plan {
    /// An empty plan for this CPU: every product takes [`Plan::default_tiling`].
    pub fn empty(caps: Caps) -> Self {
        Self { cpu: cpu_model(), caps, choices: BTreeMap::new(), seconds: 0.0 }
    }

    /// The tiling before any measurement: the first kernel family of the precision on `caps`
    /// with its default tile. `None` where no kernel runs the precision here.
    pub fn default_tiling(precision: Precision, caps: &Caps, rows: usize) -> Option<Tiling> {
        let kernels = precision.kernels(caps);
        // Few rows stream the weights once: the vector kernels beat AMX's fixed 16-row tiles.
        let kernel =
            if rows <= 16 { kernels.iter().find(|k| !k.is_amx()).or(kernels.first()) } else { kernels.first() };
        kernel.map(|&k| Tiling::default_for(k))
    }

    /// The tiling of `[rows, inner] × [inner, out]` in `precision`: the measured one for the
    /// row bucket when there is one (and it still runs on `caps`), else the default.
    pub fn tiling(&self, precision: Precision, out: usize, inner: usize, rows: usize, caps: &Caps) -> Option<Tiling> {
        let measured = self.choice(Shape { precision, out, inner }, bucket(rows)).map(|c| c.tiling);
        match measured {
            Some(t) if t.valid(precision, caps) => Some(t),
            _ => Self::default_tiling(precision, caps, rows),
        }
    }

    /// The measured choice of `shape` at row bucket `b`.
    pub fn choice(&self, shape: Shape, b: usize) -> Option<Choice> {
        self.choices.get(&shape.key()).and_then(|v| v.get(b).copied().flatten())
    }

    /// Whether every (shape, bucket) in `wanted` has a choice.
    pub fn covers(&self, wanted: &[(Shape, usize)]) -> bool {
        wanted.iter().all(|&(s, b)| self.choice(s, b).is_some())
    }

    /// Measures the candidates of every (shape, bucket) in `wanted` that this plan lacks, and
    /// records the fastest. `progress(done, total, line)` reports each choice.
    pub fn measure(&mut self, wanted: &[(Shape, usize)], caps: &Caps, mut progress: impl FnMut(usize, usize, &str)) {
        let start = Instant::now();
        let todo: Vec<(Shape, usize)> = wanted.iter().copied().filter(|&(s, b)| self.choice(s, b).is_none()).collect();
        // One packed weight per shape and probe width, reused across buckets.
        let mut packed: BTreeMap<(Shape, usize), PackedWeight> = BTreeMap::new();
        for (i, &(shape, b)) in todo.iter().enumerate() {
            let rows = ROW_BUCKETS[b];
            let cols = probe_columns(shape.out, shape.inner, rows);
            let weight = packed.entry((shape, cols)).or_insert_with(|| {
                let w = probe_values(cols * shape.inner, 7);
                PackedWeight::pack_as(&w, cols, shape.inner, shape.precision)
            });
            let (best, secs) = fastest(weight, rows, caps);
            let Some(best) = best else { continue };
            let slot = self.choices.entry(shape.key()).or_insert_with(|| vec![None; ROW_BUCKETS.len()]);
            slot.resize(ROW_BUCKETS.len(), None);
            let gflops = 2.0 * (rows * cols * shape.inner) as f64 / secs / 1e9;
            slot[b] = Some(Choice { tiling: best, gflops });
            progress(i + 1, todo.len(), &format!("{} rows {rows}: {best} ({gflops:.0} GFLOP/s)", shape.key()));
        }
        self.seconds += start.elapsed().as_secs_f64();
        self.cpu = cpu_model();
        self.caps = *caps;
    }

    /// The plan file of this CPU under `dir` (`<dir>/kernels/<cpu>.json`).
    pub fn cache_path(dir: &Path, caps: &Caps) -> PathBuf {
        let name: String = format!("{} {} v{PLAN_VERSION}", cpu_model(), caps.describe())
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
            .collect();
        dir.join("kernels").join(format!("{name}.json"))
    }

    /// Reads a plan file; `None` if it is missing, unreadable, or for another CPU.
    pub fn read(path: &Path, caps: &Caps) -> Option<Self> {
        let plan: Plan = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        (plan.cpu == cpu_model() && plan.caps == *caps).then_some(plan)
    }

    /// Writes the plan (to a temporary name, then renamed: readers never see half a file).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, path)
    }
}

/// Nominal operations of one timed call above which a product is timed on a slice of its
/// output columns: a tile's rate does not depend on how many column panels follow it, and the
/// full products of a large vocabulary at 512-2048 rows took minutes per shape (Qwen's first
/// start on an AVX2-only AMD EPYC, family 25 model 1: 758 s of measurements before this cap).
const PROBE_FLOPS: f64 = 1e9;
/// The narrowest slice timed (a multiple of the 16-column panels, wide enough that every
/// thread gets many panels).
const MIN_PROBE_COLUMNS: usize = 2048;

/// How many of `out` columns the calibration times at `rows` rows.
fn probe_columns(out: usize, inner: usize, rows: usize) -> usize {
    let fit = (PROBE_FLOPS / (2.0 * (rows * inner).max(1) as f64)) as usize;
    let cols = fit.max(MIN_PROBE_COLUMNS).div_ceil(super::layout::NR) * super::layout::NR;
    cols.min(out)
}

/// Deterministic values in [-1, 1) for measurements (speed does not depend on them).
fn probe_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The candidate tilings for `rows` rows: each kernel family of the precision, each panel
/// count at its tallest tile, then inner and row blocking on the best (f32).
fn candidates(kernel: Kernel, rows: usize) -> Vec<Tiling> {
    if kernel.is_amx() {
        return vec![Tiling::default_for(kernel)];
    }
    let mut v = Vec::new();
    for c in 1..=4u8 {
        let r_max = (1..=14u8).rev().find(|&r| kernel.fits(r as usize, c as usize));
        if let Some(r) = r_max {
            v.push(Tiling { kernel, rows: (r as usize).min(rows.max(1)) as u8, panels: c, kc: 0, mc: 0 });
        }
    }
    v.dedup();
    v
}

/// Refinements of the best vector tiling: inner blocks (kernels that sum in f32) and row blocks
/// (many rows).
fn refinements(best: Tiling, rows: usize, inner: usize) -> Vec<Tiling> {
    let mut v = Vec::new();
    let kcs: &[u16] = if best.kernel.blocks_inner() { &[0, 128, 256] } else { &[0] };
    let mcs: &[u16] = if rows > 64 { &[0, 64, 256] } else { &[0] };
    for &kc in kcs {
        for &mc in mcs {
            if (kc == 0 && mc == 0) || (kc as usize) >= inner || (mc as usize) >= rows {
                continue;
            }
            v.push(Tiling { kc, mc, ..best });
        }
    }
    v
}

/// The fastest tiling of `weight` at `rows` rows on `caps`, and its time in seconds.
fn fastest(weight: &PackedWeight, rows: usize, caps: &Caps) -> (Option<Tiling>, f64) {
    let (out, inner) = weight.dims();
    let x = probe_values(rows * inner, 11);
    let mut y = vec![0f32; rows * out];
    // Enough calls for a stable minimum, fewer for large products.
    let flops = 2.0 * (rows * out * inner) as f64;
    let reps = if flops > 2e9 {
        2
    } else if flops > 2e8 {
        3
    } else {
        5
    };
    let mut time = |t: &Tiling| -> f64 {
        weight.matmul_t_into(&x, rows, &mut y, false, t);
        (0..reps)
            .map(|_| {
                let s = Instant::now();
                weight.matmul_t_into(&x, rows, &mut y, false, t);
                s.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let consider = |best: &mut Option<(Tiling, f64)>, t: Tiling, secs: f64| {
        if best.is_none_or(|(_, b)| secs < b) {
            *best = Some((t, secs));
        }
    };
    let mut best: Option<(Tiling, f64)> = None;
    for kernel in weight.precision().kernels(caps) {
        for t in candidates(kernel, rows) {
            let secs = time(&t);
            consider(&mut best, t, secs);
        }
    }
    if let Some((b, _)) = best {
        if !b.kernel.is_amx() {
            for t in refinements(b, rows, inner) {
                let secs = time(&t);
                consider(&mut best, t, secs);
            }
        }
    }
    match best {
        Some((t, s)) => (Some(t), s),
        None => (None, f64::INFINITY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_products_are_timed_on_a_slice_of_their_columns() {
        // Small products and few rows: every column.
        assert_eq!(probe_columns(4864, 896, 48), 4864);
        assert_eq!(probe_columns(151_936, 896, 1), 151_936);
        // A vocabulary-sized head at many rows: a slice of whole panels, never below the floor.
        let c = probe_columns(151_936, 896, 48);
        assert!(
            c < 151_936
                && c.is_multiple_of(16)
                && 2.0 * (48 * c * 896) as f64 <= PROBE_FLOPS + 2.0 * 48.0 * 16.0 * 896.0
        );
        assert_eq!(probe_columns(151_936, 896, 2048), MIN_PROBE_COLUMNS);
        assert_eq!(probe_columns(100, 896, 2048), 100);
    }

    #[test]
    fn buckets_cover_every_row_count() {
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 1);
        assert_eq!(bucket(35), 3);
        assert_eq!(bucket(48), 3);
        assert_eq!(bucket(49), 4);
        assert_eq!(bucket(100_000), ROW_BUCKETS.len() - 1);
    }

    #[test]
    fn a_measured_plan_answers_with_its_choices_and_round_trips_through_a_file() {
        let caps = Caps::detect();
        if Precision::F32.check(&caps).is_err() {
            return;
        }
        let shape = Shape { precision: Precision::F32, out: 40, inner: 70 };
        let mut plan = Plan::empty(caps);
        assert!(!plan.covers(&[(shape, 0)]));
        let mut lines = Vec::new();
        plan.measure(&[(shape, 0), (shape, 3)], &caps, |_, _, l| lines.push(l.to_string()));
        assert_eq!(lines.len(), 2, "one line per choice: {lines:?}");
        assert!(plan.covers(&[(shape, 0), (shape, 3)]));
        let chosen = plan.choices["f32 40x70"][3].unwrap().tiling;
        assert_eq!(plan.tiling(Precision::F32, 40, 70, 35, &caps), Some(chosen));
        // An unmeasured shape gets the default; a choice this CPU cannot run is not used.
        assert_eq!(plan.tiling(Precision::F32, 41, 70, 35, &caps), Plan::default_tiling(Precision::F32, &caps, 35));
        let no512 = Caps { avx512: false, ..caps };
        let want = if chosen.kernel == Kernel::F32Avx512 {
            Plan::default_tiling(Precision::F32, &no512, 35)
        } else {
            Some(chosen)
        };
        assert_eq!(plan.tiling(Precision::F32, 40, 70, 35, &no512), want);
        let dir = std::env::temp_dir().join(format!("verdict-plan-test-{}", std::process::id()));
        let path = Plan::cache_path(&dir, &caps);
        plan.write(&path).unwrap();
        // (Rates may move by an ulp through JSON: compare the choices.)
        let tilings =
            |p: &Plan| -> Vec<Option<Tiling>> { p.choices.values().flatten().map(|c| c.map(|c| c.tiling)).collect() };
        assert_eq!(Plan::read(&path, &caps).map(|p| tilings(&p)), Some(tilings(&plan)));
        // A plan measured with other capabilities is not reused.
        assert_eq!(Plan::read(&path, &Caps { amx: !caps.amx, ..caps }), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
