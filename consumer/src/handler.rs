//! The API for job processors.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use jobgate_shared::job::Job;

/// What became of one attempt at a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Finished; the job is removed from the queue.
    Done,
    /// Finished with a result: like `Done`, and with a job status store configured
    /// (`JOBGATE_REDIS_URL`) the result is kept in the job's status (at most 64 KiB;
    /// `GET /jobs/{queue}/{job_id}` shows it).
    DoneWith(Bytes),
    /// A transient failure: try again later (after `delay`, if given).
    Retry {
        reason: String,
        delay: Option<Duration>,
    },
    /// A permanent failure: the job goes to the dead-letter queue with `reason`.
    Dead { reason: String },
}

impl Outcome {
    /// `Done` or `DoneWith`.
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Done | Self::DoneWith(_))
    }
}

/// A job processor. Implementations must be idempotent on `job.meta.id`: delivery is
/// at least once, so a job can arrive again after a crash or a lost connection.
///
/// A panic inside `handle` is a failed attempt, never a dead worker.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, job: &Job) -> Outcome;
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for std::sync::Arc<H> {
    async fn handle(&self, job: &Job) -> Outcome {
        (**self).handle(job).await
    }
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Box<H> {
    async fn handle(&self, job: &Job) -> Outcome {
        (**self).handle(job).await
    }
}
