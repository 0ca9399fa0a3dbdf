//! Scheduled jobs and per-job policy (issue 16) with the real binaries, Redis and both
//! brokers: a job with `Jobgate-Delay` runs after its time and not before, and shows
//! `scheduled` until then; a cancelled scheduled job never runs; bad or too-far
//! headers are 400; `Jobgate-Max-Attempts: 1` dead-letters after one failed attempt
//! where the consumer allows more; `Jobgate-Timeout` shorter than the consumer's
//! timeout times a slow job out.
//!
//! Nothing asserts how late a job runs (the bench measures that): only the order and
//! the lower bound, a job never starting before its due time.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::consumer_metrics::listener_url;
use crate::helpers::{
    assert_problem, brokers_shared, scraped, unique, vars, wait_until, Backend, Consumer, Producer,
};
use crate::redelivery::shell_words;

const REDIS_URL: &str = "redis://127.0.0.1:6379";
const LIMIT: Duration = Duration::from_secs(90);

/// The store's side (no broker): `scheduled` holds the due time, keeps the record for
/// the TTL after it, gives way to `running` and to a cancel.
#[tokio::test]
async fn a_scheduled_record_holds_its_due_time_and_lives_past_it() {
    use jobgate_shared::status::{State, StatusStore, Transition, Verdict};

    let _brokers = brokers_shared().await;
    let ttl = Duration::from_secs(60);
    let store = StatusStore::new(&REDIS_URL.parse().unwrap(), ttl).expect("a status store");
    let queue = unique("schedstore");
    let due = SystemTime::now() + Duration::from_secs(3600);
    let ids = ["a".to_owned(), "b".to_owned()];
    store
        .scheduled_many(&queue, &ids, "owner", due)
        .await
        .expect("Redis answers");
    let a = store.get(&queue, "a").await.unwrap().expect("a record");
    assert_eq!(a.state, State::Scheduled);
    assert_eq!(a.attempts, 0);
    let due_text = humantime::format_rfc3339_millis(due).to_string();
    assert_eq!(a.scheduled_for.as_deref(), Some(due_text.as_str()));
    assert_eq!(a.next_attempt_at, a.scheduled_for);
    // The TTL counts from the due time.
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("jobgate:status:{queue}:a"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 3_600_000, "{pttl}");

    let running = store
        .apply(&queue, "a", Transition::Running { attempt: 1 })
        .await
        .unwrap();
    assert_eq!(running.verdict, Verdict::Applied);
    let a = store.get(&queue, "a").await.unwrap().unwrap();
    assert_eq!(a.state, State::Running);
    assert_eq!(a.next_attempt_at, None);
    assert_eq!(a.scheduled_for.as_deref(), Some(due_text.as_str()), "kept");

    let cancel = store
        .apply(&queue, "b", Transition::Cancel { owner: "owner" })
        .await
        .unwrap();
    assert_eq!(cancel.verdict, Verdict::Applied);
    let b = store.get(&queue, "b").await.unwrap().unwrap();
    assert_eq!(b.state, State::Cancelled);
    assert_eq!(b.next_attempt_at, None);
}

on_both_backends!(
    a_scheduled_job_shows_scheduled_and_runs_after_its_time_not_before,
    a_cancelled_scheduled_job_never_runs,
    bad_or_too_far_schedule_and_policy_headers_get_400,
    a_job_asking_for_one_attempt_is_dead_lettered_after_its_first_failure,
    a_timeout_header_shorter_than_the_consumers_times_a_slow_job_out,
);

/// `POST /jobs/{queue}` with extra request headers.
async fn post_with(
    producer: &Producer,
    queue: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("the producer answers")
}

