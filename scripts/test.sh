#!/usr/bin/env bash
# The test command: build the binaries, fetch the real models the tests use (skipped when
# already cached and verified), run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
./target/debug/verdict-train fetch smollm2 qwen0.5b
cargo test --workspace
