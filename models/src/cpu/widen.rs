//! bf16 weights widened to f32 in registers, times f32 inputs with f32 FMAs.
//!
//! The `vdpbf16ps` kernels ([`super::lowp`]) halve the weight bytes and round the inputs to
//! bf16 too. Where a core runs `vdpbf16ps` at half the rate of its f32 FMAs (the Intel Xeon of
//! lscpu family 6 model 207 without AMX: 70-145 GFLOP/s against 140-250 for f32 on the same
//! shapes, docs/benchmarks.md), a product with many rows is faster in f32 and one with few is
//! faster in bf16: these kernels keep both gains. They read the bf16 panels as they are (two
//! consecutive `k` of one column per 32-bit lane, the first in the low half) and widen each
//! lane into two f32 vectors with one shift and one mask (bf16 is the top half of an f32), then
//! run the f32 tile of [`super::f32`]: half the weight bytes, f32's FMA rate less the two
//! integer operations per weight vector, and the inputs unrounded (the products' error is the
//! weights' rounding alone). Which of the two bf16 kernels a shape takes is measured
//! ([`super::plan`]).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::f32::store_row_512;
use super::layout::{Prefetch, NR};

/// A widening tile: `(x, x stride, first panel, panel stride, k pairs, y, y stride, valid
/// columns, accumulate)`. `x` holds f32 rows (2 · `k pairs` values read per row); the panels
/// hold bf16 pairs (`u32` lanes); strides are in values (x, y) and lanes (panels). Asks the
/// cache for `prefetch`'s lines as it goes.
pub(crate) type WidenTile =
    unsafe fn(*const f32, usize, *const u32, usize, usize, *mut f32, usize, usize, bool, Prefetch);

/// AVX-512: `R` rows × `C` panels of 16 lanes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen_512<const R: usize, const C: usize>(
    x: *const f32,
    xs: usize,
    w: *const u32,
    ws: usize,
    pairs: usize,
    y: *mut f32,
    ys: usize,
    cols: usize,
    accumulate: bool,
    pf: Prefetch,
) {
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut due = pf.phase;
    for k in 0..pairs {
        pf.at(k, &mut due);
        // The even k (low halves) first, then the odd (high halves): C weight vectors live at
        // a time, as in the f32 tile.
        let mut wv = [_mm512_setzero_ps(); C];
        for (c, v) in wv.iter_mut().enumerate() {
            let lanes = _mm512_loadu_si512(w.add(c * ws + k * NR) as *const _);
            *v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(lanes));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.add(r * xs + 2 * k));
            for (a, &wc) in row.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(xv, wc, *a);
            }
        }
        for (c, v) in wv.iter_mut().enumerate() {
            let lanes = _mm512_loadu_si512(w.add(c * ws + k * NR) as *const _);
            *v = _mm512_castsi512_ps(_mm512_and_si512(lanes, high));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.add(r * xs + 2 * k + 1));
            for (a, &wc) in row.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(xv, wc, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        store_row_512(row, y.add(r * ys), cols, accumulate);
    }
}

/// AVX2: `R` rows × `C` panels of two 8-lane halves.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen_256<const R: usize, const C: usize>(
    x: *const f32,
    xs: usize,
    w: *const u32,
    ws: usize,
    pairs: usize,
    y: *mut f32,
    ys: usize,
    cols: usize,
    accumulate: bool,
    pf: Prefetch,
) {
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
    let mut due = pf.phase;
    for k in 0..pairs {
        pf.at(k, &mut due);
        for half in 0..2 {
            let mut wv = [[_mm256_setzero_ps(); 2]; C];
            for (c, v) in wv.iter_mut().enumerate() {
                let p = w.add(c * ws + k * NR) as *const __m256i;
                for (h, v) in v.iter_mut().enumerate() {
                    let lanes = _mm256_loadu_si256(p.add(h));
                    *v = _mm256_castsi256_ps(if half == 0 {
                        _mm256_slli_epi32::<16>(lanes)
                    } else {
                        _mm256_and_si256(lanes, high)
                    });
                }
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(r * xs + 2 * k + half));
                for (a, wc) in row.iter_mut().zip(&wv) {
                    a[0] = _mm256_fmadd_ps(xv, wc[0], a[0]);
                    a[1] = _mm256_fmadd_ps(xv, wc[1], a[1]);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        super::f32::store_row_256(row, y.add(r * ys), cols, accumulate);
    }
}

// The widening tiles share the low-precision tiles' table macro and bounds (14 rows × 4 panels).
use super::lowp::{lowp_table, MAX_C, MAX_R};

#[cfg(target_arch = "x86_64")]
static WIDEN_512: [[WidenTile; MAX_R]; MAX_C] = lowp_table!(widen_512, [1, 2, 3, 4]);
#[cfg(target_arch = "x86_64")]
static WIDEN_256: [[WidenTile; MAX_R]; 2] = lowp_table!(widen_256, [1, 2]);

/// Whether `r` rows × `c` panels fit the vector registers of the AVX-512 (`wide`, 32 of 16
/// lanes) or AVX2 (16 of 8 lanes) kernel: the accumulators, `c` weight vectors, one broadcast
/// and the mask of the high halves.
pub(crate) fn fits(wide: bool, r: usize, c: usize) -> bool {
    if wide {
        (1..=MAX_R).contains(&r) && (1..=MAX_C).contains(&c) && r * c + c + 2 <= 32
    } else {
        (1..=MAX_R).contains(&r) && (1..=2).contains(&c) && 2 * (r * c + c) + 2 <= 16
    }
}

/// The widening tile of `r` rows × `c` panels, AVX-512 (`wide`) or AVX2.
///
/// # Panics
/// If the shape does not [`fits`].
#[cfg(target_arch = "x86_64")]
pub(crate) fn tile(wide: bool, r: usize, c: usize) -> WidenTile {
    assert!(fits(wide, r, c), "no widening bf16 tile of {r} rows × {c} panels");
    if wide {
        WIDEN_512[c - 1][r - 1]
    } else {
        WIDEN_256[c - 1][r - 1]
    }
}
