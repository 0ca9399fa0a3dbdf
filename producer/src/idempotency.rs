//! `Idempotency-Key` for `POST /jobs` and `POST /jobs/{queue}`.
//!
//! A request with a key claims it in the store before publishing. A repeat with the
//! same key and the same request (SHA-256 of queue and body) within the TTL gets the
//! original 202 back with `Idempotent-Replayed: true` and publishes nothing; the same
//! key with another request is 422. A request that arrives while the key's first
//! request is still publishing waits for its outcome (at most the publish timeout and
//! a margin) and replays it; when the first failed, its claim is released and the
//! waiter claims the key and publishes itself.
//!
//! Keys are scoped per API key (the digest the auth guard leaves in the request, see
//! [`crate::auth::ApiKeyId`]), so two tenants never collide.
//!
//! Stores: [`MemoryStore`] (one producer replica) and [`RedisStore`] (several replicas
//! sharing `JOBGATE_REDIS_URL`). With Redis down, requests WITH a key get 503 and
//! requests without one are unaffected.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jobgate_shared::config::SecretUrl;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::error::problem_response;

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// The header of a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";
/// Default of `JOBGATE_IDEMPOTENCY_TTL_SECS` (one day).
pub const DEFAULT_TTL: Duration = Duration::from_secs(86_400);
/// Most keys the memory store holds; past it, expired entries are swept, then the
/// answers closest to expiry are dropped.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 255;

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the key: publish, then [`IdempotencyStore::complete`],
    /// [`IdempotencyStore::unsettle`] or [`IdempotencyStore::release`] with this token.
    /// `job_id` is set when an earlier attempt with this key may have queued the job:
    /// publish under that id again.
    Acquired {
        token: String,
        job_id: Option<String>,
    },
    /// The same request was answered already: this is its 202 body.
    Replay(String),
    /// The key was used for another request.
    Mismatch,
    /// Another request with this key is still publishing after the wait.
    InProgress,
}

/// The store could not be used (Redis down or slow).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the idempotency store is unavailable: {0}")]
pub struct StoreError(pub String);

/// Where keys and answers live.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` (already scoped and hashed) for a request with `fingerprint`; waits
    /// at most `wait` for a request holding it to finish.
    async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        wait: Duration,
    ) -> Result<Claim, StoreError>;
    /// [`IdempotencyStore::claim`] for a caller `scope` (the hex digest of its API key, or
    /// `-`): a store with per-scope quotas counts the key against it.
    async fn claim_for(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        wait: Duration,
    ) -> Result<Claim, StoreError> {
        let _ = scope;
        self.claim(key, fingerprint, wait).await
    }
    /// Stores the 202 body of the request that owns `key` for the TTL.
    async fn complete(
        &self,
        key: &str,
        token: &str,
        fingerprint: &str,
        answer: &str,
    ) -> Result<(), StoreError>;
    /// The publish's fate is unknown (sent, not confirmed): the key keeps `job_id` for
    /// the TTL, so a retry with it publishes under the same id.
    async fn unsettle(
        &self,
        key: &str,
        token: &str,
        fingerprint: &str,
        job_id: &str,
    ) -> Result<(), StoreError>;
    /// Gives `key` up (the publish failed, nothing queued): a retry may publish. When
    /// the claim carried a job id from an earlier ambiguous attempt, the key keeps it.
    async fn release(&self, key: &str, token: &str);
    /// For logs.
    fn describe(&self) -> String;
}

pub type SharedStore = Arc<dyn IdempotencyStore>;

