//! The body-read timeout (`JOBGATE_BODY_READ_TIMEOUT_MS`): a request's whole body must
//! arrive within this time, counted from when its head was read. Not a timeout between
//! reads (tower-http's `RequestBodyTimeout`), which a client trickling one byte per
//! interval would never hit.
//!
//! A body that misses its deadline fails to read with [`BodyDeadlineExceeded`]; the
//! handlers answer `408 body-timeout` (problem+json), and hyper closes the connection
//! afterwards (the body was not read to its end). Headers are bounded by the server's
//! header-read timeout ([`crate::server`]); the publish by the publish timeout.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

/// The error a body that missed its deadline reads as.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyDeadlineExceeded(pub Duration);

/// A body that fails once `deadline` has passed.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    limit: Duration,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // The data first: a body that is complete is never refused for being late.
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyDeadlineExceeded(self.limit).into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: gives the request body its deadline (`limit` from now).
pub async fn apply(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    let request = request.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
        })
    });
    next.run(request).await
}

/// Whether `error` (a body rejection, say) comes from a missed deadline.
pub fn is_deadline(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<BodyDeadlineExceeded>() {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::{Request, StatusCode};
    use futures::StreamExt;
    use jobgate_shared::broker::memory::MemoryBroker;

    use super::*;
    use crate::startup::app;
    use crate::state::AppState;

    /// A body that sends `first` and then nothing, ever.
    fn stalled(first: &'static str) -> Body {
        let chunks = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(first))])
            .chain(futures::stream::pending());
        Body::from_stream(chunks)
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_408_and_nothing_is_published() {
        let broker = MemoryBroker::new();
        let state = AppState::new(Arc::new(broker.clone()), vec!["q".into()], 1024)
            .with_body_read_timeout(Duration::from_millis(200));
        for path in ["/jobs/q", "/jobs/q/batch"] {
            let request = Request::post(path)
                .header("content-type", "application/x-ndjson")
                .body(stalled("{\"n\":"))
                .unwrap();
            let (status, headers, json) =
                crate::test_support::send(app(state.clone()), request).await;
            assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{path}: {json}");
            assert_eq!(headers["content-type"], "application/problem+json");
            assert_eq!(json["type"], "urn:jobgate:problem:body-timeout");
        }
        // A body that arrives in time is untouched.
        let request = Request::post("/jobs/q").body(Body::from("x")).unwrap();
        let (status, _, _) = crate::test_support::send(app(state), request).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(broker.published().len(), 1);
    }
}
