//! The in-flight limit (`JOBGATE_MAX_IN_FLIGHT`): at most that many publishes may wait
//! for the broker's confirm at once, across all requests (single jobs and batch items).
//! A publish that finds no permit fails at once with [`PublishError::Overloaded`]
//! (503 `overloaded`, `Retry-After: 1`) instead of queueing behind the others.

use std::sync::Arc;

use async_trait::async_trait;
use jobgate_shared::broker::{PublishError, Publisher, SharedPublisher};
use jobgate_shared::job::JobMeta;
use tokio::sync::Semaphore;

/// Default of `JOBGATE_MAX_IN_FLIGHT`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// A publisher that holds one permit of a shared semaphore for each publish.
pub struct InFlightLimit {
    inner: SharedPublisher,
    permits: Arc<Semaphore>,
    max: usize,
}

impl InFlightLimit {
    /// Wraps `inner`; `max` publishes at once (at least one).
    pub fn new(inner: SharedPublisher, max: usize) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max.max(1))),
            max: max.max(1),
        }
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Permits not in use right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// The wrapped publisher.
    pub fn inner(&self) -> &SharedPublisher {
        &self.inner
    }
}

#[async_trait]
impl Publisher for InFlightLimit {
    async fn publish_to(
        &self,
        destination: &str,
        meta: &JobMeta,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let Ok(_permit) = self.permits.try_acquire() else {
            tracing::debug!(job_id = %meta.id, queue = %meta.queue, "in-flight limit reached; job refused");
            return Err(PublishError::Overloaded);
        };
        self.inner.publish_to(destination, meta, body).await
    }

    fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use serde_json::Value;
    use tokio::sync::Notify;
    use tower::ServiceExt;

    use super::*;
    use crate::startup::app;
    use crate::state::AppState;

    /// A publisher whose publishes wait until `release` is notified.
    #[derive(Default)]
    struct Blocking {
        release: Notify,
        waiting: AtomicUsize,
        done: AtomicUsize,
    }

    #[async_trait]
    impl Publisher for Blocking {
        async fn publish_to(&self, _: &str, _: &JobMeta, _: &[u8]) -> Result<(), PublishError> {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.release.notified().await;
            self.done.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn is_ready(&self) -> bool {
            true
        }

        async fn close(&self) {}
    }

    async fn status_of(app: axum::Router, request: Request<Body>) -> (StatusCode, String, Value) {
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let retry = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            retry,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn job() -> Request<Body> {
        Request::post("/jobs/q").body(Body::from("x")).unwrap()
    }

    #[tokio::test]
    async fn the_request_past_the_limit_is_503_at_once_and_permits_come_back() {
        const N: usize = 3;
        let blocking = Arc::new(Blocking::default());
        let state = AppState::new(blocking.clone(), vec!["q".into()], 1024).with_max_in_flight(N);
        let waiting: Vec<_> = (0..N)
            .map(|_| tokio::spawn(status_of(app(state.clone()), job())))
            .collect();
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while blocking.waiting.load(Ordering::SeqCst) < N {
            assert!(
                tokio::time::Instant::now() < until,
                "publishes did not start"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The (N+1)th answers at once, without waiting for the others.
        let (status, retry, json) =
            tokio::time::timeout(Duration::from_secs(1), status_of(app(state.clone()), job()))
                .await
                .expect("answered at once");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
        assert_eq!(retry, "1");
        assert_eq!(json["type"], "urn:jobgate:problem:overloaded");
        assert_eq!(json["title"], "Too many jobs in flight");
        // A batch item that finds no permit fails in its entry.
        let batch = Request::post("/jobs/q/batch")
            .header("content-type", "application/x-ndjson")
            .body(Body::from("1\n"))
            .unwrap();
        let (status, _, json) = status_of(app(state.clone()), batch).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
        assert_eq!(json["items"][0]["status"], 503);
        assert_eq!(blocking.waiting.load(Ordering::SeqCst), N);

        // Let the waiting ones finish: their permits come back.
        while blocking.done.load(Ordering::SeqCst) < N {
            blocking.release.notify_waiters();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for handle in waiting {
            assert_eq!(handle.await.unwrap().0, StatusCode::ACCEPTED);
        }
        assert_eq!(state.in_flight_available(), N);
        blocking.release.notify_one();
        let (status, _, _) = status_of(app(state.clone()), job()).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(state.in_flight_available(), N);
    }
}
