#!/usr/bin/env bash
# Where a batched forward's time goes, per serving mode, on the machine at hand: one Qwen2.5-0.5B
# server at a time (2-step SFT adapter, word scoring) under CLIENTS closed-loop clients for
# REQUESTS requests; for each mode the server's compute seconds per input (`/metrics`
# verdict_compute_seconds_total over the inputs served), its batches, throughput, and the page
# faults of the server process over the run (`perf stat -e page-faults`: a count, not a timing,
# so it does not depend on this machine's noise). docs/benchmarks.md (Zen 5 section) quotes it.
#
#   scripts/batching_faults.sh                                  # modes: off packed padded
#   MODES="packed off" EXTRA="--merged" scripts/batching_faults.sh
#   MODES=packed EXTRA="--pack-tokens 64" scripts/batching_faults.sh
#
# Settings (environment): MODES, EXTRA (more verdict-serve flags), CLIENTS (32), REQUESTS (200),
# SECONDS_PER (30), PORT (18500), OUT (a file for the table; default: stdout only).
set -euo pipefail
cd "$(dirname "$0")/.."
MODES=${MODES:-off packed padded}
EXTRA=${EXTRA:-}
CLIENTS=${CLIENTS:-32}
REQUESTS=${REQUESTS:-200}
SECONDS_PER=${SECONDS_PER:-30}
PORT=${PORT:-18500}
command -v perf > /dev/null || { echo "perf is needed (Debian: linux-perf)" >&2; exit 1; }
cargo build --release --bins
. scripts/lib.sh
bin=$(target_dir)/release
"$bin/verdict-train" fetch qwen0.5b
"$bin/verdict-train" fetch-data mr
make_work verdict-faults
"$bin/verdict-train" sft --model qwen0.5b --task mr --out "$work/run" --max-steps 2 --batch-size 4 --eval-limit 20 \
  --save-every 2 --log-every 1 >&2
mkdir -p "$work/reg/mr"
cp -r "$work/run/adapter" "$work/reg/mr/v1"
echo v1 > "$work/reg/mr/CURRENT"
metric() { curl -fsS "http://127.0.0.1:$PORT/metrics" | awk -v k="$1" '$1 == k { print $2 }'; }
table="| mode | extra flags | inputs | batches | compute ms / input | req/s | page faults |"$'\n'"|---|---|---:|---:|---:|---:|---:|"
for mode in $MODES; do
  # shellcheck disable=SC2086 # EXTRA holds words
  "$bin/verdict-serve" --model qwen0.5b --adapters "$work/reg" --answer-scoring word --port "$PORT" --default-task mr \
    --watch-interval-ms 0 --batching "$mode" $EXTRA 2> "$work/serve-$mode.log" &
  server=$!
  pids+=("$server")
  wait_ready "$PORT" "$mode" "$work/serve-$mode.log" > /dev/null
  perf stat -e page-faults -p "$server" -o "$work/faults-$mode.txt" &
  stat=$!
  sleep 0.5
  line=$("$bin/verdict-bench" --task mr --clients "$CLIENTS" --requests "$REQUESTS" --seconds "$SECONDS_PER" \
    --endpoint "q=http://127.0.0.1:$PORT/v1/classify" 2>&1 | grep "q x")
  compute=$(metric verdict_compute_seconds_total)
  inputs=$(metric verdict_batch_size_rows_sum)
  batches=$(metric verdict_batch_size_rows_count)
  kill -INT "$stat"
  wait "$stat" 2> /dev/null || true
  kill "$server"
  wait "$server" 2> /dev/null || true
  faults=$(awk '/page-faults/ { gsub(",", "", $1); print $1 }' "$work/faults-$mode.txt")
  rate=$(echo "$line" | sed -E 's/.* ([0-9.]+) req\/s.*/\1/')
  per=$(python3 -c "print(f'{$compute / $inputs * 1000:.1f}')")
  echo "$mode: $line; compute $per ms per input over $inputs inputs in $batches batches; $faults page faults" >&2
  table+=$'\n'"| $mode | ${EXTRA:-} | $inputs | $batches | $per | $rate | $faults |"
done
header="CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1) (family $(sed -n 's/^cpu family[[:space:]]*: *//p' /proc/cpuinfo | head -1) model $(sed -n 's/^model[[:space:]]*: *//p' /proc/cpuinfo | head -1)); $(date -u +%Y-%m-%d); commit $(git rev-parse --short HEAD); MODES=\"$MODES\" EXTRA=\"$EXTRA\" CLIENTS=$CLIENTS REQUESTS=$REQUESTS scripts/batching_faults.sh"
printf '%s\n\n%s\n' "$header" "$table"
if [ -n "${OUT:-}" ]; then printf '%s\n\n%s\n' "$header" "$table" > "$OUT"; fi
