//! A GEMM for frozen f32 weights and few input rows, on x86-64 CPUs with AVX2 and FMA.
//!
//! Serving a classifier multiplies a few dozen tokens by every projection. A general GEMM
//! (candle's, through the `gemm` crate) repacks the weight matrix on every call, and at 50 rows
//! that copy costs about as much as the arithmetic: SmolLM2's projections ran at about 88 GFLOP/s
//! where a large square matmul reaches 208 on the same two cores (docs/benchmarks.md). Frozen
//! weights never change, so [`PackedWeight`] lays them out once in the order the micro-kernel
//! reads them: panels of [`NR`] output columns, each `k`-major (`panel[k·NR + j] = W[p·NR + j, k]`,
//! zero beyond the last column). A call then only streams the panels.
//!
//! The micro-kernel keeps an `R × 16` tile of the output in twelve (at most) 256-bit registers
//! (`R ≤ MR = 6` rows), broadcasting one input value per row and `k`. The inner dimension is cut
//! into blocks of [`KC`] so a panel's slice stays in L1 and the rows' slices in L2; output panels
//! are split among rayon's threads (each writes its own columns). Where the CPU has AVX-512
//! ([`avx512_f32`]), the same tiles run in one 512-bit register per row, `R ≤ MR_512 = 12`: the
//! same products summed in the same order, so the same bits.
//!
//! [`Format::Bf16`] (`--cpu-matmul bf16`, CPUs with AVX512-BF16) stores the panels as bf16
//! pairs (`lane j = (W[p·NR + j, 2i], W[p·NR + j, 2i + 1])`), rounds each input row to bf16 once
//! per call and multiplies with `vdpbf16ps`, accumulating in f32: half the weight bytes to stream
//! and twice the multiply rate of f32 FMA, at bf16's input precision (8 bits of mantissa). Every
//! other operation of the model stays f32.

use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// How packed weights are stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// f32 panels, AVX2 FMA: the same products as any f32 GEMM up to summation order.
    #[default]
    F32,
    /// bf16 panels and bf16-rounded inputs, AVX512-BF16 dot products with f32 accumulation.
    Bf16,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("unknown CPU matmul format {other:?}: use f32 or bf16")),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

static FORMAT: AtomicU8 = AtomicU8::new(0);

/// Sets the format weights are packed in from now on (set it once, before the first forward:
/// weights already packed keep theirs). Refuses bf16 on a CPU without AVX512-BF16.
pub fn set_format(format: Format) -> Result<(), String> {
    if format == Format::Bf16 && !bf16_supported() {
        return Err("--cpu-matmul bf16 needs a CPU with AVX512-BF16 (this one has none): use f32".into());
    }
    FORMAT.store(format as u8, Ordering::Relaxed);
    Ok(())
}

/// The format new packings use ([`set_format`]; f32 by default).
pub fn format() -> Format {
    if FORMAT.load(Ordering::Relaxed) == Format::Bf16 as u8 {
        Format::Bf16
    } else {
        Format::F32
    }
}

/// Whether this CPU runs the bf16 kernel (x86-64 with AVX-512F and AVX512-BF16).
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Most rows per AVX-512 micro-kernel call, bf16 and f32 alike (one 16-lane accumulator per
/// row).
pub const MR_512: usize = 12;

/// Output columns per panel (two AVX registers of 8 lanes).
pub const NR: usize = 16;
/// Most rows per micro-kernel call.
pub const MR: usize = 6;
/// Inner-dimension block: a panel's block is `KC · NR · 4` bytes (16 KiB).
pub const KC: usize = 256;

/// A weight matrix `W [out, inner]` packed for `y = x Wᵀ`.
#[derive(Clone)]
pub struct PackedWeight {
    out: usize,
    inner: usize,
    panels: Panels,
}

#[derive(Clone)]
enum Panels {
    F32(Vec<f32>),
    /// Two bf16 values per `u32`: the even `k` in the low half.
    Bf16(Vec<u32>),
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight [{}, {}] {}", self.out, self.inner, self.format())
    }
}

