//! The command-line face of the kernels, shared by `verdict-train` and `verdict-serve`: the
//! precision of the products, a limit on the instruction sets, and where the plan of tile shapes
//! comes from. [`KernelArgs::resolve`] turns them into the [`CpuKernels`] a loaded model carries.

use super::caps::Caps;
use super::packed::Precision;
use super::plan::{bucket, Plan, Shape};
use super::{CpuKernels, KernelError};
use std::path::Path;

/// `--cpu-matmul`: a precision, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrecisionChoice {
    /// The serving server: the fastest precision measured on the loaded model; every other
    /// command: f32 (the accuracy reference; training is always f32).
    #[default]
    Auto,
    Fixed(Precision),
}

impl std::str::FromStr for PrecisionChoice {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, KernelError> {
        if s.eq_ignore_ascii_case("auto") {
            Ok(Self::Auto)
        } else {
            s.parse().map(Self::Fixed).map_err(|e| match e {
                KernelError::UnknownPrecision { name, .. } => KernelError::UnknownPrecision { name, or_auto: true },
                e => e,
            })
        }
    }
}

impl std::fmt::Display for PrecisionChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(p) => p.fmt(f),
        }
    }
}

/// `--cpu-isa`: the instruction sets the kernels may use (never more than the CPU has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsaLimit(pub Caps);

impl std::str::FromStr for IsaLimit {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, KernelError> {
        let s = s.to_ascii_lowercase();
        if s == "all" || s == "native" {
            return Ok(Self(Caps::detect()));
        }
        if s == "none" || s == "portable" {
            return Ok(Self(Caps::none()));
        }
        let mut caps = Caps::none();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "avx2" => caps.avx2 = true,
                "avx512" => caps.avx512 = true,
                "avx512-bf16" | "avx512bf16" => caps.avx512_bf16 = true,
                "avx512-vnni" | "avx512vnni" => caps.avx512_vnni = true,
                "avx-vnni" | "avxvnni" => caps.avx_vnni = true,
                "amx" => caps.amx = true,
                other => return Err(KernelError::UnknownIsa(other.to_string())),
            }
        }
        Ok(Self(caps))
    }
}

impl std::fmt::Display for IsaLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.describe())
    }
}

/// `--kernel-plan`: where tile shapes come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PlanSource {
    /// The cached plan of this CPU, measuring what it lacks for this model (and caching it).
    #[default]
    Auto,
    /// Measure again now (and replace the cache).
    Measure,
    /// No measurement: each kernel family's default tile.
    Defaults,
    /// A plan file written by an earlier run (`verdict-train kernels --out`).
    File(std::path::PathBuf),
}

impl std::str::FromStr for PlanSource {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => Self::Auto,
            "measure" => Self::Measure,
            "defaults" | "default" => Self::Defaults,
            path => Self::File(path.into()),
        })
    }
}

impl std::fmt::Display for PlanSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Measure => f.write_str("measure"),
            Self::Defaults => f.write_str("defaults"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The kernel options of a command line.
#[derive(Debug, Clone, clap::Args)]
pub struct KernelArgs {
    /// Precision of the dense products on the CPU: `f32`, `bf16` (weights rounded to bf16, f32
    /// sums; inputs rounded too on the `vdpbf16ps`/AMX kernels, kept in f32 on the widening
    /// ones, whichever the plan measured faster), `int8` (int8 weights per output channel with their rounding error as
    /// a second int8 matrix, inputs as two u8 passes per row, i32 sums) or `auto`
    /// (verdict-serve: the fastest of these measured on the loaded model; every other command:
    /// f32). Training is always f32. docs/runtime.md.
    #[arg(long, env = "VERDICT_CPU_MATMUL", default_value = "auto", global = true)]
    pub cpu_matmul: PrecisionChoice,
    /// Instruction sets the kernels may use: `all` (what the CPU has), `none` (candle's
    /// kernels only) or a list such as `avx2` or `avx2,avx512,avx512-vnni`.
    #[arg(long, env = "VERDICT_CPU_ISA", default_value = "all", global = true)]
    pub cpu_isa: IsaLimit,
    /// Tile shapes of the kernels: `auto` (this CPU's cached plan, measuring what it lacks on
    /// the model's shapes, a few seconds once per CPU), `measure` (measure again), `defaults`
    /// (no measurement) or a plan file.
    #[arg(long, env = "VERDICT_KERNEL_PLAN", default_value = "auto", global = true)]
    pub kernel_plan: PlanSource,
}

impl Default for KernelArgs {
    fn default() -> Self {
        Self { cpu_matmul: PrecisionChoice::Auto, cpu_isa: IsaLimit(Caps::detect()), kernel_plan: PlanSource::Auto }
    }
}

/// What a loaded model will mostly do: decides the row counts a plan measures and what `auto`
/// precision means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Serving classification requests: prompts of a few dozen tokens, batches up to a few
    /// hundred rows.
    Serve,
    /// Evaluation and generation: the same shapes, f32 unless asked.
    Evaluate,
    /// Training: f32 forward and input-gradient products of up to a few thousand rows.
    Train,
}

