//! Every kernel family and tile shape this CPU runs, against plain f64 loops.

use super::packed::{bf16_pair, split_rows, units, Kernel, PackedWeight, Precision, Tiling, NR};
use super::{Caps, KernelError};

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

/// Deterministic values in [-1, 1).
pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
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

/// Every tiling of `kernel` worth testing: each tile shape that fits, and for f32 an inner block.
fn tilings(kernel: Kernel) -> Vec<Tiling> {
    if kernel.is_amx() {
        // Whole rows at once, and blocks of 32 rows (several blocks in parallel over the shapes
        // of more than 32 rows).
        let t = Tiling::default_for(kernel);
        return vec![t, Tiling { mc: 32, ..t }];
    }
    let mut v = Vec::new();
    for c in 1..=4u8 {
        for r in 1..=14u8 {
            if kernel.fits(r as usize, c as usize) {
                v.push(Tiling { kernel, rows: r, panels: c, kc: 0, mc: 0 });
            }
        }
    }
    if kernel.blocks_inner() {
        let t = Tiling::default_for(kernel);
        v.push(Tiling { kc: 64, mc: 8, ..t });
        v.push(Tiling { kc: 5, ..t });
    }
    v
}

/// Shapes across every edge: one row, rows around tile heights, ragged columns, inner sizes
/// that are not whole pairs, quads or tiles.
const SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 1), (1, 17, 3), (5, 16, 255), (7, 40, 257), (13, 5, 70), (16, 33, 64), (33, 100, 131), (35, 48, 600)];

fn kernels_here(precision: Precision) -> Vec<Kernel> {
    precision.kernels(&Caps::detect())
}

