//! `POST /jobs/{queue}/batch` on both backends, with the real `producer` and
//! `consumer` binaries: every item of a batch is one job, processed once; a malformed
//! batch publishes nothing.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    assert_problem, assert_processed_exactly_once, brokers_shared, unique, vars, wait_until,
    Backend, Consumer, Producer,
};

const LIMIT: Duration = Duration::from_secs(90);

on_both_backends!(
    an_ndjson_batch_becomes_jobs_processed_exactly_once,
    a_json_array_batch_is_accepted,
    a_batch_with_a_bad_line_or_type_publishes_nothing,
    a_batch_over_its_share_of_the_in_flight_limit_waits_its_turn,
);

async fn post_batch(
    producer: &Producer,
    queue: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    producer
        .http
        .post(producer.url(&format!("/jobs/{queue}/batch")))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("POST reaches the producer")
}

/// The job ids of a 202 batch answer of `n` items, in order.
async fn accepted_ids(response: reqwest::Response, queue: &str, n: usize) -> Vec<String> {
    assert_eq!(response.status(), 202, "expected 202");
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["queue"], queue);
    assert_eq!(json["accepted"], n);
    assert_eq!(json["failed"], 0);
    let items = json["items"].as_array().expect("items");
    assert_eq!(items.len(), n);
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["index"], i);
            assert_eq!(item["status"], 202);
            item["job_id"].as_str().expect("job_id").to_owned()
        })
        .collect()
}

pub async fn an_ndjson_batch_becomes_jobs_processed_exactly_once(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("batch");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let body: String = (0..50).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    let response = post_batch(&producer, &queue, "application/x-ndjson", body).await;
    let ids = accepted_ids(response, &queue, 50).await;
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 50, "distinct job ids");
    let consumer = Consumer::start(backend, &queue, &[]).await;
    assert_processed_exactly_once(&[&consumer], &ids, LIMIT).await;
}

pub async fn a_json_array_batch_is_accepted(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("batcharr");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let response = post_batch(
        &producer,
        &queue,
        "application/json",
        r#"[{"to":"ada@example.com"}, "plain", 3, [1, 2]]"#,
    )
    .await;
    let ids = accepted_ids(response, &queue, 4).await;
    let consumer = Consumer::start(backend, &queue, &[]).await;
    assert_processed_exactly_once(&[&consumer], &ids, LIMIT).await;
}

pub async fn a_batch_with_a_bad_line_or_type_publishes_nothing(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("batchbad");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    // One good job first, so the queue exists with something in it; no consumer runs.
    producer.post_ok(&queue, "{}").await;
    let before = backend.pending(&queue).await;
    assert_eq!(before, 1);

    let response = post_batch(
        &producer,
        &queue,
        "application/x-ndjson",
        "{\"n\":1}\n{\"n\":2}\nnot json\n{\"n\":4}\n",
    )
    .await;
    assert_eq!(response.status(), 400);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "urn:jobgate:problem:malformed-batch");
    assert!(
        problem["detail"].as_str().unwrap().contains("Line 3"),
        "{problem}"
    );

    let response = post_batch(&producer, &queue, "text/plain", "{\"n\":1}\n").await;
    assert_problem(response, 415, "unsupported-media-type").await;

    // Give a stray publish time to show up before looking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        backend.pending(&queue).await,
        before,
        "nothing was published"
    );
}

/// With `JOBGATE_MAX_IN_FLIGHT=4`, a batch of 10 holds at most half the permits (the
/// default `JOBGATE_BATCH_IN_FLIGHT_PERCENT`): its items wait their turn within the batch
/// instead of failing, so all ten are taken (202, in order), while single jobs posted
/// meanwhile still find permits.
pub async fn a_batch_over_its_share_of_the_in_flight_limit_waits_its_turn(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("share");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer =
        Producer::start(backend, &[&queue], &vars(&[("JOBGATE_MAX_IN_FLIGHT", "4")])).await;
    let body: String = (0..10).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    let batch = post_batch(&producer, &queue, "application/x-ndjson", body);
    let singles = async {
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(producer.post_ok(&queue, format!("single {i}")).await);
        }
        ids
    };
    let (response, singles) = futures::join!(batch, singles);
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["accepted"], 10, "{answer}");
    let items = answer["items"].as_array().unwrap();
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["index"], i, "items are answered in order");
        assert_eq!(item["status"], 202, "{answer}");
    }
    assert_eq!(singles.len(), 3);
    wait_until(
        LIMIT,
        "the queue to hold the batch and the single jobs",
        || async { backend.pending(&queue).await == 13 },
    )
    .await;
    // The permits came back: a single job is taken again.
    producer.post_ok(&queue, "after the batch").await;
}
