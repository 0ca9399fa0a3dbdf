//! Job processing on both backends, with the real `consumer` binary and its built-in
//! `exec` and `http` handlers: broker-served retry delays, dead letters and their
//! replay, status codes and exit codes, job timeouts, junk put on a queue by hand.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::helpers::{brokers_shared, dlq, unique, vars, wait_until, Backend, Consumer, Producer};

const LIMIT: Duration = Duration::from_secs(90);

on_both_backends!(
    a_job_failing_twice_succeeds_on_attempt_three_after_broker_served_delays,
    an_always_failing_job_is_dead_lettered_and_replay_brings_it_back,
    http_handler_retries_429_and_5xx_dead_letters_400_and_finishes_200,
    exec_exit_codes_and_a_job_timeout_give_the_documented_outcomes,
    junk_put_on_the_queue_by_hand_is_processed_without_a_crash,
);

/// The time of a JSON log line.
fn at(line: &Value) -> SystemTime {
    humantime::parse_rfc3339_weak(line["timestamp"].as_str().expect("timestamp"))
        .or_else(|_| humantime::parse_rfc3339(line["timestamp"].as_str().unwrap()))
        .expect("RFC 3339 timestamp")
}

/// "job started" lines of one job, by attempt.
fn starts(consumer: &Consumer, job_id: &str) -> BTreeMap<u64, Value> {
    consumer
        .process
        .lines("job started")
        .into_iter()
        .filter(|l| l["job_id"] == job_id)
        .map(|l| (l["attempt"].as_u64().unwrap(), l))
        .collect()
}

