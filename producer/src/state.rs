//! What request handlers share.

use std::sync::Arc;

use jobgate_shared::broker::SharedPublisher;
use tokio_util::sync::CancellationToken;

use crate::auth::Security;

/// Default of `JOBGATE_MAX_BATCH_ITEMS`.
pub const DEFAULT_MAX_BATCH_ITEMS: usize = 1000;
/// Default of `JOBGATE_MAX_BATCH_BYTES` (10 MiB).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 10 * 1024 * 1024;

/// Shared by every request; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub publisher: SharedPublisher,
    /// The allow-list; the first queue is the default target.
    pub queues: Arc<[String]>,
    pub max_body_bytes: usize,
    /// Most jobs in one batch request.
    pub max_batch_items: usize,
    /// Largest batch request body, in bytes.
    pub max_batch_bytes: usize,
    /// Cancelled when shutdown begins: new jobs are refused, readiness turns false.
    pub draining: CancellationToken,
    /// API keys and rate limit in front of the routes (off unless configured).
    pub security: Arc<Security>,
}

impl AppState {
    pub fn new(publisher: SharedPublisher, queues: Vec<String>, max_body_bytes: usize) -> Self {
        Self {
            publisher,
            queues: queues.into(),
            max_body_bytes,
            max_batch_items: DEFAULT_MAX_BATCH_ITEMS,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            draining: CancellationToken::new(),
            security: Arc::new(Security::off()),
        }
    }

    /// Sets the API keys and rate limit (off by default).
    #[must_use]
    pub fn with_security(mut self, security: Arc<Security>) -> Self {
        self.security = security;
        self
    }

    /// Sets the batch limits (the defaults are those of the configuration).
    #[must_use]
    pub fn with_batch_limits(mut self, max_items: usize, max_bytes: usize) -> Self {
        self.max_batch_items = max_items;
        self.max_batch_bytes = max_bytes;
        self
    }

    pub fn accepts(&self, queue: &str) -> bool {
        self.queues.iter().any(|q| q == queue)
    }

    pub fn default_queue(&self) -> &str {
        &self.queues[0]
    }
}
