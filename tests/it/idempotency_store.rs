//! The idempotency stores themselves against a real Redis (`redis://127.0.0.1:6379`)
//! and in memory (issue 13): a stale claimer cannot overwrite the claim or answer of
//! the request that took the key after its claim expired, and a publish whose fate is
//! unknown leaves its job id with the key, so a retry publishes under the same id.

use std::sync::Arc;
use std::time::Duration;

use producer::idempotency::{Claim, IdempotencyStore, MemoryStore, RedisStore};

use crate::helpers::{brokers_shared, unique};

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A Redis store whose claims expire after 200 ms (twice the publish timeout).
fn redis_store() -> RedisStore {
    RedisStore::new(
        &REDIS_URL.parse().unwrap(),
        Duration::from_secs(60),
        Duration::from_millis(100),
        Duration::from_secs(1),
    )
    .expect("a Redis store")
}

fn stores() -> Vec<(&'static str, Arc<dyn IdempotencyStore>)> {
    vec![
        ("redis", Arc::new(redis_store())),
        (
            "memory",
            Arc::new(MemoryStore::new(Duration::from_secs(60), 1000)),
        ),
    ]
}

async fn acquire(store: &dyn IdempotencyStore, key: &str, fp: &str) -> (String, Option<String>) {
    match store.claim(key, fp, Duration::ZERO).await.unwrap() {
        Claim::Acquired { token, job_id } => (token, job_id),
        other => panic!("expected to acquire {key}, got {other:?}"),
    }
}

#[tokio::test]
async fn redis_complete_by_a_stale_claimer_does_not_overwrite_the_new_claim() {
    let _brokers = brokers_shared().await;
    let store = redis_store();
    let key = unique("stale");
    let (stale, _) = acquire(&store, &key, "f").await;
    // The first claim expires (its publish took too long); another request takes the key.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (fresh, _) = acquire(&store, &key, "f").await;
    store
        .complete(&key, &stale, "f", "stale answer")
        .await
        .unwrap();
    store.release(&key, &stale).await;
    store.unsettle(&key, &stale, "f", "stale-id").await.unwrap();
    // Still the fresh request's claim...
    assert_eq!(
        store.claim(&key, "f", Duration::ZERO).await.unwrap(),
        Claim::InProgress
    );
    // ...whose answer is the one kept.
    store
        .complete(&key, &fresh, "f", "fresh answer")
        .await
        .unwrap();
    assert_eq!(
        store.claim(&key, "f", Duration::ZERO).await.unwrap(),
        Claim::Replay("fresh answer".into())
    );
}

#[tokio::test]
async fn an_ambiguous_publish_leaves_its_job_id_with_the_key_in_both_stores() {
    let _brokers = brokers_shared().await;
    for (name, store) in stores() {
        let key = unique("unsettled");
        let (token, job_id) = acquire(&*store, &key, "f").await;
        assert_eq!(job_id, None, "{name}");
        store.unsettle(&key, &token, "f", "job-1").await.unwrap();
        // Another request with the key is still another request.
        assert_eq!(
            store.claim(&key, "other", Duration::ZERO).await.unwrap(),
            Claim::Mismatch,
            "{name}"
        );
        // The retry gets the id; a clear failure of the retry keeps it too.
        let (token, job_id) = acquire(&*store, &key, "f").await;
        assert_eq!(job_id.as_deref(), Some("job-1"), "{name}");
        store.release(&key, &token).await;
        let (token, job_id) = acquire(&*store, &key, "f").await;
        assert_eq!(
            job_id.as_deref(),
            Some("job-1"),
            "{name}: kept after a release"
        );
        store.complete(&key, &token, "f", "{}").await.unwrap();
        assert_eq!(
            store.claim(&key, "f", Duration::ZERO).await.unwrap(),
            Claim::Replay("{}".into()),
            "{name}"
        );
    }
}
