//! Low-precision micro-kernels: bf16 pairs with f32 sums, and u8 × i8 quads with i32 sums.
//!
//! Both read the same panel layout as f32 (16 output columns per panel, `k`-major), with two
//! (bf16) or four (int8) consecutive `k` of one column in each 32-bit lane: the layout that
//! `vdpbf16ps` / `vpdpbusd` multiply lane by lane and that AMX reads as its B tile (16 rows of
//! 64 bytes). Inputs come prepared by [`super::packed`]: bf16 rows, or u8 rows with a scale and
//! zero point per row (`x ≈ sx · (q - zx)`); int8 weights carry a scale per output column and
//! the column's sum (`sw`, `Σ w`), so that
//! `y = sx · sw · (Σ q w - zx Σ w)`, exact in i32 before the two scales.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::f32::store_row_512;
use super::layout::{Prefetch, NR};

/// Row and column factors of an int8 product's epilogue.
#[derive(Clone, Copy)]
pub(crate) struct Dequant {
    /// Per input row: zero point and scale.
    pub zx: *const i32,
    pub sx: *const f32,
    /// Per output column: the sum of the column's int8 weights, and its scale.
    pub colsum: *const i32,
    pub sw: *const f32,
}
// SAFETY: read-only pointers into buffers that outlive every parallel call that uses them.
unsafe impl Sync for Dequant {}
unsafe impl Send for Dequant {}

/// A vector tile kernel over 32-bit lanes of pairs or quads: `(x, x stride, first panel, panel
/// stride, k units, y, y stride, valid columns, accumulate, int8 epilogue, prefetch)`.
pub(crate) type LowpTile =
    unsafe fn(*const u32, usize, *const u32, usize, usize, *mut f32, usize, usize, bool, Option<&Dequant>, Prefetch);

/// AVX512-BF16: `R × C` tiles of f32 accumulators.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn bf16_512<const R: usize, const C: usize>(
    x: *const u32,
    xs: usize,
    w: *const u32,
    ws: usize,
    kc: usize,
    y: *mut f32,
    ys: usize,
    cols: usize,
    accumulate: bool,
    _: Option<&Dequant>,
    pf: Prefetch,
) {
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut due = pf.phase;
    for k in 0..kc {
        pf.at(k, &mut due);
        let mut wv: [__m512bh; C] = [std::mem::transmute::<__m512, __m512bh>(_mm512_setzero_ps()); C];
        for (c, v) in wv.iter_mut().enumerate() {
            *v = std::mem::transmute::<__m512, __m512bh>(_mm512_loadu_ps(w.add(c * ws + k * NR) as *const f32));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(r * xs + k) as i32));
            for (a, &wc) in row.iter_mut().zip(&wv) {
                *a = _mm512_dpbf16_ps(*a, xv, wc);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        store_row_512(row, y.add(r * ys), cols, accumulate);
    }
}

/// AVX512-VNNI: `R × C` tiles of i32 accumulators over the whole `k`, then the epilogue.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn int8_512<const R: usize, const C: usize>(
    x: *const u32,
    xs: usize,
    w: *const u32,
    ws: usize,
    kc: usize,
    y: *mut f32,
    ys: usize,
    cols: usize,
    accumulate: bool,
    dq: Option<&Dequant>,
    pf: Prefetch,
) {
    let dq = dq.expect("an int8 tile needs its scales");
    let mut acc = [[_mm512_setzero_si512(); C]; R];
    let mut due = pf.phase;
    for k in 0..kc {
        pf.at(k, &mut due);
        let mut wv = [_mm512_setzero_si512(); C];
        for (c, v) in wv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(w.add(c * ws + k * NR) as *const _);
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_epi32(*x.add(r * xs + k) as i32);
            for (a, &wc) in row.iter_mut().zip(&wv) {
                *a = _mm512_dpbusd_epi32(*a, xv, wc);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let zx = _mm512_set1_epi32(*dq.zx.add(r));
        let sx = _mm512_set1_ps(*dq.sx.add(r));
        let mut out = [_mm512_setzero_ps(); C];
        for (c, (&a, o)) in row.iter().zip(out.iter_mut()).enumerate() {
            let colsum = _mm512_loadu_si512(dq.colsum.add(c * NR) as *const _);
            let sw = _mm512_loadu_ps(dq.sw.add(c * NR));
            let exact = _mm512_sub_epi32(a, _mm512_mullo_epi32(zx, colsum));
            *o = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(exact), sw), sx);
        }
        store_row_512(&out, y.add(r * ys), cols, accumulate);
    }
}