#[test]
fn f32_kernels_match_f64_loops_for_every_tile_shape() {
    for kernel in kernels_here(Precision::F32) {
        for tiling in tilings(kernel) {
            for &(rows, out, inner) in SHAPES {
                let x = values(rows * inner, rows as u32 * 31 + 1);
                let w = values(out * inner, out as u32 * 7 + 2);
                let y = PackedWeight::pack(&w, out, inner).matmul_t(&x, rows, &tiling);
                let want = reference(&x, &w, rows, out, inner);
                for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (inner as f64).sqrt().max(1.0) * (1.0 + want.abs());
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{tiling} [{rows}, {out}, {inner}] entry {i}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_kernels_give_the_exact_products_of_bf16_rounded_values() {
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&a| half::bf16::from_f32(a).to_f32()).collect() };
    for kernel in kernels_here(Precision::Bf16) {
        for tiling in tilings(kernel) {
            for &(rows, out, inner) in SHAPES {
                let x = values(rows * inner, rows as u32 * 13 + 5);
                let w = values(out * inner, out as u32 * 3 + 9);
                let y = PackedWeight::pack_as(&w, out, inner, Precision::Bf16).matmul_t(&x, rows, &tiling);
                // Products of bf16 values are exact in f32; only the summation order differs.
                // The widening kernel takes the inputs unrounded (bf16 weights alone).
                let xr = if kernel.widens() { x.clone() } else { round(&x) };
                let want = reference(&xr, &round(&w), rows, out, inner);
                let full = reference(&x, &w, rows, out, inner);
                for (i, ((&got, &want), &full)) in y.iter().zip(&want).zip(&full).enumerate() {
                    let tol = 1e-5 * (inner as f64).sqrt().max(1.0) * (1.0 + want.abs());
                    assert!((got as f64 - want).abs() <= tol, "{tiling} [{rows}, {out}, {inner}] {i}: {got} vs {want}");
                    let bound = 2f64.powi(-7) * (inner as f64).sqrt() + 1e-6;
                    assert!(
                        (got as f64 - full).abs() <= bound,
                        "{tiling} [{rows}, {out}, {inner}] {i}: {got} vs f32 {full}"
                    );
                }
            }
        }
    }
}

/// One int8 matrix as defined (per output row, `sw = max |w| / 127`, round to nearest): the
/// codes and scale of each row.
fn int8_codes(w: &[f32], out: usize, inner: usize) -> Vec<(Vec<i64>, f32)> {
    w.chunks(inner)
        .take(out)
        .map(|row| {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let sw = if max > 0.0 { max / 127.0 } else { 1.0 };
            let inv = 1.0 / sw;
            (row.iter().map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i64).collect(), sw)
        })
        .collect()
}

/// The int8 weights as defined: the weight's codes, then its rounding error's (computed in
/// f32, `w - q₁ s₁`), as codes per row; and `Ŵ = q₁ s₁ + q₂ s₂` with the residual `q₂ s₂` in f64.
#[allow(clippy::type_complexity)]
fn int8_weights(w: &[f32], out: usize, inner: usize) -> ([Vec<(Vec<i64>, f32)>; 2], Vec<f64>, Vec<f64>) {
    let first = int8_codes(w, out, inner);
    let error: Vec<f32> = first
        .iter()
        .zip(w.chunks(inner))
        .flat_map(|((q, s), row)| q.iter().zip(row).map(move |(&q, &v)| v - q as f32 * s))
        .collect();
    let second = int8_codes(&error, out, inner);
    let deq = |codes: &[(Vec<i64>, f32)]| -> Vec<f64> {
        codes.iter().flat_map(|(q, s)| q.iter().map(move |&q| q as f64 * *s as f64)).collect()
    };
    let residual = deq(&second);
    let wq = deq(&first).iter().zip(&residual).map(|(a, b)| a + b).collect();
    ([first, second], wq, residual)
}

/// The int8 product as defined, in f64 from the codes: both input passes times the weight's
/// codes, and the first pass times the residual's, `Σ sx sw (Σ q w - zx Σ w)`.
fn int8_reference(x: &[f32], w: &[f32], rows: usize, out: usize, inner: usize) -> Vec<f64> {
    let u = units(Precision::Int8, inner);
    let q = split_rows(x, rows, inner, u);
    let codes: Vec<u8> = q.codes.iter().flat_map(|l| l.to_le_bytes()).collect();
    let ([first, second], _, _) = int8_weights(w, out, inner);
    let mut y = vec![0f64; rows * out];
    for (matrix, passes) in [(&first, 2 * rows), (&second, rows)] {
        for (o, (wq, sw)) in matrix.iter().enumerate() {
            let colsum: i64 = wq.iter().sum();
            for r in 0..passes {
                let dot: i64 = (0..inner).map(|k| codes[r * u * 4 + k] as i64 * wq[k]).sum();
                y[(r % rows) * out + o] += q.scale[r] as f64 * *sw as f64 * (dot - q.zero[r] as i64 * colsum) as f64;
            }
        }
    }
    y
}

#[test]
fn int8_weights_with_their_residual_are_within_a_64000th_of_each_rows_peak() {
    let (out, inner) = (37, 300);
    let w = values(out * inner, 7);
    let packed = PackedWeight::pack_as(&w, out, inner, Precision::Int8);
    let got = packed.unpack();
    let (_, want, _) = int8_weights(&w, out, inner);
    for (o, row) in w.chunks(inner).enumerate() {
        let peak = row.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        for (k, &x) in row.iter().enumerate() {
            let i = o * inner + k;
            assert!((got[i] as f64 - want[i]).abs() <= 1e-6 * peak, "[{o}, {k}]: {} vs {}", got[i], want[i]);
            // One int8 matrix is within s₁ / 2 = peak / 254; its residual's step is at most
            // s₁ / 254, so the two are within peak / (127 · 508).
            let bound = peak / (127.0 * 508.0) * (1.0 + 1e-3);
            assert!((got[i] - x).abs() as f64 <= bound, "[{o}, {k}]: {} vs {x} (bound {bound})", got[i]);
        }
    }
}

#[test]
fn int8_kernels_compute_the_quantized_product_exactly_and_agree_bit_for_bit() {
    let kernels = kernels_here(Precision::Int8);
    for &(rows, out, inner) in SHAPES {
        let x = values(rows * inner, rows as u32 * 17 + 3);
        let w = values(out * inner, out as u32 * 5 + 11);
        let packed = PackedWeight::pack_as(&w, out, inner, Precision::Int8);
        let want = int8_reference(&x, &w, rows, out, inner);
        let full = reference(&x, &w, rows, out, inner);
        // With two input passes the product is the int8 weights' on the input within the second
        // pass's rounding: one pass leaves errors within ±s₁/2, whose step is s₂ ≤ s₁ / 255, so
        // |x - x̂| ≤ s₁ / 510 per value; the residual R is taken on the first pass x̂₁ only, so
        // y - x Ŵᵀ = (x̂ - x) Ŵᵀ - x̂₂ Rᵀ, within s₁ / 510 · Σ |Ŵ| + s₁ (1/2 + 1/510) Σ |R|.
        let (_, wq, residual) = int8_weights(&w, out, inner);
        let q = split_rows(&x, rows, inner, units(Precision::Int8, inner));
        let mut first: Option<(Tiling, Vec<f32>)> = None;
        for &kernel in &kernels {
            for tiling in tilings(kernel) {
                let y = packed.matmul_t(&x, rows, &tiling);
                for (i, ((&got, &want), &full)) in y.iter().zip(&want).zip(&full).enumerate() {
                    // The i32 sum is exact; only its conversion and the two scalings round.
                    assert!(
                        (got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "{tiling} [{rows}, {out}, {inner}] {i}: {got} vs {want}"
                    );
                    let (r, o) = (i / out, i % out);
                    let xw: f64 = (0..inner).map(|k| x[r * inner + k] as f64 * wq[o * inner + k]).sum();
                    let abs_w: f64 = (0..inner).map(|k| wq[o * inner + k].abs()).sum();
                    let abs_r: f64 = (0..inner).map(|k| residual[o * inner + k].abs()).sum();
                    let s1 = q.scale[r] as f64;
                    let bound = (s1 / 510.0 * abs_w + s1 * (0.5 + 1.0 / 510.0) * abs_r) * (1.0 + 1e-3)
                        + 1e-5 * (1.0 + xw.abs());
                    assert!(
                        (got as f64 - xw).abs() <= bound,
                        "{tiling} [{rows}, {out}, {inner}] {i}: {got} vs x Ŵᵀ {xw} (bound {bound})"
                    );
                    // And against the f32 product, the weights' part (within peak / 64,516 each).
                    let peak = w[o * inner..(o + 1) * inner].iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    let abs_x: f64 = x[r * inner..(r + 1) * inner].iter().map(|v| v.abs() as f64).sum();
                    let bound = bound + abs_x * peak / (127.0 * 508.0) * (1.0 + 1e-3);
                    assert!(
                        (got as f64 - full).abs() <= bound,
                        "{tiling} [{rows}, {out}, {inner}] {i}: {got} vs f32 {full} (bound {bound})"
                    );
                }
                match &first {
                    None => first = Some((tiling, y)),
                    Some((t0, y0)) => {
                        let same = y0.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "[{rows}, {out}, {inner}]: {tiling} differs from {t0}");
                    }
                }
            }
        }
    }
}

#[test]
fn accumulating_adds_to_the_output_and_transposed_packing_multiplies_by_w() {
    let (rows, out, inner) = (9, 37, 70);
    let x = values(rows * inner, 1);
    let w = values(out * inner, 2);
    let caps = Caps::detect();
    for precision in [Precision::F32, Precision::Bf16, Precision::Int8] {
        for kernel in precision.kernels(&caps) {
            let t = Tiling::default_for(kernel);
            let packed = PackedWeight::pack_as(&w, out, inner, precision);
            let once = packed.matmul_t(&x, rows, &t);
            let mut y = vec![0.5f32; rows * out];
            packed.matmul_t_into(&x, rows, &mut y, true, &t);
            for (a, b) in y.iter().zip(&once) {
                assert!((a - (b + 0.5)).abs() < 1e-5, "{t}: accumulate gave {a}, want {}", b + 0.5);
            }
        }
    }
    // g W with W packed transposed: `[rows, out] x [out, inner]`.
    if let Some(&kernel) = Precision::F32.kernels(&caps).first() {
        let g = values(rows * out, 3);
        let y = PackedWeight::pack_transposed(&w, out, inner).matmul_t(&g, rows, &Tiling::default_for(kernel));
        for r in 0..rows {
            for k in 0..inner {
                let want: f64 = (0..out).map(|o| g[r * out + o] as f64 * w[o * inner + k] as f64).sum();
                assert!((y[r * inner + k] as f64 - want).abs() < 1e-4, "g W [{r}, {k}]");
            }
        }
    }
}

#[test]
fn selected_outputs_give_exactly_those_columns_of_the_full_product() {
    let (rows, out, inner) = (5, 70, 37);
    let x = values(rows * inner, 4);
    let w = values(out * inner, 5);
    let cols = [69, 0, 17, 16, 33];
    let caps = Caps::detect();
    for precision in [Precision::F32, Precision::Bf16, Precision::Int8] {
        let Some(&kernel) = precision.kernels(&caps).first() else { continue };
        let t = Tiling::default_for(kernel);
        let packed = PackedWeight::pack_as(&w, out, inner, precision);
        let full = packed.matmul_t(&x, rows, &t);
        let sub = packed.select_outputs(&cols).matmul_t(&x, rows, &t);
        for r in 0..rows {
            for (n, &c) in cols.iter().enumerate() {
                assert_eq!(sub[r * cols.len() + n].to_bits(), full[r * out + c].to_bits(), "{precision} [{r}, {c}]");
            }
        }
    }
}

#[test]
fn unpacking_gives_the_values_the_kernels_multiply() {
    let (out, inner) = (21, 13);
    let w = values(out * inner, 8);
    let x: Vec<f32> = (0..inner).map(|k| if k == 5 { 1.0 } else { 0.0 }).collect();
    assert_eq!(PackedWeight::pack(&w, out, inner).unpack(), w, "f32 panels are exact");
    let caps = Caps::detect();
    for precision in [Precision::Bf16, Precision::Int8] {
        let packed = PackedWeight::pack_as(&w, out, inner, precision);
        let back = packed.unpack();
        for (a, b) in back.iter().zip(&w) {
            assert!((a - b).abs() <= 0.01, "{precision}: {a} vs {b}");
        }
        // Repacking the unpacked values changes nothing (what merging an adapter relies on).
        let again = PackedWeight::pack_as(&back, out, inner, precision);
        assert_eq!(again.unpack(), back, "{precision}: repacking moved values");
        if let Some(&k) = precision.kernels(&caps).first() {
            // A one-hot input reads column 5 of the weights the kernel holds (bf16 exactly; int8
            // up to its input quantization, exact for 0 and 1).
            let y = packed.matmul_t(&x, 1, &Tiling::default_for(k));
            for o in 0..out {
                assert!((y[o] - back[o * inner + 5]).abs() < 1e-6, "{precision} output {o}");
            }
        }
    }
}

#[test]
fn input_quantization_maps_each_row_range_onto_u8_with_zero_exact_then_its_error() {
    let x = vec![-1.0f32, 0.0, 0.5, 3.0, /* a constant row */ 2.0, 2.0, 2.0, 2.0];
    let q = split_rows(&x, 2, 4, 16);
    let codes: Vec<u8> = q.codes.iter().flat_map(|l| l.to_le_bytes()).collect();
    // Row 0: range [-1, 3] onto 0..255, scale 4/255, zero point 64 (0 maps to 64 exactly).
    assert!((q.scale[0] - 4.0 / 255.0).abs() < 1e-7);
    assert_eq!(q.zero[0], 64);
    assert_eq!(&codes[..4], &[0, 64, 96, 255]);
    // Row 1: all values 2 (range [0, 2] since 0 is always in range): 2 maps to 255, zero at 0.
    assert_eq!(q.zero[1], 0);
    assert_eq!(&codes[64..68], &[255; 4]);
    // Padded quads stay zero.
    assert!(codes[4..64].iter().all(|&c| c == 0));
    // The second pass (rows 2 and 3) holds each row's rounding error: row 0's values were off by
    // [-1 - s(0 - 64), 0, 0.5 - s(96 - 64), 3 - s(255 - 64)] = [0.00392, 0, -0.00196, 0.00392]...
    let s = 4.0f64 / 255.0;
    let error = [-1.0 + s * 64.0, 0.0, 0.5 - s * 32.0, 3.0 - s * 191.0];
    let (lo, hi) = (error.iter().fold(0f64, |a, &b| a.min(b)), error.iter().fold(0f64, |a, &b| a.max(b)));
    assert!((q.scale[2] as f64 - (hi - lo) / 255.0).abs() < 1e-9, "{} vs {}", q.scale[2], (hi - lo) / 255.0);
    // ...and the two passes together give every value within half the second pass's step.
    for (i, &v) in x.iter().enumerate() {
        let (r, k) = (i / 4, i % 4);
        let pass = |r: usize| q.scale[r] as f64 * (codes[r * 64 + k] as f64 - q.zero[r] as f64);
        let back = pass(r) + pass(r + 2);
        assert!((back - v as f64).abs() <= q.scale[r + 2] as f64 * 0.5 + 1e-9, "{i}: {back} vs {v}");
    }
    // The bf16 pair rounding is nearest-even.
    assert_eq!(bf16_pair(1.0 + 2f32.powi(-8), 1.0) & 0xffff, 0x3f80);
    assert_eq!(NR, 16);
}

#[test]
fn the_paths_this_cpu_runs_are_listed() {
    // Printed (`cargo test -- --show-output`) so a test log says which ISA paths ran here.
    let caps = Caps::detect();
    for precision in [Precision::F32, Precision::Bf16, Precision::Int8] {
        let kernels: Vec<String> = precision.kernels(&caps).iter().map(|k| k.to_string()).collect();
        println!("kernel paths tested on {}: {precision}: {}", super::caps::cpu_model(), kernels.join(", "));
    }
    // A CPU with AVX2 always has the f32 path; a refusal names what is missing.
    if caps.avx2 {
        assert!(!Precision::F32.kernels(&caps).is_empty());
    }
    assert!(Precision::Int8.check(&Caps::none()).unwrap_err().to_string().contains("VNNI"));
    assert!(matches!(
        Precision::Bf16.check(&Caps::none()),
        Err(KernelError::Unsupported { precision: Precision::Bf16, needs: "AVX2 and FMA, or AMX", .. })
    ));
}
