//! Consumer configuration: every option is a flag and a `JOBGATE_*` variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use jobgate_shared::config::{parse_queue_list, BrokerArgs};
use jobgate_shared::retry::RetryPolicy;
use jobgate_shared::status::StatusArgs;

use crate::handlers::HandlerArgs;

/// Default of `JOBGATE_KAFKA_QUEUED_MAX_KBYTES`: 2 MiB of prefetched records.
pub const DEFAULT_KAFKA_QUEUED_MAX_KBYTES: u32 = 2048;
/// Default of `JOBGATE_KAFKA_FETCH_MAX_BYTES`: 1 MiB per fetch response.
pub const DEFAULT_KAFKA_FETCH_MAX_BYTES: u32 = 1_048_576;

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

    /// RabbitMQ: unacked deliveries the broker may hand this process per queue
    /// (`basic.qos`); more than the concurrency hides the ack round trip (see
    /// BENCHMARKS.md). Unset: the concurrency. Not used by Kafka.
    #[arg(long, env = "JOBGATE_PREFETCH", value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,

    /// After SIGTERM, how long in-flight jobs may take to finish, in milliseconds.
    /// Jobs still running then are given back to the broker and redelivered.
    #[arg(long, env = "JOBGATE_SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    pub shutdown_grace_ms: u64,

    #[command(flatten)]
    pub handler: HandlerArgs,

    /// Attempts a job gets in all (the first included); then it is dead-lettered.
    #[arg(long, env = "JOBGATE_MAX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,

    /// Delay before the first retry, in milliseconds; it doubles with each attempt.
    #[arg(long, env = "JOBGATE_RETRY_BASE_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub retry_base_ms: u64,

    /// Longest delay between attempts, in milliseconds. Each delay from the base up to
    /// this one is a retry tier: a queue (RabbitMQ) or topic (Kafka) `Q.retry.<tier>`.
    #[arg(long, env = "JOBGATE_RETRY_MAX_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub retry_max_ms: u64,

    /// A job still running after this long is cancelled and retried, in milliseconds
    /// (0: no limit).
    #[arg(long, env = "JOBGATE_JOB_TIMEOUT_MS", default_value_t = 300_000)]
    pub job_timeout_ms: u64,

    /// Most attempts a job may ask for with `Jobgate-Max-Attempts`; more is clamped to
    /// it. Never below `JOBGATE_MAX_ATTEMPTS`.
    #[arg(long, env = "JOBGATE_MAX_ATTEMPTS_CEILING",
          default_value_t = crate::job_policy::DEFAULT_MAX_ATTEMPTS_CEILING,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts_ceiling: u32,

    /// Longest timeout a job may ask for with `Jobgate-Timeout` (`1h`, `30m`, `90s`);
    /// longer is clamped to it. Never below `JOBGATE_JOB_TIMEOUT_MS`; with no job
    /// timeout (`JOBGATE_JOB_TIMEOUT_MS=0`) there is no ceiling.
    #[arg(long, env = "JOBGATE_JOB_TIMEOUT_CEILING", default_value = "1h",
          value_parser = parse_timeout_ceiling)]
    pub job_timeout_ceiling: Duration,

    /// How long a retry or dead-letter publish may wait for the broker's confirm,
    /// in milliseconds.
    #[arg(long, env = "JOBGATE_PUBLISH_TIMEOUT_MS", default_value_t = 5000)]
    pub publish_timeout_ms: u64,

    /// Kafka session timeout in milliseconds: how soon the partitions of a replica that
    /// died move to the others.
    #[arg(long, env = "JOBGATE_KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    pub kafka_session_timeout_ms: u64,

    /// Kafka: most kilobytes of records a job consumer prefetches
    /// (`queued.max.messages.kbytes`; librdkafka's own default is 64 MiB). Bounds the
    /// consumer's memory; a few MiB keep even a fast handler fed.
    #[arg(long, env = "JOBGATE_KAFKA_QUEUED_MAX_KBYTES", default_value_t = DEFAULT_KAFKA_QUEUED_MAX_KBYTES,
          value_parser = clap::value_parser!(u32).range(1..=2_097_151))]
    pub kafka_queued_max_kbytes: u32,

    /// Kafka: most bytes one fetch response may carry (`fetch.max.bytes`; librdkafka's
    /// own default is 50 MiB). At least 1000000 (the consumer's `message.max.bytes`).
    #[arg(long, env = "JOBGATE_KAFKA_FETCH_MAX_BYTES", default_value_t = DEFAULT_KAFKA_FETCH_MAX_BYTES,
          value_parser = clap::value_parser!(u32).range(1_000_000..=2_147_483_135))]
    pub kafka_fetch_max_bytes: u32,

    /// Address of the metrics and probes listener (`GET /metrics`, `/healthz`,
    /// `/readyz`), e.g. `0.0.0.0:9100`; unset: no listener.
    #[arg(long, env = "JOBGATE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    #[command(flatten)]
    pub broker: BrokerArgs,

    /// `JOBGATE_REDIS_URL` (job status: the consumer records each attempt and skips
    /// jobs found cancelled or done) and `JOBGATE_STATUS_TTL`.
    #[command(flatten)]
    pub status: StatusArgs,

    /// `JOBGATE_CALLBACK_ALLOW`, `JOBGATE_CALLBACK_SECRET`, `JOBGATE_CALLBACK_TIMEOUT_MS`:
    /// completion callbacks.
    #[command(flatten)]
    pub callback: crate::callback::CallbackArgs,

    /// A tool to run instead of the worker (`consumer dlq ...`); none runs the worker.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl ConsumerConfig {
    /// `JOBGATE_PREFETCH`, or the concurrency when unset.
    pub fn prefetch(&self) -> u16 {
        self.prefetch.unwrap_or(self.concurrency)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            base: Duration::from_millis(self.retry_base_ms),
            max: Duration::from_millis(self.retry_max_ms),
        }
    }

    pub fn job_timeout(&self) -> Option<Duration> {
        (self.job_timeout_ms > 0).then(|| Duration::from_millis(self.job_timeout_ms))
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// What a job may ask for with `Jobgate-Max-Attempts` and `Jobgate-Timeout`.
    pub fn policy_ceilings(&self) -> crate::job_policy::Ceilings {
        let job_timeout = self.job_timeout();
        crate::job_policy::Ceilings {
            max_attempts: self.max_attempts_ceiling.max(self.max_attempts),
            job_timeout: job_timeout.map(|own| own.max(self.job_timeout_ceiling)),
        }
    }

    /// The longest a job may run here: the job timeout or its ceiling (none: no limit).
    pub fn longest_job_timeout(&self) -> Option<Duration> {
        self.policy_ceilings().job_timeout
    }
}

