#!/usr/bin/env bash
# The decoder classifiers against BERT baselines, over HTTP, in one run: starts verdict-serve six
# times on loopback (SmolLM2-135M + adapter, Qwen2.5-0.5B dense + adapter, Qwen2.5-0.5B quantized
# + adapter, BERT-large and BERT-base with seeded random weights and heads, MiniLM with its head
# trained on mr) and replays the mr test sentences against all of them with verdict-bench at 1, 4
# and 16 clients. Writes docs/bench_vs_bert.{md,json,svg}. Run it on a quiet machine.
#
#   scripts/bench_vs_bert.sh                       # the benchmark (release build)
#   SMOKE=1 PROFILE=debug scripts/bench_vs_bert.sh # a few requests at 1 client, to see it work
#
# Settings (environment): CLIENTS (1,4,16), REQUESTS per endpoint and client count (200),
# SECONDS_PER endpoint and client count (60), THREADS per server (all cores), BASE_PORT (18180),
# OUT (docs/bench_vs_bert), PROFILE (release), SMOLLM2_ADAPTER / QWEN_ADAPTER (an adapter
# directory; default: a 2-step SFT adapter trained here: latency does not depend on the values),
# MINILM_HEAD (runs/mr-minilm, trained here when missing: docs/results.md), MERGED=1 (also the
# decoders in --merged mode: the adapter folded into a copy of the base), TORCH_PYTHON (a Python
# with torch, transformers and tokenizers: also BERT-large in PyTorch, scripts/torch_bert_server.py,
# the peer users would deploy, in f32 and, where the CPU has AVX512-BF16, bf16; docs/benchmarks.md
# says how to install one). On a CPU with AVX512-BF16 the decoders are also served with
# --cpu-matmul bf16. SCORING=word serves the decoders with --answer-scoring word (the label
# words alone, docs/serving.md), SCORING=both adds those servers (name suffix -word) beside the
# full-answer ones. ONLY=name,name keeps just those endpoints and bert-large, the baseline of the
# ratios (memory: every server stays loaded during the whole run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
PROFILE=${PROFILE:-release}
if [ "${SMOKE:-0}" = 1 ]; then
  CLIENTS=${CLIENTS:-1} REQUESTS=${REQUESTS:-3} SECONDS_PER=${SECONDS_PER:-30} OUT=${OUT:-target/bench_vs_bert_smoke}
fi
CLIENTS=${CLIENTS:-1,4,16}
REQUESTS=${REQUESTS:-200}
SECONDS_PER=${SECONDS_PER:-60}
BASE_PORT=${BASE_PORT:-18180}
OUT=${OUT:-docs/bench_vs_bert}
MINILM_HEAD=${MINILM_HEAD:-runs/mr-minilm}
threads=()
if [ -n "${THREADS:-}" ]; then threads=(--threads "$THREADS"); fi

case "$PROFILE" in
  release) cargo build --release --bins; bin=$(target_dir)/release ;;
  debug | dev) cargo build --bins; bin=$(target_dir)/debug ;;
  *) echo "PROFILE is release or debug"; exit 2 ;;
esac
"$bin/verdict-train" fetch smollm2 qwen0.5b minilm
"$bin/verdict-train" fetch-data mr

make_work verdict-bench

# A registry holding one version (v1) of the mr task: the given adapter or head directory.
registry() {
  mkdir -p "$work/$1/mr"
  cp -r "$2" "$work/$1/mr/v1"
  echo v1 > "$work/$1/mr/CURRENT"
}

quick_adapter() { # model, out: a 2-step LoRA SFT adapter (its values do not change latency)
  "$bin/verdict-train" sft --model "$1" --task mr --out "$2" --max-steps 2 --batch-size 4 --eval-limit 20 \
    --save-every 2 --log-every 1 >&2
  echo "$2/adapter"
}
smol_adapter=${SMOLLM2_ADAPTER:-$(quick_adapter smollm2 "$work/runs/smollm2")}
qwen_adapter=${QWEN_ADAPTER:-$(quick_adapter qwen0.5b "$work/runs/qwen")}
if [ ! -f "$MINILM_HEAD/head.safetensors" ]; then
  "$bin/verdict-train" encoder-head --model minilm --task mr --out "$MINILM_HEAD"
fi
for b in bert-large bert-base; do
  "$bin/verdict-train" encoder-head --model "$b" --task mr --random --out "$work/heads/$b" >/dev/null
done
registry smollm2 "$smol_adapter"
registry qwen "$qwen_adapter"
registry bert-large "$work/heads/bert-large"
registry bert-base "$work/heads/bert-base"
registry minilm "$MINILM_HEAD"

