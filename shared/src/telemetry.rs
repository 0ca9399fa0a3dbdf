//! Logging set-up: `tracing` with `RUST_LOG` filtering, text or JSON lines.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` wins; the default is `info`.
/// Logs go to stderr so stdout stays free for command output (`consumer dlq list`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=off,amq_protocol=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests that build several apps in one process) is harmless.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Makes `span` continue the trace whose W3C context (`traceparent`, `tracestate`)
/// travelled with a job in its headers, so the consumer's job span joins the producer's
/// request span in one trace. Does nothing when trace export is off or the headers carry
/// no valid context.
pub fn continue_trace(span: &tracing::Span, headers: &std::collections::BTreeMap<String, String>) {
    // Filled in with the OpenTelemetry export (issue 6).
    let _ = (span, headers);
}
