//! The dlq tools on RabbitMQ.
//!
//! - `list`: `basic.get` without auto-ack, up to the limit, on one channel; closing the
//!   channel gives every message back to `Q.dlq` (nothing is acked). While the tool
//!   runs, the messages it holds are "unacked" in the management UI.
//! - `replay`: `basic.get` one message at a time (at most as many as `Q.dlq` held when
//!   it started, so jobs dead-lettered again meanwhile are not picked up twice), publish
//!   it to `Q` through a confirming [`RabbitPublisher`], and only after the confirm
//!   `basic.ack` it. With `--job-id`, other messages are held unacked (a held message
//!   is not handed out again on this channel, so the scan ends) and go back to `Q.dlq`
//!   when the channel closes.
//! - `purge`: `queue.purge` of `Q.dlq` (messages held unacked by someone else stay).
//!
//! Every broker operation is bounded by [`OPERATION_TIMEOUT`].

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::broker::rabbitmq::{self, RabbitPublisher};
use crate::broker::{dlq_name, Publisher};
use crate::job;
use crate::status::StatusStore;
use bytes::Bytes;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};

use super::{
    record_replay, replay_meta, wait_ready, DeadJob, DlqError, DlqSettings, Listing, Result,
    OPERATION_TIMEOUT,
};

/// `x-delivery-count` from which a dead job's return count is worth a warning.
const DELIVERY_COUNT_WARNING: i64 = 10;

/// One connection with one channel to `Q.dlq`.
struct Session {
    conn: Connection,
    channel: Channel,
    dlq: String,
    /// `dlq` as AMQP carries it.
    dlq_name: ShortString,
    /// Messages seen with a high `x-delivery-count`, and the highest count.
    often_returned: AtomicU64,
    max_returns: AtomicI64,
    /// Ready messages at the start, and how many of those taken were acked: the others
    /// go back to `Q.dlq` when the channel closes.
    ready_at_open: u64,
    taken: AtomicU64,
    acked: AtomicU64,
}

/// Runs a lapin operation with [`OPERATION_TIMEOUT`]; errors name the operation.
async fn bounded<T>(what: &str, op: impl Future<Output = lapin::Result<T>>) -> Result<T> {
    match tokio::time::timeout(OPERATION_TIMEOUT, op).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(DlqError::failed(format!("RabbitMQ {what}: {error}"))),
        Err(_) => Err(DlqError::failed(format!(
            "RabbitMQ {what}: no answer within {OPERATION_TIMEOUT:?}"
        ))),
    }
}

impl Session {
    /// Connects, opens a channel and checks that `Q.dlq` exists (a passive declare,
    /// which creates nothing). Returns the session and how many messages `Q.dlq` holds
    /// ready.
    async fn open(settings: &DlqSettings, queue: &str) -> Result<(Self, u64)> {
        let url = settings.broker.amqp();
        let timeout = settings.broker.connect_timeout();
        let name = rabbitmq::connection_name("dlq");
        let mut cursor = rabbitmq::NodeCursor::next_in_process();
        let conn = rabbitmq::connect(&url, &name, timeout, &mut cursor)
            .await
            .map_err(|e| DlqError::failed(format!("cannot connect to RabbitMQ at {url}: {e}")))?;
        let dlq = dlq_name(queue);
        // Queue names are validated (at most 200 characters) before this: a name AMQP
        // cannot carry is a usage error all the same, not a panic.
        let dlq_short =
            job::amqp::short("the queue name", &dlq).map_err(|e| DlqError::Usage(e.to_string()))?;
        let setup = async {
            let channel = bounded("channel.open", conn.create_channel()).await?;
            let passive = QueueDeclareOptions {
                passive: true,
                durable: true,
                ..QueueDeclareOptions::default()
            };
            let declared = tokio::time::timeout(
                OPERATION_TIMEOUT,
                channel.queue_declare(dlq_short.clone(), passive, FieldTable::default()),
            )
            .await;
            let ready = match declared {
                Ok(Ok(q)) => u64::from(q.message_count()),
                Ok(Err(error)) if error.to_string().contains("NOT_FOUND") => {
                    return Err(DlqError::failed(format!(
                        "queue {dlq} does not exist on RabbitMQ at {url} (no producer or consumer has declared queue {queue} yet)"
                    )))
                }
                Ok(Err(error)) => {
                    return Err(DlqError::failed(format!(
                        "RabbitMQ queue.declare {dlq}: {error}"
                    )))
                }
                Err(_) => {
                    return Err(DlqError::failed(format!(
                        "RabbitMQ queue.declare {dlq}: no answer within {OPERATION_TIMEOUT:?}"
                    )))
                }
            };
            Ok((channel, ready))
        };
        match setup.await {
            Ok((channel, ready)) => Ok((
                Self {
                    conn,
                    channel,
                    dlq,
                    dlq_name: dlq_short,
                    often_returned: AtomicU64::new(0),
                    max_returns: AtomicI64::new(0),
                    ready_at_open: ready,
                    taken: AtomicU64::new(0),
                    acked: AtomicU64::new(0),
                },
                ready,
            )),
            Err(error) => {
                close(&conn).await;
                Err(error)
            }
        }
    }

