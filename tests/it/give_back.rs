//! A retry or dead-letter copy the broker does not take is never a reason to give the
//! job back (issue 12, item 2): the job keeps its worker slot and the copy is published
//! again with backoff until the broker confirms it; then the original is acked. On
//! Kafka a give-back would freeze the partition's commits (a record cannot be handed
//! back), on RabbitMQ it would loop the job through the handler at full speed.
//!
//! Only the copies fail, the brokers stay up (so the tests share them): on Kafka the
//! dead-letter topic refuses records over 64 bytes for a while (`max.message.bytes`,
//! a topic config); on RabbitMQ a policy caps the dead-letter queue at one message with
//! `overflow: reject-publish` while fillers are in it, so the broker nacks the copies
//! (the fillers are taken out again to end it). Every job fails for good (one attempt), so each must end in `Q.dlq` exactly
//! once, after a single run of the handler, with nothing left behind.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::consumer_metrics::listener_url;
use crate::helpers::{
    brokers_shared, dlq, scraped, unique, wait_until, Backend, Consumer, Producer, KAFKA_PARTITIONS,
};
use crate::redelivery::failing_for_good;

const LIMIT: Duration = Duration::from_secs(90);
/// Jobs posted; the consumer runs two at a time, so some wait behind the stuck ones.
const JOBS: usize = 5;
/// How long the dead-letter queue refuses copies: longer than the few tries (about
/// 1.5 s) after which the consumer used to give a job back.
const REFUSING: Duration = Duration::from_secs(8);

on_both_backends!(a_copy_the_broker_refuses_keeps_its_job_until_the_broker_takes_it);

/// Makes the broker refuse what is published to `Q.dlq`, and lets it take it again.
mod refuse {
    use super::*;

    /// Kafka: `max.message.bytes` of the dead-letter topic; RabbitMQ: a policy on the
    /// dead-letter queue (see the module doc).
    pub async fn start(backend: Backend, queue: &str) {
        match backend {
            Backend::Kafka => kafka::set_dlq_max_bytes(queue, Some("64")).await,
            Backend::Rabbitmq => rabbitmq::start(queue).await,
        }
    }

    pub async fn stop(backend: Backend, queue: &str) {
        match backend {
            Backend::Kafka => kafka::set_dlq_max_bytes(queue, None).await,
            Backend::Rabbitmq => rabbitmq::stop(queue).await,
        }
    }

    /// Removes what `start` left on the broker beyond the test's queues (the RabbitMQ
    /// policy) when dropped, passed or failed. The Kafka setting goes with the topic.
    pub struct Forget {
        pub backend: Backend,
        pub queue: String,
    }

    impl Drop for Forget {
        fn drop(&mut self) {
            if self.backend != Backend::Rabbitmq {
                return;
            }
            let queue = std::mem::take(&mut self.queue);
            // Drop cannot await: a thread with a runtime of its own, as `Cleanup` does.
            let _ = std::thread::spawn(move || {
                if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    runtime.block_on(rabbitmq::forget(&queue));
                }
            })
            .join();
        }
    }

    mod kafka {
        use std::time::Duration;

        use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
        use rdkafka::client::DefaultClientContext;
        use rdkafka::ClientConfig;

        use crate::helpers::KAFKA_BROKERS;

        /// Sets (or, with `None`, removes) the `max.message.bytes` of `Q.dlq`, keeping
        /// its `min.insync.replicas` (AlterConfigs replaces the whole set).
        pub async fn set_dlq_max_bytes(queue: &str, max: Option<&str>) {
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", KAFKA_BROKERS)
                .create()
                .expect("admin client");
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            let dlq = format!("{queue}.dlq");
            let described = admin
                .describe_configs([&ResourceSpecifier::Topic(&dlq)], &options)
                .await
                .expect("DescribeConfigs");
            let config = described
                .into_iter()
                .next()
                .expect("one resource")
                .expect("the DLQ topic's config");
            let min_insync = config
                .get("min.insync.replicas")
                .and_then(|e| e.value.clone())
                .expect("min.insync.replicas");
            let mut alter = AlterConfig::new(ResourceSpecifier::Topic(&dlq))
                .set("min.insync.replicas", &min_insync);
            if let Some(max) = max {
                alter = alter.set("max.message.bytes", max);
            }
            for result in admin
                .alter_configs([&alter], &options)
                .await
                .expect("AlterConfigs")
            {
                result.expect("the DLQ topic's config altered");
            }
        }
    }

    mod rabbitmq {
        use std::time::Duration;

        use lapin::options::{
            BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        };

        use crate::helpers::{rabbit, wait_until, MANAGEMENT_URL};

        fn policy_url(queue: &str) -> String {
            format!("{MANAGEMENT_URL}/api/policies/%2f/{queue}-refuse-dlq")
        }

        /// Applies a policy of `max-length` with `overflow: reject-publish` to `Q.dlq`.
        async fn cap(queue: &str, max_length: u64) {
            let dlq = format!("{queue}.dlq");
            let policy = serde_json::json!({
                "pattern": format!("^{}$", dlq.replace('.', "\\.")),
                "apply-to": "queues",
                "priority": 100,
                "definition": {"max-length": max_length, "overflow": "reject-publish"},
            });
            let response = reqwest::Client::new()
                .put(policy_url(queue))
                .basic_auth("guest", Some("guest"))
                .json(&policy)
                .send()
                .await
                .expect("PUT policy");
            assert!(response.status().is_success(), "{}", response.status());
        }

        /// Deletes the policy (at the end of the test, passed or failed).
        pub async fn forget(queue: &str) {
            let _ = reqwest::Client::new()
                .delete(policy_url(queue))
                .basic_auth("guest", Some("guest"))
                .send()
                .await;
        }

        /// Caps `Q.dlq` at one message, rejecting publishes beyond, and fills it: the
        /// first filler goes in, then the broker nacks (a quorum queue may take one
        /// message past its limit before it refuses).
        pub async fn start(queue: &str) {
            let dlq = format!("{queue}.dlq");
            cap(queue, 1).await;
            let conn = rabbit::connect().await;
            let channel = conn.create_channel().await.unwrap();
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            wait_until(
                Duration::from_secs(30),
                "the dead-letter queue to refuse a filler",
                || async {
                    let confirm = channel
                        .basic_publish(
                            "".into(),
                            dlq.as_str().into(),
                            BasicPublishOptions::default(),
                            b"filler",
                            lapin::BasicProperties::default().with_message_id("filler".into()),
                        )
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                    confirm.is_nack()
                },
            )
            .await;
            let _ = conn.close(200, "bye".into()).await;
        }

        /// Raises the cap and takes the fillers out: a quorum queue lifts its refusal
        /// when it next finds itself below its limit, and never when it has none (so
        /// deleting the policy would not do).
        pub async fn stop(queue: &str) {
            cap(queue, 1_000_000).await;
            let conn = rabbit::connect().await;
            let channel = conn.create_channel().await.unwrap();
            let dlq = format!("{queue}.dlq");
            let mut taken = 0;
            while let Some(message) = channel
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .expect("basic.get")
            {
                let filler = message.delivery.properties.message_id().as_ref();
                assert_eq!(
                    filler.map(|id| id.as_str()),
                    Some("filler"),
                    "only fillers yet"
                );
                channel
                    .basic_ack(message.delivery.delivery_tag, BasicAckOptions::default())
                    .await
                    .expect("basic.ack");
                taken += 1;
            }
            assert!(taken >= 1, "the fillers were there");
            let _ = conn.close(200, "bye".into()).await;
        }
    }
}

