//! Producer configuration: every option is a flag and a `JOBGATE_*` variable.

use std::time::Duration;

use clap::Parser;
use jobgate_shared::config::{parse_queue_list, BrokerArgs};

/// jobgate producer: accepts jobs over HTTP and publishes them to the broker.
#[derive(Debug, Clone, Parser)]
#[command(name = "producer", version, about)]
pub struct ProducerConfig {
    /// Address to listen on for HTTP.
    #[arg(long, env = "JOBGATE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,

    /// Queues that accept jobs (comma list); the first is the target of `POST /jobs`.
    /// Any other queue gets 404.
    #[arg(long, env = "JOBGATE_QUEUES", default_value = "default", value_parser = parse_queue_list)]
    pub queues: std::vec::Vec<String>,

    /// Largest accepted job body, in bytes; larger bodies get 413.
    #[arg(long, env = "JOBGATE_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// How long to wait for the broker's confirm before answering 503, in milliseconds.
    #[arg(long, env = "JOBGATE_PUBLISH_TIMEOUT_MS", default_value_t = 5000)]
    pub publish_timeout_ms: u64,

    /// Confirm channels to RabbitMQ; publishes are spread over them.
    #[arg(long, env = "JOBGATE_PUBLISH_CHANNELS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub publish_channels: u16,

    /// After SIGTERM, how long in-flight requests may take to finish, in milliseconds.
    #[arg(long, env = "JOBGATE_SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    pub shutdown_grace_ms: u64,

    #[command(flatten)]
    pub broker: BrokerArgs,
}

impl ProducerConfig {
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_readme() {
        let c = ProducerConfig::try_parse_from(["producer"]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080");
        assert_eq!(c.queues, vec!["default"]);
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert_eq!(c.publish_timeout(), Duration::from_secs(5));
        assert_eq!(
            c.broker.amqp_url.expose(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
    }

    #[test]
    fn bad_queue_names_are_refused_at_start() {
        assert!(ProducerConfig::try_parse_from(["producer", "--queues", "a b"]).is_err());
        assert!(ProducerConfig::try_parse_from(["producer", "--publish-channels", "0"]).is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        ProducerConfig::command().debug_assert();
    }
}
