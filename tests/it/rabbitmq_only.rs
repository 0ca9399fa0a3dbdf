//! Scenarios that only make sense on RabbitMQ: the management API's view of a job, a
//! queue deleted by hand, and the prefetch (`basic.qos`) above the concurrency.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    assert_problem, assert_processed_exactly_once, brokers_shared, rabbit, unique, vars,
    wait_until, Backend, Consumer, Producer,
};

const BACKEND: Backend = Backend::Rabbitmq;

#[tokio::test]
async fn management_api_shows_the_job_with_its_real_body_and_properties() {
    let _brokers = brokers_shared().await;
    let queue = unique("props");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
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
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
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
        BACKEND.pending(&queue).await,
        1,
        "only the job after redeclare is queued"
    );
}

/// `JOBGATE_PREFETCH` above the concurrency: the broker hands the consumer that many
/// jobs while it runs one; at SIGTERM the ones it had not started go back to the queue
/// and another consumer processes them, each exactly once.
#[tokio::test]
async fn prefetch_above_concurrency_holds_jobs_and_gives_back_the_unstarted_at_shutdown() {
    let _brokers = brokers_shared().await;
    let queue = unique("prefetch");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let ids = producer.post_many(&queue, 10).await;
    let mut first = Consumer::start(
        BACKEND,
        &queue,
        &vars(&[
            ("JOBGATE_CONCURRENCY", "1"),
            ("JOBGATE_PREFETCH", "5"),
            ("JOBGATE_LOG_DELAY_MS", "3000"),
        ]),
    )
    .await;
    // Five delivered (one running, four waiting in the consumer), five still ready.
    wait_until(Duration::from_secs(20), "five jobs delivered", || async {
        rabbit::ready_count(&queue).await == 5
    })
    .await;
    assert_eq!(first.started().len(), 1, "{}", first.process.dump());

    first.process.terminate();
    assert_eq!(
        first.process.wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
    // The running job finished and was acked; the four waiting ones went back.
    assert_eq!(first.processed().len(), 1, "{}", first.process.dump());
    assert_eq!(rabbit::ready_count(&queue).await, 9);

    let fresh = Consumer::start(BACKEND, &queue, &vars(&[("JOBGATE_CONCURRENCY", "8")])).await;
    assert_processed_exactly_once(&[&first, &fresh], &ids, Duration::from_secs(60)).await;
}

/// At SIGTERM the prefetched jobs a consumer had not started go back to the queue AT
/// ONCE (nack with requeue right after the cancel), not when its channel closes at the
/// end of the grace: while its one running job still runs, the other nine are ready.
#[tokio::test]
async fn prefetched_jobs_go_back_right_after_sigterm_not_after_the_grace() {
    let _brokers = brokers_shared().await;
    let queue = unique("giveback");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let ids = producer.post_many(&queue, 10).await;
    let mut first = Consumer::start(
        BACKEND,
        &queue,
        &vars(&[
            ("JOBGATE_CONCURRENCY", "1"),
            ("JOBGATE_PREFETCH", "10"),
            ("JOBGATE_LOG_DELAY_MS", "20000"),
            ("JOBGATE_SHUTDOWN_GRACE_MS", "60000"),
        ]),
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "all ten jobs delivered",
        || async { rabbit::ready_count(&queue).await == 0 },
    )
    .await;
    wait_until(Duration::from_secs(20), "one job started", || {
        std::future::ready(first.started().len() == 1)
    })
    .await;

    first.process.terminate();
    wait_until(
        Duration::from_secs(10),
        "the nine unstarted jobs to be ready again while the running one runs",
        || async { rabbit::ready_count(&queue).await == 9 },
    )
    .await;
    assert!(
        first.processed().is_empty(),
        "the running job is still running (20 s): the nine came back before the grace \
         ended\n{}",
        first.process.dump()
    );
    let fresh = Consumer::start(BACKEND, &queue, &vars(&[("JOBGATE_CONCURRENCY", "8")])).await;
    assert_processed_exactly_once(&[&first, &fresh], &ids, Duration::from_secs(60)).await;
    assert_eq!(
        first.process.wait_exit(Duration::from_secs(40)).await,
        Some(0)
    );
}
