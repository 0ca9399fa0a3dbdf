//! Job status (issue 16) with the real binaries, Redis and both brokers: the states a
//! client sees through `GET /jobs/{queue}/{job_id}` while its job runs, is retried,
//! finishes or dies, and is replayed from its dead-letter queue; `DELETE` before the job starts (it never runs) and while it runs
//! (409); another API key's 404; no store (501); a job whose status says `done` is
//! acked as a duplicate without running; and a store that is down changes no answer
//! and no job. A consumer that dies between a job's success and its ack (an in-process
//! worker whose acks are lost) leaves a redelivery that the next consumer acks unrun.
//!
//! The `exec` handler here waits for a gate file per attempt (`DIR/<job id>.<attempt>`)
//! that the test writes when it has seen the state it wants to see, so no assertion
//! depends on timing: the gate's content is the attempt's fate (`fail`, or the result).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use consumer::{run_with_source, ConsumerConfig, Handler, Job, Outcome, WorkerOptions};
use jobgate_shared::broker::{Delivery, JobSource, Settle, SettleError};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::consumer_metrics::listener_url;
use crate::helpers::{
    assert_problem, brokers_shared, dlq, scraped, unique, vars, wait_until, Backend, Consumer,
    Producer,
};
use crate::redelivery::{scratch, shell_words};

const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Nothing listens there: a status store that is down.
const DEAD_REDIS_URL: &str = "redis://127.0.0.1:1";
const LIMIT: Duration = Duration::from_secs(90);
const K1: &str = "status-key-one-0123456789";
const K2: &str = "status-key-two-0123456789";

on_both_backends!(
    status_follows_a_job_through_its_attempts,
    cancel_before_the_start_means_never_run_and_a_running_job_is_409,
    another_api_key_gets_404_and_every_batch_item_is_readable,
    without_a_store_the_status_routes_answer_501,
    a_job_whose_status_is_done_is_acked_as_a_duplicate_without_running,
    a_store_that_is_down_changes_no_answer_and_no_job,
    a_consumer_that_dies_between_the_handler_and_the_ack_does_not_run_the_job_again,
);

/// The `exec` command: notes the attempt's start (`DIR/<id>.runs`), waits for its gate
/// `DIR/<id>.<attempt>`, then fails (exit 3) when the gate says `fail`, else prints the
/// gate's content (the job's result).
fn gated(dir: &Path) -> String {
    let script = r#"echo "$JOB_ATTEMPT" >> "$0/$JOB_ID.runs"; g="$0/$JOB_ID.$JOB_ATTEMPT"; while [ ! -e "$g" ]; do sleep 0.05; done; r=$(cat "$g"); if [ "$r" = fail ]; then echo "told to fail" >&2; exit 3; fi; printf %s "$r""#;
    shell_words(&["sh", "-c", script, dir.to_str().expect("UTF-8 path")])
}

/// Opens attempt `attempt` of job `id` with `fate` (written whole, then renamed, so the
/// command never reads half of it).
fn open_gate(dir: &Path, id: &str, attempt: u32, fate: &str) {
    let tmp = dir.join(format!("{id}.{attempt}.tmp"));
    std::fs::write(&tmp, fate).expect("write the gate");
    std::fs::rename(&tmp, dir.join(format!("{id}.{attempt}"))).expect("open the gate");
}

