//! `POST /jobs` and `POST /jobs/{queue}`: accept one job.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use jobgate_shared::job::JobMeta;
use serde::Serialize;

use crate::error::ApiError;
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
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let queue = state.default_queue().to_owned();
    accept(&state, queue, &headers, body).await
}

/// `POST /jobs/{queue}`: to a queue of the allow-list; 404 for any other.
pub async fn post_to_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    if !state.accepts(&queue) {
        return Err(ApiError::UnknownQueue(queue));
    }
    accept(&state, queue, &headers, body).await
}

async fn accept(
    state: &AppState,
    queue: String,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
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
    let meta = JobMeta::new(queue, content_type);
    state.publisher.publish(&meta, &body).await?;
    tracing::info!(job_id = %meta.id, queue = %meta.queue, bytes = body.len(), "job accepted");
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            message: "Request received",
            job_id: meta.id,
            queue: meta.queue,
        }),
    ))
}
