//! What request handlers share.

use std::sync::Arc;

use jobgate_shared::broker::SharedPublisher;
use jobgate_shared::status::StatusStore;
use tokio_util::sync::CancellationToken;

use crate::auth::Security;
use crate::idempotency::{MemoryStore, SharedStore};
use crate::in_flight::{InFlightLimit, DEFAULT_MAX_IN_FLIGHT};
use crate::metrics::{Metered, ProducerMetrics};

/// Default of `JOBGATE_MAX_BATCH_ITEMS`.
pub const DEFAULT_MAX_BATCH_ITEMS: usize = 1000;
/// Default of `JOBGATE_MAX_BATCH_BYTES` (10 MiB).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 10 * 1024 * 1024;

/// Default of `JOBGATE_BATCH_IN_FLIGHT_PERCENT`.
pub const DEFAULT_BATCH_IN_FLIGHT_PERCENT: u8 = 50;
/// Default of `JOBGATE_MAX_BATCH_HEADER_BYTES` (1 MiB).
pub const DEFAULT_MAX_BATCH_HEADER_BYTES: usize = 1024 * 1024;
/// Default of `JOBGATE_BODY_READ_TIMEOUT_MS`.
pub const DEFAULT_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Shared by every request: one `Arc`, so that the clone axum makes for each layer and
/// handler of a request is one reference-count increment (the profile under load showed
/// cloning and dropping a dozen separate fields at about 1.6 % of the producer's CPU).
/// The fields are read through `Deref`; the `with_*` builders write them before the state
/// is shared.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
#[derive(Clone)]
pub struct Shared {
    /// The broker publisher behind the in-flight limit (`JOBGATE_MAX_IN_FLIGHT`).
    pub publisher: SharedPublisher,
    /// The same publisher, typed: its permits.
    in_flight: Arc<InFlightLimit>,
    /// The allow-list; the first queue is the default target.
    pub queues: Arc<[String]>,
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive (`JOBGATE_BODY_READ_TIMEOUT_MS`).
    pub body_read_timeout: std::time::Duration,
    /// Most jobs in one batch request.
    pub max_batch_items: usize,
    /// Largest batch request body, in bytes.
    pub max_batch_bytes: usize,
    /// Largest share (percent) of the in-flight permits one batch may hold at once.
    pub batch_in_flight_percent: u8,
    /// Most `X-Job-*` (and trace-context) header bytes a batch may copy onto its jobs:
    /// their size times the items.
    pub max_batch_header_bytes: usize,
    /// Cancelled when shutdown begins: new jobs are refused, readiness turns false.
    pub draining: CancellationToken,
    /// API keys and rate limit in front of the routes (off unless configured).
    pub security: Arc<Security>,
    /// Where `Idempotency-Key`s live (memory unless `JOBGATE_REDIS_URL` is set).
    pub idempotency: SharedStore,
    /// How long a request waits for another one holding its idempotency key.
    pub idempotency_wait: std::time::Duration,
    /// What `GET /metrics` serves; the publisher records into it.
    pub metrics: Arc<ProducerMetrics>,
    /// Job status (`JOBGATE_REDIS_URL`); none: the status routes answer 501.
    pub status: Option<StatusStore>,
    /// How far ahead a job may be scheduled (`JOBGATE_SCHEDULE_MAX`).
    pub schedule_max: std::time::Duration,
    /// `JOBGATE_CALLBACK_ALLOW`: the hosts a `Jobgate-Callback` may name; none: callbacks
    /// are refused.
    pub callback_allow: Option<jobgate_shared::callback::CallbackAllow>,
    /// The console's broker views and dead-letter settings (none: its API answers 501).
    pub console: Option<Arc<crate::console::Console>>,
}

