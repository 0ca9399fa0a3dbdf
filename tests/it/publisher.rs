//! The RabbitMQ publisher as a library, against the real broker: what a publish's
//! answer means when many are in flight on one channel.

use std::time::Duration;

use futures::StreamExt;
use jobgate_shared::broker::rabbitmq::{PublisherOptions, RabbitPublisher};
use jobgate_shared::broker::{PublishError, Publisher};
use jobgate_shared::config::SecretUrl;
use jobgate_shared::job::JobMeta;

use crate::helpers::{brokers_shared, rabbit, unique, wait_until, Backend, AMQP_URL};

/// Publishes `count` jobs, every other one to a queue that does not exist, `in_flight`
/// at a time, and returns (destination existed, answer) for each.
async fn publish_mixed(
    publisher: &RabbitPublisher,
    queue: &str,
    missing: &str,
    count: usize,
    in_flight: usize,
) -> Vec<(bool, Result<(), PublishError>)> {
    futures::stream::iter(0..count)
        .map(|n| async move {
            let routable = n % 2 == 0;
            let destination = if routable { queue } else { missing };
            let meta = JobMeta::new(queue, Some("text/plain".into()));
            let answer = publisher.publish_to(destination, &meta, b"x").await;
            (routable, answer)
        })
        .buffer_unordered(in_flight)
        .collect()
        .await
}

/// RabbitMQ sends the `basic.return` of an unroutable message before the `basic.ack`
/// that covers it, but nothing in the return names the publish; with many publishes
/// in flight the broker acks them in batches (`multiple`), and lapin hands each waiting
/// return to whichever confirm of the batch it completes first. Then an unroutable job
/// got a 202 (lost) and a routable one a false 503. Every answer must be the publish's
/// own: each routable job is in the queue, each unroutable one is refused.
#[tokio::test]
async fn every_unroutable_publish_is_refused_and_every_routable_one_confirmed() {
    let _brokers = brokers_shared().await;
    let queue = unique("returns");
    let missing = format!("{queue}-missing");
    let _cleanup = Backend::Rabbitmq.cleanup(&[&queue]);
    let publisher = RabbitPublisher::start(PublisherOptions {
        endpoint: AMQP_URL.parse::<SecretUrl>().unwrap().into(),
        queues: vec![queue.clone()],
        connect_timeout: Duration::from_secs(10),
        publish_timeout: Duration::from_secs(30),
        // One channel: every confirm shares one sequence of (multiple) acks.
        channels: 1,
        retry_tiers: Vec::new(),
    });
    wait_until(Duration::from_secs(30), "the publisher to connect", || {
        std::future::ready(publisher.is_ready())
    })
    .await;

    const COUNT: usize = 4_000;
    let answers = publish_mixed(&publisher, &queue, &missing, COUNT, 256).await;
    publisher.close().await;

    let mut wrong = Vec::new();
    let mut confirmed = 0u32;
    for (routable, answer) in &answers {
        match (routable, answer) {
            (true, Ok(())) => confirmed += 1,
            (false, Err(PublishError::Unroutable)) => {}
            other => wrong.push(format!("{other:?}")),
        }
    }
    let shown: Vec<_> = wrong.iter().take(5).collect();
    assert!(
        wrong.is_empty(),
        "{} of {COUNT} answers belong to another publish, e.g. {shown:?}",
        wrong.len()
    );
    // And the broker agrees: the queue holds exactly the confirmed jobs.
    wait_until(
        Duration::from_secs(30),
        "the queue to show every job",
        || async { rabbit::ready_count(&queue).await == confirmed },
    )
    .await;
    assert_eq!(rabbit::ready_count(&queue).await, (COUNT / 2) as u32);
}
