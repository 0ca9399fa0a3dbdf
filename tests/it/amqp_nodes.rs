//! `JOBGATE_AMQP_URL` as a list of RabbitMQ nodes, with what a single node allows: a
//! list whose other nodes are dead (a closed port on loopback). Both binaries fail over
//! past a dead node to the live one and carry jobs exactly once; with every node dead
//! the producer stays unready, answers 503 and logs each node it tried, passwords
//! masked; a list that does not fit stops both binaries at start.
//!
//! The connections of one process start at consecutive nodes (see
//! `shared/src/broker/rabbitmq/nodes.rs`): with two nodes and two connections (the
//! producer's paths of two queues; the consumer's source and outcome publisher) one of
//! them starts at the dead node, so each binary is seen failing over.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    assert_processed_exactly_once, brokers_shared, refused_with, unique, unready_producer,
    wait_until, Backend, Consumer, Process, Producer, AMQP_URL,
};

/// A loopback port nobody listens on: bound, then let go (connections are refused).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A node on `port` with a password that must never be shown.
fn dead_node(port: u16) -> String {
    format!("amqp://guest:dead-node-s3cret@127.0.0.1:{port}/%2f")
}

fn amqp_url(list: String) -> Vec<(&'static str, String)> {
    vec![("JOBGATE_AMQP_URL", list)]
}

/// The live node as logs show it.
const LIVE_NODE_SHOWN: &str = "amqp://guest:***@127.0.0.1:5672/%2f";

/// Waits for `process` to log that it failed over past `dead` to the live node, and
/// checks that it connected to no other node and logged no password.
async fn failed_over(process: &Process, dead: u16) {
    let line = "RabbitMQ nodes did not answer; connected to the next";
    wait_until(
        Duration::from_secs(30),
        &format!("{} to fail over", process.name),
        || std::future::ready(!process.lines(line).is_empty()),
    )
    .await;
    let failover = &process.lines(line)[0];
    assert_eq!(failover["node"], LIVE_NODE_SHOWN, "{failover}");
    let failed = failover["failed"].as_str().unwrap_or_default();
    assert!(
        failed.starts_with(&format!("amqp://guest:***@127.0.0.1:{dead}/%2f: ")),
        "{failover}"
    );
    let connected = process.lines("connected to RabbitMQ");
    assert!(!connected.is_empty());
    assert!(
        connected
            .iter()
            .all(|l: &Value| l["node"] == LIVE_NODE_SHOWN),
        "{connected:?}"
    );
    assert!(!process.dump().contains("s3cret"), "{}", process.dump());
}

#[tokio::test]
async fn a_dead_first_node_is_skipped_and_every_job_is_carried_exactly_once() {
    let _brokers = brokers_shared().await;
    let (queue, other) = (unique("nodes"), unique("nodes-other"));
    let _cleanup = Backend::Rabbitmq.cleanup(&[&queue, &other]);
    let dead = closed_port();
    let env = amqp_url(format!("{}, {AMQP_URL}", dead_node(dead)));

    let producer = Producer::start(Backend::Rabbitmq, &[&queue, &other], &env).await;
    failed_over(&producer.process, dead).await;
    let ids = producer.post_many(&queue, 50).await;
    let others = producer.post_many(&other, 5).await;
    assert_eq!((ids.len(), others.len()), (50, 5));

    let consumer = Consumer::start(Backend::Rabbitmq, &queue, &env).await;
    failed_over(&consumer.process, dead).await;
    assert_processed_exactly_once(&[&consumer], &ids, Duration::from_secs(60)).await;
}

#[tokio::test]
async fn with_every_node_dead_the_producer_is_unready_and_names_the_nodes_it_tried() {
    let _brokers = brokers_shared().await;
    let queue = unique("nodes-dead");
    let (a, b) = (closed_port(), closed_port());
    let env = amqp_url(format!("{},{}", dead_node(a), dead_node(b)));
    let (process, base) = unready_producer(Backend::Rabbitmq, &queue, &env).await;
    refused_with(&process, &base, &queue, "no RabbitMQ node answered").await;

    let line = process
        .last_where(|l| l["message"] == "cannot connect to RabbitMQ")
        .expect("a line saying why");
    let error = line["error"].as_str().unwrap_or_default();
    for port in [a, b] {
        let shown = format!("amqp://guest:***@127.0.0.1:{port}/%2f: ");
        assert!(error.contains(&shown), "{line}");
    }
    assert!(!process.dump().contains("s3cret"), "{}", process.dump());
}

/// A list that does not fit is refused before anything connects: exit 1, the error
/// names the node's place, and no password is shown. No broker is involved.
#[tokio::test]
async fn a_node_list_that_does_not_fit_stops_both_binaries_at_start() {
    let live = "amqp://guest:list-s3cret@127.0.0.1:5672/%2f";
    for (binary, list, wants) in [
        (
            "producer",
            format!("{live},,{live}"),
            "JOBGATE_AMQP_URL: node 2 of 3 is empty",
        ),
        (
            "consumer",
            format!("{live}, amqps://guest:list-s3cret@127.0.0.1:5671/%2f"),
            "JOBGATE_AMQP_URL mixes amqp:// and amqps:// nodes",
        ),
        (
            "consumer",
            format!("{live},127.0.0.1:5673"),
            "JOBGATE_AMQP_URL: node 2 of 2 is not an AMQP URL",
        ),
    ] {
        let env = [
            ("JOBGATE_BACKEND", "rabbitmq".to_owned()),
            ("JOBGATE_LISTEN", "127.0.0.1:0".to_owned()),
            ("JOBGATE_QUEUES", "nodes-never".to_owned()),
            ("JOBGATE_QUEUE", "nodes-never".to_owned()),
            ("JOBGATE_AMQP_URL", list),
        ];
        let mut process = Process::spawn(binary, binary, &env).await;
        let code = process.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(code, Some(1), "{binary} with {wants:?}: {}", process.dump());
        wait_until(
            Duration::from_secs(5),
            &format!("{binary} to say {wants:?}"),
            || std::future::ready(process.dump().contains(wants)),
        )
        .await;
        assert!(!process.dump().contains("s3cret"), "{}", process.dump());
    }
}
