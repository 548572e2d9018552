#!/usr/bin/env python3
"""PyTorch's dense products at the shapes `models/examples/products_bench.rs` measures: f32
(MKL), bf16 (oneDNN; AMX where the CPU has it) and int8 (`torch.ao` dynamic quantization of a
Linear: int8 weights per channel... as `quantize_dynamic` makes them, activations quantized per
call), one JSON line per (shape, rows) with GFLOP/s (median of the calls).

    python3 scripts/torch_products.py --rows 1,8,35,64,128,512,2048 [--threads 2] > torch.jsonl
"""

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,8,35,64,128,512,2048")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model", default=None, help="smollm2 or qwen0.5b only")
    args = ap.parse_args()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    models = {
        "smollm2": [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536)],
        "qwen0.5b": [("q/o", 896, 896), ("k/v", 128, 896), ("gate/up", 4864, 896), ("down", 896, 4864)],
    }
    shapes = []
    for model, items in models.items():
        if args.model and args.model != model:
            continue
        for name, out, inner in items:
            shapes.append((model, name, out, inner))
            shapes.append((model, f"{name} grad", inner, out))

    def rate(f, flops):
        f()
        reps = 5 if flops > 5e9 else 11
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        ts.sort()
        return flops / ts[len(ts) // 2] / 1e9

    with torch.inference_mode():
        for m in [int(r) for r in args.rows.split(",")]:
            for model, name, out, inner in shapes:
                flops = 2.0 * m * out * inner
                x = torch.randn(m, inner)
                lin = torch.nn.Linear(inner, out, bias=False)
                f32 = rate(lambda: lin(x), flops)
                lb, xb = lin.to(torch.bfloat16), x.to(torch.bfloat16)
                bf16 = rate(lambda: lb(xb), flops)
                q = torch.ao.quantization.quantize_dynamic(
                    torch.nn.Sequential(torch.nn.Linear(inner, out, bias=False)), {torch.nn.Linear}, dtype=torch.qint8
                )
                int8 = rate(lambda: q(x), flops)
                print(json.dumps({"model": model, "product": name, "rows": m, "out": out, "in": inner,
                                  "torch_f32": round(f32, 1), "torch_bf16": round(bf16, 1),
                                  "torch_int8": round(int8, 1)}), flush=True)


if __name__ == "__main__":
    main()
