# Sourced by the scripts: where cargo puts the binaries. `CARGO_TARGET_DIR`, a `build.target-dir`
# in a cargo config, or ./target: cargo metadata knows which.
target_dir() {
  cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}