/// Why a key could not be used; each is a problem+json answer.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("the Idempotency-Key header must be 1 to 255 visible ASCII characters")]
    BadKey,
    #[error("this Idempotency-Key was used for another request")]
    Reused,
    #[error("a request with this Idempotency-Key is still in progress")]
    InProgress,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IntoResponse for IdempotencyError {
    fn into_response(self) -> Response {
        match self {
            Self::BadKey => problem_response(
                StatusCode::BAD_REQUEST,
                "bad-idempotency-key",
                "Invalid Idempotency-Key",
                "The Idempotency-Key header must be 1 to 255 visible ASCII characters.".into(),
                None,
            ),
            Self::Reused => problem_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
                "This Idempotency-Key was already used for a request with another queue or \
                 body. Use a new key for a new job."
                    .into(),
                None,
            ),
            Self::InProgress => problem_response(
                StatusCode::CONFLICT,
                "idempotency-key-in-progress",
                "Idempotency key in use",
                "A request with this Idempotency-Key is still being processed; retry later.".into(),
                Some(Duration::from_secs(1)),
            ),
            Self::Store(error) => {
                tracing::warn!(%error, "idempotency store unavailable; answering 503");
                problem_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "idempotency-store-unavailable",
                    "Idempotency store unavailable",
                    "Requests with an Idempotency-Key cannot be handled right now (the \
                     idempotency store is not reachable). Nothing was queued; retry later."
                        .into(),
                    Some(Duration::from_secs(1)),
                )
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The store key of `key` for the caller `scope` (an API key digest, or none).
pub fn scoped_key(scope: Option<&[u8; 32]>, key: &str) -> String {
    let mut h = Sha256::new();
    match scope {
        Some(d) => {
            h.update(b"k");
            h.update(d);
        }
        None => h.update(b"-"),
    }
    h.update(key.as_bytes());
    hex(&h.finalize())
}

/// What identifies the request: its queue and body.
pub fn fingerprint(queue: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update((queue.len() as u64).to_be_bytes());
    h.update(queue.as_bytes());
    h.update(body);
    hex(&h.finalize())
}

/// The key of the request, when it has one; 400 when it is malformed.
pub fn key_of(headers: &HeaderMap) -> Result<Option<String>, IdempotencyError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_LEN || !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(IdempotencyError::BadKey);
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// A claimed key: completed with the answer, or released when dropped without one
/// (the publish failed or the client went away).
pub struct Claimed {
    store: SharedStore,
    key: String,
    token: String,
    fingerprint: String,
    job_id: Option<String>,
    done: bool,
}

impl Claimed {
    /// Stores the answer. A store failure is only logged: the job is queued already.
    pub async fn complete(mut self, answer: &str) {
        self.done = true;
        if let Err(error) = self
            .store
            .complete(&self.key, &self.token, &self.fingerprint, answer)
            .await
        {
            tracing::warn!(%error, "could not store the idempotent answer; a retry after the claim expires may publish again");
        }
    }
}

impl Claimed {
    /// The id to publish under: an earlier attempt's with this key may have been
    /// queued.
    pub fn job_id(&self) -> Option<&str> {
        self.job_id.as_deref()
    }

    /// The publish's fate is unknown: the key keeps `job_id` so a retry republishes it
    /// under the same id.
    pub async fn unsettle(mut self, job_id: &str) {
        self.done = true;
        if let Err(error) = self
            .store
            .unsettle(&self.key, &self.token, &self.fingerprint, job_id)
            .await
        {
            tracing::warn!(%error, "could not keep the job id of an unconfirmed publish; a retry may publish under a new id");
        }
    }

    /// Gives the key up now (the publish failed): a retry may publish.
    pub async fn release(mut self) {
        self.done = true;
        self.store.release(&self.key, &self.token).await;
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if !self.done {
            let store = Arc::clone(&self.store);
            let key = std::mem::take(&mut self.key);
            let token = std::mem::take(&mut self.token);
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { store.release(&key, &token).await });
            }
        }
    }
}

/// The outcome of [`begin`].
pub enum Begin {
    /// No key: publish as usual.
    NoKey,
    /// Publish, then complete the claim.
    Claimed(Claimed),
    /// Answer this (the original 202, replayed).
    Replay(Response),
}

