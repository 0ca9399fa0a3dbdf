//! Kafka side of the bench: rdkafka with jobgate's settings, without jobgate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use jobgate_shared::broker::kafka::{
    self as jk, ensure_topics, KafkaPublisher, Replication, TopicSpec,
};
use jobgate_shared::broker::Publisher;
use jobgate_shared::config::DEFAULT_KAFKA_LINGER_MS;
use jobgate_shared::job::{self, JobMeta};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::load::Op;
use crate::report::Phase;
use crate::stats::per_second;

const TIMEOUT: Duration = Duration::from_secs(10);
/// How often committed offsets are read while waiting for a backlog to be done.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

pub struct Kafka {
    pub spec: TopicSpec,
    admin: AdminClient<DefaultClientContext>,
}

impl Kafka {
    pub fn new(brokers: &str, partitions: i32) -> Result<Self> {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .context("Kafka admin client")?;
        Ok(Self {
            spec: TopicSpec {
                brokers: brokers.to_owned(),
                partitions,
                replication: Replication::default(),
                timeout: TIMEOUT,
                linger: Duration::from_millis(u64::from(DEFAULT_KAFKA_LINGER_MS)),
                security: Default::default(),
            },
            admin,
        })
    }

    /// Whether consumer group `group` is stable with `members` members that own all of
    /// the topic's partitions between them. A cooperative rebalance hands out what it
    /// revoked in a second round, and the group is stable between the two: the count
    /// of assigned partitions tells the rounds apart.
    pub fn group_settled(&self, group: &str, members: usize) -> Result<bool> {
        let list = self
            .admin
            .inner()
            .fetch_group_list(Some(group), TIMEOUT)
            .with_context(|| format!("describe consumer group {group}"))?;
        let Some(info) = list.groups().first() else {
            return Ok(false);
        };
        if info.state() != "Stable" || info.members().len() != members {
            return Ok(false);
        }
        let owned: usize = info
            .members()
            .iter()
            .map(|m| m.assignment().map_or(0, assigned_partitions))
            .sum();
        Ok(owned == usize::try_from(self.spec.partitions).unwrap_or(0))
    }

