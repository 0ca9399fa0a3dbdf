//! Broker backends behind two small traits.
//!
//! - [`Publisher`]: what the ingress needs. `publish` returns `Ok` only after the broker
//!   confirmed that it durably took the message; every other result is an error that
//!   the ingress turns into a 503.
//! - [`JobSource`]: what a worker needs. It delivers [`Delivery`]s, each carrying a
//!   [`Settle`] handle; the worker settles a delivery only after its outcome is durable,
//!   so a crash at any point means redelivery, never loss.
//!
//! Backends: [`rabbitmq`] (real broker) and [`memory`] (in-process fake for unit tests
//! of routing and worker logic; never used by integration tests).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::job::{Job, JobMeta};

pub mod kafka;
pub mod memory;
pub mod rabbitmq;

/// Name of the dead-letter queue (RabbitMQ queue, Kafka topic) of job queue `queue`.
pub fn dlq_name(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// Why a publish did not end in a broker confirm. None of them means the job was
/// taken; all but [`PublishError::Malformed`] are worth retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("the message broker is not connected")]
    Unavailable,
    #[error("the message broker refused the message")]
    Nacked,
    #[error("the message broker could not route the message to its queue")]
    Unroutable,
    /// The message left the process but no confirm came within the publish timeout:
    /// the broker may have queued it.
    #[error("the message broker did not confirm the message within {0:?}")]
    Timeout(Duration),
    /// The message left the process, then the connection closed before the broker
    /// confirmed it: the broker may have queued it.
    #[error("the connection to the message broker was lost before it confirmed the message: {0}")]
    Unconfirmed(String),
    #[error("the message broker failed: {0}")]
    Broker(String),
    #[error("too many jobs are waiting for the message broker")]
    Overloaded,
    /// The job's metadata cannot be put on the wire (an AMQP short string over 255
    /// bytes, say); nothing was sent, and sending it again will not help.
    #[error("the job cannot be put on the wire: {0}")]
    Malformed(String),
}

impl PublishError {
    /// A sensible `Retry-After` for the client: longer while the broker is away.
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::Unavailable | Self::Timeout(_) => Duration::from_secs(5),
            Self::Nacked
            | Self::Unroutable
            | Self::Unconfirmed(_)
            | Self::Broker(_)
            | Self::Overloaded
            | Self::Malformed(_) => Duration::from_secs(1),
        }
    }

    /// True when the job may have been queued all the same: it left the process and
    /// its fate is unknown. A retry may then queue it twice.
    pub fn may_have_been_queued(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::Unconfirmed(_))
    }
}

/// The ingress side of a broker.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes one job to its queue (`meta.queue`) and waits for the broker's
    /// confirm, at most the configured publish timeout. Many calls may be in flight.
    async fn publish(&self, meta: &JobMeta, body: &[u8]) -> Result<(), PublishError> {
        self.publish_to(&meta.queue, meta, body).await
    }

    /// Publishes one job to `destination` (a retry tier or the dead-letter queue of
    /// `meta.queue`), with the same confirm semantics as [`Publisher::publish`].
    async fn publish_to(
        &self,
        destination: &str,
        meta: &JobMeta,
        body: &[u8],
    ) -> Result<(), PublishError>;

    /// True while the connection is up, the topology is declared and the broker is not
    /// blocking publishers.
    fn is_ready(&self) -> bool;

    /// Closes the broker connection; publishes after this fail with `Unavailable`.
    async fn close(&self);
}

/// Errors while settling a delivery (the broker connection went away, typically).
/// The job is then redelivered by the broker: at least once.
#[derive(Debug, Clone, thiserror::Error)]
#[error("could not settle the delivery: {0}")]
pub struct SettleError(pub String);

