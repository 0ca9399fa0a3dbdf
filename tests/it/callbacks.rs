//! Completion callbacks (issue 16) with the real binaries on both backends: a callback
//! server on loopback receives exactly the final states (done, dead, cancelled), each
//! with a signature the test verifies with its own HMAC; a callback answered 500 twice
//! is retried through the callbacks queue's tiers and accepted once; a 3xx is not
//! followed; a callback host not in `JOBGATE_CALLBACK_ALLOW` is refused at submit; a
//! hand-published job with a callback URL outside the list runs, and nothing is ever
//! sent to that URL.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use clap::Parser;
use consumer::ConsumerConfig;
use hmac::{Hmac, Mac};
use jobgate_shared::job::JobMeta;
use serde_json::Value;
use sha2::Sha256;

use crate::helpers::{
    assert_problem, brokers_shared, dlq, unique, vars, wait_until, Backend, Consumer, Producer,
};

const SECRET: &str = "callback-secret-0123456789";
const REDIS_URL: &str = "redis://127.0.0.1:6379";
const LIMIT: Duration = Duration::from_secs(90);

on_both_backends!(
    final_states_are_called_back_once_each_with_a_valid_signature,
    a_callback_answered_500_twice_is_retried_and_accepted_once,
    a_cancelled_job_is_called_back_with_its_stored_status,
    a_hand_published_job_with_a_callback_outside_the_list_runs_and_calls_nobody,
);

/// One request the callback server received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A callback server on 127.0.0.1: `POST /cb/{tag}` answers the statuses scripted for
/// `tag` in turn (200 once they run out); `/cb/moved` answers 302 to `/landing`, which
/// records a request like any other path.
#[derive(Clone, Default)]
struct Server {
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<BTreeMap<String, Vec<u16>>>>,
}

impl Server {
    async fn start() -> (Self, u16) {
        let server = Self::default();
        let app = axum::Router::new()
            .route("/cb/{tag}", axum::routing::post(answer))
            .route("/landing", axum::routing::any(landing))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (server, port)
    }

    fn script(&self, tag: &str, answers: &[u16]) {
        self.script
            .lock()
            .unwrap()
            .insert(tag.to_owned(), answers.to_vec());
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Requests to `path` (every one of them signed correctly, or the test fails).
    fn at(&self, path: &str) -> Vec<Value> {
        let all = self.received();
        let mine = all.iter().filter(|r| r.path == path);
        mine.map(verified).collect()
    }

    async fn wait_for(&self, path: &str, count: usize) -> Vec<Value> {
        wait_until(LIMIT, &format!("{count} callback(s) at {path}"), || {
            std::future::ready(self.at(path).len() >= count)
        })
        .await;
        self.at(path)
    }
}

async fn answer(
    State(server): State<Server>,
    Path(tag): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/cb/{tag}");
    server.received.lock().unwrap().push(Received {
        path,
        headers,
        body,
    });
    if tag == "moved" {
        return (StatusCode::FOUND, [("location", "/landing")]).into_response();
    }
    let next = {
        let mut script = server.script.lock().unwrap();
        script
            .get_mut(&tag)
            .and_then(|answers| (!answers.is_empty()).then(|| answers.remove(0)))
    };
    StatusCode::from_u16(next.unwrap_or(200))
        .unwrap()
        .into_response()
}

async fn landing(State(server): State<Server>, headers: HeaderMap, body: Bytes) -> StatusCode {
    server.received.lock().unwrap().push(Received {
        path: "/landing".into(),
        headers,
        body,
    });
    StatusCode::OK
}

/// The callback's status JSON, after checking what every callback carries: JSON, the
/// job id, and `Jobgate-Signature: t=<secs>,v1=<hex>` that this test's own HMAC of
/// `"<t>.<body>"` under [`SECRET`] reproduces, with `t` within a minute of now.
fn verified(r: &Received) -> Value {
    assert_eq!(r.headers["content-type"], "application/json");
    let signature = r.headers["jobgate-signature"].to_str().unwrap();
    let (t, v1) = signature
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("signature header {signature:?}"));
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, expected, "the signature of {:?}", r.body);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t: u64 = t.parse().expect("t is Unix seconds");
    assert!(now.abs_diff(t) < 60, "t={t}, now={now}");
    let status: Value = serde_json::from_slice(&r.body).expect("a JSON body");
    assert_eq!(
        r.headers["jobgate-job-id"].to_str().unwrap(),
        status["job_id"].as_str().unwrap()
    );
    status
}

