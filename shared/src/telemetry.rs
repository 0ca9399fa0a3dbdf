//! Logging and trace export.
//!
//! Logs: `tracing` with `RUST_LOG` filtering, text or JSON lines on stderr.
//!
//! Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, spans are exported over OTLP/HTTP (protobuf, or JSON with
//! `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`) from a background thread, batched. The W3C
//! trace context travels with each job in its `traceparent`/`tracestate` headers, so the
//! consumer's job span continues the producer's request span: one trace from the HTTP
//! request to the job's outcome. When no endpoint is set nothing is built: no exporter,
//! no OpenTelemetry layer, and [`continue_trace`] and [`inject_current`] return at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use clap::ValueEnum;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The trace exporter, when one was configured; kept to flush it at exit.
static TRACER_PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG` wins; the default is `info`.
/// Logs go to stderr so stdout stays free for command output (`consumer dlq list`).
/// Call [`shutdown`] before the process exits so the last spans are exported.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=off,amq_protocol=off"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
    };
    let (traces, export_error) = match trace_exporter() {
        Ok(Some(provider)) => {
            let tracer = provider.tracer("jobgate");
            // A second init (tests that build several apps in one process) keeps the first.
            let _ = TRACER_PROVIDER.set(provider);
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                None,
            )
        }
        Ok(None) => (None, None),
        Err(error) => (None, Some(error)),
    };
    // A second init (tests that build several apps in one process) is harmless.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init();
    if let Some(error) = export_error {
        tracing::error!(%error, "trace export is off: the OTLP exporter could not be built");
    } else if exporting() {
        tracing::info!("exporting traces over OTLP/HTTP");
    }
}

/// Exports the spans still buffered and stops the exporter; a no-op without one.
pub fn shutdown() {
    if let Some(provider) = TRACER_PROVIDER.get() {
        if let Err(error) = provider.shutdown() {
            eprintln!("trace export: could not flush the last spans: {error}");
        }
    }
}

/// True when spans are exported (an OTLP endpoint was configured).
pub fn exporting() -> bool {
    TRACER_PROVIDER.get().is_some()
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// The OTLP/HTTP exporter the standard `OTEL_*` variables describe, or `None` when no
/// endpoint is set (or `OTEL_SDK_DISABLED=true`).
fn trace_exporter() -> Result<Option<SdkTracerProvider>, String> {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if disabled
        || !(env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    {
        return Ok(None);
    }
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    // The library's own default with JSON built in would be JSON; the specification's
    // default for OTLP/HTTP is protobuf. gRPC is not built in (no tonic stack).
    let protocol = match protocol.as_str() {
        "http/json" => Protocol::HttpJson,
        "" | "http/protobuf" => Protocol::HttpBinary,
        other => {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported; use http/protobuf \
                 (port 4318 of a collector) or http/json"
            ))
        }
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(|e| e.to_string())?;
    // Resource::builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; without
    // them the service is named after the binary (`producer`, `consumer`).
    let mut resource = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        if let Some(name) = binary_name() {
            resource = resource.with_service_name(name);
        }
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

fn binary_name() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.file_stem()?.to_string_lossy().into_owned())
}

/// Makes `span` continue the trace whose W3C context (`traceparent`, `tracestate`)
/// travelled with a job in its headers, so the consumer's job span joins the producer's
/// request span in one trace. Does nothing when trace export is off or the headers carry
/// no valid context.
pub fn continue_trace(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    if !exporting() {
        return;
    }
    let carrier: HashMap<String, String> = headers
        .iter()
        .filter(|(name, _)| *name == "traceparent" || *name == "tracestate")
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    continue_trace_from(span, &carrier);
}

/// [`continue_trace`] for a carrier already in the propagator's shape (HTTP request
/// headers, lower-case names).
pub fn continue_trace_from(span: &tracing::Span, carrier: &HashMap<String, String>) {
    if !exporting() || !carrier.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(carrier);
    // Fails only when the span is already started or disabled; then it stays a root.
    let _ = span.set_parent(parent);
}

/// Writes the current span's trace context into a job's `headers` (`traceparent`,
/// `tracestate`), replacing what the client sent: the client's context is the parent of
/// the current span, so the chain stays whole. Leaves `headers` alone when trace export
/// is off (the client's context then travels as it came).
pub fn inject_current(headers: &mut BTreeMap<String, String>) {
    if !exporting() {
        return;
    }
    let context = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    if carrier.contains_key("traceparent") {
        headers.remove("tracestate");
        headers.extend(carrier);
    }
}
