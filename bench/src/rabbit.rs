//! RabbitMQ side of the bench: lapin with jobgate's settings, without jobgate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use jobgate_shared::broker::rabbitmq::{
    self, declare_topology, AmqpEndpoint, NodeCursor, RabbitPublisher,
};
use jobgate_shared::broker::{dlq_name, Publisher};
use jobgate_shared::config::SecretUrl;
use jobgate_shared::job::{self, JobMeta};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};

use crate::load::Op;
use crate::report::Phase;
use crate::stats::per_second;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A connection for setup, probes and cleanup.
pub struct Rabbit {
    url: AmqpEndpoint,
    conn: Connection,
    admin: Channel,
}

async fn bounded<T>(
    what: &str,
    op: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(TIMEOUT, op).await {
        Ok(r) => r.with_context(|| what.to_owned()),
        Err(_) => bail!("{what}: no answer within {TIMEOUT:?}"),
    }
}

impl Rabbit {
    pub async fn connect(url: &str) -> Result<Self> {
        let url = AmqpEndpoint::from(url.parse::<SecretUrl>().expect("infallible"));
        let conn = rabbitmq::connect(
            &url,
            "jobgate-bench",
            TIMEOUT,
            &mut NodeCursor::next_in_process(),
        )
        .await
        .map_err(|e| anyhow!("cannot connect to RabbitMQ at {url}: {e}"))?;
        let admin = bounded("channel.open", conn.create_channel()).await?;
        Ok(Self { url, conn, admin })
    }

    /// Declares `queue` (and its dead-letter queue) exactly as jobgate does.
    pub async fn declare(&self, queue: &str) -> Result<()> {
        declare_topology(&self.conn, queue, &[])
            .await
            .map_err(|e| anyhow!("{e}"))
    }