/// `JOBGATE_JOB_TIMEOUT_CEILING`: a duration from 1 ms to 7 days.
fn parse_timeout_ceiling(text: &str) -> Result<Duration, String> {
    let ceiling =
        humantime::parse_duration(text).map_err(|e| format!("{e} (try `1h` or `30m`)"))?;
    if ceiling < Duration::from_millis(1) || ceiling > Duration::from_secs(7 * 24 * 3600) {
        return Err("must be from 1ms to 7 days".to_owned());
    }
    Ok(ceiling)
}

/// Tools of the consumer binary. Broker options (`JOBGATE_BACKEND`, `JOBGATE_AMQP_URL`,
/// `JOBGATE_KAFKA_BROKERS`, ...) and the retry and Kafka group options come from the
/// top-level flags (given before the subcommand) or the environment.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Inspect, replay or purge the dead-letter queue `<queue>.dlq` of a job queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

/// `consumer dlq ...`: exit code 0 when done, 1 on broker or operational errors, 2 on
/// usage errors.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// Show dead jobs without removing them (results on stdout, logs on stderr).
    List(DlqListArgs),
    /// Move dead jobs back to their queue with attempt 1 (published and confirmed
    /// before they leave the dead-letter queue).
    Replay(DlqReplayArgs),
    /// Remove all dead jobs of a queue (needs --yes).
    Purge(DlqPurgeArgs),
}

