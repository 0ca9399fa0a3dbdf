//! Producer configuration: every option is a flag and a `JOBGATE_*` variable.

use std::time::Duration;

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser};
use jobgate_shared::config::{parse_queue_list, BrokerArgs};
use jobgate_shared::status::StatusArgs;

use crate::auth::{ApiKeyList, KeyListParser};

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

    /// Most jobs in one `POST /jobs/{queue}/batch`; more get 413.
    #[arg(long, env = "JOBGATE_MAX_BATCH_ITEMS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch_items: u32,

    /// Largest accepted batch request body, in bytes; larger batches get 413. Each job
    /// of a batch is also bounded by `JOBGATE_MAX_BODY_BYTES`.
    #[arg(long, env = "JOBGATE_MAX_BATCH_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_batch_bytes: usize,

    /// Largest share of `JOBGATE_MAX_IN_FLIGHT`, in percent, one batch may hold at once;
    /// its other items wait their turn inside the batch.
    #[arg(long, env = "JOBGATE_BATCH_IN_FLIGHT_PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub batch_in_flight_percent: u8,

    /// Most bytes of `X-Job-*` and trace headers a batch may copy onto its jobs (their
    /// size times the items); more gets 413.
    #[arg(long, env = "JOBGATE_MAX_BATCH_HEADER_BYTES", default_value_t = 1024 * 1024)]
    pub max_batch_header_bytes: usize,

    /// How long to wait for the broker's confirm before answering 503, in milliseconds.
    #[arg(long, env = "JOBGATE_PUBLISH_TIMEOUT_MS", default_value_t = 5000)]
    pub publish_timeout_ms: u64,

    /// Most publishes waiting for the broker's confirm at once, across all requests
    /// (single jobs and batch items); past it a job gets 503 `overloaded` at once.
    #[arg(long, env = "JOBGATE_MAX_IN_FLIGHT", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Confirm channels to RabbitMQ; publishes are spread over them.
    #[arg(long, env = "JOBGATE_PUBLISH_CHANNELS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub publish_channels: u16,

    /// Time a connection has to send a complete request head (request line and
    /// headers), in milliseconds, counted from its open or, on a keep-alive connection,
    /// from the end of the previous answer; past it the connection is closed without
    /// an answer (slowloris).
    #[arg(long, env = "JOBGATE_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_ms: u64,

    /// Time a request body has to arrive in full, in milliseconds, counted from the
    /// end of its head; past it the request gets 408 `body-timeout` and the connection
    /// is closed.
    #[arg(long, env = "JOBGATE_BODY_READ_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_ms: u64,

    /// A keep-alive connection without a request for this long, in milliseconds, is
    /// closed (the header-read timeout bounds this wait too: the smaller one applies).
    #[arg(long, env = "JOBGATE_IDLE_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,

    /// Most client connections open at once; past it new connections wait in the
    /// listen backlog until one closes. Keep it below the descriptor limit
    /// (`ulimit -n`), which the broker connections share.
    #[arg(long, env = "JOBGATE_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Length of the listen backlog: connections whose TCP handshake completed, waiting
    /// to be accepted. The kernel caps it at `net.core.somaxconn`. A burst larger than
    /// the backlog (clients that open a connection per request while the broker pauses,
    /// say) has its SYNs dropped, and those clients retry only after 1, 3, 7 s.
    #[arg(long, env = "JOBGATE_LISTEN_BACKLOG", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub listen_backlog: u32,

    /// After SIGTERM, how long in-flight requests may take to finish, in milliseconds.
    #[arg(long, env = "JOBGATE_SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    pub shutdown_grace_ms: u64,

    /// How long an `Idempotency-Key` and its answer are kept, in seconds (at most ten
    /// years: a longer time does not fit the clock, and every keyed request would fail).
    #[arg(long, env = "JOBGATE_IDEMPOTENCY_TTL_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
    pub idempotency_ttl_secs: u64,

    /// How far ahead a job may be scheduled with `Jobgate-Delay` or
    /// `Jobgate-Not-Before` (`30d`, `12h`, `90s`); further gets 400 `bad-schedule`.
    #[arg(long, env = "JOBGATE_SCHEDULE_MAX", default_value = "30d", value_parser = parse_schedule_max)]
    pub schedule_max: Duration,

    /// `JOBGATE_REDIS_URL` (job status, and idempotency keys shared by several
    /// replicas) and `JOBGATE_STATUS_TTL`.
    #[command(flatten)]
    pub status: StatusArgs,

    /// Hosts a job's `Jobgate-Callback` URL may name (comma list: `host`, `host:port`,
    /// `*.domain`, IP addresses); others are refused with 400. Unset: callbacks are off
    /// and any `Jobgate-Callback` is refused. Set the same list on the consumers.
    #[arg(long, env = "JOBGATE_CALLBACK_ALLOW", value_parser = jobgate_shared::callback::CallbackAllow::parse)]
    pub callback_allow: Option<jobgate_shared::callback::CallbackAllow>,

    #[command(flatten)]
    pub security: SecurityArgs,

    #[command(flatten)]
    pub console: crate::console::ConsoleArgs,

    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// `JOBGATE_SCHEDULE_MAX`: a duration from 1 s to 10 years.
