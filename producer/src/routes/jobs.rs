//! `POST /jobs` and `POST /jobs/{queue}`: accept one job.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use jobgate_shared::broker::PublishError;
use jobgate_shared::job::JobMeta;
use serde::Serialize;
use tracing::Instrument;

use crate::auth::ApiKeyId;
use crate::error::{ApiError, Problem};
use crate::idempotency::{self, Begin};
use crate::state::AppState;

/// The 202 body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "message": "Request received",
    "job_id": "0192f0c1-5a3e-7b2c-9d4e-1f2a3b4c5d6e",
    "queue": "emails"
}))]
pub struct Accepted {
    /// Always `Request received`.
    #[schema(value_type = String)]
    pub message: &'static str,
    /// The job's id (UUID v7).
    pub job_id: String,
    pub queue: String,
}

/// The request headers both single-job routes read (OpenAPI only: the handlers read
/// them from the `HeaderMap`).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct JobHeaders {
    /// 1 to 255 visible ASCII characters. A repeat with the same key, queue and body within the TTL gets the original 202 (with `Idempotent-Replayed: true`) and publishes nothing.
    #[param(rename = "Idempotency-Key")]
    idempotency_key: Option<String>,
    /// Any number (at most 16) of `X-Job-<name>` headers travel with the job as message headers, names lower-cased: names up to 64 bytes, values up to 1024 bytes of visible ASCII and spaces.
    #[param(rename = "X-Job-*")]
    x_job: Option<String>,
    /// An absolute http(s) URL (at most 2048 bytes, no user name or password) whose host is in `JOBGATE_CALLBACK_ALLOW`: the job's final status (done, dead, cancelled; the JSON of `GET /jobs/{queue}/{job_id}`) is POSTed there, signed with `Jobgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, retried with backoff. Else 400 `callback-not-allowed` or `bad-callback`.
    #[param(rename = "Jobgate-Callback")]
    jobgate_callback: Option<String>,
    /// W3C trace context; travels with the job when valid (`00-<32 hex>-<16 hex>-<2 hex>`), ignored otherwise.
    traceparent: Option<String>,
    /// W3C trace context; travels with a valid `traceparent`.
    tracestate: Option<String>,
    /// Run the job no sooner than this many seconds from now (`90`, `1.5`); `0` runs it now. At most `JOBGATE_SCHEDULE_MAX` (default 30 days). Not with `Jobgate-Not-Before`. Its status is `scheduled` until it starts. The job reaches a consumer up to `JOBGATE_RETRY_BASE_MS` (default 1 s) after its time on RabbitMQ, about on time on Kafka, plus the consumers' own backlog; never before.
    #[param(rename = "Jobgate-Delay")]
    delay: Option<String>,
    /// Run the job no sooner than this RFC 3339 time (`2026-01-05T10:00:00Z`, `2026-01-05T11:00:00+01:00`); a time in the past runs it now. At most `JOBGATE_SCHEDULE_MAX` ahead. Not with `Jobgate-Delay`.
    #[param(rename = "Jobgate-Not-Before")]
    not_before: Option<String>,
    /// Attempts this job gets in all (1 to 1000) instead of the consumer's `JOBGATE_MAX_ATTEMPTS`; a consumer holds it to its `JOBGATE_MAX_ATTEMPTS_CEILING`.
    #[param(rename = "Jobgate-Max-Attempts")]
    max_attempts: Option<u32>,
    /// This job's timeout, in seconds (`30`, `0.5`) or as a duration (`1m 30s`, `250ms`), 1 ms to 7 days, instead of the consumer's `JOBGATE_JOB_TIMEOUT_MS`; a consumer holds it to its `JOBGATE_JOB_TIMEOUT_CEILING`.
    #[param(rename = "Jobgate-Timeout")]
    timeout: Option<String>,
}