# name | verdict-serve arguments
servers=(
  "smollm2-lora|--model smollm2 --adapters $work/smollm2"
  "qwen0.5b-lora|--model qwen0.5b --adapters $work/qwen"
  "qwen0.5b-q4-lora|--model qwen0.5b --weights quantized --adapters $work/qwen"
  "bert-large|--model bert-large --adapters $work/bert-large"
  "bert-base|--model bert-base --adapters $work/bert-base"
  "minilm-head|--model minilm --adapters $work/minilm"
)
if grep -qw avx512_bf16 /proc/cpuinfo; then
  servers+=(
    "smollm2-lora-bf16|--model smollm2 --cpu-matmul bf16 --adapters $work/smollm2"
    "qwen0.5b-lora-bf16|--model qwen0.5b --cpu-matmul bf16 --adapters $work/qwen"
  )
fi
if [ "${MERGED:-0}" = 1 ]; then
  servers+=(
    "smollm2-lora-merged|--model smollm2 --merged --adapters $work/smollm2"
    "qwen0.5b-lora-merged|--model qwen0.5b --merged --adapters $work/qwen"
  )
fi
case "${SCORING:-full}" in
  full) ;;
  word | both)
    decoders=()
    for s in "${servers[@]}"; do
      case "$s" in smollm2* | qwen*) decoders+=("${s%%|*}-word|${s#*|} --answer-scoring word") ;; esac
    done
    if [ "$SCORING" = word ]; then
      kept=()
      for s in "${servers[@]}"; do case "$s" in smollm2* | qwen*) ;; *) kept+=("$s") ;; esac; done
      servers=("${kept[@]}")
    fi
    servers+=("${decoders[@]}")
    ;;
  *) echo "SCORING is full, word or both"; exit 2 ;;
esac
if [ -n "${ONLY:-}" ]; then
  kept=()
  for s in "${servers[@]}"; do
    if [[ ",$ONLY,bert-large," == *",${s%%|*},"* ]]; then kept+=("$s"); fi
  done
  servers=("${kept[@]}")
fi
endpoints=()
port=$BASE_PORT
for s in "${servers[@]}"; do
  name=${s%%|*}
  # shellcheck disable=SC2086 # the arguments are words
  "$bin/verdict-serve" ${s#*|} --port "$port" --default-task mr --watch-interval-ms 0 "${threads[@]}" \
    2> "$work/$name.log" &
  pids+=($!)
  endpoints+=(--endpoint "$name=http://127.0.0.1:$port/v1/classify")
  port=$((port + 1))
done
if [ -n "${TORCH_PYTHON:-}" ]; then
  torch_threads=()
  if [ -n "${THREADS:-}" ]; then torch_threads=(--threads "$THREADS"); fi
  torch_dtypes=(f32)
  if grep -qw avx512_bf16 /proc/cpuinfo; then torch_dtypes+=(bf16); fi
  for dt in "${torch_dtypes[@]}"; do
    name=bert-large-torch; [ "$dt" = f32 ] || name=bert-large-torch-$dt
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
    "$TORCH_PYTHON" scripts/torch_bert_server.py --shape large --dtype "$dt" --port "$port" "${torch_threads[@]}" \
      --tokenizer "${VERDICT_CACHE_DIR:-$HOME/.cache/verdict}/models/all-minilm-l6-v2/tokenizer.json" \
      2> "$work/$name.log" &
    pids+=($!)
    servers+=("$name|")
    endpoints+=(--endpoint "$name=http://127.0.0.1:$port/v1/classify")
    port=$((port + 1))
  done
fi
port=$BASE_PORT
for s in "${servers[@]}"; do
  name=${s%%|*}
  ok=0
  for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.5
  done
  if [ "$ok" != 1 ]; then echo "$name did not become ready:"; cat "$work/$name.log"; exit 1; fi
  port=$((port + 1))
done

mkdir -p "$(dirname "$OUT")"
note="Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), compute threads per server: ${THREADS:-all}; $(date -u +%Y-%m-%d); commit $(git rev-parse --short HEAD); $PROFILE build; \`scripts/bench_vs_bert.sh\` (CLIENTS=$CLIENTS REQUESTS=$REQUESTS SECONDS_PER=$SECONDS_PER SCORING=${SCORING:-full}${ONLY:+ ONLY=$ONLY}); mr test sentences, one per request, POST /v1/classify."
"$bin/verdict-bench" --task mr --clients "$CLIENTS" --requests "$REQUESTS" --seconds "$SECONDS_PER" \
  --baseline bert-large "${endpoints[@]}" --note "$note" \
  --out-md "$OUT.md" --out-json "$OUT.json" --out-svg "$OUT.svg"
echo "wrote $OUT.md $OUT.json $OUT.svg"