/// Looks at the request's key: claims it, or finds the answer to replay.
pub async fn begin(
    store: &SharedStore,
    wait: Duration,
    scope: Option<&[u8; 32]>,
    headers: &HeaderMap,
    queue: &str,
    body: &[u8],
) -> Result<Begin, IdempotencyError> {
    let Some(key) = key_of(headers)? else {
        return Ok(Begin::NoKey);
    };
    let key = scoped_key(scope, &key);
    let fingerprint = fingerprint(queue, body);
    let scope_name = scope.map_or_else(|| "-".to_owned(), |digest| hex(digest));
    match store
        .claim_for(&scope_name, &key, &fingerprint, wait)
        .await?
    {
        Claim::Acquired { token, job_id } => Ok(Begin::Claimed(Claimed {
            store: Arc::clone(store),
            key,
            token,
            fingerprint,
            job_id,
            done: false,
        })),
        Claim::Replay(answer) => {
            let mut response = (
                StatusCode::ACCEPTED,
                [(
                    axum::http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                answer,
            )
                .into_response();
            response
                .headers_mut()
                .insert(REPLAYED, HeaderValue::from_static("true"));
            Ok(Begin::Replay(response))
        }
        Claim::Mismatch => Err(IdempotencyError::Reused),
        Claim::InProgress => Err(IdempotencyError::InProgress),
    }
}

fn new_token() -> String {
    uuid::Uuid::now_v7().to_string()
}

// ------------------------------------------------------------------ memory

enum Entry {
    Pending {
        fingerprint: String,
        token: String,
        /// From an earlier ambiguous attempt: on release the key goes back to it.
        job_id: Option<String>,
        /// Whose claim it is (for the per-scope quota once it holds an answer).
        scope: String,
        /// Dropped (closing the channel) when the claim completes or is released.
        _done: watch::Sender<()>,
        watch: watch::Receiver<()>,
    },
    Done {
        fingerprint: String,
        answer: String,
        expires: Instant,
    },
    /// An attempt's fate is unknown: a retry publishes under `job_id`.
    Unsettled {
        fingerprint: String,
        job_id: String,
        expires: Instant,
    },
}

/// Keys in this process: for one producer replica.
///
/// Bounded: answers (and kept ids) are indexed by expiry, overall and per scope (API
/// key), so making room is O(log n) per claim. A scope holding its quota
/// ([`MemoryStore::per_scope_max`], a tenth of the store) makes room among its own
/// entries; a full store drops the entry closest to expiry of the scope holding the
/// most. One API key can therefore never push the others' keys out.
pub struct MemoryStore {
    ttl: Duration,
    max_entries: usize,
    per_scope_max: usize,
    entries: Mutex<Memory>,
}

/// The entries and their eviction index.
#[derive(Default)]
struct Memory {
    map: HashMap<String, Entry>,
    /// Answers and kept ids (not pending claims) by expiry.
    by_expiry: BTreeSet<(Instant, String)>,
    /// The same per scope.
    by_scope: HashMap<String, BTreeSet<(Instant, String)>>,
    /// Scope and expiry of each indexed key.
    indexed: HashMap<String, (String, Instant)>,
    /// Pending claims per scope.
    pending: HashMap<String, usize>,
}

impl Memory {
    /// Puts `entry` at `key` for `scope`, indexing it when it can be evicted.
    fn put(&mut self, scope: &str, key: &str, entry: Entry) {
        self.unindex(key);
        if matches!(entry, Entry::Pending { .. }) {
            *self.pending.entry(scope.to_owned()).or_default() += 1;
        }
        if let Entry::Done { expires, .. } | Entry::Unsettled { expires, .. } = &entry {
            self.by_expiry.insert((*expires, key.to_owned()));
            self.by_scope
                .entry(scope.to_owned())
                .or_default()
                .insert((*expires, key.to_owned()));
            self.indexed
                .insert(key.to_owned(), (scope.to_owned(), *expires));
        }
        self.map.insert(key.to_owned(), entry);
    }

    fn remove(&mut self, key: &str) {
        self.unindex(key);
        self.map.remove(key);
    }

    fn unindex(&mut self, key: &str) {
        if let Some(Entry::Pending { scope, .. }) = self.map.get(key) {
            if let Some(n) = self.pending.get_mut(scope) {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(scope);
                }
            }
        }
        if let Some((scope, expires)) = self.indexed.remove(key) {
            let pair = (expires, key.to_owned());
            self.by_expiry.remove(&pair);
            if let Some(set) = self.by_scope.get_mut(&scope) {
                set.remove(&pair);
                if set.is_empty() {
                    self.by_scope.remove(&scope);
                }
            }
        }
    }

    /// Keys `scope` holds: answers, kept ids and pending claims.
    fn held(&self, scope: &str) -> usize {
        self.by_scope.get(scope).map_or(0, BTreeSet::len) + self.pending.get(scope).unwrap_or(&0)
    }

    /// The scope of `key`'s entry (pending claims are not indexed: `default`).
    fn scope_of(&self, key: &str) -> Option<&str> {
        self.indexed.get(key).map(|(scope, _)| scope.as_str())
    }

    /// Drops the entry of `scope` closest to expiry; false when it has none.
    fn evict_oldest_of(&mut self, scope: &str) -> bool {
        let oldest = self
            .by_scope
            .get(scope)
            .and_then(|set| set.first().map(|(_, key)| key.clone()));
        match oldest {
            Some(key) => {
                self.remove(&key);
                true
            }
            None => false,
        }
    }
}

impl MemoryStore {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        let max_entries = max_entries.max(1);
        Self {
            ttl,
            max_entries,
            per_scope_max: (max_entries / 10).max(1),
            entries: Mutex::new(Memory::default()),
        }
    }

    /// Most answers one scope (API key) may hold.
    pub fn per_scope_max(&self) -> usize {
        self.per_scope_max
    }

    /// Before `scope` claims a new key: drops expired entries (oldest first, each
    /// O(log n)), then makes room within the scope's quota and within the store.
    fn make_room(&self, memory: &mut Memory, scope: &str) {
        let now = Instant::now();
        while let Some((expires, key)) = memory.by_expiry.first().cloned() {
            if expires > now {
                break;
            }
            memory.remove(&key);
        }
        while memory.held(scope) >= self.per_scope_max {
            if !memory.evict_oldest_of(scope) {
                break;
            }
        }
        while memory.map.len() >= self.max_entries {
            // The scope holding the most (pending claims included) pays; scopes are the
            // API keys: a handful. When all it holds is pending, the store runs over
            // for a while: pending claims are bounded by the in-flight limit.
            let fullest = memory
                .by_scope
                .keys()
                .chain(memory.pending.keys())
                .max_by_key(|scope| memory.held(scope))
                .cloned();
            match fullest {
                Some(fullest) if memory.evict_oldest_of(&fullest) => {}
                _ => break,
            }
        }
    }

    /// Puts `entry` in place of the caller's pending claim of `key`; nothing when the
    /// claim is no longer the caller's.
    async fn replace_claim(&self, key: &str, token: &str, entry: Entry) {
        let mut memory = self.entries.lock().await;
        let ours =
            matches!(memory.map.get(key), Some(Entry::Pending { token: t, .. }) if t == token);
        if ours {
            let scope = pending_scope(&memory, key).to_owned();
            memory.put(&scope, key, entry);
        }
    }

    #[cfg(test)]
    async fn len(&self) -> usize {
        self.entries.lock().await.map.len()
    }

    async fn claim_in(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        wait: Duration,
    ) -> Result<Claim, StoreError> {
        let deadline = Instant::now() + wait;
        loop {
            let mut watch = {
                let mut memory = self.entries.lock().await;
                match memory.map.get(key) {
                    Some(Entry::Done {
                        fingerprint: f,
                        answer,
                        expires,
                    }) if *expires > Instant::now() => {
                        return Ok(if f == fingerprint {
                            Claim::Replay(answer.clone())
                        } else {
                            Claim::Mismatch
                        });
                    }
                    Some(Entry::Pending {
                        fingerprint: f,
                        watch,
                        ..
                    }) => {
                        if f != fingerprint {
                            return Ok(Claim::Mismatch);
                        }
                        watch.clone()
                    }
                    Some(Entry::Unsettled {
                        fingerprint: f,
                        expires,
                        ..
                    }) if *expires > Instant::now() && f != fingerprint => {
                        return Ok(Claim::Mismatch);
                    }
                    found => {
                        let job_id = match found {
                            Some(Entry::Unsettled {
                                job_id, expires, ..
                            }) if *expires > Instant::now() => Some(job_id.clone()),
                            _ => None,
                        };
                        self.make_room(&mut memory, scope);
                        let token = new_token();
                        let (tx, rx) = watch::channel(());
                        memory.put(
                            scope,
                            key,
                            Entry::Pending {
                                fingerprint: fingerprint.to_owned(),
                                token: token.clone(),
                                job_id: job_id.clone(),
                                scope: scope.to_owned(),
                                _done: tx,
                                watch: rx,
                            },
                        );
                        return Ok(Claim::Acquired { token, job_id });
                    }
                }
            };
            // Wait for the holder to finish (the channel closes), then look again.
            if tokio::time::timeout_at(deadline, watch.changed())
                .await
                .is_err()
            {
                return Ok(Claim::InProgress);
            }
        }
    }
}