    /// Creates the topic of `queue` (and its dead-letter topic) as jobgate does.
    pub async fn create(&self, queue: &str) -> Result<()> {
        ensure_topics(&self.spec, &[queue.to_owned()], &[])
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot create topic {queue} on Kafka at {}: {e}",
                    self.spec.brokers
                )
            })
    }

    /// Deletes topics and consumer groups (missing ones are fine).
    pub async fn delete(&self, topics: &[String], groups: &[String]) -> Result<()> {
        let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        if !groups.is_empty() {
            let names: Vec<&str> = groups.iter().map(String::as_str).collect();
            let _ = tokio::time::timeout(TIMEOUT, self.admin.delete_groups(&names, &options)).await;
        }
        if !topics.is_empty() {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            tokio::time::timeout(
                TIMEOUT * 2,
                jk::admin::delete_topics(&self.admin, &names, &options),
            )
            .await
            .map_err(|_| anyhow!("no answer to DeleteTopics within {:?}", TIMEOUT * 2))?
            .context("DeleteTopics")?;
        }
        Ok(())
    }

    /// Raw produce with jobgate's producer settings (`acks=all`, idempotence,
    /// `linger.ms` = `linger_ms`), jobgate's headers and key, one
    /// delivery report awaited per record.
    pub fn raw_publish_op(&self, topic: &str, linger_ms: u32, body: &'static str) -> Result<Op> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.spec.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "5000")
            .set("linger.ms", linger_ms.to_string())
            .set("allow.auto.create.topics", "false")
            .create()
            .context("Kafka producer")?;
        let topic = topic.to_owned();
        Ok(Arc::new(move || {
            let producer = producer.clone();
            let topic = topic.clone();
            Box::pin(async move {
                let meta = JobMeta::new(topic.as_str(), Some("application/json".into()));
                let mut record = FutureRecord::to(&topic)
                    .key(meta.id.as_bytes())
                    .payload(body.as_bytes())
                    .headers(job::kafka::headers(&meta));
                if let Some(ms) = job::kafka::timestamp_millis(&meta) {
                    record = record.timestamp(ms);
                }
                let delivery = producer
                    .send_result(record)
                    .map_err(|(e, _)| e.to_string())?;
                match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e.to_string()),
                    Err(_) => Err("the producer was closed".into()),
                }
            })
        }))
    }

    /// jobgate's own publisher (`jobgate-shared`), no HTTP; waits until it is ready.
    pub async fn library_publish_op(
        &self,
        topic: &str,
        body: &'static str,
    ) -> Result<(Op, Arc<KafkaPublisher>)> {
        let publisher = KafkaPublisher::start(jk::PublisherOptions {
            topics: self.spec.clone(),
            queues: vec![topic.to_owned()],
            retry_tiers: Vec::new(),
            publish_timeout: Duration::from_secs(5),
        })
        .map_err(|e| anyhow!("jobgate's Kafka publisher: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !publisher.is_ready() {
            if Instant::now() > deadline {
                bail!("jobgate's Kafka publisher not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let p = Arc::clone(&publisher);
        let topic = topic.to_owned();
        let op: Op = Arc::new(move || {
            let p = Arc::clone(&p);
            let topic = topic.clone();
            Box::pin(async move {
                let meta = JobMeta::new(topic.as_str(), Some("application/json".into()));
                p.publish_to(&topic, &meta, body.as_bytes())
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        Ok((op, publisher))
    }

    /// One `StreamConsumer` in group `group` reading `jobs` records of `topic`; offsets
    /// stored per record and auto-committed every second, as jobgate's workers. Timed
    /// until the group's committed offsets reach the end, as the drains are.
    pub async fn raw_consume(&self, topic: &str, group: &str, jobs: u64) -> Result<Phase> {
        let start = Instant::now();
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.spec.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("allow.auto.create.topics", "false")
            .create()
            .context("Kafka consumer")?;
        consumer.subscribe(&[topic]).context("subscribe")?;
        let mut stream = consumer.stream();
        let mut received = 0;
        while received < jobs {
            let message = match tokio::time::timeout(TIMEOUT, stream.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => bail!("raw consume failed: {e}"),
                Ok(None) => bail!("raw consume: stream ended"),
                Err(_) => {
                    bail!("raw consume: nothing received for {TIMEOUT:?} after {received} jobs")
                }
            };
            consumer
                .store_offset_from_message(&message)
                .context("store offset")?;
            received += 1;
        }
        // Done means committed, as for the drains (which can only see commits): wait
        // for the auto-commit to cover the last record, with the same probe.
        let probe = self.lag_probe(topic, group)?;
        while probe.lag().await? > 0 {
            if start.elapsed() > TIMEOUT * 6 {
                bail!(
                    "raw consume: offsets not committed within {:?}",
                    TIMEOUT * 6
                );
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        let elapsed = start.elapsed();
        drop(stream);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
            consumer.unsubscribe();
        })
        .await;
        Ok(Phase {
            ok: received,
            seconds: elapsed.as_secs_f64(),
            per_sec: per_second(received, elapsed),
            ..Phase::default()
        })
    }

    /// A probe of how many records of `topic` group `group` has not committed yet.
    pub fn lag_probe(&self, topic: &str, group: &str) -> Result<LagProbe> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.spec.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .context("Kafka probe consumer")?;
        Ok(LagProbe {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            partitions: self.spec.partitions,
        })
    }
}

/// Reads a group's committed offsets against the end offsets (never joins the group).
pub struct LagProbe {
    consumer: Arc<BaseConsumer>,
    topic: String,
    partitions: i32,
}

impl LagProbe {
    pub async fn lag(&self) -> Result<u64> {
        let consumer = Arc::clone(&self.consumer);
        let topic = self.topic.clone();
        let partitions = self.partitions;
        tokio::task::spawn_blocking(move || -> Result<u64> {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&topic, p);
            }
            let committed = consumer
                .committed_offsets(tpl, TIMEOUT)
                .context("committed offsets")?;
            let mut lag = 0;
            for p in 0..partitions {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, p, TIMEOUT)
                    .context("watermarks")?;
                let done = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                };
                lag += u64::try_from(high - done).unwrap_or(0);
            }
            Ok(lag)
        })
        .await
        .context("lag probe task")?
    }
}

/// The topics jobgate creates for `queue` with the consumer's one retry tier.
/// The partitions a member owns in a consumer-protocol assignment: a version (i16),
/// then topics (i32 count), each a name (i16 length, bytes) and its partitions (i32
/// count, i32 each). 0 when the bytes are cut short.
pub fn assigned_partitions(bytes: &[u8]) -> usize {
    fn take<const N: usize>(bytes: &[u8], at: &mut usize) -> Option<[u8; N]> {
        let chunk = bytes.get(*at..*at + N)?.try_into().ok()?;
        *at += N;
        Some(chunk)
    }
    let count = || -> Option<usize> {
        let mut at = 2; // the version
        let topics = i32::from_be_bytes(take::<4>(bytes, &mut at)?);
        let mut total = 0;
        for _ in 0..topics.max(0) {
            let name = i16::from_be_bytes(take::<2>(bytes, &mut at)?);
            at += usize::try_from(name.max(0)).ok()?;
            let partitions = i32::from_be_bytes(take::<4>(bytes, &mut at)?);
            let partitions = usize::try_from(partitions.max(0)).ok()?;
            bytes.get(at..at + 4 * partitions)?;
            at += 4 * partitions;
            total += partitions;
        }
        Some(total)
    };
    count().unwrap_or(0)
}

pub fn all_topics(queue: &str, retry_tier: Duration) -> Vec<String> {
    crate::rabbit::all_queues(queue, retry_tier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_counts_the_partitions_of_every_topic() {
        let mut bytes = vec![0, 1]; // version 1
        bytes.extend(2i32.to_be_bytes());
        for (name, partitions) in [("jobs", &[0i32, 3][..]), ("x", &[5][..])] {
            bytes.extend(i16::try_from(name.len()).unwrap().to_be_bytes());
            bytes.extend(name.as_bytes());
            bytes.extend(i32::try_from(partitions.len()).unwrap().to_be_bytes());
            for p in partitions {
                bytes.extend(p.to_be_bytes());
            }
        }
        bytes.extend((-1i32).to_be_bytes()); // no user data
        assert_eq!(assigned_partitions(&bytes), 3);
        assert_eq!(assigned_partitions(&bytes[..12]), 0);
        assert_eq!(assigned_partitions(&[]), 0);
    }
}
