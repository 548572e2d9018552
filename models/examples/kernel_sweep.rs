//! Sweeps every tiling of every kernel this CPU runs over the projection shapes of SmolLM2-135M
//! and Qwen2.5-0.5B at chosen row counts, and prints each kernel's best tilings (median of 11
//! calls, 2 threads unless RAYON_NUM_THREADS says otherwise).
//!
//! ```text
//! cargo run --release -p models --example kernel_sweep -- --rows 35,128 --model qwen0.5b
//! ```
use models::cpu::{Caps, PackedWeight, Precision, Tiling};
#[path = "common/timing.rs"]
mod timing;
use timing::median_us;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let rows: Vec<usize> =
        arg("--rows").unwrap_or("1,8,35,128,512".into()).split(',').map(|r| r.parse().unwrap()).collect();
    let only = arg("--model");
    let precisions: Vec<Precision> =
        arg("--precision").unwrap_or("f32,bf16,int8".into()).split(',').map(|p| p.parse().unwrap()).collect();
    let shapes = [
        ("smollm2", "q/o", 576, 576),
        ("smollm2", "k/v", 192, 576),
        ("smollm2", "gate/up", 1536, 576),
        ("smollm2", "down", 576, 1536),
        ("qwen0.5b", "q/o", 896, 896),
        ("qwen0.5b", "k/v", 128, 896),
        ("qwen0.5b", "gate/up", 4864, 896),
        ("qwen0.5b", "down", 896, 4864),
    ];
    let caps = Caps::detect();
    println!("{} | {}", models::cpu::caps::cpu_model(), caps.describe());
    for &m in &rows {
        for &(model, name, out, inner) in shapes.iter().filter(|s| only.as_ref().is_none_or(|o| o == s.0)) {
            let x: Vec<f32> = (0..m * inner).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let w: Vec<f32> = (0..out * inner).map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0).collect();
            let gf = |us: f64| 2.0 * (m * out * inner) as f64 / us / 1e3;
            for &p in &precisions {
                let packed = PackedWeight::pack_as(&w, out, inner, p);
                for kernel in p.kernels(&caps) {
                    let mut res = Vec::new();
                    let cands: Vec<Tiling> = if kernel.is_amx() {
                        vec![Tiling::default_for(kernel)]
                    } else {
                        let mut v = Vec::new();
                        for c in 1..=4u8 {
                            for r in 1..=14u8 {
                                if kernel.fits(r as usize, c as usize)
                                    && (r as usize) <= m.max(1)
                                    && r >= 2.min(m as u8)
                                {
                                    for kc in [0u16, 128, 256, 512] {
                                        if kc > 0 && (p != Precision::F32 || kc as usize >= inner) {
                                            continue;
                                        }
                                        for mc in [0u16, 64, 256] {
                                            if mc > 0 && mc as usize >= m {
                                                continue;
                                            }
                                            v.push(Tiling { kernel, rows: r, panels: c, kc, mc });
                                        }
                                    }
                                }
                            }
                        }
                        v
                    };
                    for t in cands {
                        let mut y = vec![0f32; m * out];
                        let us = median_us(11, &mut || packed.matmul_t_into(&x, m, &mut y, false, &t));
                        res.push((us, t));
                    }
                    res.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let top: Vec<String> = res.iter().take(4).map(|(us, t)| format!("{t} {:.0}", gf(*us))).collect();
                    println!("{m:5} {model:9} {name:8} {kernel:16} best GFLOP/s: {}", top.join(" | "));
                }
            }
        }
    }
}