/// "job started" lines by job id, counted.
fn starts(consumer: &Consumer) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for id in consumer.started() {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Failed tries of a copy that the consumer logged, by job id.
fn failed_tries(consumer: &Consumer) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let lines = consumer.process.lines(
        "could not publish the job's outcome; the job keeps its slot and the copy is tried again",
    );
    for line in lines {
        let id = line["job_id"].as_str().unwrap_or_default().to_owned();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

pub async fn a_copy_the_broker_refuses_keeps_its_job_until_the_broker_takes_it(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("refused");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let mut consumer = Consumer::start(
        backend,
        &queue,
        &failing_for_good(&[
            ("JOBGATE_CONCURRENCY", "2"),
            ("JOBGATE_METRICS_LISTEN", "127.0.0.1:0"),
        ]),
    )
    .await;
    backend
        .wait_group_stable(&[&consumer], KAFKA_PARTITIONS)
        .await;
    let _forget = refuse::Forget {
        backend,
        queue: queue.clone(),
    };
    refuse::start(backend, &queue).await;
    let ids = producer.post_many(&queue, JOBS).await;

    // The copies of the jobs that run are refused again and again; they keep their
    // slots, so the other jobs wait, and none of them runs twice.
    wait_until(LIMIT, "two jobs to start", || {
        std::future::ready(starts(&consumer).len() >= 2)
    })
    .await;
    tokio::time::sleep(REFUSING).await;
    let held = starts(&consumer);
    assert_eq!(
        held.values().copied().collect::<Vec<_>>(),
        [1, 1],
        "two slots, held by their jobs while the copies fail: {held:?}\n{}",
        consumer.process.dump()
    );
    let tries = failed_tries(&consumer);
    assert!(
        tries.len() == 2 && tries.values().all(|n| *n >= 4),
        "each copy is tried again and again: {tries:?}"
    );
    refuse::stop(backend, &queue).await;

    wait_until(LIMIT, "every job's copy to be in the DLQ", || async {
        let dead = dlq::list(backend, &queue).await;
        ids.iter()
            .all(|id| dead.iter().any(|d| d["job_id"] == id.as_str()))
    })
    .await;
    let dead = dlq::list(backend, &queue).await;
    for id in &ids {
        let copies = dead.iter().filter(|d| d["job_id"] == id.as_str()).count();
        assert_eq!(copies, 1, "job {id} is in the DLQ once: {dead:?}");
    }
    let runs = starts(&consumer);
    for id in &ids {
        assert_eq!(runs.get(id), Some(&1), "job {id} ran once: {runs:?}");
    }
    let base = listener_url(&consumer).await;
    let text = scraped::fetch(&reqwest::Client::new(), &base).await;
    let labels = format!("queue=\"{queue}\"");
    let refused = scraped::sample(&text, "jobgate_outcome_publish_failures_total", &labels);
    assert!(refused.is_some_and(|n| n >= 4.0), "{text}");

    // Nothing left behind: on Kafka every partition's committed offset reaches its end.
    if backend == Backend::Kafka {
        wait_until(
            LIMIT,
            "the group to commit every partition to its end",
            || async { backend.pending(&queue).await == 0 },
        )
        .await;
    }
    consumer.process.terminate();
    assert_eq!(consumer.process.wait_exit(LIMIT).await, Some(0));
    assert_eq!(backend.pending(&queue).await, 0, "no job left in {queue}");
}