    /// One message of `Q.dlq`, unacked; `None` when it holds no more ready messages.
    async fn get(&self) -> Result<Option<(DeadJob, u64)>> {
        let options = BasicGetOptions { no_ack: false };
        let got = bounded(
            "basic.get",
            self.channel.basic_get(self.dlq_name.clone(), options),
        )
        .await?;
        Ok(got.map(|message| {
            self.taken.fetch_add(1, Ordering::Relaxed);
            let delivery = message.delivery;
            let count = delivery_count(&delivery.properties);
            if count >= DELIVERY_COUNT_WARNING {
                self.often_returned.fetch_add(1, Ordering::Relaxed);
                self.max_returns.fetch_max(count, Ordering::Relaxed);
            }
            let job = DeadJob {
                meta: job::amqp::meta_from(&self.dlq, &delivery.properties, &delivery.data),
                body: Bytes::from(delivery.data),
                position: None,
            };
            (job, delivery.delivery_tag)
        }))
    }

    /// Acknowledges message `tag`: it leaves `Q.dlq`.
    async fn ack(&self, tag: u64) -> Result<()> {
        bounded(
            "basic.ack",
            self.channel.basic_ack(tag, BasicAckOptions::default()),
        )
        .await?;
        self.acked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Closes the channel first (every unacked message goes back to `Q.dlq`), waits
    /// until they are ready again, then closes the connection.
    async fn close(self) {
        // RabbitMQ 4.0 and later drop a quorum-queue message at the queue's delivery
        // limit (20 by default) when it has no dead-letter target, as `Q.dlq` has none.
        let often = self.often_returned.load(Ordering::Relaxed);
        if often > 0 {
            tracing::warn!(
                queue = %self.dlq,
                dead_jobs = often,
                max_delivery_count = self.max_returns.load(Ordering::Relaxed),
                "dead jobs were handed out and returned many times (each `dlq list` counts); RabbitMQ 4 drops a quorum-queue message at its delivery limit (default 20): replay or purge them soon, or raise the limit of the dead-letter queue with a policy"
            );
        }
        let _ = tokio::time::timeout(
            OPERATION_TIMEOUT,
            self.channel.close(200, ShortString::from("done")),
        )
        .await;
        if self.taken.load(Ordering::Relaxed) > self.acked.load(Ordering::Relaxed) {
            let acked = self.acked.load(Ordering::Relaxed);
            self.wait_ready(self.ready_at_open.saturating_sub(acked))
                .await;
        }
        close(&self.conn).await;
    }

    /// Waits (at most [`OPERATION_TIMEOUT`]) until `Q.dlq` holds at least `count` ready
    /// messages (as many as at the start, less those acked). A quorum queue takes the
    /// messages of a closed channel back through its log, after the close is answered:
    /// a `dlq list` right after another would find them neither ready nor its own, and
    /// list nothing. Others may take letters meanwhile: then this waits in vain, and
    /// the listing stands all the same.
    async fn wait_ready(&self, count: u64) {
        let passive = QueueDeclareOptions {
            passive: true,
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let poll = async {
            let channel = self.conn.create_channel().await?;
            loop {
                let declared = channel
                    .queue_declare(self.dlq_name.clone(), passive, FieldTable::default())
                    .await?;
                if u64::from(declared.message_count()) >= count {
                    let _ = channel.close(200, ShortString::from("done")).await;
                    return Ok::<_, lapin::Error>(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        match tokio::time::timeout(OPERATION_TIMEOUT, poll).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(queue = %self.dlq, %error, "cannot see the returned dead jobs")
            }
            Err(_) => tracing::debug!(
                queue = %self.dlq,
                returning = count,
                "the returned dead jobs were not all ready again in time"
            ),
        }
    }
}

/// A message's `x-delivery-count`: how often a quorum queue handed it out and got it
/// back (also the return that `list` causes by closing its channel).
fn delivery_count(properties: &lapin::BasicProperties) -> i64 {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(*n),
            AMQPValue::LongInt(n) => Some(i64::from(*n)),
            AMQPValue::LongUInt(n) => Some(i64::from(*n)),
            AMQPValue::ShortInt(n) => Some(i64::from(*n)),
            AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
            _ => None,
        })
        .unwrap_or(0)
}

async fn close(conn: &Connection) {
    let _ = tokio::time::timeout(
        OPERATION_TIMEOUT,
        conn.close(200, ShortString::from("done")),
    )
    .await;
}

/// Up to `limit` dead jobs, all given back to `Q.dlq`.
pub async fn list(settings: &DlqSettings, queue: &str, limit: usize) -> Result<Listing> {
    let (session, ready) = Session::open(settings, queue).await?;
    let mut listing = Listing {
        jobs: Vec::new(),
        total: Some(ready),
    };
    let fetched = async {
        // Bounded twice: by the limit and by what the queue held at the start.
        while listing.jobs.len() < limit && (listing.jobs.len() as u64) < ready {
            match session.get().await? {
                Some((job, _tag)) => listing.jobs.push(job),
                None => break,
            }
        }
        Ok::<_, DlqError>(())
    }
    .await;
    session.close().await;
    fetched.map(|()| listing)
}

/// Replays up to `limit` dead jobs (only those with `job_id`, when given) to `queue`.
pub async fn replay(
    settings: &DlqSettings,
    queue: &str,
    limit: usize,
    job_id: Option<&str>,
    status: Option<&StatusStore>,
) -> Result<u64> {
    let (session, ready) = Session::open(settings, queue).await?;
    let publisher = RabbitPublisher::start(rabbitmq::PublisherOptions {
        endpoint: settings.broker.amqp(),
        queues: vec![queue.to_owned()],
        connect_timeout: settings.broker.connect_timeout(),
        publish_timeout: settings.publish_timeout,
        channels: 1,
        retry_tiers: settings.retry_tiers.clone(),
    });
    let mut replayed = 0u64;
    let result = async {
        wait_ready(publisher.as_ref(), "the RabbitMQ publisher").await?;
        let mut seen = 0u64;
        while (replayed as usize) < limit && seen < ready {
            let Some((dead, tag)) = session.get().await? else {
                break;
            };
            seen += 1;
            if job_id.is_some_and(|id| id != dead.meta.id) {
                // Held unacked: it goes back to Q.dlq when the channel closes.
                continue;
            }
            let meta = replay_meta(&dead.meta, queue);
            publisher
                .publish(&meta, &dead.body)
                .await
                .map_err(|error| {
                    DlqError::failed(format!(
                        "could not publish dead job {} to {queue}: {error}; it stays in {}",
                        meta.id, session.dlq
                    ))
                })?;
            record_replay(status, &meta).await;
            // Confirmed in Q: now it may leave Q.dlq.
            session.ack(tag).await?;
            replayed += 1;
            tracing::info!(job_id = %meta.id, %queue, "dead job replayed");
        }
        Ok::<_, DlqError>(())
    }
    .await;
    session.close().await;
    publisher.close().await;
    match result {
        Ok(()) => Ok(replayed),
        Err(DlqError::Failed(message)) if replayed > 0 => Err(DlqError::Failed(format!(
            "{message} ({replayed} dead jobs were replayed before this error)"
        ))),
        Err(error) => Err(error),
    }
}

/// Removes every ready message of `Q.dlq`; returns how many.
pub async fn purge(settings: &DlqSettings, queue: &str) -> Result<u64> {
    let (session, _ready) = Session::open(settings, queue).await?;
    let purged = bounded(
        "queue.purge",
        session
            .channel
            .queue_purge(session.dlq_name.clone(), QueuePurgeOptions::default()),
    )
    .await;
    session.close().await;
    purged.map(u64::from)
}
