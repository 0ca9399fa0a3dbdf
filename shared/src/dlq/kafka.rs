//! The dlq tools on Kafka.
//!
//! A Kafka topic cannot drop one record, so "removed from the dead-letter queue" means
//! "behind the committed position of the replay group" `<group of Q>.dlq-replay`
//! (`JOBGATE_KAFKA_GROUP` with `{queue}` replaced, then `.dlq-replay`; by default
//! `jobgate.Q.dlq-replay`). All three tools read `Q.dlq` from that group's committed
//! positions (or the earliest record) up to the end of each partition as it was when
//! the tool started:
//!
//! - `list` reads without committing anything (`assign` with explicit offsets, no
//!   subscription, so no group rebalance and no member in the group);
//! - `replay` publishes each record to `Q` through a confirming [`KafkaPublisher`],
//!   then commits (synchronously) the partition's next offset for the replay group, so
//!   a second replay does not repeat the first. With `--job-id`, only matching records
//!   are replayed, and one is committed past only when no record before it on its
//!   partition was skipped (it was the oldest there); otherwise it stays listed and a
//!   later full replay includes that job again (a duplicate; handlers are idempotent on
//!   the job id);
//! - `purge` commits the end of every partition for the replay group. The records stay
//!   in the topic until its retention removes them, but the tools treat them as gone.
//!
//! Every broker request is bounded; reading stops at the end captured at the start and
//! fails with a clear error when no record arrives for [`READ_IDLE_TIMEOUT`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::broker::kafka::{self, KafkaPublisher};
use crate::broker::{dlq_name, Publisher};
use crate::job;
use crate::status::StatusStore;
use bytes::Bytes;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use super::{
    record_replay, replay_meta, wait_ready, DeadJob, DlqError, DlqSettings, Listing, Result,
    OPERATION_TIMEOUT,
};

/// Reading fails when no record comes for this long while records remain to be read.
const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The consumer group whose committed positions mark what the tools have removed;
/// `kafka_group` is `JOBGATE_KAFKA_GROUP`, with `{queue}` standing for the queue.
pub fn replay_group(kafka_group: &str, queue: &str) -> String {
    format!("{}.dlq-replay", kafka_group.replace("{queue}", queue))
}

/// Runs a blocking librdkafka call off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DlqError::failed(format!("Kafka client task failed: {e}")))?
}

/// Where one partition of `Q.dlq` is read from and up to where.
#[derive(Debug, Clone, Copy)]
struct Range {
    partition: i32,
    /// The replay group's committed position, or the earliest record.
    start: i64,
    /// The high watermark when the tool started (one past the last record).
    end: i64,
}

impl Range {
    fn len(&self) -> u64 {
        u64::try_from(self.end - self.start).unwrap_or(0)
    }
}

/// A consumer of `Q.dlq` in the replay group, and the ranges it reads.
struct Reader {
    consumer: Arc<StreamConsumer>,
    topic: String,
    group: String,
    ranges: Vec<Range>,
    /// Partitions not yet read up to their end.
    remaining: HashSet<i32>,
    ends: HashMap<i32, i64>,
}

impl Reader {
    /// Creates the consumer and finds, for each partition of `Q.dlq`, the replay
    /// group's position and the current end. Nothing is assigned yet.
    async fn open(settings: &DlqSettings, queue: &str) -> Result<Self> {
        let topic = dlq_name(queue);
        let group = replay_group(&settings.broker.kafka_group, queue);
        let spec = settings.broker.kafka_topics();
        let brokers = spec.brokers.clone();
        let consumer: StreamConsumer = spec
            .client_config("dlq")
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("allow.auto.create.topics", "false")
            .create()
            .map_err(|e| DlqError::failed(format!("Kafka consumer: {e}")))?;
        let consumer = Arc::new(consumer);
        let ranges = {
            let (consumer, topic, brokers) = (Arc::clone(&consumer), topic.clone(), brokers);
            blocking(move || find_ranges(&consumer, &topic, &brokers)).await?
        };
        let remaining = ranges
            .iter()
            .filter(|r| r.len() > 0)
            .map(|r| r.partition)
            .collect();
        let ends = ranges.iter().map(|r| (r.partition, r.end)).collect();
        Ok(Self {
            consumer,
            topic,
            group,
            ranges,
            remaining,
            ends,
        })
    }

