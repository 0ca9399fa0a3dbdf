//! Scenarios that only make sense on Kafka: the record on the wire, and a consumer
//! killed while its group shares the partitions.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::Consumer as _;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

use crate::helpers::{
    brokers_shared, kafka, processing_counts, unique, vars, wait_until, Backend, Consumer,
    Producer, KAFKA_PARTITIONS,
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
