//! Deliveries that end without an outcome count as attempts (issue 12, item 4): a job
//! whose consumer dies while running it comes back as its next attempt, and a job that
//! kills every consumer that runs it (a poison message) ends in `Q.dlq` with the reason
//! once its attempts are used up, instead of taking down replica after replica forever.
//! On RabbitMQ the quorum queue counts the deliveries; on Kafka the consumer counts the
//! starts in the metadata of the offsets its group commits. And `Q.dlq` itself cannot
//! drop a dead job however often it is listed.

use std::path::PathBuf;
use std::time::Duration;

use crate::helpers::{
    brokers_shared, dlq, rabbit, unique, vars, wait_until, Backend, Consumer, Producer,
};

const LIMIT: Duration = Duration::from_secs(90);
/// Attempts a job gets in all.
const MAX_ATTEMPTS: u32 = 2;
/// Consumer processes the poison job may take down before the test gives up: it must
/// take down `MAX_ATTEMPTS` of them, and no more.
const LIVES: usize = 4;

on_both_backends!(a_job_that_kills_its_consumer_is_dead_lettered_once_its_attempts_are_used);

/// A scratch directory of this test's own.
pub(crate) fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(name));
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// The `exec` handler's command: records the attempt it saw (a line in `DIR/<job id>`);
/// for the body `poison` it works `delay` seconds and then kills the consumer that runs
/// it (its parent); any other body succeeds.
fn killer(dir: &std::path::Path, delay: &str) -> String {
    let script = r#"body=$(cat); echo "$JOB_ATTEMPT" >> "$0/$JOB_ID"; if [ "$body" = poison ]; then sleep "$1"; kill -9 $PPID; sleep 10; fi"#;
    shell_words(&["sh", "-c", script, dir.to_str().expect("UTF-8 path"), delay])
}

/// Words joined so that `JOBGATE_EXEC_COMMAND` splits them back (single quotes).
pub(crate) fn shell_words(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Consumer settings whose every job fails (`exit 3`) on its one attempt, so it goes to
/// `Q.dlq` at once; plus `extra`.
pub(crate) fn failing_for_good(extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vars(&[
        ("JOBGATE_HANDLER", "exec"),
        ("JOBGATE_EXEC_COMMAND", "sh -c 'exit 3'"),
        ("JOBGATE_MAX_ATTEMPTS", "1"),
    ]);
    env.extend(vars(extra));
    env
}

pub async fn a_job_that_kills_its_consumer_is_dead_lettered_once_its_attempts_are_used(
    backend: Backend,
) {
    poison_kills_its_consumers(backend, "0.3", Before::Nothing).await;
}

/// What happens on the queue before the poison job is posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Before {
    Nothing,
    /// A consumer does jobs on every partition and stops in order: on Kafka its last
    /// commits say that it left no start unrecorded (a hand-over).
    OrderlyStop,
}

/// Kafka records a job's first start in the background: a consumer killed at once, before
/// that commit lands, leaves it unrecorded. The next owner waits for the commit of every
/// start near the highest recorded one (or near where it starts consuming), so the job
/// is counted from its second start on, and still dead-lettered after its attempts.
#[tokio::test]
async fn kafka_a_job_that_kills_its_consumer_at_once_is_dead_lettered_too() {
    poison_kills_its_consumers(Backend::Kafka, "0", Before::Nothing).await;
}

/// After an orderly hand-over the next owner is not careful where the last one was
/// not (issue 15), but its own first starts still wait for a commit of its own: if
/// they did not, the hand-over would stay the group's last commit when it dies, and
/// a job that kills it at once would never be counted.
#[tokio::test]
async fn kafka_a_job_that_kills_its_consumer_at_once_after_an_orderly_hand_over_is_dead_lettered_too(
) {
    poison_kills_its_consumers(Backend::Kafka, "0", Before::OrderlyStop).await;
}

/// The metadata of the offsets group `jobgate.<queue>` committed, one per partition.
async fn committed_metadata(queue: &str) -> Vec<String> {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || {
        use crate::helpers::kafka;
        let client = kafka::client(&kafka::group(&queue));
        let partitions = kafka::partitions_of(&client, &queue).expect("the topic exists");
        let mut tpl = rdkafka::TopicPartitionList::new();
        for partition in 0..partitions {
            tpl.add_partition(&queue, partition);
        }
        kafka::committed(&client, &tpl)
            .elements()
            .iter()
            .map(|e| e.metadata().to_owned())
            .collect()
    })
    .await
    .expect("read the committed offsets")
}

