//! Builds the broker pieces a worker needs for the configured backend.

use std::time::Duration;

use jobgate_shared::broker::kafka::{self, KafkaPublisher, KafkaSource};
use jobgate_shared::broker::rabbitmq::{self, RabbitPublisher, RabbitSource};
use jobgate_shared::broker::{JobSource, SharedPublisher};
use jobgate_shared::config::Backend;

use crate::config::ConsumerConfig;

/// Where jobs come from.
pub fn source(config: &ConsumerConfig) -> Box<dyn JobSource> {
    let tiers = config.retry_policy().tiers();
    match config.broker.backend {
        Backend::Rabbitmq => Box::new(RabbitSource::new(rabbitmq::SourceOptions {
            endpoint: config.broker.amqp(),
            queues: config.queue.clone(),
            connect_timeout: config.broker.connect_timeout(),
            prefetch: config.prefetch(),
            retry_tiers: tiers,
        })),
        Backend::Kafka => Box::new(KafkaSource::new(kafka::SourceOptions {
            topics: config.broker.kafka_topics(),
            queues: config.queue.clone(),
            group_template: config.broker.kafka_group.clone(),
            session_timeout: Duration::from_millis(config.kafka_session_timeout_ms),
            retry_tiers: tiers,
            publish_timeout: config.publish_timeout(),
            // A job may ask for a longer timeout, up to the ceiling.
            job_timeout: config.longest_job_timeout(),
            queued_max_kbytes: config.kafka_queued_max_kbytes,
            fetch_max_bytes: config.kafka_fetch_max_bytes,
        })),
    }
}

/// Where retries and dead letters are published (confirmed) before the original
/// delivery is settled. It also declares the retry tiers.
pub fn outcome_publisher(config: &ConsumerConfig) -> anyhow::Result<SharedPublisher> {
    let tiers = config.retry_policy().tiers();
    Ok(match config.broker.backend {
        Backend::Rabbitmq => RabbitPublisher::start(rabbitmq::PublisherOptions {
            endpoint: config.broker.amqp(),
            queues: config.queue.clone(),
            connect_timeout: config.broker.connect_timeout(),
            publish_timeout: config.publish_timeout(),
            channels: 1,
            retry_tiers: tiers,
        }),
        Backend::Kafka => KafkaPublisher::start(kafka::PublisherOptions {
            topics: config.broker.kafka_topics(),
            queues: config.queue.clone(),
            retry_tiers: tiers,
            publish_timeout: config.publish_timeout(),
        })
        .map_err(anyhow::Error::msg)?,
    })
}
