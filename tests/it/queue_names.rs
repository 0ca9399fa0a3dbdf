//! Queue lists whose broker names collide, and the Kafka admin calls that asked the broker
//! about a topic twice: a producer started with `JOBGATE_QUEUES=q,q.dlq` on Kafka
//! died with SIGSEGV (librdkafka left a NULL in the CreateTopics results for the
//! duplicate `q.dlq`, and rdkafka read it); on RabbitMQ the job queue `q.dlq` was also
//! the dead-letter queue of `q`. Both binaries now refuse such a list at start, and the
//! topic admin calls cannot crash on a duplicate.

use std::time::Duration;

use jobgate_shared::broker::kafka::admin;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::helpers::{self, brokers_shared, unique, wait_until, Backend, Process, KAFKA_BROKERS};

on_both_backends!(a_queue_list_whose_names_collide_stops_the_start);

/// The producer (`JOBGATE_QUEUES`) and the consumer (`JOBGATE_QUEUE`) given a queue and
/// its dead-letter queue, or one queue twice: each exits with an error that names the
/// queue (not a crash by signal, not a process that runs), before it listens.
pub async fn a_queue_list_whose_names_collide_stops_the_start(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("names");
    let _cleanup = backend.cleanup(&[&queue]);
    let dlq = format!("{queue}.dlq");
    for (bin, variable) in [
        ("producer", "JOBGATE_QUEUES"),
        ("consumer", "JOBGATE_QUEUE"),
    ] {
        for (list, says) in [
            (
                format!("{queue},{dlq}"),
                format!("queue \"{dlq}\" is a name jobgate gives to a queue of \"{queue}\""),
            ),
            (
                format!("{queue},{queue}"),
                format!("queue \"{queue}\" is listed twice"),
            ),
        ] {
            let mut env = backend.env();
            env.extend([
                ("JOBGATE_LISTEN", "127.0.0.1:0".to_owned()),
                ("JOBGATE_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
                (variable, list.clone()),
            ]);
            let mut process = Process::spawn(bin, bin, &env).await;
            let code = process.wait_exit(Duration::from_secs(30)).await;
            assert!(
                matches!(code, Some(c) if c != 0),
                "{bin} with {variable}={list}: exit code {code:?} (None: killed by a signal)\n{}",
                process.dump()
            );
            // The exit may come before the last stderr line is read.
            wait_until(Duration::from_secs(5), "the start-up error", || {
                // Lines that are not JSON are kept as JSON strings: quotes escaped.
                std::future::ready(process.dump().replace("\\\"", "\"").contains(&says))
            })
            .await;
            assert!(process.lines("producer listening").is_empty());
        }
    }
}

/// CreateTopics and DeleteTopics through jobgate's admin calls with a topic named twice
/// before another: one result per distinct topic, in order, and no crash (asked in one
/// request, librdkafka answers `[a, NULL, b]` and rdkafka reads the NULL).
#[tokio::test]
async fn topic_admin_calls_take_a_topic_named_twice() {
    let _brokers = brokers_shared().await;
    let a = unique("twice");
    let b = format!("{a}-other");
    let _cleanup = Backend::Kafka.cleanup(&[&a, &b]);
    let client: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", KAFKA_BROKERS)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));

    let topics: Vec<NewTopic<'_>> = [&a, &a, &b]
        .iter()
        .map(|name| NewTopic::new(name, 1, TopicReplication::Fixed(1)))
        .collect();
    let created = admin::create_topics(&client, &topics, &options)
        .await
        .expect("CreateTopics answered");
    assert_eq!(created, vec![Ok(a.clone()), Ok(b.clone())]);
    assert_eq!(helpers::kafka::topic_partitions(&b).await, Some(1));

    let again = admin::create_topics(&client, &topics[..1], &options)
        .await
        .expect("CreateTopics answered");
    assert_eq!(
        again,
        vec![Err((a.clone(), RDKafkaErrorCode::TopicAlreadyExists))]
    );

    let deleted = admin::delete_topics(&client, &[a.as_str(), a.as_str(), b.as_str()], &options)
        .await
        .expect("DeleteTopics answered");
    assert_eq!(deleted, vec![Ok(a.clone()), Ok(b.clone())]);
}