/// The scope of a claim as [`MemoryStore`] counts it: pending claims know theirs.
fn pending_scope<'a>(memory: &'a Memory, key: &str) -> &'a str {
    match memory.map.get(key) {
        Some(Entry::Pending { scope, .. }) => scope,
        _ => memory.scope_of(key).unwrap_or("-"),
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        wait: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_in("-", key, fingerprint, wait).await
    }

    async fn claim_for(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        wait: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_in(scope, key, fingerprint, wait).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &str,
        fingerprint: &str,
        answer: &str,
    ) -> Result<(), StoreError> {
        let done = Entry::Done {
            fingerprint: fingerprint.to_owned(),
            answer: answer.to_owned(),
            expires: Instant::now() + self.ttl,
        };
        self.replace_claim(key, token, done).await;
        Ok(())
    }

    async fn unsettle(
        &self,
        key: &str,
        token: &str,
        fingerprint: &str,
        job_id: &str,
    ) -> Result<(), StoreError> {
        let unsettled = Entry::Unsettled {
            fingerprint: fingerprint.to_owned(),
            job_id: job_id.to_owned(),
            expires: Instant::now() + self.ttl,
        };
        self.replace_claim(key, token, unsettled).await;
        Ok(())
    }

    async fn release(&self, key: &str, token: &str) {
        let mut memory = self.entries.lock().await;
        let Some(Entry::Pending {
            token: t,
            fingerprint,
            job_id,
            scope,
            ..
        }) = memory.map.get(key)
        else {
            return;
        };
        if t != token {
            return;
        }
        match job_id.clone() {
            // An earlier attempt may still have queued it: keep its id.
            Some(job_id) => {
                let (fingerprint, scope) = (fingerprint.clone(), scope.clone());
                let unsettled = Entry::Unsettled {
                    fingerprint,
                    job_id,
                    expires: Instant::now() + self.ttl,
                };
                memory.put(&scope, key, unsettled);
            }
            None => memory.remove(key),
        }
    }

    fn describe(&self) -> String {
        format!(
            "memory (ttl {:?}, at most {} keys, {} per API key)",
            self.ttl, self.max_entries, self.per_scope_max
        )
    }
}

// ------------------------------------------------------------------ Redis

/// What a Redis key holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum RedisValue {
    Pending {
        fp: String,
        token: String,
        /// From an earlier ambiguous attempt (see [`Claim::Acquired`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<String>,
    },
    Done {
        fp: String,
        answer: String,
    },
    Unsettled {
        fp: String,
        job_id: String,
    },
}

