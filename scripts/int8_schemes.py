#!/usr/bin/env python3
"""Which int8 scheme holds a classifier's predictions: simulates Verdict's int8 products in
PyTorch (inputs quantized per row, weights per output channel; LoRA factors stay f32) under
several schemes and counts the test predictions that differ from f32, with the largest change of
the answer probability. Run on a task's test prompts (`verdict-train tasks --show T --model M
--answer-scoring word --data DIR --dump N --out F`, with DIR's train.jsonl a copy of the test split)
through the model exported by `verdict-train export-hf` and the Verdict (PEFT-format) adapter:

    python3 scripts/int8_schemes.py --model smollm2-hf --adapter runs/mr-smollm2/best \
        --examples mr-test-ids.jsonl --answers 26990,20085 --schemes rows,smooth0.5

Schemes: `rows` (today's: u8 per row with a zero point), `smoothA` (SmoothQuant with migration
strength A: per input channel `s = amax(x)^A / amax(W)^(1-A)`, calibrated on the first
`--calibrate` examples, x / s quantized and W · s; `smooth0` needs no calibration: each weight
column scaled to the same peak), `groupG` (u8 per row and per G input
columns), `wgG` (weights per output channel and per G input columns, as Q8_0 does with
G = 32), `w2` (weights as two int8 matrices: the weight, then its rounding error), `outK` (the K calibrated largest input columns kept f32), `wexact` / `xexact` (weights / inputs
not quantized), `x2` (inputs as two u8 passes: the row, then its rounding error), combinations
joined by `+`.
"""

import argparse
import json


def quant_rows(x, group=0):
    """x quantized per row (per row and group of `group` columns) to u8 with a zero point."""
    shape = x.shape
    if group:
        x = x.reshape(shape[0], -1, group)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=1e-12)
    z = (-lo / s).round()
    return (((x / s + z).round().clamp(0, 255) - z) * s).reshape(shape)


