//! The web console (issue 17): the page at `/ui` (its assets are embedded in the
//! binary, see [`assets`]) and the API it calls, which scripts may call as well:
//!
//! - `GET /me`: the caller's role, the backend, the queues, whether job status is on.
//! - `GET /queues`: each allow-listed queue's depth, consumers, dead letters and
//!   counters, asked of the broker ([`overview`]).
//! - `GET /queues/{queue}/dead`: its dead jobs, left in place.
//! - `POST /queues/{queue}/dead/replay`: replays them (all, or one job id) to the queue.
//! - `DELETE /queues/{queue}/dead?confirm={queue}`: purges them.
//!
//! Replay and purge need an admin key ([`Role::Admin`]); every valid key may read.
//! The dead-letter operations are [`jobgate_shared::dlq`], the code of `consumer dlq`.

pub mod assets;
pub mod overview;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use bytes::Bytes;
use clap::Args;
use jobgate_shared::broker::dlq_name;
use jobgate_shared::config::{Backend, BrokerArgs, SecretUrl};
use jobgate_shared::dlq::{self, DeadJobView, DlqSettings};
use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::error::{ApiError, Problem};
use crate::state::AppState;

/// Default of `limit` in `GET /queues/{queue}/dead`.
pub const DEFAULT_LIST_LIMIT: usize = 50;
/// Most dead jobs one `GET /queues/{queue}/dead` shows.
pub const MAX_LIST_LIMIT: usize = 500;
/// Default of `limit` in `POST /queues/{queue}/dead/replay`: one request replays at
/// most this many (a client repeats while it gets as many back).
pub const DEFAULT_REPLAY_LIMIT: usize = 1000;
/// Most dead jobs one replay request replays.
pub const MAX_REPLAY_LIMIT: usize = 10_000;

/// The console's settings.
#[derive(Debug, Clone, Args)]
pub struct ConsoleArgs {
    /// RabbitMQ management HTTP API the console reads queue depths from
    /// (`http://user:pass@host:15672/`). Default: the host of the first
    /// `JOBGATE_AMQP_URL` node on port 15672 (`amqps`: https on 15671), with that URL's
    /// user, password and vhost.
    #[arg(long, env = "JOBGATE_RABBITMQ_MANAGEMENT_URL", hide_env_values = true)]
    pub rabbitmq_management_url: Option<SecretUrl>,
}

/// What the console's routes share: the broker to ask, and the dead-letter settings.
pub struct Console {
    backend: Backend,
    dlq: DlqSettings,
    overview: overview::Overview,
}

impl Console {
    /// From the producer's configuration; an unusable management URL is a start-up
    /// error naming the setting.
    pub fn new(
        broker: &BrokerArgs,
        args: &ConsoleArgs,
        publish_timeout: Duration,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            backend: broker.backend,
            dlq: DlqSettings {
                broker: broker.clone(),
                // The consumers declare the retry tiers; a replay publishes to the queue.
                retry_tiers: Vec::new(),
                publish_timeout,
            },
            overview: overview::Overview::new(broker, args.rabbitmq_management_url.as_ref())?,
        })
    }
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Rabbitmq => "rabbitmq",
        Backend::Kafka => "kafka",
    }
}

/// The console, or 501 for a state built without one (unit tests of other routes).
fn console(state: &AppState) -> Result<&Arc<Console>, ApiError> {
    state.console.as_ref().ok_or(ApiError::ConsoleOff)
}

/// The caller's role; the guard sets it on every request it lets through.
fn role_of(role: Option<Extension<Role>>) -> Role {
    role.map_or(Role::Reader, |Extension(role)| role)
}

/// `GET /me`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Me {
    /// `admin` may replay and purge dead jobs and read any job's status.
    pub role: Role,
    /// `rabbitmq` or `kafka`.
    pub backend: &'static str,
    /// The queues of `JOBGATE_QUEUES`.
    pub queues: Vec<String>,
    /// Whether job status is on (`JOBGATE_REDIS_URL`).
    pub status_store: bool,
}

