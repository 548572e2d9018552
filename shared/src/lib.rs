//! Facts shared by every Verdict binary: model assets and their cache, chat and task templates,
//! label words, data readers and metrics. Defined once, used by trainer, evaluator and server.

pub mod adapter;
pub mod assets;
pub mod atomic;
pub mod audit;
pub mod chat;
pub mod cli_config;
pub mod data;
pub mod datasets;
pub mod http;
pub mod hub;
pub mod memory;
pub mod metrics;
pub mod plot;
pub mod registry;
pub mod task;
