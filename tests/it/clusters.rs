//! jobgate on the three-node loopback clusters of `scripts/brokers.sh` (`up
//! rabbitmq-cluster`, `up kafka-cluster`; scripts/lib/cluster.sh), nodes killed and
//! restarted under load, with the ledger of `faults.rs`: every job answered 202 is
//! processed (lost = 202'd and never processed: never allowed), answers during a
//! failover are 202 or a 503 problem within the publish timeout, and the same producer
//! and consumers carry on without a restart. The binaries get the cluster from
//! `scripts/brokers.sh env` (a list of AMQP URLs, a bootstrap list).
//!
//! Each scenario holds the brokers exclusively (three more brokers on two cores), starts
//! its cluster and stops it at the end.

use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::Consumer as _;
use serde_json::Value;

use crate::faults::{in_flight_window, Expect, Ledger, PUBLISH_TIMEOUT};
use crate::helpers::{
    assert_problem, brokers_exclusive, brokers_sh, kafka, unique, Backend, Consumer, Producer,
    Site, KAFKA_PARTITIONS,
};
use crate::macros::SCENARIO_LIMIT;

const REPLICAS: usize = 2;
const CONCURRENCY: usize = 4;
const HANDLER: Duration = Duration::from_millis(50);

#[tokio::test]
async fn rabbitmq_cluster_nodes_killed_and_restarted_under_load_lose_no_job() {
    bounded(rabbitmq_cluster_failover()).await;
}

#[tokio::test]
async fn kafka_cluster_leader_killed_and_brokers_restarted_under_load_lose_no_job() {
    bounded(kafka_cluster_failover()).await;
}

async fn bounded(scenario: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(SCENARIO_LIMIT * 3, scenario)
        .await
        .expect("the cluster scenario finished within 3 × SCENARIO_LIMIT");
}