async fn poison_kills_its_consumers(backend: Backend, delay: &str, before: Before) {
    let _brokers = brokers_shared().await;
    let queue = unique("poison");
    let _cleanup = backend.cleanup(&[&queue]);
    let dir = scratch("poison");
    let producer = Producer::start(backend, &[&queue], &[]).await;
    let max_attempts = MAX_ATTEMPTS.to_string();
    let env = vars(&[
        ("JOBGATE_HANDLER", "exec"),
        ("JOBGATE_EXEC_COMMAND", &killer(&dir, delay)),
        ("JOBGATE_MAX_ATTEMPTS", &max_attempts),
        ("JOBGATE_CONCURRENCY", "1"),
    ]);
    if before == Before::OrderlyStop {
        // 60 jobs keyed by random ids leave none of the 6 partitions without one but
        // about once in 10 000 runs.
        let mut ids = Vec::new();
        for _ in 0..60 {
            ids.push(producer.post_ok(&queue, "fine").await);
        }
        let mut first = Consumer::start(backend, &queue, &env).await;
        wait_until(LIMIT, "the first consumer to do every job", || {
            let done = first.process.lines("job settled").len() >= ids.len();
            std::future::ready(done)
        })
        .await;
        first.process.terminate();
        assert_eq!(first.process.wait_exit(LIMIT).await, Some(0));
        if backend == Backend::Kafka {
            let metadata = committed_metadata(&queue).await;
            assert!(
                metadata
                    .iter()
                    .all(|m| m.starts_with("jobgate-starts-v1:h")),
                "every partition handed over: {metadata:?}"
            );
        }
    }
    let poison = producer.post_ok(&queue, "poison").await;
    let not_run_again = |consumer: &Consumer| {
        consumer
            .process
            .lines("job not run again")
            .iter()
            .any(|l| l["job_id"] == poison.as_str())
    };

    // A supervisor's loop: start a replica, and another one when the job killed it.
    let mut killed = 0;
    let survivor = loop {
        assert!(
            killed < LIVES,
            "the poison job killed {killed} consumers and was never dead-lettered"
        );
        let mut consumer = Consumer::start(backend, &queue, &env).await;
        wait_until(
            LIMIT,
            "the job to kill the consumer or be dead-lettered",
            || {
                let done = consumer.process.has_exited() || not_run_again(&consumer);
                std::future::ready(done)
            },
        )
        .await;
        if not_run_again(&consumer) {
            break consumer;
        }
        killed += 1;
    };
    assert_eq!(killed, MAX_ATTEMPTS as usize, "one replica per attempt");
    let seen = std::fs::read_to_string(dir.join(&poison)).expect("the handler's record");
    assert_eq!(
        seen.lines().collect::<Vec<_>>(),
        ["1", "2"],
        "the redelivery after the first kill is attempt 2"
    );

    wait_until(LIMIT, "the job to be in the DLQ", || async {
        dlq::list(backend, &queue)
            .await
            .iter()
            .any(|d| d["job_id"] == poison.as_str())
    })
    .await;
    let dead = dlq::list(backend, &queue).await;
    let letter = dead
        .iter()
        .find(|d| d["job_id"] == poison.as_str())
        .expect("dead-lettered");
    assert_eq!(letter["attempts"], u64::from(MAX_ATTEMPTS), "{letter}");
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("delivered 2 times without an outcome (the consumer crashed"),
        "{reason}"
    );

    // The replica that dead-lettered it lives on and does the next job.
    let next = producer.post_ok(&queue, "fine").await;
    wait_until(LIMIT, "the next job to be done", || {
        let done = survivor
            .process
            .lines("job settled")
            .iter()
            .any(|l| l["job_id"] == next.as_str() && l["outcome"] == "Done");
        std::future::ready(done)
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn rabbitmq_dead_letter_queue_has_a_delivery_limit_and_listing_never_drops_a_letter() {
    const BACKEND: Backend = Backend::Rabbitmq;
    /// More listings than RabbitMQ 4's default delivery limit (20).
    const LISTINGS: usize = 25;
    let _brokers = brokers_shared().await;
    let queue = unique("dlqlimit");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let dlq_name = format!("{queue}.dlq");
    let info = rabbit::queue_info(&dlq_name).await.expect("Q.dlq declared");
    assert_eq!(info["type"], "quorum");
    assert_eq!(
        info["arguments"]["x-delivery-limit"],
        jobgate_shared::broker::rabbitmq::DLQ_DELIVERY_LIMIT,
        "{info}"
    );
    let _consumer = Consumer::start(BACKEND, &queue, &failing_for_good(&[])).await;
    let id = producer.post_ok(&queue, "doomed").await;
    wait_until(LIMIT, "the job to be dead-lettered", || async {
        rabbit::ready_count(&dlq_name).await == 1
    })
    .await;
    for listing in 1..=LISTINGS {
        let dead = dlq::list(BACKEND, &queue).await;
        assert!(
            dead.iter().any(|d| d["job_id"] == id.as_str()),
            "listing {listing} lost the dead job: {dead:?}"
        );
    }
    // Each listing handed it out once: the broker counted them all and kept it.
    let peeked = rabbit::peek(&dlq_name, 1).await;
    let count = peeked[0]["properties"]["headers"]["x-delivery-count"]
        .as_u64()
        .unwrap_or_default();
    assert!(count >= LISTINGS as u64, "{peeked:?}");
}

#[tokio::test]
async fn rabbitmq_dead_letter_queue_declared_by_an_earlier_jobgate_keeps_working() {
    const BACKEND: Backend = Backend::Rabbitmq;
    let _brokers = brokers_shared().await;
    let queue = unique("olddlq");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let dlq_name = format!("{queue}.dlq");
    // As jobgate declared it before it set a delivery limit.
    let response = reqwest::Client::new()
        .put(format!(
            "{}/api/queues/%2f/{dlq_name}",
            crate::helpers::MANAGEMENT_URL
        ))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({"durable": true, "arguments": {"x-queue-type": "quorum"}}))
        .send()
        .await
        .expect("declare the old Q.dlq");
    assert!(response.status().is_success(), "{}", response.status());

    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let consumer = Consumer::start(BACKEND, &queue, &failing_for_good(&[])).await;
    let id = producer.post_ok(&queue, "doomed").await;
    wait_until(LIMIT, "the job to be dead-lettered", || async {
        dlq::list(BACKEND, &queue)
            .await
            .iter()
            .any(|d| d["job_id"] == id.as_str())
    })
    .await;
    let info = rabbit::queue_info(&dlq_name).await.expect("Q.dlq");
    assert!(
        info["arguments"]["x-delivery-limit"].is_null(),
        "left as it was: {info}"
    );
    let warned = consumer.process.last_where(|l| {
        l["queue"] == dlq_name.as_str()
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("without a delivery limit"))
    });
    assert!(warned.is_some(), "{}", consumer.process.dump());
}
