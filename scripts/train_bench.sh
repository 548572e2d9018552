#!/usr/bin/env bash
# Training step time on the real models, measured side by side in one run: a few SFT steps and a
# few PPO steps (from a fresh adapter, label-restricted rollouts) per model, then the medians from
# each run's metrics.jsonl. Run it on a quiet machine; it takes about 10 minutes on 2 cores.
# Usage: scripts/train_bench.sh [models...]   (default: smollm2 qwen0.5b)
# On the GPU machine (no cargo there): VERDICT_BIN=/tmp/verdict-gpu/verdict-gpu/verdict-train
# VERDICT_DEVICE=cuda scripts/train_bench.sh (the binaries read VERDICT_DEVICE / VERDICT_DTYPE).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
bin=${VERDICT_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --bins
  bin=$(target_dir)/release/verdict-train
fi
out=${TRAIN_BENCH_DIR:-runs/train-bench}
rm -rf "$out"
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(smollm2 qwen0.5b)
for m in "${models[@]}"; do
  "$bin" sft --model "$m" --task mr --out "$out/sft-$m" --max-steps 6 --batch-size 8 --eval-every 0 \
    --eval-limit 16 --save-every 1000 --log-every 1
  "$bin" ppo --model "$m" --task mr --out "$out/ppo-$m" --max-steps 3 --batch-size 16 --mini-batch-size 8 \
    --ppo-epochs 4 --eval-every 0 --eval-limit 16 --save-every 1000 --log-every 1
done
python3 - "$out" "${models[@]}" <<'PY'
import json, statistics, sys
out, models = sys.argv[1], sys.argv[2:]
def rows(path):
    return [json.loads(l) for l in open(path) if '"step_seconds"' in l]
print("| model | what | steps | step time, median | other |")
print("|---|---|---:|---:|---|")
for m in models:
    s = rows(f"{out}/sft-{m}/metrics.jsonl")[1:]  # the first step warms up
    print(f"| {m} | SFT, batch 8 | {len(s)} | {statistics.median(r['step_seconds'] for r in s):.2f} s | |")
    p = rows(f"{out}/ppo-{m}/metrics.jsonl")
    med = lambda k: statistics.median(r[k] for r in p)
    print(f"| {m} | PPO step, 16 rollouts, 4 epochs x 2 mini-batches of 8 | {len(p)} | {med('step_seconds'):.2f} s | "
          f"rollout {med('rollout_seconds'):.2f} s, {med('rollout_tokens_per_second'):.1f} new tokens/s |")
PY
