//! Where RabbitMQ is and how to reach it: the AMQP URL of each node (one, or a
//! comma-separated list for a cluster) and, for `amqps://`, the TLS files (a CA to trust
//! beside the system's, a client certificate and its key).
//!
//! Every node of a list is a full AMQP URL; they all use TLS or none ([`AmqpEndpoint::check`]
//! refuses a mix), so a failover never drops encryption and the TLS files mean the same
//! for every node. Which node a connection tries first is [`super::nodes`]' business.
//!
//! The files are read at each connection, not once: a certificate rotated on disk (a
//! Kubernetes Secret, cert-manager) is used from the next reconnect. They are checked at
//! start ([`AmqpEndpoint::check`]) so that a wrong path is a start-up error, not a
//! reconnect loop.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::Args;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::SecretUrl;

/// The TLS files of an `amqps://` connection; flattened into the binaries' options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct AmqpTls {
    /// CA certificates (PEM) trusted for `amqps://`, besides the system's: for a broker
    /// whose certificate a private CA signed.
    #[arg(long, env = "JOBGATE_AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    /// Client certificate chain (PEM) shown to RabbitMQ over `amqps://` (mutual TLS).
    /// With `?auth_mechanism=external` in the URL it is also the login (the user is the
    /// certificate's name). Needs `JOBGATE_AMQP_KEY_FILE`.
    #[arg(long, env = "JOBGATE_AMQP_CERT_FILE")]
    pub amqp_cert_file: Option<PathBuf>,

    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1, not encrypted) of the client certificate.
    #[arg(long, env = "JOBGATE_AMQP_KEY_FILE")]
    pub amqp_key_file: Option<PathBuf>,
}

/// A RabbitMQ to connect to: the URLs of its nodes and the TLS files of `amqps://`.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpEndpoint {
    /// One AMQP URL, or a comma-separated list of them, one per node of a cluster
    /// (blanks around each are trimmed), as `JOBGATE_AMQP_URL` gives it.
    pub url: SecretUrl,
    pub tls: AmqpTls,
}

/// The management HTTP API of an [`AmqpEndpoint`]'s first node, as its URL implies.
#[derive(Clone, PartialEq, Eq)]
pub struct ManagementDefaults {
    /// `http://host:15672/` (or `https://host:15671/`).
    pub base_url: String,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl fmt::Debug for ManagementDefaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagementDefaults")
            .field("base_url", &self.base_url)
            .field("user", &self.user)
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

/// One node of an [`AmqpEndpoint`], parsed.
#[derive(Clone)]
pub(crate) struct AmqpNode {
    /// The node's own URL (shown password masked, in logs).
    pub url: SecretUrl,
    pub uri: AMQPUri,
}

impl From<SecretUrl> for AmqpEndpoint {
    /// A URL (or a list of them) alone: `amqp://`, or `amqps://` trusting the system's
    /// CAs only.
    fn from(url: SecretUrl) -> Self {
        Self {
            url,
            tls: AmqpTls::default(),
        }
    }
}

/// Shows the URL (every node of a list), passwords masked; the TLS files are named,
/// never read out.
impl fmt::Display for AmqpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.url, f)
    }
}

impl fmt::Debug for AmqpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpEndpoint")
            .field("url", &self.url)
            .field("tls", &self.tls)
            .finish()
    }
}

impl AmqpEndpoint {
    /// Where the management HTTP API of the first node is by default, and how to sign
    /// in: the node's host on port 15672 (`amqps://`: `https` on 15671), with the URL's
    /// user and password (`guest`/`guest` when it has none) and its vhost.
    pub fn management_defaults(&self) -> Result<ManagementDefaults, String> {
        let nodes = self.parsed_nodes()?;
        let first = nodes
            .first()
            .ok_or_else(|| "JOBGATE_AMQP_URL names no node".to_owned())?;
        let tls = first.uri.scheme == AMQPScheme::AMQPS;
        let authority = &first.uri.authority;
        let host = &authority.host;
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        Ok(ManagementDefaults {
            base_url: if tls {
                format!("https://{host}:15671/")
            } else {
                format!("http://{host}:15672/")
            },
            user: authority.userinfo.username.clone(),
            password: authority.userinfo.password.clone(),
            vhost: first.uri.vhost.clone(),
        })
    }