/// Outcomes settled for one job ("Done", or the Retry/Dead debug text), in order.
fn settled(consumer: &Consumer, job_id: &str) -> Vec<String> {
    consumer
        .process
        .lines("job settled")
        .into_iter()
        .filter(|l| l["job_id"] == job_id)
        .map(|l| l["outcome"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// True once the worker dead-lettered `job_id`.
fn dead_lettered(consumer: &Consumer, job_id: &str) -> bool {
    consumer
        .process
        .lines("job failed for good; dead-lettered")
        .iter()
        .any(|l| l["job_id"] == job_id)
}

fn exec_env(command: &str, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vars(&[
        ("JOBGATE_HANDLER", "exec"),
        ("JOBGATE_EXEC_COMMAND", command),
    ]);
    env.extend(vars(extra));
    env
}

pub async fn a_job_failing_twice_succeeds_on_attempt_three_after_broker_served_delays(
    backend: Backend,
) {
    let _brokers = brokers_shared().await;
    let queue = unique("retry");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let consumer = Consumer::start(
        backend,
        &queue,
        &exec_env(
            r#"sh -c 'test "$JOB_ATTEMPT" -ge 3 || exit 75'"#,
            &[
                ("JOBGATE_RETRY_BASE_MS", "1000"),
                ("JOBGATE_RETRY_MAX_MS", "4000"),
            ],
        ),
    )
    .await;
    let id = producer.post_ok(&queue, "flaky").await;
    wait_until(LIMIT, "the job to be done", || {
        std::future::ready(settled(&consumer, &id).last().is_some_and(|o| o == "Done"))
    })
    .await;

    let starts = starts(&consumer, &id);
    assert_eq!(
        starts.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{}",
        consumer.process.dump()
    );
    let gap = |a: u64, b: u64| at(&starts[&b]).duration_since(at(&starts[&a])).unwrap();
    // The schedule: 1 s after attempt 1, 2 s after attempt 2, served by the broker. The
    // lower bounds are exact (a retry cannot come back before its delay); the upper
    // bounds are loose on purpose.
    let (first, second) = (gap(1, 2), gap(2, 3));
    assert!(
        first >= Duration::from_millis(950) && first < Duration::from_secs(12),
        "gap 1->2: {first:?}"
    );
    assert!(
        second >= Duration::from_millis(1950) && second < Duration::from_secs(14),
        "gap 2->3: {second:?}"
    );
    assert_eq!(settled(&consumer, &id).len(), 3, "two retries, then done");
}

pub async fn an_always_failing_job_is_dead_lettered_and_replay_brings_it_back(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("dead");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let mut failing = Consumer::start(
        backend,
        &queue,
        &exec_env(
            r#"sh -c 'echo "disk on fire" >&2; exit 3'"#,
            &[
                ("JOBGATE_MAX_ATTEMPTS", "2"),
                ("JOBGATE_RETRY_BASE_MS", "200"),
                ("JOBGATE_RETRY_MAX_MS", "200"),
            ],
        ),
    )
    .await;
    let ids = producer.post_many(&queue, 3).await;
    for id in &ids {
        wait_until(LIMIT, "the job to be dead-lettered", || {
            std::future::ready(dead_lettered(&failing, id))
        })
        .await;
    }
    failing.process.terminate();
    assert_eq!(
        failing.process.wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );

    let dead = dlq::list(backend, &queue).await;
    let mut listed: Vec<&str> = dead.iter().map(|d| d["job_id"].as_str().unwrap()).collect();
    listed.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(listed, expected);
    for d in &dead {
        assert_eq!(d["attempts"], 2, "{d}");
        let reason = d["reason"].as_str().unwrap();
        assert!(
            reason.contains("status 3") && reason.contains("disk on fire"),
            "{reason}"
        );
        assert_eq!(d["original_queue"], queue.as_str());
        assert!(d["failed_at"].as_str().is_some());
    }
    // Listing does not consume.
    assert_eq!(dlq::list(backend, &queue).await.len(), 3);

    let healthy = Consumer::start(backend, &queue, &[]).await;
    let out = dlq::run(backend, &["replay", "--queue", &queue]).await;
    assert!(out.contains("replayed 3"), "{out}");
    crate::helpers::assert_processed_exactly_once(&[&healthy], &ids, LIMIT).await;
    for line in healthy.process.lines("job processed") {
        assert_eq!(line["attempt"], 1, "replay resets the attempts: {line}");
    }
    assert!(
        dlq::list(backend, &queue).await.is_empty(),
        "the DLQ is empty after replay"
    );
}

/// A tiny HTTP endpoint for the `http` handler: answers with the status named by the
/// body ("429" with `Retry-After: 0`), and records (body, attempt) of every request.
async fn status_server() -> (String, Arc<Mutex<Vec<(String, u64)>>>) {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let record = Arc::clone(&record);
            async move {
                let attempt = headers["job-attempt"].to_str().unwrap().parse().unwrap();
                record.lock().unwrap().push((body.clone(), attempt));
                let status = StatusCode::from_u16(body.trim().parse().unwrap()).unwrap();
                if status == StatusCode::TOO_MANY_REQUESTS {
                    (status, [("retry-after", "0")]).into_response()
                } else {
                    status.into_response()
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

pub async fn http_handler_retries_429_and_5xx_dead_letters_400_and_finishes_200(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("http");
    let _cleanup = backend.cleanup(&[&queue]);
    let (url, seen) = status_server().await;
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let consumer = Consumer::start(
        backend,
        &queue,
        &vars(&[
            ("JOBGATE_HANDLER", "http"),
            ("JOBGATE_HTTP_URL", &url),
            ("JOBGATE_MAX_ATTEMPTS", "2"),
            ("JOBGATE_RETRY_BASE_MS", "200"),
            ("JOBGATE_RETRY_MAX_MS", "400"),
        ]),
    )
    .await;
    let mut ids = BTreeMap::new();
    for status in ["500", "429", "400", "200"] {
        ids.insert(status, producer.post_ok(&queue, status).await);
    }
    wait_until(LIMIT, "every job to be settled for good", || {
        std::future::ready(
            ["500", "429", "400"]
                .iter()
                .all(|s| dead_lettered(&consumer, &ids[s]))
                && settled(&consumer, &ids["200"]) == ["Done"],
        )
    })
    .await;
    let attempts = |status: &str| -> Vec<u64> {
        let seen = seen.lock().unwrap();
        seen.iter()
            .filter(|(b, _)| b == status)
            .map(|(_, a)| *a)
            .collect()
    };
    assert_eq!(
        attempts("500"),
        vec![1, 2],
        "5xx is retried until attempts run out"
    );
    assert_eq!(attempts("429"), vec![1, 2], "429 is retried");
    assert_eq!(attempts("400"), vec![1], "400 is dead at once");
    assert_eq!(attempts("200"), vec![1], "200 is done");

    let dead = dlq::list(backend, &queue).await;
    let reason_of = |status: &str| -> String {
        let d = dead.iter().find(|d| d["job_id"] == ids[status].as_str());
        d.unwrap_or_else(|| panic!("{status} not in the DLQ: {dead:?}"))["reason"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(reason_of("400").contains("400"));
    assert!(reason_of("500").contains("500"));
    assert!(reason_of("429").contains("429"));
    assert!(!dead.iter().any(|d| d["job_id"] == ids["200"].as_str()));
}

pub async fn exec_exit_codes_and_a_job_timeout_give_the_documented_outcomes(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("exec");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    // The body picks the behaviour; `exec` lets the last program replace the shell so
    // that a timeout kills what runs.
    let script = r#"sh -c 'body=$(cat); case "$body" in
        ok) exit 0 ;;
        tempfail) [ "$JOB_ATTEMPT" -ge 2 ] || exit 75 ;;
        broken) exit 3 ;;
        signal) kill -9 $$ ;;
        slow) [ "$JOB_ATTEMPT" -ge 2 ] || exec sleep 60 ;;
      esac'"#;
    let consumer = Consumer::start(
        backend,
        &queue,
        &exec_env(
            script,
            &[
                ("JOBGATE_MAX_ATTEMPTS", "2"),
                ("JOBGATE_RETRY_BASE_MS", "200"),
                ("JOBGATE_RETRY_MAX_MS", "200"),
                ("JOBGATE_JOB_TIMEOUT_MS", "1500"),
            ],
        ),
    )
    .await;
    let mut ids = BTreeMap::new();
    for body in ["ok", "tempfail", "broken", "signal", "slow"] {
        ids.insert(body, producer.post_ok(&queue, body).await);
    }
    wait_until(LIMIT, "every job to be settled for good", || {
        std::future::ready(
            ["ok", "tempfail", "slow"].iter().all(|b| {
                settled(&consumer, &ids[b])
                    .last()
                    .is_some_and(|o| o == "Done")
            }) && ["broken", "signal"]
                .iter()
                .all(|b| dead_lettered(&consumer, &ids[b])),
        )
    })
    .await;
    let attempts = |body: &str| starts(&consumer, &ids[body]).len();
    assert_eq!(attempts("ok"), 1, "exit 0: done");
    assert_eq!(attempts("tempfail"), 2, "exit 75: retried, then done");
    assert_eq!(
        attempts("broken"),
        2,
        "exit 3: retried until attempts ran out"
    );
    assert_eq!(
        attempts("signal"),
        2,
        "killed by a signal: retried until attempts ran out"
    );
    assert_eq!(
        attempts("slow"),
        2,
        "timed out: cancelled and retried, then done"
    );
    let reasons: Vec<String> = consumer
        .process
        .lines("job failed; it will be retried")
        .into_iter()
        .filter(|l| l["job_id"] == ids["slow"].as_str())
        .map(|l| l["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("timed out")),
        "{reasons:?}"
    );
}

pub async fn junk_put_on_the_queue_by_hand_is_processed_without_a_crash(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("junk");
    let _cleanup = backend.cleanup(&[&queue]);
    let consumer = Consumer::start(backend, &queue, &[]).await;
    // No job id, no content type, an empty body; and one with a junk attempt header and
    // bytes that are not UTF-8 in a header.
    crate::helpers::publish_junk(backend, &queue).await;
    wait_until(LIMIT, "both hand-made messages to be processed", || {
        std::future::ready(consumer.process.lines("job processed").len() == 2)
    })
    .await;
    for line in consumer.process.lines("job processed") {
        assert_eq!(
            line["attempt"], 1,
            "junk attempt header -> attempt 1: {line}"
        );
        assert!(!line["job_id"].as_str().unwrap().is_empty());
    }
    let empty = consumer.process.lines("job processed");
    assert!(
        empty.iter().any(|l| l["bytes"] == 0),
        "the empty body was processed too"
    );
    assert!(consumer
        .process
        .lines("job failed for good; dead-lettered")
        .is_empty());
    // Still alive and consuming: a normal job goes through too.
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let id = producer.post_ok(&queue, "normal").await;
    wait_until(LIMIT, "a normal job after the junk", || {
        std::future::ready(consumer.processed().contains(&id))
    })
    .await;
}