/// AVX-VNNI (256-bit): `R × C` tiles of two 8-lane i32 halves per panel.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn int8_256<const R: usize, const C: usize>(
    x: *const u32,
    xs: usize,
    w: *const u32,
    ws: usize,
    kc: usize,
    y: *mut f32,
    ys: usize,
    cols: usize,
    accumulate: bool,
    dq: Option<&Dequant>,
    pf: Prefetch,
) {
    let dq = dq.expect("an int8 tile needs its scales");
    let mut acc = [[[_mm256_setzero_si256(); 2]; C]; R];
    let mut due = pf.phase;
    for k in 0..kc {
        pf.at(k, &mut due);
        let mut wv = [[_mm256_setzero_si256(); 2]; C];
        for (c, v) in wv.iter_mut().enumerate() {
            let p = w.add(c * ws + k * NR) as *const __m256i;
            v[0] = _mm256_loadu_si256(p);
            v[1] = _mm256_loadu_si256(p.add(1));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = _mm256_set1_epi32(*x.add(r * xs + k) as i32);
            for (a, wc) in row.iter_mut().zip(&wv) {
                a[0] = _mm256_dpbusd_avx_epi32(a[0], xv, wc[0]);
                a[1] = _mm256_dpbusd_avx_epi32(a[1], xv, wc[1]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let zx = _mm256_set1_epi32(*dq.zx.add(r));
        let sx = _mm256_set1_ps(*dq.sx.add(r));
        let out = y.add(r * ys);
        for (c, a) in row.iter().enumerate() {
            let lo = c * NR;
            if lo >= cols {
                break;
            }
            let mut vals = [0f32; NR];
            for (h, &half) in a.iter().enumerate() {
                let colsum = _mm256_loadu_si256(dq.colsum.add(lo + 8 * h) as *const __m256i);
                let sw = _mm256_loadu_ps(dq.sw.add(lo + 8 * h));
                let exact = _mm256_sub_epi32(half, _mm256_mullo_epi32(zx, colsum));
                let v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(exact), sw), sx);
                _mm256_storeu_ps(vals.as_mut_ptr().add(8 * h), v);
            }
            let n = (cols - lo).min(NR);
            for (j, &v) in vals.iter().enumerate().take(n) {
                let p = out.add(lo + j);
                *p = if accumulate { *p + v } else { v };
            }
        }
    }
}

/// Expands to `[[LowpTile; MAX_R]; MAX_C]` of `$f::<r, c>`.
macro_rules! lowp_table {
    ($f:ident, [$($c:literal),*]) => {
        [$( [$f::<1, $c>, $f::<2, $c>, $f::<3, $c>, $f::<4, $c>, $f::<5, $c>, $f::<6, $c>, $f::<7, $c>,
             $f::<8, $c>, $f::<9, $c>, $f::<10, $c>, $f::<11, $c>, $f::<12, $c>, $f::<13, $c>, $f::<14, $c>] ),*]
    };
}

pub(crate) use lowp_table;

/// Most rows and panels of a vector low-precision tile.
pub const MAX_R: usize = 14;
pub const MAX_C: usize = 4;

#[cfg(target_arch = "x86_64")]
static BF16_512: [[LowpTile; MAX_R]; MAX_C] = lowp_table!(bf16_512, [1, 2, 3, 4]);
#[cfg(target_arch = "x86_64")]
static INT8_512: [[LowpTile; MAX_R]; MAX_C] = lowp_table!(int8_512, [1, 2, 3, 4]);
#[cfg(target_arch = "x86_64")]
static INT8_256: [[LowpTile; MAX_R]; 2] = lowp_table!(int8_256, [1, 2]);

/// Which vector kernel family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LowpKind {
    Bf16Avx512,
    Int8Avx512,
    Int8Avx256,
}