    /// Whether the URL asks for TLS (`amqps://`, in any case): that of the first node,
    /// which [`AmqpEndpoint::check`] holds every other node to.
    pub fn is_tls(&self) -> bool {
        self.url
            .expose()
            .trim_start()
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("amqps://"))
    }

    /// Checks, before anything connects, that every node is an AMQP URL, that they all
    /// use TLS or none, that the TLS settings fit the URL and that each file holds what
    /// it should. The error names the setting.
    pub fn check(&self) -> Result<(), String> {
        self.parsed_nodes()?;
        self.check_tls_files()
    }

    /// The nodes in the order given. An empty element (a stray comma), an element that
    /// is not an AMQP URL and a list mixing `amqp://` and `amqps://` are errors, which
    /// name the node's place and show the list with its passwords masked (a node cut
    /// out of the list by a `,` in a password is never shown alone: it could be a piece
    /// of the password).
    pub(crate) fn parsed_nodes(&self) -> Result<Vec<AmqpNode>, String> {
        let elements: Vec<&str> = self.url.expose().split(',').map(str::trim).collect();
        let count = elements.len();
        let mut nodes = Vec::with_capacity(count);
        for (i, element) in elements.into_iter().enumerate() {
            let place = format!("node {} of {count}", i + 1);
            if element.is_empty() {
                return Err(format!(
                    "JOBGATE_AMQP_URL: {place} is empty (a stray comma?): {}",
                    self.url
                ));
            }
            // The parser's own message quotes the URL, password and all: not shown.
            let uri: AMQPUri = element.parse().map_err(|_| {
                format!(
                    "JOBGATE_AMQP_URL: {place} is not an AMQP URL \
                     (amqp[s]://user:password@host:port/vhost; write a `,` in a password \
                     as %2C): {}",
                    self.url
                )
            })?;
            nodes.push(AmqpNode {
                url: element.parse().unwrap_or_else(|never| match never {}),
                uri,
            });
        }
        let tls = |node: &AmqpNode| node.uri.scheme == AMQPScheme::AMQPS;
        if nodes.iter().any(tls) && !nodes.iter().all(tls) {
            return Err(format!(
                "JOBGATE_AMQP_URL mixes amqp:// and amqps:// nodes ({}): use TLS with every \
                 node or with none, so that a failover never drops encryption",
                self.url
            ));
        }
        Ok(nodes)
    }

    /// The TLS half of [`AmqpEndpoint::check`]: files only with `amqps://`, a
    /// certificate with its key, and files that hold what they should.
    pub(crate) fn check_tls_files(&self) -> Result<(), String> {
        let AmqpTls {
            amqp_ca_file: ca,
            amqp_cert_file: cert,
            amqp_key_file: key,
        } = &self.tls;
        if !self.is_tls() {
            if let Some(name) = [
                (ca, "JOBGATE_AMQP_CA_FILE"),
                (cert, "JOBGATE_AMQP_CERT_FILE"),
                (key, "JOBGATE_AMQP_KEY_FILE"),
            ]
            .iter()
            .find_map(|(file, name)| file.as_ref().map(|_| name))
            {
                return Err(format!(
                    "{name} is set but JOBGATE_AMQP_URL ({}) is not an amqps:// URL: the \
                     file would be ignored and the connection would not be encrypted",
                    self.url
                ));
            }
            return Ok(());
        }
        match (cert, key) {
            (Some(_), None) => {
                return Err("JOBGATE_AMQP_CERT_FILE is set without JOBGATE_AMQP_KEY_FILE".into())
            }
            (None, Some(_)) => {
                return Err("JOBGATE_AMQP_KEY_FILE is set without JOBGATE_AMQP_CERT_FILE".into())
            }
            _ => {}
        }
        self.tls_config().map(|_| ())
    }

    /// The TLS configuration of one connection, files read now.
    pub(crate) fn tls_config(&self) -> Result<OwnedTLSConfig, String> {
        let tls = &self.tls;
        let cert_chain = tls
            .amqp_ca_file
            .as_deref()
            .map(|path| read_certificates(path, "JOBGATE_AMQP_CA_FILE"))
            .transpose()?;
        let identity = match (&tls.amqp_cert_file, &tls.amqp_key_file) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read_certificates(cert, "JOBGATE_AMQP_CERT_FILE")?.into_bytes(),
                key: read_private_key(key, "JOBGATE_AMQP_KEY_FILE")?,
            }),
            _ => None,
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

/// The file's text when it holds one or more PEM certificates and nothing unreadable.
fn read_certificates(path: &Path, setting: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{setting}: {} is not valid PEM: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{setting}: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(text)
}

