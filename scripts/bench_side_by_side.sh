#!/usr/bin/env bash
# Verdict against the PyTorch stack a user would otherwise run, side by side in one run on the
# machine at hand (docs/benchmarks.md keeps one table per CPU kind):
#
#   serve     verdict-serve (SmolLM2-135M and Qwen2.5-0.5B with LoRA adapters, word scoring, each
#             precision this CPU runs: f32, bf16, int8; the chosen batching and --batching off)
#             against PyTorch BERT-large in f32, bf16 and int8 (quantize_dynamic,
#             scripts/torch_bert_server.py), mr test sentences over HTTP at 1, 8 and 32 clients;
#   memory    resident memory (RSS, PSS, USS) of one and of two verdict-serve processes on one
#             model, and cold (no pack file) and warm start times to /ready;
#   train     the SFT step (batch 8) against PEFT + transformers, the PPO step (16 rollouts of 8
#             free tokens, 4 epochs x 2 mini-batches of 8, LoRA r16 on q/v) against TRL 0.11's
#             PPOTrainer + PEFT (scripts/torch_train_step.py), on SmolLM2 exported by export-hf;
#   products  dense products at each serving and training shape (models/examples/products_bench)
#             against PyTorch's f32 / bf16 / int8 Linear (scripts/torch_products.py).
#
# It prints every ratio and writes $OUT.md (tables, with the CPU's lscpu model and flags on top)
# and $OUT.jsonl (every figure). About 45 minutes on 2 cores; run it on a quiet machine.
#
#   TORCH_PYTHON=/path/to/python scripts/bench_side_by_side.sh            # everything
#   PARTS=serve,memory TORCH_PYTHON=... scripts/bench_side_by_side.sh     # some parts
#
#   batching  (not in the default PARTS) only four servers resident, SmolLM2 and Qwen with the
#             default batching and with --batching off, ROUNDS (3) rounds at each client count:
#             batching against none, with the rounds' spread beside it.
#
# Settings (environment): PARTS (serve,memory,train,products), CLIENTS (1,8,32), SECONDS_PER (20)
# and REQUESTS (200) per endpoint and client count, OUT (docs/results/side-by-side/<cpu>), THREADS
# (compute threads per server; all cores), BASE_PORT (18400), SMOLLM2_ADAPTER / QWEN_ADAPTER (an
# adapter directory: default, a 2-step SFT adapter trained here; latency does not depend on the
# values). TORCH_PYTHON: a Python with torch, transformers, peft and trl 0.11
# (../shared/docs/references.md); without it only Verdict's side runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-serve,memory,train,products}
CLIENTS=${CLIENTS:-1,8,32}
SECONDS_PER=${SECONDS_PER:-20}
REQUESTS=${REQUESTS:-200}
BASE_PORT=${BASE_PORT:-18400}
cpu_model=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512bw|avx512_vnni|avx512_bf16|avx512_fp16|avx_vnni|amx_tile|amx_bf16|amx_int8)$' | tr '\n' ' ')
# lscpu's model name can be one word for a whole vendor line ("AMD EPYC" on Zen 4 and Zen 5 alike):
# the family and model numbers tell the microarchitectures apart.
cpu_family=$(sed -n 's/^cpu family[[:space:]]*: *//p' /proc/cpuinfo | head -1)
cpu_model_no=$(sed -n 's/^model[[:space:]]*: *//p' /proc/cpuinfo | head -1)
cpu_model="$cpu_model (family $cpu_family model $cpu_model_no)"
slug=$(echo "$cpu_model" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-' | sed 's/--*/-/g; s/^-//; s/-$//')
OUT=${OUT:-docs/results/side-by-side/$slug}
has() { [[ ",$PARTS," == *",$1,"* ]]; }

cargo build --release --bins
cargo build --release -p models --example products_bench
. scripts/lib.sh
target_dir=$(target_dir)
bin=$target_dir/release
cache=${VERDICT_CACHE_DIR:-$HOME/.cache/verdict}
"$bin/verdict-train" fetch smollm2 qwen0.5b minilm
"$bin/verdict-train" fetch-data mr

make_work verdict-sbs
mkdir -p "$(dirname "$OUT")"
: > "$OUT.jsonl"
md=$OUT.md
{
  echo "# Side by side on $cpu_model"
  echo
  echo "CPU: \`$cpu_model\`, $(nproc) cores; flags: \`$cpu_flags\`; $(date -u +%Y-%m-%d); commit $(git rev-parse --short HEAD);"
  echo "\`PARTS=$PARTS CLIENTS=$CLIENTS SECONDS_PER=$SECONDS_PER scripts/bench_side_by_side.sh\`. Compute threads per"
  echo "process: ${THREADS:-all cores}. Every figure below is from this one run."
  if [ -n "${TORCH_PYTHON:-}" ]; then
    echo "The reference side: $("$TORCH_PYTHON" -c 'import sys, torch, transformers, peft, trl; print(f"Python {sys.version.split()[0]}, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}")' 2>/dev/null || echo "TORCH_PYTHON=$TORCH_PYTHON lacks torch, transformers, peft or trl")."
  fi
  echo
} > "$md"
record() { echo "$1" >> "$OUT.jsonl"; }
threads=()
torch_threads=()
if [ -n "${THREADS:-}" ]; then threads=(--threads "$THREADS"); torch_threads=(--threads "$THREADS"); fi
# The precisions this CPU runs (models::cpu::Precision::check): f32 on AVX2 + FMA; bf16 on
# AVX-512 or AMX; int8 on AVX512-VNNI, AVX-VNNI or AMX. An AVX2-only CPU serves f32 alone.
has_flag() { [[ " $cpu_flags " == *" $1 "* ]]; }
precisions=(f32)
if has_flag avx512f || has_flag amx_bf16; then precisions+=(bf16); fi
if has_flag avx512_vnni || has_flag avx_vnni || has_flag amx_int8; then precisions+=(int8); fi
# The memory part measures the last (the narrowest panels this CPU runs).
mem_precision=${precisions[-1]}

