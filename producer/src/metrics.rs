//! Producer metrics, served as `GET /metrics` (OpenMetrics text, open like the probes).
//!
//! Two places record them, so every route and every publish is counted the same way:
//! - [`track`], a middleware around every route: requests by route, method and status,
//!   their duration, and rejections by reason (the problem type of the answer, which
//!   [`crate::error::problem_response`] leaves in the response's extensions);
//! - [`Metered`], a [`Publisher`] wrapper under the in-flight limit: publishes waiting
//!   for the broker, their latency and result, jobs and bytes accepted per queue.
//!
//! Labels have bounded values only: routes are path templates, queues come from the
//! allow-list, reasons are problem slugs.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jobgate_shared::broker::{PublishError, Publisher, SharedPublisher};
use jobgate_shared::job::JobMeta;
use jobgate_shared::metrics::{latency_histogram, render, InFlight, Registry, CONTENT_TYPE};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::state::AppState;

/// The problem type (slug) of an error answer, left in the response's extensions by
/// [`crate::error::problem_response`] for [`track`].
#[derive(Debug, Clone)]
pub struct ProblemSlug(pub String);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PublishLabels {
    queue: String,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every producer metric, in one registry (one per app, so tests don't share counts).
pub struct ProducerMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabels>,
    publish_duration: HistogramFamily<PublishLabels>,
    publishes_in_flight: Gauge,
    jobs_accepted: Family<QueueLabels, Counter>,
    accepted_bytes: Family<QueueLabels, Counter>,
    rejections: Family<ReasonLabels, Counter>,
    broker_up: Gauge,
    /// Job status writes and reads that failed (`jobgate_status_store_failures_total`).
    pub status_failures: jobgate_shared::status::StoreFailures,
}

impl Default for ProducerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProducerMetrics {
    pub fn new() -> Self {
        let mut registry = jobgate_shared::metrics::registry();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration = HistogramFamily::<RouteLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let publish_duration = HistogramFamily::<PublishLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let publishes_in_flight = Gauge::default();
        let jobs_accepted = Family::<QueueLabels, Counter>::default();
        let accepted_bytes = Family::<QueueLabels, Counter>::default();
        let rejections = Family::<ReasonLabels, Counter>::default();
        let broker_up = Gauge::default();
        let status_failures = jobgate_shared::status::StoreFailures::register(&mut registry);
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request to answer, by route template",
            request_duration.clone(),
        );
        registry.register(
            "publish_duration_seconds",
            "Time from publish to the broker's confirm (result=confirmed) or failure (result=failed)",
            publish_duration.clone(),
        );
        registry.register(
            "publishes_in_flight",
            "Publishes waiting for the broker's confirm",
            publishes_in_flight.clone(),
        );
        registry.register(
            "jobs_accepted",
            "Jobs the broker confirmed (answered 202, or 202 items of a batch)",
            jobs_accepted.clone(),
        );
        registry.register(
            "accepted_bytes",
            "Body bytes of the jobs the broker confirmed",
            accepted_bytes.clone(),
        );
        registry.register(
            "rejections",
            "Requests answered with a problem, by problem type (reason)",
            rejections.clone(),
        );
        registry.register(
            "broker_up",
            "1 while the broker connection is up and accepts publishes, else 0",
            broker_up.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            publish_duration,
            publishes_in_flight,
            jobs_accepted,
            accepted_bytes,
            rejections,
            broker_up,
            status_failures,
        }
    }

    /// Jobs of `queue` this process accepted since it started (the console's rate).
    pub fn accepted(&self, queue: &str) -> u64 {
        self.jobs_accepted
            .get_or_create(&QueueLabels {
                queue: queue.to_owned(),
            })
            .get()
    }

    /// The metrics in the OpenMetrics text format, the broker state read now.
    pub fn render(&self, broker_ready: bool) -> String {
        self.broker_up.set(i64::from(broker_ready));
        render(&self.registry)
    }
}

/// `GET /metrics`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    summary = "Prometheus metrics",
    description = "Requests, publish latency, in-flight publishes, accepted jobs and bytes, rejections by reason, broker state; OpenMetrics text format. Open even with API keys.",
    responses(
        (status = 200, description = "The metrics.", body = String,
            content_type = "application/openmetrics-text"),
    ),
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(state.publisher.is_ready());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// A method as a label: the standard ones by name, anything else as `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware counting every answer (see the module documentation).
pub async fn track(
    State(metrics): State<Arc<ProducerMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    // Unknown paths share one label: a scanner must not create a series per path.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = method_label(request.method());
    let start = Instant::now();
    let response = next.run(request).await;
    metrics
        .request_duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(start.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method: method.to_owned(),
            status: response.status().as_u16(),
        })
        .inc();
    if let Some(ProblemSlug(reason)) = response.extensions().get::<ProblemSlug>() {
        metrics
            .rejections
            .get_or_create(&ReasonLabels {
                reason: reason.clone(),
            })
            .inc();
    }
    response
}

