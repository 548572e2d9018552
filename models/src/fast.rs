//! Vectorised f32 kernels for the inference path on x86-64 CPUs with AVX2 and FMA: SwiGLU
//! (`silu(gate) · up` in one pass), the softmax over the last dimension, and log-probabilities
//! of chosen tokens read straight from a logits tensor ([`pick_log_probs`]).
//!
//! candle computes `silu` and the softmax's exponentials with the scalar `expf`, element by
//! element, and `silu(gate) · up` as two passes: on SmolLM2 that was 16 ms of a 180 ms request
//! (docs/benchmarks.md). [`exp8`] evaluates eight exponentials at once: `2ⁿ · p(r)` with
//! `n = round(x / ln 2)`, `r = x - n ln 2` (ln 2 split in two for exactness) and `p` the degree-6
//! Taylor polynomial of `eʳ` on `|r| ≤ ln 2 / 2`, within 3e-7 relative of `exp` (about 2.5 ulp; tested below).
//! Other dtypes, devices and CPUs take candle's ops.

use crate::cpu::CpuKernels;
use candle_core::{CpuStorage, DType, Result, Storage, Tensor};

/// Whether the kernels run with `kernels`: x86-64 with AVX2 and FMA, our kernels enabled.
fn enabled(kernels: &CpuKernels) -> bool {
    kernels.enabled()
}

/// Runs `f` on the f32 values of a CPU tensor, made contiguous if needed; an error for any
/// other dtype or device.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(f(&v[layout.start_offset()..][..t.elem_count()])),
        _ => candle_core::bail!("the fused CPU kernels need f32 tensors on the CPU, not {:?}", t.dtype()),
    }
}

/// The f32 values of a CPU tensor, made contiguous, if it is one.
fn cpu_f32(t: &Tensor) -> Result<Option<Vec<f32>>> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return Ok(None);
    }
    with_f32(t, |v| Some(v.to_vec()))
}

/// `silu(gate) · up`, elementwise (same shapes); `None` where the kernels do not apply.
pub fn swiglu(gate: &Tensor, up: &Tensor, kernels: &CpuKernels) -> Result<Option<Tensor>> {
    if !enabled(kernels) || gate.shape() != up.shape() {
        return Ok(None);
    }
    let (Some(mut g), Some(u)) = (cpu_f32(gate)?, cpu_f32(up)?) else { return Ok(None) };
    // SAFETY: `enabled` checked AVX2 and FMA.
    unsafe { swiglu_in_place(&mut g, &u) };
    Ok(Some(Tensor::from_vec(g, gate.shape(), gate.device())?))
}

/// Softmax over the last dimension; `None` where the kernels do not apply.
pub fn softmax_last_dim(x: &Tensor, kernels: &CpuKernels) -> Result<Option<Tensor>> {
    if !enabled(kernels) {
        return Ok(None);
    }
    let Some(mut v) = cpu_f32(x)? else { return Ok(None) };
    let width = x.dim(candle_core::D::Minus1)?;
    if width == 0 {
        return Ok(None);
    }
    for row in v.chunks_mut(width) {
        // SAFETY: `enabled` checked AVX2 and FMA.
        unsafe { softmax_in_place(row) };
    }
    Ok(Some(Tensor::from_vec(v, x.shape(), x.device())?))
}