    /// Dead jobs between the replay group's position and the end.
    fn total(&self) -> u64 {
        self.ranges.iter().map(Range::len).sum()
    }

    /// Starts reading every partition that has records to read.
    fn assign(&self) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for range in self.ranges.iter().filter(|r| r.len() > 0) {
            tpl.add_partition_offset(&self.topic, range.partition, Offset::Offset(range.start))
                .map_err(|e| DlqError::failed(format!("Kafka assign: {e}")))?;
        }
        self.consumer
            .assign(&tpl)
            .map_err(|e| DlqError::failed(format!("Kafka assign {}: {e}", self.topic)))
    }

    /// The next record before the end captured at the start; `None` when every
    /// partition was read up to it.
    async fn next(&mut self) -> Result<Option<OwnedMessage>> {
        while !self.remaining.is_empty() {
            let received = tokio::time::timeout(READ_IDLE_TIMEOUT, self.consumer.recv()).await;
            match received {
                Err(_) => {
                    return Err(DlqError::failed(format!(
                        "no record from {} within {READ_IDLE_TIMEOUT:?} although {} partition(s) were not read to their end; is Kafka reachable?",
                        self.topic,
                        self.remaining.len()
                    )))
                }
                Ok(Err(KafkaError::PartitionEOF(partition))) => {
                    self.remaining.remove(&partition);
                }
                Ok(Err(error)) => {
                    // librdkafka reports transient trouble (a broker reconnecting) here
                    // and recovers by itself; the idle timeout bounds the wait.
                    tracing::warn!(topic = %self.topic, %error, "Kafka consumer error");
                }
                Ok(Ok(message)) => {
                    let (partition, offset) = (message.partition(), message.offset());
                    let Some(end) = self.ends.get(&partition).copied() else {
                        continue;
                    };
                    if offset + 1 >= end {
                        self.remaining.remove(&partition);
                    }
                    if offset < end {
                        return Ok(Some(message.detach()));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Commits `offset` (the next one to read) of `partition` for the replay group.
    async fn commit(&self, partition: i32, offset: i64) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
            .map_err(|e| DlqError::failed(format!("Kafka commit: {e}")))?;
        self.commit_list(tpl).await
    }

    async fn commit_list(&self, tpl: TopicPartitionList) -> Result<()> {
        let (consumer, group) = (Arc::clone(&self.consumer), self.group.clone());
        blocking(move || {
            consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| DlqError::failed(format!("Kafka commit for group {group}: {e}")))
        })
        .await
    }

    /// Closes the consumer off the runtime (librdkafka's close blocks).
    async fn close(self) {
        let consumer = self.consumer;
        let _ = tokio::time::timeout(
            OPERATION_TIMEOUT,
            tokio::task::spawn_blocking(move || {
                let _ = consumer.unassign();
                drop(consumer);
            }),
        )
        .await;
    }
}

/// For each partition of `topic`: the group's committed position (or the earliest
/// record when it has none, or when retention removed it) and the high watermark.
fn find_ranges(consumer: &StreamConsumer, topic: &str, brokers: &str) -> Result<Vec<Range>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), OPERATION_TIMEOUT)
        .map_err(|e| {
            DlqError::failed(format!(
                "cannot read the metadata of {topic} from Kafka at {brokers}: {e}"
            ))
        })?;
    let missing = || {
        DlqError::failed(format!(
            "topic {topic} does not exist on Kafka at {brokers} (no producer or consumer has created its queue yet)"
        ))
    };
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(missing());
    };
    if meta.error().is_some() || meta.partitions().is_empty() {
        return Err(missing());
    }
    let partitions: Vec<i32> = meta.partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, OPERATION_TIMEOUT)
        .map_err(|e| {
            DlqError::failed(format!("cannot read the committed offsets of {topic}: {e}"))
        })?;
    let mut ranges = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, OPERATION_TIMEOUT)
            .map_err(|e| {
                DlqError::failed(format!(
                    "cannot read the offsets of {topic} partition {partition}: {e}"
                ))
            })?;
        let position = committed
            .find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let start = position.map_or(low, |p| p.max(low)).min(high);
        ranges.push(Range {
            partition,
            start,
            end: high,
        });
    }
    Ok(ranges)
}

fn dead_job(topic: &str, message: &OwnedMessage) -> DeadJob {
    DeadJob {
        meta: job::kafka::meta_from(topic, &job::kafka::Record::of_owned(message)),
        body: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
        position: Some((message.partition(), message.offset())),
    }
}

