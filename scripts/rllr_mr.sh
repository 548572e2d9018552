#!/usr/bin/env bash
# RLLR on `mr` for one model (default SmolLM2-135M): a reward model from label-sensitive pairs,
# started from the SFT adapter as RLLR does, then PPO from the SFT adapter on the learned and on
# the mixed reward with the same settings as the rule-reward run of docs/results.md, then each
# best adapter on the whole test split. Each stage is skipped when its output exists, and a
# killed stage continues with --resume, so the script can be rerun after an interruption.
#   MODEL=smollm2 SFT=runs/mr-smollm2/best THREADS=2 scripts/rllr_mr.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
model=${MODEL:-smollm2}
sft=${SFT:-runs/mr-$model/best}
tag=${TAG:-mr-$model}
rm_steps=${RM_STEPS:-150}
ppo_steps=${PPO_STEPS:-20}
threads=${THREADS:-2}
out=${OUT:-docs/results/rllr}
bin=$(target_dir)/release/verdict-train
[ -n "${NO_BUILD:-}" ] || cargo build --release --bins
mkdir -p "$out"
[ -d "$sft" ] || { echo "no SFT adapter at $sft: train one first (docs/results.md)"; exit 1; }

resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }

if [ ! -d "runs/$tag-rm/best" ] || [ ! -f "runs/$tag-rm/adapter/manifest.json" ]; then
  echo "== reward model ($rm_steps steps)"
  /usr/bin/time -f "wall %e s, max RSS %M KB" "$bin" --threads "$threads" reward-model --model "$model" --task mr \
    --init-adapter "$sft" --out "runs/$tag-rm" $(resume "runs/$tag-rm") \
    --max-steps "$rm_steps" --batch-size 8 --eval-every 50 --eval-limit 300 --save-every 25 --log-every 5
fi
cp "runs/$tag-rm/metrics.jsonl" "$out/$tag-rm-metrics.jsonl"
cp "runs/$tag-rm/curves.svg" "$out/$tag-rm-curves.svg"

for reward in learned mixed; do
  run="runs/$tag-ppo-$reward"
  if [ ! -f "$run/adapter/manifest.json" ]; then
    echo "== PPO, $reward reward ($ppo_steps steps)"
    /usr/bin/time -f "wall %e s, max RSS %M KB" "$bin" --threads "$threads" ppo --model "$model" --task mr \
      --init-adapter "$sft" --reward "$reward" --reward-model "runs/$tag-rm/best" --out "$run" $(resume "$run") \
      --max-steps "$ppo_steps" --lr 5e-5 --batch-size 16 --mini-batch-size 8 --ppo-epochs 4 \
      --eval-every 10 --eval-limit 200 --save-every 5 --log-every 1
  fi
  cp "$run/metrics.jsonl" "$out/$tag-ppo-$reward-metrics.jsonl"
  cp "$run/curves.svg" "$out/$tag-ppo-$reward-curves.svg"
  report="$out/$tag-ppo-$reward-best-constrained.json"
  if [ ! -f "$report" ]; then
    echo "== test evaluation, $reward reward"
    "$bin" --threads "$threads" eval --model "$model" --task mr --split test --adapter "$run/best" \
      --batch-size 16 --predictions --out "$report"
  fi
done
python3 scripts/results_table.py "$out"/*-best-constrained.json
