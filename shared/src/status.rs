//! Job status: what became of each job, kept in Redis (`JOBGATE_REDIS_URL`) for
//! `JOBGATE_STATUS_TTL` after its last change, and shared by both binaries.
//!
//! - The producer writes `queued` after the broker confirmed a job, and answers
//!   `GET /jobs/{queue}/{job_id}` and `DELETE /jobs/{queue}/{job_id}` (cancel) from here.
//! - The consumer writes `running` when an attempt starts, then `retrying`, `done` or
//!   `dead` with the outcome; a job found `cancelled` or already `done` is acked unrun.
//!
//! Every write is one call of [`TRANSITION_SCRIPT`], which Redis runs atomically: it
//! reads the current state and applies the write only when it moves the job forward.
//! So the writes of the producer and of several consumers may arrive in any order (the
//! consumer can start a job before the producer's `queued` lands; a slow consumer's
//! `running` can come after another one's `done`) and the record still ends up right:
//! `done`, `dead` and `cancelled` are final, and an older attempt never overwrites a
//! newer one.
//!
//! A dead job replayed from its dead-letter queue (`consumer dlq replay`) starts a new
//! *life*: the replayed message carries `x-replays` (how many times it was replayed), the
//! tool writes `replayed`, and every consumer write names its life. A write of a later
//! life starts the record over (`queued`, no attempts) whichever comes first, the tool's
//! or the consumer's; a write of an earlier life is stale.
//!
//! The store is a convenience beside the broker, never a condition of the work: a
//! failed write is the caller's to log and count, and changes no answer and no job.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::SecretUrl;

/// Default of `JOBGATE_STATUS_TTL` (7 days).
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `last_error` kept, in bytes (longer ones are cut at a character boundary).
pub const MAX_ERROR_BYTES: usize = 4 * 1024;
/// Longest `result` kept, in bytes (longer ones are cut, and `result_truncated` set).
pub const MAX_RESULT_BYTES: usize = 64 * 1024;
/// Bound of one call to Redis.
pub const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest `JOBGATE_STATUS_TTL` (ten years: a longer one does not fit Redis's clock).
const MAX_TTL: Duration = Duration::from_secs(315_360_000);

/// The settings of the status store, flattened into both binaries' configurations.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Redis URL (`redis://[:pass@]host:port[/db]`): the job status store (both
    /// binaries) and the producer's idempotency store shared by its replicas. Unset:
    /// no job status (the status routes answer 501) and idempotency keys are kept in
    /// the producer's memory. The password is never logged.
    #[arg(long, env = "JOBGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<SecretUrl>,

    /// How long a job's status is kept after its last change (`30s`, `12h`, `7d`).
    #[arg(long, env = "JOBGATE_STATUS_TTL", default_value = "7d", value_parser = parse_ttl)]
    pub status_ttl: Duration,
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| format!("{e} (try `7d` or `3600s`)"))?;
    if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
        return Err("must be from 1s to 10 years".to_owned());
    }
    Ok(ttl)
}