/// `GET /me`.
#[utoipa::path(
    get,
    path = "/me",
    tag = "console",
    summary = "Who the caller is to the console",
    description = "The caller's role (`admin` with a key of `JOBGATE_ADMIN_KEYS`, or on loopback when no keys are configured; else `reader`), the backend, the queues and whether job status is on. The console signs in with it.",
    responses(
        (status = 200, description = "The caller.", body = Me),
        (status = 401, description = "`unauthorized`: API keys are configured and the request has none or a wrong one.", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn me(State(state): State<AppState>, role: Option<Extension<Role>>) -> Json<Me> {
    let backend = state
        .console
        .as_ref()
        .map_or("unknown", |c| backend_name(c.backend));
    Json(Me {
        role: role_of(role),
        backend,
        queues: state.queues.to_vec(),
        status_store: state.status.is_some(),
    })
}

/// `GET /queues`.
#[utoipa::path(
    get,
    path = "/queues",
    tag = "console",
    summary = "Every queue's depth, consumers and dead letters",
    description = "For each queue of `JOBGATE_QUEUES`: RabbitMQ: messages ready and unacked (from the management HTTP API, which refreshes its figures every few seconds); Kafka: the lag of the consumer group. Consumers, dead jobs waiting in `Q.dlq`, jobs waiting for a retry, and counters to derive rates from: jobs this producer accepted since it started, jobs acknowledged (RabbitMQ: acks on the queue; Kafka: the group's committed offsets, summed) and jobs ever dead-lettered. A queue the broker could not be asked about has `error` set; the answer is still 200. Figures are at most a second old (one broker round per second, whoever asks).",
    responses(
        (status = 200, description = "The queues.", body = overview::QueuesOverview),
        (status = 401, description = "`unauthorized`.", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn queues(
    State(state): State<AppState>,
) -> Result<Json<overview::QueuesOverview>, ApiError> {
    let console = console(&state)?;
    let sample = console.overview.sample(&state.queues).await;
    let queues = state
        .queues
        .iter()
        .map(|name| {
            let mut queue = sample
                .queues
                .get(name)
                .cloned()
                .unwrap_or_else(|| overview::QueueOverview::unknown(name, &sample));
            queue.accepted = state.metrics.accepted(name);
            queue
        })
        .collect();
    Ok(Json(overview::QueuesOverview {
        backend: backend_name(console.backend),
        sampled_at: sample.sampled_at.clone(),
        queues,
    }))
}

/// The queue of the path, one of the allow-list.
fn queue_path(
    state: &AppState,
    path: Result<Path<String>, PathRejection>,
) -> Result<String, ApiError> {
    let Path(queue) = path.map_err(|_| ApiError::NotFound)?;
    if !state.accepts(&queue) {
        return Err(ApiError::UnknownQueue(queue));
    }
    Ok(queue)
}

/// Query of `GET /queues/{queue}/dead`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Most dead jobs to show (1 to 500; default 50).
    pub limit: Option<usize>,
}

/// `GET /queues/{queue}/dead`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetters {
    pub queue: String,
    /// The dead-letter queue (`Q.dlq`).
    pub dlq: String,
    /// How many dead jobs it holds, when the broker says.
    pub total: Option<u64>,
    /// The first `limit` of them, oldest first.
    pub jobs: Vec<DeadJobView>,
}

/// `GET /queues/{queue}/dead`.
#[utoipa::path(
    get,
    path = "/queues/{queue}/dead",
    tag = "console",
    summary = "A queue's dead jobs",
    description = "The dead jobs in `Q.dlq`, oldest first, left where they are (the same listing as `consumer dlq list`): id, attempts, why it died, when, and an escaped preview of its body.",
    params(
        ("queue" = String, Path, description = "A queue of `JOBGATE_QUEUES`."),
        ListQuery,
    ),
    responses(
        (status = 200, description = "The dead jobs.", body = DeadLetters),
        (status = 400, description = "`bad-request`: `limit` is not from 1 to 500.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`unknown-queue`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`dlq-unavailable`: the broker could not be asked; retry.", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn list_dead(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<DeadLetters>, ApiError> {
    let queue = queue_path(&state, path)?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = bounded("limit", query.limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?;
    let console = Arc::clone(console(&state)?);
    let listed = queue.clone();
    let listing = finish(async move { dlq::list(&console.dlq, &listed, limit).await }).await?;
    Ok(Json(DeadLetters {
        dlq: dlq_name(&queue),
        queue,
        total: listing.total,
        jobs: listing.jobs.iter().map(DeadJobView::of).collect(),
    }))
}

/// `limit` of a query: `default` when absent, an error outside 1 to `max`.
fn bounded(
    name: &str,
    value: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "`{name}` must be from 1 to {max}, not {n}"
        ))),
    }
}

/// Runs a dead-letter operation to its end in its own task: a client that goes away
/// does not cut a replay between a publish and its ack (nothing would be lost, but the
/// job would be replayed twice).
async fn finish<T: Send + 'static>(
    operation: impl std::future::Future<Output = dlq::Result<T>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(operation).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(error) => Err(ApiError::Dlq(dlq::DlqError::failed(format!(
            "the operation failed: {error}"
        )))),
    }
}

/// Body of `POST /queues/{queue}/dead/replay` (optional: none replays them all).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Replay only the dead job with this id.
    pub job_id: Option<String>,
    /// Most dead jobs to replay (1 to 10000; default 1000).
    pub limit: Option<usize>,
}

