#!/usr/bin/env bash
# `mr` SFT on an architecture none of the shipped models has, end to end through verdict-serve
# (issue 19). No registry package carries Qwen3, Mistral or Gemma weights, so the base is
# SmolLM2-135M's real weights written as a `mistral` checkpoint (MistralForCausalLM: Llama's
# layers plus a sliding attention window) with a 64-token window, shorter than the prompts
# (about 120 tokens), so the window changes what the model computes and the adapter learns
# under it. LoRA SFT on `mr`, eval on the test split, promote, serve, classify every test
# sentence over HTTP, and compare the served answers with the evaluator's.
#
#   scripts/new_arch_mr.sh [out_dir]
#   (PROFILE=dev uses the debug build: the kernels and dependencies are optimised there too)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
out=${1:-runs/new-arch}
steps=${STEPS:-150}
mkdir -p "$out"
profile=${PROFILE:-release}
cargo build --profile "$profile" --bins
bin=$(target_dir)/$([ "$profile" = dev ] && echo debug || echo "$profile")
"$bin/verdict-train" fetch smollm2
"$bin/verdict-train" fetch-data mr

echo "== SmolLM2 as a transformers directory (export-hf)"
[ -f "$out/smollm2-hf/tokenizer.json" ] || "$bin/verdict-train" export-hf --model smollm2 --out "$out/smollm2-hf"

echo "== SmolLM2's weights as a mistral checkpoint with a 64-token sliding window"
rm -rf "$out/mistral-smollm2"
cp -r "$out/smollm2-hf" "$out/mistral-smollm2"
python3 - "$out/mistral-smollm2/config.json" <<'PY'
import json, sys
path = sys.argv[1]
cfg = json.load(open(path))
cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64)
json.dump(cfg, open(path, "w"), indent=1)
print(f"{path}: mistral, sliding_window 64, {cfg['num_hidden_layers']} layers")
PY
model="$out/mistral-smollm2"
"$bin/verdict-train" tasks --show mr --model "$model" | head -3

echo "== LoRA SFT on mr ($steps steps of 8, the flags of the SmolLM2 run in docs/results.md)"
"$bin/verdict-train" sft --model "$model" --task mr --out "$out/sft" --max-steps "$steps" --batch-size 8 \
  --lr 2e-4 --warmup-steps 10 --eval-every 50 --eval-limit 300 --save-every 25 --log-every 10 --resume
echo "== eval on the whole test split"
"$bin/verdict-train" eval --model "$model" --task mr --split test --adapter "$out/sft/best" --batch-size 32 \
  --predictions --out "$out/eval-test.json"

echo "== promote into $out/adapters and serve"
rm -rf "$out/adapters"
"$bin/verdict-train" promote --model "$model" --task mr --candidate "$out/sft/best" --adapters "$out/adapters" \
  --eval-limit 100 --batch-size 32 --force
make_work verdict-new-arch
port=${VERDICT_PORT:-8093}
VERDICT_KERNEL_PLAN=defaults "$bin/verdict-serve" --model "$model" --adapters "$out/adapters" --port "$port" \
  >"$out/serve.log" 2>&1 &
pids+=($!)
wait_ready "$port" verdict-serve "$out/serve.log" >/dev/null
curl -fsS "http://127.0.0.1:$port/v1/tasks" | python3 -c "import json,sys; t=[t for t in json.load(sys.stdin) if t['name']=='mr'][0]; print('served:', t['adapter_version'], '|', t['prompt_layout'])"

echo "== every test sentence over HTTP, against the evaluator's answers"
python3 - "$port" "$out/eval-test.json" "${VERDICT_CACHE_DIR:-$HOME/.cache/verdict}/data/mr/test.jsonl" <<'PY'
import json, sys, urllib.request
port, report, test = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(test)]
ev = {p["id"]: p for p in json.load(open(report))["tasks"][0]["predictions"]}
words = ["Negative", "Positive"]
flips, diff, right = 0, 0.0, 0
for i in range(0, len(rows), 32):
    batch = rows[i:i + 32]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/classify", method="POST",
                                 data=json.dumps({"task": "mr", "inputs": [r["sentence"] for r in batch]}).encode(),
                                 headers={"content-type": "application/json"})
    for r, c in zip(batch, json.load(urllib.request.urlopen(req))["results"]):
        e = ev[r["id"]]
        flips += words[e["predicted"]["class"]] != c["label"]
        diff = max(diff, max(abs(c["probabilities"][w] - p) for w, p in zip(words, e["probs"])))
        right += c["label"].lower() == r["label"]
print(f"{len(rows)} sentences served: accuracy {right / len(rows):.4f}; {flips} labels differ from eval's; "
      f"largest probability difference {diff:.2e}")
PY
