#!/usr/bin/env bash
# Run on the GPU machine (docs/gpu.md), from the repository root, with the bundle made by
# scripts/build_cuda.sh carried along:
#   scripts/gpu_check.sh [dist/verdict-gpu.tar.zst]
# Unpacks the bundle, points the loader at the machine's CUDA 13 libraries, checks that every
# library the binaries need resolves, and runs the GPU tests: precision and CPU parity of the
# model (models/tests/devices.rs) and SFT, PPO, the reward model, eval and serving on the GPU
# against the CPU (tests/tests/gpu.rs). With models in $VERDICT_CACHE_DIR it also runs
# `verdict-train bench --device cuda` on them.
set -euo pipefail
bundle=${1:-dist/verdict-gpu.tar.zst}
work=${VERDICT_GPU_WORK:-/tmp/verdict-gpu}
rm -rf "$work" && mkdir -p "$work"
if command -v zstd >/dev/null; then
  zstd -dc "$bundle" | tar -C "$work" -xf -
else
  python3 -c 'import sys, zstandard; zstandard.ZstdDecompressor().copy_stream(open(sys.argv[1], "rb"), sys.stdout.buffer)' \
    "$bundle" | tar -C "$work" -xf -
fi
bin="$work/verdict-gpu"

# CUDA 13 user-space libraries: the system toolkit, else a Python environment's NVIDIA wheels.
libdirs=$(find / \( -path /proc -o -path /sys \) -prune -o \
  \( -name 'libcublas.so.13*' -o -name 'libcurand.so.10*' -o -name 'libcudart.so.13*' -o -name 'libnvrtc.so.13*' \) \
  -print 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
missing=$(ldd "$bin/verdict-train" "$bin/verdict-serve" | grep 'not found' || true)
[ -z "$missing" ] || { echo "unresolved libraries:"; echo "$missing"; exit 1; }
echo "every library resolves (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"

status=0
echo "== models/tests/devices.rs on the GPU"
"$bin/deps/devices" --test-threads=1 || status=1
echo "== tests/tests/gpu.rs: the binaries on the GPU against the CPU"
"$bin/deps/gpu" --test-threads=1 || status=1

if [ -n "${VERDICT_CACHE_DIR:-}" ]; then
  echo "== prefill and decode speed on the GPU"
  "$bin/verdict-train" bench --device cuda --model "${BENCH_MODELS:-smollm2}" --weights dense --repeats 5 || status=1
fi
exit $status
