//! The worker's small HTTP listener (`JOBGATE_METRICS_LISTEN`): Prometheus metrics and
//! the liveness and readiness probes. It runs beside the worker and stops with it.
//!
//! - `GET /metrics`: every metric of [`WorkerMetrics`] (OpenMetrics text).
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 while the broker is up for this consumer (subscribed, and the
//!   retry/dead-letter publisher reaches the broker: see [`ProbeState::broker_up`]) and
//!   no shutdown is under way; else 503 `application/problem+json`
//!   (`urn:jobgate:problem:not-ready`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use jobgate_shared::broker::{SharedPublisher, SourceStatus};
use jobgate_shared::metrics::{self, Registry};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::WorkerMetrics;

/// What the probes and `/metrics` read.
#[derive(Clone)]
pub struct ProbeState {
    pub registry: Arc<Registry>,
    pub metrics: WorkerMetrics,
    /// Subscribed or not; Kafka lag.
    pub source: SourceStatus,
    /// Publishes retries and dead letters: part of `jobgate_broker_up`.
    pub outcomes: SharedPublisher,
    /// Cancelled once shutdown began.
    pub draining: CancellationToken,
}

impl ProbeState {
    /// Subscribed, and able to publish outcomes. The publisher's readiness is what
    /// notices a broker that went silent without closing anything (frozen, half-open
    /// connection: AMQP heartbeats, Kafka metadata requests), which a subscription alone
    /// does not: librdkafka keeps a group subscription through any outage.
    fn broker_up(&self) -> bool {
        self.source.is_subscribed() && self.outcomes.is_ready()
    }
}

/// The routes, without a socket (tests call them with `oneshot`).
pub fn app(state: ProbeState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state)
}

/// Binds the listener; a clear error when the address is taken or not ours.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (JOBGATE_METRICS_LISTEN)"))
}

/// Serves [`app`] on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: ProbeState, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listening");
    }
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::warn!(%error, "the metrics listener failed");
    }
}

async fn metrics_text(State(state): State<ProbeState>) -> Response {
    // Gauges that mirror the source's state are brought up to date at each scrape.
    state.metrics.set_broker_up(state.broker_up());
    state.metrics.set_kafka_lag(&state.source.partition_lag());
    let body = metrics::render(&state.registry);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        )],
        body,
    )
        .into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<ProbeState>) -> Response {
    let subscribed = state.source.is_subscribed();
    let up = state.broker_up();
    let draining = state.draining.is_cancelled();
    if up && !draining {
        return Json(json!({
            "status": "ready",
            "subscribed": true,
            "shutting_down": false,
        }))
        .into_response();
    }
    let detail = if draining {
        "the consumer is shutting down and takes no new jobs"
    } else if !subscribed {
        "the consumer is not subscribed to the message broker"
    } else {
        "the consumer cannot reach the message broker to publish retries and dead letters"
    };
    let mut body = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "not-ready",
        "Not ready",
        detail,
    );
    body["subscribed"] = json!(subscribed);
    body["shutting_down"] = json!(draining);
    problem_response(StatusCode::SERVICE_UNAVAILABLE, &body)
}

async fn not_found() -> Response {
    let detail = "this listener serves /metrics, /healthz and /readyz";
    let body = problem(StatusCode::NOT_FOUND, "not-found", "Not found", detail);
    problem_response(StatusCode::NOT_FOUND, &body)
}

/// An RFC 9457 problem document with `type` `urn:jobgate:problem:<slug>`.
fn problem(status: StatusCode, slug: &str, title: &str, detail: &str) -> serde_json::Value {
    json!({
        "type": format!("urn:jobgate:problem:{slug}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    })
}

/// `body` as an `application/problem+json` answer.
fn problem_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        )],
        body.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::{to_bytes, Body};
    use axum::http::Request;
    use jobgate_shared::broker::memory::MemoryBroker;
    use jobgate_shared::broker::JobSource;
    use tower::ServiceExt;

    use super::*;

    fn state(broker: &MemoryBroker) -> ProbeState {
        let mut registry = metrics::registry();
        let worker_metrics = WorkerMetrics::register(&mut registry);
        ProbeState {
            registry: Arc::new(registry),
            metrics: worker_metrics,
            source: broker.status(),
            outcomes: Arc::new(broker.clone()),
            draining: CancellationToken::new(),
        }
    }

    async fn get(state: &ProbeState, path: &str) -> (StatusCode, String, String) {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = app(state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap()
    }

    #[tokio::test]
    async fn readyz_follows_the_subscription_and_the_shutdown() {
        let broker = MemoryBroker::new();
        let state = state(&broker);
        let (status, _, body) = get(&state, "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&body)["status"], "ready");

        broker.set_ready(false);
        let (status, content_type, body) = get(&state, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(content_type, "application/problem+json");
        let problem = json(&body);
        assert_eq!(problem["type"], "urn:jobgate:problem:not-ready");
        assert_eq!(problem["status"], 503);
        assert_eq!(problem["subscribed"], false);
        assert!(problem["detail"]
            .as_str()
            .unwrap()
            .contains("not subscribed"));

        broker.set_ready(true);
        state.draining.cancel();
        let (status, _, body) = get(&state, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["shutting_down"], true);

        // Liveness does not care.
        let (status, _, _) = get(&state, "/healthz").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_show_the_broker_and_the_lag_of_owned_partitions() {
        let broker = MemoryBroker::new();
        let state = state(&broker);
        state.source.set_queue_lag("q", [(0, 4), (3, 0)]);
        let (status, content_type, text) = get(&state, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, metrics::CONTENT_TYPE);
        assert!(text.contains("jobgate_broker_up 1"), "{text}");
        assert!(
            text.contains("jobgate_kafka_consumer_lag{queue=\"q\",partition=\"0\"} 4"),
            "{text}"
        );

        // Partition 0 revoked, the broker gone.
        state.source.forget_partitions(&[("q".to_owned(), 0)]);
        broker.set_ready(false);
        let (_, _, text) = get(&state, "/metrics").await;
        assert!(text.contains("jobgate_broker_up 0"), "{text}");
        assert!(!text.contains("partition=\"0\""), "{text}");
        assert!(
            text.contains("jobgate_kafka_consumer_lag{queue=\"q\",partition=\"3\"} 0"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn other_paths_are_a_not_found_problem() {
        let state = state(&MemoryBroker::new());
        let (status, content_type, body) = get(&state, "/jobs").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(json(&body)["type"], "urn:jobgate:problem:not-found");
    }

    #[tokio::test]
    async fn an_address_in_use_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let error = format!("{:#}", bind(addr).await.unwrap_err());
        assert!(error.contains("JOBGATE_METRICS_LISTEN"), "{error}");
        assert!(error.contains(&addr.to_string()), "{error}");
    }
}
