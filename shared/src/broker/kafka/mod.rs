//! Apache Kafka backend (`rdkafka` with the bundled librdkafka).
//!
//! Delivery guarantee, in plain words:
//! - Ingress: records are produced with `acks=all` and `enable.idempotence=true`;
//!   `publish` returns `Ok` only when the delivery report says the record is written.
//!   A full local queue, a delivery error, an unreachable broker or no report within
//!   the publish timeout is an error, never a silent success.
//! - Workers: librdkafka's automatic commit and offset store are off. A job's outcome is
//!   recorded in the consumer's ledger once it is durable, and the ledger's positions
//!   (up to the first unfinished job of each partition, even when jobs of one partition
//!   run concurrently and finish out of order) are committed in batches: every
//!   [`COMMIT_INTERVAL`] by the source, on revoke, on close, and with the commits that
//!   record job starts. No per-job call into librdkafka. A crash replays from the last
//!   committed offset: at least once, never loss.
//! - Rebalances are incremental (`cooperative-sticky`): only the partitions that move
//!   change hands; the others keep being consumed. Before a partition is let go, what
//!   finished on it is committed (synchronously, up to its first unfinished job), and
//!   its bookkeeping is dropped. Its jobs still running finish, but their offsets are
//!   not stored, and records fetched from it but not started are not run: the new owner
//!   processes them from the committed offset. Duplicates (the jobs in flight on the
//!   moved partitions), never loss.
//! - Saturation: while every worker slot is busy the consumer is still polled (its
//!   partitions paused after [`POLL_GAP`]), so rebalances and other callbacks are served
//!   promptly instead of after a job ends; the prefetch is bounded by
//!   `queued.max.messages.kbytes` and `fetch.max.bytes` ([`SourceOptions`]).
//! - Replays count: Kafka keeps no delivery count, so the consumer counts the starts of
//!   the jobs it has not finished in the metadata of the offsets it commits, and the
//!   next owner of a partition reads them back ([`ledger`]): a job replayed after its
//!   consumer died comes as its next attempt, and a job that kills every consumer ends
//!   in `Q.dlq` once its attempts are used up. A first start is committed in the
//!   background (a consumer dying within milliseconds of it may leave it uncounted); a
//!   start of a job started before is committed before it runs.
//!
//! Topics (`Q`, `Q.dlq`, `Q.retry.<tier>`) are created through the admin API, never by
//! broker auto-creation; existing topics are left alone. Retries wait in the tier
//! topics until due and are forwarded back to `Q` by [`retry`].

pub mod admin;
mod ledger;
mod retry;
mod security;

pub use security::{KafkaProperties, KafkaSecurity, SaslMechanism, Secret, SecurityProtocol};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    dlq_name, Delivery, JobSource, PublishError, Publisher, Settle, SettleError, SourceStatus,
};
use crate::backoff::Backoff;
use crate::job::{self, Job, JobMeta};
use crate::retry::retry_queue_name;
use ledger::{Earlier, Ledger, Position};

/// How often the source commits the positions of finished jobs (as librdkafka's
/// auto-commit did, whose default is 5 s).
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// How often the publisher checks that the cluster answers (readiness).
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one metadata request of that check may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// How often librdkafka reports a job consumer's statistics, from which the consumer
/// lag of each owned partition is taken (`statistics.interval.ms`).
const LAG_STATS_INTERVAL: Duration = Duration::from_secs(5);
/// How long a fetched record may wait for a worker slot before the source pauses the
/// consumer's partitions and polls on (rebalances, callbacks) while it waits. Pausing
/// drops what librdkafka prefetched (it fetches it again on resume), so short waits,
/// the rule with short jobs, do not pause.
pub const POLL_GAP: Duration = Duration::from_millis(100);
/// The partition assignment of job consumer groups: incremental rebalances, so a
/// replica joining or leaving moves only the partitions that change owner.
const ASSIGNMENT_STRATEGY: &str = "cooperative-sticky";

/// How many copies of each topic jobgate creates (`replication.factor`) and how many of
/// them must have a record before an `acks=all` write is confirmed
/// (`min.insync.replicas`). `None` is "auto": the factor is min(3, brokers in the
/// cluster) and the minimum in sync is the factor less one when the factor is 2 or more
/// (one broker may be down and writes go on; two copies always have every confirmed
/// record), else 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replication {
    pub factor: Option<i32>,
    pub min_insync: Option<i32>,
}

impl Replication {
    /// `(replication.factor, min.insync.replicas)` for a cluster of `brokers` brokers.
    pub fn resolve(self, brokers: usize) -> Result<(i32, i32), String> {
        let brokers = i32::try_from(brokers).unwrap_or(i32::MAX);
        let factor = self.factor.unwrap_or_else(|| brokers.clamp(1, 3));
        let min_insync = self
            .min_insync
            .unwrap_or(if factor >= 2 { factor - 1 } else { 1 });
        if min_insync > factor {
            return Err(format!(
                "min.insync.replicas {min_insync} is above the replication factor {factor}: \
                 no acks=all write could ever be confirmed"
            ));
        }
        Ok((factor, min_insync))
    }
}

/// Where and how jobgate creates its topics.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    pub partitions: i32,
    pub replication: Replication,
    /// Bound of one admin or metadata request.
    pub timeout: Duration,
    /// `linger.ms` of the producers (ingress and retry/dead-letter publishing).
    pub linger: Duration,
    /// TLS, SASL and pass-through properties of every client.
    pub security: KafkaSecurity,
}

impl TopicSpec {
    /// The start of every Kafka client's configuration: where the cluster is, how to
    /// log in, and the pass-through properties. The caller adds its own properties
    /// after, which win.
    pub fn client_config(&self, role: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set(
                "client.id",
                format!("jobgate-{role}-{}", std::process::id()),
            )
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "5000");
        self.security.apply(&mut config);
        config
    }
}

