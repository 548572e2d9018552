//! The packed small-batch GEMM (`models::packed`, f32 and bf16 panels) against candle's general GEMM on the
//! projection shapes of SmolLM2-135M and Qwen2.5-0.5B, at several row counts: median time and
//! GFLOP/s of each, side by side in one run.
//!
//! ```text
//! cargo run --release -p models --example packed_bench [-- --rows 1,8,16,52,128,256] [--model qwen0.5b]
//! VERDICT_AVX512=0 cargo run ...   # the AVX2 f32 kernel on an AVX-512 CPU
//! ```

use candle_core::{Device, Tensor};
use models::packed::{self, PackedWeight};
use std::time::Instant;

fn median_us(f: &mut dyn FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..21)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let mut rows = vec![1usize, 8, 16, 52, 128, 256];
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rows") {
        rows = args[i + 1].split(',').map(|r| r.parse().expect("--rows takes numbers")).collect();
    }
    // `--model qwen0.5b`: that model's shapes only.
    let only = args.iter().position(|a| a == "--model").map(|i| args[i + 1].clone());
    if !packed::supported() {
        println!("this CPU has no AVX2/FMA: the packed kernel is not used");
        return Ok(());
    }
    println!(
        "threads: {}, f32 kernel: {}",
        rayon::current_num_threads(),
        if packed::avx512_f32() { "AVX-512" } else { "AVX2" }
    );
    let bf16 = packed::bf16_supported();
    println!(
        "| model | projection | rows | out | in | candle us | GFLOP/s | packed f32 us | GFLOP/s | speed-up | packed bf16 us | GFLOP/s | speed-up |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let shapes = [
        ("smollm2", "q/o", 576, 576),
        ("smollm2", "k/v", 192, 576),
        ("smollm2", "gate/up", 1536, 576),
        ("smollm2", "down", 576, 1536),
        ("qwen0.5b", "q/o", 896, 896),
        ("qwen0.5b", "k/v", 128, 896),
        ("qwen0.5b", "gate/up", 4864, 896),
        ("qwen0.5b", "down", 896, 4864),
        ("smollm2", "lm_head", 49152, 576),
        ("qwen0.5b", "lm_head", 151936, 896),
    ];
    for &m in &rows {
        for &(model, name, out, inner) in shapes.iter().filter(|s| only.as_ref().is_none_or(|o| o == s.0)) {
            let d = Device::Cpu;
            let x = Tensor::randn(0f32, 1.0, (m, inner), &d)?;
            let w = Tensor::randn(0f32, 1.0, (out, inner), &d)?;
            let p = PackedWeight::pack(&w.flatten_all()?.to_vec1::<f32>()?, out, inner);
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let a = median_us(&mut || {
                x.matmul(&w.t().unwrap()).unwrap();
            });
            let b = median_us(&mut || {
                std::hint::black_box(p.matmul_t(&xv, m));
            });
            let gf = |us: f64| 2.0 * (m * out * inner) as f64 / us / 1e3;
            let c = if bf16 {
                let pb = PackedWeight::pack_as(&w.flatten_all()?.to_vec1::<f32>()?, out, inner, packed::Format::Bf16);
                let c = median_us(&mut || {
                    std::hint::black_box(pb.matmul_t(&xv, m));
                });
                format!("{c:.1} | {:.1} | {:.2}x", gf(c), a / c)
            } else {
                "- | - | -".to_string()
            };
            println!(
                "| {model} | {name} | {m} | {out} | {inner} | {a:.1} | {:.1} | {b:.1} | {:.1} | {:.2}x | {c} |",
                gf(a),
                gf(b),
                a / b
            );
        }
    }
    Ok(())
}