impl Purpose {
    /// The row buckets measured for this purpose.
    fn buckets(self) -> Vec<usize> {
        let rows: &[usize] = match self {
            Purpose::Serve => &[16, 48, 128, 256, 512],
            Purpose::Evaluate => &[1, 16, 48, 128, 512],
            Purpose::Train => &[1, 16, 48, 128, 512, 2048],
        };
        rows.iter().map(|&r| bucket(r)).collect()
    }
}

/// Rows of the product that stands for "one request" when precisions are compared.
const REQUEST_ROWS: usize = 48;

impl KernelArgs {
    /// The instruction sets the kernels may use: `--cpu-isa` within what this CPU has.
    fn allowed_caps(&self) -> Caps {
        self.cpu_isa.0.intersect(Caps::detect())
    }

    /// These options with `auto` precision fixed to `p` where the allowed instruction sets run
    /// it (`--weights quantized` takes int8: its blocks then run on integer kernels).
    pub fn preferring(&self, p: Precision) -> Self {
        let caps = self.allowed_caps();
        match self.cpu_matmul {
            PrecisionChoice::Auto if caps.avx2 && p.check(&caps).is_ok() => {
                Self { cpu_matmul: PrecisionChoice::Fixed(p), ..self.clone() }
            }
            _ => self.clone(),
        }
    }