/// `a` and `b` rounded to bf16 (nearest, ties to even), `a` in the low half.
fn bf16_pair(a: f32, b: f32) -> u32 {
    u32::from(half::bf16::from_f32(a).to_bits()) | (u32::from(half::bf16::from_f32(b).to_bits()) << 16)
}

/// Whether this CPU runs the packed kernel (x86-64 with AVX2 and FMA).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedWeight {
    /// Packs `w`, row-major `[out, inner]`, as f32 panels.
    pub fn pack(w: &[f32], out: usize, inner: usize) -> Self {
        Self::pack_as(w, out, inner, Format::F32)
    }

    /// Packs `w`, row-major `[out, inner]`, in `format`.
    pub fn pack_as(w: &[f32], out: usize, inner: usize, format: Format) -> Self {
        assert_eq!(w.len(), out * inner, "weight of {} values is not [{out}, {inner}]", w.len());
        let n_panels = out.div_ceil(NR);
        let panels = match format {
            Format::F32 => {
                let mut panels = vec![0f32; n_panels * inner * NR];
                panels.par_chunks_mut(inner * NR).enumerate().for_each(|(p, panel)| {
                    for j in 0..NR.min(out - p * NR) {
                        let row = &w[(p * NR + j) * inner..(p * NR + j + 1) * inner];
                        for (k, &v) in row.iter().enumerate() {
                            panel[k * NR + j] = v;
                        }
                    }
                });
                Panels::F32(panels)
            }
            Format::Bf16 => {
                let pairs = inner.div_ceil(2);
                let mut panels = vec![0u32; n_panels * pairs * NR];
                panels.par_chunks_mut(pairs * NR).enumerate().for_each(|(p, panel)| {
                    for j in 0..NR.min(out - p * NR) {
                        let row = &w[(p * NR + j) * inner..(p * NR + j + 1) * inner];
                        for (i, pair) in row.chunks(2).enumerate() {
                            panel[i * NR + j] = bf16_pair(pair[0], pair.get(1).copied().unwrap_or(0.0));
                        }
                    }
                });
                Panels::Bf16(panels)
            }
        };
        Self { out, inner, panels }
    }

    /// `(out, inner)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inner)
    }

    /// How the panels are stored.
    pub fn format(&self) -> Format {
        match self.panels {
            Panels::F32(_) => Format::F32,
            Panels::Bf16(_) => Format::Bf16,
        }
    }

    /// `y = x Wᵀ` for `x` row-major `[rows, inner]`; returns `[rows, out]` row-major.
    ///
    /// # Panics
    /// If `x` is not `rows · inner` long or the CPU lacks the format's instructions
    /// ([`supported`], [`bf16_supported`]).
    pub fn matmul_t(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.inner, "input of {} values is not [{rows}, {}]", x.len(), self.inner);
        let mut y = vec![0f32; rows * self.out];
        if rows == 0 || self.out == 0 {
            return y;
        }
        let data = match &self.panels {
            Panels::F32(data) => data,
            Panels::Bf16(panels) => {
                self.matmul_t_bf16(panels, x, rows, &mut y);
                return y;
            }
        };
        assert!(supported(), "the packed kernel needs AVX2 and FMA");
        let tiles: &[Tile<f32>] = if avx512_f32() { &F32_TILES_512 } else { &F32_TILES };
        // SAFETY: AVX2/FMA checked above, AVX-512 by `avx512_f32`.
        unsafe { drive(data, x, rows, self.out, self.inner, KC, tiles, &mut y) };
        y
    }

    /// The bf16 form of [`PackedWeight::matmul_t`]: the same loop nest over pairs of `k`.
    fn matmul_t_bf16(&self, panels: &[u32], x: &[f32], rows: usize, y: &mut [f32]) {
        assert!(bf16_supported(), "bf16 panels need AVX512-BF16");
        // SAFETY: AVX512-BF16 checked above (for the rounding and for the kernel).
        unsafe {
            let xb = to_bf16_pairs(x, self.inner);
            drive(panels, &xb, rows, self.out, self.inner.div_ceil(2), KC / 2, &BF16_TILES, y);
        }
    }
}