/// The attempts that started of job `id` (lines of `DIR/<id>.runs`).
fn runs(dir: &Path, id: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{id}.runs")))
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Consumer settings: the gated command, `max_attempts`, the store at `redis`, quick
/// retries and a metrics listener.
fn gated_consumer(dir: &Path, max_attempts: &str, redis: &str) -> Vec<(&'static str, String)> {
    vars(&[
        ("JOBGATE_HANDLER", "exec"),
        ("JOBGATE_EXEC_COMMAND", &gated(dir)),
        ("JOBGATE_MAX_ATTEMPTS", max_attempts),
        ("JOBGATE_RETRY_BASE_MS", "200"),
        ("JOBGATE_RETRY_MAX_MS", "200"),
        ("JOBGATE_REDIS_URL", redis),
        ("JOBGATE_METRICS_LISTEN", "127.0.0.1:0"),
    ])
}

/// `method /jobs/{queue}/{id}` with API key `key`, if any.
async fn call(
    producer: &Producer,
    method: reqwest::Method,
    queue: &str,
    id: &str,
    key: Option<&str>,
) -> reqwest::Response {
    let request = producer
        .http
        .request(method, producer.url(&format!("/jobs/{queue}/{id}")));
    let request = match key {
        Some(key) => request.bearer_auth(key),
        None => request,
    };
    request.send().await.expect("the producer answers")
}

/// `GET /jobs/{queue}/{id}`: 200, the status.
async fn status(producer: &Producer, queue: &str, id: &str) -> Value {
    let response = call(producer, reqwest::Method::GET, queue, id, None).await;
    assert_eq!(response.status(), 200, "GET the status of {id}");
    response.json().await.expect("status JSON")
}

/// Polls the status of `id` until `state` with `attempts` shows; returns it. Every
/// status seen on the way must be one the job can have passed through.
async fn wait_state(
    producer: &Producer,
    queue: &str,
    id: &str,
    state: &str,
    attempts: u64,
) -> Value {
    let start = std::time::Instant::now();
    loop {
        let seen = status(producer, queue, id).await;
        if seen["state"] == state && seen["attempts"] == attempts {
            assert_eq!(seen["job_id"], id);
            assert_eq!(seen["queue"], queue);
            return seen;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{id} never showed {state} with {attempts} attempts; last: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn status_follows_a_job_through_its_attempts(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("status");
    let _cleanup = backend.cleanup(&[&queue]);
    let dir = scratch("status");
    let redis = vars(&[("JOBGATE_REDIS_URL", REDIS_URL)]);
    let producer = Producer::start(backend, &[&queue], &redis).await;
    let lucky = producer.post_ok(&queue, "lucky").await;
    let doomed = producer.post_ok(&queue, "doomed").await;
    // Nothing consumes yet.
    for id in [&lucky, &doomed] {
        let queued = status(&producer, &queue, id).await;
        assert_eq!(queued["state"], "queued", "{queued}");
        assert_eq!(queued["attempts"], 0);
        assert!(queued["created_at"].is_string(), "{queued}");
        assert!(queued.get("result").is_none());
    }
    let _consumer = Consumer::start(backend, &queue, &gated_consumer(&dir, "2", REDIS_URL)).await;

    // Attempt 1 runs, fails, waits for its retry; attempt 2 runs and is done.
    let running = wait_state(&producer, &queue, &lucky, "running", 1).await;
    assert!(running["started_at"].is_string(), "{running}");
    open_gate(&dir, &lucky, 1, "fail");
    let retrying = wait_state(&producer, &queue, &lucky, "retrying", 1).await;
    assert!(retrying["next_attempt_at"].is_string(), "{retrying}");
    let error = retrying["last_error"].as_str().expect("last_error");
    assert!(error.contains("exited with status 3"), "{error}");
    wait_state(&producer, &queue, &lucky, "running", 2).await;
    open_gate(&dir, &lucky, 2, "the answer is 42");
    let done = wait_state(&producer, &queue, &lucky, "done", 2).await;
    assert_eq!(done["result"], "the answer is 42", "exec's stdout: {done}");
    assert!(done["finished_at"].is_string(), "{done}");
    assert!(done.get("next_attempt_at").is_none(), "{done}");

    // The other one fails both of its attempts: dead, with why.
    wait_state(&producer, &queue, &doomed, "running", 1).await;
    open_gate(&dir, &doomed, 1, "fail");
    wait_state(&producer, &queue, &doomed, "retrying", 1).await;
    wait_state(&producer, &queue, &doomed, "running", 2).await;
    open_gate(&dir, &doomed, 2, "fail");
    let dead = wait_state(&producer, &queue, &doomed, "dead", 2).await;
    let error = dead["last_error"].as_str().expect("last_error");
    assert!(
        error.contains("told to fail"),
        "stderr in the reason: {error}"
    );
    assert_eq!(runs(&dir, &doomed), ["1", "2"]);
    assert!(dead.get("replays").is_none(), "never replayed: {dead}");

    // Replayed from the dead-letter queue, it starts a new life: attempt 1 again, and
    // its own final state. The old gates go, so the new attempt waits for its own.
    for attempt in [1, 2] {
        std::fs::remove_file(dir.join(format!("{doomed}.{attempt}"))).expect("remove a gate");
    }
    let out = dlq::run_with(backend, &redis, &["replay", "--queue", &queue]).await;
    assert!(out.contains("replayed 1 dead job"), "{out}");
    let running = wait_state(&producer, &queue, &doomed, "running", 1).await;
    assert_eq!(running["replays"], 1, "{running}");
    assert!(running["replayed_at"].is_string(), "{running}");
    assert!(running.get("finished_at").is_none(), "{running}");
    open_gate(&dir, &doomed, 1, "second life");
    let done = wait_state(&producer, &queue, &doomed, "done", 1).await;
    assert_eq!(done["result"], "second life", "{done}");
    assert_eq!(done["replays"], 1, "{done}");
    assert_eq!(runs(&dir, &doomed), ["1", "2", "1"]);
}

pub async fn cancel_before_the_start_means_never_run_and_a_running_job_is_409(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("cancel");
    let _cleanup = backend.cleanup(&[&queue]);
    let dir = scratch("cancel");
    let redis = vars(&[("JOBGATE_REDIS_URL", REDIS_URL)]);
    let producer = Producer::start(backend, &[&queue], &redis).await;
    let cancelled = producer.post_ok(&queue, "never").await;
    let runner = producer.post_ok(&queue, "runs").await;
    let delete = |id: String| {
        let producer = &producer;
        let queue = &queue;
        async move { call(producer, reqwest::Method::DELETE, queue, &id, None).await }
    };

    // Cancelled while queued: 200 with the status; again: the same.
    for _ in 0..2 {
        let response = delete(cancelled.clone()).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["state"], "cancelled", "{body}");
        assert!(body["finished_at"].is_string(), "{body}");
    }

    let consumer = Consumer::start(backend, &queue, &gated_consumer(&dir, "1", REDIS_URL)).await;
    let metrics = listener_url(&consumer).await;
    wait_state(&producer, &queue, &runner, "running", 1).await;
    assert_problem(delete(runner.clone()).await, 409, "job-running").await;
    assert_eq!(status(&producer, &queue, &runner).await["state"], "running");
    open_gate(&dir, &runner, 1, "ok");
    wait_state(&producer, &queue, &runner, "done", 1).await;
    assert_problem(delete(runner.clone()).await, 409, "job-finished").await;

    // The cancelled job was delivered, acked, and never ran.
    let q = format!("queue=\"{queue}\"");
    wait_until(LIMIT, "the cancelled job to be acked unrun", || async {
        let text = scraped::fetch(&producer.http, &metrics).await;
        scraped::sample(
            &text,
            "jobgate_jobs_total",
            &format!("{q},outcome=\"cancelled\""),
        ) == Some(1.0)
    })
    .await;
    assert!(runs(&dir, &cancelled).is_empty(), "the cancelled job ran");
    assert_eq!(runs(&dir, &runner), ["1"]);
    let skipped = consumer.process.lines("job acked without running it");
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0]["job_id"], cancelled.as_str());
    assert_eq!(skipped[0]["state"], "cancelled");
    assert_eq!(
        status(&producer, &queue, &cancelled).await["state"],
        "cancelled"
    );
}

pub async fn another_api_key_gets_404_and_every_batch_item_is_readable(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("owner");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(
        backend,
        &[&queue],
        &vars(&[
            ("JOBGATE_REDIS_URL", REDIS_URL),
            ("JOBGATE_API_KEYS", &format!("{K1},{K2}")),
        ]),
    )
    .await;
    let single: Value = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .bearer_auth(K1)
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let batch = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}/batch")))
        .bearer_auth(K1)
        .header("content-type", "application/x-ndjson")
        .body("{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), 202);
    let batch: Value = batch.json().await.unwrap();
    let mut ids = vec![single["job_id"].as_str().expect("job_id").to_owned()];
    for item in batch["items"].as_array().expect("items") {
        ids.push(item["job_id"].as_str().expect("job_id").to_owned());
    }
    assert_eq!(ids.len(), 4);
    for id in &ids {
        let mine = call(&producer, reqwest::Method::GET, &queue, id, Some(K1)).await;
        assert_eq!(mine.status(), 200);
        let mine: Value = mine.json().await.unwrap();
        assert_eq!(mine["state"], "queued", "{mine}");
        for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
            let theirs = call(&producer, method, &queue, id, Some(K2)).await;
            assert_problem(theirs, 404, "job-not-found").await;
        }
        let nobody = call(&producer, reqwest::Method::GET, &queue, id, None).await;
        assert_problem(nobody, 401, "unauthorized").await;
    }
    // Another key's DELETE changed nothing; the owner's cancels.
    let cancel = call(
        &producer,
        reqwest::Method::DELETE,
        &queue,
        &ids[0],
        Some(K1),
    )
    .await;
    assert_eq!(cancel.status(), 200);
    let unknown = call(
        &producer,
        reqwest::Method::GET,
        &queue,
        "no-such-job",
        Some(K1),
    )
    .await;
    assert_problem(unknown, 404, "job-not-found").await;
    let elsewhere = call(
        &producer,
        reqwest::Method::GET,
        "not-a-queue",
        &ids[1],
        Some(K1),
    )
    .await;
    assert_problem(elsewhere, 404, "unknown-queue").await;
}

