#!/usr/bin/env python3
"""Where `--cpu-matmul int8` loses accuracy: the relative error of every dense projection's output
when its input is quantized per row to u8 with a zero point (as Verdict's int8 kernels do), when its
weight is quantized per output channel to int8, and when the K input columns of largest magnitude
are kept exact (LLM.int8()-style outlier columns, one remedy). Run on real prompts of the task
(`verdict-train tasks --show mr --model M --dump N --out F`) through the model exported by
`verdict-train export-hf`; prints the median and largest error per projection type and the largest
ratio of a column's peak magnitude to the median column's (the outliers).

    python3 scripts/int8_error.py --model smollm2-hf --examples mr-smollm2.jsonl [--outliers 16]
"""

import argparse
import json
import statistics


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face directory (verdict-train export-hf)")
    ap.add_argument("--examples", required=True, help="JSONL of token ids (verdict-train tasks --dump)")
    ap.add_argument("--n", type=int, default=4, help="examples to run")
    ap.add_argument("--outliers", type=int, default=0, help="K input columns kept exact")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    examples = [json.loads(l) for l in open(args.examples)][: args.n]
    stats = {}

    def hook(name):
        def f(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1])
            w = mod.weight
            xin = x
            kept = torch.zeros_like(x)
            if args.outliers:
                idx = x.abs().max(0).values.topk(args.outliers).indices
                kept[:, idx] = x[:, idx]
                xin = x.clone()
                xin[:, idx] = 0
            lo = xin.min(1, keepdim=True).values.clamp(max=0)
            hi = xin.max(1, keepdim=True).values.clamp(min=0)
            s = ((hi - lo) / 255).clamp(min=1e-12)
            z = (-lo / s).round()
            xq = ((xin / s + z).round().clamp(0, 255) - z) * s + kept
            ws = (w.abs().max(1, keepdim=True).values / 127).clamp(min=1e-12)
            wq = (w / ws).round() * ws
            y = x @ w.T
            err = lambda yy: ((yy - y).norm() / y.norm()).item()
            colmax = x.abs().max(0).values
            kind = name.split(".")[-1]
            stats.setdefault(kind, []).append((err(xq @ w.T), err(x @ wq.T), err(xq @ wq.T),
                                               (colmax.max() / colmax.median()).item()))
        return f

    for n, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(hook(n))
    with torch.no_grad():
        for e in examples:
            model(torch.tensor([e["prefix"] + e["body"]]))
    print(f"| projection | input u8 (median / max) | weight int8 (median) | both (median) | peak / median column |")
    print("|---|---:|---:|---:|---:|")
    for kind, v in stats.items():
        med = lambda i: statistics.median(r[i] for r in v)
        print(f"| {kind} | {med(0):.4f} / {max(r[0] for r in v):.4f} | {med(1):.4f} | {med(2):.4f} | "
              f"{max(r[3] for r in v):.0f} |")


if __name__ == "__main__":
    main()
