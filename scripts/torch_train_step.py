#!/usr/bin/env python3
"""Training step time of the PyTorch stack a user would otherwise run, on the same prompts as
Verdict: an SFT step with PEFT + transformers, or a PPO step with TRL 0.11's classic PPOTrainer +
PEFT (the trainer the seed paper's code uses).

The examples are Verdict's own tokenization (`verdict-train tasks --dump mr --model M --out F`:
one JSON object per line with the prompt's `prefix` and `body` token ids and the gold `answer`
ids), so both sides see the same tokens. The model is a Hugging Face directory written by
`verdict-train export-hf` (the same weights Verdict runs).

  sft: LoRA r16 / alpha 32 / rsLoRA / dropout 0.05 on --targets, AdamW lr 2e-4, --batch-size
       examples per step, loss on the answer tokens only (labels -100 elsewhere), one padded
       forward of prefix + body + answer per row, backward, clip 1.0, step.
  ppo: TRL PPOTrainer (PPOConfig batch_size, mini_batch_size, ppo_epochs) on
       AutoModelForCausalLMWithValueHead with the same LoRA; each step samples --new-tokens
       tokens per prompt (min = max, so every response has that length), rewards +1 / -1 by
       whether the label word starts the response, then `ppo_trainer.step`.

Prints one JSON line per step ({"what", "step", "seconds"}) and a summary line with the median
of the steps after the first. Threads: --threads (default: all cores).

    python3 scripts/torch_train_step.py sft --model smollm2-hf --examples mr-smollm2.jsonl --steps 6
    python3 scripts/torch_train_step.py ppo --model smollm2-hf --examples mr-smollm2.jsonl --steps 3
"""

import argparse
import json
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["sft", "ppo"])
    ap.add_argument("--model", required=True, help="a Hugging Face directory (verdict-train export-hf)")
    ap.add_argument("--examples", required=True, help="JSONL of token ids (verdict-train tasks --dump)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=None, help="sft: 8; ppo: 16")
    ap.add_argument("--mini-batch-size", type=int, default=8)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    examples = [json.loads(l) for l in open(args.examples)]
    tok = AutoTokenizer.from_pretrained(args.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        use_rslora=True,
        lora_dropout=0.05,
        target_modules=args.targets.split(","),
        task_type="CAUSAL_LM",
    )
    times = []
    if args.what == "sft":
        from peft import get_peft_model

        bs = args.batch_size or 8
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32), lora)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        for step in range(args.steps):
            batch = [examples[(step * bs + i) % len(examples)] for i in range(bs)]
            seqs = [e["prefix"] + e["body"] + e["answer"] for e in batch]
            width = max(map(len, seqs))
            ids = torch.full((bs, width), pad)
            labels = torch.full((bs, width), -100)
            mask = torch.zeros((bs, width), dtype=torch.long)
            for r, (e, s) in enumerate(zip(batch, seqs)):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
                start = len(s) - len(e["answer"])
                labels[r, start : len(s)] = torch.tensor(e["answer"])
            t = time.perf_counter()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
            print(json.dumps({"what": "sft", "step": step + 1, "seconds": times[-1], "loss": loss.item()}), flush=True)
    else:
        from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

        bs = args.batch_size or 16
        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            args.model, peft_config=lora, torch_dtype=torch.float32
        )
        config = PPOConfig(
            batch_size=bs,
            mini_batch_size=args.mini_batch_size,
            ppo_epochs=args.ppo_epochs,
            learning_rate=2e-5,
            seed=args.seed,
            log_with=None,
        )
        trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tok)
        gen = dict(
            min_new_tokens=args.new_tokens,
            max_new_tokens=args.new_tokens,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad,
        )
        for step in range(args.steps):
            batch = [examples[(step * bs + i) % len(examples)] for i in range(bs)]
            queries = [torch.tensor(e["prefix"] + e["body"]) for e in batch]
            t = time.perf_counter()
            responses = trainer.generate(queries, return_prompt=False, **gen)
            rewards = [
                torch.tensor(1.0 if r[: len(e["answer"]) - 1].tolist() == e["answer"][:-1] else -1.0)
                for r, e in zip(responses, batch)
            ]
            trainer.step(queries, list(responses), rewards)
            times.append(time.perf_counter() - t)
            print(json.dumps({"what": "ppo", "step": step + 1, "seconds": times[-1]}), flush=True)
    steady = times[1:] if len(times) > 1 else times
    print(json.dumps({"what": args.what, "median_seconds": statistics.median(steady), "steps": len(times),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