/// Creates, idempotently, topics `Q`, `Q.dlq` and `Q.retry.<tier>` (one per retry tier)
/// for each job queue. Both binaries call it at start; the producer passes no tiers (the
/// retry schedule is the consumer's). A topic that already exists is left as it is.
pub async fn ensure_topics(
    spec: &TopicSpec,
    queues: &[String],
    retry_tiers: &[Duration],
) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = spec
        .client_config("admin")
        .create()
        .map_err(|e| format!("admin client: {e}"))?;
    let (admin, brokers) = if spec.replication.factor.is_some() {
        (admin, 0)
    } else {
        // "auto" needs the cluster's size; the metadata call blocks.
        let timeout = spec.timeout;
        tokio::task::spawn_blocking(move || {
            let brokers = admin
                .inner()
                .fetch_metadata(None, timeout)
                .map(|m| m.brokers().len());
            (admin, brokers)
        })
        .await
        .map_err(|e| format!("metadata task: {e}"))
        .and_then(|(admin, brokers)| Ok((admin, brokers.map_err(|e| format!("metadata: {e}"))?)))?
    };
    let (factor, min_insync) = spec.replication.resolve(brokers)?;
    let min_insync = min_insync.to_string();
    let names: Vec<String> = queues
        .iter()
        .flat_map(|q| {
            let retries = retry_tiers.iter().map(|t| retry_queue_name(q, *t));
            [q.clone(), dlq_name(q)].into_iter().chain(retries)
        })
        .collect();
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(name, spec.partitions, TopicReplication::Fixed(factor))
                .set("min.insync.replicas", &min_insync)
        })
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(spec.timeout))
        .operation_timeout(Some(spec.timeout));
    let results = tokio::time::timeout(
        spec.timeout * 2,
        admin::create_topics(&admin, &topics, &options),
    )
    .await
    .map_err(|_| format!("no answer to CreateTopics within {:?}", spec.timeout * 2))?
    .map_err(|e| format!("CreateTopics: {e}"))?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(
                topic = %name,
                partitions = spec.partitions,
                replication_factor = factor,
                min_insync_replicas = %min_insync,
                "created Kafka topic"
            ),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("cannot create topic {name}: {code}")),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------------

/// librdkafka's `message.timeout.ms` for a publish timeout: a second less (half of it
/// when that is shorter), because librdkafka looks for expired records once a second;
/// so its report, success or failure, comes within the publish timeout itself.
fn message_timeout(publish_timeout: Duration) -> Duration {
    publish_timeout
        .saturating_sub(Duration::from_secs(1))
        .max(publish_timeout / 2)
        .max(Duration::from_millis(1))
}

/// librdkafka's `topic.metadata.propagation.max.ms`: how long a topic missing from the
/// cluster's metadata counts as "not propagated yet" before its records fail as
/// unknown. librdkafka's 30 s is longer than any publish timeout, so a topic deleted
/// by hand made every publish wait out its timeout (a 503 "did not confirm") for 30 s
/// before jobgate learnt the topic was gone and created it again. Half the message
/// timeout: a missing topic is answered as missing, and created again, within it;
/// jobgate creates its topics itself before it is ready, so nothing new has to
/// propagate while it serves.
fn topic_propagation_wait(publish_timeout: Duration) -> Duration {
    (message_timeout(publish_timeout) / 2).clamp(Duration::from_millis(1), Duration::from_secs(30))
}

/// A producer with `acks=all` and idempotence; a record's delivery is reported within
/// `publish_timeout` ([`message_timeout`]), so none is delivered after we gave up.
fn idempotent_producer(
    spec: &TopicSpec,
    publish_timeout: Duration,
) -> Result<FutureProducer, String> {
    let timeout_ms = message_timeout(publish_timeout).as_millis().to_string();
    let propagation_ms = topic_propagation_wait(publish_timeout)
        .as_millis()
        .to_string();
    spec.client_config("producer")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", &timeout_ms)
        .set("linger.ms", spec.linger.as_millis().to_string())
        .set("allow.auto.create.topics", "false")
        .set("topic.metadata.propagation.max.ms", &propagation_ms)
        .create()
        .map_err(|e| format!("Kafka producer: {e}"))
}

/// Options of the Kafka publisher.
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    pub topics: TopicSpec,
    pub queues: Vec<String>,
    /// Retry tiers whose topics are ensured (empty for the producer).
    pub retry_tiers: Vec<Duration>,
    /// How long `publish` waits for the delivery report (also librdkafka's
    /// `message.timeout.ms`, so a record is never delivered after we answered 503).
    pub publish_timeout: Duration,
}

/// Produces jobs to Kafka; waits for each record's delivery report.
pub struct KafkaPublisher {
    options: PublisherOptions,
    producer: FutureProducer,
    ready: AtomicBool,
    /// Set when a publish found its topic missing: the supervisor creates it again.
    topics_missing: AtomicBool,
    cancel: CancellationToken,
}

impl KafkaPublisher {
    /// Starts the publisher; topics are created and readiness checked in the background.
    pub fn start(options: PublisherOptions) -> Result<Arc<Self>, String> {
        let producer = idempotent_producer(&options.topics, options.publish_timeout)?;
        let publisher = Arc::new(Self {
            options,
            producer,
            ready: AtomicBool::new(false),
            topics_missing: AtomicBool::new(true),
            cancel: CancellationToken::new(),
        });
        tokio::spawn(Arc::clone(&publisher).supervise());
        Ok(publisher)
    }

