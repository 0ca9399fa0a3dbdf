//! Scenarios that only make sense on Kafka: the record on the wire, and a consumer
//! killed while its group shares the partitions.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::Consumer as _;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

use crate::helpers::{
    assert_processed_exactly_once, brokers_shared, kafka, processing_counts, unique, vars,
    wait_until, Backend, Consumer, Producer, KAFKA_PARTITIONS,
};

const BACKEND: Backend = Backend::Kafka;

/// One record as read from a topic, owned.
#[derive(Debug)]
pub(crate) struct Record {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    timestamp_ms: Option<i64>,
}

impl Record {
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        let (_, value) = self.headers.iter().find(|(k, _)| k == name)?;
        let value = value.as_ref()?;
        Some(String::from_utf8(value.clone()).expect("header values are UTF-8"))
    }
}

/// Reads the first record of `topic` (any partition) from the beginning, with a
/// throwaway group that commits nothing.
pub(crate) async fn first_record(topic: &str) -> Record {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let client = kafka::client(&unique("reader"));
        let partitions = kafka::partitions_of(&client, &topic).expect("topic exists");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        client.assign(&tpl).expect("assign the partitions");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            match client.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    return Record {
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        timestamp_ms: m.timestamp().to_millis(),
                    }
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        panic!("no record in {topic} within 30 s");
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn record_carries_the_body_byte_for_byte_with_key_and_headers() {
    let _brokers = brokers_shared().await;
    let queue = unique("record");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;

    // The producer creates its topics when it starts (the broker never auto-creates).
    for topic in [queue.clone(), format!("{queue}.dlq")] {
        assert_eq!(
            kafka::topic_partitions(&topic).await,
            Some(i32::try_from(KAFKA_PARTITIONS).unwrap()),
            "topic {topic} exists with {KAFKA_PARTITIONS} partitions"
        );
    }

    let body = "{\"to\":\"ada@example.com\",\"note\":\"h\u{e9}llo \u{2713}\"}";
    let response = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let job_id = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let record = first_record(&queue).await;
    assert_eq!(record.value.as_deref(), Some(body.as_bytes()), "{record:?}");
    assert_eq!(record.key.as_deref(), Some(job_id.as_bytes()), "{record:?}");
    assert_eq!(record.header("job-id").as_deref(), Some(job_id.as_str()));
    assert_eq!(
        record.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(record.header("x-attempt").as_deref(), Some("1"));
    let now_ms = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let ts = record.timestamp_ms.expect("the record has a timestamp");
    assert!(
        (now_ms - ts).abs() < 60_000,
        "record timestamp {ts} is not within a minute of now ({now_ms})"
    );
}

#[tokio::test]
async fn consumer_killed_mid_batch_loses_no_job() {
    let _brokers = brokers_shared().await;
    let queue = unique("killed");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let settings = vars(&[
        ("JOBGATE_LOG_DELAY_MS", "200"),
        ("JOBGATE_CONCURRENCY", "4"),
    ]);
    let mut a = Consumer::start(BACKEND, &queue, &settings).await;
    let b = Consumer::start(BACKEND, &queue, &settings).await;
    BACKEND.wait_group_stable(&[&a, &b], KAFKA_PARTITIONS).await;

    let ids = producer.post_many(&queue, 60).await;
    wait_until(
        Duration::from_secs(60),
        "consumer a to process 5 jobs",
        || std::future::ready(a.processed().len() >= 5),
    )
    .await;
    a.process.kill();
    // SIGKILL: no exit code, and no chance to commit or leave the group.
    assert_eq!(a.process.wait_exit(Duration::from_secs(10)).await, None);
    let killed_after = a.processed().len();

    // b takes a's partitions over once a's session times out, from a's last commit.
    let expected: BTreeSet<String> = ids.iter().cloned().collect();
    let limit = Duration::from_secs(90);
    let start = std::time::Instant::now();
    loop {
        let counts = processing_counts(&[&a, &b]);
        let seen: BTreeSet<String> = counts.keys().cloned().collect();
        if expected.is_subset(&seen) {
            let unknown: Vec<_> = seen.difference(&expected).collect();
            assert!(
                unknown.is_empty(),
                "processed jobs nobody posted: {unknown:?}"
            );
            let duplicates = counts.values().filter(|n| **n > 1).count();
            println!(
                "consumer a processed {killed_after} jobs before SIGKILL; b {}; \
                 {duplicates} of 60 jobs were processed twice (at least once allows it)",
                b.processed().len()
            );
            return;
        }
        if start.elapsed() > limit {
            let missing: Vec<_> = expected.difference(&seen).collect();
            panic!(
                "{} of 60 jobs lost after consumer a was killed: {missing:?}\n{}{}",
                missing.len(),
                a.process.dump(),
                b.process.dump()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes, as an earlier consumer with a tier of `tier` would have, the retry record of
/// a job of `queue` that failed once, due now, into that tier's topic; returns its id.
async fn strand_a_retry_due_now(queue: &str, tier: Duration) -> String {
    use jobgate_shared::job::{self, JobMeta, HEADER_DUE_AT};
    use jobgate_shared::retry::retry_queue_name;
    use rdkafka::message::Header;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let mut meta = JobMeta::new(queue.to_owned(), Some("text/plain".into()));
    meta.attempt = 2;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let headers = job::kafka::headers(&meta).insert(Header {
        key: HEADER_DUE_AT,
        value: Some(now_ms.as_bytes()),
    });
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", crate::helpers::KAFKA_BROKERS)
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(&retry_queue_name(queue, tier))
                .key(meta.id.as_bytes())
                .payload("stranded")
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("the retry record is written");
    meta.id
}

/// A retry waiting in a tier topic that the retry settings no longer have (the delays
/// were changed, say from up to 7 s to up to 2 s) is still forwarded back to its queue
/// when due and processed: the forwarder subscribes by pattern, not by today's tiers.
#[tokio::test]
async fn a_retry_waiting_in_a_tier_no_longer_configured_is_still_processed() {
    let _brokers = brokers_shared().await;
    let queue = unique("oldtier");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    // Topics as an earlier consumer with a 7 s tier left them.
    let old_tier = Duration::from_secs(7);
    kafka::create_topics(&queue, 2, &[old_tier]).await;
    let id = strand_a_retry_due_now(&queue, old_tier).await;

    // Today's consumer has tiers of 1 s and 2 s only.
    let consumer = Consumer::start(BACKEND, &queue, &[]).await;
    wait_until(
        Duration::from_secs(60),
        "the job waiting in the old tier to be processed",
        || std::future::ready(consumer.processed().contains(&id)),
    )
    .await;
}

/// A tier topic that appears while the consumer runs (another replica with other retry
/// settings created it; or jobgate's own, not yet in the broker's metadata when the
/// forwarder subscribed, which a loaded machine showed) is found within seconds: the
/// pattern is matched again on every metadata refresh, which librdkafka does every
/// 5 minutes unless told otherwise.
#[tokio::test]
async fn a_tier_topic_created_while_the_consumer_runs_is_forwarded_from_too() {
    let _brokers = brokers_shared().await;
    let queue = unique("newtier");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let consumer = Consumer::start(BACKEND, &queue, &[]).await;
    // The forwarder subscribes as the consumer starts; the 7 s tier's topic comes
    // after that. (Were it earlier, this test would pass without showing anything.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let new_tier = Duration::from_secs(7);
    kafka::create_topics(&queue, 2, &[new_tier]).await;
    let id = strand_a_retry_due_now(&queue, new_tier).await;
    wait_until(
        Duration::from_secs(60),
        "the job waiting in the new tier to be processed",
        || std::future::ready(consumer.processed().contains(&id)),
    )
    .await;
}

/// The topics jobgate creates carry `min.insync.replicas` from the configuration
/// (here set to 1, the most a single broker allows), as a topic setting, not the broker
/// default: `acks=all` then means "that many copies", whatever the broker's default.
#[tokio::test]
async fn created_topics_carry_min_insync_replicas_from_the_configuration() {
    use rdkafka::admin::{AdminClient, AdminOptions, ConfigSource, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    let _brokers = brokers_shared().await;
    let queue = unique("minisr");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(
        BACKEND,
        &[&queue],
        &vars(&[
            ("JOBGATE_KAFKA_REPLICATION_FACTOR", "auto"),
            ("JOBGATE_KAFKA_MIN_INSYNC_REPLICAS", "1"),
        ]),
    )
    .await;
    producer.post_ok(&queue, "x").await;

    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", crate::helpers::KAFKA_BROKERS)
        .create()
        .unwrap();
    for topic in [queue.clone(), format!("{queue}.dlq")] {
        let described = admin
            .describe_configs(
                [&ResourceSpecifier::Topic(&topic)],
                &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("DescribeConfigs answers");
        let resource = described
            .into_iter()
            .next()
            .expect("one resource")
            .expect("the topic's configuration");
        let entry = resource
            .get("min.insync.replicas")
            .expect("min.insync.replicas is described");
        assert_eq!(entry.value.as_deref(), Some("1"), "{topic}: {entry:?}");
        assert!(
            matches!(entry.source, ConfigSource::DynamicTopic),
            "{topic}: min.insync.replicas must be the topic's own setting, not the broker \
             default: {entry:?}"
        );
    }
    // auto on one broker: one copy.
    let replicas = tokio::task::spawn_blocking({
        let queue = queue.clone();
        move || {
            let client = kafka::client(&unique("meta"));
            let metadata = client
                .fetch_metadata(Some(&queue), Duration::from_secs(10))
                .expect("metadata");
            metadata.topics()[0].partitions()[0].replicas().len()
        }
    })
    .await
    .unwrap();
    assert_eq!(replicas, 1);
}

/// The rebalance lines of a replica's job group, in the order it wrote them.
fn rebalance_lines(consumer: &Consumer) -> Vec<Value> {
    let group = kafka::group(&consumer.queue);
    consumer.process.lines_where(|l| {
        (l["message"] == "partitions assigned" || l["message"] == "partitions revoked")
            && l["group"] == group.as_str()
    })
}

/// For every revoke among a replica's rebalance lines after the first `skip`: how many
/// partitions it owned before, and how many the revoke took.
fn revokes_after(consumer: &Consumer, skip: usize) -> Vec<(u64, u64)> {
    let mut owned = 0;
    let mut revokes = Vec::new();
    for (i, line) in rebalance_lines(consumer).iter().enumerate() {
        if line["message"] == "partitions assigned" {
            owned = line["assigned"].as_u64().expect("assigned is a count");
        } else {
            let revoked = line["revoked"].as_u64().expect("revoked is a count");
            if i >= skip {
                revokes.push((owned, revoked));
            }
            owned = owned.saturating_sub(revoked);
        }
    }
    revokes
}

/// Two replicas drain a backlog; a third joins, then one of the first two leaves with
/// SIGTERM. Rebalances are incremental (cooperative-sticky): only the partitions that
/// move stop, so the two replicas keep partitions and go on starting jobs while the
/// newcomer joins. A move redoes at most the jobs in flight on the moved partitions: the
/// revoking replica commits what it finished before it lets go and does not start what
/// it had fetched from them, so what runs again is what was running, plus what finished
/// above it (out of order) on those partitions. A replica that leaves finishes its jobs
/// and commits them first, so the leave redoes none. No job is lost.
#[tokio::test]
async fn a_replica_joining_then_one_leaving_under_load_redo_at_most_the_moved_jobs_in_flight() {
    const CONCURRENCY: usize = 4;
    const JOBS: usize = 3000;
    let _brokers = brokers_shared().await;
    let queue = unique("rescale");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let settings = vars(&[("JOBGATE_CONCURRENCY", "4"), ("JOBGATE_LOG_DELAY_MS", "40")]);
    let a = Consumer::start(BACKEND, &queue, &settings).await;
    let mut b = Consumer::start(BACKEND, &queue, &settings).await;
    BACKEND.wait_group_stable(&[&a, &b], KAFKA_PARTITIONS).await;
    let mut ids = Vec::new();
    for _ in 0..JOBS / 100 {
        ids.extend(producer.post_many(&queue, 100).await);
    }
    wait_until(Duration::from_secs(60), "200 jobs to be processed", || {
        std::future::ready(processing_counts(&[&a, &b]).len() >= 200)
    })
    .await;

    // The join. `a` and `b` must keep working through it: each keeps some of its
    // partitions at every revoke, and they start jobs between the first revoke and the
    // newcomer's first partitions.
    let (a_lines, b_lines) = (rebalance_lines(&a).len(), rebalance_lines(&b).len());
    let c = Consumer::start(BACKEND, &queue, &settings).await;
    let started = || a.started().len() + b.started().len();
    let mut started_at_revoke = None;
    wait_until(
        Duration::from_secs(60),
        "the newcomer to own partitions",
        || {
            if started_at_revoke.is_none()
                && !(revokes_after(&a, a_lines).is_empty() && revokes_after(&b, b_lines).is_empty())
            {
                started_at_revoke = Some(started());
            }
            let owns = rebalance_lines(&c)
                .last()
                .is_some_and(|l| l["assigned"].as_u64() > Some(0));
            std::future::ready(owns)
        },
    )
    .await;
    let started_at_assign = started();
    BACKEND
        .wait_group_stable(&[&a, &b, &c], KAFKA_PARTITIONS)
        .await;
    for (name, consumer, skip) in [("a", &a, a_lines), ("b", &b, b_lines)] {
        let revokes = revokes_after(consumer, skip);
        assert!(
            revokes.iter().all(|(owned, revoked)| revoked < owned),
            "replica {name} gave up all its partitions while a replica joined (owned, \
             revoked): {revokes:?}"
        );
    }
    let started_at_revoke = started_at_revoke.expect("a or b gave partitions up for c");
    assert!(
        started_at_assign > started_at_revoke,
        "a and b started no job between the first revoke ({started_at_revoke} started) and \
         the newcomer's assignment ({started_at_assign})"
    );
    let before_leave = processing_counts(&[&a, &b, &c]).len();
    assert!(
        before_leave < JOBS,
        "the backlog was drained before a replica left (raise JOBS)"
    );

    // The leave: b stops gracefully while the others drain.
    b.process.terminate();
    assert_eq!(b.process.wait_exit(Duration::from_secs(40)).await, Some(0));
    BACKEND.wait_group_stable(&[&a, &c], KAFKA_PARTITIONS).await;
    wait_until(
        Duration::from_secs(120),
        "every job to be processed",
        || std::future::ready(processing_counts(&[&a, &b, &c]).len() >= JOBS),
    )
    .await;
    let mut rest = [a, c];
    for consumer in &rest {
        consumer.process.terminate();
    }
    for consumer in &mut rest {
        assert_eq!(
            consumer.process.wait_exit(Duration::from_secs(40)).await,
            Some(0)
        );
    }
    let [a, c] = rest;
    assert_eq!(BACKEND.pending(&queue).await, 0, "everything was committed");

    let counts = processing_counts(&[&a, &b, &c]);
    let expected: BTreeSet<&String> = ids.iter().collect();
    let lost: Vec<_> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    let unknown: Vec<_> = counts.keys().filter(|id| !expected.contains(id)).collect();
    let extra_runs: usize = counts.values().map(|n| n - 1).sum();
    // Two replicas give partitions up at the join: each redoes at most its running jobs
    // and as many finished out of order above them. The leave redoes none.
    let allowed = 2 * 2 * CONCURRENCY;
    println!(
        "{JOBS} jobs: a processed {}, b {}, c {}; {extra_runs} extra runs (at most \
         {allowed} allowed); {} processed when b left; a and b started {} jobs while c \
         joined",
        a.processed().len(),
        b.processed().len(),
        c.processed().len(),
        before_leave,
        started_at_assign - started_at_revoke,
    );
    assert!(lost.is_empty(), "lost jobs: {lost:?}");
    assert!(
        unknown.is_empty(),
        "processed jobs nobody posted: {unknown:?}"
    );
    assert!(
        extra_runs <= allowed,
        "{extra_runs} extra runs, more than the jobs in flight on the moved partitions \
         ({allowed}): {:?}",
        counts.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
}

/// An operator deletes the job topic under a running producer and consumer. The
/// producer refuses jobs (503, "no queue for it") while the topic is missing and
/// creates it again; the
/// consumer goes on with the new topic from its start (its group's committed offsets
/// were past the new topic's end): every job accepted after is processed, each once,
/// with no restart. (RabbitMQ's side: `rabbitmq_only::a_queue_deleted_*`.)
#[tokio::test]
async fn a_topic_deleted_by_hand_is_created_again_and_the_jobs_after_are_processed() {
    let _brokers = brokers_shared().await;
    let queue = unique("ktopic");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let consumer = Consumer::start(BACKEND, &queue, &[]).await;
    let mut ids = producer.post_many(&queue, 6).await;
    assert_processed_exactly_once(&[&consumer], &ids, Duration::from_secs(60)).await;

    kafka::delete_topics(&[queue.as_str()]).await;
    // Until the topic is back every job is refused, never accepted and dropped.
    let started = std::time::Instant::now();
    loop {
        let response = producer.post(&queue, "{}").await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or_default();
        if status == 202 {
            ids.push(body["job_id"].as_str().expect("job_id").to_owned());
            break;
        }
        // Answered as missing at once, not after the publish timeout: librdkafka
        // waited 30 s for a missing topic to "propagate", so every request timed out
        // (503 "did not confirm in time") and the topic was created again only then.
        assert_eq!(status, 503, "while the topic is missing: {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("has no queue for it"),
            "a missing topic is answered as missing: {body}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the producer did not take jobs again within 60 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ids.extend(producer.post_many(&queue, 6).await);
    assert_processed_exactly_once(&[&consumer], &ids, Duration::from_secs(60)).await;
}
