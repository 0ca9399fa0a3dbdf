//! An in-memory fake broker for unit tests of routing and worker logic.
//! It keeps every published job and every settlement so tests can assert on them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::{Delivery, JobSource, PublishError, Publisher, Settle, SettleError, SourceStatus};
use crate::job::{Job, JobMeta};

/// What became of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Acked,
    Requeued,
    Rejected,
}

#[derive(Default)]
struct State {
    queued: VecDeque<Job>,
    published: Vec<(String, Job)>,
    settled: Vec<(String, Settlement)>,
    /// The next `n` publishes fail with this error.
    failing_publishes: Option<(usize, PublishError)>,
}

/// A fake broker: a publisher and a source over one in-process queue.
#[derive(Clone)]
pub struct MemoryBroker {
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
    /// Readiness of both sides: "subscribed" for the source, "connected" for the
    /// publisher.
    status: SourceStatus,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    pub fn new() -> Self {
        let status = SourceStatus::default();
        status.set_subscribed(true);
        Self {
            state: Arc::new(Mutex::new(State::default())),
            arrived: Arc::new(Notify::new()),
            status,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next publish fail with `error`.
    pub fn fail_next_publish(&self, error: PublishError) {
        self.fail_publishes(1, error);
    }

    /// Makes the next `n` publishes fail with `error`.
    pub fn fail_publishes(&self, n: usize, error: PublishError) {
        self.lock().failing_publishes = Some((n, error));
    }

    /// Sets what `is_ready` answers, and whether the source reports itself subscribed.
    pub fn set_ready(&self, ready: bool) {
        self.status.set_subscribed(ready);
    }

    /// Puts a job on the queue as if a producer had published it.
    pub fn enqueue(&self, job: Job) {
        self.lock().queued.push_back(job);
        self.arrived.notify_one();
    }

    /// Every job published to its own queue so far.
    pub fn published(&self) -> Vec<Job> {
        let state = self.lock();
        let own = state
            .published
            .iter()
            .filter(|(to, job)| *to == job.meta.queue);
        own.map(|(_, job)| job.clone()).collect()
    }

    /// Every job published so far, with its destination (retry tier, DLQ, queue).
    pub fn published_to(&self) -> Vec<(String, Job)> {
        self.lock().published.clone()
    }

    /// Every settlement so far, as (job id, settlement).
    pub fn settled(&self) -> Vec<(String, Settlement)> {
        self.lock().settled.clone()
    }
}

#[async_trait]
impl Publisher for MemoryBroker {
    /// Jobs published to their own queue are queued for the source; others (retry
    /// tiers, DLQ) are only recorded.
    async fn publish_to(
        &self,
        destination: &str,
        meta: &JobMeta,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let job = Job {
            meta: meta.clone(),
            body: Bytes::copy_from_slice(body),
        };
        {
            let mut state = self.lock();
            if let Some((n, error)) = state.failing_publishes.take() {
                if n > 1 {
                    state.failing_publishes = Some((n - 1, error.clone()));
                }
                return Err(error);
            }
            state.published.push((destination.to_owned(), job.clone()));
        }
        if destination == meta.queue {
            self.enqueue(job);
        }
        Ok(())
    }

    fn is_ready(&self) -> bool {
        self.status.is_subscribed()
    }

    async fn close(&self) {
        self.set_ready(false);
    }
}

struct MemorySettle {
    broker: MemoryBroker,
    job: Job,
}

impl MemorySettle {
    fn record(self, settlement: Settlement) {
        self.broker
            .lock()
            .settled
            .push((self.job.meta.id.clone(), settlement));
        if settlement == Settlement::Requeued {
            self.broker.enqueue(self.job);
        }
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(self: Box<Self>) -> Result<(), SettleError> {
        self.record(Settlement::Acked);
        Ok(())
    }
    async fn requeue(self: Box<Self>) -> Result<(), SettleError> {
        self.record(Settlement::Requeued);
        Ok(())
    }
    async fn reject(self: Box<Self>) -> Result<(), SettleError> {
        self.record(Settlement::Rejected);
        Ok(())
    }
}

#[async_trait]
impl JobSource for MemoryBroker {
    async fn run(&mut self, tx: mpsc::Sender<Delivery>, stop: CancellationToken) {
        loop {
            let next = self.lock().queued.pop_front();
            let Some(job) = next else {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.arrived.notified() => continue,
                }
            };
            let delivery = Delivery {
                job: job.clone(),
                settle: Box::new(MemorySettle {
                    broker: self.clone(),
                    job,
                }),
            };
            tokio::select! {
                () = stop.cancelled() => return,
                sent = tx.send(delivery) => if sent.is_err() { return },
            }
        }
    }

    fn is_ready(&self) -> bool {
        self.status.is_subscribed()
    }

    fn status(&self) -> SourceStatus {
        self.status.clone()
    }

    async fn close(&mut self) {}
}
