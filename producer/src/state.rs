//! What request handlers share.

use std::sync::Arc;

use jobgate_shared::broker::SharedPublisher;
use tokio_util::sync::CancellationToken;

/// Shared by every request; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub publisher: SharedPublisher,
    /// The allow-list; the first queue is the default target.
    pub queues: Arc<[String]>,
    pub max_body_bytes: usize,
    /// Cancelled when shutdown begins: new jobs are refused, readiness turns false.
    pub draining: CancellationToken,
}

impl AppState {
    pub fn new(publisher: SharedPublisher, queues: Vec<String>, max_body_bytes: usize) -> Self {
        Self {
            publisher,
            queues: queues.into(),
            max_body_bytes,
            draining: CancellationToken::new(),
        }
    }

    pub fn accepts(&self, queue: &str) -> bool {
        self.queues.iter().any(|q| q == queue)
    }

    pub fn default_queue(&self) -> &str {
        &self.queues[0]
    }
}
