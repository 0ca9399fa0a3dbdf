//! How jobgate's Kafka clients reach a secured cluster: `security.protocol`, SASL
//! (PLAIN, SCRAM-SHA-256/512) and TLS files, plus a pass-through of any other librdkafka
//! property (`JOBGATE_KAFKA_PROPERTIES`).
//!
//! Every client jobgate makes (admin, producers, consumers, the DLQ tools) takes these
//! through [`super::TopicSpec::client_config`], so all of them reach the same cluster the
//! same way. Settings that do not fit together are refused at start ([`check`]) rather
//! than ignored: SASL credentials with `plaintext`, TLS files with a protocol without
//! TLS, a certificate without its key, and pass-through keys that jobgate sets itself
//! (the delivery contract depends on them) or that have a setting of their own.
//!
//! [`check`]: KafkaSecurity::check

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, ValueEnum};
use rdkafka::config::ClientConfig;

/// `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum SecurityProtocol {
    /// No TLS, no login.
    #[default]
    #[value(name = "plaintext")]
    Plaintext,
    /// TLS; a client certificate when one is configured.
    #[value(name = "ssl")]
    Ssl,
    /// SASL login without TLS: the password crosses the network in clear with PLAIN.
    #[value(name = "sasl_plaintext")]
    SaslPlaintext,
    /// SASL login over TLS: what managed Kafka services ask for.
    #[value(name = "sasl_ssl")]
    SaslSsl,
}

impl SecurityProtocol {
    fn librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// `sasl.mechanism` (GSSAPI/Kerberos is not built in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum SaslMechanism {
    #[default]
    #[value(name = "PLAIN")]
    Plain,
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    fn librdkafka(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A password: shown as `***` by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// librdkafka properties given as `key=value,key=value`. A comma inside a value is
/// written `\,` (and a backslash `\\`). `Debug` shows the keys only: values may be
/// secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(Vec<(String, String)>);

impl KafkaProperties {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl FromStr for KafkaProperties {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        let mut entry = String::new();
        let mut chars = s.chars();
        let mut finish = |entry: &mut String| -> Result<(), String> {
            let text = std::mem::take(entry);
            if text.trim().is_empty() {
                return Ok(());
            }
            let (key, value) = text
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {:?}", text.trim()))?;
            let key = key.trim();
            if key.is_empty()
                || !key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(format!("not a librdkafka property name: {key:?}"));
            }
            entries.push((key.to_owned(), value.trim().to_owned()));
            Ok(())
        };
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(escaped @ (',' | '\\')) => entry.push(escaped),
                    Some(other) => {
                        entry.push('\\');
                        entry.push(other);
                    }
                    None => entry.push('\\'),
                },
                ',' => finish(&mut entry)?,
                c => entry.push(c),
            }
        }
        finish(&mut entry)?;
        let mut seen = std::collections::HashSet::new();
        for (key, _) in &entries {
            if !seen.insert(key.as_str()) {
                return Err(format!("property {key} is given twice"));
            }
        }
        Ok(Self(entries))
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| format!("{k}=***")))
            .finish()
    }
}

/// Properties jobgate sets on its clients itself: the delivery contract (acks=all,
/// idempotence, manual commits after the outcome is durable, no auto-created topics)
/// and its timeouts depend on them. Refused in the pass-through.
const OWNED_BY_JOBGATE: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "client.id",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "allow.auto.create.topics",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "transactional.id",
    "isolation.level",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "statistics.interval.ms",
    "heartbeat.interval.ms",
    "partition.assignment.strategy",
];

