//! Options shared by both binaries. Each is a flag and a `JOBGATE_*` variable.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::telemetry::LogFormat;

/// Default of `JOBGATE_KAFKA_LINGER_MS` (see BENCHMARKS.md: with 2 ms the ingress was
/// several times slower at the same concurrency).
pub const DEFAULT_KAFKA_LINGER_MS: u32 = 0;

/// Which message broker carries the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// RabbitMQ through AMQP 0-9-1 (quorum queues, publisher confirms).
    Rabbitmq,
    /// Apache Kafka (acks=all, idempotent producer, consumer groups).
    Kafka,
}

/// Broker connection options, flattened into each binary's configuration.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Message broker to use.
    #[arg(long, env = "JOBGATE_BACKEND", value_enum, default_value_t = Backend::Rabbitmq)]
    pub backend: Backend,

    /// AMQP URL of RabbitMQ (`amqp://user:pass@host:port/vhost`), or a comma-separated
    /// list of them, one per node of a cluster: each connection starts at its own node
    /// and fails over to the next. Passwords are never logged.
    #[arg(
        long,
        env = "JOBGATE_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: SecretUrl,

    #[command(flatten)]
    pub amqp_tls: crate::broker::rabbitmq::AmqpTls,

    /// Kafka bootstrap servers (comma list of host:port).
    #[arg(long, env = "JOBGATE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,

    /// Kafka consumer group of each queue; `{queue}` is replaced by the queue name. The
    /// consumers join it; the producer's console reads its lag; the dead-letter tools'
    /// replay group is named after it (`<group>.dlq-replay`).
    #[arg(long, env = "JOBGATE_KAFKA_GROUP", default_value = "jobgate.{queue}")]
    pub kafka_group: String,

    /// Partitions of each topic jobgate creates (existing topics are left alone).
    #[arg(long, env = "JOBGATE_KAFKA_PARTITIONS", default_value_t = 6,
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub kafka_partitions: i32,

    /// Replication factor of each topic jobgate creates: a number, or `auto` for
    /// min(3, brokers in the cluster).
    #[arg(long, env = "JOBGATE_KAFKA_REPLICATION_FACTOR", default_value = "auto")]
    pub kafka_replication_factor: AutoCount,

    /// `min.insync.replicas` of each topic jobgate creates (how many copies an acks=all
    /// write needs): a number, or `auto` for the replication factor less one when that
    /// is 2 or more, else 1.
    #[arg(
        long,
        env = "JOBGATE_KAFKA_MIN_INSYNC_REPLICAS",
        default_value = "auto"
    )]
    pub kafka_min_insync_replicas: AutoCount,

    /// How long the Kafka producer waits to fill a batch before sending it, in
    /// milliseconds (`linger.ms`). 0 sends at once: every 202 waits for its own confirm,
    /// and records that arrive while a request is in flight are batched anyway.
    #[arg(long, env = "JOBGATE_KAFKA_LINGER_MS", default_value_t = DEFAULT_KAFKA_LINGER_MS,
          value_parser = clap::value_parser!(u32).range(0..=5000))]
    pub kafka_linger_ms: u32,

    #[command(flatten)]
    pub kafka_security: crate::broker::kafka::KafkaSecurity,

    /// How long one connection attempt to the broker may take, in milliseconds.
    #[arg(long, env = "JOBGATE_CONNECT_TIMEOUT_MS", default_value_t = 5000)]
    pub connect_timeout_ms: u64,

    /// Log line format.
    #[arg(long, env = "JOBGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl BrokerArgs {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Checks what clap cannot: that every RabbitMQ node is an AMQP URL, that the chosen
    /// broker's TLS and SASL settings fit together and their files can be read. Both binaries call it right after parsing,
    /// so a mistake is a start-up error naming the setting, not a reconnect loop.
    pub fn check(&self) -> Result<(), String> {
        match self.backend {
            Backend::Rabbitmq => self.amqp().check(),
            Backend::Kafka => self.kafka_security.check(),
        }
    }

    /// Where RabbitMQ is, with the TLS files of `amqps://`.
    pub fn amqp(&self) -> crate::broker::rabbitmq::AmqpEndpoint {
        crate::broker::rabbitmq::AmqpEndpoint {
            url: self.amqp_url.clone(),
            tls: self.amqp_tls.clone(),
        }
    }

    /// Where Kafka topics are created, and how.
    pub fn kafka_topics(&self) -> crate::broker::kafka::TopicSpec {
        crate::broker::kafka::TopicSpec {
            brokers: self.kafka_brokers.clone(),
            partitions: self.kafka_partitions,
            replication: crate::broker::kafka::Replication {
                factor: self.kafka_replication_factor.0,
                min_insync: self.kafka_min_insync_replicas.0,
            },
            timeout: self.connect_timeout(),
            linger: Duration::from_millis(u64::from(self.kafka_linger_ms)),
            security: self.kafka_security.clone(),
        }
    }
}