quick_adapter() { # model, out
  "$bin/verdict-train" sft --model "$1" --task mr --out "$2" --max-steps 2 --batch-size 4 --eval-limit 20 \
    --save-every 2 --log-every 1 >&2
  echo "$2/adapter"
}
start_server() { # "name|verdict-serve arguments", port, log: starts it, adds its pid, waits for /ready
  # shellcheck disable=SC2086 # the arguments are words
  "$bin/verdict-serve" ${1#*|} --answer-scoring word --port "$2" --default-task mr --watch-interval-ms 0 \
    "${threads[@]}" 2> "$3" &
  pids+=($!)
  wait_ready "$2" "${1%%|*}" "$3" > /dev/null
}
registry() { # name, adapter dir
  mkdir -p "$work/$1/mr"
  cp -r "$2" "$work/$1/mr/v1"
  echo v1 > "$work/$1/mr/CURRENT"
}

if has serve || has memory || has batching; then
  registry smollm2 "${SMOLLM2_ADAPTER:-$(quick_adapter smollm2 "$work/runs/smollm2")}"
  registry qwen "${QWEN_ADAPTER:-$(quick_adapter qwen0.5b "$work/runs/qwen")}"
fi

# ---------------------------------------------------------------------------------------------
if has serve; then
  servers=()
  for m in smollm2 qwen; do
    model=$m; [ "$m" = qwen ] && model=qwen0.5b
    for p in "${precisions[@]}"; do
      servers+=("$m-$p|--model $model --cpu-matmul $p --adapters $work/$m")
    done
    # The defaults (--cpu-matmul auto, --batching auto) against the same without batching.
    servers+=("$m-auto|--model $model --adapters $work/$m")
    servers+=("$m-auto-nobatch|--model $model --batching off --adapters $work/$m")
  done
  endpoints=()
  port=$BASE_PORT
  for s in "${servers[@]}"; do
    name=${s%%|*}
    # One at a time: each measures its batching mode at start-up on a quiet machine.
    start_server "$s" "$port" "$work/$name.log"
    echo "$name: $(grep -m1 '^verdict-serve: kernels: --cpu-matmul auto' "$work/$name.log" | sed 's/^verdict-serve: kernels: //')" \
      "$(grep -m1 '^verdict-serve: batching ' "$work/$name.log" | sed 's/^verdict-serve: //')" | tee -a "$work/choices.txt"
    endpoints+=(--endpoint "$name=http://127.0.0.1:$port/v1/classify")
    port=$((port + 1))
  done
  if [ -n "${TORCH_PYTHON:-}" ]; then
    for dt in f32 bf16 int8; do
      name=bert-large-torch-$dt
      "$TORCH_PYTHON" scripts/torch_bert_server.py --shape large --dtype "$dt" --port "$port" "${torch_threads[@]}" \
        --tokenizer "$cache/models/all-minilm-l6-v2/tokenizer.json" 2> "$work/$name.log" &
      pids+=($!)
      wait_ready "$port" "$name" "$work/$name.log" > /dev/null
      endpoints+=(--endpoint "$name=http://127.0.0.1:$port/v1/classify")
      port=$((port + 1))
    done
    baseline=(--baseline bert-large-torch-f32)
  else
    baseline=()
  fi
  "$bin/verdict-bench" --task mr --clients "$CLIENTS" --requests "$REQUESTS" --seconds "$SECONDS_PER" \
    "${baseline[@]}" "${endpoints[@]}" --note "serve part of $OUT.md" \
    --out-md "$work/serve.md" --out-json "$work/serve.json" --out-svg "$OUT-serve.svg"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  {
    echo "## Serving: mr test sentences over HTTP, one per request (verdict-bench)"
    echo
    echo "Decoders with \`--answer-scoring word\`; \`-auto\`: the default precision and batching (chosen by"
    echo "measurement); \`-nobatch\`: \`--batching off\`. What each server chose at start-up:"
    echo
    sed 's/^/- /' "$work/choices.txt"
    echo
    cat "$work/serve.md"
    echo
  } >> "$md"
  python3 - "$work/serve.json" >> "$md" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
rows = rows.get("results", rows) if isinstance(rows, dict) else rows
by = {}
for r in rows:
    by[(r["endpoint"], r["clients"])] = r
def get(name, c, key):
    r = by.get((name, c))
    return None if r is None else r.get(key)
clients = sorted({c for (_, c) in by})
print("Ratios (p50 latency: Verdict / BERT-large, lower is better; throughput: Verdict / BERT-large, higher is better):")
print()
print("| endpoint | clients | p50 / BERT f32 | p50 / BERT int8 | req/s / BERT f32 | req/s / no batching |")
print("|---|---:|---:|---:|---:|---:|")
for (name, c), r in sorted(by.items()):
    if name.startswith("bert"):
        continue
    def ratio(a, b):
        return "" if a is None or b in (None, 0) else f"{a / b:.2f}"
    nob = name + "-nobatch"
    print(f"| {name} | {c} | {ratio(get(name, c, 'p50_ms'), get('bert-large-torch-f32', c, 'p50_ms'))} | "
          f"{ratio(get(name, c, 'p50_ms'), get('bert-large-torch-int8', c, 'p50_ms'))} | "
          f"{ratio(get(name, c, 'throughput'), get('bert-large-torch-f32', c, 'throughput'))} | "
          f"{ratio(get(name, c, 'throughput'), get(nob, c, 'throughput')) if name.endswith('-auto') else ''} |")
print()
PY
  python3 -c "import json,sys; [print(json.dumps({'part':'serve', **r})) for r in (lambda d: d.get('results', d) if isinstance(d, dict) else d)(json.load(open(sys.argv[1])))]" "$work/serve.json" >> "$OUT.jsonl"
fi

# ---------------------------------------------------------------------------------------------
if has batching; then
  # Batching against none, with only these four servers resident and ROUNDS rounds one after
  # another: the spread between rounds of one server shows this machine's noise beside the
  # difference batching makes.
  rounds=${ROUNDS:-3}
  bservers=("s-auto|--model smollm2 --adapters $work/smollm2" "s-off|--model smollm2 --batching off --adapters $work/smollm2"
    "q-auto|--model qwen0.5b --adapters $work/qwen" "q-off|--model qwen0.5b --batching off --adapters $work/qwen")
  bendpoints=()
  port=$BASE_PORT
  for s in "${bservers[@]}"; do
    name=${s%%|*}
    start_server "$s" "$port" "$work/b-$name.log"
    bendpoints+=(--endpoint "$name=http://127.0.0.1:$port/v1/classify")
    port=$((port + 1))
  done
  for r in $(seq 1 "$rounds"); do
    "$bin/verdict-bench" --task mr --clients "$CLIENTS" --requests "$REQUESTS" --seconds "$SECONDS_PER" \
      "${bendpoints[@]}" --note "batching part of $OUT.md, round $r" --out-json "$work/batching-$r.json" > /dev/null
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  python3 - "$rounds" "$work" >> "$md" 2>> "$OUT.jsonl" <<'PY'
import json, statistics, sys
rounds, work = int(sys.argv[1]), sys.argv[2]
def rows(r):
    d = json.load(open(f"{work}/batching-{r}.json"))
    return d.get("results", d) if isinstance(d, dict) else d
tput = {}
for r in range(1, rounds + 1):
    for row in rows(r):
        tput.setdefault((row["endpoint"], row["clients"]), []).append(row["throughput"])
print(f"## Batching against none: four servers resident, {rounds} rounds (verdict-bench)")
print()
print("Default precision and batching (`-auto`, chosen at start-up) against `--batching off`; req/s of each round,")
print("and the ratio of the medians (>= 1: batching is at least as fast).")
print()
print("| model | clients | batching req/s (rounds) | off req/s (rounds) | median ratio |")
print("|---|---:|---|---|---:|")
for m, name in [("s", "SmolLM2-135M"), ("q", "Qwen2.5-0.5B")]:
    for c in sorted({c for (_, c) in tput}):
        a, o = tput.get((f"{m}-auto", c), []), tput.get((f"{m}-off", c), [])
        if not a or not o:
            continue
        ratio = statistics.median(a) / statistics.median(o)
        fmt = lambda v: " / ".join(f"{x:.2f}" for x in v)
        print(f"| {name} | {c} | {fmt(a)} | {fmt(o)} | {ratio:.2f} |")
        print(json.dumps({"part": "batching", "model": name, "clients": c, "auto": a, "off": o, "ratio": ratio}), file=sys.stderr)
print()
PY
fi

# ---------------------------------------------------------------------------------------------
rss_of() { # pid: "rss pss uss" in MiB (smaps_rollup)
  python3 - "$1" <<'PY'
import sys
f = {}
for line in open(f"/proc/{sys.argv[1]}/smaps_rollup"):
    parts = line.split()
    if len(parts) >= 3 and parts[-1] == "kB":
        f[parts[0].rstrip(":")] = int(parts[1])
uss = f.get("Private_Clean", 0) + f.get("Private_Dirty", 0)
print(f"{f['Rss'] / 1024:.0f} {f['Pss'] / 1024:.0f} {uss / 1024:.0f}")
PY
}
if has memory; then
  {
    echo "## Memory and start-up (verdict-serve, $mem_precision panels, one request served before measuring)"
    echo
    echo "| model | cold start to /ready | warm start to /ready | 1st process RSS / PSS / USS | 2nd process RSS / PSS / USS | 2nd adds (USS / 1st RSS) | 2nd adds after 2 s idle |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
  } >> "$md"
  body='{"task": "mr", "inputs": "a gripping, beautifully acted film ."}'
  for m in smollm2 qwen; do
    model=$m; [ "$m" = qwen ] && model=qwen0.5b
    gguf=$(ls "$cache"/models/ | grep -i "$( [ $m = qwen ] && echo qwen || echo smollm2)" | grep '\.gguf$' | head -1)
    rm -f "$cache/models/$gguf.verdict/$mem_precision.pack"
    port=$BASE_PORT
    args=(--model "$model" --cpu-matmul "$mem_precision" --adapters "$work/$m" --default-task mr --watch-interval-ms 0 "${threads[@]}")
    "$bin/verdict-serve" "${args[@]}" --port "$port" 2> "$work/cold.log" & p1=$!
    cold=$(wait_ready "$port" cold "$work/cold.log")
    kill $p1; wait $p1 2>/dev/null || true
    "$bin/verdict-serve" "${args[@]}" --port "$port" 2> "$work/warm1.log" & p1=$!
    pids+=($p1)
    warm=$(wait_ready "$port" warm "$work/warm1.log")
    curl -fsS -H 'content-type: application/json' -d "$body" "http://127.0.0.1:$port/v1/classify" > /dev/null
    read -r r1 s1 u1 <<< "$(rss_of $p1)"
    "$bin/verdict-serve" "${args[@]}" --port $((port + 1)) 2> "$work/warm2.log" & p2=$!
    pids+=($p2)
    wait_ready $((port + 1)) warm2 "$work/warm2.log" > /dev/null
    curl -fsS -H 'content-type: application/json' -d "$body" "http://127.0.0.1:$((port + 1))/v1/classify" > /dev/null
    read -r r2 s2 u2 <<< "$(rss_of $p2)"
    read -r r1b s1b u1b <<< "$(rss_of $p1)"
    # The server hands its free heap pages back once its queue has been idle for 1 s.
    sleep 2
    read -r _ _ u2idle <<< "$(rss_of $p2)"
    kill $p1 $p2; wait $p1 $p2 2>/dev/null || true
    pids=()
    adds=$(python3 -c "print(f'{$u2 / $r1:.3f}')")
    adds_idle=$(python3 -c "print(f'{$u2idle / $r1:.3f}')")
    echo "| $m | $cold s | $warm s | $r1 / $s1b / $u1 MiB | $r2 / $s2 / $u2 MiB | $adds | $u2idle MiB, $adds_idle |" >> "$md"
    record "{\"part\": \"memory\", \"model\": \"$m\", \"cold_s\": $cold, \"warm_s\": $warm, \"rss1_mib\": $r1, \"pss1_mib\": $s1b, \"uss1_mib\": $u1, \"rss2_mib\": $r2, \"pss2_mib\": $s2, \"uss2_mib\": $u2, \"uss2_idle_mib\": $u2idle}"
    echo "memory $m: cold $cold s, warm $warm s, RSS $r1 MiB, 2nd process adds $u2 MiB private ($adds of the 1st's RSS; $u2idle MiB, $adds_idle, after 2 s idle)"
  done
  echo >> "$md"
fi

# ---------------------------------------------------------------------------------------------
if has train; then
  hf=$work/smollm2-hf
  "$bin/verdict-train" export-hf --model smollm2 --out "$hf" >&2
  "$bin/verdict-train" tasks --show mr --model smollm2 --dump 64 --out "$work/mr-smollm2.jsonl" > /dev/null
  med() { python3 -c "
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '\"step_seconds\"' in l][1:]
print(f'{statistics.median(r[\"step_seconds\"] for r in rows):.2f}')" "$1"; }
  "$bin/verdict-train" sft --model smollm2 --task mr --out "$work/sft" --max-steps 6 --batch-size 8 --eval-every 0 \
    --eval-limit 16 --save-every 1000 --log-every 1 "${threads[@]}" >&2
  v_sft=$(med "$work/sft/metrics.jsonl")
  "$bin/verdict-train" ppo --model smollm2 --task mr --out "$work/ppo" --max-steps 3 --batch-size 16 \
    --mini-batch-size 8 --ppo-epochs 4 --action-space free --max-new-tokens 8 --min-new-tokens 8 --eval-every 0 \
    --eval-limit 16 --save-every 1000 --log-every 1 "${threads[@]}" >&2
  v_ppo=$(python3 -c "
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '\"step_seconds\"' in l][1:]
print(f'{statistics.median(r[\"step_seconds\"] for r in rows):.2f}')" "$work/ppo/metrics.jsonl")
  t_sft=""; t_ppo=""
  if [ -n "${TORCH_PYTHON:-}" ]; then
    t_sft=$("$TORCH_PYTHON" scripts/torch_train_step.py sft --model "$hf" --examples "$work/mr-smollm2.jsonl" --steps 6 \
      "${torch_threads[@]}" | tail -1 | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["median_seconds"])')
    t_ppo=$("$TORCH_PYTHON" scripts/torch_train_step.py ppo --model "$hf" --examples "$work/mr-smollm2.jsonl" --steps 3 \
      "${torch_threads[@]}" | tail -1 | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["median_seconds"])')
  fi
  ratio() { [ -n "$2" ] && python3 -c "print(f'{$1 / $2:.2f}')" || echo ""; }
  {
    echo "## Training steps (SmolLM2-135M, LoRA r16 on q/v; median of the steps after the first)"
    echo
    echo "| step | verdict-train | PyTorch | Verdict / PyTorch |"
    echo "|---|---:|---:|---:|"
    echo "| SFT, batch 8 (PEFT 0.21 + transformers) | $v_sft s | ${t_sft:-} s | $(ratio "$v_sft" "$t_sft") |"
    echo "| PPO, 16 rollouts x 8 free tokens, 4 epochs x 2 mini-batches of 8 (TRL 0.11 PPOTrainer + PEFT) | $v_ppo s | ${t_ppo:-} s | $(ratio "$v_ppo" "$t_ppo") |"
    echo
  } >> "$md"
  record "{\"part\": \"train\", \"verdict_sft_s\": $v_sft, \"torch_sft_s\": ${t_sft:-null}, \"verdict_ppo_s\": $v_ppo, \"torch_ppo_s\": ${t_ppo:-null}}"
  echo "train: SFT $v_sft s vs ${t_sft:-?} s ($(ratio "$v_sft" "$t_sft")), PPO $v_ppo s vs ${t_ppo:-?} s ($(ratio "$v_ppo" "$t_ppo"))"
fi

# ---------------------------------------------------------------------------------------------
if has products; then
  rows=1,8,35,64,128,512,2048
  VERDICT_CACHE_DIR=$cache "$target_dir/release/examples/products_bench" --rows "$rows" --json > "$work/verdict-products.jsonl"
  if [ -n "${TORCH_PYTHON:-}" ]; then
    "$TORCH_PYTHON" scripts/torch_products.py --rows "$rows" "${torch_threads[@]}" > "$work/torch-products.jsonl"
  else
    : > "$work/torch-products.jsonl"
  fi
  python3 - "$work/verdict-products.jsonl" "$work/torch-products.jsonl" >> "$md" <<'PY'
import json, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
theirs = {(r["model"], r["product"], r["rows"]): r for r in (json.loads(l) for l in open(sys.argv[2]) if l.strip())}
print("## Dense products, GFLOP/s (int8: GOP/s), Verdict's planned tiling / PyTorch's Linear")
print()
print("Rows 1-64 are serving shapes, 128-2048 training shapes; `grad` is the input gradient's product")
print("(the transposed weight). Ratio: Verdict / PyTorch in the same precision.")
print()
print("| model | product | rows | f32 | torch f32 | ratio | bf16 | torch bf16 | ratio | int8 | torch int8 | ratio |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in ours:
    t = theirs.get((r["model"], r["product"], r["rows"]), {})
    cells = []
    for p in ["f32", "bf16", "int8"]:
        v = r.get(p, {}).get("gflops")
        w = t.get(f"torch_{p}")
        cells += [f"{v:.0f}" if v else "", f"{w:.0f}" if w else "", f"{v / w:.2f}" if v and w else ""]
    print(f"| {r['model']} | {r['product']} | {r['rows']} | " + " | ".join(cells) + " |")
print()
PY
  python3 -c "import json,sys; [print(json.dumps({'part':'products', **json.loads(l)})) for l in open(sys.argv[1]) if l.strip()]" "$work/verdict-products.jsonl" >> "$OUT.jsonl"
  python3 -c "import json,sys; [print(json.dumps({'part':'products-torch', **json.loads(l)})) for l in open(sys.argv[1]) if l.strip()]" "$work/torch-products.jsonl" >> "$OUT.jsonl"
fi
echo "wrote $md and $OUT.jsonl"
