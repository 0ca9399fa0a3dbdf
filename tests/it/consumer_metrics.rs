//! The consumer's metrics and probes listener (`JOBGATE_METRICS_LISTEN`), on both
//! backends, with the real binaries: after jobs that succeed and jobs that are retried
//! and dead-lettered, `/metrics` shows exactly those counts (and agrees with the
//! worker's own log lines), `/readyz` is 200 while the consumer runs, every log line
//! of a job carries its `job_id` and `queue`, and on Kafka each owned partition's lag
//! is exported and falls to 0 once everything is done.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    brokers_shared, scraped, unique, vars, wait_until, Backend, Consumer, Producer,
    KAFKA_PARTITIONS,
};

const LIMIT: Duration = Duration::from_secs(90);
/// Jobs whose command succeeds, and jobs whose command always fails.
const GOOD: usize = 3;
const BAD: usize = 2;
/// Attempts a job gets in all: a bad job is retried once, then dead-lettered.
const MAX_ATTEMPTS: usize = 2;

on_both_backends!(metrics_count_what_the_consumer_did_and_probes_answer);

/// The base URL of the consumer's metrics listener (it logs the address it bound).
pub(crate) async fn listener_url(consumer: &Consumer) -> String {
    let mut addr = None;
    wait_until(Duration::from_secs(20), "the metrics listener", || {
        addr = consumer
            .process
            .lines("metrics listening")
            .first()
            .and_then(|l| l["addr"].as_str().map(str::to_owned));
        std::future::ready(addr.is_some())
    })
    .await;
    format!("http://{}", addr.unwrap())
}

