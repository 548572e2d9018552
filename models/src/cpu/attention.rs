//! Attention of the inference path on the CPU: for each row, KV head and block of queries,
//! `softmax(q kᵀ / √d) v` computed only over the key ranges some query of the block may see,
//! on the f32 tile kernels.
//!
//! A general batched matmul computes every query against every key and a mask then throws
//! most of it away: in a padding-free batch ([`crate::TokenBatch::with_segments`]) each input
//! sees only the shared prefix and itself, so eight packed inputs waste seven eighths of the
//! products. Here the allowed keys of a block of queries are cut into runs, the products run
//! over those runs only (the query heads that share a KV head stacked as rows of one product),
//! and the output lands directly in `[rows, tokens, heads · head_dim]`, the layout the output
//! projection reads.

use super::f32::{fits, tile};
use super::layout::Prefetch;
use super::Caps;
use rayon::prelude::*;

/// Queries per block: their heads form the rows of one product.
const QUERY_BLOCK: usize = 16;
/// Keys per panel (one vector of f32 lanes).
const KP: usize = 16;

/// Which keys each query may attend to: `allowed[(row · queries + i) · keys + j]`.
#[derive(Debug, Clone)]
pub struct KeyMask {
    pub rows: usize,
    pub queries: usize,
    pub keys: usize,
    pub allowed: Vec<bool>,
}