/// The answers of both single-job routes (OpenAPI only).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum JobResponses {
    #[response(status = 202, description = "The broker confirmed the job.",
        headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`.")))]
    Accepted(Accepted),
    #[response(
        status = 400,
        description = "`bad-body`, `bad-metadata`, `bad-idempotency-key`, `bad-schedule` (`Jobgate-Delay` or `Jobgate-Not-Before` unreadable, both given, or beyond `JOBGATE_SCHEDULE_MAX`), `bad-job-policy` (`Jobgate-Max-Attempts` or `Jobgate-Timeout` unreadable or out of bounds), `callback-not-allowed` (the `Jobgate-Callback` host is not in `JOBGATE_CALLBACK_ALLOW`, or that setting is unset: callbacks off) or `bad-callback` (not an absolute http(s) URL, too long, or with a user name).",
        content_type = "application/problem+json"
    )]
    BadRequest(Problem),
    #[response(status = 401, description = "`unauthorized`: API keys are configured and the request has none or a wrong one.", content_type = "application/problem+json",
        headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"jobgate\"`")))]
    Unauthorized(Problem),
    #[response(
        status = 404,
        description = "`unknown-queue` (nothing is published) or `not-found`.",
        content_type = "application/problem+json"
    )]
    NotFound(Problem),
    #[response(status = 409, description = "`idempotency-key-in-progress`: the first request with this key is still publishing.", content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")))]
    Conflict(Problem),
    #[response(
        status = 408,
        description = "`body-timeout`: the body did not arrive within `JOBGATE_BODY_READ_TIMEOUT_MS`; the connection is closed.",
        content_type = "application/problem+json"
    )]
    Timeout(Problem),
    #[response(
        status = 413,
        description = "`body-too-large`: the body is larger than `JOBGATE_MAX_BODY_BYTES`.",
        content_type = "application/problem+json"
    )]
    TooLarge(Problem),
    #[response(
        status = 422,
        description = "`idempotency-key-reused`: the key was used for another queue or body.",
        content_type = "application/problem+json"
    )]
    Reused(Problem),
    #[response(status = 429, description = "`rate-limited`: over the per-client rate limit.", content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")))]
    RateLimited(Problem),
    #[response(status = 503, description = "`broker-unavailable`, `overloaded`, `shutting-down` or `idempotency-store-unavailable`: the job was not taken; retry.", content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")))]
    Unavailable(Problem),
}

/// `POST /jobs`: to the first configured queue.
#[utoipa::path(
    post,
    path = "/jobs",
    tag = "jobs",
    summary = "Accept one job for the default queue",
    description = "Publishes the body to the first queue of `JOBGATE_QUEUES` and answers 202 once the broker confirmed it.",
    request_body(description = "The job body: any bytes with any content type (no schema: it is not parsed), published byte for byte; the content type travels with the job.", content(("*/*"))),
    params(JobHeaders),
    responses(JobResponses),
    security((), ("bearer" = [])),
)]
pub async fn post_to_default_queue(
    State(state): State<AppState>,
    scope: Option<Extension<ApiKeyId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let queue = state.default_queue().to_owned();
    accept(&state, queue, scope, &headers, body).await
}

/// `POST /jobs/{queue}`: to a queue of the allow-list; 404 for any other.
#[utoipa::path(
    post,
    path = "/jobs/{queue}",
    tag = "jobs",
    summary = "Accept one job for a queue",
    description = "Publishes the body to `queue` (one of `JOBGATE_QUEUES`) and answers 202 once the broker confirmed it.",
    request_body(description = "The job body: any bytes with any content type (no schema: it is not parsed), published byte for byte; the content type travels with the job.", content(("*/*"))),
    params(
        ("queue" = String, Path, description = "A queue of `JOBGATE_QUEUES`."),
        JobHeaders,
    ),
    responses(JobResponses),
    security((), ("bearer" = [])),
)]
pub async fn post_to_queue(
    State(state): State<AppState>,
    queue: Result<Path<String>, PathRejection>,
    scope: Option<Extension<ApiKeyId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let queue = queue_name(queue)?;
    if !state.accepts(&queue) {
        return Err(ApiError::UnknownQueue(queue));
    }
    accept(&state, queue, scope, &headers, body).await
}