/// A tile kernel for a fixed number of rows: `(x, x stride, panel, inner units, y, y stride,
/// columns, accumulate)`.
type Tile<T> = unsafe fn(*const T, usize, *const T, usize, *mut f32, usize, usize, bool);

/// The loop nest of both formats. Output panels are split across rayon's threads (several
/// chunks per thread, so a descheduled thread's work is stolen); each chunk goes panel by panel,
/// streaming each once from memory front to back, in blocks of `block` inner units (values or
/// pairs) that stay in L1 while every block of `tiles.len()` rows uses them (`tiles[r - 1]`
/// computes `r` rows).
///
/// # Safety
/// `tiles` must be callable on this CPU; `panels` holds `out.div_ceil(NR)` panels of
/// `units · NR` elements, `x` `rows · units` elements and `y` `rows · out`.
#[allow(clippy::too_many_arguments)]
unsafe fn drive<T: Sync>(
    panels: &[T],
    x: &[T],
    rows: usize,
    out: usize,
    units: usize,
    block: usize,
    tiles: &[Tile<T>],
    y: &mut [f32],
) {
    let mr = tiles.len();
    let n_panels = out.div_ceil(NR);
    let chunks = (rayon::current_num_threads() * 4).min(n_panels).max(1);
    let per = n_panels.div_ceil(chunks);
    let y_ptr = SendPtr(y.as_mut_ptr());
    (0..n_panels.div_ceil(per)).into_par_iter().for_each(|c| {
        let y_ptr = &y_ptr;
        for p in c * per..((c + 1) * per).min(n_panels) {
            let cols = NR.min(out - p * NR);
            for k0 in (0..units).step_by(block) {
                let kc = block.min(units - k0);
                let panel = &panels[p * units * NR + k0 * NR..][..kc * NR];
                for r0 in (0..rows).step_by(mr) {
                    // SAFETY: the caller's contract; the kernel reads `r` rows of `kc` units of
                    // `x` at `r0 · units + k0` and writes `r × cols` outputs at `r0 · out + p · NR`,
                    // columns no other chunk touches.
                    unsafe {
                        let xs = x.as_ptr().add(r0 * units + k0);
                        let ys = y_ptr.0.add(r0 * out + p * NR);
                        let r = mr.min(rows - r0);
                        tiles[r - 1](xs, units, panel.as_ptr(), kc, ys, out, cols, k0 > 0);
                    }
                }
            }
        }
    });
}

/// Each row of `x` (`inner` values) as bf16 pairs, rounded to nearest even like [`bf16_pair`],
/// a zero after an odd row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn to_bf16_pairs(x: &[f32], inner: usize) -> Vec<u32> {
    use std::arch::x86_64::*;
    let pairs = inner.div_ceil(2);
    let rows = x.len() / inner.max(1);
    let mut out = vec![0u32; rows * pairs];
    for (row, dst) in x.chunks(inner).zip(out.chunks_mut(pairs)) {
        let dst16 = dst.as_mut_ptr() as *mut u16;
        let whole = inner / 16 * 16;
        for i in (0..whole).step_by(16) {
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(row.as_ptr().add(i))));
            _mm256_storeu_si256(dst16.add(i) as *mut __m256i, b);
        }
        for (i, &v) in row.iter().enumerate().skip(whole) {
            *dst16.add(i) = half::bf16::from_f32(v).to_bits();
        }
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn to_bf16_pairs(_: &[f32], _: usize) -> Vec<u32> {
    unreachable!("the packed kernel is x86-64 only")
}

