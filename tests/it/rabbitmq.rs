//! End-to-end scenarios on RabbitMQ.

use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::Value;

use crate::helpers::{
    assert_processed_exactly_once, brokers_exclusive, brokers_shared, processing_counts, rabbit,
    unique, wait_until, Consumer, Producer,
};

const PROCESS_LIMIT: Duration = Duration::from_secs(60);

fn env(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

#[tokio::test]
async fn every_posted_job_is_processed_exactly_once_and_the_queue_ends_empty() {
    let _brokers = brokers_shared().await;
    let queue = unique("once");
    let producer = Producer::start(&[&queue], &[]).await;
    let ids = producer.post_many(&queue, 200).await;
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 200, "job ids must be distinct");
    for id in &ids {
        let uuid = uuid::Uuid::parse_str(id).expect("job id is a UUID");
        assert_eq!(uuid.get_version_num(), 7, "job id is a UUID v7");
    }

    let mut consumer = Consumer::start(&queue, &env(&[("JOBGATE_CONCURRENCY", "16")])).await;
    assert_processed_exactly_once(&[&consumer], &ids, PROCESS_LIMIT).await;

    consumer.process.terminate();
    assert_eq!(
        consumer.process.wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
    // With the consumer gone, anything not acked would be back in the queue.
    assert_eq!(rabbit::ready_count(&queue).await, 0);
}

#[tokio::test]
async fn three_consumer_processes_share_one_queue() {
    let _brokers = brokers_shared().await;
    let queue = unique("share");
    let producer = Producer::start(&[&queue], &[]).await;
    // Slow jobs and a small prefetch so no single consumer can take everything.
    let settings = env(&[("JOBGATE_CONCURRENCY", "2"), ("JOBGATE_LOG_DELAY_MS", "30")]);
    let a = Consumer::start(&queue, &settings).await;
    let b = Consumer::start(&queue, &settings).await;
    let c = Consumer::start(&queue, &settings).await;

    let ids = producer.post_many(&queue, 150).await;
    assert_processed_exactly_once(&[&a, &b, &c], &ids, PROCESS_LIMIT).await;
    for (name, consumer) in [("a", &a), ("b", &b), ("c", &c)] {
        assert!(
            !consumer.processed().is_empty(),
            "consumer {name} took no job"
        );
    }
    let total: usize = processing_counts(&[&a, &b, &c]).values().sum();
    assert_eq!(total, 150);
}

#[tokio::test]
async fn oversized_body_gets_413_problem_and_nothing_is_published() {
    let _brokers = brokers_shared().await;
    let queue = unique("big");
    let producer = Producer::start(&[&queue], &env(&[("JOBGATE_MAX_BODY_BYTES", "1024")])).await;

    let response = producer.post(&queue, vec![b'x'; 1025]).await;
    assert_eq!(response.status(), 413);
    assert_problem(response, 413, "body-too-large").await;

    // Exactly at the limit is fine.
    producer.post_ok(&queue, vec![b'x'; 1024]).await;
    assert_eq!(
        rabbit::ready_count(&queue).await,
        1,
        "only the accepted job is queued"
    );
}

#[tokio::test]
async fn unknown_queue_gets_404_problem_and_post_jobs_uses_the_first_queue() {
    let _brokers = brokers_shared().await;
    let first = unique("first");
    let second = unique("second");
    let producer = Producer::start(&[&first, &second], &[]).await;

    let response = producer.post("not-configured", "x").await;
    assert_problem(response, 404, "unknown-queue").await;
    let response = producer
        .http
        .get(producer.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    assert_problem(response, 404, "not-found").await;

    let response = producer
        .http
        .post(producer.url("/jobs"))
        .body("to the default queue")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["queue"], first.as_str());
    producer.post_ok(&second, "to the second queue").await;
    assert_eq!(rabbit::ready_count(&first).await, 1);
    assert_eq!(rabbit::ready_count(&second).await, 1);
}

#[tokio::test]
async fn management_api_shows_the_job_with_its_real_body_and_properties() {
    let _brokers = brokers_shared().await;
    let queue = unique("props");
    let producer = Producer::start(&[&queue], &[]).await;
    let body = r#"{"to":"ada@example.com","subject":"hi"}"#;
    let response = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let job_id = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let info = rabbit::queue_info(&queue).await.expect("queue exists");
    assert_eq!(info["durable"], true);
    assert_eq!(info["type"], "quorum");
    assert_eq!(
        info["arguments"]["x-dead-letter-routing-key"],
        format!("{queue}.dlq")
    );
    assert!(
        rabbit::queue_info(&format!("{queue}.dlq")).await.is_some(),
        "DLQ declared"
    );

    let messages = rabbit::peek(&queue, 1).await;
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m["payload"], body);
    assert_eq!(m["routing_key"], queue.as_str());
    let p = &m["properties"];
    assert_eq!(p["message_id"], job_id.as_str());
    assert_eq!(p["content_type"], "application/json");
    assert_eq!(p["delivery_mode"], 2);
    assert_eq!(p["headers"]["x-attempt"], 1);
    assert!(p["timestamp"].as_u64().is_some(), "timestamp set: {p}");
}