def quant_weight(w, group=0):
    """w quantized to i8 per output channel (per output channel and group of `group` input
    columns), symmetric."""
    shape = w.shape
    if group:
        w = w.reshape(shape[0], -1, group)
    s = (w.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return ((w / s).round().clamp(-127, 127) * s).reshape(shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--examples", required=True)
    ap.add_argument("--answers", required=True, help="token ids of the label words, in class order")
    ap.add_argument("--n", type=int, default=0, help="examples scored (0: all)")
    ap.add_argument("--calibrate", type=int, default=64, help="examples the smoothing is measured on")
    ap.add_argument("--schemes", default="rows")
    ap.add_argument("--skip", default="", help="projection kinds kept f32, e.g. down_proj")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    examples = [json.loads(l) for l in open(args.examples)]
    calib = examples[: args.calibrate]
    scored = examples[args.calibrate :]
    if args.n:
        scored = scored[: args.n]
    answers = [int(a) for a in args.answers.split(",")]
    skip = set(filter(None, args.skip.split(",")))

    # The dense projections Verdict runs on int8: every base Linear (not the LoRA factors).
    linears = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lora_" not in name:
            kind = name.split(".")[-1]
            if kind == "base_layer":
                kind = name.split(".")[-2]
            if kind not in skip:
                linears[name] = mod

    prefix = examples[0]["prefix"]
    assert all(e["prefix"] == prefix for e in examples), "one task prompt: one shared prefix"

    def run_all(exs, batch=16):
        """The answer distribution of each example: the shared prefix run once, then the bodies
        in left-padded batches on a copy of its cache (quantization is per row, so this equals
        running each prompt whole)."""
        import copy

        with torch.no_grad():
            out = model(torch.tensor([prefix]), use_cache=True)
            cache = out.past_key_values
            probs = []
            for i in range(0, len(exs), batch):
                chunk = exs[i : i + batch]
                width = max(len(e["body"]) for e in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros(len(chunk), len(prefix) + width, dtype=torch.long)
                mask[:, : len(prefix)] = 1
                pos = torch.zeros(len(chunk), width, dtype=torch.long)
                for j, e in enumerate(chunk):
                    n = len(e["body"])
                    ids[j, width - n :] = torch.tensor(e["body"])
                    mask[j, len(prefix) + width - n :] = 1
                    pos[j, width - n :] = torch.arange(len(prefix), len(prefix) + n)
                c = copy.deepcopy(cache)
                c.batch_repeat_interleave(len(chunk))
                logits = model(ids, attention_mask=mask, position_ids=pos, past_key_values=c,
                               use_cache=True, logits_to_keep=1).logits[:, -1, answers]
                probs.extend(torch.softmax(logits, -1))
        return probs

    # Calibration: per input channel, the largest |x| over the calibration prompts.
    amax = {}

    def stat_hook(name):
        def f(mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).abs().amax(0)
            amax[name] = torch.maximum(amax[name], x) if name in amax else x

        return f

    hooks = [m.register_forward_pre_hook(stat_hook(n)) for n, m in linears.items()]
    run_all(calib)
    for h in hooks:
        h.remove()

    reference = run_all(scored)
    originals = {n: m.forward for n, m in linears.items()}
    weights = {n: m.weight.data.clone() for n, m in linears.items()}

    for scheme in args.schemes.split(","):
        parts = scheme.split("+")
        alpha = next((float(p[6:]) for p in parts if p.startswith("smooth")), None)
        group = next((int(p[5:]) for p in parts if p.startswith("group")), 0)
        w_group = next((int(p[2:]) for p in parts if p.startswith("wg")), 0)
        out_k = next((int(p[3:]) for p in parts if p.startswith("out")), 0)
        w_exact, x_exact = "wexact" in parts, "xexact" in parts
        # `x2`: the input as the sum of two u8 rows (the row, then its quantization error).
        two_pass = "x2" in parts
        for n, m in linears.items():
            w = weights[n]
            s = torch.ones(w.shape[1])
            if alpha is not None:
                wmax = w.abs().amax(0).clamp(min=1e-8)
                a = amax[n].clamp(min=1e-8) ** alpha if alpha else 1.0
                s = (a / wmax ** (1 - alpha)).clamp(min=1e-5)
            keep = torch.zeros(w.shape[1], dtype=torch.bool)
            if out_k:
                keep[amax[n].topk(out_k).indices] = True
            wq = w.clone() if w_exact else quant_weight(w * s, w_group) / s
            if "w2" in parts and not w_exact:
                # `w2`: the weight as two int8 matrices (the weight, then its rounding error).
                wq = wq + quant_weight(w - wq, w_group)
            wq[:, keep] = w[:, keep]

            def fwd(x, m=m, s=s, wq=wq, keep=keep, x_exact=x_exact, two_pass=two_pass, group=group):
                shape = x.shape
                x2 = x.reshape(-1, shape[-1])
                xs = x2 / s
                kept = xs[:, keep]
                xs = xs.clone()
                xs[:, keep] = 0
                if x_exact:
                    xq = xs.clone()
                else:
                    xq = quant_rows(xs, group)
                    if two_pass:
                        xq = xq + quant_rows(xs - xq, group)
                xq[:, keep] = kept
                y = (xq * s) @ wq.T
                if m.bias is not None:
                    y = y + m.bias
                return y.reshape(*shape[:-1], -1)

            m.forward = fwd
        probs = run_all(scored)
        diff = sum(int(p.argmax() != r.argmax()) for p, r in zip(probs, reference))
        change = [(p - r).abs().max().item() for p, r in zip(probs, reference)]
        print(f"{scheme}: {diff} of {len(scored)} differ; largest change {max(change):.3g}, "
              f"mean {sum(change) / len(change):.3g}", flush=True)
        for n, m in linears.items():
            m.forward = originals[n]


if __name__ == "__main__":
    main()
