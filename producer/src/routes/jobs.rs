//! `POST /jobs` and `POST /jobs/{queue}`: accept one job.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use jobgate_shared::job::JobMeta;
use serde::Serialize;

use crate::auth::ApiKeyId;
use crate::error::ApiError;
use crate::idempotency::{self, Begin};
use crate::state::AppState;

/// The 202 body.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub message: &'static str,
    pub job_id: String,
    pub queue: String,
}

/// `POST /jobs`: to the first configured queue.
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
pub async fn post_to_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    scope: Option<Extension<ApiKeyId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if !state.accepts(&queue) {
        return Err(ApiError::UnknownQueue(queue));
    }
    accept(&state, queue, scope, &headers, body).await
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
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge {
                limit: state.max_body_bytes,
            }
        } else {
            ApiError::BadBody
        }
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut meta = JobMeta::new(queue, content_type);
    meta.headers = crate::metadata::extract(headers)?;
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
    if let Err(error) = state.publisher.publish(&meta, &body).await {
        if let Some(claim) = claim {
            claim.release().await;
        }
        return Err(error.into());
    }
    tracing::info!(job_id = %meta.id, queue = %meta.queue, bytes = body.len(), "job accepted");
    let accepted = Accepted {
        message: "Request received",
        job_id: meta.id,
        queue: meta.queue,
    };
    if let Some(claim) = claim {
        claim
            .complete(&serde_json::to_string(&accepted).unwrap_or_default())
            .await;
    }
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}
