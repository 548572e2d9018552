//! The server's log: `tracing` events on stderr, as text lines (`verdict-serve: <message>
//! key=value ...`, the lines scripts grep for) or as one JSON object per line, filtered by
//! `RUST_LOG` (default `info`). Each request writes one access line (target [`ACCESS`]).

use anyhow::{anyhow, Result};
use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of the access lines, one per request (`RUST_LOG=verdict::access=off` drops them).
pub const ACCESS: &str = "verdict::access";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `verdict-serve: <message> key=value ...`, string values quoted.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the fields.
    Json,
}

/// Installs the process's log subscriber; a `RUST_LOG` that is not a filter is an error.
pub fn init(format: LogFormat) -> Result<()> {
    let directives = match std::env::var("RUST_LOG") {
        Ok(s) => s,
        Err(std::env::VarError::NotPresent) => String::new(),
        Err(std::env::VarError::NotUnicode(_)) => return Err(anyhow!("RUST_LOG is not UTF-8")),
    };
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse(&directives)
        .map_err(|e| anyhow!("RUST_LOG={directives:?} is not a log filter: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.event_format(Text).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
    };
    installed.map_err(|e| anyhow!("cannot install the logger: {e}"))
}

/// The text format: the prefix the server's lines always had, `error: ` / `warning: ` where
/// it applies, then the message and the fields.
struct Text;

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        w.write_str("verdict-serve: ")?;
        match *event.metadata().level() {
            Level::ERROR => w.write_str("error: ")?,
            Level::WARN => w.write_str("warning: ")?,
            _ => {}
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}