/// A publisher that records every publish (see the module documentation).
pub struct Metered {
    inner: SharedPublisher,
    metrics: Arc<ProducerMetrics>,
}

impl Metered {
    pub fn new(inner: SharedPublisher, metrics: Arc<ProducerMetrics>) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl Publisher for Metered {
    async fn publish_to(
        &self,
        destination: &str,
        meta: &JobMeta,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let result = {
            // Also when the request is cancelled (client gone) mid-publish.
            let _in_flight = InFlight::enter(&self.metrics.publishes_in_flight);
            let start = Instant::now();
            let result = self.inner.publish_to(destination, meta, body).await;
            self.metrics
                .publish_duration
                .get_or_create(&PublishLabels {
                    queue: meta.queue.clone(),
                    result: if result.is_ok() {
                        "confirmed"
                    } else {
                        "failed"
                    },
                })
                .observe(start.elapsed().as_secs_f64());
            result
        };
        let queue = QueueLabels {
            queue: meta.queue.clone(),
        };
        match &result {
            Ok(()) => {
                self.metrics.jobs_accepted.get_or_create(&queue).inc();
                self.metrics
                    .accepted_bytes
                    .get_or_create(&queue)
                    .inc_by(body.len() as u64);
            }
            Err(error) => {
                tracing::warn!(job_id = %meta.id, queue = %meta.queue, %error, "publish failed");
            }
        }
        result
    }

    fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use jobgate_shared::broker::memory::MemoryBroker;
    use tower::ServiceExt;

    use super::*;
    use crate::startup::app;

    /// The value of the sample `name` (with its labels, as rendered), if present.
    pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map(|value| value.parse().unwrap())
    }

    async fn scrape(state: &AppState) -> String {
        let response = app(state.clone())
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], CONTENT_TYPE);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    async fn post(state: &AppState, path: &str, body: &'static str) -> StatusCode {
        app(state.clone())
            .oneshot(Request::post(path).body(Body::from(body)).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn counts_requests_publishes_and_rejections_as_they_happened() {
        let broker = MemoryBroker::new();
        let state = AppState::new(Arc::new(broker.clone()), vec!["emails".into()], 16);
        assert_eq!(
            post(&state, "/jobs/emails", "four").await,
            StatusCode::ACCEPTED
        );
        assert_eq!(
            post(&state, "/jobs/emails", "sixteen bytes!!!").await,
            StatusCode::ACCEPTED
        );
        assert_eq!(post(&state, "/jobs/nope", "x").await, StatusCode::NOT_FOUND);
        assert_eq!(
            post(&state, "/no/such/path", "x").await,
            StatusCode::NOT_FOUND
        );
        broker.fail_next_publish(PublishError::Unavailable);
        assert_eq!(
            post(&state, "/jobs/emails", "x").await,
            StatusCode::SERVICE_UNAVAILABLE
        );

        let text = scrape(&state).await;
        let value = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name} in\n{text}"));
        assert_eq!(
            value(
                r#"jobgate_http_requests_total{route="/jobs/{queue}",method="POST",status="202"}"#
            ),
            2.0
        );
        assert_eq!(
            value(
                r#"jobgate_http_requests_total{route="/jobs/{queue}",method="POST",status="503"}"#
            ),
            1.0
        );
        assert_eq!(
            value(r#"jobgate_http_requests_total{route="unmatched",method="POST",status="404"}"#),
            1.0
        );
        assert_eq!(value(r#"jobgate_jobs_accepted_total{queue="emails"}"#), 2.0);
        assert_eq!(
            value(r#"jobgate_accepted_bytes_total{queue="emails"}"#),
            20.0
        );
        assert_eq!(
            value(r#"jobgate_publish_duration_seconds_count{queue="emails",result="confirmed"}"#),
            2.0
        );
        assert_eq!(
            value(r#"jobgate_publish_duration_seconds_count{queue="emails",result="failed"}"#),
            1.0
        );
        assert_eq!(
            value(r#"jobgate_rejections_total{reason="unknown-queue"}"#),
            1.0
        );
        assert_eq!(
            value(r#"jobgate_rejections_total{reason="not-found"}"#),
            1.0
        );
        assert_eq!(
            value(r#"jobgate_rejections_total{reason="broker-unavailable"}"#),
            1.0
        );
        assert_eq!(value("jobgate_publishes_in_flight"), 0.0);
        assert_eq!(value("jobgate_broker_up"), 1.0);

        broker.set_ready(false);
        assert_eq!(
            sample(&scrape(&state).await, "jobgate_broker_up"),
            Some(0.0)
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_counts_as_a_rejection_and_not_as_a_publish() {
        let broker = MemoryBroker::new();
        let state = AppState::new(Arc::new(broker.clone()), vec!["q".into()], 4);
        assert_eq!(
            post(&state, "/jobs/q", "too long").await,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let text = scrape(&state).await;
        assert_eq!(
            sample(
                &text,
                r#"jobgate_rejections_total{reason="body-too-large"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"jobgate_jobs_accepted_total{queue="q"}"#),
            None
        );
    }
}
