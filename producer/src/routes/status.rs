//! `GET /jobs/{queue}/{job_id}` (a job's status) and `DELETE /jobs/{queue}/{job_id}`
//! (cancel it), answered from the job status store ([`jobgate_shared::status`]); and
//! the `queued` write after the broker's confirm, for single jobs and batches alike.
//!
//! A job belongs to the API key that submitted it, in the same scope as its
//! `Idempotency-Key` ([`crate::idempotency::scoped_key`]): another key gets the same 404
//! as for a job that does not exist, so ids cannot be probed.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use jobgate_shared::status::{JobStatus, State as JobState, Transition, Verdict};

use crate::auth::{ApiKeyId, Role};
use crate::error::{ApiError, Problem};
use crate::state::AppState;

/// What the owner digest of a job is derived from, besides the API key's digest.
const OWNER_SCOPE: &str = "jobgate job status owner";

/// The owner of the jobs a caller submits: a digest of its API key (or one owner for
/// every caller when API keys are off), never the key or its plain digest.
pub(crate) fn owner(scope: Option<&[u8; 32]>) -> String {
    crate::idempotency::scoped_key(scope, OWNER_SCOPE)
}

/// Records `job_ids` of `queue`, which the broker confirmed, as `queued` for the caller
/// `scope`, or `scheduled` when they are `due` later. Never fails the request (the jobs
/// are queued already): a failed write is logged and counted, and the jobs' status then
/// cannot be read.
pub(crate) async fn record_queued(
    state: &AppState,
    queue: &str,
    job_ids: &[String],
    scope: Option<&[u8; 32]>,
    due: Option<std::time::SystemTime>,
) {
    let Some(store) = &state.status else {
        return;
    };
    let owner = owner(scope);
    let (written, op) = match due {
        None => (store.queued_many(queue, job_ids, &owner).await, "queued"),
        Some(due) => (
            store.scheduled_many(queue, job_ids, &owner, due).await,
            "scheduled",
        ),
    };
    if let Err(error) = written {
        state.metrics.status_failures.record(op);
        tracing::warn!(%error, %queue, jobs = job_ids.len(), first_job_id = job_ids.first().map(String::as_str), "could not record accepted jobs as queued; their status will not be readable");
    }
}

/// The queue and job id of the path, the queue one of the allow-list.
fn job_path(
    state: &AppState,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, String), ApiError> {
    // A segment that is not UTF-8 names no queue and no job.
    let Path((queue, job_id)) = path.map_err(|_| ApiError::NotFound)?;
    if !state.accepts(&queue) {
        return Err(ApiError::UnknownQueue(queue));
    }
    Ok((queue, job_id))
}

/// The answers of both status routes (OpenAPI only: never built, so its size is moot).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code, clippy::large_enum_variant)]
enum StatusResponses {
    #[response(status = 200, description = "The job's status.")]
    Status(JobStatus),
    #[response(status = 401, description = "`unauthorized`: API keys are configured and the request has none or a wrong one.", content_type = "application/problem+json",
        headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"jobgate\"`")))]
    Unauthorized(Problem),
    #[response(
        status = 404,
        description = "`job-not-found` (no such job, its status expired after `JOBGATE_STATUS_TTL`, or another API key submitted it), `unknown-queue` or `not-found`.",
        content_type = "application/problem+json"
    )]
    NotFound(Problem),
    #[response(status = 429, description = "`rate-limited`: over the per-client rate limit.", content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")))]
    RateLimited(Problem),
    #[response(
        status = 501,
        description = "`status-not-configured`: no status store (`JOBGATE_REDIS_URL` is not set).",
        content_type = "application/problem+json"
    )]
    NotImplemented(Problem),
    #[response(status = 503, description = "`status-store-unavailable`: Redis is not reachable; retry.", content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")))]
    Unavailable(Problem),
}

/// The answers of `DELETE` beyond those of `GET` (OpenAPI only).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum CancelResponses {
    #[response(
        status = 409,
        description = "`job-running` (an attempt is running; it is not interrupted) or `job-finished` (the job is `done` or `dead`).",
        content_type = "application/problem+json"
    )]
    Conflict(Problem),
}

