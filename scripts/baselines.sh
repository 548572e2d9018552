#!/usr/bin/env bash
# Zero-shot and 5-shot baselines on the `mr` test split for SmolLM2-135M and
# Qwen2.5-Coder-0.5B, in constrained and in generation mode (dense f32 weights, the accuracy
# reference). Reports land in docs/results/ (one JSON per run); docs/results.md quotes them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
cargo build --release --bins
bin=$(target_dir)/release/verdict-train
"$bin" fetch smollm2 qwen0.5b
"$bin" fetch-data mr
out=${OUT:-docs/results}
mkdir -p "$out"
for model in ${MODELS:-smollm2 qwen0.5b}; do
  for shots in ${SHOTS:-0 5}; do
    for mode in ${MODES:-constrained generate}; do
      echo "== $model, $shots-shot, $mode"
      /usr/bin/time -f "wall %e s, max RSS %M KB" "$bin" eval --model "$model" --task mr --split test \
        --shots "$shots" --mode "$mode" --batch-size 16 --predictions --out "$out/mr-$model-${shots}shot-$mode.json"
    done
  done
done