impl KeyMask {
    fn row(&self, r: usize, i: usize) -> &[bool] {
        let at = (r * self.queries + i) * self.keys;
        &self.allowed[at..at + self.keys]
    }
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `softmax(q kᵀ / √d + mask) v` for `q` `[rows, heads, queries, d]` and `k`, `v`
/// `[rows, kv_heads, keys, d]` (row-major, contiguous); returns `[rows, queries, heads · d]`.
/// A query with no allowed key gets zeros.
///
/// # Panics
/// If the buffers do not have these shapes, or the CPU lacks AVX2/FMA.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], mask: &KeyMask, h: Heads, caps: &Caps) -> Vec<f32> {
    let (b, t, keys, d) = (mask.rows, mask.queries, mask.keys, h.head_dim);
    assert!(caps.avx2, "the attention kernel needs AVX2 and FMA");
    assert!(
        h.kv_heads > 0 && h.heads.is_multiple_of(h.kv_heads),
        "{} heads do not share {} KV heads",
        h.heads,
        h.kv_heads
    );
    assert_eq!(q.len(), b * h.heads * t * d, "q is not [{b}, {}, {t}, {d}]", h.heads);
    assert_eq!(k.len(), b * h.kv_heads * keys * d, "k is not [{b}, {}, {keys}, {d}]", h.kv_heads);
    assert_eq!(v.len(), k.len(), "v and k differ in size");
    assert_eq!(mask.allowed.len(), b * t * keys, "mask is not [{b}, {t}, {keys}]");
    let rep = h.heads / h.kv_heads;
    let mut out = vec![0f32; b * t * h.heads * d];
    if b == 0 || t == 0 || keys == 0 {
        return out;
    }
    let wide = caps.avx512;
    let blocks = t.div_ceil(QUERY_BLOCK);
    let scale = 1.0 / (d as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    // One item per (row, KV head): its keys packed once, then every block of queries.
    (0..b * h.kv_heads).into_par_iter().for_each(|item| {
        let out_ptr = &out_ptr;
        let (r, g) = (item / h.kv_heads, item % h.kv_heads);
        let k_rg = &k[(r * h.kv_heads + g) * keys * d..][..keys * d];
        let v_rg = &v[(r * h.kv_heads + g) * keys * d..][..keys * d];
        // Keys as panels of 16 keys, d-major (`kt[p][c][j] = k[p·16 + j][c]`): the weights of q kᵀ.
        let n_kp = keys.div_ceil(KP);
        let mut kt = vec![0f32; n_kp * d * KP];
        for j in 0..keys {
            let (p, jj) = (j / KP, j % KP);
            for c in 0..d {
                kt[(p * d + c) * KP + jj] = k_rg[j * d + c];
            }
        }
        // v as panels of 16 of its columns, key-major (`vt[p][j][c] = v[j][p·16 + c]`).
        let n_vp = d.div_ceil(KP);
        let mut vt = vec![0f32; n_vp * keys * KP];
        for j in 0..keys {
            for c in 0..d {
                vt[((c / KP) * keys + j) * KP + c % KP] = v_rg[j * d + c];
            }
        }
        let mut qs = Vec::new();
        let mut scores = Vec::new();
        let mut probs = Vec::new();
        let mut mixed = Vec::new();
        for blk in 0..blocks {
            let i0 = blk * QUERY_BLOCK;
            let nq = QUERY_BLOCK.min(t - i0);
            // Keys any query of the block may see, as runs of whole panels.
            let mut any = vec![false; keys];
            for i in i0..i0 + nq {
                for (a, &m) in any.iter_mut().zip(mask.row(r, i)) {
                    *a |= m;
                }
            }
            let panels: Vec<usize> =
                (0..n_kp).filter(|&p| any[p * KP..((p + 1) * KP).min(keys)].iter().any(|&a| a)).collect();
            if panels.is_empty() {
                continue;
            }
            let sel = panels.len() * KP;
            // Rows of the block's product: (query, head of the group), scaled by 1/√d.
            let rows = nq * rep;
            qs.clear();
            for i in i0..i0 + nq {
                for hh in 0..rep {
                    let head = g * rep + hh;
                    let src = &q[((r * h.heads + head) * t + i) * d..][..d];
                    qs.extend(src.iter().map(|x| x * scale));
                }
            }
            scores.clear();
            scores.resize(rows * sel, 0.0);
            // SAFETY: AVX2 (and AVX-512 when `wide`) checked; the tiles read `rows × d` of `qs`,
            // `d × 16` of each key panel and write `rows × 16` of `scores` per panel.
            unsafe {
                panels_product(
                    wide,
                    &qs,
                    rows,
                    d,
                    d,
                    |pi| kt[panels[pi] * d * KP..].as_ptr(),
                    panels.len(),
                    &mut scores,
                    sel,
                    false,
                )
            };
            // Mask, softmax over the selected keys, per row (masked keys get exactly 0).
            probs.clear();
            probs.extend_from_slice(&scores);
            let key_of = |c: usize| panels[c / KP] * KP + c % KP;
            for qi in 0..nq {
                let allowed = mask.row(r, i0 + qi);
                let ok: Vec<bool> = (0..sel).map(|c| key_of(c) < keys && allowed[key_of(c)]).collect();
                if !ok.iter().any(|&o| o) {
                    probs[qi * rep * sel..(qi + 1) * rep * sel].fill(0.0);
                    continue;
                }
                for hh in 0..rep {
                    let row = &mut probs[(qi * rep + hh) * sel..][..sel];
                    for (p, &o) in row.iter_mut().zip(&ok) {
                        if !o {
                            *p = -1e30;
                        }
                    }
                    // SAFETY: AVX2 and FMA checked above.
                    unsafe { crate::fast::softmax_in_place(row) };
                    for (p, &o) in row.iter_mut().zip(&ok) {
                        if !o {
                            *p = 0.0;
                        }
                    }
                }
            }
            // probs · v over the selected keys, panel run by panel run of keys.
            mixed.clear();
            mixed.resize(rows * d, 0.0);
            let mut c0 = 0;
            while c0 < panels.len() {
                // A run of consecutive key panels is one stretch of v's rows.
                let mut c1 = c0 + 1;
                while c1 < panels.len() && panels[c1] == panels[c1 - 1] + 1 {
                    c1 += 1;
                }
                let j0 = panels[c0] * KP;
                let j1 = (panels[c1 - 1] * KP + KP).min(keys);
                let accumulate = c0 > 0;
                // SAFETY: as above; the tiles read `rows × (j1 - j0)` of `probs` (from column
                // `c0 · 16`) and `(j1 - j0) × 16` of each v panel.
                unsafe {
                    panels_product(
                        wide,
                        &probs[c0 * KP..],
                        rows,
                        sel,
                        j1 - j0,
                        |vp| vt[(vp * keys + j0) * KP..].as_ptr(),
                        n_vp,
                        &mut mixed,
                        d,
                        accumulate,
                    )
                };
                c0 = c1;
            }
            for qi in 0..nq {
                let i = i0 + qi;
                for hh in 0..rep {
                    let head = g * rep + hh;
                    let src = &mixed[(qi * rep + hh) * d..][..d];
                    // SAFETY: (r, i, head) is written by this item only.
                    unsafe {
                        let dst = out_ptr.0.add(((r * t + i) * h.heads + head) * d);
                        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, d);
                    }
                }
            }
        }
    });
    out
}

