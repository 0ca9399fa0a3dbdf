//! Prometheus metrics: the one encoder and the conventions both binaries follow.
//!
//! Each binary owns a [`Registry`] (no global state, so tests can run several apps in
//! one process) and serves it as `GET /metrics` in the OpenMetrics text format, which
//! Prometheus scrapes natively. Names carry the `jobgate_` prefix; counters end in
//! `_total` (added by the encoder), durations are in seconds (`_seconds`).

pub use prometheus_client;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry whose metrics are all named `jobgate_*`.
pub fn registry() -> Registry {
    Registry::with_prefix("jobgate")
}

/// The registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    encode(&mut out, registry).expect("encoding metrics into a String");
    out
}

/// Counts one operation in a gauge while it runs: the gauge goes up when the guard is
/// made and down when it is dropped, so a cancelled operation (a client gone, a job
/// timed out) leaves the gauge too.
#[derive(Debug)]
#[must_use = "the operation counts only while the guard lives"]
pub struct InFlight(Gauge);

impl InFlight {
    /// One more in `gauge` until the guard is dropped.
    pub fn enter(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Buckets for latencies from half a millisecond to about half a minute: broker
/// confirms take a millisecond or two, job handlers seconds.
pub fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 17,
    ))
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn renders_prefixed_openmetrics_text() {
        let mut registry = registry();
        let counter = Counter::<u64>::default();
        registry.register("things", "Things seen", counter.clone());
        let histogram = latency_histogram();
        registry.register("wait_seconds", "Waits", histogram.clone());
        counter.inc_by(3);
        histogram.observe(0.002);
        let text = render(&registry);
        assert!(text.contains("jobgate_things_total 3"), "{text}");
        assert!(text.contains("jobgate_wait_seconds_count 1"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[test]
    fn in_flight_counts_while_the_guard_lives() {
        let gauge = Gauge::<i64>::default();
        let first = InFlight::enter(&gauge);
        let second = InFlight::enter(&gauge);
        assert_eq!(gauge.get(), 2);
        drop(first);
        assert_eq!(gauge.get(), 1);
        drop(second);
        assert_eq!(gauge.get(), 0);
    }
}