/// `y[0..R, 0..cols] (+)= x[0..R, 0..kc pairs] · panel[0..kc pairs, 0..cols]` with bf16 pairs.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_bf16<const R: usize>(
    x: *const u32,
    x_stride: usize,
    panel: *const u32,
    kc: usize,
    y: *mut f32,
    y_stride: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); R];
    for i in 0..kc {
        let w: __m512bh = std::mem::transmute(_mm512_loadu_ps(panel.add(i * NR) as *const f32));
        for (r, a) in acc.iter_mut().enumerate() {
            let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(r * x_stride + i) as i32));
            *a = _mm512_dpbf16_ps(*a, xv, w);
        }
    }
    store_512(&acc, y, y_stride, cols, accumulate);
}

/// Writes (or adds) 16-lane accumulators, one per row, to the first `cols` columns of `y`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_512(acc: &[std::arch::x86_64::__m512], y: *mut f32, y_stride: usize, cols: usize, accumulate: bool) {
    use std::arch::x86_64::*;
    let mask: __mmask16 = if cols >= NR { 0xffff } else { ((1u32 << cols) - 1) as u16 };
    for (r, &a) in acc.iter().enumerate() {
        let out = y.add(r * y_stride);
        let v = if accumulate { _mm512_add_ps(a, _mm512_maskz_loadu_ps(mask, out)) } else { a };
        _mm512_mask_storeu_ps(out, mask, v);
    }
}

struct SendPtr(*mut f32);
// SAFETY: chunks write disjoint columns of the output (see `matmul_t`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// The f32 kernels by row count (entry `r - 1` computes `r` rows).
#[cfg(target_arch = "x86_64")]
const F32_TILES: [Tile<f32>; MR] = [kernel::<1>, kernel::<2>, kernel::<3>, kernel::<4>, kernel::<5>, kernel::<6>];
/// The AVX-512 f32 kernels by row count (one 16-lane register per row, so up to 12 rows).
#[cfg(target_arch = "x86_64")]
const F32_TILES_512: [Tile<f32>; MR_512] = [
    kernel_512::<1>,
    kernel_512::<2>,
    kernel_512::<3>,
    kernel_512::<4>,
    kernel_512::<5>,
    kernel_512::<6>,
    kernel_512::<7>,
    kernel_512::<8>,
    kernel_512::<9>,
    kernel_512::<10>,
    kernel_512::<11>,
    kernel_512::<12>,
];
/// The bf16 kernels by row count.
#[cfg(target_arch = "x86_64")]
const BF16_TILES: [Tile<u32>; MR_512] = [
    kernel_bf16::<1>,
    kernel_bf16::<2>,
    kernel_bf16::<3>,
    kernel_bf16::<4>,
    kernel_bf16::<5>,
    kernel_bf16::<6>,
    kernel_bf16::<7>,
    kernel_bf16::<8>,
    kernel_bf16::<9>,
    kernel_bf16::<10>,
    kernel_bf16::<11>,
    kernel_bf16::<12>,
];
// Elsewhere no kernel exists and `supported()` / `bf16_supported()` refuse before any call.
#[cfg(not(target_arch = "x86_64"))]
const F32_TILES: [Tile<f32>; 0] = [];
#[cfg(not(target_arch = "x86_64"))]
const F32_TILES_512: [Tile<f32>; 0] = [];
#[cfg(not(target_arch = "x86_64"))]
const BF16_TILES: [Tile<u32>; 0] = [];