/// `GET /jobs/{queue}/{job_id}`.
#[utoipa::path(
    get,
    path = "/jobs/{queue}/{job_id}",
    tag = "jobs",
    summary = "A job's status",
    description = "What became of a job submitted with this API key (an admin key of `JOBGATE_ADMIN_KEYS` may read any job): `queued`, `scheduled` (with `next_attempt_at` and `scheduled_for`), `running`, `retrying` (with `next_attempt_at`), `done` (with the handler's `result`), `dead` or `cancelled`, with its attempts, times and last error. Kept for `JOBGATE_STATUS_TTL` after its last change. Needs `JOBGATE_REDIS_URL`.",
    params(
        ("queue" = String, Path, description = "A queue of `JOBGATE_QUEUES`."),
        ("job_id" = String, Path, description = "The `job_id` of the 202 (or of a batch item)."),
    ),
    responses(StatusResponses),
    security((), ("bearer" = [])),
)]
pub async fn get_status(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    scope: Option<Extension<ApiKeyId>>,
    role: Option<Extension<Role>>,
) -> Result<Json<JobStatus>, ApiError> {
    let (queue, job_id) = job_path(&state, path)?;
    let store = state.status.as_ref().ok_or(ApiError::StatusOff)?;
    let owner = owner(scope.map(|Extension(ApiKeyId(digest))| digest).as_ref());
    // An admin (the console's operator) may look up any job.
    let read = if role.is_some_and(|Extension(role)| role == Role::Admin) {
        store.get(&queue, &job_id).await
    } else {
        store.get_for(&queue, &job_id, &owner).await
    };
    match read {
        Ok(Some(status)) => Ok(Json(status)),
        Ok(None) => Err(ApiError::JobNotFound { queue, job_id }),
        Err(error) => {
            state.metrics.status_failures.record("read");
            Err(error.into())
        }
    }
}

/// `DELETE /jobs/{queue}/{job_id}`.
#[utoipa::path(
    delete,
    path = "/jobs/{queue}/{job_id}",
    tag = "jobs",
    summary = "Cancel a job that has not started",
    description = "Cancels a job submitted with this API key that is `queued`, `scheduled` or `retrying`: its state becomes `cancelled` and a consumer that receives it acks it without running it. A running attempt is not interrupted (409). Cancelling a cancelled job again answers 200. Needs `JOBGATE_REDIS_URL` (on the consumers too).",
    params(
        ("queue" = String, Path, description = "A queue of `JOBGATE_QUEUES`."),
        ("job_id" = String, Path, description = "The `job_id` of the 202 (or of a batch item)."),
    ),
    responses(StatusResponses, CancelResponses),
    security((), ("bearer" = [])),
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    scope: Option<Extension<ApiKeyId>>,
) -> Result<Json<JobStatus>, ApiError> {
    let (queue, job_id) = job_path(&state, path)?;
    let store = state.status.as_ref().ok_or(ApiError::StatusOff)?;
    let owner = owner(scope.map(|Extension(ApiKeyId(digest))| digest).as_ref());
    let answer = store
        .apply(&queue, &job_id, Transition::Cancel { owner: &owner })
        .await
        .inspect_err(|_| state.metrics.status_failures.record("cancel"))?;
    match (answer.verdict, answer.state) {
        (Verdict::Missing, _) => return Err(ApiError::JobNotFound { queue, job_id }),
        (Verdict::Running, _) => return Err(ApiError::JobRunning),
        // Cancelling twice is no error: the job is cancelled, as asked.
        (Verdict::Final, Some(JobState::Cancelled)) | (Verdict::Applied, _) => {}
        (_, state) => return Err(ApiError::JobFinished(state.unwrap_or(JobState::Done))),
    }
    if answer.verdict == Verdict::Applied {
        tracing::info!(job_id = %job_id, %queue, "job cancelled");
    }
    // The answer shows the record after the cancel. Should this read fail, the job is
    // cancelled all the same, and a retried DELETE answers 200 with it.
    match store.get_for(&queue, &job_id, &owner).await {
        Ok(Some(status)) => Ok(Json(status)),
        Ok(None) => Err(ApiError::JobNotFound { queue, job_id }),
        Err(error) => {
            state.metrics.status_failures.record("read");
            Err(error.into())
        }
    }
}
