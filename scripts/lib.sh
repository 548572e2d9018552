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

# Polls /ready of a server on 127.0.0.1:$1 every 50 ms, $4 times (default 1200), and prints the
# seconds it took to answer; otherwise prints its log ($3, named $2) and fails.
wait_ready() { # port, name, log[, tries]: seconds until /ready
  local t0 t1
  t0=$(date +%s.%N)
  for _ in $(seq 1 "${4:-3600}"); do
    if curl -fsS "http://127.0.0.1:$1/ready" >/dev/null 2>&1; then
      t1=$(date +%s.%N)
      python3 -c "print(f'{$t1 - $t0:.2f}')"
      return 0
    fi
    sleep 0.05
  done
  echo "$2 did not become ready:" >&2
  cat "$3" >&2
  return 1
}