/// The queue of the path; a segment that is not UTF-8 (`%FF`) names no queue: 404.
pub(crate) fn queue_name(queue: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    queue
        .map(|Path(queue)| queue)
        .map_err(|_| ApiError::UnknownQueue("<not UTF-8>".to_owned()))
}

async fn accept(
    state: &AppState,
    queue: String,
    scope: Option<Extension<ApiKeyId>>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if state.draining.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    let body = body.map_err(|rejection| {
        ApiError::from_body_rejection(&rejection, state.max_body_bytes, state.body_read_timeout)
    })?;
    let content_type = crate::metadata::content_type(headers)?;
    let mut meta = JobMeta::new(queue, content_type);
    meta.headers = crate::metadata::extract(headers)?;
    let options = crate::job_options::JobOptions::from_headers(
        headers,
        std::time::SystemTime::now(),
        state.schedule_max,
    )?;
    options.apply(&mut meta.headers);
    crate::callback::apply(state.callback_allow.as_ref(), headers, &mut meta.headers)?;
    // Idempotency-Key: replay a stored answer, or claim the key before publishing.
    let scope = scope.map(|Extension(ApiKeyId(digest))| digest);
    let claim = match idempotency::begin(
        &state.idempotency,
        state.idempotency_wait,
        scope.as_ref(),
        headers,
        &meta.queue,
        &body,
    )
    .await?
    {
        Begin::NoKey => None,
        Begin::Replay(answer) => return Ok(answer),
        Begin::Claimed(claim) => Some(claim),
    };
    if let Some(job_id) = claim.as_ref().and_then(idempotency::Claimed::job_id) {
        // An earlier attempt with this key may have queued the job: same id again.
        meta.id = job_id.to_owned();
    }
    let keyed = claim.is_some();
    // The publish and the storing of its outcome run in a task of their own: a client
    // that hangs up (dropping this handler) does not cut them off half-way, so the key
    // ends up with the answer, or the id, or free, never with a stale claim.
    // The job's status (`queued`) is written in the same task after the confirm, so
    // that a status read right after the 202 finds it.
    let task_state = state.clone();
    let outcome = tokio::spawn(
        async move {
            let result = task_state.publisher.publish(&meta, &body).await;
            let accepted = Accepted {
                message: "Request received",
                job_id: meta.id.clone(),
                queue: meta.queue.clone(),
            };
            match (&result, claim) {
                (_, None) => {}
                (Ok(()), Some(claim)) => {
                    claim
                        .complete(&serde_json::to_string(&accepted).unwrap_or_default())
                        .await;
                }
                (Err(error), Some(claim)) if error.may_have_been_queued() => {
                    claim.unsettle(&meta.id).await;
                }
                (Err(_), Some(claim)) => claim.release().await,
            }
            if result.is_ok() {
                tracing::info!(job_id = %meta.id, queue = %meta.queue, bytes = body.len(), "job accepted");
                super::status::record_queued(
                    &task_state,
                    &meta.queue,
                    std::slice::from_ref(&meta.id),
                    scope.as_ref(),
                    options.due,
                )
                .await;
            }
            result.map(|()| accepted)
        }
        .instrument(tracing::Span::current()),
    )
    .await
    .map_err(|panicked| {
        tracing::error!(%panicked, "the publish task failed");
        ApiError::Publish(PublishError::Broker("the publish task failed".into()))
    })?;
    let accepted = match outcome {
        Ok(accepted) => accepted,
        Err(error) if keyed => return Err(ApiError::PublishWithKey(error)),
        Err(error) => return Err(error.into()),
    };
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}