/// Properties that have a `JOBGATE_*` setting of their own: one place for each.
const HAVE_A_SETTING: &[(&str, &str)] = &[
    ("security.protocol", "JOBGATE_KAFKA_SECURITY_PROTOCOL"),
    ("sasl.mechanism", "JOBGATE_KAFKA_SASL_MECHANISM"),
    ("sasl.mechanisms", "JOBGATE_KAFKA_SASL_MECHANISM"),
    ("sasl.username", "JOBGATE_KAFKA_SASL_USERNAME"),
    ("sasl.password", "JOBGATE_KAFKA_SASL_PASSWORD"),
    ("ssl.ca.location", "JOBGATE_KAFKA_SSL_CA_FILE"),
    ("ssl.certificate.location", "JOBGATE_KAFKA_SSL_CERT_FILE"),
    ("ssl.key.location", "JOBGATE_KAFKA_SSL_KEY_FILE"),
    ("ssl.key.password", "JOBGATE_KAFKA_SSL_KEY_PASSWORD"),
    ("linger.ms", "JOBGATE_KAFKA_LINGER_MS"),
    ("queue.buffering.max.ms", "JOBGATE_KAFKA_LINGER_MS"),
    ("session.timeout.ms", "JOBGATE_KAFKA_SESSION_TIMEOUT_MS"),
    (
        "queued.max.messages.kbytes",
        "JOBGATE_KAFKA_QUEUED_MAX_KBYTES",
    ),
    ("fetch.max.bytes", "JOBGATE_KAFKA_FETCH_MAX_BYTES"),
];

/// Security settings of every Kafka client; flattened into the binaries' options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct KafkaSecurity {
    /// `security.protocol` of every Kafka client: `plaintext`, `ssl`, `sasl_plaintext`
    /// or `sasl_ssl` (any case).
    #[arg(long, env = "JOBGATE_KAFKA_SECURITY_PROTOCOL", value_enum, ignore_case = true,
          default_value_t = SecurityProtocol::Plaintext)]
    pub kafka_security_protocol: SecurityProtocol,

    /// SASL mechanism with `sasl_ssl`/`sasl_plaintext`: `PLAIN`, `SCRAM-SHA-256` or
    /// `SCRAM-SHA-512` (any case).
    #[arg(long, env = "JOBGATE_KAFKA_SASL_MECHANISM", value_enum, ignore_case = true,
          default_value_t = SaslMechanism::Plain)]
    pub kafka_sasl_mechanism: SaslMechanism,

    /// SASL user name.
    #[arg(long, env = "JOBGATE_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// SASL password; never logged.
    #[arg(long, env = "JOBGATE_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<Secret>,

    /// CA certificates (PEM file or directory) that sign the brokers' certificates
    /// (`ssl.ca.location`); without it, the system's CAs.
    #[arg(long, env = "JOBGATE_KAFKA_SSL_CA_FILE")]
    pub kafka_ssl_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS (`ssl.certificate.location`); needs
    /// `JOBGATE_KAFKA_SSL_KEY_FILE`.
    #[arg(long, env = "JOBGATE_KAFKA_SSL_CERT_FILE")]
    pub kafka_ssl_cert_file: Option<PathBuf>,

    /// Private key (PEM) of the client certificate (`ssl.key.location`).
    #[arg(long, env = "JOBGATE_KAFKA_SSL_KEY_FILE")]
    pub kafka_ssl_key_file: Option<PathBuf>,

    /// Password of an encrypted client key (`ssl.key.password`); never logged.
    #[arg(long, env = "JOBGATE_KAFKA_SSL_KEY_PASSWORD", hide_env_values = true)]
    pub kafka_ssl_key_password: Option<Secret>,

    /// Any other librdkafka property, `key=value,key=value` (a comma in a value is
    /// written `\,`); for example `ssl.endpoint.identification.algorithm=none`. Keys
    /// jobgate sets itself are refused. Values are never logged.
    #[arg(
        long,
        env = "JOBGATE_KAFKA_PROPERTIES",
        hide_env_values = true,
        default_value = "",
        hide_default_value = true
    )]
    pub kafka_properties: KafkaProperties,
}