/// As [`post_with`], expecting 202; the job id.
async fn post_ok_with(
    producer: &Producer,
    queue: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> String {
    let response = post_with(producer, queue, body, headers).await;
    assert_eq!(response.status(), 202, "expected 202");
    let json: Value = response.json().await.expect("JSON");
    json["job_id"].as_str().expect("job_id").to_owned()
}

/// `GET /jobs/{queue}/{id}`: 200, the status.
async fn status(producer: &Producer, queue: &str, id: &str) -> Value {
    let response = producer
        .http
        .get(producer.url(&format!("/jobs/{queue}/{id}")))
        .send()
        .await
        .expect("the producer answers");
    assert_eq!(response.status(), 200, "GET the status of {id}");
    response.json().await.expect("status JSON")
}

/// Polls the status of `id` until it is `state`; returns it.
async fn wait_state(producer: &Producer, queue: &str, id: &str, state: &str) -> Value {
    let start = std::time::Instant::now();
    loop {
        let seen = status(producer, queue, id).await;
        if seen["state"] == state {
            return seen;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{id} never showed {state}; last: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rfc3339(value: &Value) -> SystemTime {
    let text = value.as_str().unwrap_or_else(|| panic!("a time: {value}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// The consumer's log line `message` for job `id`.
fn line_of(consumer: &Consumer, message: &str, id: &str) -> Option<Value> {
    consumer
        .process
        .last_where(|l| l["message"] == message && l["job_id"] == id)
}

/// Posts a job and waits until `consumer` processed it: the consumer is then
/// subscribed and consuming (on Kafka, it owns the partitions).
async fn warm_up(producer: &Producer, consumer: &Consumer, queue: &str) {
    let id = producer.post_ok(queue, "{\"warm\":1}").await;
    wait_until(LIMIT, "the warm-up job to be processed", || {
        std::future::ready(consumer.processed().contains(&id))
    })
    .await;
}

pub async fn a_scheduled_job_shows_scheduled_and_runs_after_its_time_not_before(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("sched");
    let _cleanup = backend.cleanup(&[&queue]);
    let redis = vars(&[("JOBGATE_REDIS_URL", REDIS_URL)]);
    let producer = Producer::start(backend, &[&queue], &redis).await;
    let consumer = Consumer::start(backend, &queue, &redis).await;
    warm_up(&producer, &consumer, &queue).await;

    let later = post_ok_with(
        &producer,
        &queue,
        "{\"at\":\"later\"}",
        &[("Jobgate-Delay", "5")],
    )
    .await;
    let scheduled = status(&producer, &queue, &later).await;
    let now = post_ok_with(&producer, &queue, "{\"at\":\"now\"}", &[]).await;
    assert_eq!(scheduled["state"], "scheduled", "{scheduled}");
    assert_eq!(scheduled["attempts"], 0);
    let due = rfc3339(&scheduled["scheduled_for"]);
    assert_eq!(scheduled["next_attempt_at"], scheduled["scheduled_for"]);
    assert!(due > rfc3339(&scheduled["created_at"]), "{scheduled}");

    wait_until(LIMIT, "both jobs to be processed", || {
        let done = consumer.processed();
        std::future::ready(done.contains(&later) && done.contains(&now))
    })
    .await;
    // The job posted after it ran first, and the scheduled one never before its time.
    let order: Vec<String> = consumer
        .processed()
        .into_iter()
        .filter(|id| *id == later || *id == now)
        .collect();
    assert_eq!(order, [now.clone(), later.clone()], "processing order");
    let started = line_of(&consumer, "job started", &later).expect("a start line");
    let started_at = rfc3339(&started["timestamp"]);
    assert!(
        started_at >= due,
        "started at {started:?}, due {:?}",
        humantime::format_rfc3339_millis(due)
    );
    assert_eq!(
        consumer
            .processed()
            .iter()
            .filter(|id| **id == later)
            .count(),
        1
    );
    // It waited in the delay tiers (the consumer saw it before its time), and its
    // status stayed `scheduled` meanwhile; once run, it is done like any job.
    let hops = consumer.process.lines_where(|l| {
        l["message"] == "scheduled job not due yet; it waits in a delay tier"
            && l["job_id"] == later.as_str()
    });
    assert!(
        !hops.is_empty(),
        "no hop logged:\n{}",
        consumer.process.dump()
    );
    let done = wait_state(&producer, &queue, &later, "done").await;
    assert_eq!(done["attempts"], 1, "hops are no attempts: {done}");
    assert_eq!(done["scheduled_for"], scheduled["scheduled_for"], "{done}");
}

pub async fn a_cancelled_scheduled_job_never_runs(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("schedcancel");
    let _cleanup = backend.cleanup(&[&queue]);
    let redis = vars(&[("JOBGATE_REDIS_URL", REDIS_URL)]);
    let producer = Producer::start(backend, &[&queue], &redis).await;
    let consumer = Consumer::start(
        backend,
        &queue,
        &vars(&[
            ("JOBGATE_REDIS_URL", REDIS_URL),
            ("JOBGATE_METRICS_LISTEN", "127.0.0.1:0"),
        ]),
    )
    .await;
    let metrics = listener_url(&consumer).await;
    warm_up(&producer, &consumer, &queue).await;

    // Far enough ahead that only a hop can meet it: the consumer sees it every 2 s
    // at most (tiers of 1 and 2 s).
    let id = post_ok_with(&producer, &queue, "{}", &[("Jobgate-Delay", "120")]).await;
    assert_eq!(status(&producer, &queue, &id).await["state"], "scheduled");
    let cancel = producer
        .http
        .delete(producer.url(&format!("/jobs/{queue}/{id}")))
        .send()
        .await
        .expect("the producer answers");
    assert_eq!(cancel.status(), 200);
    let cancelled: Value = cancel.json().await.unwrap();
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert!(cancelled.get("next_attempt_at").is_none(), "{cancelled}");

    let q = format!("queue=\"{queue}\"");
    wait_until(
        LIMIT,
        "the cancelled job to be acked unrun on a hop",
        || async {
            let text = scraped::fetch(&producer.http, &metrics).await;
            scraped::sample(
                &text,
                "jobgate_jobs_total",
                &format!("{q},outcome=\"cancelled\""),
            ) == Some(1.0)
        },
    )
    .await;
    assert!(
        line_of(&consumer, "scheduled job acked without running it", &id).is_some(),
        "{}",
        consumer.process.dump()
    );
    // Whether it hopped before the cancel depends on how soon the broker delivered it
    // (Kafka can take longer than the cancel): not asserted.
    // Later jobs still run; the cancelled one never did.
    let next = producer.post_ok(&queue, "{}").await;
    wait_until(LIMIT, "a later job to be processed", || {
        std::future::ready(consumer.processed().contains(&next))
    })
    .await;
    assert!(!consumer.started().contains(&id), "the cancelled job ran");
    assert_eq!(status(&producer, &queue, &id).await["state"], "cancelled");
}

pub async fn bad_or_too_far_schedule_and_policy_headers_get_400(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("schedbad");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer =
        Producer::start(backend, &[&queue], &vars(&[("JOBGATE_SCHEDULE_MAX", "1h")])).await;
    let bad: &[(&[(&str, &str)], &str)] = &[
        (&[("Jobgate-Delay", "3601")], "bad-schedule"),
        (
            &[("Jobgate-Not-Before", "2999-01-01T00:00:00Z")],
            "bad-schedule",
        ),
        (&[("Jobgate-Delay", "soon")], "bad-schedule"),
        (&[("Jobgate-Delay", "-5")], "bad-schedule"),
        (
            &[("Jobgate-Not-Before", "tomorrow at noon")],
            "bad-schedule",
        ),
        (
            &[
                ("Jobgate-Delay", "5"),
                ("Jobgate-Not-Before", "2026-01-01T00:00:00Z"),
            ],
            "bad-schedule",
        ),
        (&[("Jobgate-Max-Attempts", "0")], "bad-job-policy"),
        (&[("Jobgate-Max-Attempts", "many")], "bad-job-policy"),
        (&[("Jobgate-Timeout", "0")], "bad-job-policy"),
        (&[("Jobgate-Timeout", "a while")], "bad-job-policy"),
    ];
    for (headers, slug) in bad {
        let response = post_with(&producer, &queue, "{}", headers).await;
        assert_problem(response, 400, slug).await;
    }
    let too_far = post_with(&producer, &queue, "{}", &[("Jobgate-Delay", "7200")]).await;
    let problem: Value = too_far.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("JOBGATE_SCHEDULE_MAX"), "{detail}");
    let batch = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}/batch")))
        .header("content-type", "application/x-ndjson")
        .header("Jobgate-Delay", "7200")
        .body("{}\n{}\n")
        .send()
        .await
        .unwrap();
    assert_problem(batch, 400, "bad-schedule").await;
    assert_eq!(backend.pending(&queue).await, 0, "nothing was published");
    // Within the horizon, and a time in the past (due now), are fine.
    post_ok_with(&producer, &queue, "{}", &[("Jobgate-Delay", "3600")]).await;
    post_ok_with(
        &producer,
        &queue,
        "{}",
        &[("Jobgate-Not-Before", "2020-01-01T00:00:00+02:00")],
    )
    .await;
}

/// Consumer settings: `command` as the `exec` handler, the status store, and the
/// consumer's own attempt limit and timeout.
fn exec_consumer(
    command: &[&str],
    max_attempts: &str,
    timeout_ms: &str,
) -> Vec<(&'static str, String)> {
    vars(&[
        ("JOBGATE_HANDLER", "exec"),
        ("JOBGATE_EXEC_COMMAND", &shell_words(command)),
        ("JOBGATE_MAX_ATTEMPTS", max_attempts),
        ("JOBGATE_JOB_TIMEOUT_MS", timeout_ms),
        ("JOBGATE_REDIS_URL", REDIS_URL),
    ])
}

pub async fn a_job_asking_for_one_attempt_is_dead_lettered_after_its_first_failure(
    backend: Backend,
) {
    let _brokers = brokers_shared().await;
    let queue = unique("maxatt");
    let _cleanup = backend.cleanup(&[&queue]);
    let redis = vars(&[("JOBGATE_REDIS_URL", REDIS_URL)]);
    let producer = Producer::start(backend, &[&queue], &redis).await;
    let once = post_ok_with(&producer, &queue, "{}", &[("Jobgate-Max-Attempts", "1")]).await;
    let plain = producer.post_ok(&queue, "{}").await;
    let _consumer = Consumer::start(
        backend,
        &queue,
        &exec_consumer(&["sh", "-c", "echo failing >&2; exit 3"], "5", "60000"),
    )
    .await;
    let dead = wait_state(&producer, &queue, &once, "dead").await;
    assert_eq!(dead["attempts"], 1, "{dead}");
    // The consumer's own limit (5) still applies to the other job: it is retried.
    let start = std::time::Instant::now();
    loop {
        let seen = status(&producer, &queue, &plain).await;
        if seen["attempts"].as_u64().unwrap_or(0) >= 2 {
            assert_ne!(seen["state"], "dead", "{seen}");
            break;
        }
        assert!(start.elapsed() < LIMIT, "{plain} was not retried: {seen}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dlq = crate::helpers::dlq::list(backend, &queue).await;
    let entry = dlq
        .iter()
        .find(|e| e["job_id"] == once.as_str())
        .unwrap_or_else(|| panic!("{once} not in the DLQ: {dlq:?}"));
    assert_eq!(entry["attempts"], 1, "{entry}");
}

pub async fn a_timeout_header_shorter_than_the_consumers_times_a_slow_job_out(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("jobtimeout");
    let _cleanup = backend.cleanup(&[&queue]);
    let redis = vars(&[("JOBGATE_REDIS_URL", REDIS_URL)]);
    let producer = Producer::start(backend, &[&queue], &redis).await;
    let hurried = post_ok_with(
        &producer,
        &queue,
        "{}",
        &[("Jobgate-Timeout", "300ms"), ("Jobgate-Max-Attempts", "1")],
    )
    .await;
    let patient = post_ok_with(&producer, &queue, "{}", &[("Jobgate-Max-Attempts", "1")]).await;
    // Each job takes 2 s; the consumer allows a minute.
    let _consumer = Consumer::start(
        backend,
        &queue,
        &exec_consumer(&["sleep", "2"], "3", "60000"),
    )
    .await;
    let dead = wait_state(&producer, &queue, &hurried, "dead").await;
    let error = dead["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("timed out after 300ms"), "{dead}");
    wait_state(&producer, &queue, &patient, "done").await;
}