fn parse_schedule_max(text: &str) -> Result<Duration, String> {
    let horizon =
        humantime::parse_duration(text).map_err(|e| format!("{e} (try `30d` or `12h`)"))?;
    if horizon < Duration::from_secs(1) || horizon > Duration::from_secs(315_360_000) {
        return Err("must be from 1s to 10 years".to_owned());
    }
    Ok(horizon)
}

/// API keys and the per-client rate limit. `Debug` never shows the keys.
#[derive(Debug, Clone, Args)]
pub struct SecurityArgs {
    /// API keys (comma list): when set, job requests need `Authorization: Bearer <key>`.
    #[arg(long, env = "JOBGATE_API_KEYS", hide_env_values = true,
          value_parser = KeyListParser, conflicts_with = "api_keys_file")]
    pub api_keys: Option<ApiKeyList>,

    /// Admin API keys (comma list): valid API keys that may also replay and purge dead
    /// jobs (the console's `POST /queues/{queue}/dead/replay` and `DELETE
    /// /queues/{queue}/dead`) and read any job's status. Other keys are read-only
    /// there.
    #[arg(long, env = "JOBGATE_ADMIN_KEYS", hide_env_values = true,
          value_parser = KeyListParser)]
    pub admin_keys: Option<ApiKeyList>,

    /// File of API keys, one a line (blank lines and `#` comments ignored), read at
    /// start; an unreadable file or one without keys stops the producer.
    #[arg(long, env = "JOBGATE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Without API keys, accept jobs from any client; unset, only clients on this host
    /// (loopback) are answered, others get 401.
    #[arg(long, env = "JOBGATE_ALLOW_ANONYMOUS", default_value_t = false,
          action = clap::ArgAction::Set)]
    pub allow_anonymous: bool,

    /// Requests a second per API key (per client IP address when auth is off);
    /// 0 turns the rate limit off.
    #[arg(long, env = "JOBGATE_RATE_LIMIT_PER_SEC", default_value_t = 0)]
    pub rate_limit_per_sec: u32,

    /// Requests a client may send at once before the rate applies (default: the
    /// per-second rate).
    #[arg(long, env = "JOBGATE_RATE_LIMIT_BURST",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: Option<u32>,
}

/// Arguments whose variable counts as unset when it is set to the empty string, as
/// Compose leaves `JOBGATE_API_KEYS: ${JOBGATE_API_KEYS:-}` without a `.env`. A value
/// that is there but holds no key (`,`, blanks), or `--api-keys ""` on the command line,
/// is still refused.
const EMPTY_VARIABLE_IS_UNSET: &[&str] = &["api_keys", "admin_keys"];