struct SendPtr(*mut f32);
// SAFETY: parallel items write disjoint (row, query, head) slices.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// `y[rows, 0..n·16] (+)= x[rows, 0..kc] · panels`: panel `p` (`kc × 16`, `k`-major) starts
/// at `panel(p)`, `x` rows are `xs` apart and `y` rows `ys`, columns beyond `ys` not written.
///
/// # Safety
/// AVX2 (and AVX-512 when `wide`) present; buffers cover the shapes.
#[allow(clippy::too_many_arguments)]
unsafe fn panels_product(
    wide: bool,
    x: &[f32],
    rows: usize,
    xs: usize,
    kc: usize,
    panel: impl Fn(usize) -> *const f32,
    n: usize,
    y: &mut [f32],
    ys: usize,
    accumulate: bool,
) {
    let r_max = if wide { 12 } else { 6 };
    debug_assert!(fits(wide, r_max, 1));
    let tiles = rows.div_ceil(r_max);
    let r_even = rows.div_ceil(tiles.max(1)).max(1);
    for p in 0..n {
        let w = panel(p);
        let cols = (ys - p * KP).min(KP);
        for row0 in (0..rows).step_by(r_even) {
            let r = r_even.min(rows - row0);
            let f = tile(wide, r, 1);
            f(
                x.as_ptr().add(row0 * xs),
                xs,
                w,
                0,
                kc,
                y.as_mut_ptr().add(row0 * ys + p * KP),
                ys,
                cols,
                accumulate,
                Prefetch::NONE,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tests::values;

    /// The plain definition in f64.
    fn reference(q: &[f32], k: &[f32], v: &[f32], m: &KeyMask, h: Heads) -> Vec<f64> {
        let (b, t, keys, d) = (m.rows, m.queries, m.keys, h.head_dim);
        let rep = h.heads / h.kv_heads;
        let mut out = vec![0f64; b * t * h.heads * d];
        for r in 0..b {
            for head in 0..h.heads {
                let g = head / rep;
                for i in 0..t {
                    let qv = &q[((r * h.heads + head) * t + i) * d..][..d];
                    let allowed = m.row(r, i);
                    let s: Vec<f64> = (0..keys)
                        .map(|j| {
                            let kv = &k[((r * h.kv_heads + g) * keys + j) * d..][..d];
                            qv.iter().zip(kv).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let max = (0..keys).filter(|&j| allowed[j]).map(|j| s[j]).fold(f64::NEG_INFINITY, f64::max);
                    if max == f64::NEG_INFINITY {
                        continue;
                    }
                    let e: Vec<f64> = (0..keys).map(|j| if allowed[j] { (s[j] - max).exp() } else { 0.0 }).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        out[((r * t + i) * h.heads + head) * d + c] =
                            (0..keys).map(|j| e[j] / sum * v[((r * h.kv_heads + g) * keys + j) * d + c] as f64).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn fused_attention_matches_the_definition_for_causal_segmented_and_empty_masks() {
        let caps = Caps::detect();
        if !caps.avx2 {
            return;
        }
        for (wide, name) in [(true, "avx512"), (false, "avx2")] {
            if wide && !caps.avx512 {
                continue;
            }
            let caps = Caps { avx512: wide, ..caps };
            // 2 rows, 6 heads sharing 2 KV heads, 37 queries over 20 cached + 37 new keys.
            let h = Heads { heads: 6, kv_heads: 2, head_dim: 24 };
            let (b, t, past) = (2, 37, 20);
            let keys = past + t;
            let q = values(b * h.heads * t * h.head_dim, 1);
            let k = values(b * h.kv_heads * keys * h.head_dim, 2);
            let v = values(b * h.kv_heads * keys * h.head_dim, 3);
            let mut allowed = vec![false; b * t * keys];
            for r in 0..b {
                for i in 0..t {
                    for j in 0..keys {
                        // Row 0: causal over a prefix with two padded slots. Row 1: two segments
                        // (queries 0..17 and 17..), each seeing the prefix and itself; query 30
                        // sees nothing (its output must be zero).
                        let ok = if r == 0 {
                            (j < past && j != 3 && j != 7) || (j >= past && j - past <= i)
                        } else {
                            let seg = |x: usize| usize::from(x >= 17);
                            i != 30 && (j < past || (j - past <= i && seg(j - past) == seg(i)))
                        };
                        allowed[(r * t + i) * keys + j] = ok;
                    }
                }
            }
            let m = KeyMask { rows: b, queries: t, keys, allowed };
            let got = attention(&q, &k, &v, &m, h, &caps);
            let want = reference(&q, &k, &v, &m, h);
            for (n, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-5, "{name} entry {n}: {g} vs {w}");
            }
            let q30 = ((t + 30) * h.heads) * h.head_dim;
            assert!(got[q30..q30 + h.heads * h.head_dim].iter().all(|&x| x == 0.0));
        }
    }
}