    /// Keeps `ready` true only while the cluster answers and our topics exist.
    async fn supervise(self: Arc<Self>) {
        let mut was_ready = false;
        while !self.cancel.is_cancelled() {
            let producer = self.producer.clone();
            let answers = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(None, METADATA_TIMEOUT)
            })
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
            if !answers {
                // After an outage the cluster may be a new one: check the topics again.
                self.topics_missing.store(true, Ordering::SeqCst);
            } else if self.topics_missing.load(Ordering::SeqCst) {
                let o = &self.options;
                match ensure_topics(&o.topics, &o.queues, &o.retry_tiers).await {
                    Ok(()) => self.topics_missing.store(false, Ordering::SeqCst),
                    Err(error) => tracing::warn!(%error, "cannot create Kafka topics"),
                }
            }
            let ready = answers && !self.topics_missing.load(Ordering::SeqCst);
            self.ready.store(ready, Ordering::SeqCst);
            if ready != was_ready {
                if ready {
                    tracing::info!(brokers = %self.options.topics.brokers, "publisher connected to Kafka; topics ensured");
                } else {
                    tracing::warn!(brokers = %self.options.topics.brokers, "Kafka is not reachable");
                }
                was_ready = ready;
            }
            tokio::select! {
                () = self.cancel.cancelled() => break,
                () = tokio::time::sleep(HEALTH_CHECK_INTERVAL) => {}
            }
        }
    }

    fn delivery_error(&self, error: &KafkaError) -> PublishError {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageTimedOut) => {
                PublishError::Timeout(self.options.publish_timeout)
            }
            // `UnknownPartition` too: a record queued for a partition of the deleted topic
            // (librdkafka's local error) is as unroutable as one for the topic.
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition,
            ) => {
                self.topics_missing.store(true, Ordering::SeqCst);
                PublishError::Unroutable
            }
            _ => PublishError::Broker(error.to_string()),
        }
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish_to(
        &self,
        destination: &str,
        meta: &JobMeta,
        body: &[u8],
    ) -> Result<(), PublishError> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err(PublishError::Unavailable);
        }
        let mut record = FutureRecord::to(destination)
            .key(meta.id.as_bytes())
            .payload(body)
            .headers(job::kafka::headers(meta));
        if let Some(ms) = job::kafka::timestamp_millis(meta) {
            record = record.timestamp(ms);
        }
        let delivery = match self.producer.send_result(record) {
            Ok(delivery) => delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(PublishError::Overloaded)
            }
            Err((error, _)) => return Err(self.delivery_error(&error)),
        };
        // librdkafka reports within the publish timeout (see `message_timeout`); this
        // limit only guards against a report that never comes.
        match tokio::time::timeout(self.options.publish_timeout, delivery).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err((error, _)))) => Err(self.delivery_error(&error)),
            Ok(Err(_canceled)) => Err(PublishError::Broker("the producer was closed".into())),
            Err(_) => Err(PublishError::Timeout(self.options.publish_timeout)),
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    async fn close(&self) {
        self.cancel.cancel();
        self.ready.store(false, Ordering::SeqCst);
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
    }
}

// ---------------------------------------------------------------------------------
// Job source (workers)
// ---------------------------------------------------------------------------------

/// Options of the Kafka job source.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub topics: TopicSpec,
    pub queues: Vec<String>,
    /// Consumer group id; `{queue}` is replaced by the queue name.
    pub group_template: String,
    /// `session.timeout.ms`: how soon a dead replica's partitions move on.
    pub session_timeout: Duration,
    /// Retry tiers: their topics are ensured and forwarded back to the queue when due.
    pub retry_tiers: Vec<Duration>,
    /// Bound of one forward of a due retry to its queue.
    pub publish_timeout: Duration,
    /// Longest a job may run; `max.poll.interval.ms` is set above it, so a consumer is
    /// never dropped from its group for the length of a job.
    pub job_timeout: Option<Duration>,
    /// Most kilobytes of records prefetched per consumer (librdkafka's
    /// `queued.max.messages.kbytes`, 64 MiB by default there).
    pub queued_max_kbytes: u32,
    /// Most bytes one fetch response may carry (`fetch.max.bytes`, at least
    /// `message.max.bytes`).
    pub fetch_max_bytes: u32,
}

impl SourceOptions {
    pub fn group_for(&self, queue: &str) -> String {
        self.group_template.replace("{queue}", queue)
    }
}

/// Consumer callbacks: rebalance bookkeeping, logs and the consumer lag; and the
/// commits that make job starts durable.
struct JobConsumerContext {
    ledger: Arc<Ledger>,
    starts: StartCommits,
    group: String,
    /// The job queue (topic) this consumer drains.
    queue: String,
    status: SourceStatus,
}

/// Messages of one partition not yet done by the group: the high watermark minus the
/// group's committed offset (librdkafka's `consumer_lag`). Before the group committed
/// anything there, consuming starts at the low watermark (`auto.offset.reset=earliest`),
/// so the lag is the high minus the low watermark. `None` while the watermarks are not
/// known yet.
fn partition_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    if p.hi_offset < 0 {
        return None;
    }
    if p.consumer_lag >= 0 {
        return Some(p.consumer_lag);
    }
    let from = if p.committed_offset >= 0 {
        p.committed_offset
    } else if p.lo_offset >= 0 {
        p.lo_offset
    } else {
        return None;
    };
    Some((p.hi_offset - from).max(0))
}

impl ClientContext for JobConsumerContext {
    /// Every [`LAG_STATS_INTERVAL`]: the lag of each partition this consumer owns
    /// (`desired`); partitions it no longer owns drop out.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.queue) else {
            return;
        };
        let owned = topic
            .partitions
            .values()
            // -1 is librdkafka's internal "unassigned" partition.
            .filter(|p| p.partition >= 0 && p.desired)
            .filter_map(|p| Some((p.partition, partition_lag(p)?)));
        self.status.set_queue_lag(&self.queue, owned);
    }
}

impl JobConsumerContext {
    /// Gives up `partitions` in the ledger and commits, and waits for, their hand-over
    /// positions ([`Ledger::hand_over`]).
    fn hand_over(&self, consumer: &BaseConsumer<Self>, partitions: &[(String, i32)]) {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, position) in self.ledger.hand_over(Some(partitions)) {
            let _ = add_position(&mut tpl, &topic, partition, &position);
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(error) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(group = %self.group, %error, "commit before a revoke failed; jobs finished on the revoked partitions may run again");
        }
    }
}

