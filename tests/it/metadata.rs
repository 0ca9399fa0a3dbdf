//! Job metadata: `X-Job-*` headers and the W3C trace context travel with the job as
//! message headers (lower-cased names) on both brokers; too many of them is a 400.

use serde_json::Value;

use crate::helpers::{assert_problem, brokers_shared, rabbit, unique, Backend, Producer};

on_both_backends!(job_headers_and_trace_context_reach_the_broker);

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

pub async fn job_headers_and_trace_context_reach_the_broker(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("meta");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let jobs = producer.url(&format!("/jobs/{queue}"));

    // Too many X-Job-* headers: 400, nothing queued.
    let mut request = producer.http.post(&jobs).body("too many");
    for i in 0..17 {
        request = request.header(format!("X-Job-H{i:02}"), "v");
    }
    assert_problem(request.send().await.unwrap(), 400, "bad-metadata").await;
    assert_eq!(backend.pending(&queue).await, 0);

    let response = producer
        .http
        .post(&jobs)
        .header("X-Job-Tenant", "acme")
        .header("traceparent", TRACEPARENT)
        .header("tracestate", "congo=t61rcWkgMzE")
        .body("{\"n\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let job_id = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let headers: Vec<(String, Option<String>)> = match backend {
        Backend::Rabbitmq => {
            let messages = rabbit::peek(&queue, 1).await;
            assert_eq!(messages.len(), 1, "{messages:?}");
            let message = &messages[0];
            assert_eq!(message["properties"]["message_id"], job_id.as_str());
            let table = message["properties"]["headers"].as_object().unwrap();
            table
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
                .collect()
        }
        Backend::Kafka => {
            let record = crate::kafka_only::first_record(&queue).await;
            assert_eq!(record.header("job-id").as_deref(), Some(job_id.as_str()));
            ["x-job-tenant", "traceparent", "tracestate", "X-Job-Tenant"]
                .iter()
                .map(|name| ((*name).to_owned(), record.header(name)))
                .filter(|(_, v)| v.is_some())
                .collect()
        }
    };
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.clone())
    };
    assert_eq!(get("x-job-tenant").as_deref(), Some("acme"), "{headers:?}");
    assert_eq!(
        get("traceparent").as_deref(),
        Some(TRACEPARENT),
        "{headers:?}"
    );
    assert_eq!(
        get("tracestate").as_deref(),
        Some("congo=t61rcWkgMzE"),
        "{headers:?}"
    );
    assert!(get("X-Job-Tenant").is_none(), "names are lower-cased");
}