/// Consumer settings: the body decides (`fail` fails every attempt, anything else is
/// printed: the result), two attempts, quick retries for jobs and callbacks.
fn consumer_env(port: u16, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vars(&[
        ("JOBGATE_HANDLER", "exec"),
        (
            "JOBGATE_EXEC_COMMAND",
            r#"sh -c 'b=$(cat); [ "$b" = fail ] && exit 3; printf "result of %s" "$b"'"#,
        ),
        ("JOBGATE_MAX_ATTEMPTS", "3"),
        ("JOBGATE_RETRY_BASE_MS", "200"),
        ("JOBGATE_RETRY_MAX_MS", "400"),
        ("JOBGATE_CALLBACK_SECRET", SECRET),
        ("JOBGATE_CALLBACK_TIMEOUT_MS", "3000"),
    ]);
    env.push(("JOBGATE_CALLBACK_ALLOW", format!("127.0.0.1:{port}")));
    env.extend(vars(extra));
    env
}

fn allow(port: u16) -> Vec<(&'static str, String)> {
    vec![("JOBGATE_CALLBACK_ALLOW", format!("127.0.0.1:{port}"))]
}

/// POSTs `body` to `queue` with `Jobgate-Callback: callback`; returns the job id.
async fn post_with_callback(
    producer: &Producer,
    queue: &str,
    body: &str,
    callback: &str,
) -> String {
    let response = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .header("Jobgate-Callback", callback)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    let json: Value = response.json().await.unwrap();
    json["job_id"].as_str().unwrap().to_owned()
}