impl ConsumerContext for JobConsumerContext {
    /// On revoke (under the cooperative protocol, only the partitions that move): forget
    /// them and commit what finished on them before they go, so the next owner does not
    /// run finished jobs again, and knows that no start went unrecorded here. The
    /// commit is done when the callback returns, before the partitions can be handed
    /// over.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            self.hand_over(consumer, &revoked);
            self.status.forget_partitions(&revoked);
            let owned = consumer.assignment().map_or(0, |a| a.count());
            let kept = owned.saturating_sub(revoked.len());
            tracing::info!(group = %self.group, revoked = revoked.len(), kept, "partitions revoked");
        }
    }

    /// Logs the partitions owned after an assignment (`assigned`, all of them) and how
    /// many it added (`added`: under the cooperative protocol an assignment only adds).
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let assigned = consumer.assignment().map_or(tpl.count(), |a| a.count());
                tracing::info!(group = %self.group, assigned, added = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(error) => {
                tracing::warn!(group = %self.group, %error, "rebalance failed");
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

type JobConsumer = StreamConsumer<JobConsumerContext>;

/// Consumes jobs from Kafka topics, one consumer group per queue.
pub struct KafkaSource {
    options: SourceOptions,
    ledger: Arc<Ledger>,
    consumers: Vec<Arc<JobConsumer>>,
    /// One retry forwarder per queue.
    forwarders: Vec<tokio::task::JoinHandle<()>>,
    /// Subscribed once the consumers are; the lag of owned partitions.
    status: SourceStatus,
}

impl KafkaSource {
    pub fn new(options: SourceOptions) -> Self {
        Self {
            options,
            ledger: Arc::new(Ledger::default()),
            consumers: Vec::new(),
            forwarders: Vec::new(),
            status: SourceStatus::default(),
        }
    }

    /// librdkafka's default (5 min), or the job timeout plus a minute when longer; with
    /// no job timeout, an hour.
    fn max_poll_interval_ms(&self) -> u128 {
        const DEFAULT_MS: u128 = 300_000;
        match self.options.job_timeout {
            Some(limit) => DEFAULT_MS.max(limit.as_millis() + 60_000),
            None => 3_600_000,
        }
        .min(i32::MAX as u128)
    }

    fn subscribe(&self, queue: &str) -> Result<JobConsumer, String> {
        let session_ms = self.options.session_timeout.as_millis().max(1000);
        let heartbeat_ms = (session_ms / 3).max(100);
        let group = self.options.group_for(queue);
        let context = JobConsumerContext {
            ledger: Arc::clone(&self.ledger),
            starts: StartCommits::default(),
            group: group.clone(),
            queue: queue.to_owned(),
            status: self.status.clone(),
        };
        let consumer: JobConsumer = self
            .options
            .topics
            .client_config("consumer")
            .set("group.id", &group)
            // Commits come from the ledger (`commit_positions`), never from offsets
            // stored in librdkafka: a stored offset older than a commit made from the
            // ledger would move the group back when auto-committed.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", session_ms.to_string())
            .set("heartbeat.interval.ms", heartbeat_ms.to_string())
            .set(
                "max.poll.interval.ms",
                self.max_poll_interval_ms().max(session_ms).to_string(),
            )
            .set("allow.auto.create.topics", "false")
            .set("partition.assignment.strategy", ASSIGNMENT_STRATEGY)
            .set(
                "queued.max.messages.kbytes",
                self.options.queued_max_kbytes.to_string(),
            )
            .set("fetch.max.bytes", self.options.fetch_max_bytes.to_string())
            .set(
                "statistics.interval.ms",
                LAG_STATS_INTERVAL.as_millis().to_string(),
            )
            .create_with_context(context)
            .map_err(|e| format!("Kafka consumer: {e}"))?;
        consumer
            .subscribe(&[queue])
            .map_err(|e| format!("subscribe to {queue}: {e}"))?;
        Ok(consumer)
    }

    /// The delivery of a record just fetched. The first record of a partition's
    /// ownership first reads the group's committed offset of the partition, whose
    /// metadata counts the earlier starts of the records still to do (see [`ledger`]).
    async fn delivery(&self, consumer: &Arc<JobConsumer>, record: FetchedRecord) -> Waiting {
        let FetchedRecord {
            topic,
            partition,
            offset,
            mut meta,
            body,
        } = record;
        let fetched = self.ledger.fetched(&topic, partition, offset);
        if fetched.needs_counts {
            let committed = committed_position(consumer, &topic, partition).await;
            let earlier = match &committed {
                Committed::At(at, metadata) => Earlier::Committed(*at, metadata),
                Committed::Nothing => Earlier::Never,
                Committed::Unreadable => Earlier::Unknown,
            };
            self.ledger
                .load_counts(&topic, partition, fetched.generation, earlier);
        }
        meta.redeliveries =
            self.ledger
                .earlier_starts(&topic, partition, offset, fetched.generation);
        Waiting {
            consumer: Arc::clone(consumer),
            topic: topic.clone(),
            partition,
            generation: fetched.generation,
            delivery: Delivery {
                job: Job { meta, body },
                settle: Box::new(KafkaSettle {
                    consumer: Arc::clone(consumer),
                    ledger: Arc::clone(&self.ledger),
                    topic,
                    partition,
                    offset,
                    generation: fetched.generation,
                }),
            },
        }
    }
}

/// A delivery the worker has no room for yet, with what tells whether it is still ours.
struct Waiting {
    consumer: Arc<JobConsumer>,
    topic: String,
    partition: i32,
    generation: u64,
    delivery: Delivery,
}

/// The source's side of saturation: records fetched that wait for a worker slot, in
/// fetch order, and the partitions the source paused meanwhile so that it can poll on
/// without fetching more. A record whose partition was revoked while it waited is
/// dropped (its next owner replays it from the committed offset).
///
/// librdkafka keeps a partition paused by the application across revokes and
/// assignments (nothing but a resume clears it), so every partition paused here is
/// resumed when the wait ends, owned or not by then.
#[derive(Default)]
struct Held {
    waiting: VecDeque<Waiting>,
    /// When the oldest record began to wait with nothing paused.
    since: Option<tokio::time::Instant>,
    /// What this source paused, per consumer.
    paused: Vec<(Arc<JobConsumer>, TopicPartitionList)>,
}

/// What [`Held::hand_over`] found.
enum Room {
    /// Everything waiting was handed over (or dropped).
    AllSent,
    /// The worker has no room for the rest.
    Full,
    /// The worker is gone.
    Closed,
}

impl Held {
    fn push(&mut self, waiting: Waiting) {
        if self.waiting.is_empty() && self.paused.is_empty() {
            self.since = Some(tokio::time::Instant::now());
        }
        let (consumer, topic, partition) = (
            Arc::clone(&waiting.consumer),
            waiting.topic.clone(),
            waiting.partition,
        );
        self.waiting.push_back(waiting);
        if !self.paused.is_empty() {
            // From a partition assigned since the pause: pause it too, so that records
            // wait here one per partition at most.
            self.pause_partition(&consumer, &topic, partition);
        }
    }

    fn is_paused(&self) -> bool {
        !self.paused.is_empty()
    }

    /// When to pause, while records wait and nothing is paused.
    fn pause_at(&self) -> tokio::time::Instant {
        self.since.unwrap_or_else(tokio::time::Instant::now) + POLL_GAP
    }

    /// Hands over waiting records, oldest first, while the worker has room; drops those
    /// whose partition was revoked since they were fetched.
    fn hand_over(&mut self, tx: &mpsc::Sender<Delivery>, ledger: &Ledger) -> Room {
        loop {
            let Some(first) = self.waiting.front() else {
                self.since = None;
                return Room::AllSent;
            };
            if !ledger.is_current(&first.topic, first.partition, first.generation) {
                self.waiting.pop_front();
                continue;
            }
            match tx.try_reserve() {
                Ok(permit) => {
                    if let Some(first) = self.waiting.pop_front() {
                        permit.send(first.delivery);
                    }
                }
                Err(mpsc::error::TrySendError::Full(())) => return Room::Full,
                Err(mpsc::error::TrySendError::Closed(())) => return Room::Closed,
            }
        }
    }

    /// Pauses every partition `consumers` own, so that polling fetches nothing more.
    fn pause_all(&mut self, consumers: &[Arc<JobConsumer>]) {
        for consumer in consumers {
            let assignment = match consumer.assignment() {
                Ok(assignment) if assignment.count() > 0 => assignment,
                Ok(_) => continue,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the assignment to pause it");
                    continue;
                }
            };
            match consumer.pause(&assignment) {
                Ok(()) => self.paused.push((Arc::clone(consumer), assignment)),
                Err(error) => tracing::warn!(%error, "cannot pause the partitions"),
            }
        }
        // Nothing paused (an error): wait for room without polling a while longer.
        self.since = Some(tokio::time::Instant::now());
        tracing::debug!(
            paused = self.paused.len(),
            "every worker slot is busy; consumers paused"
        );
    }

    fn pause_partition(&mut self, consumer: &Arc<JobConsumer>, topic: &str, partition: i32) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        if let Err(error) = consumer.pause(&tpl) {
            tracing::warn!(%error, topic, partition, "cannot pause a partition");
            return;
        }
        match self
            .paused
            .iter_mut()
            .find(|(c, _)| Arc::ptr_eq(c, consumer))
        {
            Some((_, paused)) => {
                paused.add_partition(topic, partition);
            }
            None => self.paused.push((Arc::clone(consumer), tpl)),
        }
    }

    /// Resumes everything paused here (the partitions fetch again from the record after
    /// the last one the source took).
    fn resume(&mut self) {
        for (consumer, paused) in self.paused.drain(..) {
            if let Err(error) = consumer.resume(&paused) {
                tracing::warn!(%error, "cannot resume the partitions");
            }
        }
        self.since = None;
    }
}