/// Stops a cluster when dropped, also when the scenario failed: three more brokers
/// would slow down every test after it.
struct ClusterUp(&'static str);

impl ClusterUp {
    async fn start(cluster: &'static str) -> Self {
        brokers_sh(&["up", cluster]).await;
        Self(cluster)
    }
}

impl Drop for ClusterUp {
    fn drop(&mut self) {
        let status = std::process::Command::new("bash")
            .arg(crate::helpers::workspace_root().join("scripts/brokers.sh"))
            .args(["down", self.0])
            .stdin(std::process::Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("scripts/brokers.sh down {} failed: {status:?}", self.0);
        }
    }
}

/// One fault of a scenario: what to do, and what undoes it.
struct Fault {
    name: String,
    inject: Vec<String>,
    heal: Vec<String>,
}

impl Fault {
    fn new(name: String, inject: &[&str], heal: &[&str]) -> Self {
        let own = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect();
        Self {
            name,
            inject: own(inject),
            heal: own(heal),
        }
    }
}

/// SIGKILLs node `n` of the `family` cluster (`rabbitmq`, `kafka`) under load and
/// starts it again once `answered` requests met the fault; returns `answered`.
async fn sigkilled_under_load(
    ledger: &Ledger,
    family: &str,
    n: usize,
    whose: &str,
    answered: usize,
) -> usize {
    let node = format!("{family}-{n}");
    let fault = Fault::new(
        format!("SIGKILL of {node}, {whose}"),
        &["kill", &node],
        &["up", &node],
    );
    under_load(ledger, &fault, answered).await;
    answered
}

/// Restarts the three nodes of the `family` cluster one after the other under load
/// (a rolling restart), each once `answered` (+4 a node) requests met it; returns the
/// count reached.
async fn restarted_one_by_one_under_load(ledger: &Ledger, family: &str, answered: usize) -> usize {
    let mut answered = answered;
    for n in 1..=3 {
        answered += 4;
        let node = format!("{family}-{n}");
        let fault = Fault::new(
            format!("rolling restart: {node}"),
            &["restart", &node],
            &["up", &node],
        );
        under_load(ledger, &fault, answered).await;
    }
    answered
}

async fn brokers(args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    brokers_sh(&args).await;
}

/// Runs `fault` while the ledger's load goes on: inject, wait until `answered` requests
/// (counted over the whole scenario) met a fault, heal (also when the wait failed).
async fn under_load(ledger: &Ledger, fault: &Fault, answered: usize) {
    println!("cluster fault: {}", fault.name);
    let start = std::time::Instant::now();
    ledger.fault_begins();
    let outcome = std::panic::AssertUnwindSafe(async {
        brokers(&fault.inject).await;
        ledger.wait_answered_during_fault(answered).await;
    })
    .catch_unwind()
    .await;
    let healing = start.elapsed();
    brokers(&fault.heal).await;
    ledger.fault_ends();
    println!(
        "cluster fault: {}: healing after {healing:?}, healed after {:?}",
        fault.name,
        start.elapsed()
    );
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The same producer, not restarted, after the last fault: ready again, a 202 once the
/// broker has settled (a queue leader elected, partitions led), then 202 after 202.
async fn carries_on(ledger: &Ledger, producer: &Producer) {
    let start = std::time::Instant::now();
    producer.wait_ready(Duration::from_secs(60)).await;
    let ready = start.elapsed();
    let first_202 = ledger
        .post_until_accepted(producer, Duration::from_secs(30))
        .await;
    println!("after the faults: ready in {ready:?}, then the first 202 in {first_202:?}");
    ledger.post_expecting_202(producer, 20).await;
}

/// A ledger of `queue` on `backend`'s cluster, a producer and [`REPLICAS`] consumers
/// pointed at the cluster (`scripts/brokers.sh env`).
async fn on_the_cluster(
    backend: Backend,
    queue: &str,
) -> (std::sync::Arc<Ledger>, Producer, Vec<Consumer>) {
    let env = Site::Cluster.env(backend);
    let ledger = Ledger::at(backend, Site::Cluster, queue);
    let producer = Producer::start(
        backend,
        &[queue],
        &[env.clone(), ledger.producer_env()].concat(),
    )
    .await;
    let mut consumers = Vec::new();
    for _ in 0..REPLICAS {
        let settings = [env.clone(), ledger.consumer_env(CONCURRENCY, HANDLER)].concat();
        consumers.push(Consumer::start(backend, queue, &settings).await);
    }
    (ledger, producer, consumers)
}

/// A GET of the RabbitMQ cluster's management API, from the first node that answers.
async fn cluster_management(path: &str) -> Value {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for port in [15681, 15682, 15683] {
        let url = format!("http://127.0.0.1:{port}/api/{path}");
        if let Ok(response) = http
            .get(&url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await
        {
            if let Ok(response) = response.error_for_status() {
                return response.json().await.expect("JSON from the management API");
            }
        }
    }
    panic!("no node of the RabbitMQ cluster answered GET /api/{path}");
}

/// The node (1 to 3) that process `pid`'s AMQP connections are on, as the management
/// API sees them once they are there.
async fn rabbit_node_of(pid: u32) -> usize {
    let suffix = format!(":{pid}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let connections = cluster_management("connections").await;
        let node = connections.as_array().into_iter().flatten().find_map(|c| {
            // "jobgate-producer@host:PID queues" on node "jobgate-N@localhost"
            let name = c["client_properties"]["connection_name"].as_str()?;
            let owned = name.split(' ').next()?.ends_with(&suffix);
            let node = c["node"].as_str()?.strip_prefix("jobgate-")?;
            owned.then(|| node[..1].parse::<usize>().ok())?
        });
        if let Some(node) = node {
            return node;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection of pid {pid} in the cluster's management API after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn rabbitmq_cluster_failover() {
    let _brokers = brokers_exclusive().await;
    let _cluster = ClusterUp::start("rabbitmq-cluster").await;
    let backend = Backend::Rabbitmq;
    let queue = unique("cluster");
    let (ledger, producer, mut consumers) = on_the_cluster(backend, &queue).await;
    let load = ledger.load(&producer, 1_000_000, 4, Duration::from_millis(100));
    ledger.wait_accepted(50).await;

    let producer_node = rabbit_node_of(producer.process.pid()).await;
    let answered =
        sigkilled_under_load(&ledger, "rabbitmq", producer_node, "the producer's", 8).await;
    let consumer_node = rabbit_node_of(consumers[0].process.pid()).await;
    let answered = sigkilled_under_load(
        &ledger,
        "rabbitmq",
        consumer_node,
        "a consumer's",
        answered + 8,
    )
    .await;
    restarted_one_by_one_under_load(&ledger, "rabbitmq", answered).await;
    load.stop().await;
    carries_on(&ledger, &producer).await;
    ledger
        .settle_and_verify(
            &mut consumers,
            &Expect {
                fault: "RabbitMQ cluster: two nodes SIGKILLed, a rolling restart",
                broker_down: true,
                producer_stops: false,
                // Each of the 5 disruptions may cut every consumer off once.
                max_duplicates: 5 * in_flight_window(backend, REPLICAS, CONCURRENCY, HANDLER),
            },
        )
        .await;

    // A minority: with two of the three nodes stopped, no job gets a 202.
    brokers_sh(&["down", "rabbitmq-2"]).await;
    brokers_sh(&["down", "rabbitmq-3"]).await;
    let refused = async {
        for n in 0..5 {
            let started = std::time::Instant::now();
            let response = producer.post(&queue, "{}").await;
            let took = started.elapsed();
            println!("minority: answer {n} after {took:?}");
            assert!(
                took < PUBLISH_TIMEOUT + Duration::from_secs(3),
                "a minority answered after {took:?}"
            );
            assert_problem(response, 503, "broker-unavailable").await;
        }
    };
    let outcome = std::panic::AssertUnwindSafe(refused).catch_unwind().await;
    brokers_sh(&["up", "rabbitmq-cluster"]).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    // It recovers: ready again, 503 problems while the queue elects its leader, then 202.
    let start = std::time::Instant::now();
    producer.wait_ready(Duration::from_secs(60)).await;
    let ready = start.elapsed();
    loop {
        let response = producer.post(&queue, "{}").await;
        if response.status() == 202 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no 202 within 60 s of the majority's return"
        );
        assert_problem(response, 503, "broker-unavailable").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "the majority back: ready in {ready:?}, the first 202 after {:?}",
        start.elapsed()
    );
}

/// The broker (1 to 3) that leads partition 0 of `topic` on the cluster.
async fn kafka_leader_of(topic: &str) -> usize {
    let (bootstrap, topic) = (Site::Cluster.kafka_bootstrap(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let client = kafka::client_at(&bootstrap, "jobgate.test.metadata");
        let metadata = kafka::retrying(&format!("metadata of {topic}"), || {
            client.fetch_metadata(Some(&topic), Duration::from_secs(10))
        });
        let leader = metadata.topics()[0].partitions()[0].leader();
        usize::try_from(leader).expect("a leader id")
    })
    .await
    .unwrap()
}

async fn kafka_cluster_failover() {
    let _brokers = brokers_exclusive().await;
    let _cluster = ClusterUp::start("kafka-cluster").await;
    let backend = Backend::Kafka;
    let queue = unique("cluster");
    let (ledger, producer, mut consumers) = on_the_cluster(backend, &queue).await;
    backend
        .wait_group_stable(&consumers.iter().collect::<Vec<_>>(), KAFKA_PARTITIONS)
        .await;
    let load = ledger.load(&producer, 1_000_000, 4, Duration::from_millis(100));
    ledger.wait_accepted(50).await;

    let leader = kafka_leader_of(&queue).await;
    let answered =
        sigkilled_under_load(&ledger, "kafka", leader, "the partition leader's", 8).await;
    restarted_one_by_one_under_load(&ledger, "kafka", answered).await;
    load.stop().await;
    carries_on(&ledger, &producer).await;
    ledger
        .settle_and_verify(
            &mut consumers,
            &Expect {
                fault: "Kafka cluster: the leader SIGKILLed, a rolling restart",
                broker_down: true,
                producer_stops: false,
                max_duplicates: 4 * in_flight_window(backend, REPLICAS, CONCURRENCY, HANDLER),
            },
        )
        .await;
}