impl KafkaSecurity {
    /// Checks, before any client is made, that the settings fit together and that the
    /// files exist. The error names the setting.
    pub fn check(&self) -> Result<(), String> {
        let protocol = self.kafka_security_protocol;
        let shown = protocol.librdkafka();
        if protocol.uses_sasl() {
            if self.kafka_sasl_username.as_deref().unwrap_or("").is_empty() {
                return Err(format!(
                    "JOBGATE_KAFKA_SECURITY_PROTOCOL={shown} needs JOBGATE_KAFKA_SASL_USERNAME"
                ));
            }
            if self.kafka_sasl_password.is_none() {
                return Err(format!(
                    "JOBGATE_KAFKA_SECURITY_PROTOCOL={shown} needs JOBGATE_KAFKA_SASL_PASSWORD"
                ));
            }
        } else if self.kafka_sasl_username.is_some() || self.kafka_sasl_password.is_some() {
            return Err(format!(
                "SASL credentials are set but JOBGATE_KAFKA_SECURITY_PROTOCOL is {shown}: set \
                 it to sasl_ssl (or sasl_plaintext), or the credentials would be ignored"
            ));
        }
        let files = [
            (&self.kafka_ssl_ca_file, "JOBGATE_KAFKA_SSL_CA_FILE"),
            (&self.kafka_ssl_cert_file, "JOBGATE_KAFKA_SSL_CERT_FILE"),
            (&self.kafka_ssl_key_file, "JOBGATE_KAFKA_SSL_KEY_FILE"),
        ];
        for (file, name) in files {
            let Some(path) = file else { continue };
            if !protocol.uses_tls() {
                return Err(format!(
                    "{name} is set but JOBGATE_KAFKA_SECURITY_PROTOCOL is {shown}: set it to \
                     ssl or sasl_ssl, or the file would be ignored"
                ));
            }
            std::fs::metadata(path)
                .map_err(|e| format!("{name}: cannot read {}: {e}", path.display()))?;
        }
        match (&self.kafka_ssl_cert_file, &self.kafka_ssl_key_file) {
            (Some(_), None) => {
                return Err(
                    "JOBGATE_KAFKA_SSL_CERT_FILE is set without JOBGATE_KAFKA_SSL_KEY_FILE".into(),
                )
            }
            (None, Some(_)) => {
                return Err(
                    "JOBGATE_KAFKA_SSL_KEY_FILE is set without JOBGATE_KAFKA_SSL_CERT_FILE".into(),
                )
            }
            _ => {}
        }
        if self.kafka_ssl_key_password.is_some() && self.kafka_ssl_key_file.is_none() {
            return Err(
                "JOBGATE_KAFKA_SSL_KEY_PASSWORD is set without JOBGATE_KAFKA_SSL_KEY_FILE".into(),
            );
        }
        for (key, _) in self.kafka_properties.iter() {
            if OWNED_BY_JOBGATE.contains(&key) {
                return Err(format!(
                    "JOBGATE_KAFKA_PROPERTIES: {key} is set by jobgate itself (its delivery \
                     guarantees depend on it) and cannot be changed"
                ));
            }
            if let Some((_, setting)) = HAVE_A_SETTING.iter().find(|(k, _)| *k == key) {
                return Err(format!(
                    "JOBGATE_KAFKA_PROPERTIES: {key} has a setting of its own: use {setting}"
                ));
            }
        }
        if protocol == SecurityProtocol::SaslPlaintext
            && self.kafka_sasl_mechanism == SaslMechanism::Plain
        {
            tracing::warn!(
                "JOBGATE_KAFKA_SECURITY_PROTOCOL=sasl_plaintext with PLAIN sends the Kafka \
                 password unencrypted; use sasl_ssl"
            );
        }
        Ok(())
    }