/// How a worker tells the broker what became of one delivery.
#[async_trait]
pub trait Settle: Send + Sync + 'static {
    /// The worker is about to run the handler. A source that counts the deliveries
    /// that end without an outcome (Kafka, which has no such count of its own) records
    /// durably here that this one started, so a crash while it runs counts as an
    /// attempt. The default records nothing (RabbitMQ counts by itself).
    async fn started(&self) -> Result<(), SettleError> {
        Ok(())
    }
    /// False when this consumer can no longer settle the delivery and the broker
    /// delivers it to another one instead (Kafka: its partition was revoked since the
    /// fetch): the worker then drops it without running it, instead of running a job
    /// the new owner runs too. The default: always true.
    fn is_current(&self) -> bool {
        true
    }
    /// The job's outcome is durable: remove the delivery for good.
    async fn ack(self: Box<Self>) -> Result<(), SettleError>;
    /// Give the delivery back to the broker for immediate redelivery (only for
    /// deliveries that were never started: a job given back after an attempt would come
    /// straight back).
    async fn requeue(self: Box<Self>) -> Result<(), SettleError>;
    /// Refuse the delivery: the broker dead-letters it to `Q.dlq`.
    async fn reject(self: Box<Self>) -> Result<(), SettleError>;
}

/// One job handed to a worker, with the handle that settles it.
pub struct Delivery {
    pub job: Job,
    pub settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("job", &self.job.meta)
            .finish()
    }
}

/// The worker side of a broker.
#[async_trait]
pub trait JobSource: Send + 'static {
    /// Sends deliveries into `tx` until `stop` is cancelled or `tx` is closed,
    /// reconnecting by itself with backoff. When `stop` fires it cancels its
    /// subscriptions but keeps the connection open, so in-flight deliveries can
    /// still be settled.
    async fn run(&mut self, tx: mpsc::Sender<Delivery>, stop: CancellationToken);

    /// True while the subscription is live.
    fn is_ready(&self) -> bool;

    /// A handle on what the source reports while it runs (subscribed or not, Kafka
    /// consumer lag), to be taken before [`JobSource::run`] moves the source away: the
    /// worker's `/readyz` and `/metrics` read it. The default reports nothing, that is
    /// never subscribed; every source in this crate overrides it.
    fn status(&self) -> SourceStatus {
        SourceStatus::default()
    }

    /// Closes the connection. Deliveries not settled by then go back to the broker.
    async fn close(&mut self);
}

/// What a running [`JobSource`] reports about itself: whether it is subscribed, and on
/// Kafka how far each owned partition is behind. Cloning shares it: the source writes,
/// the worker's probes and metrics read.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    inner: Arc<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    subscribed: AtomicBool,
    /// Messages behind the high watermark, by (queue, partition), for the partitions
    /// this source owns.
    lag: Mutex<BTreeMap<(String, i32), i64>>,
}

impl SourceStatus {
    /// True while the source's subscription is live.
    pub fn is_subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::SeqCst)
    }

    pub fn set_subscribed(&self, subscribed: bool) {
        self.inner.subscribed.store(subscribed, Ordering::SeqCst);
    }

    fn lag(&self) -> MutexGuard<'_, BTreeMap<(String, i32), i64>> {
        self.inner.lag.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the lag of `queue`'s partitions by `partitions` (partition, lag):
    /// partitions not listed are no longer owned and are forgotten.
    pub fn set_queue_lag(&self, queue: &str, partitions: impl IntoIterator<Item = (i32, i64)>) {
        let mut lag = self.lag();
        lag.retain(|(q, _), _| q != queue);
        for (partition, behind) in partitions {
            lag.insert((queue.to_owned(), partition), behind);
        }
    }

    /// Forgets the lag of partitions this source no longer owns (revoked).
    pub fn forget_partitions(&self, partitions: &[(String, i32)]) {
        let mut lag = self.lag();
        for key in partitions {
            lag.remove(key);
        }
    }

    /// Forgets every partition's lag (the source stopped).
    pub fn clear_lag(&self) {
        self.lag().clear();
    }

    /// The lag of every owned partition, as (queue, partition, messages behind).
    pub fn partition_lag(&self) -> Vec<(String, i32, i64)> {
        let lag = self.lag();
        lag.iter().map(|((q, p), n)| (q.clone(), *p, *n)).collect()
    }
}

/// A shared, type-erased publisher.
pub type SharedPublisher = Arc<dyn Publisher>;
