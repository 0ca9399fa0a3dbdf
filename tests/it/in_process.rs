//! Tests that run the real `consumer` library in-process against the real brokers, with
//! handlers of the test's own: jobs that finish out of order (Kafka offsets) and a
//! handler that panics. The library is what users embed (`consumer::run`), so this is
//! how they run it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use consumer::{run_with_source, ConsumerConfig, Handler, Job, JobMeta, Outcome, WorkerOptions};
use jobgate_shared::broker::kafka::{self as kafka_backend, KafkaPublisher, KafkaSource};
use jobgate_shared::broker::Publisher;
use rdkafka::consumer::BaseConsumer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::helpers::{
    brokers_shared, unique, wait_until, Backend, Producer, AMQP_URL, KAFKA_BROKERS as BROKERS,
};

const JOBS: i64 = 64;

/// Job n sleeps longer the earlier it is within each window of 8, so in every window
/// the last job finishes first.
struct ReverseOrderHandler {
    finished: Arc<Mutex<Vec<i64>>>,
}

#[async_trait]
impl Handler for ReverseOrderHandler {
    async fn handle(&self, job: &Job) -> Outcome {
        let n: i64 = std::str::from_utf8(&job.body).unwrap().parse().unwrap();
        let delay = u64::try_from(7 - n % 8).unwrap() * 60;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        self.finished.lock().unwrap().push(n);
        Outcome::Done
    }
}

/// The group's committed offset of partition 0 (`None` before the first commit).
fn committed(group: &str, topic: &str) -> Option<i64> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = crate::helpers::kafka::committed(&client, &tpl);
    match got.find_partition(topic, 0).unwrap().offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Kafka: with concurrency 8 on ONE partition, jobs finish out of order, and the