impl StatusArgs {
    /// The store, when `JOBGATE_REDIS_URL` is set. It connects lazily: a Redis that is
    /// down at start fails only status calls.
    pub fn store(&self) -> Result<Option<StatusStore>, StatusError> {
        self.redis_url
            .as_ref()
            .map(|url| StatusStore::new(url, self.status_ttl))
            .transpose()
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The broker confirmed the job; no attempt started yet.
    Queued,
    /// The broker confirmed the job, and its first attempt waits for its due time
    /// (`next_attempt_at`, `scheduled_for`).
    Scheduled,
    /// An attempt is running.
    Running,
    /// An attempt failed; the next one is due at `next_attempt_at`.
    Retrying,
    /// Finished (final).
    Done,
    /// Failed for good, in the dead-letter queue (final).
    Dead,
    /// Cancelled before it started (final).
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Done => "done",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "queued" => Self::Queued,
            "scheduled" => Self::Scheduled,
            "running" => Self::Running,
            "retrying" => Self::Retrying,
            "done" => Self::Done,
            "dead" => Self::Dead,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// Nothing moves a job out of a final state.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Dead | Self::Cancelled)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job's status, as `GET /jobs/{queue}/{job_id}` shows it. Times are RFC 3339 (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "job_id": "0192f0c1-5a3e-7b2c-9d4e-1f2a3b4c5d6e",
    "queue": "emails",
    "state": "retrying",
    "attempts": 1,
    "created_at": "2026-01-05T10:00:00.000Z",
    "updated_at": "2026-01-05T10:00:00.250Z",
    "started_at": "2026-01-05T10:00:00.020Z",
    "next_attempt_at": "2026-01-05T10:00:01.250Z",
    "last_error": "HTTP 503 from the handler's URL"
}))]
pub struct JobStatus {
    pub job_id: String,
    pub queue: String,
    pub state: State,
    /// Attempts started so far.
    pub attempts: u32,
    /// When it was first recorded: by the producer after the broker's confirm, or by a
    /// consumer's start that came first; never after `started_at`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// The last change.
    pub updated_at: String,
    /// When the latest attempt started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it reached a final state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// `retrying`: when the next attempt is due; `scheduled`: when the first is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// A scheduled job (`Jobgate-Delay`, `Jobgate-Not-Before`): when it was due to run
    /// first; kept after it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<String>,
    /// Why the latest failed attempt failed (at most 4 KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// `done`: what the handler returned (the `http` handler's response body, the
    /// `exec` handler's stdout), at most 64 KiB; bytes that are not UTF-8 are shown as
    /// U+FFFD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// True when `result` was cut at 64 KiB.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub result_truncated: bool,
    /// How many times the job was replayed from its dead-letter queue (absent: never).
    /// Each replay starts its attempts, times and result anew.
    #[serde(skip_serializing_if = "is_zero")]
    pub replays: u32,
    /// When its latest life began (the first write after a replay from its dead-letter
    /// queue: the tool's, or the consumer's start of the replayed job).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed_at: Option<String>,
    /// Who may read and cancel it (a digest of the submitting API key); never shown.
    #[serde(skip)]
    pub owner: Option<String>,
}

/// One write, as the transition script applies it.
#[derive(Debug, Clone, Copy)]
pub enum Transition<'a> {
    /// The broker confirmed the job (producer); `owner` may read and cancel it.
    Queued { owner: &'a str },
    /// The broker confirmed a job whose first attempt is due at `due` (producer):
    /// `queued` with the state `scheduled` and the due time.
    Scheduled { owner: &'a str, due: SystemTime },
    /// Attempt `attempt` (1-based) starts (consumer).
    Running { attempt: u32 },
    /// Attempt `attempt` failed; the next is due at `due`.
    Retrying {
        attempt: u32,
        due: SystemTime,
        error: &'a str,
    },
    /// Attempt `attempt` finished the job, with the handler's result if any.
    Done {
        attempt: u32,
        result: Option<&'a [u8]>,
    },
    /// Attempt `attempt` failed for good.
    Dead { attempt: u32, error: &'a str },
    /// `owner` asks to cancel the job.
    Cancel { owner: &'a str },
    /// `consumer dlq replay` put the dead job back in its queue (its new life is the
    /// `replays` the write is applied in).
    Replayed,
}

impl Transition<'_> {
    /// The script's name of this write (also the metric label of a failed write).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Queued { .. } => "queued",
            Self::Scheduled { .. } => "scheduled",
            Self::Running { .. } => "running",
            Self::Retrying { .. } => "retrying",
            Self::Done { .. } => "done",
            Self::Dead { .. } => "dead",
            Self::Cancel { .. } => "cancel",
            Self::Replayed => "replayed",
        }
    }
}

/// What the script did with a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Written.
    Applied,
    /// Not written: the record is further along (a late or repeated write). For
    /// `Queued` on a record a consumer created first, the owner was still added.
    Stale,
    /// `Running` refused: the job is `done` or `cancelled`; do not run it.
    Skip,
    /// `Cancel` refused: an attempt is running.
    Running,
    /// `Cancel` refused: the job is in a final state already.
    Final,
    /// `Cancel`: no such job for this owner (unknown, expired, or another's).
    Missing,
}

/// The script's answer: its verdict and the state after it (none when missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub verdict: Verdict,
    pub state: Option<State>,
}

/// The store could not be used (Redis down, slow, or its answer unreadable).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the job status store is unavailable: {0}")]
pub struct StatusError(pub String);