    /// Sets the security properties, then the pass-through ones, on `config`. The caller
    /// sets its own properties afterwards: those win over the pass-through.
    pub fn apply(&self, config: &mut ClientConfig) {
        let protocol = self.kafka_security_protocol;
        config.set("security.protocol", protocol.librdkafka());
        if protocol.uses_sasl() {
            config.set("sasl.mechanism", self.kafka_sasl_mechanism.librdkafka());
            if let Some(user) = &self.kafka_sasl_username {
                config.set("sasl.username", user);
            }
            if let Some(password) = &self.kafka_sasl_password {
                config.set("sasl.password", password.expose());
            }
        }
        if protocol.uses_tls() {
            let path = |p: &PathBuf| p.to_string_lossy().into_owned();
            if let Some(ca) = &self.kafka_ssl_ca_file {
                config.set("ssl.ca.location", path(ca));
            }
            if let Some(cert) = &self.kafka_ssl_cert_file {
                config.set("ssl.certificate.location", path(cert));
            }
            if let Some(key) = &self.kafka_ssl_key_file {
                config.set("ssl.key.location", path(key));
            }
            if let Some(password) = &self.kafka_ssl_key_password {
                config.set("ssl.key.password", password.expose());
            }
        }
        for (key, value) in self.kafka_properties.iter() {
            config.set(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn security(f: impl FnOnce(&mut KafkaSecurity)) -> KafkaSecurity {
        let mut s = KafkaSecurity::default();
        f(&mut s);
        s
    }

    #[test]
    fn protocol_and_mechanism_take_librdkafka_and_java_spellings() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            security: KafkaSecurity,
        }
        use clap::Parser as _;
        for (protocol, mechanism, want) in [
            (
                "sasl_ssl",
                "SCRAM-SHA-512",
                (SecurityProtocol::SaslSsl, SaslMechanism::ScramSha512),
            ),
            (
                "SASL_SSL",
                "scram-sha-256",
                (SecurityProtocol::SaslSsl, SaslMechanism::ScramSha256),
            ),
            (
                "SSL",
                "plain",
                (SecurityProtocol::Ssl, SaslMechanism::Plain),
            ),
            (
                "sasl_plaintext",
                "PLAIN",
                (SecurityProtocol::SaslPlaintext, SaslMechanism::Plain),
            ),
        ] {
            let cli = Cli::try_parse_from([
                "x",
                "--kafka-security-protocol",
                protocol,
                "--kafka-sasl-mechanism",
                mechanism,
            ])
            .unwrap();
            let s = cli.security;
            assert_eq!((s.kafka_security_protocol, s.kafka_sasl_mechanism), want);
        }
        assert!(Cli::try_parse_from(["x", "--kafka-sasl-mechanism", "GSSAPI"]).is_err());
    }

    #[test]
    fn properties_parse_with_escaped_commas_and_blanks() {
        let p: KafkaProperties = " a.b=1 , c=x\\,y,, d = e=f ,g=\\\\".parse().unwrap();
        let got: Vec<_> = p.iter().collect();
        assert_eq!(
            got,
            vec![("a.b", "1"), ("c", "x,y"), ("d", "e=f"), ("g", "\\")]
        );
        assert_eq!(
            "".parse::<KafkaProperties>().unwrap(),
            KafkaProperties::default()
        );
        for junk in ["novalue", "=v", "a b=c", "a=1,a=2"] {
            assert!(junk.parse::<KafkaProperties>().is_err(), "{junk}");
        }
    }

    #[test]
    fn debug_never_shows_passwords_or_property_values() {
        let s = security(|s| {
            s.kafka_sasl_password = Some("hunter2-pw".parse().unwrap());
            s.kafka_ssl_key_password = Some("key-pw".parse().unwrap());
            s.kafka_properties = "sasl.oauthbearer.client.secret=oauth-pw".parse().unwrap();
        });
        let shown = format!("{s:?}");
        for secret in ["hunter2-pw", "key-pw", "oauth-pw"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("sasl.oauthbearer.client.secret"), "{shown}");
    }

    #[test]
    fn sasl_needs_credentials_and_credentials_need_sasl() {
        let sasl = |user: Option<&str>, pw: Option<&str>| {
            security(|s| {
                s.kafka_security_protocol = SecurityProtocol::SaslSsl;
                s.kafka_sasl_username = user.map(str::to_owned);
                s.kafka_sasl_password = pw.map(|p| p.parse().unwrap());
            })
        };
        assert!(sasl(None, Some("p"))
            .check()
            .unwrap_err()
            .contains("SASL_USERNAME"));
        assert!(sasl(Some(""), Some("p"))
            .check()
            .unwrap_err()
            .contains("SASL_USERNAME"));
        assert!(sasl(Some("u"), None)
            .check()
            .unwrap_err()
            .contains("SASL_PASSWORD"));
        assert_eq!(sasl(Some("u"), Some("p")).check(), Ok(()));
        let ignored = security(|s| s.kafka_sasl_username = Some("u".into()));
        let error = ignored.check().unwrap_err();
        assert!(
            error.contains("sasl_ssl") && error.contains("plaintext"),
            "{error}"
        );
    }

    #[test]
    fn tls_files_need_a_tls_protocol_and_a_certificate_needs_its_key() {
        let existing = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        let error = security(|s| s.kafka_ssl_ca_file = Some(existing.clone()))
            .check()
            .unwrap_err();
        assert!(
            error.contains("JOBGATE_KAFKA_SSL_CA_FILE") && error.contains("ssl"),
            "{error}"
        );
        let tls = |f: &dyn Fn(&mut KafkaSecurity)| {
            security(|s| {
                s.kafka_security_protocol = SecurityProtocol::Ssl;
                f(s);
            })
        };
        let error = tls(&|s| s.kafka_ssl_cert_file = Some(existing.clone()))
            .check()
            .unwrap_err();
        assert!(
            error.contains("without JOBGATE_KAFKA_SSL_KEY_FILE"),
            "{error}"
        );
        let error = tls(&|s| s.kafka_ssl_key_file = Some(existing.clone()))
            .check()
            .unwrap_err();
        assert!(
            error.contains("without JOBGATE_KAFKA_SSL_CERT_FILE"),
            "{error}"
        );
        let error = tls(&|s| s.kafka_ssl_ca_file = Some("/nonexistent/ca.pem".into()))
            .check()
            .unwrap_err();
        assert!(error.contains("cannot read /nonexistent/ca.pem"), "{error}");
        assert_eq!(
            tls(&|s| s.kafka_ssl_ca_file = Some(existing.clone())).check(),
            Ok(())
        );
    }

    #[test]
    fn pass_through_cannot_change_what_jobgate_owns_or_what_has_a_setting() {
        let with = |props: &str| security(|s| s.kafka_properties = props.parse().unwrap());
        for key in [
            "enable.idempotence",
            "acks",
            "enable.auto.commit",
            "group.id",
        ] {
            let error = with(&format!("{key}=x")).check().unwrap_err();
            assert!(
                error.contains(key) && error.contains("set by jobgate"),
                "{error}"
            );
        }
        let error = with("sasl.password=x").check().unwrap_err();
        assert!(error.contains("JOBGATE_KAFKA_SASL_PASSWORD"), "{error}");
        assert_eq!(with("socket.keepalive.enable=true").check(), Ok(()));
    }

    #[test]
    fn apply_sets_the_librdkafka_properties() {
        let s = security(|s| {
            s.kafka_security_protocol = SecurityProtocol::SaslSsl;
            s.kafka_sasl_mechanism = SaslMechanism::ScramSha512;
            s.kafka_sasl_username = Some("u".into());
            s.kafka_sasl_password = Some("p".parse().unwrap());
            s.kafka_ssl_ca_file = Some("/ca.pem".into());
            s.kafka_properties = "socket.keepalive.enable=true".parse().unwrap();
        });
        let mut config = ClientConfig::new();
        s.apply(&mut config);
        for (key, value) in [
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "u"),
            ("sasl.password", "p"),
            ("ssl.ca.location", "/ca.pem"),
            ("socket.keepalive.enable", "true"),
        ] {
            assert_eq!(config.get(key), Some(value), "{key}");
        }
        let mut plain = ClientConfig::new();
        KafkaSecurity::default().apply(&mut plain);
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("sasl.username"), None);
    }
}
