#!/usr/bin/env bash
# `mr` SFT on an architecture none of the shipped models has, end to end through verdict-serve
# (issue 19): a tiny seeded Qwen3 (q/k RMS norms; transformers writes it, seed 0) with
# SmolLM2's tokenizer and Qwen3's real chat template, as a Hugging Face directory. LoRA SFT on
# `mr`, eval on the test split, promote, serve, classify every test sentence over HTTP, and
# compare the served answers with the evaluator's. No registry package carries real Qwen3,
# Mistral or Gemma weights, so the base is random: the accuracy is what LoRA alone learns on it.
#
#   TORCH_PYTHON=/path/to/python scripts/new_arch_mr.sh [out_dir]     # torch + transformers 5
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
py=${TORCH_PYTHON:?set TORCH_PYTHON to a python with torch and transformers}
out=${1:-runs/new-arch}
steps=${STEPS:-400}
mkdir -p "$out"
cargo build --release --bins
bin=$(target_dir)/release
"$bin/verdict-train" fetch smollm2
"$bin/verdict-train" fetch-data mr

echo "== the tokenizer: SmolLM2's (export-hf writes it beside the weights)"
[ -f "$out/smollm2-hf/tokenizer.json" ] || "$bin/verdict-train" export-hf --model smollm2 --out "$out/smollm2-hf"

echo "== a tiny seeded Qwen3 with that tokenizer and Qwen3's chat template"
"$py" - "$out/smollm2-hf" "$out/qwen3-tiny" <<'PY'
import json, pathlib, shutil, sys
import torch, transformers
src, dst = map(pathlib.Path, sys.argv[1:])
tc = json.loads((src / "tokenizer_config.json").read_text())
vocab = json.loads((src / "tokenizer.json").read_text())
n_vocab = max(t["id"] for t in vocab["added_tokens"]) + 1
n_vocab = max(n_vocab, len(vocab["model"]["vocab"]))
torch.manual_seed(0)
cfg = transformers.Qwen3Config(vocab_size=n_vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                               rope_theta=1e6, tie_word_embeddings=True, bos_token_id=None,
                               eos_token_id=vocab["model"]["vocab"].get("<|im_end|>"))
model = transformers.Qwen3ForCausalLM(cfg).eval()
model.save_pretrained(dst, safe_serialization=True)
shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
tc["chat_template"] = pathlib.Path("tests/fixtures/chat_templates/qwen3.jinja").read_text()
(dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
print(f"{dst}: qwen3, {sum(p.numel() for p in model.parameters())} parameters, transformers {transformers.__version__}")
PY
model="$out/qwen3-tiny"
"$bin/verdict-train" tasks --show mr --model "$model" | head -3

echo "== LoRA SFT on mr ($steps steps of 16)"
"$bin/verdict-train" sft --model "$model" --task mr --out "$out/sft" --max-steps "$steps" --batch-size 16 \
  --lr 2e-3 --rank 16 --warmup-steps 20 --eval-every 100 --eval-limit 300 --save-every 100 --log-every 20 --resume
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