/// Applies one write to the record `KEYS[1]`, or with `queued` to each of `KEYS`.
/// `ARGV`: op, now (ms since the epoch), TTL (ms), attempt, owner, text (error or
/// result), due (ms), result truncated (`1`/`0`), replays (the life the write belongs
/// to). Returns `{verdict, state after}` (for `queued`, those of the last key).
///
/// The rules, the one place they live:
/// - Lives first (not for `queued` and `cancel`, which concern the current one): a write
///   of an earlier life than the record's `replays` is stale; one of a later life first
///   starts the record over (`queued` with `replayed_at`, no attempts, no times or
///   result of the old life; owner, creation time and last error stay), then applies
///   by the rules below.
/// - `replayed` applies only as the start of a new life (else stale; `missing` on no
///   record, which no owner could read anyway).
/// - `done`, `dead`, `cancelled` are final: nothing changes them (a `running` on `done`
///   or `cancelled` answers `skip`: the consumer acks the job unrun).
/// - `queued` creates the record; on one that exists (a consumer started the job before
///   the producer's write landed) it only adds the owner and creation time. `scheduled`
///   is `queued` with the state `scheduled`, `next_attempt_at` and `scheduled_for` (due),
///   and the record is kept for the TTL after the due time.
/// - `running` of attempt n applies unless the record shows a later attempt running, or
///   attempt n or later already failed (`retrying`); it lowers a creation time later
///   than its own (writers read their clocks before their writes land).
/// - `retrying` of attempt n applies unless the record shows a later attempt.
/// - `done` and `dead` apply to any record not final.
/// - `cancel` by its owner applies to `queued`, `scheduled` and `retrying`; `running`
///   answers `running`, a final state `final`; anyone else's or no record `missing`.
///
/// Every applied write sets `updated_at` and starts the TTL anew.
pub const TRANSITION_SCRIPT: &str = r"
local op, now, ttl = ARGV[1], ARGV[2], ARGV[3]
local attempt, owner, text, due, truncated = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local replays = tonumber(ARGV[9]) or 0
local final = {done = true, dead = true, cancelled = true}

local function write(key, fields, drop)
  if replays > 0 then table.insert(fields, 'replays'); table.insert(fields, replays) end
  redis.call('HSET', key, 'updated_at', now, unpack(fields))
  if #drop > 0 then redis.call('HDEL', key, unpack(drop)) end
  redis.call('PEXPIRE', key, ttl)
end

if op == 'queued' or op == 'scheduled' then
  local answer = {'applied', op}
  local fields = {'state', op, 'owner', owner, 'created_at', now, 'attempts', '0'}
  if op == 'scheduled' then
    for _, f in ipairs({'next_attempt_at', due, 'scheduled_for', due}) do table.insert(fields, f) end
    -- Kept for the TTL after its due time, not only after now.
    ttl = string.format('%d', tonumber(ttl) + math.max(0, tonumber(due) - tonumber(now)))
  end
  for _, key in ipairs(KEYS) do
    local state = redis.call('HGET', key, 'state')
    if not state then
      write(key, fields, {})
      answer = {'applied', op}
    else
      redis.call('HSETNX', key, 'owner', owner)
      redis.call('HSETNX', key, 'created_at', now)
      answer = {'stale', state}
    end
  end
  return answer
end

local key = KEYS[1]
local state = redis.call('HGET', key, 'state')
local seen = tonumber(redis.call('HGET', key, 'attempts') or '0') or 0

if op == 'cancel' then
  if not state or redis.call('HGET', key, 'owner') ~= owner then return {'missing', ''} end
  if state == 'queued' or state == 'scheduled' or state == 'retrying' then
    write(key, {'state', 'cancelled', 'finished_at', now}, {'next_attempt_at'})
    return {'applied', 'cancelled'}
  end
  if state == 'running' then return {'running', state} end
  return {'final', state}
end

local lived = tonumber(redis.call('HGET', key, 'replays') or '0') or 0
if replays < lived then return {'stale', state or ''} end
if replays > lived and state then
  redis.call('HSET', key, 'state', 'queued', 'attempts', '0', 'replayed_at', now)
  redis.call('HDEL', key, 'started_at', 'finished_at', 'next_attempt_at', 'result', 'result_truncated')
  state, seen = 'queued', 0
  if op == 'replayed' then
    write(key, {}, {})
    return {'applied', 'queued'}
  end
end
if op == 'replayed' then
  if not state then return {'missing', ''} end
  return {'stale', state}
end

if state and final[state] then
  if op == 'running' and state ~= 'dead' then return {'skip', state} end
  return {'stale', state}
end

