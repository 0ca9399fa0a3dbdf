//! Liveness and readiness probes. Both stay open even when auth is on.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

/// `GET /healthz`: the process is alive and serving HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "probes",
    summary = "Liveness",
    responses(
        (status = 200, description = "The process serves HTTP.", body = serde_json::Value,
            example = json!({"status": "ok"})),
    ),
)]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 only while the broker connection is up, the topology is
/// declared, the broker is not blocking publishers and no shutdown is under way.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    summary = "Readiness",
    responses(
        (status = 200, description = "Ready: the broker is up and no shutdown is under way.", body = serde_json::Value,
            example = json!({"status": "ready", "broker": "up", "shutting_down": false})),
        (status = 503, description = "Not ready: the broker is down or blocking publishers, or the producer is shutting down.", body = serde_json::Value,
            example = json!({"status": "not ready", "broker": "down", "shutting_down": false})),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let broker = state.publisher.is_ready();
    let draining = state.draining.is_cancelled();
    let status = if broker && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ready" } else { "not ready" },
        "broker": if broker { "up" } else { "down" },
        "shutting_down": draining,
    });
    (status, Json(body))
}