/// Scrapes `/metrics` until `check` holds for it (at most [`LIMIT`]); returns that text.
async fn scrape_until(
    http: &reqwest::Client,
    base: &str,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let start = std::time::Instant::now();
    loop {
        let text = scraped::fetch(http, base).await;
        if check(&text) {
            return text;
        }
        assert!(
            start.elapsed() < LIMIT,
            "timed out after {LIMIT:?} waiting for {what}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Log lines with `message`, counted.
fn count(consumer: &Consumer, message: &str) -> usize {
    consumer.process.lines(message).len()
}

pub async fn metrics_count_what_the_consumer_did_and_probes_answer(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("metrics");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let max_attempts = MAX_ATTEMPTS.to_string();
    let mut consumer = Consumer::start(
        backend,
        &queue,
        &vars(&[
            ("JOBGATE_METRICS_LISTEN", "127.0.0.1:0"),
            ("JOBGATE_HANDLER", "exec"),
            // The body comes on stdin: "bad" fails (exit 3), anything else succeeds.
            (
                "JOBGATE_EXEC_COMMAND",
                r#"sh -c 'test "$(cat)" != bad || exit 3'"#,
            ),
            ("JOBGATE_MAX_ATTEMPTS", &max_attempts),
            ("JOBGATE_RETRY_BASE_MS", "200"),
            ("JOBGATE_RETRY_MAX_MS", "200"),
        ]),
    )
    .await;
    let base = listener_url(&consumer).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // A rebalance after posting could deliver a job twice and spoil the exact counts.
    backend
        .wait_group_stable(&[&consumer], KAFKA_PARTITIONS)
        .await;

    // Ready once subscribed and the outcome publisher reaches the broker (it checks
    // every second).
    wait_until(
        Duration::from_secs(30),
        "the consumer's /readyz to answer 200",
        || async {
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    let healthz = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);

    let mut ids = Vec::new();
    for _ in 0..GOOD {
        ids.push(producer.post_ok(&queue, "good").await);
    }
    for _ in 0..BAD {
        ids.push(producer.post_ok(&queue, "bad").await);
    }

    let q = format!("queue=\"{queue}\"");
    let jobs = |outcome: &str| format!("{q},outcome=\"{outcome}\"");
    let text = scrape_until(&http, &base, "every job to be done or dead", |text| {
        scraped::sample(text, "jobgate_jobs_total", &jobs("done")) == Some(GOOD as f64)
            && scraped::sample(text, "jobgate_jobs_total", &jobs("dead")) == Some(BAD as f64)
    })
    .await;

    // Exactly what happened: every good job done once, every bad one retried once and
    // then dead-lettered; each attempt ran the handler once.
    let attempts = GOOD + BAD * MAX_ATTEMPTS;
    let expected = [
        ("jobgate_jobs_total", jobs("done"), GOOD),
        (
            "jobgate_jobs_total",
            jobs("retried"),
            BAD * (MAX_ATTEMPTS - 1),
        ),
        ("jobgate_jobs_total", jobs("dead"), BAD),
        ("jobgate_dlq_publishes_total", q.clone(), BAD),
        ("jobgate_job_attempts_total", q.clone(), attempts),
        ("jobgate_job_duration_seconds_count", q.clone(), attempts),
        ("jobgate_jobs_in_flight", q.clone(), 0),
    ];
    for (name, labels, value) in &expected {
        assert_eq!(
            scraped::sample(&text, name, labels),
            Some(*value as f64),
            "{name}{{{labels}}} in\n{text}"
        );
    }
    assert_eq!(
        scraped::sample(&text, "jobgate_broker_up", ""),
        Some(1.0),
        "{text}"
    );
    let last_success = scraped::sample(&text, "jobgate_last_success_timestamp_seconds", &q)
        .expect("a job was done");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        last_success > 0.0 && last_success <= now,
        "a unix time: {last_success}"
    );

    // The metrics agree with the worker's own account in its logs.
    assert_eq!(count(&consumer, "job started"), attempts);
    assert_eq!(
        count(&consumer, "job failed; it will be retried"),
        BAD * (MAX_ATTEMPTS - 1)
    );
    assert_eq!(count(&consumer, "job failed for good; dead-lettered"), BAD);
    assert_eq!(count(&consumer, "job settled"), attempts);

    // Every log line written inside a job's span carries the job's id and queue as
    // fields of its own, for log search without span support.
    let in_job_span: Vec<Value> = consumer
        .process
        .dump()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["span"]["name"] == "job")
        .collect();
    assert!(
        in_job_span.len() >= 2 * attempts,
        "started and settled lines of each attempt: {in_job_span:?}"
    );
    for line in &in_job_span {
        assert_eq!(line["job_id"], line["span"]["job_id"], "{line}");
        assert_eq!(line["queue"], queue.as_str(), "{line}");
    }
    let logged: BTreeSet<&str> = in_job_span
        .iter()
        .filter_map(|l| l["job_id"].as_str())
        .collect();
    let posted: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(logged, posted);

    let lag_name = "jobgate_kafka_consumer_lag";
    match backend {
        Backend::Rabbitmq => assert!(scraped::samples(&text, lag_name).is_empty(), "{text}"),
        Backend::Kafka => {
            // librdkafka reports every few seconds; once the done jobs' offsets are
            // committed, no owned partition is behind.
            let text = scrape_until(&http, &base, "every partition's lag to be 0", |text| {
                let lag = scraped::samples(text, lag_name);
                lag.len() == KAFKA_PARTITIONS as usize && lag.iter().all(|(_, n)| *n == 0.0)
            })
            .await;
            let lag = scraped::samples(&text, lag_name);
            for partition in 0..KAFKA_PARTITIONS {
                let labels = format!("{q},partition=\"{partition}\"");
                assert!(lag.iter().any(|(l, _)| *l == labels), "{labels} in {lag:?}");
            }
        }
    }

    // The listener stops with the worker.
    consumer.process.terminate();
    assert_eq!(consumer.process.wait_exit(LIMIT).await, Some(0));
    assert!(
        http.get(format!("{base}/healthz")).send().await.is_err(),
        "nothing listens after the consumer exited"
    );
}
