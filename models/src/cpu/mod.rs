//! CPU kernels of the inference and training paths, chosen per microarchitecture at run time.
//!
//! - [`caps`]: what this CPU runs (AVX2, AVX-512, AVX512-BF16, VNNI, AMX with the kernel's
//!   permission).
//! - [`packed`]: frozen weights packed once in f32, bf16 or int8 panels, and the loop nests.
//! - [`f32`], [`lowp`], [`widen`], [`amx`]: the micro-kernels.

pub mod amx;
pub mod attention;
pub mod caps;
pub mod f32;
pub mod layout;
pub mod lowp;
pub mod options;
pub mod packed;
pub mod plan;
pub(crate) mod store;
pub mod train_ops;
pub mod widen;

pub use caps::Caps;
pub use options::{IsaLimit, KernelArgs, PlanSource, PrecisionChoice, Purpose};
pub use packed::{Kernel, PackedWeight, Panels, Precision, Tiling};
pub use plan::{Plan, Shape};

use std::sync::Arc;

/// Why kernel options were refused: an unknown name on the command line, a precision this CPU
/// cannot run, an unreadable plan file.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// `or_auto`: the flag also takes `auto` (`--cpu-matmul`).
    #[error("unknown CPU matmul precision {name:?}: use f32, bf16 or int8{}", if *or_auto { ", or auto" } else { "" })]
    UnknownPrecision { name: String, or_auto: bool },
    #[error("--cpu-matmul {precision} needs {needs} (this CPU has: {has})")]
    Unsupported { precision: Precision, needs: &'static str, has: String },
    #[error(
        "unknown instruction set {0:?}: use all, none, or a list of avx2, avx512, avx512-bf16, avx512-vnni, \
         avx-vnni, amx"
    )]
    UnknownIsa(String),
    #[error("{path}: {source}")]
    PlanRead { path: std::path::PathBuf, source: std::io::Error },
    #[error("{path}: not a kernel plan: {source}")]
    PlanParse { path: std::path::PathBuf, source: serde_json::Error },
}

/// How a loaded model runs its products on the CPU: the precision of its frozen projections,
/// the instruction sets it may use and the plan of tile shapes. Carried by the model (passed in
/// at load), never process-global, so two models in one process may differ.
#[derive(Debug, Clone)]
pub struct CpuKernels {
    /// Precision of frozen base projections on the inference path (training is always f32).
    pub precision: Precision,
    /// What the kernels may use: this CPU's capabilities, possibly limited by the user.
    pub caps: Caps,
    /// Tile shapes per product shape and row count.
    pub plan: Arc<Plan>,
}

impl CpuKernels {
    /// `precision` on this CPU's full capabilities, default tilings; refused with the reason
    /// where the CPU cannot run it.
    pub fn new(precision: Precision) -> Result<Self, KernelError> {
        Self::with_caps(precision, Caps::detect())
    }

    /// `precision` limited to `caps` (which never exceed the detected ones), default tilings.
    pub fn with_caps(precision: Precision, caps: Caps) -> Result<Self, KernelError> {
        let caps = caps.intersect(Caps::detect());
        precision.check(&caps)?;
        Ok(Self { precision, caps, plan: Arc::new(Plan::empty(caps)) })
    }

    /// No kernels of ours at all: every product through candle (CPUs without AVX2, other
    /// devices, and the reference the kernels are compared with).
    pub fn portable() -> Self {
        Self { precision: Precision::F32, caps: Caps::none(), plan: Arc::new(Plan::empty(Caps::none())) }
    }

    /// The kernels this CPU runs best by default: f32 where AVX2 exists, else portable.
    pub fn auto() -> Self {
        Self::new(Precision::F32).unwrap_or_else(|_| Self::portable())
    }

    /// Whether our kernels run at all (else candle's).
    pub fn enabled(&self) -> bool {
        self.caps.avx2
    }

    /// The same kernels with `plan`.
    pub fn with_plan(mut self, plan: Plan) -> Self {
        self.plan = Arc::new(plan);
        self
    }

    /// The tiling of `[rows, inner] × [inner, out]` in `precision`.
    pub fn tiling(&self, precision: Precision, out: usize, inner: usize, rows: usize) -> Option<Tiling> {
        if !self.enabled() {
            return None;
        }
        self.plan.tiling(precision, out, inner, rows, &self.caps)
    }

    /// One line for logs: precision, instruction sets, how many choices were measured.
    pub fn describe(&self) -> String {
        if !self.enabled() {
            return self.identity();
        }
        format!("{}, {} measured shape(s)", self.identity(), self.plan.choices.len())
    }

    /// The precision, the CPU, its instruction sets and the kernels' version: what a measurement
    /// made with these kernels depends on (a cache key).
    pub fn identity(&self) -> String {
        if !self.enabled() {
            return "portable (candle's kernels)".into();
        }
        format!(
            "{} products on {} [{}], kernels v{}",
            self.precision,
            self.plan.cpu,
            self.caps.describe(),
            plan::PLAN_VERSION
        )
    }
}

#[cfg(test)]
pub(crate) mod tests;