    /// The kernels for a model whose products have `shapes` (`(out, inner, count per
    /// forward)`; for training also the transposed ones), used for `purpose`: the plan read from
    /// the cache under `cache_dir`, measured where it lacks a choice, written back. `log` gets
    /// one line per measurement and the outcome.
    pub fn resolve(
        &self,
        shapes: &[(usize, usize, usize)],
        purpose: Purpose,
        cache_dir: &Path,
        log: &mut dyn FnMut(&str),
    ) -> Result<CpuKernels, KernelError> {
        let caps = self.allowed_caps();
        if !caps.avx2 {
            log("kernels: portable (no AVX2/FMA allowed or present): candle's products");
            return Ok(CpuKernels::portable());
        }
        let precisions: Vec<Precision> = match (self.cpu_matmul, purpose) {
            (PrecisionChoice::Fixed(p), _) => {
                p.check(&caps)?;
                vec![p]
            }
            // Every precision that holds the answers: int8 (two input passes, residual weights)
            // moves 1 of 998 `mr` test answers, bf16 3 (docs/results.md, "Residual weights").
            (PrecisionChoice::Auto, Purpose::Serve) => [Precision::F32, Precision::Bf16, Precision::Int8]
                .into_iter()
                .filter(|p| p.check(&caps).is_ok())
                .collect(),
            (PrecisionChoice::Auto, _) => vec![Precision::F32],
        };
        let cache_path = Plan::cache_path(cache_dir, &caps);
        let mut plan = match &self.kernel_plan {
            PlanSource::Auto => Plan::read(&cache_path, &caps).unwrap_or_else(|| Plan::empty(caps)),
            PlanSource::Measure | PlanSource::Defaults => Plan::empty(caps),
            PlanSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| KernelError::PlanRead { path: path.clone(), source })?;
                serde_json::from_str(&text).map_err(|source| KernelError::PlanParse { path: path.clone(), source })?
            }
        };
        let measure_all = matches!(self.kernel_plan, PlanSource::Auto | PlanSource::Measure);
        if measure_all {
            let mut wanted = Vec::new();
            for &p in &precisions {
                for &(out, inner, _) in shapes {
                    for &b in &purpose.buckets() {
                        wanted.push((Shape { precision: p, out, inner }, b));
                    }
                }
            }
            if !plan.covers(&wanted) {
                log(&format!(
                    "kernels: measuring tile shapes on {} [{}] (once per CPU; cached in {})",
                    super::caps::cpu_model(),
                    caps.describe(),
                    cache_path.display()
                ));
                plan.measure(&wanted, &caps, |done, total, line| log(&format!("kernels: [{done}/{total}] {line}")));
                if let Err(e) = plan.write(&cache_path) {
                    log(&format!("kernels: could not cache the plan in {}: {e}", cache_path.display()));
                }
            }
        }
        // Auto precision: the one whose products of a request-sized input take least time.
        let precision = if precisions.len() == 1 {
            precisions[0]
        } else {
            let b = bucket(REQUEST_ROWS);
            let cost = |p: Precision| -> f64 {
                shapes
                    .iter()
                    .map(|&(out, inner, count)| {
                        let gflops = plan.choice(Shape { precision: p, out, inner }, b).map_or(1.0, |c| c.gflops);
                        count as f64 * 2.0 * (REQUEST_ROWS * out * inner) as f64 / gflops / 1e9
                    })
                    .sum()
            };
            let costs: Vec<(Precision, f64)> = precisions.iter().map(|&p| (p, cost(p))).collect();
            let best = costs.iter().copied().fold(None, |b: Option<(Precision, f64)>, c| match b {
                Some(b) if b.1 <= c.1 => Some(b),
                _ => Some(c),
            });
            let line: Vec<String> = costs.iter().map(|(p, s)| format!("{p} {:.1} ms", s * 1e3)).collect();
            log(&format!(
                "kernels: --cpu-matmul auto: products of a {REQUEST_ROWS}-row forward take {}; chose {}",
                line.join(", "),
                best.map_or(Precision::F32, |b| b.0)
            ));
            best.map_or(Precision::F32, |b| b.0)
        };
        let kernels = CpuKernels::with_caps(precision, caps)?.with_plan(plan);
        log(&format!("kernels: {}", kernels.describe()));
        Ok(kernels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert_eq!("auto".parse::<PrecisionChoice>().unwrap(), PrecisionChoice::Auto);
        assert_eq!("INT8".parse::<PrecisionChoice>().unwrap(), PrecisionChoice::Fixed(Precision::Int8));
        assert!("fp8".parse::<PrecisionChoice>().unwrap_err().to_string().contains("or auto"));
        assert!(matches!(
            "FP8".parse::<PrecisionChoice>(),
            Err(KernelError::UnknownPrecision { name, or_auto: true }) if name == "fp8"
        ));
        assert_eq!(
            "fp8".parse::<Precision>().unwrap_err().to_string(),
            "unknown CPU matmul precision \"fp8\": use f32, bf16 or int8"
        );
        let IsaLimit(c) = "avx2,amx".parse().unwrap();
        assert!(c.avx2 && c.amx && !c.avx512);
        assert!("sse9".parse::<IsaLimit>().unwrap_err().to_string().contains("avx512-vnni"));
        assert!(matches!("sse9".parse::<IsaLimit>(), Err(KernelError::UnknownIsa(s)) if s == "sse9"));
        assert_eq!("defaults".parse::<PlanSource>(), Ok(PlanSource::Defaults));
        assert_eq!("plan.json".parse::<PlanSource>(), Ok(PlanSource::File("plan.json".into())));
    }

    #[test]
    fn resolving_measures_once_then_reads_the_cache() {
        if !Caps::detect().avx2 {
            return;
        }
        let dir = std::env::temp_dir().join(format!("verdict-kernels-test-{}", std::process::id()));
        let args = KernelArgs {
            cpu_matmul: PrecisionChoice::Fixed(Precision::F32),
            cpu_isa: "avx2".parse().unwrap(),
            kernel_plan: PlanSource::Auto,
        };
        let shapes = [(48, 64, 2), (16, 48, 1)];
        let mut lines = Vec::new();
        let k = args.resolve(&shapes, Purpose::Serve, &dir, &mut |l| lines.push(l.to_string())).unwrap();
        assert!(lines.iter().any(|l| l.contains("measuring")), "{lines:?}");
        assert_eq!(k.precision, Precision::F32);
        assert!(!k.caps.avx512, "the limit holds");
        assert_eq!(k.plan.choices.len(), 2);
        lines.clear();
        let again = args.resolve(&shapes, Purpose::Serve, &dir, &mut |l| lines.push(l.to_string())).unwrap();
        assert!(!lines.iter().any(|l| l.contains("measuring")), "cached: {lines:?}");
        assert_eq!(again.plan.choices, k.plan.choices);
        // Refused precisions say why.
        let none = KernelArgs { cpu_isa: "avx2".parse().unwrap(), cpu_matmul: "int8".parse().unwrap(), ..args };
        assert!(none.resolve(&shapes, Purpose::Serve, &dir, &mut |_| {}).unwrap_err().to_string().contains("VNNI"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
