//! API keys and the per-key rate limit, with the real `producer` binary on both
//! backends: 401 without or with a wrong key, 202 with a right one (and the job is on
//! the queue), 429 with `Retry-After` past the burst while another key still passes,
//! and the probes open without a key.

use std::time::Duration;

use crate::helpers::{
    assert_problem, brokers_shared, unique, vars, wait_until, Backend, Process, Producer, AMQP_URL,
};

on_both_backends!(keys_and_rate_limit_guard_the_job_routes);

const K1: &str = "k1-0123456789abcdef";
const K2: &str = "k2-0123456789abcdef";

/// A key of 12 characters, or an empty key list, stops the producer at start with a
/// clear error (exit code not 0), before it listens.
#[tokio::test]
async fn a_short_key_or_an_empty_key_list_stops_the_start() {
    for (keys, says) in [("twelve-chars", "shorter than 16"), (",", "no API keys")] {
        let mut producer = Process::spawn(
            "producer",
            "producer",
            &[
                ("JOBGATE_LISTEN", "127.0.0.1:0".to_owned()),
                ("JOBGATE_AMQP_URL", AMQP_URL.to_owned()),
                ("JOBGATE_API_KEYS", keys.to_owned()),
            ],
        )
        .await;
        let code = producer.wait_exit(Duration::from_secs(20)).await;
        assert_ne!(code, Some(0), "{keys:?}");
        // The exit may come before the last stderr line is read.
        wait_until(
            Duration::from_secs(5),
            "the start-up error in the log",
            || std::future::ready(producer.dump().contains(says)),
        )
        .await;
        let logs = producer.dump();
        assert!(
            !logs.contains("twelve-chars"),
            "the key is not quoted: {logs}"
        );
        assert!(producer.lines("producer listening").is_empty());
    }
}

pub async fn keys_and_rate_limit_guard_the_job_routes(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("auth");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(
        backend,
        &[&queue],
        &vars(&[
            ("JOBGATE_API_KEYS", &format!("{K1},{K2}")),
            ("JOBGATE_RATE_LIMIT_PER_SEC", "1"),
            ("JOBGATE_RATE_LIMIT_BURST", "3"),
        ]),
    )
    .await;
    let jobs = producer.url(&format!("/jobs/{queue}"));
    let post = |key: Option<&str>| {
        let request = producer.http.post(&jobs).body("{\"n\":1}");
        let request = match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        async move { request.send().await.expect("POST reaches the producer") }
    };

    // No key, a wrong key: 401 with a challenge, nothing queued, no token taken.
    let response = post(None).await;
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"jobgate\""
    );
    assert_problem(response, 401, "unauthorized").await;
    assert_problem(post(Some("k3-0123456789abcdef")).await, 401, "unauthorized").await;

    // The probes need no key.
    assert_eq!(producer.readyz().await, 200);
    let health = producer
        .http
        .get(producer.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // k1: a burst of 3 (sent at once so the 1/s refill cannot add a 4th) passes, the
    // 4th is 429 with Retry-After.
    let answers = futures::future::join_all((0..4).map(|_| post(Some(K1)))).await;
    let mut accepted = 0;
    let mut limited = Vec::new();
    for response in answers {
        match response.status().as_u16() {
            202 => accepted += 1,
            429 => limited.push(response),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(accepted, 3, "the burst of k1 passes");
    assert_eq!(limited.len(), 1, "the request past the burst is refused");
    let response = limited.pop().unwrap();
    let after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after >= 1, "Retry-After {after}");
    assert_problem(response, 429, "rate-limited").await;

    // k2 has a bucket of its own; a wrong key is still 401, not 429.
    let response = post(Some(K2)).await;
    assert_eq!(response.status(), 202);
    assert_problem(post(Some("k1-wrong-0123456789")).await, 401, "unauthorized").await;

    // Exactly the accepted jobs are on the queue.
    assert_eq!(backend.pending(&queue).await, 4);
    assert_eq!(producer.readyz().await, 200);
}
