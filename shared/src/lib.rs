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

/// A name, on the command line or in a file, that names none of the values it could (a
/// metric, a projection, a weight mode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {given:?}: use {known}")]
pub struct UnknownName {
    /// What was being named, e.g. `metric`.
    pub what: &'static str,
    /// The name given.
    pub given: String,
    /// The names accepted, comma-separated.
    pub known: String,
}