pub async fn final_states_are_called_back_once_each_with_a_valid_signature(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("callbacks");
    let _cleanup = backend.cleanup(&[&queue]);
    let (server, port) = Server::start().await;
    let producer = Producer::start(backend, &[&queue], &allow(port)).await;
    let base = format!("http://127.0.0.1:{port}");
    let done = post_with_callback(&producer, &queue, "hello", &format!("{base}/cb/done")).await;
    let dead = post_with_callback(&producer, &queue, "fail", &format!("{base}/cb/dead")).await;
    let moved = post_with_callback(&producer, &queue, "x", &format!("{base}/cb/moved")).await;
    // A job without a callback: nobody is called for it.
    producer.post_ok(&queue, "no callback").await;
    let _consumer = Consumer::start(backend, &queue, &consumer_env(port, &[])).await;

    let got = server.wait_for("/cb/done", 1).await;
    assert_eq!(got[0]["job_id"], done.as_str());
    assert_eq!(got[0]["queue"], queue.as_str());
    assert_eq!(got[0]["state"], "done");
    assert_eq!(got[0]["attempts"], 1);
    assert_eq!(got[0]["result"], "result of hello");

    let got = server.wait_for("/cb/dead", 1).await;
    assert_eq!(
        (got[0]["job_id"].as_str(), got[0]["state"].as_str()),
        (Some(dead.as_str()), Some("dead"))
    );
    assert_eq!(got[0]["attempts"], 3);
    let error = got[0]["last_error"].as_str().unwrap();
    assert!(error.contains("status 3"), "{error}");

    // The 302 is an attempt that failed for good: not followed, the callback dead.
    server.wait_for("/cb/moved", 1).await;
    let callbacks = format!("{queue}.callbacks");
    wait_until(
        LIMIT,
        "the redirected callback in the callbacks DLQ",
        || async { !dlq::list(backend, &callbacks).await.is_empty() },
    )
    .await;
    let dead_callbacks = dlq::list(backend, &callbacks).await;
    assert_eq!(dead_callbacks.len(), 1, "{dead_callbacks:?}");
    assert!(
        dead_callbacks[0].to_string().contains(&moved),
        "{dead_callbacks:?}"
    );

    // Every job has settled: the one without a callback too. Then nothing more came:
    // one callback each, none for the intermediate states, none followed to /landing.
    wait_until(LIMIT, "the job queue to drain", || async {
        backend.pending(&queue).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paths: Vec<String> = server.received().into_iter().map(|r| r.path).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(sorted, ["/cb/dead", "/cb/done", "/cb/moved"], "{paths:?}");
}

pub async fn a_callback_answered_500_twice_is_retried_and_accepted_once(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("cbretry");
    let _cleanup = backend.cleanup(&[&queue]);
    let (server, port) = Server::start().await;
    server.script("flaky", &[500, 500]);
    let producer = Producer::start(backend, &[&queue], &allow(port)).await;
    let url = format!("http://127.0.0.1:{port}/cb/flaky");
    let id = post_with_callback(&producer, &queue, "job", &url).await;
    let _consumer = Consumer::start(backend, &queue, &consumer_env(port, &[])).await;

    let got = server.wait_for("/cb/flaky", 3).await;
    // The same final status each time (a retry sends the same message again).
    for status in &got {
        assert_eq!(
            (status["job_id"].as_str(), status["state"].as_str()),
            (Some(id.as_str()), Some("done"))
        );
    }
    assert_eq!(got[0], got[2], "the retries carry the same body");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        server.at("/cb/flaky").len(),
        3,
        "accepted once, then never again"
    );
}

pub async fn a_cancelled_job_is_called_back_with_its_stored_status(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("cbcancel");
    let _cleanup = backend.cleanup(&[&queue]);
    let (server, port) = Server::start().await;
    let mut env = allow(port);
    env.extend(vars(&[("JOBGATE_REDIS_URL", REDIS_URL)]));
    let producer = Producer::start(backend, &[&queue], &env).await;
    let url = format!("http://127.0.0.1:{port}/cb/cancelled");
    let id = post_with_callback(&producer, &queue, "never", &url).await;
    let cancel = producer
        .http
        .delete(producer.url(&format!("/jobs/{queue}/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let after = post_with_callback(
        &producer,
        &queue,
        "runs",
        &format!("http://127.0.0.1:{port}/cb/done"),
    )
    .await;
    let _consumer = Consumer::start(
        backend,
        &queue,
        &consumer_env(port, &[("JOBGATE_REDIS_URL", REDIS_URL)]),
    )
    .await;

    let got = server.wait_for("/cb/cancelled", 1).await;
    assert_eq!(
        (got[0]["job_id"].as_str(), got[0]["state"].as_str()),
        (Some(id.as_str()), Some("cancelled"))
    );
    assert!(
        got[0]["created_at"].is_string(),
        "the stored status: {}",
        got[0]
    );
    assert!(got[0].get("result").is_none());
    // The job after it ran: by then the cancelled one was settled long ago.
    let done = server.wait_for("/cb/done", 1).await;
    assert_eq!(done[0]["job_id"], after.as_str());
    assert_eq!(done[0]["result"], "result of runs");
    assert_eq!(server.at("/cb/cancelled").len(), 1);
}

pub async fn a_hand_published_job_with_a_callback_outside_the_list_runs_and_calls_nobody(
    backend: Backend,
) {
    let _brokers = brokers_shared().await;
    let queue = unique("cbevil");
    let callbacks = format!("{queue}.callbacks");
    let _cleanup = backend.cleanup(&[&queue]);
    let (server, port) = Server::start().await;
    // `localhost` reaches the same server, but only 127.0.0.1:<port> is allowed.
    let evil = format!("http://localhost:{port}/cb/evil");
    let consumer = Consumer::start(backend, &queue, &consumer_env(port, &[])).await;

    // Through jobgate's own publisher, as a tool that bypasses the producer would: a
    // job on the queue, and a callback message straight on the callbacks queue.
    let mut args = vec!["consumer".to_owned(), "--queue".to_owned(), queue.clone()];
    for (name, value) in backend.env() {
        let flag = name
            .trim_start_matches("JOBGATE_")
            .to_lowercase()
            .replace('_', "-");
        args.extend([format!("--{flag}"), value]);
    }
    let config = ConsumerConfig::try_parse_from(&args).expect("valid flags");
    let publisher = consumer::backend::outcome_publisher(&config).unwrap();
    let mut job = JobMeta::new(queue.clone(), None);
    job.headers.insert("x-callback-url".into(), evil.clone());
    let mut forged = JobMeta::new(queue.clone(), Some("application/json".into()));
    forged.headers.insert("x-callback-url".into(), evil.clone());
    let publish = || async {
        publisher.publish(&job, b"evil job").await?;
        publisher
            .publish_to(&callbacks, &forged, br#"{"state":"done"}"#)
            .await
    };
    wait_until(LIMIT, "the hand-made messages to be published", || async {
        publish().await.is_ok()
    })
    .await;
    publisher.close().await;

    // The job ran (exec printed its result) and its callback was dropped; the forged
    // callback was refused and dead-lettered.
    wait_until(LIMIT, "the job's callback to be dropped", || {
        std::future::ready(
            !consumer
                .process
                .lines_where(|l| {
                    l["message"] == "callback dropped: its URL is refused"
                        && l["job_id"] == job.id.as_str()
                })
                .is_empty(),
        )
    })
    .await;
    wait_until(
        LIMIT,
        "the forged callback in the callbacks DLQ",
        || async {
            dlq::list(backend, &callbacks)
                .await
                .iter()
                .any(|d| d.to_string().contains(&forged.id))
        },
    )
    .await;
    let refused = consumer
        .process
        .lines_where(|l| l["message"] == "callback not sent: its URL is refused");
    assert!(
        !refused.is_empty(),
        "the callback handler logged its refusal"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        server.received().is_empty(),
        "nothing reached the server: {:?}",
        server.received()
    );
}

/// Submit-time checks need no consumer: a host outside the list, a URL with a user
/// name, and any callback while `JOBGATE_CALLBACK_ALLOW` is unset are 400, for single
/// jobs and batches; nothing is queued.
#[tokio::test]
async fn a_callback_host_not_in_the_allow_list_is_refused_at_submit() {
    let _brokers = brokers_shared().await;
    let backend = Backend::Rabbitmq;
    let queue = unique("cbsubmit");
    let _cleanup = backend.cleanup(&[&queue]);
    let on = Producer::start(
        backend,
        &[&queue],
        &vars(&[("JOBGATE_CALLBACK_ALLOW", "hooks.example.com,127.0.0.1:9")]),
    )
    .await;
    let off = Producer::start(backend, &[&queue], &[]).await;
    let post = |producer: &Producer, path: &str, callback: &str, content_type: &str| {
        producer
            .http
            .post(producer.url(path))
            .header("Jobgate-Callback", callback)
            .header("content-type", content_type)
            .body("{}")
            .send()
    };
    let single = format!("/jobs/{queue}");
    let batch = format!("/jobs/{queue}/batch");
    for path in [&single, &batch] {
        let ct = if path == &batch {
            "application/x-ndjson"
        } else {
            "application/json"
        };
        let response = post(&on, path, "https://evil.example.net/hook", ct)
            .await
            .unwrap();
        assert_problem(response, 400, "callback-not-allowed").await;
        let response = post(&on, path, "http://127.0.0.1:10/", ct).await.unwrap();
        assert_problem(response, 400, "callback-not-allowed").await;
        let response = post(&on, path, "https://user:pw@hooks.example.com/", ct)
            .await
            .unwrap();
        assert_problem(response, 400, "bad-callback").await;
        let response = post(&off, path, "https://hooks.example.com/", ct)
            .await
            .unwrap();
        let text = response.text().await.unwrap();
        assert!(
            text.contains("callback-not-allowed") && text.contains("JOBGATE_CALLBACK_ALLOW"),
            "{text}"
        );
    }
    // The detail names the setting.
    let response = post(
        &on,
        &single,
        "https://evil.example.net/",
        "application/json",
    )
    .await
    .unwrap();
    let text = response.text().await.unwrap();
    assert!(text.contains("JOBGATE_CALLBACK_ALLOW"), "{text}");
    assert!(text.contains("evil.example.net"), "{text}");
    // An allowed one is taken.
    let response = post(
        &on,
        &single,
        "https://HOOKS.example.com/x",
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(
        backend.pending(&queue).await,
        1,
        "only the allowed job was queued"
    );
}