pub async fn without_a_store_the_status_routes_answer_501(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("nostore");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let id = producer.post_ok(&queue, "{}").await;
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let response = call(&producer, method.clone(), &queue, &id, None).await;
        assert_eq!(response.status(), 501, "{method}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["type"], "urn:jobgate:problem:status-not-configured");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("JOBGATE_REDIS_URL"), "{detail}");
    }
}

pub async fn a_job_whose_status_is_done_is_acked_as_a_duplicate_without_running(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("dup");
    let _cleanup = backend.cleanup(&[&queue]);
    let dir = scratch("dup");
    let redis = vars(&[("JOBGATE_REDIS_URL", REDIS_URL)]);
    let producer = Producer::start(backend, &[&queue], &redis).await;
    let done_before = producer.post_ok(&queue, "ran before the crash").await;
    let fresh = producer.post_ok(&queue, "fresh").await;
    // A consumer ran the first job and recorded it done, then died before its ack: the
    // broker still holds the job. (Written here directly, as that consumer would have.)
    let store = jobgate_shared::status::StatusStore::new(
        &REDIS_URL.parse().unwrap(),
        jobgate_shared::status::DEFAULT_TTL,
    )
    .unwrap();
    for transition in [
        jobgate_shared::status::Transition::Running { attempt: 1 },
        jobgate_shared::status::Transition::Done {
            attempt: 1,
            result: Some(b"first run"),
        },
    ] {
        store.apply(&queue, &done_before, transition).await.unwrap();
    }

    let consumer = Consumer::start(backend, &queue, &gated_consumer(&dir, "1", REDIS_URL)).await;
    let metrics = listener_url(&consumer).await;
    wait_state(&producer, &queue, &fresh, "running", 1).await;
    open_gate(&dir, &fresh, 1, "second");
    wait_state(&producer, &queue, &fresh, "done", 1).await;
    let q = format!("queue=\"{queue}\"");
    wait_until(LIMIT, "the done job to be acked as a duplicate", || async {
        let text = scraped::fetch(&producer.http, &metrics).await;
        scraped::sample(
            &text,
            "jobgate_jobs_total",
            &format!("{q},outcome=\"duplicate\""),
        ) == Some(1.0)
    })
    .await;
    assert!(
        runs(&dir, &done_before).is_empty(),
        "the done job ran again"
    );
    let status = status(&producer, &queue, &done_before).await;
    assert_eq!(status["state"], "done");
    assert_eq!(status["result"], "first run", "untouched: {status}");
}