/// Up to `limit` dead jobs, read without committing.
pub async fn list(settings: &DlqSettings, queue: &str, limit: usize) -> Result<Listing> {
    let mut reader = Reader::open(settings, queue).await?;
    let mut listing = Listing {
        jobs: Vec::new(),
        total: Some(reader.total()),
    };
    let read = async {
        if reader.total() > 0 {
            reader.assign()?;
        }
        while listing.jobs.len() < limit {
            match reader.next().await? {
                Some(message) => listing.jobs.push(dead_job(&reader.topic, &message)),
                None => break,
            }
        }
        Ok::<_, DlqError>(())
    }
    .await;
    reader.close().await;
    read.map(|()| listing)
}

/// Replays up to `limit` dead jobs (only those with `job_id`, when given) to `queue`.
pub async fn replay(
    settings: &DlqSettings,
    queue: &str,
    limit: usize,
    job_id: Option<&str>,
    status: Option<&StatusStore>,
) -> Result<u64> {
    let mut reader = Reader::open(settings, queue).await?;
    if reader.total() == 0 {
        reader.close().await;
        return Ok(0);
    }
    let publisher = KafkaPublisher::start(kafka::PublisherOptions {
        topics: settings.broker.kafka_topics(),
        queues: vec![queue.to_owned()],
        retry_tiers: settings.retry_tiers.clone(),
        publish_timeout: settings.publish_timeout,
    })
    .map_err(DlqError::Failed)?;
    let mut replayed = 0u64;
    let result = async {
        wait_ready(publisher.as_ref(), "the Kafka publisher").await?;
        reader.assign()?;
        let mut skipped_on = HashSet::new();
        while (replayed as usize) < limit {
            let Some(message) = reader.next().await? else {
                break;
            };
            let dead = dead_job(&reader.topic, &message);
            if job_id.is_some_and(|id| id != dead.meta.id) {
                // Left in place: the group may not move past it on this partition.
                skipped_on.insert(message.partition());
                continue;
            }
            let meta = replay_meta(&dead.meta, queue);
            publisher.publish(&meta, &dead.body).await.map_err(|error| {
                DlqError::failed(format!(
                    "could not publish dead job {} to {queue}: {error}; it stays in {}",
                    meta.id, reader.topic
                ))
            })?;
            record_replay(status, &meta).await;
            // Confirmed in Q: now the replay group may move past it, unless a record
            // before it on its partition was skipped (`--job-id`): that one must stay
            // ahead of the group. A job replayed alone at the head of its partition
            // (the common case: the only dead job, or the oldest) so leaves the DLQ.
            if !skipped_on.contains(&message.partition()) {
                reader
                    .commit(message.partition(), message.offset() + 1)
                    .await?;
            }
            replayed += 1;
            tracing::info!(job_id = %meta.id, %queue, partition = message.partition(), offset = message.offset(), "dead job replayed");
        }
        Ok::<_, DlqError>(())
    }
    .await;
    reader.close().await;
    publisher.close().await;
    match result {
        Ok(()) => Ok(replayed),
        Err(DlqError::Failed(message)) if replayed > 0 => Err(DlqError::Failed(format!(
            "{message} ({replayed} dead jobs were replayed before this error)"
        ))),
        Err(error) => Err(error),
    }
}

/// Moves the replay group to the end of every partition; returns how many dead jobs
/// it skipped.
pub async fn purge(settings: &DlqSettings, queue: &str) -> Result<u64> {
    let reader = Reader::open(settings, queue).await?;
    let total = reader.total();
    let result = async {
        let mut tpl = TopicPartitionList::new();
        for range in reader.ranges.iter().filter(|r| r.len() > 0) {
            tpl.add_partition_offset(&reader.topic, range.partition, Offset::Offset(range.end))
                .map_err(|e| DlqError::failed(format!("Kafka commit: {e}")))?;
        }
        if tpl.count() > 0 {
            reader.commit_list(tpl).await?;
        }
        Ok::<_, DlqError>(())
    }
    .await;
    reader.close().await;
    result.map(|()| total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_group_follows_the_queue_group() {
        assert_eq!(
            replay_group("jobgate.{queue}", "mail"),
            "jobgate.mail.dlq-replay"
        );
        assert_eq!(
            replay_group("team-{queue}-v2", "mail"),
            "team-mail-v2.dlq-replay"
        );
    }
}