impl AppState {
    pub fn new(publisher: SharedPublisher, queues: Vec<String>, max_body_bytes: usize) -> Self {
        let metrics = Arc::new(ProducerMetrics::new());
        // The limit refuses before the metered publisher: in-flight counts real publishes.
        let metered: SharedPublisher = Arc::new(Metered::new(publisher, Arc::clone(&metrics)));
        let in_flight = Arc::new(InFlightLimit::new(metered, DEFAULT_MAX_IN_FLIGHT));
        Self(Arc::new(Shared {
            publisher: Arc::clone(&in_flight) as SharedPublisher,
            in_flight,
            queues: queues.into(),
            max_body_bytes,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_batch_items: DEFAULT_MAX_BATCH_ITEMS,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            batch_in_flight_percent: DEFAULT_BATCH_IN_FLIGHT_PERCENT,
            max_batch_header_bytes: DEFAULT_MAX_BATCH_HEADER_BYTES,
            draining: CancellationToken::new(),
            security: Arc::new(Security::off()),
            idempotency: Arc::new(MemoryStore::new(
                crate::idempotency::DEFAULT_TTL,
                crate::idempotency::DEFAULT_MAX_ENTRIES,
            )),
            idempotency_wait: std::time::Duration::from_secs(6),
            metrics,
            status: None,
            schedule_max: crate::job_options::DEFAULT_SCHEDULE_MAX,
            callback_allow: None,
            console: None,
        }))
    }

    /// The fields, to set while building (a copy only if the state is already shared).
    fn shared_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.0)
    }

    /// Sets the console (off by default).
    #[must_use]
    pub fn with_console(mut self, console: crate::console::Console) -> Self {
        self.shared_mut().console = Some(Arc::new(console));
        self
    }

    /// Sets the API keys and rate limit (off by default).
    #[must_use]
    pub fn with_security(mut self, security: Arc<Security>) -> Self {
        self.shared_mut().security = security;
        self
    }

    /// Sets the idempotency store; a request finding its key held waits at most
    /// `publish_timeout` and a second for the holder's outcome.
    #[must_use]
    pub fn with_idempotency(
        mut self,
        store: SharedStore,
        publish_timeout: std::time::Duration,
    ) -> Self {
        self.shared_mut().idempotency = store;
        self.shared_mut().idempotency_wait = publish_timeout + std::time::Duration::from_secs(1);
        self
    }

    /// Sets the job status store (none by default).
    #[must_use]
    pub fn with_status(mut self, store: Option<StatusStore>) -> Self {
        self.shared_mut().status = store;
        self
    }

    /// Sets how far ahead a job may be scheduled (default
    /// [`crate::job_options::DEFAULT_SCHEDULE_MAX`]).
    #[must_use]
    pub fn with_schedule_max(mut self, horizon: std::time::Duration) -> Self {
        self.shared_mut().schedule_max = horizon;
        self
    }

    /// Sets the hosts completion callbacks may go to (none by default: callbacks off).
    #[must_use]
    pub fn with_callback_allow(
        mut self,
        allow: Option<jobgate_shared::callback::CallbackAllow>,
    ) -> Self {
        self.shared_mut().callback_allow = allow;
        self
    }

    /// Sets the batch limits (the defaults are those of the configuration).
    #[must_use]
    pub fn with_batch_limits(mut self, max_items: usize, max_bytes: usize) -> Self {
        self.shared_mut().max_batch_items = max_items;
        self.shared_mut().max_batch_bytes = max_bytes;
        self
    }

    /// Sets what one batch may take: `percent` of the in-flight permits at once, and
    /// `max_header_bytes` of metadata headers times its items.
    #[must_use]
    pub fn with_batch_fairness(mut self, percent: u8, max_header_bytes: usize) -> Self {
        self.shared_mut().batch_in_flight_percent = percent.clamp(1, 100);
        self.shared_mut().max_batch_header_bytes = max_header_bytes;
        self
    }

    /// Publishes one batch may have waiting for the broker at once (at least 1).
    pub fn batch_in_flight_cap(&self) -> usize {
        (self.in_flight.max() * usize::from(self.batch_in_flight_percent) / 100).max(1)
    }

    /// Sets the body-read timeout (default [`DEFAULT_BODY_READ_TIMEOUT`]).
    #[must_use]
    pub fn with_body_read_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.shared_mut().body_read_timeout = timeout;
        self
    }

    /// Sets the in-flight limit (default [`DEFAULT_MAX_IN_FLIGHT`]).
    #[must_use]
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        let inner = Arc::clone(self.in_flight.inner());
        self.shared_mut().in_flight = Arc::new(InFlightLimit::new(inner, max));
        self.shared_mut().publisher = Arc::clone(&self.in_flight) as SharedPublisher;
        self
    }

    /// Publishes that could start now without hitting the in-flight limit.
    pub fn in_flight_available(&self) -> usize {
        self.in_flight.available()
    }

    pub fn accepts(&self, queue: &str) -> bool {
        self.queues.iter().any(|q| q == queue)
    }

    pub fn default_queue(&self) -> &str {
        &self.queues[0]
    }
}