    /// Deletes queues (missing ones are fine). A failed delete closes the channel, so
    /// each uses a fresh one.
    pub async fn delete(&self, queues: &[String]) -> Result<()> {
        for q in queues {
            let channel = bounded("channel.open", self.conn.create_channel()).await?;
            let _ = bounded(
                "queue.delete",
                channel.queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default()),
            )
            .await;
            let _ = channel.close(200, ShortString::from("done")).await;
        }
        Ok(())
    }

    /// Jobs ready in `queue` (not counting those delivered and not yet acked).
    pub async fn ready(&self, queue: &str) -> Result<u64> {
        Ok(u64::from(self.inspect(queue).await?.message_count()))
    }

    /// The queue's counts, as a passive declare reports them.
    async fn inspect(&self, queue: &str) -> Result<lapin::Queue> {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        bounded(
            "queue.declare passive",
            self.admin
                .queue_declare(ShortString::from(queue), options, FieldTable::default()),
        )
        .await
    }

    /// Consumers subscribed to `queue` now.
    pub async fn consumers(&self, queue: &str) -> Result<u64> {
        Ok(u64::from(self.inspect(queue).await?.consumer_count()))
    }

    /// Raw publishes with confirms, spread round-robin over `channels` confirm channels
    /// of one new connection: what jobgate's publisher does, minus jobgate.
    pub async fn raw_publish_op(
        &self,
        queue: &str,
        channels: usize,
        body: &'static str,
    ) -> Result<Op> {
        let conn = rabbitmq::connect(
            &self.url,
            "jobgate-bench-publisher",
            TIMEOUT,
            &mut NodeCursor::next_in_process(),
        )
        .await
        .map_err(|e| anyhow!("cannot connect to RabbitMQ: {e}"))?;
        let mut list = Vec::new();
        for _ in 0..channels.max(1) {
            let channel = bounded("channel.open", conn.create_channel()).await?;
            bounded(
                "confirm.select",
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
            list.push(channel);
        }
        let shared = Arc::new((conn, list, AtomicUsize::new(0)));
        let queue = queue.to_owned();
        Ok(Arc::new(move || {
            let shared = Arc::clone(&shared);
            let queue = queue.clone();
            Box::pin(async move {
                let (_conn, channels, next) = &*shared;
                let channel = &channels[next.fetch_add(1, Ordering::Relaxed) % channels.len()];
                let meta = JobMeta::new(queue.as_str(), Some("application/json".into()));
                let properties = job::amqp::properties(&meta).map_err(|e| e.to_string())?;
                let confirm = channel
                    .basic_publish(
                        ShortString::default(),
                        ShortString::from(queue.as_str()),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        body.as_bytes(),
                        properties,
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                if confirm.is_nack() {
                    return Err("nacked".into());
                }
                if confirm.take_message().is_some() {
                    return Err("returned unroutable".into());
                }
                Ok(())
            })
        }))
    }

    /// jobgate's own publisher (`jobgate-shared`), no HTTP; waits until it is connected.
    pub async fn library_publish_op(
        &self,
        queue: &str,
        channels: usize,
        body: &'static str,
    ) -> Result<(Op, Arc<RabbitPublisher>)> {
        let publisher = RabbitPublisher::start(rabbitmq::PublisherOptions {
            endpoint: self.url.clone(),
            queues: vec![queue.to_owned()],
            connect_timeout: TIMEOUT,
            publish_timeout: Duration::from_secs(5),
            channels,
            retry_tiers: Vec::new(),
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !publisher.is_ready() {
            if Instant::now() > deadline {
                bail!("jobgate's RabbitMQ publisher not connected within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let p = Arc::clone(&publisher);
        let queue = queue.to_owned();
        let op: Op = Arc::new(move || {
            let p = Arc::clone(&p);
            let queue = queue.clone();
            Box::pin(async move {
                let meta = JobMeta::new(queue.as_str(), Some("application/json".into()));
                p.publish_to(&queue, &meta, body.as_bytes())
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        Ok((op, publisher))
    }

    /// One client draining `jobs` from `queue`: `basic.qos(prefetch)`, one ack per
    /// delivery, as a jobgate worker settles.
    pub async fn raw_consume(&self, queue: &str, prefetch: u16, jobs: u64) -> Result<Phase> {
        let start = Instant::now();
        let conn = rabbitmq::connect(
            &self.url,
            "jobgate-bench-consumer",
            TIMEOUT,
            &mut NodeCursor::next_in_process(),
        )
        .await
        .map_err(|e| anyhow!("cannot connect to RabbitMQ: {e}"))?;
        let channel = bounded("channel.open", conn.create_channel()).await?;
        bounded(
            "basic.qos",
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        let mut consumer = bounded(
            "basic.consume",
            channel.basic_consume(
                ShortString::from(queue),
                ShortString::from("jobgate-bench-raw"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        // Acks are sent concurrently, as jobgate's worker tasks settle: awaiting each
        // ack before taking the next delivery would measure the ack round trip of the
        // client's I/O loop, not the broker.
        let mut acks = tokio::task::JoinSet::new();
        let mut delivered = 0;
        let mut acked = 0;
        while delivered < jobs {
            let delivery = match tokio::time::timeout(TIMEOUT, consumer.next()).await {
                Ok(Some(Ok(d))) => d,
                Ok(Some(Err(e))) => bail!("raw consume failed: {e}"),
                Ok(None) => bail!("raw consume: subscription ended"),
                Err(_) => {
                    bail!("raw consume: nothing delivered for {TIMEOUT:?} after {delivered} jobs")
                }
            };
            delivered += 1;
            acks.spawn(async move {
                bounded("basic.ack", delivery.acker.ack(BasicAckOptions::default())).await
            });
            while let Some(done) = acks.try_join_next() {
                done.context("ack task")??;
                acked += 1;
            }
        }
        while let Some(done) = acks.join_next().await {
            done.context("ack task")??;
            acked += 1;
        }
        let elapsed = start.elapsed();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, ShortString::from("done")),
        )
        .await;
        Ok(Phase {
            ok: acked,
            seconds: elapsed.as_secs_f64(),
            per_sec: per_second(acked, elapsed),
            ..Phase::default()
        })
    }

    pub async fn close(&self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.conn.close(200, ShortString::from("bench done")),
        )
        .await;
    }
}

/// The queues jobgate creates for `queue` with the consumer's one retry tier.
pub fn all_queues(queue: &str, retry_tier: Duration) -> Vec<String> {
    vec![
        queue.to_owned(),
        dlq_name(queue),
        jobgate_shared::retry::retry_queue_name(queue, retry_tier),
    ]
}