if op == 'running' then
  if (state == 'running' and attempt < seen) or (state == 'retrying' and attempt <= seen) then
    return {'stale', state}
  end
  local fields = {'state', 'running', 'attempts', attempt, 'started_at', now}
  -- Each writer reads its own clock before its write lands: a producer's 'queued' can
  -- land first with a later time. A job is never created after it started.
  local created = tonumber(redis.call('HGET', key, 'created_at') or '')
  if not created or created > tonumber(now) then
    table.insert(fields, 'created_at'); table.insert(fields, now)
  end
  write(key, fields, {'next_attempt_at'})
  return {'applied', 'running'}
end

if op == 'retrying' then
  if state and attempt < seen then return {'stale', state} end
  write(key, {'state', 'retrying', 'attempts', attempt, 'next_attempt_at', due, 'last_error', text}, {})
  return {'applied', 'retrying'}
end

if op == 'done' or op == 'dead' then
  if attempt < seen then attempt = seen end
  local fields = {'state', op, 'attempts', attempt, 'finished_at', now}
  local drop = {'next_attempt_at'}
  if op == 'done' then
    if text ~= '' then
      table.insert(fields, 'result'); table.insert(fields, text)
      if truncated == '1' then table.insert(fields, 'result_truncated'); table.insert(fields, '1') end
    end
  else
    table.insert(fields, 'last_error'); table.insert(fields, text)
  end
  write(key, fields, drop)
  return {'applied', op}
end

return redis.error_reply('unknown status operation ' .. tostring(op))
";

/// Job statuses in Redis, one hash a job: `jobgate:status:<queue>:<job id>` (queue names
/// hold no `:`, so keys never collide).
#[derive(Clone)]
pub struct StatusStore {
    url: SecretUrl,
    manager: redis::aio::ConnectionManager,
    ttl: Duration,
    script: std::sync::Arc<redis::Script>,
}

