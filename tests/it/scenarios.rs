//! End-to-end scenarios written once, run against both backends by
//! `on_both_backends!`: each is an `async fn(Backend)`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::Value;

use crate::helpers::{
    assert_problem, assert_processed_exactly_once, brokers_exclusive, brokers_shared,
    processing_counts, unique, vars, wait_until, Backend, Consumer, Producer, KAFKA_PARTITIONS,
};

pub const PROCESS_LIMIT: Duration = Duration::from_secs(60);

on_both_backends!(
    every_posted_job_is_processed_exactly_once_and_the_queue_ends_empty,
    three_consumer_processes_share_one_queue,
    oversized_body_gets_413_problem_and_nothing_is_published,
    unknown_queue_gets_404_problem_and_post_jobs_uses_the_first_queue,
    sigterm_lets_in_flight_jobs_finish_and_ack_within_the_grace_period,
    sigterm_with_jobs_in_flight_past_the_grace_period_loses_none,
    broker_down_gives_503_within_the_timeout_and_both_binaries_recover,
);

pub async fn every_posted_job_is_processed_exactly_once_and_the_queue_ends_empty(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("once");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let ids = producer.post_many(&queue, 200).await;
    let distinct: BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 200, "job ids must be distinct");
    for id in &ids {
        let uuid = uuid::Uuid::parse_str(id).expect("job id is a UUID");
        assert_eq!(uuid.get_version_num(), 7, "job id is a UUID v7");
    }

    let mut consumer =
        Consumer::start(backend, &queue, &vars(&[("JOBGATE_CONCURRENCY", "16")])).await;
    assert_processed_exactly_once(&[&consumer], &ids, PROCESS_LIMIT).await;

    consumer.process.terminate();
    assert_eq!(
        consumer.process.wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
    // With the consumer gone, anything not acked (committed) would still be pending.
    assert_eq!(backend.pending(&queue).await, 0);
}

pub async fn three_consumer_processes_share_one_queue(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("share");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    // Slow jobs and a small prefetch so no single consumer can take everything.
    let settings = vars(&[("JOBGATE_CONCURRENCY", "2"), ("JOBGATE_LOG_DELAY_MS", "30")]);
    let a = Consumer::start(backend, &queue, &settings).await;
    let b = Consumer::start(backend, &queue, &settings).await;
    let c = Consumer::start(backend, &queue, &settings).await;
    // Kafka: a rebalance while jobs run could hand a processed but uncommitted job to
    // another consumer (at least once); this scenario is about sharing, not that.
    backend
        .wait_group_stable(&[&a, &b, &c], KAFKA_PARTITIONS)
        .await;

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

pub async fn oversized_body_gets_413_problem_and_nothing_is_published(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("big");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(
        backend,
        &[&queue],
        &vars(&[("JOBGATE_MAX_BODY_BYTES", "1024")]),
    )
    .await;

    let response = producer.post(&queue, vec![b'x'; 1025]).await;
    assert_eq!(response.status(), 413);
    assert_problem(response, 413, "body-too-large").await;

    // Exactly at the limit is fine.
    producer.post_ok(&queue, vec![b'x'; 1024]).await;
    assert_eq!(
        backend.pending(&queue).await,
        1,
        "only the accepted job is queued"
    );
}

pub async fn unknown_queue_gets_404_problem_and_post_jobs_uses_the_first_queue(backend: Backend) {
    let _brokers = brokers_shared().await;
    let first = unique("first");
    let second = unique("second");
    let _cleanup = backend.cleanup(&[&first, &second]);
    let producer = Producer::start(backend, &[&first, &second], &[]).await;

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
    assert_eq!(backend.pending(&first).await, 1);
    assert_eq!(backend.pending(&second).await, 1);
}

pub async fn sigterm_lets_in_flight_jobs_finish_and_ack_within_the_grace_period(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("drain");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let mut consumer = Consumer::start(
        backend,
        &queue,
        &vars(&[
            ("JOBGATE_CONCURRENCY", "4"),
            ("JOBGATE_LOG_DELAY_MS", "1500"),
            ("JOBGATE_SHUTDOWN_GRACE_MS", "20000"),
        ]),
    )
    .await;
    let ids = producer.post_many(&queue, 4).await;
    wait_until(Duration::from_secs(30), "4 jobs in flight", || {
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
        backend.pending(&queue).await,
        0,
        "all four were acked before exit"
    );
}

pub async fn sigterm_with_jobs_in_flight_past_the_grace_period_loses_none(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("abandon");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let mut slow = Consumer::start(
        backend,
        &queue,
        &vars(&[
            ("JOBGATE_CONCURRENCY", "4"),
            ("JOBGATE_LOG_DELAY_MS", "30000"),
            ("JOBGATE_SHUTDOWN_GRACE_MS", "300"),
        ]),
    )
    .await;
    let ids = producer.post_many(&queue, 10).await;
    wait_until(Duration::from_secs(30), "4 jobs in flight", || {
        std::future::ready(slow.started().len() >= 4)
    })
    .await;
    // Nothing finishes within 30 s: every job started is still running.
    assert_eq!(slow.started().len(), 4, "concurrency 4 runs at most 4 jobs");
    slow.process.terminate();
    assert_eq!(
        slow.process.wait_exit(Duration::from_secs(15)).await,
        Some(0)
    );
    assert!(
        slow.processed().is_empty(),
        "the slow jobs could not have finished"
    );

    let fresh = Consumer::start(backend, &queue, &vars(&[("JOBGATE_CONCURRENCY", "8")])).await;
    assert_processed_exactly_once(&[&slow, &fresh], &ids, PROCESS_LIMIT).await;
}

pub async fn broker_down_gives_503_within_the_timeout_and_both_binaries_recover(backend: Backend) {
    let _brokers = brokers_exclusive().await;
    let queue = unique("outage");
    let _cleanup = backend.cleanup(&[&queue]);
    let publish_timeout = Duration::from_millis(2000);
    let producer = Producer::start(
        backend,
        &[&queue],
        &vars(&[("JOBGATE_PUBLISH_TIMEOUT_MS", "2000")]),
    )
    .await;
    let consumer = Consumer::start(backend, &queue, &[]).await;
    let before = producer.post_many(&queue, 5).await;
    assert_processed_exactly_once(&[&consumer], &before, PROCESS_LIMIT).await;
    // Settled before the outage (Kafka commits offsets asynchronously), so nothing of
    // `before` may come back afterwards.
    wait_until(
        Duration::from_secs(30),
        "the processed jobs to be settled",
        || async { backend.pending(&queue).await == 0 },
    )
    .await;

    backend.stop().await;
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
    backend.start().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }

    producer.wait_ready(Duration::from_secs(30)).await;
    let after = producer.post_many(&queue, 5).await;
    let all: Vec<String> = before.into_iter().chain(after).collect();
    assert_processed_exactly_once(&[&consumer], &all, PROCESS_LIMIT).await;
}
