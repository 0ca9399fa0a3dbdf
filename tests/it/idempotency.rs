//! `Idempotency-Key` with the real `producer` binary on both backends, each scenario
//! with both stores: memory (one producer) and Redis (`redis://127.0.0.1:6379`, started
//! by `scripts/brokers.sh up redis`, shared by TWO producers A and B).
//!
//! A repeat with the same key and body gets the same job id with
//! `Idempotent-Replayed: true` and exactly one message is queued; the same key with
//! another body is 422; concurrent posts with one key publish once.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::{assert_problem, brokers_shared, unique, vars, Backend, Producer};

on_both_backends!(
    repeat_replays_the_original_answer,
    same_key_other_body_is_422,
    concurrent_posts_with_one_key_publish_once,
);

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The idempotency store the producers of a scenario use.
#[derive(Debug, Clone, Copy)]
enum Store {
    Memory,
    Redis,
}

const STORES: [Store; 2] = [Store::Memory, Store::Redis];

/// Producer A and B: the same process with the memory store, two processes sharing
/// Redis with the Redis store.
struct Pair {
    a: Producer,
    b: Option<Producer>,
}

impl Pair {
    async fn start(backend: Backend, queue: &str, store: Store) -> Self {
        match store {
            Store::Memory => Self {
                a: Producer::start(backend, &[queue], &[]).await,
                b: None,
            },
            Store::Redis => {
                let env = vars(&[("JOBGATE_REDIS_URL", REDIS_URL)]);
                let queues = [queue];
                let (a, b) = futures::join!(
                    Producer::start(backend, &queues, &env),
                    Producer::start(backend, &queues, &env)
                );
                Self { a, b: Some(b) }
            }
        }
    }

    fn b(&self) -> &Producer {
        self.b.as_ref().unwrap_or(&self.a)
    }

    /// The producer of post number `i`: A and B in turn.
    fn nth(&self, i: usize) -> &Producer {
        if i.is_multiple_of(2) {
            &self.a
        } else {
            self.b()
        }
    }
}

async fn post(producer: &Producer, queue: &str, key: &str, body: &str) -> reqwest::Response {
    producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("POST reaches the producer")
}

/// The job id of a 202, and whether it was replayed.
async fn accepted(response: reqwest::Response, queue: &str) -> (String, bool) {
    let status = response.status();
    if status != 202 {
        let body = response.text().await.unwrap_or_default();
        panic!("expected 202, got {status}: {body}");
    }
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["message"], "Request received");
    assert_eq!(json["queue"], queue);
    (
        json["job_id"].as_str().expect("job_id").to_owned(),
        replayed,
    )
}

pub async fn repeat_replays_the_original_answer(backend: Backend) {
    let _brokers = brokers_shared().await;
    for store in STORES {
        let queue = unique("idem-replay");
        let _cleanup = backend.cleanup(&[&queue]);
        let pair = Pair::start(backend, &queue, store).await;
        let key = unique("key");
        let (first, replayed) =
            accepted(post(&pair.a, &queue, &key, "{\"n\":1}").await, &queue).await;
        assert!(!replayed, "{store:?}: the first answer is not a replay");
        let (again, replayed) =
            accepted(post(pair.b(), &queue, &key, "{\"n\":1}").await, &queue).await;
        assert!(replayed, "{store:?}: the repeat is a replay");
        assert_eq!(again, first, "{store:?}: the same job id");
        // Another key is another job.
        let (other, replayed) = accepted(
            post(pair.b(), &queue, &unique("key"), "{\"n\":1}").await,
            &queue,
        )
        .await;
        assert!(!replayed);
        assert_ne!(other, first);
        assert_eq!(backend.pending(&queue).await, 2, "{store:?}");
    }
}

pub async fn same_key_other_body_is_422(backend: Backend) {
    let _brokers = brokers_shared().await;
    for store in STORES {
        let queue = unique("idem-reuse");
        let _cleanup = backend.cleanup(&[&queue]);
        let pair = Pair::start(backend, &queue, store).await;
        let key = unique("key");
        accepted(post(&pair.a, &queue, &key, "{\"n\":1}").await, &queue).await;
        let response = post(pair.b(), &queue, &key, "{\"n\":2}").await;
        assert_problem(response, 422, "idempotency-key-reused").await;
        // A malformed key is 400.
        let response = post(&pair.a, &queue, "bad key", "{\"n\":3}").await;
        assert_problem(response, 400, "bad-idempotency-key").await;
        assert_eq!(backend.pending(&queue).await, 1, "{store:?}");
    }
}

pub async fn concurrent_posts_with_one_key_publish_once(backend: Backend) {
    let _brokers = brokers_shared().await;
    for store in STORES {
        let queue = unique("idem-race");
        let _cleanup = backend.cleanup(&[&queue]);
        let pair = Pair::start(backend, &queue, store).await;
        let key = unique("key");
        let posts = (0..10).map(|i| post(pair.nth(i), &queue, &key, "{\"n\":1}"));
        let answers = futures::future::join_all(posts).await;
        let mut ids = BTreeSet::new();
        let mut replayed = 0;
        for response in answers {
            let (id, was_replayed) = accepted(response, &queue).await;
            ids.insert(id);
            replayed += usize::from(was_replayed);
        }
        assert_eq!(ids.len(), 1, "{store:?}: one job id");
        assert_eq!(replayed, 9, "{store:?}: all but one replayed");
        assert_eq!(backend.pending(&queue).await, 1, "{store:?}");
    }
}
