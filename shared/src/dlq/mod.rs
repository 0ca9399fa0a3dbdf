//! The dead-letter queue `Q.dlq` of a job queue `Q`, on either backend: list, replay and
//! purge. One code path for every caller: the `consumer dlq` command line and the
//! producer's console API (`/queues/{queue}/dead`).
//!
//! - [`list`] shows dead jobs without removing them: RabbitMQ hands them out unacked
//!   (`basic.get`) and gets them back when the channel closes; Kafka reads them from
//!   the positions of the replay group without committing anything.
//! - [`replay`] publishes each dead job back to `Q` (same id, body, content type and
//!   user headers; attempt 1; dead-letter headers removed), waits for the broker's
//!   confirm, and only then removes it from the dead-letter queue (RabbitMQ: ack;
//!   Kafka: commit of the replay group). An interrupted replay loses nothing; at worst
//!   a job is replayed twice (handlers are idempotent on the job id). The replayed job
//!   counts its replays in `x-replays`, and with a status store (`JOBGATE_REDIS_URL`)
//!   its status starts a new life (`queued`, `replays` + 1; see [`crate::status`]).
//! - [`purge`] removes the dead jobs (RabbitMQ: `queue.purge`; Kafka: the replay group
//!   skips to the end of each partition; the records stay until the topic's retention).

mod kafka;
mod rabbitmq;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::broker::Publisher;
use crate::config::{validate_queue_name, Backend, BrokerArgs};
use crate::job::{
    JobMeta, HEADER_ATTEMPTS, HEADER_DUE_AT, HEADER_ERROR, HEADER_FAILED_AT, HEADER_LAST_ERROR,
    HEADER_ORIGINAL_QUEUE, HEADER_REPLAYS,
};
use crate::status::{replays_of, StatusStore, Transition};

pub use kafka::replay_group;

/// Longest body preview, in characters (escapes included).
pub const PREVIEW_CHARS: usize = 80;
/// How long a replay waits for its publisher to connect and declare the topology.
const PUBLISHER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of one broker operation (declare, get, ack, purge, metadata, commit).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers that only make sense on a dead (or retried) job; a replayed job loses them.
const DEAD_LETTER_HEADERS: [&str; 6] = [
    HEADER_ERROR,
    HEADER_ATTEMPTS,
    HEADER_FAILED_AT,
    HEADER_ORIGINAL_QUEUE,
    HEADER_DUE_AT,
    HEADER_LAST_ERROR,
];
/// Prefixes of the headers RabbitMQ adds when it dead-letters a message itself
/// (`x-first-death-reason`, ...): also removed on replay.
const BROKER_DEATH_PREFIXES: [&str; 2] = ["x-first-death-", "x-last-death-"];

/// Why a dlq operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The request asks for something we refuse (a bad queue name, an empty job id).
    #[error("{0}")]
    Usage(String),
    /// A replay of one job id found no such dead job.
    #[error("{0}")]
    NotFound(String),
    /// The broker failed or refused, or something else went wrong.
    #[error("{0}")]
    Failed(String),
}

impl DlqError {
    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(message.into())
    }
}

pub type Result<T, E = DlqError> = std::result::Result<T, E>;

/// One dead job as read from the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadJob {
    /// Metadata as the wire mapping reads it (queue: the dead-letter queue's name).
    pub meta: JobMeta,
    pub body: Bytes,
    /// Kafka only: partition and offset of the record in `Q.dlq`.
    pub position: Option<(i32, i64)>,
}

impl DeadJob {
    /// Attempts the job had: `x-attempts`, or its last `x-attempt`.
    pub fn attempts(&self) -> u32 {
        self.meta
            .headers
            .get(HEADER_ATTEMPTS)
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or(self.meta.attempt)
    }

    /// Why it died: `x-error`, or the reason RabbitMQ gave when it dead-lettered the
    /// message itself (`x-first-death-reason`, e.g. `rejected`).
    pub fn reason(&self) -> Option<&str> {
        let headers = &self.meta.headers;
        headers
            .get(HEADER_ERROR)
            .or_else(|| headers.get("x-first-death-reason"))
            .map(String::as_str)
    }

    pub fn failed_at(&self) -> Option<&str> {
        self.meta.headers.get(HEADER_FAILED_AT).map(String::as_str)
    }
}

/// What `list` found.
#[derive(Debug, Default)]
pub struct Listing {
    pub jobs: Vec<DeadJob>,
    /// How many dead jobs the dead-letter queue held in all, when the broker says.
    pub total: Option<u64>,
}

