//! Liveness and readiness probes. Both stay open even when auth is on.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

/// `GET /healthz`: the process is alive and serving HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 only while the broker connection is up, the topology is
/// declared, the broker is not blocking publishers and no shutdown is under way.
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