impl std::fmt::Debug for StatusStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl StatusStore {
    /// Connects lazily: a Redis that is down at start fails only status calls.
    pub fn new(url: &SecretUrl, ttl: Duration) -> Result<Self, StatusError> {
        let client = redis::Client::open(url.expose()).map_err(|e| {
            StatusError(format!(
                "JOBGATE_REDIS_URL {url} is not usable: {:?}",
                e.kind()
            ))
        })?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let manager = redis::aio::ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StatusError(format!("Redis at {url}: {:?}", e.kind())))?;
        Ok(Self {
            url: url.clone(),
            manager,
            ttl,
            script: std::sync::Arc::new(redis::Script::new(TRANSITION_SCRIPT)),
        })
    }

    /// For logs (the password masked).
    pub fn describe(&self) -> String {
        format!("redis {} (ttl {:?})", self.url, self.ttl)
    }

    fn key(queue: &str, job_id: &str) -> String {
        format!("jobgate:status:{queue}:{job_id}")
    }

    /// Applies `transition` to the job `job_id` of `queue`, whatever its life: for
    /// `Cancel` (by its owner, of the life the record is in).
    pub async fn apply(
        &self,
        queue: &str,
        job_id: &str,
        transition: Transition<'_>,
    ) -> Result<Answer, StatusError> {
        self.apply_in(queue, job_id, 0, transition).await
    }

    /// Applies `transition` of the job's life `replays` (see [`replays_of`]): what the
    /// consumer and `consumer dlq replay` write.
    pub async fn apply_in(
        &self,
        queue: &str,
        job_id: &str,
        replays: u32,
        transition: Transition<'_>,
    ) -> Result<Answer, StatusError> {
        self.run(&[Self::key(queue, job_id)], replays, transition)
            .await
    }

    /// Records every job of `job_ids` (one batch) as `queued` for `owner`, in one call.
    pub async fn queued_many(
        &self,
        queue: &str,
        job_ids: &[String],
        owner: &str,
    ) -> Result<(), StatusError> {
        if job_ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = job_ids.iter().map(|id| Self::key(queue, id)).collect();
        self.run(&keys, 0, Transition::Queued { owner })
            .await
            .map(drop)
    }

    /// Records every job of `job_ids` (one batch) as `scheduled` for `owner`, due at
    /// `due`, in one call.
    pub async fn scheduled_many(
        &self,
        queue: &str,
        job_ids: &[String],
        owner: &str,
        due: SystemTime,
    ) -> Result<(), StatusError> {
        if job_ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = job_ids.iter().map(|id| Self::key(queue, id)).collect();
        self.run(&keys, 0, Transition::Scheduled { owner, due })
            .await
            .map(drop)
    }

    async fn run(
        &self,
        keys: &[String],
        replays: u32,
        transition: Transition<'_>,
    ) -> Result<Answer, StatusError> {
        let now = epoch_millis(SystemTime::now());
        let (mut attempt, mut owner, mut text, mut due, mut truncated) =
            (0u32, "", &b""[..], 0u64, false);
        let error_text;
        match transition {
            Transition::Queued { owner: o } | Transition::Cancel { owner: o } => owner = o,
            Transition::Replayed => {}
            Transition::Scheduled { owner: o, due: d } => (owner, due) = (o, epoch_millis(d)),
            Transition::Running { attempt: a } => attempt = a,
            Transition::Retrying {
                attempt: a,
                due: d,
                error,
            } => {
                error_text = cut(error, MAX_ERROR_BYTES);
                (attempt, due, text) = (a, epoch_millis(d), error_text.as_bytes());
            }
            Transition::Dead { attempt: a, error } => {
                error_text = cut(error, MAX_ERROR_BYTES);
                (attempt, text) = (a, error_text.as_bytes());
            }
            Transition::Done { attempt: a, result } => {
                attempt = a;
                if let Some(result) = result {
                    truncated = result.len() > MAX_RESULT_BYTES;
                    text = &result[..result.len().min(MAX_RESULT_BYTES)];
                }
            }
        }
        let mut invocation = self.script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation
            .arg(transition.name())
            .arg(now)
            .arg(
                u64::try_from(self.ttl.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .arg(attempt)
            .arg(owner)
            .arg(text)
            .arg(due)
            .arg(if truncated { "1" } else { "0" })
            .arg(replays);
        let mut conn = self.manager.clone();
        let reply: Vec<String> =
            bounded(transition.name(), invocation.invoke_async(&mut conn)).await?;
        let verdict = match reply.first().map(String::as_str) {
            Some("applied") => Verdict::Applied,
            Some("stale") => Verdict::Stale,
            Some("skip") => Verdict::Skip,
            Some("running") => Verdict::Running,
            Some("final") => Verdict::Final,
            Some("missing") => Verdict::Missing,
            other => return Err(StatusError(format!("unexpected script answer {other:?}"))),
        };
        let state = reply.get(1).and_then(|s| State::parse(s));
        Ok(Answer { verdict, state })
    }

    /// The status of the job `job_id` of `queue`, if there is one (expired ones are gone).
    pub async fn get(&self, queue: &str, job_id: &str) -> Result<Option<JobStatus>, StatusError> {
        let mut conn = self.manager.clone();
        let fields: HashMap<String, Vec<u8>> = bounded(
            "read",
            redis::cmd("HGETALL")
                .arg(Self::key(queue, job_id))
                .query_async(&mut conn),
        )
        .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        from_fields(queue, job_id, &fields).map(Some)
    }

    /// The status of the job for `owner`: none when there is no such job, or it is
    /// someone else's (the two are not told apart, so ids cannot be probed).
    pub async fn get_for(
        &self,
        queue: &str,
        job_id: &str,
        owner: &str,
    ) -> Result<Option<JobStatus>, StatusError> {
        Ok(self
            .get(queue, job_id)
            .await?
            .filter(|status| status.owner.as_deref() == Some(owner)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

/// `jobgate_status_store_failures_total{op}`: status calls that failed (Redis down,
/// slow, or answering nonsense), by operation (`queued`, `scheduled`, `running`, `retrying`,
/// `done`, `dead`, `cancel`, `read`). Both binaries count them the same way.
#[derive(Debug, Clone, Default)]
pub struct StoreFailures(
    prometheus_client::metrics::family::Family<
        OpLabels,
        prometheus_client::metrics::counter::Counter,
    >,
);

impl StoreFailures {
    /// Registers the counter in `registry`.
    pub fn register(registry: &mut crate::metrics::Registry) -> Self {
        let failures = Self::default();
        registry.register(
            "status_store_failures",
            "Job status store calls that failed, by operation (the job itself is unaffected)",
            failures.0.clone(),
        );
        failures
    }

    /// One more failed `op`.
    pub fn record(&self, op: &'static str) {
        self.0.get_or_create(&OpLabels { op }).inc();
    }
}

async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StatusError> {
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StatusError(format!("Redis {what}: {e}"))),
        Err(_) => Err(StatusError(format!(
            "Redis {what}: no answer within {OP_TIMEOUT:?}"
        ))),
    }
}

fn epoch_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `text` cut to at most `max` bytes, at a character boundary.
/// `text` cut to at most `max` bytes, at a character boundary.
pub fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The record as the script wrote it; a field that does not parse is an error (the
/// record is not ours, or was edited by hand).
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The life of the job `meta` is in: how many times it was replayed from its
/// dead-letter queue (`x-replays`; absent or junk: never).
pub fn replays_of(meta: &crate::job::JobMeta) -> u32 {
    meta.headers
        .get(crate::job::HEADER_REPLAYS)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn from_fields(
    queue: &str,
    job_id: &str,
    fields: &HashMap<String, Vec<u8>>,
) -> Result<JobStatus, StatusError> {
    let text = |name: &str| {
        fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let time = |name: &str| -> Result<Option<String>, StatusError> {
        text(name)
            .map(|ms| {
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| StatusError(format!("status field {name} is not a time")))?;
                let at = UNIX_EPOCH
                    .checked_add(Duration::from_millis(ms))
                    .ok_or_else(|| StatusError(format!("status field {name} is out of range")))?;
                Ok(humantime::format_rfc3339_millis(at).to_string())
            })
            .transpose()
    };
    let state = text("state")
        .and_then(|s| State::parse(&s))
        .ok_or_else(|| StatusError("status record without a known state".to_owned()))?;
    let attempts = text("attempts")
        .map_or(Ok(0), |a| a.parse())
        .map_err(|_| StatusError("status field attempts is not a number".to_owned()))?;
    Ok(JobStatus {
        job_id: job_id.to_owned(),
        queue: queue.to_owned(),
        state,
        attempts,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?.unwrap_or_default(),
        started_at: time("started_at")?,
        finished_at: time("finished_at")?,
        next_attempt_at: time("next_attempt_at")?,
        scheduled_for: time("scheduled_for")?,
        last_error: text("last_error"),
        result: text("result"),
        result_truncated: fields.contains_key("result_truncated"),
        replays: text("replays").and_then(|r| r.parse().ok()).unwrap_or(0),
        replayed_at: time("replayed_at")?,
        owner: text("owner"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_cut_at_a_character_boundary() {
        let text = "é".repeat(MAX_ERROR_BYTES);
        let cut = cut(&text, MAX_ERROR_BYTES);
        assert!(cut.len() <= MAX_ERROR_BYTES);
        assert!(cut.len() >= MAX_ERROR_BYTES - 1);
        assert_eq!(super::cut("short", 10), "short");
    }

    #[test]
    fn the_ttl_takes_units_and_is_bounded() {
        assert_eq!(parse_ttl("7d"), Ok(DEFAULT_TTL));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("11years").is_err());
        assert!(parse_ttl("soon").is_err());
    }

    #[test]
    fn a_record_reads_back_with_rfc3339_times() {
        let fields: HashMap<String, Vec<u8>> = [
            ("state", "retrying"),
            ("attempts", "2"),
            ("owner", "abc"),
            ("updated_at", "1000"),
            ("next_attempt_at", "61000"),
            ("last_error", "boom"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
        .collect();
        let status = from_fields("q", "id", &fields).unwrap();
        assert_eq!(status.state, State::Retrying);
        assert_eq!(status.attempts, 2);
        assert_eq!(status.updated_at, "1970-01-01T00:00:01.000Z");
        assert_eq!(
            status.next_attempt_at.as_deref(),
            Some("1970-01-01T00:01:01.000Z")
        );
        let json = serde_json::to_value(&status).unwrap();
        assert!(json.get("owner").is_none(), "the owner is never shown");
        assert!(json.get("result").is_none());
        assert_eq!(json["state"], "retrying");
    }

    #[test]
    fn a_record_that_is_not_ours_is_an_error_not_a_panic() {
        let fields: HashMap<String, Vec<u8>> = [("state", "weird"), ("updated_at", "x")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
            .collect();
        assert!(from_fields("q", "id", &fields).is_err());
        let fields: HashMap<String, Vec<u8>> =
            [("state", "done"), ("updated_at", "99999999999999999999")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
                .collect();
        assert!(from_fields("q", "id", &fields).is_err());
    }
}