/// What the source takes from a record before it lets go of the consumer's buffer.
struct FetchedRecord {
    topic: String,
    partition: i32,
    offset: i64,
    meta: JobMeta,
    body: Bytes,
}

impl FetchedRecord {
    fn of(message: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        let topic = message.topic().to_owned();
        Self {
            meta: job::kafka::meta_from(&topic, &job::kafka::Record::of(message)),
            body: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            topic,
            partition: message.partition(),
            offset: message.offset(),
        }
    }
}

/// How long reading a partition's committed offset may take before its counts of
/// earlier starts are taken as none.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

/// The group's committed offset of one partition and its metadata (`None` when nothing
/// is committed, or the broker did not answer: then no earlier starts are known and the
/// records count from zero). A blocking call, so on tokio's blocking pool. rdkafka's
/// metadata accessor panics on metadata that is not UTF-8 (another client of the group
/// could commit such): the panic stays in the blocking task and counts as none too.
async fn committed_position(consumer: &Arc<JobConsumer>, topic: &str, partition: i32) -> Committed {
    let consumer = Arc::clone(consumer);
    let (topic, what) = (topic.to_owned(), format!("{topic}/{partition}"));
    let read = tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, partition);
        let committed = consumer.committed_offsets(tpl, COMMITTED_TIMEOUT)?;
        let element = committed.find_partition(&topic, partition);
        Ok::<_, KafkaError>(element.map_or(Committed::Nothing, |e| match e.offset() {
            Offset::Offset(offset) => Committed::At(offset, e.metadata().to_owned()),
            _ => Committed::Nothing,
        }))
    })
    .await;
    match read {
        Ok(Ok(committed)) => committed,
        Ok(Err(error)) => {
            tracing::warn!(partition = %what, %error, "cannot read the committed offset; earlier starts of its jobs are not counted");
            Committed::Unreadable
        }
        Err(error) => {
            tracing::warn!(partition = %what, %error, "the committed offset's metadata is unreadable; earlier starts of its jobs are not counted");
            Committed::Unreadable
        }
    }
}

/// The group's committed position of a partition, as a new owner reads it.
enum Committed {
    At(i64, String),
    /// The group never committed it (or the commit expired).
    Nothing,
    /// It could not be read.
    Unreadable,
}