/// `y[0..R, 0..cols] (+)= x[0..R, 0..kc] · panel[0..kc, 0..cols]`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel<const R: usize>(
    x: *const f32,
    x_stride: usize,
    panel: *const f32,
    kc: usize,
    y: *mut f32,
    y_stride: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for k in 0..kc {
        let w0 = _mm256_loadu_ps(panel.add(k * NR));
        let w1 = _mm256_loadu_ps(panel.add(k * NR + 8));
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_broadcast_ss(&*x.add(r * x_stride + k));
            a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
            a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let out = y.add(r * y_stride);
        if cols == NR {
            let (mut v0, mut v1) = (a[0], a[1]);
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(out));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(out.add(8)));
            }
            _mm256_storeu_ps(out, v0);
            _mm256_storeu_ps(out.add(8), v1);
        } else {
            let mut tmp = [0f32; NR];
            _mm256_storeu_ps(tmp.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), a[1]);
            for (j, &v) in tmp.iter().enumerate().take(cols) {
                *out.add(j) = if accumulate { *out.add(j) + v } else { v };
            }
        }
    }
}

/// [`kernel`] with AVX-512: the same products summed in the same order (so the same bits), twice
/// the lanes per instruction and twice the rows per tile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_512<const R: usize>(
    x: *const f32,
    x_stride: usize,
    panel: *const f32,
    kc: usize,
    y: *mut f32,
    y_stride: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); R];
    for k in 0..kc {
        let w = _mm512_loadu_ps(panel.add(k * NR));
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(r * x_stride + k)), w, *a);
        }
    }
    store_512(&acc, y, y_stride, cols, accumulate);
}

