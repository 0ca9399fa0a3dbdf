//! Completion callbacks (issue 16): which callback URLs are allowed, where their
//! messages go, and how a callback is signed. Both binaries use this one module: the
//! producer checks a job's `Jobgate-Callback` at submit (400 when refused), the
//! consumer checks the URL again before it queues and before it sends a callback,
//! since a message published by hand may carry any URL (server-side request forgery).
//!
//! The allow-list (`JOBGATE_CALLBACK_ALLOW`) is a comma-separated list of hosts:
//! - `hooks.example.com`: that host name, any port;
//! - `hooks.example.com:8443`: that host name on that port only;
//! - `*.example.com` (optionally with `:port`): any name below `example.com`, at any
//!   depth, but not `example.com` itself;
//! - `127.0.0.1`, `[::1]` (optionally with `:port`): that IP address. A wildcard never
//!   matches an IP address.
//!
//! Hosts are compared after the WHATWG URL parsing that reqwest itself does (`url`
//! crate): case folded, IDNA applied, IPv4 in any notation (`0x7f.1`) normalised, a
//! trailing dot ignored. So what is checked is what would be connected to. The check is
//! by name: a name the allow-list trusts is trusted whatever it resolves to.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use url::{Host, Url};

/// Message header that carries a job's callback URL (from `Jobgate-Callback`).
pub const HEADER_CALLBACK_URL: &str = "x-callback-url";
/// The request header a client names its callback URL in.
pub const REQUEST_HEADER: &str = "Jobgate-Callback";
/// The header of every callback request: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "Jobgate-Signature";
/// The header of every callback request that names the job.
pub const JOB_ID_HEADER: &str = "Jobgate-Job-Id";
/// The header of every callback request that names the job's queue.
pub const QUEUE_HEADER: &str = "Jobgate-Queue";
/// Longest callback URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// The suffix of a job queue's callbacks queue.
const CALLBACKS_SUFFIX: &str = ".callbacks";

/// The callbacks queue (RabbitMQ queue, Kafka topic) of job queue `queue`:
/// `<queue>.callbacks`, with retry tiers and a DLQ of its own like any job queue.
pub fn callbacks_queue_name(queue: &str) -> String {
    format!("{queue}{CALLBACKS_SUFFIX}")
}

/// The job queue whose callbacks queue is `callbacks_queue`; the name itself when it is
/// not one.
pub fn job_queue_of(callbacks_queue: &str) -> &str {
    callbacks_queue
        .strip_suffix(CALLBACKS_SUFFIX)
        .unwrap_or(callbacks_queue)
}

/// Why a callback URL is refused; the text is safe to show to the client (it never
/// repeats the URL, which may hold a token in its query).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("callbacks are off: JOBGATE_CALLBACK_ALLOW is not set")]
    Off,
    #[error("the callback URL is longer than {MAX_URL_BYTES} bytes")]
    TooLong,
    #[error("the callback URL is not an absolute URL: {0}")]
    NotUrl(String),
    #[error("the callback URL must be http:// or https://")]
    Scheme,
    #[error("the callback URL must not hold a user name or password")]
    Userinfo,
    #[error("the callback URL must not have a #fragment")]
    Fragment,
    #[error("the callback URL's host {0} is not in JOBGATE_CALLBACK_ALLOW")]
    NotAllowed(String),
}

/// One entry of the allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// Exact host (normalised), or the suffix after `*.` for a wildcard.
    host: Host<String>,
    wildcard: bool,
    port: Option<u16>,
}

impl Rule {
    fn parse(entry: &str) -> Result<Self, String> {
        let (wildcard, rest) = match entry.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, entry),
        };
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', '*']) {
            return Err(format!(
                "{entry:?} is not a host, host:port or *.domain entry"
            ));
        }
        // The same parser as the URLs it is matched against, so both are normalised alike.
        let url = Url::parse(&format!("http://{rest}/"))
            .map_err(|e| format!("{entry:?} is not a host: {e}"))?;
        let host = normalise(url.host().ok_or_else(|| format!("{entry:?} has no host"))?);
        if wildcard && !matches!(host, Host::Domain(_)) {
            return Err(format!("{entry:?}: a wildcard needs a domain name"));
        }
        // `url` drops a port that is the scheme's default; keep what was written.
        let port = match rest.rsplit_once(':') {
            Some((_, p)) if !rest.ends_with(']') => Some(
                p.parse::<u16>()
                    .map_err(|_| format!("{entry:?} has a bad port"))?,
            ),
            _ => None,
        };
        Ok(Self {
            host,
            wildcard,
            port,
        })
    }

    fn matches(&self, host: &Host<String>, port: Option<u16>) -> bool {
        if self.port.is_some_and(|p| Some(p) != port) {
            return false;
        }
        match (&self.host, host, self.wildcard) {
            (Host::Domain(suffix), Host::Domain(name), true) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|below| below.len() > 1 && below.ends_with('.')),
            (_, _, true) => false,
            (rule, host, false) => rule == host,
        }
    }
}

