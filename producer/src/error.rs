//! Errors as `application/problem+json` (RFC 9457). Bodies say what went wrong in
//! words a client can act on; internals (broker messages, addresses) stay in the logs.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jobgate_shared::broker::PublishError;
use jobgate_shared::dlq::DlqError;
use serde::Serialize;

/// Every error the HTTP API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("queue {0:?} is not configured")]
    UnknownQueue(String),
    #[error("the job body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body could not be read")]
    BadBody,
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("the job could not be handed to the broker: {0}")]
    Publish(#[from] PublishError),
    /// The same, for a request with an `Idempotency-Key`: when the job may have been
    /// queued, the key keeps its id and a retry with the key is safe.
    #[error("the job could not be handed to the broker: {0}")]
    PublishWithKey(PublishError),
    #[error("no route for this path")]
    NotFound,
    #[error("the producer is shutting down")]
    ShuttingDown,
    /// A bad, reused or busy `Idempotency-Key`, or its store down: answered by
    /// [`crate::idempotency::IdempotencyError`]'s own problem.
    #[error(transparent)]
    Idempotency(#[from] crate::idempotency::IdempotencyError),
    #[error(transparent)]
    BadMetadata(#[from] crate::metadata::BadMetadata),
    /// A scheduling or per-job policy header that cannot be honoured: answered by
    /// [`crate::job_options::BadJobOption`]'s own problem.
    #[error(transparent)]
    BadJobOption(#[from] crate::job_options::BadJobOption),
    /// A `Jobgate-Callback` that is refused: answered by
    /// [`crate::callback::CallbackRefused`]'s own problem.
    #[error(transparent)]
    Callback(#[from] crate::callback::CallbackRefused),
    #[error("this path does not answer this method")]
    MethodNotAllowed,
    /// `GET`/`DELETE /jobs/{queue}/{job_id}` without a status store.
    #[error("job status is not configured")]
    StatusOff,
    /// No status for this job and this API key: unknown, expired, or another key's.
    #[error("no job {job_id:?} in queue {queue:?} for this API key")]
    JobNotFound { queue: String, job_id: String },
    /// The status store could not be read or written.
    #[error(transparent)]
    StatusStore(#[from] jobgate_shared::status::StatusError),
    /// A cancel of a job whose attempt is running.
    #[error("the job is running")]
    JobRunning,
    /// A cancel of a job that ended already (`done` or `dead`).
    #[error("the job is {0} already")]
    JobFinished(jobgate_shared::status::State),
    /// A request the route cannot use (a bad query or body): the words say why.
    #[error("{0}")]
    BadRequest(String),
    /// A console action that needs an admin key.
    #[error("this needs an admin key")]
    AdminOnly,
    /// A purge without `confirm` naming the queue.
    #[error("the purge of {0:?} was not confirmed")]
    ConfirmationRequired(String),
    /// A dead-letter operation failed.
    #[error(transparent)]
    Dlq(#[from] jobgate_shared::dlq::DlqError),
    /// A state built without the console (unit tests of other routes).
    #[error("the console is not configured")]
    ConsoleOff,
}

/// The problem document (RFC 9457), sent as `application/problem+json`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "type": "urn:jobgate:problem:unknown-queue",
    "title": "Unknown queue",
    "status": 404,
    "detail": "queue \"other\" is not configured."
}))]
pub struct Problem {
    /// `urn:jobgate:problem:<slug>`: a stable identifier to switch on.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    #[schema(value_type = String)]
    pub title: &'static str,
    /// The HTTP status, repeated.
    pub status: u16,
    pub detail: String,
}

impl ApiError {
    /// A request body that could not be read: too large (413, `limit` bytes), too slow
    /// (408, see [`crate::body_deadline`]) or broken (400).
    pub fn from_body_rejection(
        rejection: &axum::extract::rejection::BytesRejection,
        limit: usize,
        deadline: Duration,
    ) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::BodyTooLarge { limit }
        } else if crate::body_deadline::is_deadline(rejection) {
            Self::BodyTimeout(deadline)
        } else {
            Self::BadBody
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::UnknownQueue(_) | Self::NotFound | Self::JobNotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            Self::StatusOff | Self::ConsoleOff => StatusCode::NOT_IMPLEMENTED,
            Self::AdminOnly => StatusCode::FORBIDDEN,
            Self::BadRequest(_) | Self::ConfirmationRequired(_) | Self::Dlq(DlqError::Usage(_)) => {
                StatusCode::BAD_REQUEST
            }
            Self::Dlq(DlqError::NotFound(_)) => StatusCode::NOT_FOUND,
            Self::Dlq(DlqError::Failed(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::StatusStore(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::JobRunning | Self::JobFinished(_) => StatusCode::CONFLICT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadBody
            | Self::BadMetadata(_)
            | Self::BadJobOption(_)
            | Self::Callback(_)
            | Self::Idempotency(_)
            | Self::Publish(PublishError::Malformed(_)) => StatusCode::BAD_REQUEST,
            Self::PublishWithKey(e) => Self::Publish(e.clone()).status(),
            Self::Publish(_) | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable identifier clients can switch on.
    fn slug(&self) -> &'static str {
        match self {
            Self::UnknownQueue(_) => "unknown-queue",
            Self::NotFound => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::BodyTooLarge { .. } => "body-too-large",
            Self::BadBody => "bad-body",
            Self::BodyTimeout(_) => "body-timeout",
            Self::BadMetadata(_) | Self::Publish(PublishError::Malformed(_)) => "bad-metadata",
            Self::Idempotency(_) => "idempotency",
            Self::BadJobOption(crate::job_options::BadJobOption::Schedule(_)) => "bad-schedule",
            Self::BadJobOption(crate::job_options::BadJobOption::Policy(_)) => "bad-job-policy",
            Self::Callback(_) => "bad-callback",
            Self::PublishWithKey(e) => Self::Publish(e.clone()).slug(),
            Self::Publish(PublishError::Overloaded) => "overloaded",
            Self::Publish(_) => "broker-unavailable",
            Self::ShuttingDown => "shutting-down",
            Self::StatusOff => "status-not-configured",
            Self::JobNotFound { .. } => "job-not-found",
            Self::StatusStore(_) => "status-store-unavailable",
            Self::JobRunning => "job-running",
            Self::JobFinished(_) => "job-finished",
            Self::BadRequest(_) | Self::Dlq(DlqError::Usage(_)) => "bad-request",
            Self::AdminOnly => "admin-only",
            Self::ConfirmationRequired(_) => "confirmation-required",
            Self::Dlq(DlqError::NotFound(_)) => "dead-job-not-found",
            Self::Dlq(DlqError::Failed(_)) => "dlq-unavailable",
            Self::ConsoleOff => "console-not-configured",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::UnknownQueue(_) => "Unknown queue",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::BodyTooLarge { .. } => "Job body too large",
            Self::BadBody => "Unreadable request body",
            Self::BodyTimeout(_) => "Request body too slow",
            Self::BadMetadata(_) | Self::Publish(PublishError::Malformed(_)) => "Bad job metadata",
            Self::Idempotency(_) => "Idempotency",
            Self::BadJobOption(_) => "Bad job option",
            Self::Callback(_) => "Bad callback URL",
            Self::PublishWithKey(e) => Self::Publish(e.clone()).title(),
            Self::Publish(PublishError::Overloaded) => "Too many jobs in flight",
            Self::Publish(_) => "Broker unavailable",
            Self::ShuttingDown => "Shutting down",
            Self::StatusOff => "Job status not configured",
            Self::JobNotFound { .. } => "Job not found",
            Self::StatusStore(_) => "Job status store unavailable",
            Self::JobRunning => "Job is running",
            Self::JobFinished(_) => "Job already finished",
            Self::BadRequest(_) | Self::Dlq(DlqError::Usage(_)) => "Bad request",
            Self::AdminOnly => "Admin key needed",
            Self::ConfirmationRequired(_) => "Confirmation required",
            Self::Dlq(DlqError::NotFound(_)) => "Dead job not found",
            Self::Dlq(DlqError::Failed(_)) => "Dead-letter queue unavailable",
            Self::ConsoleOff => "Console not configured",
        }
    }

    fn detail(&self) -> String {
        match self {
            // Our own words about the job, not the broker's.
            Self::Publish(PublishError::Malformed(why)) => {
                format!("The job's metadata cannot be sent to the message broker: {why}. Nothing was queued.")
            }
            // The broker's own words stay in the log: they may name hosts and users.
            Self::Publish(e) if e.may_have_been_queued() => format!(
                "The job was sent but not confirmed ({}): it may have been queued. A retry may queue it twice.",
                publish_failure(e)
            ),
            Self::Publish(e) => format!(
                "The job was not accepted ({}). Nothing was queued; retry later.",
                publish_failure(e)
            ),
            Self::PublishWithKey(e) if e.may_have_been_queued() => format!(
                "The job was sent but not confirmed ({}): it may have been queued; retry with \
                 the same Idempotency-Key (the retry publishes it under the same job id, so a \
                 consumer can tell a second copy by its id).",
                publish_failure(e)
            ),
            Self::PublishWithKey(e) => Self::Publish(e.clone()).detail(),
            Self::BadMetadata(e) => format!("{e} Nothing was queued."),
            Self::BodyTimeout(limit) => format!(
                "The request body did not arrive within {} ms. Nothing was queued.",
                limit.as_millis()
            ),
            Self::ShuttingDown => {
                "This producer is shutting down; retry, another replica will take the job."
                    .to_owned()
            }
            Self::StatusOff => "Job status needs a store: set JOBGATE_REDIS_URL (a Redis URL) on \
                 the producer and on the consumers."
                .to_owned(),
            Self::JobNotFound { queue, job_id } => format!(
                "No job {job_id:?} in queue {queue:?} for this API key: it does not exist, its \
                 status expired (JOBGATE_STATUS_TTL), or another API key submitted it."
            ),
            // Redis's own words stay in the log: they may name hosts.
            Self::StatusStore(error) => {
                tracing::warn!(%error, "job status store unavailable; answering 503");
                "The job status store is not reachable right now; retry later. Jobs are \
                 accepted and processed meanwhile."
                    .to_owned()
            }
            Self::JobRunning => "An attempt of this job is running; a running job is not \
                 interrupted. It can be cancelled while it waits for a retry."
                .to_owned(),
            Self::JobFinished(state) => {
                format!("The job is {state} already; there is nothing to cancel.")
            }
            Self::AdminOnly => "Replaying and purging dead jobs needs an admin key: one of \
                 JOBGATE_ADMIN_KEYS, sent as `Authorization: Bearer <key>`."
                .to_owned(),
            Self::ConfirmationRequired(queue) => format!(
                "A purge removes every dead job of {queue:?} for good: repeat the queue's name \
                 in `confirm` (`?confirm={queue}`) to confirm it."
            ),
            // The dlq operations' words are for operators: they name queues and nodes,
            // with passwords masked.
            Self::Dlq(DlqError::Failed(message)) => {
                tracing::warn!(%message, "dead-letter operation failed");
                format!("{message}. Retry later.")
            }
            Self::Dlq(error) => format!("{error}."),
            Self::BadRequest(why) => format!("{why}."),
            other => format!("{other}."),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            // The same job fails the same way: nothing to wait for.
            Self::Publish(PublishError::Malformed(_))
            | Self::PublishWithKey(PublishError::Malformed(_)) => None,
            Self::Publish(e) | Self::PublishWithKey(e) => Some(e.retry_after()),
            Self::ShuttingDown | Self::StatusStore(_) => Some(Duration::from_secs(1)),
            Self::Dlq(DlqError::Failed(_)) => Some(Duration::from_secs(5)),
            _ => None,
        }
    }
}

/// What went wrong with a publish, in words for the client (the broker's own words
/// stay in the log).
fn publish_failure(e: &PublishError) -> &'static str {
    match e {
        PublishError::Unavailable => "the message broker is not reachable",
        PublishError::Timeout(_) => "the message broker did not confirm in time",
        PublishError::Unconfirmed(_) => {
            "the connection to the message broker was lost before it confirmed"
        }
        PublishError::Nacked => "the message broker refused it",
        PublishError::Unroutable => "the message broker has no queue for it",
        PublishError::Broker(_) => "the message broker failed",
        PublishError::Overloaded => "too many jobs are waiting for the message broker",
        PublishError::Malformed(_) => "its metadata cannot be sent",
    }
}

/// A problem+json response: the one way every error of the HTTP API is written.
/// `slug` becomes the `type` `urn:jobgate:problem:<slug>`.
pub fn problem_response(
    status: StatusCode,
    slug: &str,
    title: &'static str,
    detail: String,
    retry_after: Option<Duration>,
) -> Response {
    let problem = Problem {
        kind: format!("urn:jobgate:problem:{slug}"),
        title,
        status: status.as_u16(),
        detail,
    };
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let mut response = (status, body).into_response();
    // For the metrics middleware: rejections are counted by problem type.
    response
        .extensions_mut()
        .insert(crate::metrics::ProblemSlug(slug.to_owned()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(after) = retry_after {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(after.as_secs().max(1)),
        );
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let this = match self {
            Self::Idempotency(e) => return e.into_response(),
            Self::BadJobOption(e) => return e.into_response(),
            Self::Callback(e) => return e.into_response(),
            other => other,
        };
        problem_response(
            this.status(),
            this.slug(),
            this.title(),
            this.detail(),
            this.retry_after(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_whose_fate_is_unknown_says_the_job_may_have_been_queued() {
        for unknown in [
            PublishError::Timeout(Duration::from_secs(5)),
            PublishError::Unconfirmed("connection reset".into()),
        ] {
            let detail = ApiError::Publish(unknown).detail();
            assert!(detail.contains("may have been queued"), "{detail}");
            assert!(!detail.contains("Nothing was queued"), "{detail}");
        }
        for refused in [
            PublishError::Unavailable,
            PublishError::Nacked,
            PublishError::Unroutable,
        ] {
            let detail = ApiError::Publish(refused).detail();
            assert!(detail.contains("Nothing was queued"), "{detail}");
        }
    }
}
