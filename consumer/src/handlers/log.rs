use std::time::Duration;

use async_trait::async_trait;
use jobgate_shared::job::Job;

use crate::handler::{Handler, Outcome};

/// Logs each job (id, queue, attempt, body size) and succeeds, optionally after a
/// pretend amount of work.
#[derive(Debug, Clone, Default)]
pub struct LogHandler {
    delay: Duration,
}

impl LogHandler {
    pub fn new(delay: Duration) -> Self {
        Self { delay }
    }
}

#[async_trait]
impl Handler for LogHandler {
    async fn handle(&self, job: &Job) -> Outcome {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        tracing::info!(
            job_id = %job.meta.id,
            queue = %job.meta.queue,
            attempt = job.meta.attempt,
            bytes = job.body.len(),
            content_type = job.meta.content_type.as_deref().unwrap_or(""),
            "job processed"
        );
        Outcome::Done
    }
}