/// Answer of a replay.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Replayed {
    /// How many dead jobs are back in the queue. As many as the `limit`: more may wait.
    pub replayed: u64,
}

/// `POST /queues/{queue}/dead/replay`.
#[utoipa::path(
    post,
    path = "/queues/{queue}/dead/replay",
    tag = "console",
    summary = "Replay dead jobs (admin)",
    description = "Publishes dead jobs back to the queue, as `consumer dlq replay` does: same id and body, attempt 1, one more in `x-replays`; each leaves `Q.dlq` only after the broker confirmed it in the queue. With `job_id`, only that job. At most `limit` per request (default 1000): while the answer's `replayed` equals the limit, more may wait. With a status store, the job's status starts a new life (`queued`). Needs an admin key (`JOBGATE_ADMIN_KEYS`).",
    params(("queue" = String, Path, description = "A queue of `JOBGATE_QUEUES`.")),
    request_body(content = ReplayRequest, description = "Optional; an empty body replays every dead job (up to the limit)."),
    responses(
        (status = 200, description = "Replayed.", body = Replayed),
        (status = 400, description = "`bad-request`: the body is not the JSON object described, or `limit` is out of range.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`admin-only`: the key is not an admin key.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`dead-job-not-found` (no dead job with that `job_id`) or `unknown-queue`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`dlq-unavailable`: the broker failed or refused; what was replayed before stays replayed (the detail says how many).", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn replay_dead(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    role: Option<Extension<Role>>,
    body: Bytes,
) -> Result<Json<Replayed>, ApiError> {
    let queue = queue_path(&state, path)?;
    if role_of(role) != Role::Admin {
        return Err(ApiError::AdminOnly);
    }
    let request: ReplayRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body must be a JSON object like {{\"job_id\": \"...\"}} or empty: {e}"
            ))
        })?
    };
    let limit = bounded(
        "limit",
        request.limit,
        DEFAULT_REPLAY_LIMIT,
        MAX_REPLAY_LIMIT,
    )?;
    let console = Arc::clone(console(&state)?);
    let status = state.status.clone();
    let replayed = finish(async move {
        let replayed = dlq::replay(
            &console.dlq,
            &queue,
            limit,
            request.job_id.as_deref(),
            status.as_ref(),
        )
        .await?;
        tracing::info!(%queue, replayed, job_id = request.job_id.as_deref(), "dead jobs replayed from the console API");
        Ok(replayed)
    })
    .await?;
    Ok(Json(Replayed { replayed }))
}

/// Query of `DELETE /queues/{queue}/dead`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PurgeQuery {
    /// The queue's name again, to confirm: a purge cannot be undone.
    pub confirm: Option<String>,
}

/// Answer of a purge.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Purged {
    /// How many dead jobs were removed.
    pub purged: u64,
}

