//! What operators see of the producer: `GET /metrics` after real traffic, the request
//! id on answers and in logs, and OpenTelemetry traces that run from the HTTP request
//! into the consumer's job (exported to a collector stand-in in the test: an HTTP
//! server taking OTLP/JSON, which is what a collector's port 4318 takes).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    brokers_shared, scraped, unique, vars, wait_until, Backend, Consumer, Producer,
};

on_both_backends!(
    producer_metrics_count_what_happened_and_answers_carry_a_request_id,
    a_trace_runs_from_the_client_through_the_request_into_the_job,
);

pub async fn producer_metrics_count_what_happened_and_answers_carry_a_request_id(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("metrics");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(
        backend,
        &[&queue],
        &vars(&[("JOBGATE_MAX_BODY_BYTES", "64")]),
    )
    .await;

    let bodies = ["a", "bb", "ccc", "dddd", "eeeee"];
    for body in bodies {
        producer.post_ok(&queue, body).await;
    }
    // A client's request id comes back and is in the log line of its job.
    let answer = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .header("x-request-id", "it-request-1")
        .body("ffffff")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    assert_eq!(answer.headers()["x-request-id"], "it-request-1");
    let job_id = answer.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let accepted = producer
        .process
        .last_where(|l| l["message"] == "job accepted" && l["job_id"] == job_id.as_str())
        .expect("a log line for the accepted job");
    assert_eq!(accepted["queue"], queue.as_str());
    assert_eq!(accepted["span"]["request_id"], "it-request-1", "{accepted}");

    // Refusals: each has a generated request id, and is counted by reason.
    for _ in 0..2 {
        let refused = producer.post("no-such-queue", "x").await;
        assert_eq!(refused.status(), 404);
        let id = refused.headers()["x-request-id"].to_str().unwrap();
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    }
    assert_eq!(producer.post(&queue, "x".repeat(65)).await.status(), 413);

    let text = scraped::fetch(&producer.http, &producer.base_url).await;
    let value = |name: &str, labels: String| {
        scraped::sample(&text, name, &labels)
            .unwrap_or_else(|| panic!("{name}{{{labels}}} missing from\n{text}"))
    };
    let route = "/jobs/{queue}";
    let requests = |status: u16| {
        value(
            "jobgate_http_requests_total",
            format!(r#"route="{route}",method="POST",status="{status}""#),
        )
    };
    let of_queue = format!(r#"queue="{queue}""#);
    assert_eq!(requests(202), 6.0);
    assert_eq!(requests(404), 2.0);
    assert_eq!(requests(413), 1.0);
    assert_eq!(value("jobgate_jobs_accepted_total", of_queue.clone()), 6.0);
    assert_eq!(
        value("jobgate_accepted_bytes_total", of_queue.clone()),
        (bodies.concat().len() + 6) as f64
    );
    assert_eq!(
        value(
            "jobgate_publish_duration_seconds_count",
            format!(r#"{of_queue},result="confirmed""#)
        ),
        6.0
    );
    let rejections =
        |reason: &str| value("jobgate_rejections_total", format!(r#"reason="{reason}""#));
    assert_eq!(rejections("unknown-queue"), 2.0);
    assert_eq!(rejections("body-too-large"), 1.0);
    assert_eq!(value("jobgate_publishes_in_flight", String::new()), 0.0);
    assert_eq!(value("jobgate_broker_up", String::new()), 1.0);
    // Without OTEL_EXPORTER_OTLP_ENDPOINT nothing is exported.
    assert!(producer
        .process
        .lines("exporting traces over OTLP/HTTP")
        .is_empty());
}

/// Spans received by the collector stand-in, as OTLP/JSON `resourceSpans` flattened:
/// (service name, span).
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Collector {
    /// Serves `POST /v1/traces` on a free port of 127.0.0.1 until the test ends.
    async fn start() -> (Self, SocketAddr) {
        let collector = Self::default();
        let sink = collector.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    sink.take(&serde_json::from_slice(&body).expect("OTLP/JSON"));
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (collector, addr)
    }

    fn take(&self, request: &Value) {
        let mut spans = self.spans.lock().unwrap();
        for resource in request["resourceSpans"].as_array().into_iter().flatten() {
            let service = resource["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_owned();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    spans.push((service.clone(), span.clone()));
                }
            }
        }
    }

    /// The span of `service` named `name` in trace `trace_id`, if received.
    fn find(&self, service: &str, name: &str, trace_id: &str) -> Option<Value> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .find(|(s, span)| s == service && span["name"] == name && span["traceId"] == trace_id)
            .map(|(_, span)| span.clone())
    }
}

pub async fn a_trace_runs_from_the_client_through_the_request_into_the_job(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("trace");
    let _cleanup = backend.cleanup(&[&queue]);
    let (collector, addr) = Collector::start().await;
    let otel = vars(&[
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        // Export within a tenth of a second instead of five.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let mut otel = otel;
    otel.push(("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")));
    let producer = Producer::start(backend, &[&queue], &otel).await;
    let _consumer = Consumer::start(backend, &queue, &otel).await;
    assert!(!producer
        .process
        .lines("exporting traces over OTLP/HTTP")
        .is_empty());

    // The client's own trace: the producer's span is its child, the job span the
    // producer span's child.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let answer = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .body("traced")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);

    let route_span = "POST /jobs/{queue}";
    wait_until(
        Duration::from_secs(30),
        "both spans at the collector",
        || {
            std::future::ready(
                collector.find("producer", route_span, trace_id).is_some()
                    && collector.find("consumer", "job", trace_id).is_some(),
            )
        },
    )
    .await;
    let request = collector.find("producer", route_span, trace_id).unwrap();
    let job = collector.find("consumer", "job", trace_id).unwrap();
    assert_eq!(request["parentSpanId"], client_span, "{request}");
    assert_eq!(job["parentSpanId"], request["spanId"], "{job}");
    assert_ne!(request["spanId"], job["spanId"]);
}
