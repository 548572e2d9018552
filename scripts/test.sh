#!/usr/bin/env bash
# The test command: build the binaries, fetch the real models the tests use (SmolLM2, Qwen,
# MiniLM; skipped when already cached and verified), run every test of the workspace, and close
# with one summary line over all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
# Servers and commands started by the tests use each kernel family's default tiles: a plan
# measured while tests load both cores would be noise, and would land in the user's cache. The
# measuring itself is tested on its own (models' cpu::options tests, tests/tests/kernels_cli.rs).
export VERDICT_KERNEL_PLAN=${VERDICT_KERNEL_PLAN:-defaults}
# Likewise the servers batch as packed rows instead of measuring at start-up (tests/tests/
# serve_api.rs measures on its own, into a temporary cache).
export VERDICT_BATCHING=${VERDICT_BATCHING:-packed}
cargo build --workspace --bins
"$(target_dir)/debug/verdict-train" fetch smollm2 qwen0.5b minilm
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace 2>&1 | tee "$log" || status=$?
# Schemathesis against the OpenAPI document (issue 18): installed from the Python registry into
# the target directory once (pinned), then its ignored test runs (the same targets as above, so
# nothing is built again; only the ignored test named schemathesis runs). A failed install fails the
# command: the check must not silently not run.
schemathesis_env="$(target_dir)/schemathesis-4.32.5"
if [ ! -x "$schemathesis_env/bin/schemathesis" ]; then
  python3 -m venv "$schemathesis_env" && "$schemathesis_env/bin/pip" install -q schemathesis==4.32.5 || {
    echo "could not install schemathesis 4.32.5 from the Python registry: its check did not run" >&2
    status=1
  }
fi
if [ -x "$schemathesis_env/bin/schemathesis" ]; then
  VERDICT_SCHEMATHESIS="$schemathesis_env/bin/schemathesis" \
    cargo test --workspace -- --ignored schemathesis 2>&1 | tee -a "$log" || status=$?
fi
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | paste -sd+ | bc)
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | paste -sd+ | bc)
echo "${passed:-0} passed, ${failed:-0} failed"
exit "$status"