/// Whether the f32 format runs the AVX-512 kernels (`VERDICT_AVX512=0` keeps AVX2).
pub fn avx512_f32() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let has = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        has && std::env::var("VERDICT_AVX512").map_or(true, |v| v != "0")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x Wᵀ` in f64, the plain triple loop.
    fn reference(x: &[f32], w: &[f32], rows: usize, out: usize, inner: usize) -> Vec<f64> {
        let mut y = vec![0f64; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = (0..inner).map(|k| x[r * inner + k] as f64 * w[o * inner + k] as f64).sum();
            }
        }
        y
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A small deterministic generator: values in [-1, 1).
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_plain_product_for_ragged_shapes() {
        if !supported() {
            eprintln!("no AVX2/FMA: the packed kernel is not used on this CPU");
            return;
        }
        // Rows below, at and above MR; columns not a multiple of NR; inner sizes across KC.
        for &(rows, out, inner) in &[
            (1, 1, 1),
            (1, 17, 3),
            (5, 16, 255),
            (6, 33, 256),
            (7, 40, 257),
            (13, 5, 600),
            (52, 192, 576),
            (3, 100, 1000),
        ] {
            let x = values(rows * inner, rows as u32 * 31 + 1);
            let w = values(out * inner, out as u32 * 7 + 2);
            let y = PackedWeight::pack(&w, out, inner).matmul_t(&x, rows);
            let want = reference(&x, &w, rows, out, inner);
            for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                let tol = 1e-5 * (inner as f64).sqrt().max(1.0) * (1.0 + want.abs());
                assert!((got as f64 - want).abs() <= tol, "[{rows}, {out}, {inner}] entry {i}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn avx512_and_avx2_kernels_give_the_same_bits() {
        #[cfg(target_arch = "x86_64")]
        {
            if !supported() || !std::arch::is_x86_feature_detected!("avx512f") {
                eprintln!("no AVX-512: only the AVX2 kernel runs on this CPU");
                return;
            }
            // Row counts around both tile heights (6 and 12), ragged columns, inner across KC.
            for &(rows, out, inner) in &[(1, 17, 3), (11, 40, 257), (12, 16, 300), (25, 33, 520), (300, 20, 64)] {
                let x = values(rows * inner, rows as u32 * 13 + 5);
                let w = values(out * inner, out as u32 * 3 + 9);
                let packed = PackedWeight::pack(&w, out, inner);
                let Panels::F32(data) = &packed.panels else { unreachable!("f32 panels") };
                let run = |tiles: &[Tile<f32>]| {
                    let mut y = vec![0f32; rows * out];
                    // SAFETY: AVX2/FMA and AVX-512 checked above.
                    unsafe { drive(data, &x, rows, out, inner, KC, tiles, &mut y) };
                    y
                };
                let (y2, y512) = (run(&F32_TILES), run(&F32_TILES_512));
                let want = reference(&x, &w, rows, out, inner);
                assert!((y512[0] as f64 - want[0]).abs() < 1e-4 * (1.0 + want[0].abs()));
                let same = y2.iter().zip(&y512).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "[{rows}, {out}, {inner}]: the AVX-512 kernel differs from the AVX2 one");
            }
        }
    }

    #[test]
    fn bf16_panels_give_the_exact_products_of_bf16_rounded_inputs() {
        if !bf16_supported() {
            eprintln!("no AVX512-BF16: the bf16 kernel is not used on this CPU");
            return;
        }
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&a| half::bf16::from_f32(a).to_f32()).collect() };
        // Odd inner sizes (a zero-padded last pair), rows across MR_512, ragged columns.
        for &(rows, out, inner) in &[(1, 1, 1), (3, 17, 7), (12, 16, 256), (13, 40, 257), (25, 5, 601), (52, 192, 576)]
        {
            let x = values(rows * inner, rows as u32 * 13 + 5);
            let w = values(out * inner, out as u32 * 3 + 9);
            let packed = PackedWeight::pack_as(&w, out, inner, Format::Bf16);
            assert_eq!(packed.format(), Format::Bf16);
            let y = packed.matmul_t(&x, rows);
            // Products of bf16 values are exact in f32; only the f32 summation order differs.
            let want = reference(&round(&x), &round(&w), rows, out, inner);
            let full = reference(&x, &w, rows, out, inner);
            for (i, ((&got, &want), &full)) in y.iter().zip(&want).zip(&full).enumerate() {
                let tol = 1e-5 * (inner as f64).sqrt().max(1.0) * (1.0 + want.abs());
                assert!((got as f64 - want).abs() <= tol, "[{rows}, {out}, {inner}] entry {i}: {got} vs {want}");
                // And within bf16's input precision of the f32 product.
                let bound = 2f64.powi(-7) * (inner as f64).sqrt() + 1e-6;
                assert!((got as f64 - full).abs() <= bound, "[{rows}, {out}, {inner}] entry {i}: {got} vs f32 {full}");
            }
        }
    }

    #[test]
    fn vector_rounding_to_bf16_matches_the_scalar_rounding() {
        if !bf16_supported() {
            return;
        }
        // Halfway cases (ties to even) and ordinary values, an odd row length.
        let mut x = values(3 * 37, 11);
        x[0] = 1.0 + 2f32.powi(-8); // a tie: rounds to 1.0
        x[1] = 1.0 + 3.0 * 2f32.powi(-8); // a tie: rounds up to 1 + 2⁻⁶
                                          // SAFETY: AVX512-BF16 checked above.
        let got = unsafe { to_bf16_pairs(&x, 37) };
        let want: Vec<u32> =
            x.chunks(37).flat_map(|r| r.chunks(2).map(|p| bf16_pair(p[0], p.get(1).copied().unwrap_or(0.0)))).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn formats_parse_and_bf16_is_refused_without_the_instructions() {
        assert_eq!("BF16".parse::<Format>(), Ok(Format::Bf16));
        assert_eq!("f32".parse::<Format>(), Ok(Format::F32));
        assert!("int8".parse::<Format>().unwrap_err().contains("f32 or bf16"));
        // (Not set to bf16 here: other tests in this binary may be packing.)
        if !bf16_supported() {
            assert!(set_format(Format::Bf16).unwrap_err().contains("AVX512-BF16"));
        }
        assert_eq!(format(), Format::F32);
    }

    #[test]
    fn zero_rows_give_an_empty_output() {
        let w = values(32 * 8, 3);
        assert!(PackedWeight::pack(&w, 32, 8).matmul_t(&[], 0).is_empty());
    }
}