#[async_trait]
impl JobSource for KafkaSource {
    async fn run(&mut self, tx: mpsc::Sender<Delivery>, stop: CancellationToken) {
        let mut backoff = Backoff::for_reconnect();
        loop {
            let o = &self.options;
            match ensure_topics(&o.topics, &o.queues, &o.retry_tiers).await {
                Ok(()) => break,
                Err(error) => tracing::warn!(%error, "cannot create Kafka topics; retrying"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        // Also without tiers configured: records left in the tier topics of earlier
        // retry settings are forwarded when due (the forwarder subscribes by pattern).
        for queue in &self.options.queues {
            let forwarder = retry::Forwarder {
                spec: self.options.topics.clone(),
                queue: queue.clone(),
                group: format!("{}.retry", self.options.group_for(queue)),
                session_timeout: self.options.session_timeout,
                publish_timeout: self.options.publish_timeout,
            };
            self.forwarders
                .push(tokio::spawn(forwarder.run(stop.clone())));
        }
        for queue in &self.options.queues {
            match self.subscribe(queue) {
                Ok(consumer) => self.consumers.push(Arc::new(consumer)),
                Err(error) => {
                    tracing::error!(%error, "cannot subscribe");
                    return;
                }
            }
        }
        tracing::info!(brokers = %self.options.topics.brokers, queues = ?self.options.queues, "consumer subscribed");
        self.status.set_subscribed(true);

        // librdkafka reconnects by itself; this loop only moves records to the worker.
        // It polls on while every worker slot is busy (see `Held`): after `POLL_GAP`
        // the partitions are paused, so polling serves rebalances and callbacks without
        // fetching more, and they are resumed once what waits was handed over.
        let consumers = self.consumers.clone();
        let mut streams = futures::stream::select_all(
            consumers
                .iter()
                .map(|c| c.stream().map(move |m| (Arc::clone(c), m))),
        );
        let mut held = Held::default();
        let mut commit_every = tokio::time::interval(COMMIT_INTERVAL);
        commit_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            match held.hand_over(&tx, &self.ledger) {
                Room::Closed => break,
                Room::AllSent if held.is_paused() => held.resume(),
                Room::AllSent | Room::Full => {}
            }
            let waiting = !held.waiting.is_empty();
            let wait_for_room = waiting && !held.is_paused();
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                room = tx.reserve(), if waiting => match room {
                    Ok(permit) => drop(permit), // handed over at the top of the loop
                    Err(_) => break,
                },
                () = tokio::time::sleep_until(held.pause_at()), if wait_for_room => {
                    held.pause_all(&consumers);
                }
                _ = commit_every.tick() => {
                    for consumer in &consumers {
                        commit_positions(consumer, &self.ledger);
                    }
                }
                next = streams.next(), if !wait_for_room => match next {
                    Some((consumer, Ok(message))) => {
                        let record = FetchedRecord::of(&message);
                        drop(message);
                        held.push(self.delivery(&consumer, record).await);
                    }
                    Some((_, Err(error))) => tracing::warn!(%error, "Kafka consumer error"),
                    None => break,
                },
            }
        }
        // Records still waiting are dropped unstarted: their offsets were never
        // finished, so the group delivers them again. Paused partitions stay paused;
        // `close` commits and leaves the group.
        drop(held);
        self.status.set_subscribed(false);
    }

    fn is_ready(&self) -> bool {
        self.status.is_subscribed()
    }

    fn status(&self) -> SourceStatus {
        self.status.clone()
    }

    /// Commits what is finished, then leaves the groups.
    async fn close(&mut self) {
        for forwarder in std::mem::take(&mut self.forwarders) {
            if tokio::time::timeout(Duration::from_secs(15), forwarder)
                .await
                .is_err()
            {
                tracing::warn!("the retry forwarder did not stop in time");
            }
        }
        let consumers = std::mem::take(&mut self.consumers);
        let ledger = Arc::clone(&self.ledger);
        let done = tokio::task::spawn_blocking(move || {
            // The workers are done: nothing starts after these commits.
            let positions = ledger.hand_over(None);
            for consumer in consumers {
                let owned = |topic: &str, partition: i32| {
                    consumer
                        .assignment()
                        .is_ok_and(|a| a.find_partition(topic, partition).is_some())
                };
                let mut tpl = TopicPartitionList::new();
                for (topic, partition, position) in &positions {
                    if owned(topic, *partition) {
                        let _ = add_position(&mut tpl, topic, *partition, position);
                    }
                }
                if tpl.count() > 0 {
                    if let Err(error) = consumer.commit(&tpl, CommitMode::Sync) {
                        tracing::warn!(%error, "final commit failed; finished jobs may be redelivered");
                    }
                }
                consumer.unsubscribe();
                // Dropping the last handle closes the consumer and leaves the group.
                drop(consumer);
            }
        });
        if tokio::time::timeout(Duration::from_secs(15), done)
            .await
            .is_err()
        {
            tracing::warn!("closing the Kafka consumer took too long");
        }
        // The group no longer has us: we own no partitions.
        self.status.clear_lag();
    }
}

/// Commits, without waiting, the ledger's positions of `consumer`'s queue: what finished
/// since the last commit moves the group's offsets, in one request however many jobs
/// finished. Called from the source's loop, which also serves the rebalance callbacks,
/// so no revoke runs meanwhile and every position is of a partition still owned.
fn commit_positions(consumer: &JobConsumer, ledger: &Ledger) {
    let queue = &consumer.context().queue;
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, position) in ledger.positions(Some(queue)) {
        let _ = add_position(&mut tpl, &topic, partition, &position);
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::warn!(%queue, %error, "cannot commit the finished jobs' offsets; retrying in a second");
    }
}

/// Adds `position` (offset and metadata) of `topic`/`partition` to `tpl`.
fn add_position(
    tpl: &mut TopicPartitionList,
    topic: &str,
    partition: i32,
    position: &Position,
) -> Result<(), KafkaError> {
    tpl.add_partition_offset(topic, partition, Offset::Offset(position.offset))?;
    if let Some(mut element) = tpl.find_partition(topic, partition) {
        element.set_metadata(&position.metadata);
    }
    Ok(())
}

/// How long the worker waits for the start of a job to be committed before it runs the
/// job all the same (a crash during it then goes uncounted).
const START_COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The commits that make job starts durable, for one consumer (one queue). Each start
/// asks for a commit of the partitions' positions with their start counts; one commit
/// is in flight at a time, and the starts that come meanwhile ride on the next one. So
/// the commit rate stays at about one per round trip to the group coordinator however
/// many jobs start, and a start waits at most two commits.
#[derive(Default)]
struct StartCommits {
    state: Mutex<StartState>,
    /// The last start request a finished commit carried, and that commit's error.
    done: tokio::sync::watch::Sender<(u64, Option<String>)>,
}