/// A host name without its trailing dot (`example.com.` is `example.com`).
fn normalise(host: Host<&str>) -> Host<String> {
    match host {
        Host::Domain(d) => Host::Domain(d.trim_end_matches('.').to_ascii_lowercase()),
        Host::Ipv4(a) => Host::Ipv4(a),
        Host::Ipv6(a) => Host::Ipv6(a),
    }
}

/// `JOBGATE_CALLBACK_ALLOW`: the hosts callbacks may go to (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackAllow {
    rules: Vec<Rule>,
    /// As configured, for logs and `--help`.
    text: String,
}

impl CallbackAllow {
    /// Parses a comma-separated list (blanks around entries ignored); an empty list or
    /// entry is an error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rules = text
            .split(',')
            .map(str::trim)
            .map(|entry| {
                if entry.is_empty() {
                    Err("an empty entry (two commas, or a comma at an end)".to_owned())
                } else {
                    Rule::parse(entry)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            rules,
            text: text.trim().to_owned(),
        })
    }

    /// Checks `raw` as a callback URL: absolute `http`/`https`, at most
    /// [`MAX_URL_BYTES`], no user name or password, no fragment, and a host (and port)
    /// this list allows.
    pub fn check(&self, raw: &str) -> Result<Url, CallbackError> {
        if raw.len() > MAX_URL_BYTES {
            return Err(CallbackError::TooLong);
        }
        let url = Url::parse(raw).map_err(|e| CallbackError::NotUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(CallbackError::Scheme);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(CallbackError::Userinfo);
        }
        if url.fragment().is_some() {
            return Err(CallbackError::Fragment);
        }
        let host = normalise(url.host().ok_or(CallbackError::Scheme)?);
        let port = url.port_or_known_default();
        if self.rules.iter().any(|rule| rule.matches(&host, port)) {
            Ok(url)
        } else {
            Err(CallbackError::NotAllowed(host.to_string()))
        }
    }
}

impl fmt::Display for CallbackAllow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// [`CallbackAllow::check`] with the list optional: none means callbacks are off.
pub fn check(allow: Option<&CallbackAllow>, raw: &str) -> Result<Url, CallbackError> {
    allow.ok_or(CallbackError::Off)?.check(raw)
}