/// Options of `consumer dlq list`.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqListArgs {
    /// Job queue whose dead-letter queue (`<queue>.dlq`) is shown.
    #[arg(long, value_parser = parse_queue_name)]
    pub queue: String,

    /// Show at most this many dead jobs.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: u64,

    /// One JSON object per dead job and line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `consumer dlq replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqReplayArgs {
    /// Job queue whose dead jobs (in `<queue>.dlq`) go back to it.
    #[arg(long, value_parser = parse_queue_name)]
    pub queue: String,

    /// Replay at most this many dead jobs (default: all that are dead when it starts).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,

    /// Replay only the dead job with this id.
    #[arg(long)]
    pub job_id: Option<String>,
}

/// Options of `consumer dlq purge`.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqPurgeArgs {
    /// Job queue whose dead jobs (in `<queue>.dlq`) are removed.
    #[arg(long, value_parser = parse_queue_name)]
    pub queue: String,

    /// Confirm that the dead jobs are to be removed for good (refused without it).
    #[arg(long)]
    pub yes: bool,
}

/// One queue name, checked like those of `JOBGATE_QUEUE`.
fn parse_queue_name(s: &str) -> Result<String, String> {
    jobgate_shared::config::validate_queue_name(s)?;
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_readme() {
        let c = ConsumerConfig::try_parse_from(["consumer"]).unwrap();
        assert_eq!(c.queue, vec!["default"]);
        assert!(c.status.redis_url.is_none(), "no job status unless asked");
        assert_eq!(c.status.status_ttl, jobgate_shared::status::DEFAULT_TTL);
        assert_eq!(c.concurrency, 8);
        assert_eq!(c.shutdown_grace(), Duration::from_secs(30));
        assert_eq!(c.handler.handler, crate::handlers::HandlerKind::Log);
        assert_eq!(c.metrics_listen, None, "no metrics listener unless asked");
    }

    #[test]
    fn metrics_listen_takes_a_socket_address() {
        let c = ConsumerConfig::try_parse_from(["consumer", "--metrics-listen", "0.0.0.0:9100"])
            .unwrap();
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9100".parse().unwrap()));
        assert!(
            ConsumerConfig::try_parse_from(["consumer", "--metrics-listen", "9100"]).is_err(),
            "a port alone is not an address"
        );
    }

    #[test]
    fn prefetch_defaults_to_the_concurrency_and_may_exceed_it() {
        let c = ConsumerConfig::try_parse_from(["consumer", "--concurrency", "4"]).unwrap();
        assert_eq!(c.prefetch(), 4);
        let c =
            ConsumerConfig::try_parse_from(["consumer", "--concurrency", "4", "--prefetch", "32"])
                .unwrap();
        assert_eq!(c.prefetch(), 32);
        assert!(ConsumerConfig::try_parse_from(["consumer", "--prefetch", "0"]).is_err());
    }

    #[test]
    fn kafka_prefetch_bounds_are_modest_and_checked() {
        let c = ConsumerConfig::try_parse_from(["consumer"]).unwrap();
        assert_eq!(c.kafka_queued_max_kbytes, 2048);
        assert_eq!(c.kafka_fetch_max_bytes, 1_048_576);
        let c = ConsumerConfig::try_parse_from([
            "consumer",
            "--kafka-queued-max-kbytes",
            "512",
            "--kafka-fetch-max-bytes",
            "1000000",
        ])
        .unwrap();
        assert_eq!(
            (c.kafka_queued_max_kbytes, c.kafka_fetch_max_bytes),
            (512, 1_000_000)
        );
        for refused in [
            ["--kafka-queued-max-kbytes", "0"],
            ["--kafka-queued-max-kbytes", "2097152"],
            // librdkafka refuses a fetch.max.bytes below message.max.bytes.
            ["--kafka-fetch-max-bytes", "999999"],
        ] {
            let args = ["consumer", refused[0], refused[1]];
            assert!(ConsumerConfig::try_parse_from(args).is_err(), "{refused:?}");
        }
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
