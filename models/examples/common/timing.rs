//! Timing shared by the kernel examples (`kernel_sweep`, `products_bench`).

use std::time::Instant;

/// Median microseconds of `reps` calls of `f`, after one warm-up call.
pub fn median_us(reps: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
