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
//! are split among rayon's threads (each writes its own columns).

use rayon::prelude::*;

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
    panels: Vec<f32>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight [{}, {}]", self.out, self.inner)
    }
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
    /// Packs `w`, row-major `[out, inner]`.
    pub fn pack(w: &[f32], out: usize, inner: usize) -> Self {
        assert_eq!(w.len(), out * inner, "weight of {} values is not [{out}, {inner}]", w.len());
        let n_panels = out.div_ceil(NR);
        let mut panels = vec![0f32; n_panels * inner * NR];
        panels.par_chunks_mut(inner * NR).enumerate().for_each(|(p, panel)| {
            for j in 0..NR.min(out - p * NR) {
                let row = &w[(p * NR + j) * inner..(p * NR + j + 1) * inner];
                for (k, &v) in row.iter().enumerate() {
                    panel[k * NR + j] = v;
                }
            }
        });
        Self { out, inner, panels }
    }

    /// `(out, inner)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inner)
    }

    /// `y = x Wᵀ` for `x` row-major `[rows, inner]`; returns `[rows, out]` row-major.
    ///
    /// # Panics
    /// If `x` is not `rows · inner` long or the CPU lacks AVX2/FMA ([`supported`]).
    pub fn matmul_t(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.inner, "input of {} values is not [{rows}, {}]", x.len(), self.inner);
        let mut y = vec![0f32; rows * self.out];
        if rows == 0 || self.out == 0 {
            return y;
        }
        assert!(supported(), "the packed kernel needs AVX2 and FMA");
        let n_panels = self.out.div_ceil(NR);
        // Several chunks per thread so a descheduled thread's work is stolen by the other.
        let chunks = (rayon::current_num_threads() * 4).min(n_panels).max(1);
        let per = n_panels.div_ceil(chunks);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..n_panels.div_ceil(per)).into_par_iter().for_each(|c| {
            let y_ptr = &y_ptr;
            let panels = c * per..((c + 1) * per).min(n_panels);
            // Panel by panel, each streamed once from memory front to back; a panel's block of
            // KC inner values stays in L1 while every row block uses it.
            for p in panels.clone() {
                for k0 in (0..self.inner).step_by(KC) {
                    let kc = KC.min(self.inner - k0);
                    let cols = NR.min(self.out - p * NR);
                    let panel = &self.panels[p * self.inner * NR + k0 * NR..][..kc * NR];
                    for r0 in (0..rows).step_by(MR) {
                        let r = MR.min(rows - r0);
                        // SAFETY: AVX2/FMA checked above; the kernel reads `r` rows of `kc` values
                        // from `x` at `r0 · inner + k0` and writes `r × cols` outputs at
                        // `r0 · out + p · NR`, columns no other chunk touches.
                        unsafe {
                            let xs = x.as_ptr().add(r0 * self.inner + k0);
                            let ys = y_ptr.0.add(r0 * self.out + p * NR);
                            tile(r, xs, self.inner, panel.as_ptr(), kc, ys, self.out, cols, k0 > 0);
                        }
                    }
                }
            }
        });
        y
    }
}

struct SendPtr(*mut f32);
// SAFETY: chunks write disjoint columns of the output (see `matmul_t`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Dispatches `r` (1..=MR) rows to the kernel specialised for it.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn tile(
    r: usize,
    x: *const f32,
    x_stride: usize,
    panel: *const f32,
    kc: usize,
    y: *mut f32,
    y_stride: usize,
    cols: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let f = match r {
            1 => kernel::<1>,
            2 => kernel::<2>,
            3 => kernel::<3>,
            4 => kernel::<4>,
            5 => kernel::<5>,
            _ => kernel::<6>,
        };
        f(x, x_stride, panel, kc, y, y_stride, cols, accumulate)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (r, x, x_stride, panel, kc, y, y_stride, cols, accumulate);
        unreachable!("the packed kernel is x86-64 only")
    }
}

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
    fn zero_rows_give_an_empty_output() {
        let w = values(32 * 8, 3);
        assert!(PackedWeight::pack(&w, 32, 8).matmul_t(&[], 0).is_empty());
    }
}
