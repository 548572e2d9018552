//! The dense products of one forward pass as a real model runs them: every layer's projections
//! in turn, each weight read from memory once per forward (the whole stack is far larger than
//! the caches), against the same products on one layer's weights over and over (in cache, as
//! the kernel plan and `products_bench` time them). Their ratio is what streaming the weights
//! costs on this machine. Seeded weights of a model's shapes (`--model smollm2|qwen0.5b`, its
//! real layer count), `--rows` rows (a served request's body is 30-50), each precision asked
//! (`--precision f32,bf16,int8`), tilings from the kernel plan. Median of `--reps` forwards.
//!
//! ```text
//! cargo run --release -p models --example stream_bench -- --model qwen0.5b --rows 40 --precision bf16
//! ```
use models::cpu::{KernelArgs, PackedWeight, Precision, PrecisionChoice, Purpose};
#[path = "common/timing.rs"]
mod timing;
use timing::median_us;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let model = arg("--model").unwrap_or("qwen0.5b".into());
    let rows: usize = arg("--rows").unwrap_or("40".into()).parse()?;
    let reps: usize = arg("--reps").unwrap_or("7".into()).parse()?;
    let precisions: Vec<Precision> =
        arg("--precision").unwrap_or("bf16".into()).split(',').map(|p| p.parse()).collect::<Result<_, _>>()?;
    // (layers, [(out, inner)] of q, k, v, o, gate, up, down)
    let (layers, shapes): (usize, Vec<(usize, usize)>) = match model.as_str() {
        "smollm2" => (30, vec![(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]),
        "qwen0.5b" => (24, vec![(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]),
        other => return Err(format!("unknown model {other:?} (smollm2, qwen0.5b)").into()),
    };
    let mut shape_list: Vec<(usize, usize, usize)> = shapes.iter().map(|&(o, i)| (o, i, layers)).collect();
    shape_list.sort();
    shape_list.dedup();
    let cache = std::env::var("VERDICT_CACHE_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| std::env::temp_dir().join("verdict-products-bench"));
    println!("CPU: {} | {} x {} layers, {rows} rows", models::cpu::caps::cpu_model(), model, layers);
    println!("| precision | weights MiB | streamed ms | in cache ms | streamed / in cache | streamed GFLOP/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    let flops: f64 = layers as f64 * shapes.iter().map(|&(o, i)| 2.0 * (rows * o * i) as f64).sum::<f64>();
    for p in precisions {
        let kargs = KernelArgs { cpu_matmul: PrecisionChoice::Fixed(p), ..Default::default() };
        let kernels = kargs.resolve(&shape_list, Purpose::Serve, &cache, &mut |l| eprintln!("{l}"))?;
        let mut seed = 1u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let stack: Vec<Vec<PackedWeight>> = (0..layers)
            .map(|_| {
                shapes
                    .iter()
                    .map(|&(o, i)| {
                        let w: Vec<f32> = (0..o * i).map(|_| next() * 0.05).collect();
                        PackedWeight::pack_as(&w, o, i, p)
                    })
                    .collect()
            })
            .collect();
        let bytes: usize = stack.iter().flatten().map(|w| w.bytes()).sum();
        let tilings: Vec<_> =
            shapes.iter().map(|&(o, i)| kernels.tiling(p, o, i, rows).ok_or("no tiling")).collect::<Result<_, _>>()?;
        let inputs: Vec<Vec<f32>> = shapes.iter().map(|&(_, i)| (0..rows * i).map(|_| next()).collect()).collect();
        let mut outputs: Vec<Vec<f32>> = shapes.iter().map(|&(o, _)| vec![0f32; rows * o]).collect();
        let mut forward = |pick: &dyn Fn(usize) -> usize| {
            for layer in 0..layers {
                for (j, w) in stack[pick(layer)].iter().enumerate() {
                    w.matmul_t_into(&inputs[j], rows, &mut outputs[j], false, &tilings[j]);
                }
            }
        };
        let streamed = median_us(reps, &mut || forward(&|l| l)) / 1e3;
        let cached = median_us(reps, &mut || forward(&|_| 0)) / 1e3;
        println!(
            "| {p} | {:.0} | {streamed:.1} | {cached:.1} | {:.2} | {:.0} |",
            bytes as f64 / (1 << 20) as f64,
            streamed / cached,
            flops / streamed / 1e6
        );
    }
    Ok(())
}
