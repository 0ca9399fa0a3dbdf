//! Where RabbitMQ is and how to reach it: the AMQP URL and, for `amqps://`, the TLS
//! files (a CA to trust beside the system's, a client certificate and its key).
//!
//! The files are read at each connection, not once: a certificate rotated on disk (a
//! Kubernetes Secret, cert-manager) is used from the next reconnect. They are checked at
//! start ([`AmqpEndpoint::check`]) so that a wrong path is a start-up error, not a
//! reconnect loop.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::Args;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
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

/// A RabbitMQ to connect to: its URL and the TLS files of `amqps://`.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpEndpoint {
    pub url: SecretUrl,
    pub tls: AmqpTls,
}

impl From<SecretUrl> for AmqpEndpoint {
    /// A URL alone: `amqp://`, or `amqps://` trusting the system's CAs only.
    fn from(url: SecretUrl) -> Self {
        Self {
            url,
            tls: AmqpTls::default(),
        }
    }
}

/// Shows the URL, password masked; the TLS files are named, never read out.
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
    /// Whether the URL asks for TLS (`amqps://`, in any case).
    pub fn is_tls(&self) -> bool {
        self.url
            .expose()
            .trim_start()
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("amqps://"))
    }

    /// Checks, before anything connects, that the TLS settings fit the URL and that each
    /// file holds what it should. The error names the setting.
    pub fn check(&self) -> Result<(), String> {
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
