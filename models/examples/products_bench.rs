//! Dense products at the serving and training shapes of SmolLM2-135M and Qwen2.5-0.5B: for each
//! precision this CPU runs, the GFLOP/s of the tiling the kernel plan chooses (measured now or
//! read from this CPU's cached plan), beside candle's f32 GEMM; forward shapes and the
//! transposed shapes of input gradients alike. One JSON line per (shape, rows) with `--json`,
//! else a markdown table. `scripts/bench_side_by_side.sh` puts PyTorch's rates beside them.
//!
//! ```text
//! cargo run --release -p models --example products_bench -- --rows 1,8,35,64,128,512,2048 [--json]
//! ```
use candle_core::{Device, Tensor};
use models::cpu::{KernelArgs, PackedWeight, Precision, Purpose};
#[path = "common/timing.rs"]
mod timing;
use timing::median_us;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let rows: Vec<usize> = arg("--rows")
        .unwrap_or("1,8,35,64,128,512,2048".into())
        .split(',')
        .map(|r| r.parse())
        .collect::<Result<_, _>>()?;
    let json = args.iter().any(|a| a == "--json");
    let only = arg("--model");
    // Forward shapes (out, inner) of each model's projections; each also transposed (the input gradient).
    let models = [
        ("smollm2", vec![("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536)]),
        ("qwen0.5b", vec![("q/o", 896, 896), ("k/v", 128, 896), ("gate/up", 4864, 896), ("down", 896, 4864)]),
    ];
    let mut shapes = Vec::new();
    for (model, list) in &models {
        if only.as_ref().is_some_and(|o| o != model) {
            continue;
        }
        for &(name, out, inner) in list {
            shapes.push((*model, name.to_string(), out, inner));
            shapes.push((*model, format!("{name} grad"), inner, out));
        }
    }
    let mut shape_list: Vec<(usize, usize, usize)> = shapes.iter().map(|s| (s.2, s.3, 1)).collect();
    shape_list.sort();
    shape_list.dedup();
    let cache = std::env::var("VERDICT_CACHE_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| std::env::temp_dir().join("verdict-products-bench"));
    let mut per_precision = Vec::new();
    for p in [Precision::F32, Precision::Bf16, Precision::Int8] {
        let kargs = KernelArgs { cpu_matmul: models::cpu::PrecisionChoice::Fixed(p), ..Default::default() };
        match kargs.resolve(&shape_list, Purpose::Train, &cache, &mut |l| eprintln!("{l}")) {
            Ok(k) => per_precision.push(k),
            Err(e) => eprintln!("{p}: {e}"),
        }
    }
    if !json {
        println!("CPU: {}", models::cpu::caps::cpu_model());
        let heads: Vec<String> = per_precision.iter().map(|k| format!("{} GFLOP/s (tiling)", k.precision)).collect();
        println!("| model | product | rows | out | in | candle f32 GFLOP/s | {} |", heads.join(" | "));
        println!("|---|---|---:|---:|---:|---:|{}", "---|".repeat(heads.len()));
    }
    for &m in &rows {
        for (model, name, out, inner) in &shapes {
            let (out, inner) = (*out, *inner);
            let flops = 2.0 * (m * out * inner) as f64;
            let reps = if flops > 5e9 { 5 } else { 11 };
            let gf = |us: f64| flops / us / 1e3;
            let x: Vec<f32> = (0..m * inner).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let w: Vec<f32> = (0..out * inner).map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0).collect();
            let xt = Tensor::from_vec(x.clone(), (m, inner), &Device::Cpu)?;
            let wt = Tensor::from_vec(w.clone(), (out, inner), &Device::Cpu)?.t()?;
            let candle = gf(median_us(reps, &mut || {
                std::hint::black_box(xt.matmul(&wt).unwrap());
            }));
            let mut cells = Vec::new();
            let mut js = Vec::new();
            for k in &per_precision {
                let packed = PackedWeight::pack_as(&w, out, inner, k.precision);
                let t = k.tiling(k.precision, out, inner, m).ok_or("no tiling")?;
                let mut y = vec![0f32; m * out];
                let rate = gf(median_us(reps, &mut || packed.matmul_t_into(&x, m, &mut y, false, &t)));
                cells.push(format!("{rate:.0} ({t})"));
                js.push(format!("\"{}\": {{\"gflops\": {rate:.1}, \"tiling\": \"{t}\"}}", k.precision));
            }
            if json {
                println!(
                    "{{\"model\": \"{model}\", \"product\": \"{name}\", \"rows\": {m}, \"out\": {out}, \"in\": {inner}, \"candle_f32\": {candle:.1}, {}}}",
                    js.join(", ")
                );
            } else {
                println!("| {model} | {name} | {m} | {out} | {inner} | {candle:.0} | {} |", cells.join(" | "));
            }
        }
    }
    Ok(())
}
