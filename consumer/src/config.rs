//! Consumer configuration: every option is a flag and a `JOBGATE_*` variable.

use std::time::Duration;

use clap::{Parser, ValueEnum};
use jobgate_shared::config::{parse_queue_list, BrokerArgs};

/// The built-in handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HandlerKind {
    /// Logs each job (id, queue, attempt, body size) and succeeds.
    Log,
}

/// jobgate consumer: drains job queues and processes each job at least once.
#[derive(Debug, Clone, Parser)]
#[command(name = "consumer", version, about)]
pub struct ConsumerConfig {
    /// Queue(s) to drain (comma list).
    #[arg(long, env = "JOBGATE_QUEUE", default_value = "default", value_parser = parse_queue_list)]
    pub queue: std::vec::Vec<String>,

    /// Jobs processed at once by this process; also the broker prefetch per queue.
    #[arg(long, env = "JOBGATE_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// After SIGTERM, how long in-flight jobs may take to finish, in milliseconds.
    /// Jobs still running then are given back to the broker and redelivered.
    #[arg(long, env = "JOBGATE_SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    pub shutdown_grace_ms: u64,

    /// Which built-in handler processes the jobs.
    #[arg(long, env = "JOBGATE_HANDLER", value_enum, default_value_t = HandlerKind::Log)]
    pub handler: HandlerKind,

    /// `log` handler: pretend each job takes this long, in milliseconds (demos, load tests).
    #[arg(long, env = "JOBGATE_LOG_DELAY_MS", default_value_t = 0)]
    pub log_delay_ms: u64,

    /// Kafka consumer group of each queue; `{queue}` is replaced by the queue name.
    #[arg(long, env = "JOBGATE_KAFKA_GROUP", default_value = "jobgate.{queue}")]
    pub kafka_group: String,

    /// Kafka session timeout in milliseconds: how soon the partitions of a replica that
    /// died move to the others.
    #[arg(long, env = "JOBGATE_KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    pub kafka_session_timeout_ms: u64,

    #[command(flatten)]
    pub broker: BrokerArgs,
}

impl ConsumerConfig {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_readme() {
        let c = ConsumerConfig::try_parse_from(["consumer"]).unwrap();
        assert_eq!(c.queue, vec!["default"]);
        assert_eq!(c.concurrency, 8);
        assert_eq!(c.shutdown_grace(), Duration::from_secs(30));
        assert_eq!(c.handler, HandlerKind::Log);
    }

    #[test]
    fn zero_concurrency_is_refused() {
        assert!(ConsumerConfig::try_parse_from(["consumer", "--concurrency", "0"]).is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        ConsumerConfig::command().debug_assert();
    }
}
