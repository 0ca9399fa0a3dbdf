//! Serves Kafka retry delays: records in `Q.retry.<tier>` carry a due time
//! (`x-due-at`); when it comes, the record is produced back to `Q` (confirmed) and only
//! then its offset is stored. A partition whose head is not due yet is *paused* and
//! sought back to that record, and resumed when it is due: the consumer keeps polling
//! (it stays in its group) without busy-looping and without holding records in memory.
//!
//! Records of one tier all wait the same delay, so within a partition they become due
//! in order: the head of a partition is always the next one due.
//!
//! The forwarder subscribes to the retry topics of its queue by pattern, not by today's
//! tier list: after the retry settings change, records still waiting in a tier topic
//! that is no longer configured are forwarded all the same.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::{idempotent_producer, TopicSpec};
use crate::job::{self, HEADER_DUE_AT};
use crate::retry::retry_topic_pattern;

/// When forwarding a due record fails (broker away), try it again after this long.
const FORWARD_RETRY: Duration = Duration::from_secs(1);

/// What one forwarder needs.
#[derive(Debug, Clone)]
pub(super) struct Forwarder {
    pub spec: TopicSpec,
    /// The job queue whose retry tiers are served.
    pub queue: String,
    pub group: String,
    pub session_timeout: Duration,
    pub publish_timeout: Duration,
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The due time of a retry record; a record without one (or with junk) is due now.
fn due_at(message: &BorrowedMessage<'_>) -> i64 {
    job::kafka::Record::of(message)
        .header(HEADER_DUE_AT)
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

fn partition_list(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

/// How often the forwarder looks for new retry topics matching its pattern.
const PATTERN_REFRESH: Duration = Duration::from_secs(5);

impl Forwarder {
    /// Runs until `stop`; then commits what was forwarded and leaves the group.
    pub(super) async fn run(self, stop: CancellationToken) {
        let session_ms = self.session_timeout.as_millis().max(1000);
        let consumer: StreamConsumer = match self
            .spec
            .client_config("retry")
            .set("group.id", &self.group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", session_ms.to_string())
            .set("heartbeat.interval.ms", (session_ms / 3).to_string())
            .set("allow.auto.create.topics", "false")
            // A pattern subscription matches new topics only when metadata is refreshed
            // (librdkafka: every 5 minutes). A tier topic created just before the
            // subscription but not yet in the broker's metadata, or by a replica with
            // other retry settings, would wait that long: its retries with it.
            .set(
                "topic.metadata.refresh.interval.ms",
                PATTERN_REFRESH.as_millis().to_string(),
            )
            .create()
        {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::error!(%error, queue = %self.queue, "cannot create the Kafka retry consumer");
                return;
            }
        };
        let producer = match idempotent_producer(&self.spec, self.publish_timeout) {
            Ok(producer) => producer,
            Err(error) => {
                tracing::error!(%error, queue = %self.queue, "cannot create the Kafka retry producer");
                return;
            }
        };
        let pattern = retry_topic_pattern(&self.queue);
        if let Err(error) = consumer.subscribe(&[pattern.as_str()]) {
            tracing::error!(%error, queue = %self.queue, "cannot subscribe to the retry topics");
            return;
        }
        tracing::debug!(queue = %self.queue, %pattern, "retry forwarder subscribed");

        self.forward(&consumer, &producer, &stop).await;

        // Dropping the consumer commits the stored offsets and leaves the group; it
        // blocks while it does, so not on the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }

    async fn forward(
        &self,
        consumer: &StreamConsumer,
        producer: &rdkafka::producer::FutureProducer,
        stop: &CancellationToken,
    ) {
        // Paused partitions and when to resume them.
        let mut paused: HashMap<(String, i32), i64> = HashMap::new();
        let mut stream = consumer.stream();
        loop {
            let next_resume = paused.values().min().copied();
            let wake = async {
                match next_resume {
                    Some(at) => {
                        let wait = u64::try_from(at - now_millis()).unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = wake => {
                    let now = now_millis();
                    let due: Vec<(String, i32)> =
                        paused.iter().filter(|(_, at)| **at <= now).map(|(k, _)| k.clone()).collect();
                    for key in due {
                        paused.remove(&key);
                        if let Err(error) = consumer.resume(&partition_list(&key.0, key.1)) {
                            tracing::debug!(%error, topic = %key.0, partition = key.1, "cannot resume (revoked?)");
                        }
                    }
                }
                next = stream.next() => match next {
                    None => return,
                    Some(Err(error)) => tracing::warn!(%error, queue = %self.queue, "Kafka retry consumer error"),
                    Some(Ok(message)) => {
                        let key = (message.topic().to_owned(), message.partition());
                        if paused.contains_key(&key) {
                            // Fetched before the pause; it comes again after the resume.
                            continue;
                        }
                        let due = due_at(&message);
                        let wait_until = if due > now_millis() {
                            Some(due)
                        } else if self.forward_one(producer, &message).await {
                            let next = Offset::Offset(message.offset() + 1);
                            let mut tpl = TopicPartitionList::new();
                            let stored = tpl
                                .add_partition_offset(&key.0, key.1, next)
                                .and_then(|()| consumer.store_offsets(&tpl));
                            if let Err(error) = stored {
                                tracing::debug!(%error, "cannot store a retry offset (revoked?); it may be forwarded twice");
                            }
                            None
                        } else {
                            Some(now_millis() + i64::try_from(FORWARD_RETRY.as_millis()).unwrap_or(1000))
                        };
                        if let Some(at) = wait_until {
                            let tpl = partition_list(&key.0, key.1);
                            let held = consumer.pause(&tpl).and_then(|()| {
                                consumer.seek(&key.0, key.1, Offset::Offset(message.offset()), Duration::from_secs(5))
                            });
                            match held {
                                Ok(()) => {
                                    paused.insert(key, at);
                                }
                                Err(error) => tracing::warn!(%error, "cannot pause a retry partition"),
                            }
                        }
                    }
                },
            }
        }
    }

    /// Produces a due retry back to its queue; true once the broker has it.
    async fn forward_one(
        &self,
        producer: &rdkafka::producer::FutureProducer,
        message: &BorrowedMessage<'_>,
    ) -> bool {
        let mut meta = job::kafka::meta_from(&self.queue, &job::kafka::Record::of(message));
        meta.headers.remove(HEADER_DUE_AT);
        let mut record = FutureRecord::to(&self.queue)
            .key(meta.id.as_bytes())
            .payload(message.payload().unwrap_or_default())
            .headers(job::kafka::headers(&meta));
        if let Some(ms) = job::kafka::timestamp_millis(&meta) {
            record = record.timestamp(ms);
        }
        let limit = self.publish_timeout + Duration::from_secs(1);
        let sent = producer.send(record, Timeout::After(self.publish_timeout));
        match tokio::time::timeout(limit, sent).await {
            Ok(Ok(_)) => {
                tracing::debug!(job_id = %meta.id, queue = %self.queue, attempt = meta.attempt, "retry due; back in its queue");
                true
            }
            Ok(Err((error, _))) => {
                tracing::warn!(%error, job_id = %meta.id, queue = %self.queue, "cannot forward a due retry; trying again");
                false
            }
            Err(_) => false,
        }
    }
}
