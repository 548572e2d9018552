//! f32 micro-kernels: an `R × 16C` tile of the output kept in registers while `k` runs, one
//! input value broadcast per row and `k`, one 16-column weight vector per panel and `k`.
//!
//! Why several shapes: a core with two 512-bit FMA ports and four cycles of FMA latency (Intel
//! Xeon since Skylake-SP) needs at least eight independent accumulators to stay busy, and each
//! FMA wants at most about one load; a core that splits 512-bit FMAs into two 256-bit halves
//! (AMD Zen 4) is saturated by fewer. Wide tiles (`C` panels) load fewer input values per FMA,
//! tall ones (`R` rows) fewer weight values. Which one is fastest depends on the core, so the
//! plan ([`super::plan`]) measures them on the model's real shapes.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::layout::{Prefetch, NR};

/// A tile kernel: `(x, x stride, first panel, panel stride, k count, y, y stride, valid
/// columns, accumulate)`. Computes `y[0..R, 0..cols] (+)= x[0..R, 0..kc] · panels[0..kc,
/// 0..cols]` where the tile's `C` panels lie `panel stride` values apart; asks the cache for
/// `prefetch`'s lines as it goes.
pub(crate) type F32Tile =
    unsafe fn(*const f32, usize, *const f32, usize, usize, *mut f32, usize, usize, bool, Prefetch);

/// AVX-512: `R` rows × `C` panels of 16 lanes, `R · C` accumulators.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn tile_512<const R: usize, const C: usize>(
    x: *const f32,
    xs: usize,
    w: *const f32,
    ws: usize,
    kc: usize,
    y: *mut f32,
    ys: usize,
    cols: usize,
    accumulate: bool,
    pf: Prefetch,
) {
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut due = pf.phase;
    for k in 0..kc {
        pf.at(k, &mut due);
        let mut wv = [_mm512_setzero_ps(); C];
        for (c, v) in wv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(w.add(c * ws + k * NR));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.add(r * xs + k));
            for (a, &wc) in row.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(xv, wc, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        store_row_512(row, y.add(r * ys), cols, accumulate);
    }
}

/// Writes (or adds) one row's `C` accumulators to the first `cols` columns at `out`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn store_row_512(row: &[__m512], out: *mut f32, cols: usize, accumulate: bool) {
    for (c, &a) in row.iter().enumerate() {
        let lo = c * NR;
        if lo >= cols {
            break;
        }
        let n = (cols - lo).min(NR);
        let mask: __mmask16 = if n == NR { 0xffff } else { ((1u32 << n) - 1) as u16 };
        let p = out.add(lo);
        let v = if accumulate { _mm512_add_ps(a, _mm512_maskz_loadu_ps(mask, p)) } else { a };
        _mm512_mask_storeu_ps(p, mask, v);
    }
}

/// AVX2: `R` rows × `C` panels of two 8-lane halves.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_256<const R: usize, const C: usize>(
    x: *const f32,
    xs: usize,
    w: *const f32,
    ws: usize,
    kc: usize,
    y: *mut f32,
    ys: usize,
    cols: usize,
    accumulate: bool,
    pf: Prefetch,
) {
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
    let mut due = pf.phase;
    for k in 0..kc {
        pf.at(k, &mut due);
        let mut wv = [[_mm256_setzero_ps(); 2]; C];
        for (c, v) in wv.iter_mut().enumerate() {
            v[0] = _mm256_loadu_ps(w.add(c * ws + k * NR));
            v[1] = _mm256_loadu_ps(w.add(c * ws + k * NR + 8));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = _mm256_broadcast_ss(&*x.add(r * xs + k));
            for (a, wc) in row.iter_mut().zip(&wv) {
                a[0] = _mm256_fmadd_ps(xv, wc[0], a[0]);
                a[1] = _mm256_fmadd_ps(xv, wc[1], a[1]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        store_row_256(row, y.add(r * ys), cols, accumulate);
    }
}

/// Writes (or adds) one row's `C` pairs of 8-lane accumulators to the first `cols` columns at
/// `out`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn store_row_256(row: &[[__m256; 2]], out: *mut f32, cols: usize, accumulate: bool) {
    for (c, a) in row.iter().enumerate() {
        let lo = c * NR;
        if lo >= cols {
            break;
        }
        let n = (cols - lo).min(NR);
        let p = out.add(lo);
        if n == NR {
            let (mut v0, mut v1) = (a[0], a[1]);
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
            }
            _mm256_storeu_ps(p, v0);
            _mm256_storeu_ps(p.add(8), v1);
        } else {
            let mut tmp = [0f32; NR];
            _mm256_storeu_ps(tmp.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), a[1]);
            for (j, &v) in tmp.iter().enumerate().take(n) {
                *p.add(j) = if accumulate { *p.add(j) + v } else { v };
            }
        }
    }
}

/// Expands to a table `[[F32Tile; MAX_R]; MAX_C]` of `$f::<r, c>` (entry `[c - 1][r - 1]`).
macro_rules! tile_table {
    ($f:ident, $max_r:tt, [$($c:tt),*]) => {
        [$( tile_table!(@row $f, $c, $max_r) ),*]
    };
    (@row $f:ident, $c:tt, 14) => {
        [$f::<1, $c>, $f::<2, $c>, $f::<3, $c>, $f::<4, $c>, $f::<5, $c>, $f::<6, $c>, $f::<7, $c>,
         $f::<8, $c>, $f::<9, $c>, $f::<10, $c>, $f::<11, $c>, $f::<12, $c>, $f::<13, $c>, $f::<14, $c>]
    };
    (@row $f:ident, $c:tt, 6) => {
        [$f::<1, $c>, $f::<2, $c>, $f::<3, $c>, $f::<4, $c>, $f::<5, $c>, $f::<6, $c>]
    };
}

/// Most rows of an AVX-512 f32 tile.
pub const MAX_R_512: usize = 14;
/// Most panels of an AVX-512 f32 tile.
pub const MAX_C_512: usize = 4;
/// Most rows and panels of an AVX2 tile.
pub const MAX_R_256: usize = 6;
pub const MAX_C_256: usize = 2;

#[cfg(target_arch = "x86_64")]
static TILES_512: [[F32Tile; MAX_R_512]; MAX_C_512] = tile_table!(tile_512, 14, [1, 2, 3, 4]);
#[cfg(target_arch = "x86_64")]
static TILES_256: [[F32Tile; MAX_R_256]; MAX_C_256] = tile_table!(tile_256, 6, [1, 2]);

/// Whether a tile of `r` rows × `c` panels fits the registers of the AVX-512 (`wide`) or AVX2
/// kernel: the accumulators, `c` weight vectors and one broadcast.
pub fn fits(wide: bool, r: usize, c: usize) -> bool {
    if wide {
        (1..=MAX_R_512).contains(&r) && (1..=MAX_C_512).contains(&c) && r * c + c < 32
    } else {
        (1..=MAX_R_256).contains(&r) && (1..=MAX_C_256).contains(&c) && 2 * (r * c + c) < 16
    }
}

/// The tile kernel of `r` rows × `c` panels.
///
/// # Panics
/// If the shape does not [`fits`] (callers clamp to it).
#[cfg(target_arch = "x86_64")]
pub(crate) fn tile(wide: bool, r: usize, c: usize) -> F32Tile {
    assert!(fits(wide, r, c), "no f32 tile of {r} rows × {c} panels");
    if wide {
        TILES_512[c - 1][r - 1]
    } else {
        TILES_256[c - 1][r - 1]
    }
}