/// Replaces the value (`ARGV[2]`, for `ARGV[3]` ms; empty: deletes it) only while it is
/// still `ARGV[1]`: a claim that expired and was taken by another request is not the
/// caller's to complete, keep or release. 1 when it was replaced.
const SWAP_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1";

/// Keys in Redis (`jobgate:idem:<sha256 hex>`): for several producer replicas.
pub struct RedisStore {
    url: SecretUrl,
    manager: redis::aio::ConnectionManager,
    ttl: Duration,
    claim_ttl: Duration,
    op_timeout: Duration,
    swap: redis::Script,
}

impl RedisStore {
    /// Connects lazily: a Redis that is down at start only fails requests with a key.
    /// `publish_timeout` sizes the claim (twice it) and every call is bounded by
    /// `op_timeout`.
    pub fn new(
        url: &SecretUrl,
        ttl: Duration,
        publish_timeout: Duration,
        op_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let client = redis::Client::open(url.expose()).map_err(|e| {
            anyhow::anyhow!("JOBGATE_REDIS_URL {url} is not usable: {:?}", e.kind())
        })?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(Some(op_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let manager = redis::aio::ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| anyhow::anyhow!("Redis at {url}: {:?}", e.kind()))?;
        Ok(Self {
            url: url.clone(),
            manager,
            ttl,
            claim_ttl: publish_timeout * 2,
            op_timeout,
            swap: redis::Script::new(SWAP_SCRIPT),
        })
    }

    fn redis_key(key: &str) -> String {
        format!("jobgate:idem:{key}")
    }

    /// Runs [`SWAP_SCRIPT`]: `key` from `current` to `next` (`None`: deleted) for `ttl`;
    /// true when it was still `current`.
    async fn swap(
        &self,
        key: &str,
        current: &str,
        next: Option<&RedisValue>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let next = match next {
            Some(value) => serde_json::to_string(value).map_err(|e| StoreError(e.to_string()))?,
            None => String::new(),
        };
        let mut conn = self.manager.clone();
        let mut invocation = self.swap.key(Self::redis_key(key));
        invocation.arg(current).arg(next).arg(millis(ttl));
        let replaced: i64 = self
            .bounded("swap", invocation.invoke_async(&mut conn))
            .await?;
        Ok(replaced == 1)
    }

    async fn bounded<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.op_timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError(format!("Redis {what}: {e}"))),
            Err(_) => Err(StoreError(format!(
                "Redis {what}: no answer within {:?}",
                self.op_timeout
            ))),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        wait: Duration,
    ) -> Result<Claim, StoreError> {
        let rkey = Self::redis_key(key);
        let deadline = Instant::now() + wait;
        loop {
            let token = new_token();
            let pending = serde_json::to_string(&RedisValue::Pending {
                fp: fingerprint.to_owned(),
                token: token.clone(),
                job_id: None,
            })
            .map_err(|e| StoreError(e.to_string()))?;
            let mut conn = self.manager.clone();
            let set: Option<String> = self
                .bounded(
                    "SET NX",
                    redis::cmd("SET")
                        .arg(&rkey)
                        .arg(&pending)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis(self.claim_ttl))
                        .query_async(&mut conn),
                )
                .await?;
            if set.is_some() {
                return Ok(Claim::Acquired {
                    token: pending,
                    job_id: None,
                });
            }
            let current: Option<String> = self
                .bounded("GET", redis::cmd("GET").arg(&rkey).query_async(&mut conn))
                .await?;
            match current.as_deref().map(serde_json::from_str::<RedisValue>) {
                // Expired or released between the two calls: claim again.
                None => continue,
                Some(Err(e)) => return Err(StoreError(format!("unreadable value: {e}"))),
                Some(Ok(RedisValue::Done { fp, answer })) => {
                    return Ok(if fp == fingerprint {
                        Claim::Replay(answer)
                    } else {
                        Claim::Mismatch
                    });
                }
                Some(Ok(RedisValue::Unsettled { fp, job_id })) => {
                    if fp != fingerprint {
                        return Ok(Claim::Mismatch);
                    }
                    // Take it over, keeping the id; lost to another request: look again.
                    let claim = RedisValue::Pending {
                        fp,
                        token,
                        job_id: Some(job_id.clone()),
                    };
                    let current = current.unwrap_or_default();
                    if self
                        .swap(key, &current, Some(&claim), self.claim_ttl)
                        .await?
                    {
                        let token =
                            serde_json::to_string(&claim).map_err(|e| StoreError(e.to_string()))?;
                        return Ok(Claim::Acquired {
                            token,
                            job_id: Some(job_id),
                        });
                    }
                }
                Some(Ok(RedisValue::Pending { fp, .. })) => {
                    if fp != fingerprint {
                        return Ok(Claim::Mismatch);
                    }
                    if Instant::now() >= deadline {
                        return Ok(Claim::InProgress);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: &str,
        fingerprint: &str,
        answer: &str,
    ) -> Result<(), StoreError> {
        let done = RedisValue::Done {
            fp: fingerprint.to_owned(),
            answer: answer.to_owned(),
        };
        if !self.swap(key, token, Some(&done), self.ttl).await? {
            tracing::warn!("an idempotency claim expired before its publish was confirmed; its answer is not stored");
        }
        Ok(())
    }

    async fn unsettle(
        &self,
        key: &str,
        token: &str,
        fingerprint: &str,
        job_id: &str,
    ) -> Result<(), StoreError> {
        let unsettled = RedisValue::Unsettled {
            fp: fingerprint.to_owned(),
            job_id: job_id.to_owned(),
        };
        if !self.swap(key, token, Some(&unsettled), self.ttl).await? {
            tracing::warn!(
                "an idempotency claim expired before its publish failed; its job id is not kept"
            );
        }
        Ok(())
    }

    async fn release(&self, key: &str, token: &str) {
        // The token is the claim's value: it says whether an earlier id must be kept.
        let next = match serde_json::from_str::<RedisValue>(token) {
            Ok(RedisValue::Pending {
                fp,
                job_id: Some(job_id),
                ..
            }) => Some(RedisValue::Unsettled { fp, job_id }),
            _ => None,
        };
        if let Err(error) = self.swap(key, token, next.as_ref(), self.ttl).await {
            tracing::warn!(%error, "could not release an idempotency key; it expires with its claim");
        }
    }

    fn describe(&self) -> String {
        format!("redis {} (ttl {:?})", self.url, self.ttl)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::body::Body;
    use axum::http::Request;
    use jobgate_shared::broker::{PublishError, Publisher};
    use jobgate_shared::job::JobMeta;
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;
    use crate::startup::app;
    use crate::state::AppState;

    /// Publishes after a delay; fails while `fail` is set.
    #[derive(Default)]
    struct SlowPublisher {
        published: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Publisher for SlowPublisher {
        async fn publish_to(&self, _: &str, _: &JobMeta, _: &[u8]) -> Result<(), PublishError> {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(PublishError::Unavailable);
            }
            self.published.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn is_ready(&self) -> bool {
            true
        }
        async fn close(&self) {}
    }

    fn state(publisher: &Arc<SlowPublisher>, ttl: Duration) -> AppState {
        AppState::new(
            Arc::clone(publisher) as _,
            vec!["q".into(), "r".into()],
            1024,
        )
        .with_idempotency(Arc::new(MemoryStore::new(ttl, 100)), Duration::from_secs(5))
    }

    async fn post(
        state: &AppState,
        path: &str,
        key: &str,
        body: &'static str,
    ) -> (StatusCode, HeaderMap, Value) {
        let request = Request::post(path)
            .header(HEADER, key)
            .body(Body::from(body))
            .unwrap();
        crate::test_support::send(app(state.clone()), request).await
    }

    #[tokio::test]
    async fn repeat_replays_and_another_body_is_422() {
        let publisher = Arc::new(SlowPublisher::default());
        let state = state(&publisher, DEFAULT_TTL);
        let (status, headers, first) = post(&state, "/jobs/q", "k-1", "a").await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(!headers.contains_key(REPLAYED));
        let (status, headers, again) = post(&state, "/jobs/q", "k-1", "a").await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(headers[REPLAYED], "true");
        assert_eq!(again, first);
        assert_eq!(publisher.published.load(Ordering::SeqCst), 1);
        let (status, headers, json) = post(&state, "/jobs/q", "k-1", "b").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(json["type"], "urn:jobgate:problem:idempotency-key-reused");
        // Same body, other queue: another request too.
        let (status, _, _) = post(&state, "/jobs/r", "k-1", "a").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        // POST /jobs targets q: same request.
        let (status, headers, _) = post(&state, "/jobs", "k-1", "a").await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(headers[REPLAYED], "true");
        assert_eq!(publisher.published.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn bad_keys_are_400() {
        let publisher = Arc::new(SlowPublisher::default());
        let state = state(&publisher, DEFAULT_TTL);
        let long = "x".repeat(256);
        for key in ["", "a b", "é", long.as_str()] {
            let request = Request::post("/jobs/q")
                .header(HEADER, HeaderValue::from_bytes(key.as_bytes()).unwrap())
                .body(Body::from("a"))
                .unwrap();
            let response = app(state.clone()).oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{key:?}");
        }
        let ok = "x".repeat(255);
        let request = Request::post("/jobs/q")
            .header(HEADER, ok)
            .body(Body::from("a"))
            .unwrap();
        let response = app(state.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(publisher.published.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_publish_once() {
        let publisher = Arc::new(SlowPublisher::default());
        let state = state(&publisher, DEFAULT_TTL);
        let answers =
            futures::future::join_all((0..10).map(|_| post(&state, "/jobs/q", "same", "a"))).await;
        let mut ids = std::collections::BTreeSet::new();
        let mut replayed = 0;
        for (status, headers, json) in answers {
            assert_eq!(status, StatusCode::ACCEPTED);
            replayed += usize::from(headers.contains_key(REPLAYED));
            ids.insert(json["job_id"].as_str().unwrap().to_owned());
        }
        assert_eq!(ids.len(), 1);
        assert_eq!(replayed, 9);
        assert_eq!(publisher.published.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn failure_releases_the_key() {
        let publisher = Arc::new(SlowPublisher::default());
        let state = state(&publisher, DEFAULT_TTL);
        publisher.fail.store(true, Ordering::SeqCst);
        let (status, _, _) = post(&state, "/jobs/q", "k", "a").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        publisher.fail.store(false, Ordering::SeqCst);
        let (status, headers, _) = post(&state, "/jobs/q", "k", "a").await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(!headers.contains_key(REPLAYED));
        assert_eq!(publisher.published.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn answers_expire_after_the_ttl_and_the_store_stays_bounded() {
        let publisher = Arc::new(SlowPublisher::default());
        let state = state(&publisher, Duration::from_millis(300));
        post(&state, "/jobs/q", "k", "a").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (status, headers, _) = post(&state, "/jobs/q", "k", "b").await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(!headers.contains_key(REPLAYED));
        assert_eq!(publisher.published.load(Ordering::SeqCst), 2);

        let store = MemoryStore::new(DEFAULT_TTL, 3);
        for i in 0..10 {
            let key = format!("k{i}");
            let Claim::Acquired { token, .. } =
                store.claim(&key, "f", Duration::ZERO).await.unwrap()
            else {
                panic!("claimed")
            };
            store.complete(&key, &token, "f", "{}").await.unwrap();
        }
        assert!(store.len().await <= 3);
    }

    #[tokio::test]
    async fn redis_down_is_503_with_a_key_and_nothing_without_one() {
        let publisher = Arc::new(SlowPublisher::default());
        let url: SecretUrl = "redis://:pw@127.0.0.1:1".parse().unwrap();
        let store = RedisStore::new(
            &url,
            DEFAULT_TTL,
            Duration::from_secs(5),
            Duration::from_millis(500),
        )
        .unwrap();
        assert!(!store.describe().contains("pw"));
        let state = AppState::new(Arc::clone(&publisher) as _, vec!["q".into()], 1024)
            .with_idempotency(Arc::new(store), Duration::from_secs(5));
        let started = Instant::now();
        let (status, headers, json) = post(&state, "/jobs/q", "k", "a").await;
        assert!(started.elapsed() < Duration::from_secs(5), "no hang");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key("retry-after"));
        assert_eq!(
            json["type"],
            "urn:jobgate:problem:idempotency-store-unavailable"
        );
        assert_eq!(publisher.published.load(Ordering::SeqCst), 0);
        let request = Request::post("/jobs/q").body(Body::from("a")).unwrap();
        let response = app(state).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn keys_are_scoped_per_api_key() {
        use crate::auth::{ApiKeys, Security};
        let publisher = Arc::new(SlowPublisher::default());
        let state = state(&publisher, DEFAULT_TTL).with_security(Arc::new(Security::new(
            Some(ApiKeys::new(["k1", "k2"])),
            None,
        )));
        let send = |api_key: &'static str| {
            let request = Request::post("/jobs/q")
                .header("authorization", format!("Bearer {api_key}"))
                .header(HEADER, "shared")
                .body(Body::from("a"))
                .unwrap();
            let app = app(state.clone());
            async move {
                let response = app.oneshot(request).await.unwrap();
                (response.status(), response.headers().contains_key(REPLAYED))
            }
        };
        assert_eq!(send("k1").await, (StatusCode::ACCEPTED, false));
        assert_eq!(send("k2").await, (StatusCode::ACCEPTED, false));
        assert_eq!(send("k1").await, (StatusCode::ACCEPTED, true));
        assert_eq!(publisher.published.load(Ordering::SeqCst), 2);
    }

    /// Fails the first publish with `first_error` (after a delay); records every job id.
    struct Recording {
        ids: std::sync::Mutex<Vec<String>>,
        first_error: std::sync::Mutex<Option<PublishError>>,
        delay: Duration,
    }

    impl Recording {
        fn new(first_error: Option<PublishError>, delay: Duration) -> Arc<Self> {
            Arc::new(Self {
                ids: std::sync::Mutex::default(),
                first_error: std::sync::Mutex::new(first_error),
                delay,
            })
        }
        fn ids(&self) -> Vec<String> {
            self.ids.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl Publisher for Recording {
        async fn publish_to(&self, _: &str, meta: &JobMeta, _: &[u8]) -> Result<(), PublishError> {
            tokio::time::sleep(self.delay).await;
            self.ids.lock().unwrap().push(meta.id.clone());
            match self.first_error.lock().unwrap().take() {
                Some(error) => Err(error),
                None => Ok(()),
            }
        }
        fn is_ready(&self) -> bool {
            true
        }
        async fn close(&self) {}
    }

    fn recording_state(publisher: &Arc<Recording>) -> AppState {
        AppState::new(Arc::clone(publisher) as _, vec!["q".into()], 1024).with_idempotency(
            Arc::new(MemoryStore::new(DEFAULT_TTL, 100)),
            Duration::from_secs(5),
        )
    }

    #[tokio::test]
    async fn after_an_ambiguous_failure_a_retry_with_the_key_republishes_the_same_job_id() {
        for ambiguous in [
            PublishError::Timeout(Duration::from_secs(5)),
            PublishError::Unconfirmed("connection reset".into()),
        ] {
            let publisher = Recording::new(Some(ambiguous), Duration::ZERO);
            let state = recording_state(&publisher);
            let (status, _, json) = post(&state, "/jobs/q", "k", "a").await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            let detail = json["detail"].as_str().unwrap();
            assert!(
                detail.contains("may have been queued; retry with the same Idempotency-Key"),
                "{detail}"
            );
            let (status, headers, json) = post(&state, "/jobs/q", "k", "a").await;
            assert_eq!(status, StatusCode::ACCEPTED);
            assert!(!headers.contains_key(REPLAYED));
            let ids = publisher.ids();
            assert_eq!(ids.len(), 2, "published again");
            assert_eq!(ids[0], ids[1], "under the same job id");
            assert_eq!(json["job_id"], ids[0].as_str());
            // Another body is still another request.
            let (status, _, _) = post(&state, "/jobs/q", "k", "b").await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        }
        // A clear failure (nothing queued) leaves no id behind: a new one next time.
        let publisher = Recording::new(Some(PublishError::Nacked), Duration::ZERO);
        let state = recording_state(&publisher);
        let (_, _, json) = post(&state, "/jobs/q", "k", "a").await;
        assert!(json["detail"]
            .as_str()
            .unwrap()
            .contains("Nothing was queued"));
        post(&state, "/jobs/q", "k", "a").await;
        let ids = publisher.ids();
        assert_ne!(ids[0], ids[1]);
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_mid_publish_still_gets_its_answer_stored() {
        let publisher = Recording::new(None, Duration::from_millis(300));
        let state = recording_state(&publisher);
        let request = Request::post("/jobs/q")
            .header(HEADER, "k")
            .body(Body::from("a"))
            .unwrap();
        // The client goes away while the broker has not confirmed yet.
        let cut = tokio::time::timeout(
            Duration::from_millis(50),
            app(state.clone()).oneshot(request),
        )
        .await;
        assert!(cut.is_err(), "the request was cut off");
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The publish went on, and its answer is what the retry gets.
        let (status, headers, json) = post(&state, "/jobs/q", "k", "a").await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(headers[REPLAYED], "true");
        assert_eq!(
            publisher.ids(),
            vec![json["job_id"].as_str().unwrap().to_owned()]
        );
    }

    #[tokio::test]
    async fn one_api_key_cannot_push_the_others_keys_out_of_the_memory_store() {
        use crate::auth::{ApiKeys, Security};
        let publisher = Arc::new(SlowPublisher::default());
        // 20 keys in all, 2 per API key.
        let state = AppState::new(Arc::clone(&publisher) as _, vec!["q".into()], 1024)
            .with_idempotency(
                Arc::new(MemoryStore::new(DEFAULT_TTL, 20)),
                Duration::from_secs(5),
            )
            .with_security(Arc::new(Security::new(
                Some(ApiKeys::new(["k1", "k2"])),
                None,
            )));
        let send = |api_key: &'static str, key: String| {
            let request = Request::post("/jobs/q")
                .header("authorization", format!("Bearer {api_key}"))
                .header(HEADER, key)
                .body(Body::from("a"))
                .unwrap();
            let app = app(state.clone());
            async move {
                let response = app.oneshot(request).await.unwrap();
                (response.status(), response.headers().contains_key(REPLAYED))
            }
        };
        for i in 0..2 {
            assert_eq!(send("k1", format!("a{i}")).await.0, StatusCode::ACCEPTED);
        }
        // k2 sends many more keys than the store holds...
        let many = (0..30).map(|i| send("k2", format!("b{i}")));
        for (status, _) in futures::future::join_all(many).await {
            assert_eq!(status, StatusCode::ACCEPTED);
        }
        // ...and k1's keys are still there.
        for i in 0..2 {
            assert_eq!(
                send("k1", format!("a{i}")).await,
                (StatusCode::ACCEPTED, true),
                "k1's key a{i} survived"
            );
        }
    }

    #[test]
    fn scopes_keep_tenants_apart() {
        assert_ne!(
            scoped_key(Some(&[1; 32]), "k"),
            scoped_key(Some(&[2; 32]), "k")
        );
        assert_ne!(scoped_key(None, "k"), scoped_key(Some(&[1; 32]), "k"));
        assert_eq!(scoped_key(None, "k"), scoped_key(None, "k"));
        assert_ne!(fingerprint("ab", b"c"), fingerprint("a", b"bc"));
    }
}
