#!/usr/bin/env bash
# The soak of issue 18: verdict-serve on the real SmolLM2 with two adapter versions of `mr` in a
# registry, then `verdict-bench soak` against it for SOAK_SECONDS: CLIENTS closed-loop clients on
# /v1/classify and vLLM's /classify with real mr test sentences, BAD_FRACTION of the requests bad
# (malformed JSON, unknown task, empty, over-long, ...), the serving version swapped through the
# admin API every SWAP_EVERY seconds, the server's resident memory sampled from /metrics. It fails
# when a good request failed, an answer was not attributed to the version serving, a bad request
# did not get a 4xx JSON error, or resident memory grew 5% or more after the warm-up.
#
#   scripts/soak.sh                                   # 10 minutes
#   SOAK_SECONDS=60 scripts/soak.sh                   # a short one
#   ADAPTER_A=runs/a/best ADAPTER_B=runs/b/best scripts/soak.sh
#
# Settings (environment): SOAK_SECONDS (600; not SECONDS, which bash counts itself), CLIENTS (4),
# SWAP_EVERY (10), BAD_FRACTION (0.05), MODEL (smollm2), ADAPTER_A / ADAPTER_B (adapter
# directories for the two versions; default: two short SFT runs trained here, 2 and 6 steps),
# PORT (18500), THREADS (compute threads; all cores), OUT (docs/results/soak/<cpu>: OUT.json is
# the report, OUT.md the summary with the machine and the date), SERVE_BIN / BENCH_BIN / TRAIN_BIN
# (prebuilt binaries; without all three, `cargo build --release -p serve -p trainer`).
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK_SECONDS=${SOAK_SECONDS:-600}
CLIENTS=${CLIENTS:-4}
SWAP_EVERY=${SWAP_EVERY:-10}
BAD_FRACTION=${BAD_FRACTION:-0.05}
MODEL=${MODEL:-smollm2}
PORT=${PORT:-18500}
cpu_model=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512bw|avx512_vnni|avx512_bf16|avx512_fp16|avx_vnni|amx_tile|amx_bf16|amx_int8)$' | tr '\n' ' ')
slug=$(echo "$cpu_model" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
OUT=${OUT:-docs/results/soak/$slug}
# The commit at the start (the tree may move on while the soak runs).
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- || echo "+changes")

. scripts/lib.sh
if [ -n "${SERVE_BIN:-}" ] && [ -n "${BENCH_BIN:-}" ] && [ -n "${TRAIN_BIN:-}" ]; then
  serve_bin=$SERVE_BIN bench_bin=$BENCH_BIN train_bin=$TRAIN_BIN
else
  cargo build --release -p serve -p trainer
  bin=$(target_dir)/release
  serve_bin=${SERVE_BIN:-$bin/verdict-serve} bench_bin=${BENCH_BIN:-$bin/verdict-bench}
  train_bin=${TRAIN_BIN:-$bin/verdict-train}
fi
"$train_bin" fetch "$MODEL"
"$train_bin" fetch-data mr

make_work verdict-soak
adapter() { # name, steps, seed: a short SFT run's adapter (latency and memory do not depend on its values)
  "$train_bin" sft --model "$MODEL" --task mr --out "$work/runs/$1" --max-steps "$2" --seed "$3" --batch-size 4 \
    --eval-limit 20 --save-every "$2" --log-every 1 >&2
  echo "$work/runs/$1/adapter"
}
a=${ADAPTER_A:-$(adapter a 2 1)}
b=${ADAPTER_B:-$(adapter b 6 2)}
# Both versions enter the registry through verdict-train promote (forced: the soak needs both,
# whichever scores better); the first serves first.
for v in a b; do
  dir=$a; [ "$v" = b ] && dir=$b
  "$train_bin" promote --model "$MODEL" --task mr --candidate "$dir" --adapters "$work/registry" --version "$v" \
    --force --eval-limit 8 >&2
done

token=soak-$RANDOM$RANDOM
threads=()
if [ -n "${THREADS:-}" ]; then threads=(--threads "$THREADS"); fi
"$serve_bin" --model "$MODEL" --adapters "$work/registry" --port "$PORT" --admin-token "$token" "${threads[@]}" \
  2> "$work/serve.log" &
pids+=($!)
wait_ready "$PORT" verdict-serve "$work/serve.log" 6000 > /dev/null

mkdir -p "$(dirname "$OUT")"
serving=$(curl -fsS "http://127.0.0.1:$PORT/info" |
  python3 -c "import json, sys; i = json.load(sys.stdin); print(i['kernels'] + '; batching ' + str(i['batching']['batching']))")
command="SOAK_SECONDS=$SOAK_SECONDS CLIENTS=$CLIENTS SWAP_EVERY=$SWAP_EVERY BAD_FRACTION=$BAD_FRACTION"
for v in SERVE_BIN BENCH_BIN TRAIN_BIN ADAPTER_A ADAPTER_B THREADS; do
  if [ -n "${!v:-}" ]; then command="$command $v=${!v}"; fi
done
command="$command scripts/soak.sh"
status=0
VERDICT_ADMIN_TOKEN=$token "$bench_bin" soak --url "http://127.0.0.1:$PORT" --task mr --versions a,b \
  --seconds "$SOAK_SECONDS" --clients "$CLIENTS" --swap-every "$SWAP_EVERY" --bad-fraction "$BAD_FRACTION" \
  --out-json "$OUT.json" > "$work/summary.txt" || status=$?
{
  echo "# Soak on $cpu_model"
  echo
  echo "CPU: \`$cpu_model\`, $(nproc) cores; flags: \`$cpu_flags\`; $(date -u +%Y-%m-%d); commit $commit;"
  echo "\`$command\`; server \`$serve_bin --model $MODEL ${threads[*]}\`, versions a = \`$a\`, b = \`$b\`;"
  echo "the server's \`/info\`: $serving."
  echo
  echo '```text'
  cat "$work/summary.txt"
  echo '```'
  echo
  if [ "$status" = 0 ]; then echo "Passed."; else echo "FAILED (exit $status): see $OUT.json."; fi
} > "$OUT.md"
cat "$OUT.md"
exit "$status"