#[derive(Default)]
struct StartState {
    /// Start requests so far (a sequence number).
    requested: u64,
    /// Whether a committer task runs.
    committing: bool,
}

impl StartCommits {
    fn state(&self) -> MutexGuard<'_, StartState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for a commit carrying the starts recorded so far in `ledger` for `topic`;
    /// returns the request's sequence number, for [`StartCommits::wait`].
    fn request(consumer: &Arc<JobConsumer>, ledger: &Arc<Ledger>, topic: &str) -> u64 {
        let this = &consumer.context().starts;
        let mut state = this.state();
        state.requested += 1;
        let seq = state.requested;
        if !state.committing {
            state.committing = true;
            let (consumer, ledger, topic) =
                (Arc::clone(consumer), Arc::clone(ledger), topic.to_owned());
            tokio::spawn(async move { Self::commit_until_current(consumer, ledger, topic).await });
        }
        seq
    }

    /// Commits the current positions of `topic`'s partitions until no start request
    /// came in during the last commit.
    async fn commit_until_current(consumer: Arc<JobConsumer>, ledger: Arc<Ledger>, topic: String) {
        loop {
            let carried = consumer.context().starts.state().requested;
            let mut tpl = TopicPartitionList::new();
            for (topic, partition, position) in ledger.positions(Some(&topic)) {
                let _ = add_position(&mut tpl, &topic, partition, &position);
            }
            let committer = Arc::clone(&consumer);
            let commit =
                tokio::task::spawn_blocking(move || committer.commit(&tpl, CommitMode::Sync));
            let error = match tokio::time::timeout(START_COMMIT_TIMEOUT, commit).await {
                Ok(Ok(Ok(()))) => None,
                Ok(Ok(Err(e))) => Some(e.to_string()),
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {START_COMMIT_TIMEOUT:?}")),
            };
            let this = &consumer.context().starts;
            this.done.send_replace((carried, error));
            let mut state = this.state();
            if state.requested == carried {
                state.committing = false;
                return;
            }
        }
    }

    /// The last start request a finished commit carried.
    fn carried(consumer: &JobConsumer) -> u64 {
        consumer.context().starts.done.borrow().0
    }

    /// Waits until a commit carried start request `seq` (at most
    /// [`START_COMMIT_TIMEOUT`] beyond one commit already under way).
    async fn wait(consumer: &JobConsumer, seq: u64) -> Result<(), SettleError> {
        let mut done = consumer.context().starts.done.subscribe();
        let carried = async {
            let result = done.wait_for(|(carried, _)| *carried >= seq).await;
            result.map(|r| r.1.clone())
        };
        match tokio::time::timeout(START_COMMIT_TIMEOUT * 2, carried).await {
            Ok(Ok(error)) => match error {
                None => Ok(()),
                Some(error) => Err(SettleError(format!("commit the start: {error}"))),
            },
            Ok(Err(_)) => Err(SettleError("commit the start: the consumer is gone".into())),
            Err(_) => Err(SettleError(format!(
                "commit the start: no answer within {:?}",
                START_COMMIT_TIMEOUT * 2
            ))),
        }
    }
}

struct KafkaSettle {
    consumer: Arc<JobConsumer>,
    ledger: Arc<Ledger>,
    topic: String,
    partition: i32,
    offset: i64,
    generation: u64,
}

#[async_trait]
impl Settle for KafkaSettle {
    /// Counts the start in the partition's commit metadata (in the ledger, so that
    /// every commit carries the counts) and has it committed. A record that
    /// was started before without an outcome waits for that commit: from then on a
    /// crash counts, so a job that takes its consumer down every time reaches its
    /// attempt limit. A first start does not wait (most jobs are first starts, and a
    /// commit round trip before each would cost fast jobs most of their throughput):
    /// its commit goes out at once, and only a consumer that dies before it reaches the
    /// broker leaves that start unrecorded. Two rules make such a loss count anyway (see
    /// `ledger`'s module doc): a start waits when [`ledger::UNRECORDED_STARTS`] starts
    /// are already waiting for their commit, and every start in the careful span of a
    /// new owner waits, as do its first starts until one of its commits got through.
    async fn started(&self) -> Result<(), SettleError> {
        let Some(ledger::Started {
            starts, careful, ..
        }) = self
            .ledger
            .started(&self.topic, self.partition, self.offset, self.generation)
        else {
            // Revoked since the fetch: the new owner replays it and counts for itself.
            return Ok(());
        };
        let seq = StartCommits::request(&self.consumer, &self.ledger, &self.topic);
        let unrecorded = seq.saturating_sub(StartCommits::carried(&self.consumer));
        if starts > 1 || careful || unrecorded > ledger::UNRECORDED_STARTS {
            StartCommits::wait(&self.consumer, seq).await?;
            // That commit carried this start: the partition is claimed.
            self.ledger
                .claimed(&self.topic, self.partition, self.generation);
        }
        Ok(())
    }

    /// False once the partition was revoked since the fetch: its next owner replays the
    /// record from the committed offset, so running it here would only duplicate it.
    fn is_current(&self) -> bool {
        self.ledger
            .is_current(&self.topic, self.partition, self.generation)
    }

    /// Records the outcome in the ledger; the source's next batch commit (within
    /// [`COMMIT_INTERVAL`]), a revoke or the close commits it.
    async fn ack(self: Box<Self>) -> Result<(), SettleError> {
        self.ledger
            .finished(&self.topic, self.partition, self.offset, self.generation);
        Ok(())
    }

    /// Kafka cannot hand one record back for an immediate redelivery: the group
    /// replays from the committed offset, and only after a restart or a rebalance. So
    /// this is an error that says so, not a silent success. Its offset simply stays
    /// unfinished (the commit never passes it), which is right for what the worker calls
    /// it for: jobs fetched but not started at shutdown, replayed by the next owner.
    async fn requeue(self: Box<Self>) -> Result<(), SettleError> {
        Err(SettleError(
            "Kafka cannot give one record back; it stays uncommitted and the group delivers it again after a restart or rebalance".to_owned(),
        ))
    }