/// The file's bytes when they are one PEM private key that is not encrypted.
fn read_private_key(path: &Path, setting: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        format!(
            "{setting}: {} holds no unencrypted PEM private key: {e}",
            path.display()
        )
    })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(
        url: &str,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> AmqpEndpoint {
        AmqpEndpoint {
            url: url.parse().unwrap(),
            tls: AmqpTls {
                amqp_ca_file: ca.map(Path::to_path_buf),
                amqp_cert_file: cert.map(Path::to_path_buf),
                amqp_key_file: key.map(Path::to_path_buf),
            },
        }
    }

    /// A throwaway file with `text`, removed at the end of the test.
    fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("jobgate-amqp-tls-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn nodes_of(list: &str) -> Result<Vec<String>, String> {
        let ep = endpoint(list, None, None, None);
        ep.parsed_nodes()
            .map(|nodes| nodes.iter().map(|n| n.url.expose().to_owned()).collect())
    }

    #[test]
    fn a_node_list_is_split_at_commas_with_blanks_trimmed() {
        assert_eq!(
            nodes_of(" amqp://u:p@a:5672/%2f ,\tamqp://u:p@b:5673/%2f ").unwrap(),
            ["amqp://u:p@a:5672/%2f", "amqp://u:p@b:5673/%2f"]
        );
        assert_eq!(nodes_of("amqp://a").unwrap(), ["amqp://a"]);
        let ep = endpoint("amqps://a, amqps://b", None, None, None);
        assert!(ep.is_tls());
        assert_eq!(ep.check(), Ok(()));
    }

    #[test]
    fn an_empty_node_is_refused_naming_its_place() {
        for (list, place) in [
            ("amqp://a,,amqp://b", "node 2 of 3"),
            ("amqp://a,", "node 2 of 2"),
            (" , amqp://a", "node 1 of 2"),
            ("", "node 1 of 1"),
        ] {
            let error = endpoint(list, None, None, None).check().unwrap_err();
            assert!(
                error.contains(place) && error.contains("empty"),
                "{list:?}: {error}"
            );
            assert!(error.contains("JOBGATE_AMQP_URL"), "{error}");
        }
    }

    #[test]
    fn a_node_that_is_not_an_amqp_url_is_refused_without_showing_its_password() {
        for (list, place) in [
            ("amqp://u:p1@a,http://u:s3cret@b", "node 2 of 2"),
            ("u:s3cret@b", "node 1 of 1"),
            // An unencoded comma in a password splits the node: refused, not cut in two.
            ("amqp://u:12,s3cret@b", "node 2 of 2"),
        ] {
            let error = endpoint(list, None, None, None).check().unwrap_err();
            assert!(error.contains(place), "{list:?}: {error}");
            assert!(error.contains("%2C"), "{error}");
            assert!(
                !error.contains("s3cret") && !error.contains("p1"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_list_mixing_amqp_and_amqps_is_refused() {
        for list in ["amqp://a,amqps://b", "AMQPS://a, amqp://b"] {
            let error = endpoint(list, None, None, None).check().unwrap_err();
            assert!(error.contains("mixes amqp:// and amqps://"), "{error}");
        }
    }

    #[test]
    fn only_amqps_urls_are_tls() {
        for (url, tls) in [
            ("amqps://h", true),
            ("AMQPS://u:p@h:5671/%2f", true),
            ("amqp://h", false),
            ("h:5671", false),
        ] {
            assert_eq!(endpoint(url, None, None, None).is_tls(), tls, "{url}");
        }
    }

    #[test]
    fn tls_files_with_a_plain_url_are_a_start_up_error_naming_the_setting() {
        let any = Path::new("/nonexistent");
        for (ep, name) in [
            (
                endpoint("amqp://h", Some(any), None, None),
                "JOBGATE_AMQP_CA_FILE",
            ),
            (
                endpoint("amqp://h", None, Some(any), Some(any)),
                "JOBGATE_AMQP_CERT_FILE",
            ),
            (
                endpoint("amqp://h", None, None, Some(any)),
                "JOBGATE_AMQP_KEY_FILE",
            ),
        ] {
            let error = ep.check().unwrap_err();
            assert!(
                error.contains(name) && error.contains("amqps://"),
                "{error}"
            );
        }
        assert_eq!(endpoint("amqp://h", None, None, None).check(), Ok(()));
        assert_eq!(endpoint("amqps://h", None, None, None).check(), Ok(()));
    }

    #[test]
    fn a_certificate_without_its_key_or_a_key_without_its_certificate_is_refused() {
        let any = Path::new("/nonexistent");
        let error = endpoint("amqps://h", None, Some(any), None)
            .check()
            .unwrap_err();
        assert!(error.contains("without JOBGATE_AMQP_KEY_FILE"), "{error}");
        let error = endpoint("amqps://h", None, None, Some(any))
            .check()
            .unwrap_err();
        assert!(error.contains("without JOBGATE_AMQP_CERT_FILE"), "{error}");
    }

    #[test]
    fn missing_or_wrong_files_are_refused_with_the_setting_and_path() {
        let dir = temp_dir();
        let junk = file(&dir, "junk.pem", "not a certificate\n");
        let bad_pem = file(
            &dir,
            "bad.pem",
            "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
        );
        let missing = dir.join("missing.pem");
        for (ep, wants) in [
            (
                endpoint("amqps://h", Some(&missing), None, None),
                "cannot read",
            ),
            (
                endpoint("amqps://h", Some(&junk), None, None),
                "no PEM certificate",
            ),
            (
                endpoint("amqps://h", Some(&bad_pem), None, None),
                "not valid PEM",
            ),
            (
                endpoint("amqps://h", None, Some(&bad_pem), Some(&junk)),
                "not valid PEM",
            ),
        ] {
            let error = ep.check().unwrap_err();
            assert!(error.contains(wants), "{error}");
            assert!(error.contains(dir.to_str().unwrap()), "{error}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
