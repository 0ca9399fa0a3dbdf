//! The harness itself against a broker that is still starting: what a first run on a new
//! machine meets (a Kafka started seconds before answers group calls with
//! `NotCoordinator` or `CoordinatorLoadInProgress` for a while).

use std::time::Duration;

use crate::helpers::{
    brokers_exclusive, brokers_sh, kafka, unique, wait_until, Backend, KAFKA_BROKERS,
};

/// Whether something accepts TCP connections on the Kafka port.
async fn kafka_port_open() -> bool {
    tokio::net::TcpStream::connect(KAFKA_BROKERS).await.is_ok()
}

/// Kafka SIGKILLed and started again; as soon as its port accepts connections (before
/// `scripts/brokers.sh up kafka` has seen it usable), a test helper asks for the group's
/// committed offsets and the watermarks. It must wait through the broker's start-up
/// errors and answer, not fail on the first `NotCoordinator`.
#[tokio::test]
async fn kafka_helpers_wait_for_a_broker_that_is_still_starting() {
    let _brokers = brokers_exclusive().await;
    let topic = unique("starting");
    let _cleanup = Backend::Kafka.cleanup(&[&topic]);
    kafka::create_topics(&topic, 3, &[]).await;

    brokers_sh(&["kill", "kafka"]).await;
    assert!(!kafka_port_open().await, "Kafka is down after the kill");
    let starting = tokio::spawn(brokers_sh(&["up", "kafka"]));
    wait_until(
        Duration::from_secs(120),
        "Kafka's port to accept connections",
        kafka_port_open,
    )
    .await;

    // A new group on a just-started broker: its coordinator is not loaded yet.
    assert_eq!(
        Backend::Kafka.pending(&topic).await,
        0,
        "nothing was published to {topic}"
    );
    starting
        .await
        .expect("scripts/brokers.sh up kafka finished");
}