#[tokio::test]
async fn a_queue_deleted_behind_the_producers_back_gets_503_then_is_declared_again() {
    let _brokers = brokers_shared().await;
    let queue = unique("deleted");
    let producer = Producer::start(&[&queue], &[]).await;
    producer.post_ok(&queue, "before").await;
    rabbit::delete_queue(&queue).await;

    // `mandatory` makes RabbitMQ return the unroutable message: never a false 202.
    let response = producer.post(&queue, "unroutable").await;
    assert_problem(response, 503, "broker-unavailable").await;
    wait_until(
        Duration::from_secs(10),
        "the queue to be declared again",
        || async { rabbit::queue_info(&queue).await.is_some() },
    )
    .await;
    producer.post_ok(&queue, "after").await;
    assert_eq!(
        rabbit::ready_count(&queue).await,
        1,
        "only the job after redeclare is queued"
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_jobs_finish_and_ack_within_the_grace_period() {
    let _brokers = brokers_shared().await;
    let queue = unique("drain");
    let producer = Producer::start(&[&queue], &[]).await;
    let mut consumer = Consumer::start(
        &queue,
        &env(&[
            ("JOBGATE_CONCURRENCY", "4"),
            ("JOBGATE_LOG_DELAY_MS", "1500"),
            ("JOBGATE_SHUTDOWN_GRACE_MS", "20000"),
        ]),
    )
    .await;
    let ids = producer.post_many(&queue, 4).await;
    wait_until(Duration::from_secs(20), "4 jobs in flight", || {
        std::future::ready(consumer.started().len() == 4)
    })
    .await;
    consumer.process.terminate();
    assert_eq!(
        consumer.process.wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
    assert_processed_exactly_once(&[&consumer], &ids, Duration::ZERO).await;
    assert_eq!(
        rabbit::ready_count(&queue).await,
        0,
        "all four were acked before exit"
    );
}

#[tokio::test]
async fn sigterm_with_jobs_in_flight_past_the_grace_period_loses_none() {
    let _brokers = brokers_shared().await;
    let queue = unique("abandon");
    let producer = Producer::start(&[&queue], &[]).await;
    let mut slow = Consumer::start(
        &queue,
        &env(&[
            ("JOBGATE_CONCURRENCY", "4"),
            ("JOBGATE_LOG_DELAY_MS", "30000"),
            ("JOBGATE_SHUTDOWN_GRACE_MS", "300"),
        ]),
    )
    .await;
    let ids = producer.post_many(&queue, 10).await;
    wait_until(Duration::from_secs(20), "jobs in flight", || {
        std::future::ready(slow.started().len() == 4)
    })
    .await;
    slow.process.terminate();
    assert_eq!(
        slow.process.wait_exit(Duration::from_secs(15)).await,
        Some(0)
    );
    assert!(
        slow.processed().is_empty(),
        "the slow jobs could not have finished"
    );

    let fresh = Consumer::start(&queue, &env(&[("JOBGATE_CONCURRENCY", "8")])).await;
    assert_processed_exactly_once(&[&slow, &fresh], &ids, PROCESS_LIMIT).await;
}

#[tokio::test]
async fn producer_sigterm_exits_zero_after_answering_in_flight_requests() {
    let _brokers = brokers_shared().await;
    let queue = unique("pstop");
    let mut producer = Producer::start(&[&queue], &[]).await;
    let posts = {
        let (http, url) = (
            producer.http.clone(),
            producer.url(&format!("/jobs/{queue}")),
        );
        tokio::spawn(async move {
            let mut accepted = 0;
            for i in 0..200 {
                match http.post(&url).body(format!("{i}")).send().await {
                    Ok(r) if r.status() == 202 => accepted += 1,
                    Ok(r) => assert_eq!(r.status(), 503, "only 202 or 503 while stopping"),
                    Err(_) => break, // the listener is closed: the producer is gone
                }
            }
            accepted
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    producer.process.terminate();
    assert_eq!(
        producer.process.wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
    let accepted = posts.await.unwrap();
    assert!(accepted > 0, "some jobs were accepted before the signal");
    // Every 202 is in the broker.
    assert_eq!(rabbit::ready_count(&queue).await, accepted);
}

#[tokio::test]
async fn broker_down_gives_503_within_the_timeout_and_both_binaries_recover() {
    let _brokers = brokers_exclusive().await;
    let queue = unique("outage");
    let publish_timeout = Duration::from_millis(2000);
    let producer =
        Producer::start(&[&queue], &env(&[("JOBGATE_PUBLISH_TIMEOUT_MS", "2000")])).await;
    let consumer = Consumer::start(&queue, &[]).await;
    let before = producer.post_many(&queue, 5).await;
    assert_processed_exactly_once(&[&consumer], &before, PROCESS_LIMIT).await;

    rabbit::stop_app();
    let outcome = async {
        wait_until(
            Duration::from_secs(15),
            "readyz to say not ready",
            || async { producer.readyz().await == 503 },
        )
        .await;
        for _ in 0..3 {
            let started = Instant::now();
            let response = producer.post(&queue, "during the outage").await;
            let took = started.elapsed();
            assert!(
                took < publish_timeout + Duration::from_secs(3),
                "a request hung for {took:?}"
            );
            assert!(response.headers().contains_key("retry-after"));
            assert_problem(response, 503, "broker-unavailable").await;
        }
    };
    // Start the broker again even when an assertion failed, for the other tests.
    let result = std::panic::AssertUnwindSafe(outcome).catch_unwind().await;
    rabbit::start_app().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }

    producer.wait_ready(Duration::from_secs(30)).await;
    let after = producer.post_many(&queue, 5).await;
    let all: Vec<String> = before.into_iter().chain(after).collect();
    assert_processed_exactly_once(&[&consumer], &all, PROCESS_LIMIT).await;
}

async fn assert_problem(response: reqwest::Response, status: u16, slug: &str) {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], status);
    assert_eq!(problem["type"], format!("urn:jobgate:problem:{slug}"));
    assert!(problem["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(problem["detail"].as_str().is_some_and(|t| !t.is_empty()));
}
