//! Building and running the HTTP server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use jobgate_shared::broker::kafka::{self, KafkaPublisher};
use jobgate_shared::broker::rabbitmq::{self, RabbitPublisher};
use jobgate_shared::broker::SharedPublisher;
use jobgate_shared::config::Backend;
use jobgate_shared::status::StatusStore;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

use crate::auth::{self, Security};
use crate::config::ProducerConfig;
use crate::console;
use crate::error::ApiError;
use crate::idempotency::{MemoryStore, RedisStore, SharedStore, DEFAULT_MAX_ENTRIES};
use crate::routes::{batch, health, jobs, status};
use crate::state::AppState;

/// The router, without a socket: tests drive it with `oneshot`.
pub fn app(state: AppState) -> Router {
    let body_limit = state.max_body_bytes;
    Router::new()
        .route("/jobs", post(jobs::post_to_default_queue))
        .route("/jobs/{queue}", post(jobs::post_to_queue))
        .route("/jobs/{queue}/batch", batch::route())
        .route(
            "/jobs/{queue}/{job_id}",
            get(status::get_status).delete(status::cancel_job),
        )
        .route("/me", get(console::me))
        .route("/queues", get(console::queues))
        .route(
            "/queues/{queue}/dead",
            get(console::list_dead).delete(console::purge_dead),
        )
        .route("/queues/{queue}/dead/replay", post(console::replay_dead))
        .route("/ui", get(console::assets::index))
        .route("/ui/", get(console::assets::index))
        .route("/ui/app.js", get(console::assets::script))
        .route("/ui/app.css", get(console::assets::style))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(crate::openapi::openapi_json))
        .route("/metrics", get(crate::metrics::metrics))
        // After the routes: a known path with another method is a 405 problem too.
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound })
        // Auth (401), then rate limit (429), then the handler; the probes stay open.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.security),
            auth::guard,
        ))
        // Outside auth and the rate limit, so their refusals are counted too.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.metrics),
            crate::metrics::track,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        // The body's deadline starts when its head was read, before auth or anything.
        .layer(axum::middleware::from_fn_with_state(
            state.body_read_timeout,
            crate::body_deadline::apply,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(record_answer)
                // A 503 is an answer, not a fault of the producer: the publisher already
                // logged why (warn), so tower-http's error line per 5xx would only repeat
                // it, loudly, during an outage.
                .on_failure(
                    tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
                ),
        )
        // Outermost: the request span and every layer inside see the request id.
        .layer(axum::middleware::from_fn(crate::request_id::assign))
        .with_state(state)
}

/// The span every log line of a request is in: method, route template and request id,
/// exported over OpenTelemetry (when on) as a server span continuing the client's
/// `traceparent`.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |path| path.as_str());
    let method = request.method();
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
    let span = tracing::info_span!(
        "request",
        %method,
        route,
        request_id = header(crate::request_id::X_REQUEST_ID.as_str()).unwrap_or_default(),
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if jobgate_shared::telemetry::exporting() {
        let carrier: std::collections::HashMap<String, String> = ["traceparent", "tracestate"]
            .into_iter()
            .filter_map(|name| Some((name.to_owned(), header(name)?.to_owned())))
            .collect();
        jobgate_shared::telemetry::continue_trace_from(&span, &carrier);
    }
    span
}

fn record_answer(
    response: &axum::http::Response<axum::body::Body>,
    latency: Duration,
    span: &tracing::Span,
) {
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    tracing::debug!(status = status.as_u16(), ?latency, "request answered");
}

/// Starts the publisher for the configured backend; it connects in the background.
pub fn start_publisher(config: &ProducerConfig) -> anyhow::Result<SharedPublisher> {
    Ok(match config.broker.backend {
        Backend::Rabbitmq => RabbitPublisher::start(rabbitmq::PublisherOptions {
            endpoint: config.broker.amqp(),
            queues: config.queues.clone(),
            connect_timeout: config.broker.connect_timeout(),
            publish_timeout: config.publish_timeout(),
            channels: usize::from(config.publish_channels),
            // Retry tiers belong to the consumer's configuration; it declares them.
            retry_tiers: Vec::new(),
        }),
        Backend::Kafka => KafkaPublisher::start(kafka::PublisherOptions {
            topics: config.broker.kafka_topics(),
            queues: config.queues.clone(),
            retry_tiers: Vec::new(),
            publish_timeout: config.publish_timeout(),
        })
        .map_err(anyhow::Error::msg)?,
    })
}