/// committed offset must never pass a job that has not finished. The test watches every
/// job finish while it samples the group's committed offset.
#[tokio::test]
async fn kafka_committed_offset_never_passes_an_unfinished_job_of_a_partition() {
    let _brokers = brokers_shared().await;
    let topic = unique("order");
    let _cleanup = Backend::Kafka.cleanup(&[&topic]);
    let group = format!("jobgate.{topic}");
    let spec = crate::helpers::kafka::create_topics(&topic, 1, &[]).await;

    // Publish sequentially: job n is at offset n of the single partition.
    let publisher = KafkaPublisher::start(kafka_backend::PublisherOptions {
        topics: spec.clone(),
        queues: vec![topic.clone()],
        retry_tiers: Vec::new(),
        publish_timeout: Duration::from_secs(10),
    })
    .unwrap();
    wait_until(Duration::from_secs(30), "the publisher to be ready", || {
        std::future::ready(publisher.is_ready())
    })
    .await;
    for n in 0..JOBS {
        let meta = JobMeta::new(topic.clone(), Some("text/plain".into()));
        publisher
            .publish(&meta, n.to_string().as_bytes())
            .await
            .unwrap();
    }
    publisher.close().await;

    let finished = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(ReverseOrderHandler {
        finished: Arc::clone(&finished),
    });
    let source = KafkaSource::new(kafka_backend::SourceOptions {
        topics: spec,
        queues: vec![topic.clone()],
        group_template: "jobgate.{queue}".into(),
        session_timeout: Duration::from_secs(6),
        retry_tiers: Vec::new(),
        publish_timeout: Duration::from_secs(10),
        job_timeout: None,
        queued_max_kbytes: consumer::config::DEFAULT_KAFKA_QUEUED_MAX_KBYTES,
        fetch_max_bytes: consumer::config::DEFAULT_KAFKA_FETCH_MAX_BYTES,
    });
    let all_done = {
        let finished = Arc::clone(&finished);
        async move {
            wait_until(Duration::from_secs(120), "every job to finish", || {
                std::future::ready(finished.lock().unwrap().len() == JOBS as usize)
            })
            .await;
        }
    };
    let options = WorkerOptions {
        concurrency: 8,
        shutdown_grace: Duration::from_secs(10),
        retry: jobgate_shared::retry::RetryPolicy {
            max_attempts: 1,
            base: Duration::from_secs(1),
            max: Duration::from_secs(1),
        },
        job_timeout: None,
        policy_ceilings: consumer::job_policy::Ceilings::default(),
        status: None,
        callbacks: None,
    };
    // Nothing is retried here: the outcome publisher is never used.
    let outcomes: jobgate_shared::broker::SharedPublisher =
        Arc::new(jobgate_shared::broker::memory::MemoryBroker::new());
    let worker = tokio::spawn(run_with_source(
        Box::new(source),
        outcomes,
        handler,
        options,
        all_done,
    ));

    // Sample the committed offset while jobs run. Read the offset first, then what has
    // finished: everything below a committed offset must have finished before it was
    // committed, so it must be in the later snapshot too.
    let mut samples_with_progress = 0;
    while !worker.is_finished() {
        let group = group.clone();
        let topic_name = topic.clone();
        let offset = tokio::task::spawn_blocking(move || committed(&group, &topic_name))
            .await
            .unwrap();
        let done: BTreeSet<i64> = finished.lock().unwrap().iter().copied().collect();
        if let Some(c) = offset {
            let unfinished_below: Vec<i64> = (0..c).filter(|n| !done.contains(n)).collect();
            assert!(
                unfinished_below.is_empty(),
                "committed offset {c} passes unfinished jobs {unfinished_below:?}"
            );
            if c > 0 && c < JOBS {
                samples_with_progress += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    worker
        .await
        .unwrap()
        .expect("the source ran until the worker shut down");

    let order = finished.lock().unwrap().clone();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_ne!(
        order, sorted,
        "jobs must have finished out of order for this test to mean anything"
    );
    assert_eq!(sorted, (0..JOBS).collect::<Vec<_>>(), "every job ran once");
    assert!(
        samples_with_progress > 0,
        "the offset was committed while jobs were still running"
    );
    let final_offset = tokio::task::spawn_blocking(move || committed(&group, &topic))
        .await
        .unwrap();
    assert_eq!(final_offset, Some(JOBS), "everything committed at shutdown");
}

/// Panics on the first attempt of a job whose body is "panic"; records every job done.
struct PanicsOnce {
    done: Arc<Mutex<Vec<(String, u32)>>>,
}

#[async_trait]
impl Handler for PanicsOnce {
    async fn handle(&self, job: &Job) -> Outcome {
        if &job.body[..] == b"panic" && job.meta.attempt == 1 {
            panic!("a bug in the handler");
        }
        self.done
            .lock()
            .unwrap()
            .push((job.meta.id.clone(), job.meta.attempt));
        Outcome::Done
    }
}

on_both_backends!(a_panicking_handler_is_a_failed_attempt_and_the_worker_keeps_going);

pub async fn a_panicking_handler_is_a_failed_attempt_and_the_worker_keeps_going(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("panic");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let mut args = vec![
        "consumer".to_owned(),
        format!("--queue={queue}"),
        "--retry-base-ms=200".to_owned(),
        "--retry-max-ms=200".to_owned(),
        "--concurrency=2".to_owned(),
    ];
    args.extend(match backend {
        Backend::Rabbitmq => vec![
            "--backend=rabbitmq".to_owned(),
            format!("--amqp-url={AMQP_URL}"),
        ],
        Backend::Kafka => vec![
            "--backend=kafka".to_owned(),
            format!("--kafka-brokers={BROKERS}"),
            "--kafka-session-timeout-ms=6000".to_owned(),
        ],
    });
    let config = ConsumerConfig::try_parse_from(&args).expect("valid flags");
    let done = Arc::new(Mutex::new(Vec::new()));
    let handler = PanicsOnce {
        done: Arc::clone(&done),
    };

    let panicking = producer.post_ok(&queue, "panic").await;
    let others = vec![
        producer.post_ok(&queue, "a").await,
        producer.post_ok(&queue, "b").await,
    ];
    let finished = {
        let done = Arc::clone(&done);
        let expected = 3;
        async move {
            wait_until(Duration::from_secs(90), "all three jobs to be done", || {
                std::future::ready(done.lock().unwrap().len() >= expected)
            })
            .await;
        }
    };
    consumer::run(config, handler, finished).await.unwrap();

    let done = done.lock().unwrap().clone();
    assert!(
        done.contains(&(panicking.clone(), 2)),
        "retried after the panic: {done:?}"
    );
    assert!(!done.iter().any(|(id, a)| *id == panicking && *a == 1));
    for id in &others {
        assert!(
            done.iter().any(|(d, _)| d == id),
            "the worker kept going: {done:?}"
        );
    }
}