/// The value of [`SIGNATURE_HEADER`] for `body` sent at `timestamp` (Unix seconds):
/// `t=<timestamp>,v1=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(text: &str) -> CallbackAllow {
        CallbackAllow::parse(text).unwrap()
    }

    fn ok(list: &CallbackAllow, url: &str) -> bool {
        list.check(url).is_ok()
    }

    #[test]
    fn exact_hosts_match_any_port_unless_one_is_named() {
        let list = allow("hooks.example.com, api.example.org:8443");
        assert!(ok(&list, "https://hooks.example.com/cb"));
        assert!(ok(&list, "http://hooks.example.com:9000/cb?x=1"));
        assert!(ok(&list, "https://api.example.org:8443/"));
        assert!(!ok(&list, "https://api.example.org/"), "443 is not 8443");
        assert!(!ok(&list, "https://api.example.org:8444/"));
        assert!(!ok(&list, "https://example.com/"));
        assert!(!ok(&list, "https://hooks.example.com.evil.net/"));
        assert!(!ok(&list, "https://evilhooks.example.com/"));
    }

    #[test]
    fn a_named_default_port_is_kept() {
        let list = allow("hooks.example.com:443");
        assert!(ok(&list, "https://hooks.example.com/"));
        assert!(ok(&list, "https://hooks.example.com:443/"));
        assert!(!ok(&list, "http://hooks.example.com/"), "http's port is 80");
    }

    #[test]
    fn wildcards_match_names_below_the_domain_but_not_the_domain() {
        let list = allow("*.example.com");
        assert!(ok(&list, "https://a.example.com/"));
        assert!(ok(&list, "https://a.b.example.com:1234/"));
        assert!(!ok(&list, "https://example.com/"));
        assert!(!ok(&list, "https://badexample.com/"));
        assert!(!ok(&list, "https://example.com.evil.net/"));
        let with_port = allow("*.example.com:8443");
        assert!(ok(&with_port, "https://a.example.com:8443/"));
        assert!(!ok(&with_port, "https://a.example.com/"));
    }

    #[test]
    fn case_and_a_trailing_dot_do_not_matter() {
        let list = allow("Hooks.Example.COM");
        assert!(ok(&list, "https://HOOKS.example.com/"));
        assert!(ok(&list, "https://hooks.example.com./"));
        assert!(ok(&allow("*.EXAMPLE.com"), "https://A.example.COM/"));
    }

    #[test]
    fn ip_literals_match_by_address_in_any_notation_and_never_by_wildcard() {
        let list = allow("127.0.0.1:8080, [::1]");
        assert!(ok(&list, "http://127.0.0.1:8080/"));
        assert!(
            ok(&list, "http://0x7f.0.0.1:8080/"),
            "normalised like reqwest does"
        );
        assert!(ok(&list, "http://2130706433:8080/"));
        assert!(!ok(&list, "http://127.0.0.1:8081/"));
        assert!(!ok(&list, "http://127.0.0.2:8080/"));
        assert!(ok(&list, "http://[::1]:9/"));
        assert!(ok(&list, "http://[0:0:0:0:0:0:0:1]/"));
        assert!(
            !ok(&list, "http://localhost:8080/"),
            "a name is not its address"
        );
        assert!(CallbackAllow::parse("*.127.0.0.1").is_err());
        assert!(CallbackAllow::parse("*.0.1").is_err(), "0.1 is an address");
    }

    #[test]
    fn userinfo_fragments_other_schemes_and_long_urls_are_refused() {
        let list = allow("hooks.example.com");
        let refused = |url: &str| list.check(url).unwrap_err();
        assert_eq!(
            refused("https://u:p@hooks.example.com/"),
            CallbackError::Userinfo
        );
        assert_eq!(
            refused("https://u@hooks.example.com/"),
            CallbackError::Userinfo
        );
        // The classic confusion: the host here is evil.net, not the allowed name.
        assert!(matches!(
            refused("https://hooks.example.com@evil.net/"),
            CallbackError::Userinfo
        ));
        assert_eq!(
            refused("https://hooks.example.com/#x"),
            CallbackError::Fragment
        );
        assert_eq!(refused("ftp://hooks.example.com/"), CallbackError::Scheme);
        assert_eq!(refused("file:///etc/passwd"), CallbackError::Scheme);
        assert!(matches!(refused("/relative"), CallbackError::NotUrl(_)));
        let long = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert_eq!(refused(&long), CallbackError::TooLong);
        assert!(matches!(
            refused("https://other.example.com/"),
            CallbackError::NotAllowed(h) if h == "other.example.com"
        ));
        assert_eq!(
            check(None, "https://hooks.example.com/"),
            Err(CallbackError::Off)
        );
    }

    #[test]
    fn bad_lists_are_refused() {
        for bad in [
            "",
            "a.com,",
            ",a.com",
            "a.com,,b.com",
            "*.",
            "*",
            "a.com/x",
            "a.com:99999",
            "u@a.com",
            "a.*.com",
        ] {
            assert!(CallbackAllow::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(allow(" a.com , b.com ").to_string(), "a.com , b.com");
    }

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Independent vector: printf '1700000000.{"state":"done"}' |
        //   openssl dgst -sha256 -hmac 'whsec_test_secret'
        assert_eq!(
            signature(b"whsec_test_secret", 1_700_000_000, br#"{"state":"done"}"#),
            "t=1700000000,v1=9ba8122e45bf85aec5e34bb489026a903f2a77e3b2edf44f70764fa9aaba919d"
        );
    }

    #[test]
    fn callbacks_queue_names_round_trip() {
        assert_eq!(callbacks_queue_name("emails"), "emails.callbacks");
        assert_eq!(job_queue_of("emails.callbacks"), "emails");
        assert_eq!(job_queue_of("emails"), "emails");
    }
}