impl ProducerConfig {
    /// The configuration of this process: its flags, then its `JOBGATE_*` variables,
    /// like clap's `parse()` except for [`EMPTY_VARIABLE_IS_UNSET`]. Exits with clap's
    /// message when a setting is refused.
    pub fn from_env_and_args() -> Self {
        Self::try_from_env_and_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// [`ProducerConfig::from_env_and_args`] with the given flags (the first is the
    /// program name) and this process's variables.
    pub fn try_from_env_and_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut command = Self::command();
        for id in EMPTY_VARIABLE_IS_UNSET {
            command = command.mut_arg(*id, |arg| {
                let empty = arg
                    .get_env()
                    .and_then(std::env::var_os)
                    .is_some_and(|value| value.is_empty());
                // Without its variable clap sees the argument as absent.
                if empty {
                    arg.env(None)
                } else {
                    arg
                }
            });
        }
        let mut matches = command.try_get_matches_from(args)?;
        Self::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut Self::command()))
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    pub fn idempotency_ttl(&self) -> Duration {
        Duration::from_secs(self.idempotency_ttl_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    /// The listener's limits.
    pub fn server_limits(&self) -> crate::server::Limits {
        crate::server::Limits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
        }
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
        assert_eq!(c.max_batch_items, 1000);
        assert_eq!(c.max_batch_bytes, 10_485_760);
        assert_eq!(c.idempotency_ttl(), Duration::from_secs(86_400));
        assert!(c.status.redis_url.is_none());
        assert_eq!(c.status.status_ttl, jobgate_shared::status::DEFAULT_TTL);
        assert_eq!(c.max_in_flight, 1024);
        let limits = c.server_limits();
        assert_eq!(limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(limits.idle_timeout, Duration::from_secs(5));
        assert_eq!(limits.max_connections, 4096);
        assert_eq!(c.listen_backlog, 4096);
        assert_eq!(c.body_read_timeout(), Duration::from_secs(30));
        assert_eq!(c.batch_in_flight_percent, 50);
        assert_eq!(c.max_batch_header_bytes, 1_048_576);
        assert_eq!(
            c.broker.amqp_url.expose(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
    }

    #[test]
    fn bad_queue_names_are_refused_at_start() {
        assert!(ProducerConfig::try_parse_from(["producer", "--queues", "a b"]).is_err());
        assert!(ProducerConfig::try_parse_from(["producer", "--publish-channels", "0"]).is_err());
        assert!(ProducerConfig::try_parse_from(["producer", "--max-batch-items", "0"]).is_err());
        assert!(ProducerConfig::try_parse_from(["producer", "--max-in-flight", "0"]).is_err());
        let ttl = u64::MAX.to_string();
        let args = ["producer", "--idempotency-ttl-secs", ttl.as_str()];
        assert!(ProducerConfig::try_parse_from(args).is_err());
        for share in ["0", "101"] {
            let args = ["producer", "--batch-in-flight-percent", share];
            assert!(ProducerConfig::try_parse_from(args).is_err());
        }
    }

    #[test]
    fn security_is_off_by_default_and_keys_stay_out_of_debug() {
        let c = ProducerConfig::try_parse_from(["producer"]).unwrap();
        assert!(c.security.api_keys.is_none() && c.security.api_keys_file.is_none());
        assert_eq!(c.security.rate_limit_per_sec, 0);
        assert_eq!(c.security.rate_limit_burst, None);
        let c = ProducerConfig::try_parse_from([
            "producer",
            "--api-keys",
            "alpha-secret-0123456789,beta-secret-0123456789",
            "--rate-limit-per-sec",
            "5",
        ])
        .unwrap();
        assert_eq!(
            c.security.api_keys.as_ref().unwrap().keys(),
            ["alpha-secret-0123456789", "beta-secret-0123456789"]
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("alpha-secret") && !shown.contains("beta-secret"));
        assert!(!c.security.allow_anonymous);
        // An empty list, or a key of 12 characters, stops the start.
        for keys in ["", ",", "twelve-chars"] {
            let error = ProducerConfig::try_parse_from(["producer", "--api-keys", keys])
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("API key") || error.contains("no API keys"),
                "{error}"
            );
            assert!(
                !error.contains("twelve-chars"),
                "the key is never quoted: {error}"
            );
        }
        assert!(ProducerConfig::try_parse_from(["producer", "--rate-limit-burst", "0"]).is_err());
        assert!(ProducerConfig::try_parse_from([
            "producer",
            "--api-keys",
            "k",
            "--api-keys-file",
            "/dev/null"
        ])
        .is_err());
    }

    /// Runs the ignored test `child` of this test binary alone, in a process whose
    /// environment holds only `vars`, and returns what it printed after `OUTCOME `.
    /// A child process is the only way to hand clap a variable set to the empty string
    /// without changing the environment the other tests read meanwhile.
    fn outcome_in_child(child: &str, vars: &[(&str, &str)]) -> String {
        let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([&format!("{module}::{child}"), "--exact", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env_clear()
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout
            .lines()
            .find_map(|line| Some(line.split_once("OUTCOME ")?.1))
            .unwrap_or_else(|| panic!("the child printed no outcome:\n{stdout}"))
            .to_owned()
    }

    /// What `main` makes of this process's environment (no flags): the API keys
    /// (how many), the keys file, or the kind of the start-up error.
    #[test]
    #[ignore = "run in a child process by the tests of empty variables"]
    fn child_reports_the_settings_of_its_environment() {
        let outcome = match ProducerConfig::try_from_env_and_args(["producer"]) {
            Ok(c) => format!(
                "keys={:?} file={:?}",
                c.security.api_keys.map(|k| k.keys().len()),
                c.security.api_keys_file
            ),
            Err(e) => format!("error={:?}", e.kind()),
        };
        println!("OUTCOME {outcome}");
    }

    #[test]
    fn an_empty_api_keys_variable_counts_as_unset() {
        // Compose's `JOBGATE_API_KEYS: ${JOBGATE_API_KEYS:-}` without a .env.
        let child = "child_reports_the_settings_of_its_environment";
        assert_eq!(
            outcome_in_child(child, &[("JOBGATE_API_KEYS", "")]),
            "keys=None file=None"
        );
        // Nor does it clash with a keys file.
        assert_eq!(
            outcome_in_child(
                child,
                &[("JOBGATE_API_KEYS", ""), ("JOBGATE_API_KEYS_FILE", "/k")]
            ),
            "keys=None file=Some(\"/k\")"
        );
        // A list that is there but holds no key stays a start-up error.
        for blank in [",", " ", " , ,"] {
            assert_eq!(
                outcome_in_child(child, &[("JOBGATE_API_KEYS", blank)]),
                "error=ValueValidation",
                "JOBGATE_API_KEYS={blank:?}"
            );
        }
        assert_eq!(
            outcome_in_child(child, &[("JOBGATE_API_KEYS", "a-key-of-16-chars")]),
            "keys=Some(1) file=None"
        );
    }

    #[test]
    fn an_empty_api_keys_flag_is_a_start_up_error() {
        for keys in ["", ",", " , "] {
            let parsed = ProducerConfig::try_from_env_and_args(["producer", "--api-keys", keys]);
            let error = parsed.unwrap_err();
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{keys:?}"
            );
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        ProducerConfig::command().debug_assert();
    }
}
