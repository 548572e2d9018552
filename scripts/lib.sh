# Sourced by the scripts: where cargo puts the binaries. `CARGO_TARGET_DIR`, a `build.target-dir`
# in a cargo config, or ./target: cargo metadata knows which.
target_dir() {
  cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}

# A temporary work directory in $work; on exit the background processes listed in $pids are
# stopped and the directory removed. Usage: make_work verdict-bench
make_work() {
  work=$(mktemp -d -t "$1-XXXXXX")
  pids=()
  trap cleanup_work EXIT
}
cleanup_work() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