pub async fn a_store_that_is_down_changes_no_answer_and_no_job(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("nostatus");
    let _cleanup = backend.cleanup(&[&queue]);
    let down = vars(&[("JOBGATE_REDIS_URL", DEAD_REDIS_URL)]);
    let producer = Producer::start(backend, &[&queue], &down).await;
    let id = producer.post_ok(&queue, "{}").await;
    let mut env = down.clone();
    env.extend(vars(&[("JOBGATE_METRICS_LISTEN", "127.0.0.1:0")]));
    let consumer = Consumer::start(backend, &queue, &env).await;
    wait_until(LIMIT, "the job to be processed", || {
        std::future::ready(consumer.processed().contains(&id))
    })
    .await;
    assert_problem(
        call(&producer, reqwest::Method::GET, &queue, &id, None).await,
        503,
        "status-store-unavailable",
    )
    .await;
    // Every failed call is counted, by operation.
    let text = scraped::fetch(&producer.http, &producer.base_url).await;
    let failed = |text: &str, op: &str| {
        scraped::sample(
            text,
            "jobgate_status_store_failures_total",
            &format!("op=\"{op}\""),
        )
    };
    assert_eq!(failed(&text, "queued"), Some(1.0), "{text}");
    assert_eq!(failed(&text, "read"), Some(1.0), "{text}");
    // The job settles after its `done` write failed (the log handler's line comes
    // before it): wait for the outcome, then count.
    let metrics = listener_url(&consumer).await;
    let q = format!("queue=\"{queue}\"");
    let start = std::time::Instant::now();
    let text = loop {
        let text = scraped::fetch(&producer.http, &metrics).await;
        let done = format!("{q},outcome=\"done\"");
        if scraped::sample(&text, "jobgate_jobs_total", &done) == Some(1.0) {
            break text;
        }
        assert!(start.elapsed() < LIMIT, "the job was never settled: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failed(&text, "running"), Some(1.0), "{text}");
    assert_eq!(failed(&text, "done"), Some(1.0), "{text}");
}

/// A source that passes its deliveries on with an ack that does nothing: the worker
/// believes it acked, the broker still holds the job. Stopping the worker then is a
/// consumer that died between the handler's success and the ack.
struct AcksLost(Box<dyn JobSource>);

/// The settle handle of [`AcksLost`].
struct LostAck(Box<dyn Settle>);

#[async_trait::async_trait]
impl Settle for LostAck {
    async fn started(&self) -> Result<(), SettleError> {
        self.0.started().await
    }

    fn is_current(&self) -> bool {
        self.0.is_current()
    }

    async fn ack(self: Box<Self>) -> Result<(), SettleError> {
        // Dropped unsettled: the broker delivers the job again once the source closes.
        drop(self);
        Ok(())
    }

    async fn requeue(self: Box<Self>) -> Result<(), SettleError> {
        self.0.requeue().await
    }

    async fn reject(self: Box<Self>) -> Result<(), SettleError> {
        self.0.reject().await
    }
}

#[async_trait::async_trait]
impl JobSource for AcksLost {
    async fn run(&mut self, tx: mpsc::Sender<Delivery>, stop: CancellationToken) {
        let (inner_tx, mut inner_rx) = mpsc::channel::<Delivery>(1);
        let forward = async move {
            while let Some(Delivery { job, settle }) = inner_rx.recv().await {
                let settle = Box::new(LostAck(settle));
                if tx.send(Delivery { job, settle }).await.is_err() {
                    break;
                }
            }
        };
        tokio::join!(self.0.run(inner_tx, stop), forward);
    }

    fn is_ready(&self) -> bool {
        self.0.is_ready()
    }

    async fn close(&mut self) {
        self.0.close().await;
    }
}

/// Counts its runs and finishes every job.
#[derive(Default)]
struct CountingHandler(AtomicUsize);

#[async_trait::async_trait]
impl Handler for CountingHandler {
    async fn handle(&self, _job: &Job) -> Outcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        Outcome::DoneWith(Bytes::from_static(b"once"))
    }
}

pub async fn a_consumer_that_dies_between_the_handler_and_the_ack_does_not_run_the_job_again(
    backend: Backend,
) {
    let _brokers = brokers_shared().await;
    let queue = unique("crash");
    let _cleanup = backend.cleanup(&[&queue]);
    let redis = vars(&[("JOBGATE_REDIS_URL", REDIS_URL)]);
    let producer = Producer::start(backend, &[&queue], &redis).await;
    let id = producer.post_ok(&queue, "once").await;

    // The first consumer (the library, in this process) runs the job, records it done,
    // and "dies" before its ack reaches the broker.
    let mut args = vec!["consumer".to_owned(), "--queue".to_owned(), queue.clone()];
    for (name, value) in backend.env().into_iter().chain(redis.clone()) {
        let flag = name
            .trim_start_matches("JOBGATE_")
            .to_lowercase()
            .replace('_', "-");
        args.extend([format!("--{flag}"), value]);
    }
    let config = ConsumerConfig::try_parse_from(&args).expect("valid flags");
    let mut options = WorkerOptions::from(&config);
    options.status = config.status.store().expect("a status store");
    let store = options.status.clone().expect("a status store");
    let handler = Arc::new(CountingHandler::default());
    let recorded_done = {
        let (store, queue, id) = (store.clone(), queue.clone(), id.clone());
        async move {
            loop {
                let status = store.get(&queue, &id).await.ok().flatten();
                if status.is_some_and(|s| s.state == jobgate_shared::status::State::Done) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let outcomes: jobgate_shared::broker::SharedPublisher =
        Arc::new(jobgate_shared::broker::memory::MemoryBroker::new());
    tokio::time::timeout(
        LIMIT,
        run_with_source(
            Box::new(AcksLost(consumer::backend::source(&config))),
            outcomes,
            handler.clone(),
            options,
            recorded_done,
        ),
    )
    .await
    .expect("the first consumer ran the job")
    .expect("the source runs until the stop");
    assert_eq!(handler.0.load(Ordering::SeqCst), 1);

    // The broker delivers the job again, to the next consumer: it is acked unrun.
    let mut env = redis.clone();
    env.extend(vars(&[("JOBGATE_METRICS_LISTEN", "127.0.0.1:0")]));
    let consumer = Consumer::start(backend, &queue, &env).await;
    let metrics = listener_url(&consumer).await;
    let q = format!("queue=\"{queue}\"");
    wait_until(
        LIMIT,
        "the redelivery to be acked as a duplicate",
        || async {
            let text = scraped::fetch(&producer.http, &metrics).await;
            scraped::sample(
                &text,
                "jobgate_jobs_total",
                &format!("{q},outcome=\"duplicate\""),
            ) == Some(1.0)
        },
    )
    .await;
    assert!(consumer.processed().is_empty(), "the job ran again");
    assert_eq!(handler.0.load(Ordering::SeqCst), 1);
    let status = status(&producer, &queue, &id).await;
    assert_eq!(status["state"], "done");
    assert_eq!(status["result"], "once");
}
