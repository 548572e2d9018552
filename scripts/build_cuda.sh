#!/usr/bin/env bash
# Builds the `cuda` binaries on a machine without a GPU or a CUDA install, and packs them for
# the GPU machine (docs/gpu.md):
#   1. a CUDA 13.0 toolkit assembled from NVIDIA's PyPI wheels (nvcc, headers, cuBLAS, cuRAND,
#      NVRTC, runtime), once, under $VERDICT_CUDA_ROOT (default ~/.cache/verdict/cuda13);
#   2. a stub libcuda.so.1 to link against (the driver library comes with the GPU machine's
#      driver; no wheel ships it), defining the cu* symbols cudarc calls;
#   3. `cargo build --release` of verdict-train, verdict-serve and the serving benchmark with
#      `--features cuda`, and the GPU test binaries (models/tests/devices.rs,
#      tests/tests/gpu.rs), into target/cuda (the CPU build in target/ is left alone);
#   4. dist/verdict-gpu.tar.zst (stripped binaries, the test binaries laid out so that they
#      find the binaries, scripts/gpu_check.sh), small enough for the device tool's carry.
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200), VERDICT_CUDA_ROOT, PIP (default pip),
# VERDICT_CUDA_WHEELS (a directory to download the wheels into, or that already has them).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
root=${VERDICT_CUDA_ROOT:-$HOME/.cache/verdict/cuda13}
cap=${CUDA_COMPUTE_CAP:-90}
pip=${PIP:-pip}

if [ ! -x "$root/nvidia/cu13/bin/nvcc" ]; then
  echo "== assembling the CUDA 13.0 toolkit from PyPI wheels into $root"
  wheels=${VERDICT_CUDA_WHEELS:-$(mktemp -d)}
  "$pip" download --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$wheels" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*"
  tmp="$root.partial"
  rm -rf "$tmp" && mkdir -p "$tmp"
  for w in "$wheels"/*.whl; do unzip -q -o "$w" -d "$tmp"; done
  rm -rf "$root" && mv "$tmp" "$root"
fi
cuda="$root/nvidia/cu13"
chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/* 2>/dev/null || true
# The wheels ship versioned libraries only; the linker looks for lib<name>.so.
for lib in cublas cublasLt cudart curand nvrtc; do
  so=$(cd "$cuda/lib" && ls "lib$lib.so."* 2>/dev/null | sort | head -1 || true)
  [ -n "$so" ] || { echo "lib$lib.so.* missing from $cuda/lib"; exit 1; }
  ln -sf "$so" "$cuda/lib/lib$lib.so"
done

echo "== stub libcuda.so.1 (link time only; the GPU machine's driver provides the real one)"
cargo fetch --quiet
ver=$(grep -A1 '^name = "cudarc"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$ver" | head -1)
mkdir -p "$cuda/lib/stubs"
grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u |
  sed 's/.*/int &(void) { return 999; }/' >"$cuda/lib/stubs/libcuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$cuda/lib/stubs/libcuda_stub.c"

echo "== cargo build --features cuda (compute capability $cap) into target/cuda"
export CUDA_HOME="$cuda" CUDA_ROOT="$cuda" PATH="$cuda/bin:$PATH" CUDA_COMPUTE_CAP="$cap"
export NVCC_PREPEND_FLAGS="-I$cuda/include ${NVCC_PREPEND_FLAGS:-}"
export CARGO_TARGET_DIR="$repo/target/cuda" CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
nvcc --version | tail -2
cargo build --release -p trainer -p serve --features trainer/cuda,serve/cuda --bins --examples
tests_json=$(mktemp)
cargo test --release --no-run -p models -p tests --features models/cuda,tests/cuda --test devices --test gpu \
  --message-format=json >"$tests_json"
mapfile -t test_bins < <(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("devices", "gpu"):
        print(m["executable"])' "$tests_json")
rm -f "$tests_json"
[ "${#test_bins[@]}" -eq 2 ] || { echo "expected the devices and gpu test binaries, got: ${test_bins[*]}"; exit 1; }

echo "== packing dist/verdict-gpu.tar.zst"
stage=$(mktemp -d)
mkdir -p "$stage/verdict-gpu/deps" dist
rel="$CARGO_TARGET_DIR/release"
cp "$rel/verdict-train" "$rel/verdict-serve" "$rel/examples/serve_bench" "$stage/verdict-gpu/"
# tests::binary() finds the binaries two levels above a test executable: keep that layout.
for t in "${test_bins[@]}"; do cp "$t" "$stage/verdict-gpu/deps/$(basename "$t" | sed 's/-[0-9a-f]*$//')"; done
cp scripts/gpu_check.sh "$stage/verdict-gpu/"
strip "$stage"/verdict-gpu/deps/* 2>/dev/null || true
tar -C "$stage" -cf - verdict-gpu | zstd -q -19 -T0 -f -o dist/verdict-gpu.tar.zst
rm -rf "$stage"
ls -l dist/verdict-gpu.tar.zst
echo "NEEDED by verdict-train:"
readelf -d "$rel/verdict-train" | grep NEEDED

echo "== smoke check here, with the stub standing in for the driver"
# The binaries must load and run their CPU paths; a CUDA device must fail at the (stub) driver.
stubrt=$(mktemp -d)
ln -s "$cuda/lib/stubs/libcuda.so" "$stubrt/libcuda.so.1"
export LD_LIBRARY_PATH="$stubrt:$cuda/lib"
"$rel/verdict-train" --version
"$rel/verdict-serve" --version
for t in "${test_bins[@]}"; do "$t" --list >/dev/null; done
for t in "${test_bins[@]}"; do
  case "$(basename "$t")" in devices-*) "$t" --skip cuda --test-threads=1 | grep "test result" ;; esac
done
if "$rel/verdict-train" bench --device cuda --model none 2>"$stubrt/err"; then
  echo "a CUDA device opened against the stub driver: the check is broken"; exit 1
fi
grep -q "DriverError" "$stubrt/err" || { cat "$stubrt/err"; exit 1; }
echo "--device cuda reaches the driver (stub: CUDA_ERROR_UNKNOWN, as expected here)"
rm -rf "$stubrt"
