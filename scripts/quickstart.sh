#!/usr/bin/env bash
# The main job on the default model, end to end: build, fetch SmolLM2-135M and the real movie
# review data, classify 200 test sentences zero-shot with answers constrained to the label
# words, train a quick LoRA adapter (SFT, 40 steps, a few minutes on 2 cores), classify the same
# sentences with it, publish it in the adapter registry (verdict-train promote), start verdict-serve on loopback and
# classify over HTTP with the adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
cargo build --release --bins
bin=$(target_dir)/release
"$bin/verdict-train" fetch smollm2
"$bin/verdict-train" fetch-data mr
echo "== zero-shot classification of 200 mr test sentences (constrained to Negative / Positive)"
"$bin/verdict-train" eval --model smollm2 --task mr --split test --limit 200 --batch-size 16
echo "== quick adapter: LoRA SFT on mr, 40 steps of 8 (runs/quickstart; rerunning continues it)"
"$bin/verdict-train" sft --model smollm2 --task mr --out runs/quickstart --max-steps 40 --batch-size 8 \
  --warmup-steps 5 --eval-limit 100 --save-every 20 --log-every 10 --resume
echo "== the same 200 test sentences with the adapter"
"$bin/verdict-train" eval --model smollm2 --task mr --split test --limit 200 --batch-size 16 --adapter runs/quickstart/best
echo "== publish it: verdict-train promote into ./adapters (evaluated on 100 dev sentences; audit-logged)"
if [ -f adapters/mr/CURRENT ]; then
  # A rerun: the new adapter must beat the serving one by the margin, else the serving one stays.
  "$bin/verdict-train" promote --model smollm2 --task mr --candidate runs/quickstart/best --adapters ./adapters \
    --eval-limit 100 --batch-size 16 || {
    # Exit 3 is the refusal (not better by the margin); anything else is an error.
    status=$?
    [ "$status" = 3 ] || exit "$status"
    echo "(not promoted: adapters/mr keeps serving $(cat adapters/mr/CURRENT))"
  }
else
  # An empty registry: publish whatever the comparison with zero-shot says (logged as forced).
  "$bin/verdict-train" promote --model smollm2 --task mr --candidate runs/quickstart/best --adapters ./adapters \
    --eval-limit 100 --batch-size 16 --force
fi
port=${VERDICT_PORT:-8080}
echo "== verdict-serve on 127.0.0.1:$port"
"$bin/verdict-serve" --model smollm2 --adapters ./adapters --port "$port" --zero-shot-fallback &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 150); do
  if curl -fsS "http://127.0.0.1:$port/ready" 2>/dev/null; then echo; break; fi
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$port/health"; echo
echo "== classify over HTTP with the adapter (label, every label's probability, adapter version)"
curl -fsS "http://127.0.0.1:$port/v1/classify" -d '{"task": "mr", "inputs": ["a gorgeous, witty, seductive movie", "dull and lifeless"]}'; echo
echo "== the TEI-compatible /predict (default task: the one with an adapter)"
curl -fsS "http://127.0.0.1:$port/predict" -d '{"inputs": "a gorgeous, witty, seductive movie"}'; echo
echo "== zero-shot on a task without an adapter (--zero-shot-fallback)"
curl -fsS "http://127.0.0.1:$port/v1/classify" -d '{"task": "sst2", "inputs": ["a gorgeous, witty, seductive movie"]}'; echo