/// A count that is given (1 to 100) or worked out by jobgate (`auto`, `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AutoCount(pub Option<i32>);

impl FromStr for AutoCount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Self(None));
        }
        match s.parse::<i32>() {
            Ok(n) if (1..=100).contains(&n) => Ok(Self(Some(n))),
            _ => Err(format!(
                "expected `auto` or a number from 1 to 100, got {s:?}"
            )),
        }
    }
}

impl fmt::Display for AutoCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("auto"),
        }
    }
}

/// A URL that may carry a password. `Debug` and `Display` show it with the password
/// replaced by `***`, so configuration can be logged safely.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The full URL, password included: pass it to the client library only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password masked, also when the URL does not parse: a password
    /// with an unencoded `/`, `?` or `#`, a missing or broken `scheme://`.
    ///
    /// A comma-separated list of URLs (`JOBGATE_AMQP_URL` of a cluster) is masked node
    /// by node, so every host stays visible. A node starts only at a `,` followed by a
    /// `scheme://` (blanks allowed between): a password with an unencoded `,` is then
    /// still one secret, masked whole, never cut in two with its first part shown.
    pub fn redacted(&self) -> String {
        url_pieces(&self.0)
            .map(redact_one)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The pieces of `list` between the commas that start a new URL (see
/// [`SecretUrl::redacted`]); one piece when there is no such comma.
fn url_pieces(list: &str) -> impl Iterator<Item = &str> {
    let starts_url = |rest: &str| {
        let rest = rest.trim_start();
        let scheme_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .unwrap_or(rest.len());
        scheme_len > 0
            && rest.starts_with(|c: char| c.is_ascii_alphabetic())
            && rest[scheme_len..].starts_with("://")
    };
    let mut rest = Some(list);
    std::iter::from_fn(move || {
        let piece = rest?;
        let end = piece
            .match_indices(',')
            .map(|(i, _)| i)
            .find(|&i| starts_url(&piece[i + 1..]));
        match end {
            Some(i) => {
                rest = Some(&piece[i + 1..]);
                Some(&piece[..i])
            }
            None => {
                rest = None;
                Some(piece)
            }
        }
    })
}

/// One URL with its password masked. Whatever comes before the LAST `@` is user
/// information, and past the first `:` in it all is masked (a path or query with an `@`
/// may be over-masked, never under-masked).
fn redact_one(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    let start = url.find("://").map_or(0, |i| i + 3).min(at);
    let userinfo = &url[start..at];
    // Without a well-formed scheme, a `scheme:` or `scheme:/` prefix may precede it.
    let masked = match userinfo.find(':') {
        Some(colon) if url.contains("://") => format!("{}:***", &userinfo[..colon]),
        Some(_) => "***".to_owned(),
        None => userinfo.to_owned(),
    };
    format!("{}{}{}", &url[..start], masked, &url[at..])
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Parses a comma-separated list of queue names (blanks trimmed, empties dropped) and
/// checks each name. Used for `JOBGATE_QUEUES` and `JOBGATE_QUEUE`.
pub fn parse_queue_list(s: &str) -> Result<Vec<String>, String> {
    let queues: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(str::to_owned)
        .collect();
    if queues.is_empty() {
        return Err("at least one queue name is required".into());
    }
    for q in &queues {
        validate_queue_name(q)?;
    }
    for (i, q) in queues.iter().enumerate() {
        if queues[..i].contains(q) {
            return Err(format!("queue {q:?} is listed twice"));
        }
        if let Some(owner) = queues.iter().find(|owner| is_derived_from(q, owner)) {
            return Err(format!(
                "queue {q:?} is a name jobgate gives to a queue of {owner:?} (its dead letters \
                 `.dlq`, retries `.retry.<tier>` or callbacks `.callbacks`); name it otherwise"
            ));
        }
    }
    Ok(queues)
}

/// Whether `name` is one of the broker names that job queue `queue` brings along:
/// `queue.dlq`, `queue.retry.<tier>` (any tier: Kafka's retry forwarder subscribes to
/// them by pattern), its callbacks queue `queue.callbacks`, and that queue's own. Two
/// listed queues with one such name would share a queue or topic.
fn is_derived_from(name: &str, queue: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(queue)
        .and_then(|rest| rest.strip_prefix('.'))
    else {
        return false;
    };
    let callbacks = crate::callback::callbacks_queue_name(queue);
    rest == "dlq"
        || rest
            .strip_prefix("retry.")
            .is_some_and(crate::retry::is_tier_label)
        || name == callbacks
        || is_derived_from(name, &callbacks)
}

/// Queue names become RabbitMQ queue names and Kafka topic names (with `.retry.*` and
/// `.dlq` suffixes), so they are limited to what both accept.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    const MAX: usize = 200;
    if name.is_empty() || name.len() > MAX {
        return Err(format!(
            "queue name must be 1 to {MAX} characters: {name:?}"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "queue name may contain only ASCII letters, digits, '.', '_' and '-': {name:?}"
        ));
    }
    if name.starts_with("amq.") || name == "." || name == ".." {
        return Err(format!("queue name is reserved by the broker: {name:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_list_whose_broker_names_would_collide_is_refused() {
        assert_eq!(
            parse_queue_list(" a, b ,,a.b").unwrap(),
            vec!["a", "b", "a.b"],
            "a queue may be named like another with a suffix of its own"
        );
        for (list, said) in [
            ("a,b,a", "\"a\" is listed twice"),
            (
                "a,a.dlq",
                "\"a.dlq\" is a name jobgate gives to a queue of \"a\"",
            ),
            ("a.retry.2s,a", "\"a.retry.2s\" is a name"),
            ("a,a.callbacks", "\"a.callbacks\" is a name"),
            ("a,a.callbacks.dlq", "\"a.callbacks.dlq\" is a name"),
            (
                "a,a.callbacks.retry.1s",
                "\"a.callbacks.retry.1s\" is a name",
            ),
        ] {
            let error = parse_queue_list(list).unwrap_err();
            assert!(error.contains(said), "{list}: {error}");
        }
        for fine in [
            "a,a.dlqx",
            "a,a.retry",
            "a,a.retry.x",
            "a,ab.dlq",
            "a,a.callbacksx",
            "a.dlq",
        ] {
            assert!(parse_queue_list(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn a_count_is_auto_or_a_number_from_1_to_100() {
        assert_eq!("auto".parse::<AutoCount>(), Ok(AutoCount(None)));
        assert_eq!("AUTO".parse::<AutoCount>(), Ok(AutoCount(None)));
        assert_eq!("3".parse::<AutoCount>(), Ok(AutoCount(Some(3))));
        for junk in ["0", "101", "-1", "", "three", "2.5"] {
            assert!(junk.parse::<AutoCount>().is_err(), "{junk:?}");
        }
        assert_eq!(AutoCount(None).to_string(), "auto");
        assert_eq!(AutoCount(Some(2)).to_string(), "2");
    }

    #[test]
    fn secret_url_masks_the_password_in_debug_and_display() {
        let url: SecretUrl = "amqp://user:s3cret@host:5672/%2f".parse().unwrap();
        assert_eq!(url.to_string(), "amqp://user:***@host:5672/%2f");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(url.expose(), "amqp://user:s3cret@host:5672/%2f");
    }

    #[test]
    fn a_url_that_does_not_parse_is_redacted_too() {
        for (typed, secret) in [
            // A password with characters that end the authority (unencoded).
            ("amqp://guest:pa/ss@host:5672/%2f", "pa/ss"),
            ("amqp://guest:pa#ss@host", "pa#ss"),
            ("redis://:pw?x@127.0.0.1:6379", "pw?x"),
            // No scheme, or a broken one.
            ("guest:s3cret@host:5672", "s3cret"),
            ("redis//:s3cret@host", "s3cret"),
            ("amqp:/guest:s3cret@host", "s3cret"),
        ] {
            let url: SecretUrl = typed.parse().unwrap();
            for shown in [url.to_string(), format!("{url:?}")] {
                assert!(!shown.contains(secret), "{typed} shown as {shown}");
                assert!(
                    shown.contains("host") || shown.contains("127.0.0.1"),
                    "{shown}"
                );
            }
            assert_eq!(url.expose(), typed);
        }
    }

    #[test]
    fn every_password_of_a_node_list_is_masked_and_every_host_shown() {
        let list: SecretUrl =
            "amqp://a:pw1@n1:5672/%2f, amqp://b:pw2@n2:5673/%2f,amqps://c:pw3@n3/v"
                .parse()
                .unwrap();
        let expected = "amqp://a:***@n1:5672/%2f, amqp://b:***@n2:5673/%2f,amqps://c:***@n3/v";
        assert_eq!(list.to_string(), expected);
        assert_eq!(format!("{list:?}"), format!("{expected:?}"));
        // Nodes without a password, and a stray comma, are shown as they are.
        let list: SecretUrl = "amqp://n1,,amqp://u:pw@n2".parse().unwrap();
        assert_eq!(list.to_string(), "amqp://n1,,amqp://u:***@n2");
    }

    #[test]
    fn a_comma_in_a_password_never_unmasks_part_of_it() {
        // A `,` not followed by a `scheme://` does not start a node: the password
        // `a,b` stays one secret, masked whole.
        for (typed, secret) in [
            ("amqp://u:a,b@host/%2f", "a,b"),
            ("amqp://u:12,amqp@host", "12,amqp"),
            ("amqp://u:x@h1,u:s3cret@host", "s3cret"),
        ] {
            let url: SecretUrl = typed.parse().unwrap();
            let shown = url.to_string();
            assert!(!shown.contains(secret), "{typed} shown as {shown}");
            assert!(!shown.contains(":a,") && !shown.contains(":12"), "{shown}");
            assert!(shown.contains("host"), "{shown}");
        }
    }

    #[test]
    fn secret_url_without_password_is_unchanged() {
        let url: SecretUrl = "amqp://host:5672".parse().unwrap();
        assert_eq!(url.to_string(), "amqp://host:5672");
        let url: SecretUrl = "amqp://user@host/v?x=a@b".parse().unwrap();
        assert_eq!(url.to_string(), "amqp://user@host/v?x=a@b");
    }

    #[test]
    fn queue_lists_are_trimmed_and_validated() {
        assert_eq!(
            parse_queue_list(" a, b-1 ,,c.d_e").unwrap(),
            vec!["a", "b-1", "c.d_e"]
        );
        assert!(parse_queue_list(" , ").is_err());
        assert!(parse_queue_list("ok,not ok").is_err());
        assert!(parse_queue_list("amq.gen").is_err());
        assert!(parse_queue_list(&"x".repeat(201)).is_err());
    }
}