/// What the dlq operations need to know besides the queue: the broker, and the
/// consumer's settings that name things on it.
#[derive(Debug, Clone)]
pub struct DlqSettings {
    /// The broker; on Kafka, its `kafka_group` names the replay group ([`replay_group`]).
    pub broker: BrokerArgs,
    /// The delay tiers the replay publisher declares (RabbitMQ) or knows (Kafka).
    pub retry_tiers: Vec<Duration>,
    /// How long a replay publish may wait for the broker's confirm.
    pub publish_timeout: Duration,
}

/// The queue name is checked by clap and the HTTP routes already; this keeps the
/// operations safe if they are driven some other way.
fn validate(queue: &str) -> Result<()> {
    validate_queue_name(queue).map_err(DlqError::Usage)
}

/// One operation at a time on each dead-letter queue, in this process. A RabbitMQ
/// listing holds the dead jobs it shows (unacked) until it ends: a purge that came
/// meanwhile found them not ready and purged none of them (the console's Refresh, then
/// Purge), and a replay skipped them. Operations of other processes (`consumer dlq` or
/// another producer) are not ordered with these: see the README.
async fn one_at_a_time(queue: &str) -> tokio::sync::OwnedMutexGuard<()> {
    static LOCKS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
        LazyLock::new(Mutex::default);
    // One entry per queue name: the callers take only names of allow-listed queues.
    let lock = Arc::clone(
        LOCKS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(queue.to_owned())
            .or_default(),
    );
    lock.lock_owned().await
}

/// Up to `limit` dead jobs of `queue`'s dead-letter queue, left in place.
pub async fn list(settings: &DlqSettings, queue: &str, limit: usize) -> Result<Listing> {
    validate(queue)?;
    let _turn = one_at_a_time(queue).await;
    match settings.broker.backend {
        Backend::Rabbitmq => rabbitmq::list(settings, queue, limit).await,
        Backend::Kafka => kafka::list(settings, queue, limit).await,
    }
}

/// Replays up to `limit` dead jobs of `queue` (only the one with `job_id`, when given)
/// back to `queue`; returns how many. With `job_id` and nothing replayed, an error
/// ([`DlqError::NotFound`]).
pub async fn replay(
    settings: &DlqSettings,
    queue: &str,
    limit: usize,
    job_id: Option<&str>,
    status: Option<&StatusStore>,
) -> Result<u64> {
    validate(queue)?;
    if job_id.is_some_and(|id| id.trim().is_empty()) {
        return Err(DlqError::Usage("the job id must not be empty".into()));
    }
    let _turn = one_at_a_time(queue).await;
    let replayed = match settings.broker.backend {
        Backend::Rabbitmq => rabbitmq::replay(settings, queue, limit, job_id, status).await?,
        Backend::Kafka => kafka::replay(settings, queue, limit, job_id, status).await?,
    };
    if let (Some(id), 0) = (job_id, replayed) {
        return Err(DlqError::NotFound(format!(
            "no dead job with id {id:?} in {}; nothing was replayed",
            crate::broker::dlq_name(queue)
        )));
    }
    Ok(replayed)
}

/// Removes every dead job of `queue`'s dead-letter queue; returns how many.
pub async fn purge(settings: &DlqSettings, queue: &str) -> Result<u64> {
    validate(queue)?;
    let _turn = one_at_a_time(queue).await;
    match settings.broker.backend {
        Backend::Rabbitmq => rabbitmq::purge(settings, queue).await,
        Backend::Kafka => kafka::purge(settings, queue).await,
    }
}