    /// Kafka has no broker-side dead-lettering: jobgate publishes dead jobs to `Q.dlq`
    /// itself (see the consumer's settling). Refusing a record here would do nothing,
    /// so it is an error.
    async fn reject(self: Box<Self>) -> Result<(), SettleError> {
        Err(SettleError(
            "Kafka cannot dead-letter a record by itself; publish a copy to the dead-letter topic instead".to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_replication_is_at_most_three_copies_and_tolerates_one_broker_down() {
        let auto = Replication::default();
        assert_eq!(auto.resolve(1), Ok((1, 1)));
        assert_eq!(auto.resolve(2), Ok((2, 1)));
        assert_eq!(auto.resolve(3), Ok((3, 2)));
        assert_eq!(auto.resolve(9), Ok((3, 2)));
        // No metadata (zero brokers seen) still creates something valid.
        assert_eq!(auto.resolve(0), Ok((1, 1)));
        let given = Replication {
            factor: Some(5),
            min_insync: None,
        };
        assert_eq!(given.resolve(1), Ok((5, 4)));
        let pinned = Replication {
            factor: None,
            min_insync: Some(3),
        };
        assert_eq!(pinned.resolve(3), Ok((3, 3)));
        assert!(pinned.resolve(1).is_err(), "min ISR above the factor");
    }

    /// A job consumer that never reaches a broker (nothing is subscribed).
    fn idle_consumer(ledger: &Arc<Ledger>) -> Arc<JobConsumer> {
        let context = JobConsumerContext {
            ledger: Arc::clone(ledger),
            starts: StartCommits::default(),
            group: "g".into(),
            queue: "t".into(),
            status: SourceStatus::default(),
        };
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "g")
            .set("log_level", "0")
            .create_with_context(context)
            .expect("a consumer is created without a broker");
        Arc::new(consumer)
    }

    fn fetched(
        consumer: &Arc<JobConsumer>,
        ledger: &Arc<Ledger>,
        partition: i32,
        offset: i64,
    ) -> Waiting {
        let generation = ledger.fetched("t", partition, offset).generation;
        let settle = KafkaSettle {
            consumer: Arc::clone(consumer),
            ledger: Arc::clone(ledger),
            topic: "t".into(),
            partition,
            offset,
            generation,
        };
        Waiting {
            consumer: Arc::clone(consumer),
            topic: "t".into(),
            partition,
            generation,
            delivery: Delivery {
                job: Job {
                    meta: JobMeta::new("t", None),
                    body: Bytes::from(format!("{partition}/{offset}")),
                },
                settle: Box::new(settle),
            },
        }
    }

    fn body(delivery: &Delivery) -> String {
        String::from_utf8(delivery.job.body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn waiting_records_reach_the_worker_in_fetch_order_and_revoked_ones_never() {
        let ledger = Arc::new(Ledger::default());
        let consumer = idle_consumer(&ledger);
        let (tx, mut rx) = mpsc::channel(2);
        let mut held = Held::default();
        for (partition, offset) in [(0, 10), (1, 20), (0, 11), (1, 21), (0, 12)] {
            held.push(fetched(&consumer, &ledger, partition, offset));
        }
        assert!(matches!(held.hand_over(&tx, &ledger), Room::Full));
        let first = rx.recv().await.unwrap();
        let second = rx.recv().await.unwrap();
        assert_eq!([body(&first), body(&second)], ["0/10", "1/20"]);

        // Partition 1 moves to another consumer: what was fetched from it is its next
        // owner's, handed over or not.
        ledger.hand_over(Some(&[("t".into(), 1)]));
        assert!(!second.settle.is_current(), "the worker will not start it");
        assert!(first.settle.is_current());
        assert!(matches!(held.hand_over(&tx, &ledger), Room::AllSent));
        let rest: Vec<String> = [rx.recv().await.unwrap(), rx.recv().await.unwrap()]
            .iter()
            .map(body)
            .collect();
        assert_eq!(rest, ["0/11", "0/12"], "1/21 is dropped");
        assert!(rx.try_recv().is_err());
        assert!(held.since.is_none(), "nothing waits");

        drop(rx);
        held.push(fetched(&consumer, &ledger, 0, 13));
        assert!(matches!(held.hand_over(&tx, &ledger), Room::Closed));
    }

    #[tokio::test]
    async fn a_record_arriving_while_paused_pauses_its_partition_and_resume_forgets_all() {
        let ledger = Arc::new(Ledger::default());
        let consumer = idle_consumer(&ledger);
        let mut held = Held::default();
        let before = tokio::time::Instant::now();
        held.push(fetched(&consumer, &ledger, 0, 1));
        assert!(
            held.pause_at() >= before + POLL_GAP,
            "short waits do not pause"
        );
        // Nothing assigned: nothing to pause, and the wait goes on without polling.
        held.pause_all(std::slice::from_ref(&consumer));
        assert!(!held.is_paused());
        held.pause_partition(&consumer, "t", 0);
        assert!(held.is_paused());
        // A partition assigned while paused: its first record waits, and it is paused.
        held.push(fetched(&consumer, &ledger, 4, 7));
        let paused: Vec<i32> = held.paused[0]
            .1
            .elements()
            .iter()
            .map(|e| e.partition())
            .collect();
        assert_eq!(paused, [0, 4]);
        held.waiting.clear();
        held.resume();
        assert!(!held.is_paused());
        assert!(held.since.is_none());
    }

    #[test]
    fn librdkafka_gives_up_early_enough_to_report_within_the_publish_timeout() {
        let ms = |ms| Duration::from_millis(ms);
        assert_eq!(message_timeout(ms(5000)), ms(4000));
        assert_eq!(message_timeout(ms(2000)), ms(1000));
        assert_eq!(message_timeout(ms(1500)), ms(750));
        assert_eq!(message_timeout(ms(1)), ms(1));
        // A missing topic fails its records well within the message timeout.
        assert_eq!(topic_propagation_wait(ms(5000)), ms(2000));
        assert_eq!(topic_propagation_wait(ms(1)), ms(1));
        assert_eq!(topic_propagation_wait(ms(600_000)), ms(30_000));
    }
}
