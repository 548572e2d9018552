#!/usr/bin/env bash
# The main job on the default model, end to end: build, fetch SmolLM2-135M and the real movie
# review data, classify 200 test sentences with answers constrained to the label words, start
# verdict-serve on loopback, wait until it is ready and classify over HTTP (zero-shot).
# (Training a quick adapter and classifying over HTTP join this script as those land.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
bin=./target/release
"$bin/verdict-train" fetch smollm2
"$bin/verdict-train" fetch-data mr
echo "== zero-shot classification of 200 mr test sentences (constrained to Negative / Positive)"
"$bin/verdict-train" eval --model smollm2 --task mr --split test --limit 200 --batch-size 16
echo "== greedy generation (dense f32 weights)"
"$bin/verdict-train" generate --prompt "The capital of France is" --max-new-tokens 8
echo "== chat, quantized weights"
"$bin/verdict-train" generate --weights quantized --chat --prompt "Is the review 'a gorgeous, witty, seductive movie' positive or negative? Answer in one word." --max-new-tokens 8
port=${VERDICT_PORT:-8080}
echo "== verdict-serve on 127.0.0.1:$port"
# No adapters yet in ./adapters: answer zero-shot with the base model.
"$bin/verdict-serve" --model smollm2 --port "$port" --zero-shot-fallback &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$port/ready" 2>/dev/null; then echo; break; fi
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$port/health"; echo
echo "== classify (zero-shot; docs/serving.md for adapters)"
curl -fsS "http://127.0.0.1:$port/v1/classify" -d '{"task": "sst2", "inputs": ["a gorgeous, witty, seductive movie", "dull and lifeless"]}'; echo