/// Waits until `publisher` is connected and has declared its topology.
async fn wait_ready(publisher: &dyn Publisher, what: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + PUBLISHER_READY_TIMEOUT;
    while !publisher.is_ready() {
        if tokio::time::Instant::now() >= deadline {
            return Err(DlqError::failed(format!(
                "{what} was not ready within {PUBLISHER_READY_TIMEOUT:?}; is the broker reachable?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The job as it goes back to `queue`: same id, body, content type, enqueue time and
/// user headers; attempt 1; every dead-letter and retry header removed; one more replay
/// in `x-replays`.
pub fn replay_meta(dead: &JobMeta, queue: &str) -> JobMeta {
    let mut meta = dead.clone();
    meta.queue = queue.to_owned();
    meta.attempt = 1;
    meta.redeliveries = 0;
    meta.headers.retain(|name, _| {
        !DEAD_LETTER_HEADERS.contains(&name.as_str())
            && !BROKER_DEATH_PREFIXES.iter().any(|p| name.starts_with(p))
    });
    let replays = replays_of(dead).saturating_add(1);
    meta.headers
        .insert(HEADER_REPLAYS.to_owned(), replays.to_string());
    meta
}

/// With a status store: the replayed job `meta` (confirmed in its queue) starts its new
/// life. A store that fails changes nothing about the replay: it is said on stderr, and
/// the consumer's first write of the new life starts it over anyway.
async fn record_replay(status: Option<&StatusStore>, meta: &JobMeta) {
    let Some(store) = status else {
        return;
    };
    let replays = replays_of(meta);
    if let Err(error) = store
        .apply_in(&meta.queue, &meta.id, replays, Transition::Replayed)
        .await
    {
        tracing::warn!(job_id = %meta.id, queue = %meta.queue, %error, "could not record the replay in the job's status");
    }
}

/// `text` with everything that is not printable escaped: `\n`, `\r`, `\t`, `\\`,
/// `\xNN` for other control bytes and for bytes that are not UTF-8, `\u{NN}` for other
/// control characters. Cut to at most `max` characters (ending in `…` when cut),
/// never in the middle of an escape.
pub fn escape_preview(bytes: &[u8], max: usize) -> String {
    let mut pieces: Vec<String> = Vec::new();
    let mut chars = 0;
    // Escape a little more than fits, to know whether something was cut.
    'outer: for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            let piece = match c {
                '\n' => "\\n".to_owned(),
                '\r' => "\\r".to_owned(),
                '\t' => "\\t".to_owned(),
                '\\' => "\\\\".to_owned(),
                c if c.is_ascii_control() => format!("\\x{:02x}", c as u32),
                c if c.is_control() => format!("\\u{{{:x}}}", c as u32),
                c => c.to_string(),
            };
            chars += piece.chars().count();
            pieces.push(piece);
            if chars > max {
                break 'outer;
            }
        }
        for b in chunk.invalid() {
            let piece = format!("\\x{b:02x}");
            chars += piece.len();
            pieces.push(piece);
            if chars > max {
                break 'outer;
            }
        }
    }
    if chars <= max {
        return pieces.concat();
    }
    let mut out = String::new();
    let mut used = 0;
    for piece in pieces {
        let n = piece.chars().count();
        if used + n + 1 > max {
            break;
        }
        out.push_str(&piece);
        used += n;
    }
    if max > 0 {
        out.push('…');
    }
    out
}

/// `at` in RFC 3339, or `None` outside what RFC 3339 writes (before the epoch or after
/// year 9999: a hand-made timestamp), where `humantime`'s formatter would fail, and
/// `to_string` panic with it.
fn rfc3339(at: SystemTime) -> Option<String> {
    /// The first second of year 10000.
    const YEAR_10000: Duration = Duration::from_secs(253_402_300_800);
    let since_epoch = at.duration_since(UNIX_EPOCH).ok()?;
    (since_epoch < YEAR_10000).then(|| humantime::format_rfc3339_millis(at).to_string())
}

/// One dead job as the tools and the console show it: what it was, why it died, and
/// a preview of its body (escaped and cut: bodies are the submitter's bytes).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct DeadJobView {
    pub job_id: String,
    /// Attempts it had.
    pub attempts: u32,
    /// Why it died (`x-error`, or RabbitMQ's own reason such as `rejected`).
    pub reason: Option<String>,
    /// When it died (RFC 3339).
    pub failed_at: Option<String>,
    pub original_queue: Option<String>,
    pub content_type: Option<String>,
    /// When it was first accepted (RFC 3339).
    pub enqueued_at: Option<String>,
    pub body_size: usize,
    /// At most 80 characters of the body, with what is not printable escaped (`\n`,
    /// `\xNN`), ending in `…` when cut.
    pub body_preview: String,
    /// Kafka: the record's partition in `Q.dlq`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    /// Kafka: the record's offset in `Q.dlq`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
}

impl DeadJobView {
    pub fn of(job: &DeadJob) -> Self {
        Self {
            job_id: job.meta.id.clone(),
            attempts: job.attempts(),
            reason: job.reason().map(str::to_owned),
            failed_at: job.failed_at().map(str::to_owned),
            original_queue: job.meta.headers.get(HEADER_ORIGINAL_QUEUE).cloned(),
            content_type: job.meta.content_type.clone(),
            enqueued_at: job.meta.enqueued_at.and_then(rfc3339),
            body_size: job.body.len(),
            body_preview: escape_preview(&job.body, PREVIEW_CHARS),
            partition: job.position.map(|(partition, _)| partition),
            offset: job.position.map(|(_, offset)| offset),
        }
    }
}

/// One dead job as a JSON object (`list --json`).
pub fn json_line(job: &DeadJob) -> serde_json::Value {
    serde_json::to_value(DeadJobView::of(job)).unwrap_or_default()
}
