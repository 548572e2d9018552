//! What `verdict-serve`'s companion tools share: the HTTP load generator used by
//! `verdict-bench` and `examples/serve_bench.rs`, and the soak built on it
//! (`verdict-bench soak`). The server itself is the `verdict-serve` binary (`src/main.rs`).

pub mod loadgen;
pub mod soak;