/// Whether a tile of `r` rows × `c` panels fits the registers of `kind`.
pub(crate) fn fits(kind: LowpKind, r: usize, c: usize) -> bool {
    match kind {
        LowpKind::Bf16Avx512 | LowpKind::Int8Avx512 => {
            (1..=MAX_R).contains(&r) && (1..=MAX_C).contains(&c) && r * c + c < 32
        }
        LowpKind::Int8Avx256 => (1..=MAX_R).contains(&r) && (1..=2).contains(&c) && 2 * (r * c + c) < 16,
    }
}

/// The tile kernel of `kind` for `r` rows × `c` panels.
#[cfg(target_arch = "x86_64")]
pub(crate) fn tile(kind: LowpKind, r: usize, c: usize) -> LowpTile {
    assert!(fits(kind, r, c), "no {kind:?} tile of {r} rows × {c} panels");
    match kind {
        LowpKind::Bf16Avx512 => BF16_512[c - 1][r - 1],
        LowpKind::Int8Avx512 => INT8_512[c - 1][r - 1],
        LowpKind::Int8Avx256 => INT8_256[c - 1][r - 1],
    }
}

/// AMX: padded rows `row_range` (a range of whole 16-row tiles, within the input padded to
/// whole tiles; rows from `rows_real` on are computed but not written) times panels `panels`
/// (a range of panel indices), `k_tiles` tiles of 64 bytes of `k`. `x` rows are `x_row` bytes
/// apart, panels `panel_bytes` apart. Two input tiles × two weight tiles per step where the rows
/// allow (four accumulators), else one × two. Panel pairs outside, blocks of 32 rows inside:
/// each pair of weight panels is read from memory once per call and then from cache, and the
/// caller keeps `row_range` small enough for its input rows to stay in cache across the pairs.
/// bf16 tiles that lie wholly inside `y` start from `y` (when `accumulate`) and are stored
/// straight into it; the others, and every int8 tile (its i32 sums need dequantizing), pass
/// through a scratch tile.
///
/// # Safety
/// The CPU has AMX with permission and this thread's tiles are configured
/// ([`super::amx::configure`]); every buffer covers the padded shapes; `y` has `rows_real`
/// rows of `ys` values and columns `panels · 16` are within it up to `out`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn amx_block<const INT8: bool>(
    x: *const u8,
    x_row: usize,
    row_range: std::ops::Range<usize>,
    rows_real: usize,
    w: *const u8,
    panel_bytes: usize,
    panels: std::ops::Range<usize>,
    out: usize,
    k_tiles: usize,
    y: *mut f32,
    ys: usize,
    accumulate: bool,
    dq: Option<&Dequant>,
) {
    use super::amx::{dp_bf16, dp_u8i8, load, store, zero, TILE_BYTES, TILE_ROWS};
    let rows_end = row_range.end;
    let mut scratch = [[0f32; NR * TILE_ROWS]; 4];
    let y_stride = ys * 4;
    // Whether tile (rows r0.., panel p) lies wholly inside y: stored there directly (bf16).
    let direct = |r0: usize, p: usize| !INT8 && r0 + TILE_ROWS <= rows_real && (p + 1) * NR <= out;
    let mut p = panels.start;
    while p < panels.end {
        let two_b = p + 1 < panels.end;
        let mut m0 = row_range.start;
        while m0 < rows_end {
            let two_a = rows_end - m0 >= 2 * TILE_ROWS;
            // Accumulators: tmm0 (a0, b0), tmm1 (a0, b1), tmm2 (a1, b0), tmm3 (a1, b1); tile `t`
            // covers rows `m0 + (t / 2) · 16` and panel `p + t % 2`.
            let live = |t: usize| (t < 2 || two_a) && (t.is_multiple_of(2) || two_b);
            let in_y = |t: usize| live(t) && direct(m0 + (t / 2) * TILE_ROWS, p + t % 2);
            let c_at = |t: usize| y.add((m0 + (t / 2) * TILE_ROWS) * ys + (p + t % 2) * NR);
            // The tile numbers are literals of the instructions, hence a macro per tile.
            macro_rules! start {
                ($t:literal) => {
                    if accumulate && in_y($t) {
                        load!($t, c_at($t), y_stride);
                    } else {
                        zero!($t);
                    }
                };
            }
            start!(0);
            start!(1);
            start!(2);
            start!(3);
            let a0 = x.add(m0 * x_row);
            let a1 = x.add((m0 + TILE_ROWS) * x_row);
            let b0 = w.add(p * panel_bytes);
            let b1 = w.add((p + 1) * panel_bytes);
            for kt in 0..k_tiles {
                let ka = kt * TILE_BYTES;
                let kb = kt * TILE_BYTES * TILE_ROWS;
                load!(4, a0.add(ka), x_row);
                load!(6, b0.add(kb), TILE_BYTES);
                if two_b {
                    load!(7, b1.add(kb), TILE_BYTES);
                }
                if INT8 {
                    dp_u8i8!(0, 4, 6);
                    if two_b {
                        dp_u8i8!(1, 4, 7);
                    }
                } else {
                    dp_bf16!(0, 4, 6);
                    if two_b {
                        dp_bf16!(1, 4, 7);
                    }
                }
                if two_a {
                    load!(5, a1.add(ka), x_row);
                    if INT8 {
                        dp_u8i8!(2, 5, 6);
                        if two_b {
                            dp_u8i8!(3, 5, 7);
                        }
                    } else {
                        dp_bf16!(2, 5, 6);
                        if two_b {
                            dp_bf16!(3, 5, 7);
                        }
                    }
                }
            }
            let stride = NR * 4;
            // Each live accumulator to y directly where it may, else to its scratch tile.
            macro_rules! finish {
                ($t:literal) => {
                    if in_y($t) {
                        store!($t, c_at($t), y_stride);
                    } else if live($t) {
                        store!($t, scratch[$t].as_mut_ptr(), stride);
                    }
                };
            }
            finish!(0);
            finish!(1);
            finish!(2);
            finish!(3);
            for (t, tile) in scratch.iter().enumerate() {
                let (ta, tb) = (t / 2, t % 2);
                if in_y(t) || !live(t) {
                    continue;
                }
                let col0 = (p + tb) * NR;
                let cols = out.saturating_sub(col0).min(NR);
                let r0 = m0 + ta * TILE_ROWS;
                for i in 0..TILE_ROWS.min(rows_real.saturating_sub(r0)) {
                    let acc = _mm512_loadu_ps(tile.as_ptr().add(i * NR));
                    let v = match dq {
                        Some(dq) => {
                            let exact = _mm512_sub_epi32(
                                _mm512_castps_si512(acc),
                                _mm512_mullo_epi32(
                                    _mm512_set1_epi32(*dq.zx.add(r0 + i)),
                                    _mm512_loadu_si512(dq.colsum.add(col0) as *const _),
                                ),
                            );
                            _mm512_mul_ps(
                                _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_loadu_ps(dq.sw.add(col0))),
                                _mm512_set1_ps(*dq.sx.add(r0 + i)),
                            )
                        }
                        None => acc,
                    };
                    store_row_512(&[v], y.add((r0 + i) * ys + col0), cols, accumulate);
                }
            }
            m0 += if two_a { 2 * TILE_ROWS } else { TILE_ROWS };
        }
        p += if two_b { 2 } else { 1 };
    }
}
