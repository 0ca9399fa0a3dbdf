//! RabbitMQ's memory alarm: the broker blocks publishers (`connection.blocked`). The
//! producer turns not ready and answers 503 within its publish timeout (never hangs),
//! and takes jobs again once the alarm clears. A batch posted meanwhile is refused
//! whole (503, no item taken).

use std::time::{Duration, Instant};

use futures::FutureExt;

use crate::helpers::{
    assert_problem, brokers_exclusive, rabbit, unique, vars, wait_until, Backend, Producer,
};

const BACKEND: Backend = Backend::Rabbitmq;

#[tokio::test]
async fn memory_alarm_gives_503_and_the_producer_recovers_when_it_clears() {
    let _brokers = brokers_exclusive().await;
    let queue = unique("alarm");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let publish_timeout = Duration::from_millis(2000);
    let producer = Producer::start(
        BACKEND,
        &[&queue],
        &vars(&[("JOBGATE_PUBLISH_TIMEOUT_MS", "2000")]),
    )
    .await;
    let before = producer.post_ok(&queue, "before the alarm").await;

    rabbit::set_memory_watermark("0.0000001").await;
    let outcome = async {
        wait_until(
            Duration::from_secs(30),
            "readyz to say not ready under the memory alarm",
            || async { producer.readyz().await == 503 },
        )
        .await;
        let started = Instant::now();
        let response = producer.post(&queue, "during the alarm").await;
        let took = started.elapsed();
        assert!(
            took < publish_timeout + Duration::from_secs(3),
            "a request hung for {took:?}"
        );
        assert!(response.headers().contains_key("retry-after"));
        assert_problem(response, 503, "broker-unavailable").await;

        // A batch during the alarm: none taken, 503 with every item failed.
        let response = producer
            .http
            .post(producer.url(&format!("/jobs/{queue}/batch")))
            .header("content-type", "application/x-ndjson")
            .body("{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["accepted"], 0, "{answer}");
        assert_eq!(answer["failed"], 3, "{answer}");
    };
    // Clear the alarm even when an assertion failed, for the other tests.
    let result = std::panic::AssertUnwindSafe(outcome).catch_unwind().await;
    rabbit::set_memory_watermark("0.4").await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }

    producer.wait_ready(Duration::from_secs(30)).await;
    let after = producer.post_ok(&queue, "after the alarm").await;
    assert_ne!(before, after);
    // The refused job was not queued; the accepted ones were.
    wait_until(
        Duration::from_secs(10),
        "the queue to hold the two accepted jobs",
        || async { BACKEND.pending(&queue).await == 2 },
    )
    .await;
}