/// The idempotency store: Redis when `JOBGATE_REDIS_URL` is set, else memory.
pub fn idempotency_store(config: &ProducerConfig) -> anyhow::Result<SharedStore> {
    let store: SharedStore = match &config.status.redis_url {
        Some(url) => Arc::new(RedisStore::new(
            url,
            config.idempotency_ttl(),
            config.publish_timeout(),
            Duration::from_secs(1),
        )?),
        None => Arc::new(MemoryStore::new(
            config.idempotency_ttl(),
            DEFAULT_MAX_ENTRIES,
        )),
    };
    tracing::info!(store = %store.describe(), "idempotency keys");
    Ok(store)
}

/// The job status store, when `JOBGATE_REDIS_URL` is set.
pub fn status_store(config: &ProducerConfig) -> anyhow::Result<Option<StatusStore>> {
    let store = config.status.store()?;
    match &store {
        Some(store) => tracing::info!(store = %store.describe(), "job status"),
        None => tracing::info!("job status off (JOBGATE_REDIS_URL is not set)"),
    }
    Ok(store)
}

/// Serves `listener` until `shutdown` completes, then stops taking requests, lets the
/// ones in flight finish (at most the shutdown grace), closes the broker connection.
pub async fn run(
    listener: TcpListener,
    config: ProducerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Read the keys (file) first: a bad keys file stops the producer before it connects.
    let security = Arc::new(Security::from_args(&config.security)?);
    let publisher = start_publisher(&config)?;
    let state = AppState::new(
        Arc::clone(&publisher),
        config.queues.clone(),
        config.max_body_bytes,
    )
    .with_batch_limits(
        usize::try_from(config.max_batch_items).unwrap_or(usize::MAX),
        config.max_batch_bytes,
    )
    .with_max_in_flight(usize::try_from(config.max_in_flight).unwrap_or(usize::MAX))
    .with_body_read_timeout(config.body_read_timeout())
    .with_batch_fairness(
        config.batch_in_flight_percent,
        config.max_batch_header_bytes,
    );
    let state = state
        .with_security(Arc::clone(&security))
        .with_idempotency(idempotency_store(&config)?, config.publish_timeout())
        .with_status(status_store(&config)?)
        .with_schedule_max(config.schedule_max)
        .with_callback_allow(config.callback_allow.clone())
        .with_console(console::Console::new(
            &config.broker,
            &config.console,
            config.publish_timeout(),
        )?);
    match &state.callback_allow {
        Some(allow) => tracing::info!(%allow, "completion callbacks allowed to these hosts"),
        None => tracing::info!("completion callbacks off (JOBGATE_CALLBACK_ALLOW is not set)"),
    }
    let draining = state.draining.clone();
    security.spawn_housekeeping(Duration::from_secs(60), draining.clone());
    tracing::info!(security = ?security, "auth and rate limit");
    let addr = listener.local_addr()?;
    tracing::info!(%addr, queues = ?config.queues, backend = ?config.broker.backend, limits = ?config.server_limits(), "producer listening");
    crate::server::warn_if_over_open_files_limit(config.server_limits().max_connections);

    let stop = draining.clone();
    let server = crate::server::serve(listener, app(state), config.server_limits(), async move {
        shutdown.await;
        stop.cancel();
    });
    let grace = config.shutdown_grace();
    let gave_up = async {
        draining.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = server => {}
        () = gave_up => tracing::warn!(?grace, "in-flight requests did not finish within the grace period"),
    }
    publisher.close().await;
    tracing::info!("producer stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use jobgate_shared::broker::memory::MemoryBroker;
    use jobgate_shared::broker::PublishError;

    use super::*;

    fn test_app(broker: &MemoryBroker) -> Router {
        let state = AppState::new(
            Arc::new(broker.clone()),
            vec!["emails".into(), "reports".into()],
            16,
        );
        app(state)
    }

    use crate::test_support::send;

    fn post(path: &str, body: &'static [u8]) -> Request<Body> {
        Request::post(path)
            .header("content-type", "text/plain")
            .body(Body::from(body))
            .unwrap()
    }

    #[tokio::test]
    async fn accepted_job_is_published_byte_for_byte_with_its_metadata() {
        let broker = MemoryBroker::new();
        let (status, _, json) = send(test_app(&broker), post("/jobs/reports", b"\xffraw")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(json["message"], "Request received");
        assert_eq!(json["queue"], "reports");
        let published = broker.published();
        assert_eq!(published.len(), 1);
        let job = &published[0];
        assert_eq!(&job.body[..], b"\xffraw");
        assert_eq!(job.meta.id, json["job_id"].as_str().unwrap());
        assert_eq!(job.meta.queue, "reports");
        assert_eq!(job.meta.content_type.as_deref(), Some("text/plain"));
        assert_eq!(job.meta.attempt, 1);
    }

    #[tokio::test]
    async fn post_jobs_goes_to_the_first_queue() {
        let broker = MemoryBroker::new();
        let (status, _, json) = send(test_app(&broker), post("/jobs", b"x")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(json["queue"], "emails");
    }

    #[tokio::test]
    async fn unknown_queue_is_404_problem_and_nothing_is_published() {
        let broker = MemoryBroker::new();
        let (status, headers, json) = send(test_app(&broker), post("/jobs/other", b"x")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(json["type"], "urn:jobgate:problem:unknown-queue");
        assert!(broker.published().is_empty());
    }

    #[tokio::test]
    async fn body_over_the_limit_is_413_and_nothing_is_published() {
        let broker = MemoryBroker::new();
        let (status, _, json) = send(
            test_app(&broker),
            post("/jobs/emails", b"seventeen bytes!!"),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(json["status"], 413);
        assert!(broker.published().is_empty());
        let (status, _, _) =
            send(test_app(&broker), post("/jobs/emails", b"sixteen bytes!!!")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn every_publish_failure_is_503_with_retry_after_and_no_internals() {
        for error in [
            PublishError::Unavailable,
            PublishError::Nacked,
            PublishError::Unroutable,
            PublishError::Timeout(std::time::Duration::from_secs(5)),
            PublishError::Broker("connection to 10.1.2.3 refused for user admin".into()),
        ] {
            let broker = MemoryBroker::new();
            broker.fail_next_publish(error.clone());
            let (status, headers, json) = send(test_app(&broker), post("/jobs/emails", b"x")).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error:?}");
            assert!(headers.contains_key("retry-after"), "{error:?}");
            assert_eq!(json["type"], "urn:jobgate:problem:broker-unavailable");
            let detail = json["detail"].as_str().unwrap();
            assert!(
                !detail.contains("10.1.2.3") && !detail.contains("admin"),
                "{detail}"
            );
        }
    }

    #[tokio::test]
    async fn readyz_follows_the_broker_and_shutdown() {
        let broker = MemoryBroker::new();
        let state = AppState::new(Arc::new(broker.clone()), vec!["q".into()], 16);
        let get = || Request::get("/readyz").body(Body::empty()).unwrap();
        let (status, _, _) = send(app(state.clone()), get()).await;
        assert_eq!(status, StatusCode::OK);
        broker.set_ready(false);
        let (status, _, json) = send(app(state.clone()), get()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json["broker"], "down");
        broker.set_ready(true);
        state.draining.cancel();
        let (status, _, _) = send(app(state.clone()), get()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _, json) = send(app(state.clone()), post("/jobs/q", b"x")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json["type"], "urn:jobgate:problem:shutting-down");
        let (status, _, _) = send(
            app(state),
            Request::get("/healthz").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
}