/// `DELETE /queues/{queue}/dead`.
#[utoipa::path(
    delete,
    path = "/queues/{queue}/dead",
    tag = "console",
    summary = "Purge dead jobs (admin)",
    description = "Removes every dead job of `Q.dlq`, as `consumer dlq purge --yes` does (RabbitMQ: `queue.purge`; Kafka: the replay group moves to the end; the records stay until the topic's retention). `confirm` must repeat the queue's name. Needs an admin key (`JOBGATE_ADMIN_KEYS`).",
    params(
        ("queue" = String, Path, description = "A queue of `JOBGATE_QUEUES`."),
        PurgeQuery,
    ),
    responses(
        (status = 200, description = "Purged.", body = Purged),
        (status = 400, description = "`confirmation-required`: `confirm` is not the queue's name.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`admin-only`: the key is not an admin key.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`unknown-queue`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`dlq-unavailable`: the broker failed or refused; retry.", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn purge_dead(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<PurgeQuery>, QueryRejection>,
    role: Option<Extension<Role>>,
) -> Result<Json<Purged>, ApiError> {
    let queue = queue_path(&state, path)?;
    if role_of(role) != Role::Admin {
        return Err(ApiError::AdminOnly);
    }
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if query.confirm.as_deref() != Some(queue.as_str()) {
        return Err(ApiError::ConfirmationRequired(queue));
    }
    let console = Arc::clone(console(&state)?);
    let purged = finish(async move {
        let purged = dlq::purge(&console.dlq, &queue).await?;
        tracing::info!(%queue, purged, "dead jobs purged from the console API");
        Ok(purged)
    })
    .await?;
    Ok(Json(Purged { purged }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use jobgate_shared::broker::memory::MemoryBroker;

    use crate::auth::{ApiKeys, Security};
    use crate::startup::app;
    use crate::state::AppState;
    use crate::test_support::send;

    const READER: &str = "reader-0123456789abcdef";
    const ADMIN: &str = "admin-0123456789abcdef";

    /// A producer with a reader and an admin key, and no console (no broker behind it):
    /// what is refused before the broker is asked shows; the rest answers 501.
    fn secured() -> axum::Router {
        let keys = ApiKeys::with_admins([READER], [ADMIN]);
        let state = AppState::new(Arc::new(MemoryBroker::new()), vec!["q".into()], 1024)
            .with_security(Arc::new(Security::new(Some(keys), None)));
        app(state)
    }

    fn request(method: &str, path: &str, key: &str, body: &'static str) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(body))
            .unwrap()
    }

    #[tokio::test]
    async fn me_tells_the_role_of_the_key() {
        for (key, role) in [(READER, "reader"), (ADMIN, "admin")] {
            let (status, _, json) = send(secured(), request("GET", "/me", key, "")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(json["role"], role);
            assert_eq!(json["queues"], serde_json::json!(["q"]));
            assert_eq!(json["status_store"], false);
        }
        let (status, _, _) = send(
            secured(),
            request("GET", "/me", "wrong-0123456789abcdef", ""),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn replay_and_purge_need_an_admin_key() {
        for (method, path) in [
            ("POST", "/queues/q/dead/replay"),
            ("DELETE", "/queues/q/dead?confirm=q"),
        ] {
            let (status, _, json) = send(secured(), request(method, path, READER, "")).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
            assert_eq!(json["type"], "urn:jobgate:problem:admin-only");
            assert!(json["detail"]
                .as_str()
                .unwrap()
                .contains("JOBGATE_ADMIN_KEYS"));
            // An admin gets past the role check (to the missing console here).
            let (status, _, json) = send(secured(), request(method, path, ADMIN, "")).await;
            assert_eq!(
                status,
                StatusCode::NOT_IMPLEMENTED,
                "{method} {path}: {json}"
            );
        }
    }

    #[tokio::test]
    async fn a_purge_must_name_its_queue_and_requests_must_be_well_formed() {
        for path in [
            "/queues/q/dead",
            "/queues/q/dead?confirm=other",
            "/queues/q/dead?confirm=",
        ] {
            let (status, _, json) = send(secured(), request("DELETE", path, ADMIN, "")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
            assert_eq!(json["type"], "urn:jobgate:problem:confirmation-required");
        }
        for body in [
            "junk",
            "[]",
            r#"{"job_id": 5}"#,
            r#"{"jobid": "x"}"#,
            r#"{"limit": 0}"#,
        ] {
            let (status, _, json) = send(
                secured(),
                request("POST", "/queues/q/dead/replay", ADMIN, body),
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(json["type"], "urn:jobgate:problem:bad-request", "{body}");
        }
        for path in [
            "/queues/q/dead?limit=0",
            "/queues/q/dead?limit=501",
            "/queues/q/dead?limit=x",
        ] {
            let (status, _, json) = send(secured(), request("GET", path, READER, "")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
            assert_eq!(json["type"], "urn:jobgate:problem:bad-request", "{path}");
        }
        for path in ["/queues/other/dead", "/queues/other/dead/replay"] {
            let method = if path.ends_with("replay") {
                "POST"
            } else {
                "GET"
            };
            let (status, _, json) = send(secured(), request(method, path, ADMIN, "")).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(json["type"], "urn:jobgate:problem:unknown-queue");
        }
    }

    #[tokio::test]
    async fn the_page_and_its_assets_are_open_and_carry_the_policy() {
        for (path, kind) in [
            ("/ui", "text/html"),
            ("/ui/", "text/html"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/app.css", "text/css"),
        ] {
            let request = Request::get(path).body(Body::empty()).unwrap();
            let (status, headers, _) = send(secured(), request).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(
                headers["content-type"].to_str().unwrap().starts_with(kind),
                "{path}"
            );
            let policy = headers["content-security-policy"].to_str().unwrap();
            assert!(policy.contains("script-src 'self'"), "{policy}");
            assert!(!policy.contains("unsafe-inline"), "{policy}");
            assert_eq!(headers["x-content-type-options"], "nosniff");
        }
        // Only those: the rest of /ui/ needs a key like any other path.
        let request = Request::get("/ui/other").body(Body::empty()).unwrap();
        assert_eq!(send(secured(), request).await.0, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let page = super::assets::INDEX_HTML.to_ascii_lowercase();
        for script in page.match_indices("<script") {
            let tag = &page[script.0..page[script.0..].find('>').unwrap() + script.0];
            assert!(tag.contains("src="), "inline script: {tag}");
        }
        assert!(!page.contains("<style"), "inline style");
        assert!(!page.contains(" style="), "style attribute");
        assert!(
            !page.contains(" onclick=") && !page.contains(" onload="),
            "handler attribute"
        );
    }
}