/// `log_softmax(logits[rows[n]])[tokens[n]]` for each `n`, read from a `[rows, vocab]` CPU f32
/// tensor in place: one pass per distinct row for its log-sum-exp, no copies of the rows (the
/// generic path, a log-softmax then a gather, makes four vocabulary-wide temporaries per row:
/// on SmolLM2's 49,152 words and a two-answer `mr` prompt, 8.6 MiB that the allocator then keeps
/// resident). `None` where the kernels do not apply; `Err` for a row or token outside the tensor.
pub fn pick_log_probs(
    logits: &Tensor,
    rows: &[usize],
    tokens: &[u32],
    kernels: &CpuKernels,
) -> Result<Option<Vec<f64>>> {
    if !enabled(kernels) || !logits.device().is_cpu() || logits.dtype() != DType::F32 || logits.rank() != 2 {
        return Ok(None);
    }
    let (n, vocab) = logits.dims2()?;
    if rows.len() != tokens.len() {
        candle_core::bail!("pick_log_probs: {} rows for {} tokens", rows.len(), tokens.len())
    }
    if let Some((r, t)) = rows.iter().zip(tokens).find(|&(&r, &t)| r >= n || t as usize >= vocab) {
        candle_core::bail!("pick_log_probs: row {r}, token {t} outside logits of {n} x {vocab}")
    }
    let mut lse: Vec<Option<f64>> = vec![None; n];
    with_f32(logits, |v| {
        Some(
            rows.iter()
                .zip(tokens)
                .map(|(&r, &t)| {
                    let row = &v[r * vocab..][..vocab];
                    // SAFETY: `enabled` checked AVX2 and FMA.
                    let l = *lse[r].get_or_insert_with(|| unsafe { log_sum_exp(row) });
                    f64::from(row[t as usize]) - l
                })
                .collect(),
        )
    })
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `eˣ` for eight lanes; inputs are clamped to [-87.3, 88.3], the range of normal f32 results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3)), _mm256_set1_ps(88.3));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    // r = x - n ln2, with ln2 = 0.693359375 + (-2.12194440e-4) (the first part exact in f32).
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    // 2ⁿ: n + 127 in the exponent bits (n ∈ [-126, 127] after the clamp).
    let e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_in_place(g: &mut [f32], u: &[f32]) {
    let n = g.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    for i in (0..n).step_by(8) {
        let gv = _mm256_loadu_ps(g.as_ptr().add(i));
        let uv = _mm256_loadu_ps(u.as_ptr().add(i));
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        let silu = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(g.as_mut_ptr().add(i), _mm256_mul_ps(silu, uv));
    }
    for i in n..g.len() {
        g[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn swiglu_in_place(_: &mut [f32], _: &[f32]) {
    unreachable!("the fast kernels are x86-64 only")
}

/// Softmax of one row in place (eight-lane `exp`).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn softmax_in_place(row: &mut [f32]) {
    let n = row.len() / 8 * 8;
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row.as_ptr().add(i)), m));
        _mm256_storeu_ps(row.as_mut_ptr().add(i), e);
        sum = _mm256_add_ps(sum, e);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut total: f32 = lanes.iter().sum();
    for v in &mut row[n..] {
        *v = (*v - max).exp();
        total += *v;
    }
    let inv = _mm256_set1_ps(1.0 / total);
    for i in (0..n).step_by(8) {
        _mm256_storeu_ps(row.as_mut_ptr().add(i), _mm256_mul_ps(_mm256_loadu_ps(row.as_ptr().add(i)), inv));
    }
    for v in &mut row[n..] {
        *v /= total;
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn softmax_in_place(_: &mut [f32]) {
    unreachable!("the fast kernels are x86-64 only")
}

/// `ln Σ eˣ` over a row (eight-lane `exp` of `x - max`, summed in f32 lanes, the total in f64).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f64::from(max);
    }
    let n = row.len() / 8 * 8;
    let m = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        sum = _mm256_add_ps(sum, exp8(_mm256_sub_ps(_mm256_loadu_ps(row.as_ptr().add(i)), m)));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut total: f64 = lanes.iter().map(|&x| f64::from(x)).sum();
    for &x in &row[n..] {
        total += f64::from((x - max).exp());
    }
    f64::from(max) + total.ln()
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn log_sum_exp(_: &[f32]) -> f64 {
    unreachable!("the fast kernels are x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp8_is_within_3e_7_of_exp_over_the_useful_range() {
        if !enabled(&CpuKernels::auto()) {
            return;
        }
        let xs: Vec<f32> = (0..20_000).map(|i| -87.0 + i as f32 * (87.0 + 88.0) / 20_000.0).collect();
        for chunk in xs.chunks(8) {
            let mut out = [0f32; 8];
            // SAFETY: `enabled` checked AVX2 and FMA.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(chunk.as_ptr()))) };
            for (&x, &y) in chunk.iter().zip(&out) {
                let want = (x as f64).exp();
                let rel = ((y as f64) - want).abs() / want;
                assert!(rel < 3e-7, "exp({x}) = {y}, want {want} (relative error {rel:e})");
            }
        }
    }

    #[test]
    fn picked_log_probs_match_a_log_softmax_in_f64() {
        let k = CpuKernels::auto();
        if !enabled(&k) {
            return;
        }
        let d = Device::Cpu;
        // 5 rows of 1,003 logits (whole vectors and a tail), magnitudes up to 40; one row all
        // -1e9 (masked) but for one entry.
        let mut x = (Tensor::randn(0f32, 1.0, (5, 1003), &d).unwrap() * 10.0).unwrap().to_vec2::<f32>().unwrap();
        x[3].iter_mut().for_each(|v| *v = -1e9);
        x[3][500] = 2.0;
        let t = Tensor::new(x.clone(), &d).unwrap();
        let rows = [0usize, 0, 2, 3, 3, 4, 1];
        let toks = [0u32, 1002, 17, 500, 3, 999, 640];
        let got = pick_log_probs(&t, &rows, &toks, &k).unwrap().expect("the kernel applies to CPU f32");
        for ((&r, &tok), g) in rows.iter().zip(&toks).zip(&got) {
            let row: Vec<f64> = x[r].iter().map(|&v| f64::from(v)).collect();
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            let want = row[tok as usize] - lse;
            assert!((g - want).abs() < 1e-5 * want.abs().max(1.0), "row {r} token {tok}: {g}, want {want}");
        }
        assert!(pick_log_probs(&t, &[5], &[0], &k).is_err(), "a row outside the logits");
        assert!(pick_log_probs(&t, &[0], &[1003], &k).is_err(), "a token outside the vocabulary");
    }

    #[test]
    fn swiglu_and_softmax_match_candle() {
        let k = CpuKernels::auto();
        if !enabled(&k) {
            return;
        }
        let d = Device::Cpu;
        // 1003 values: whole vectors and a tail; magnitudes up to 30.
        let g = (Tensor::randn(0f32, 1.0, (17, 59), &d).unwrap() * 10.0).unwrap();
        let u = Tensor::randn(0f32, 1.0, (17, 59), &d).unwrap();
        let want = (g.silu().unwrap() * &u).unwrap();
        let got = swiglu(&g, &u, &k).unwrap().expect("the kernel applies to CPU f32");
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "swiglu differs from candle by {diff}");

        let mut x = (Tensor::randn(0f32, 1.0, (3, 5, 131), &d).unwrap() * 8.0).unwrap();
        // Fully masked rows, as padding queries can have: -1e9 everywhere.
        let masked = Tensor::full(-1e9f32, (1, 5, 131), &d).unwrap();
        x = Tensor::cat(&[&x, &masked], 0).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let got = softmax_last_dim(&x, &k).unwrap().expect("the kernel applies to CPU f32");
        let diff = (&got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "softmax differs from candle by {diff}");
        let sums = got.sum(candle_core::D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "rows sum to {sums:?}");
    }
}
