//! API keys (`Authorization: Bearer <key>`) and the guard in front of the job routes.
//!
//! Auth is on when keys are configured (`JOBGATE_API_KEYS` or `JOBGATE_API_KEYS_FILE`).
//! Without keys the producer answers only loopback clients, like RabbitMQ's `guest`
//! user, unless `JOBGATE_ALLOW_ANONYMOUS=true`; a key list without keys, or a key under
//! [`MIN_KEY_LEN`] characters, stops the start. Failed authentications are rate-limited
//! per client address ([`FAILURES_PER_SEC`], burst [`FAILURE_BURST`]): past it a wrong
//! or missing key gets 429 instead of 401, a right key still passes.
//! Keys are kept only as SHA-256 digests and compared in constant time (`subtle`), so
//! neither a key's content nor its length leaks through timing. Keys never appear in
//! logs or `Debug` output. The probes (and `/metrics`, `/openapi.json`) stay open;
//! every other path needs a key. Order: auth (401), then the rate limit (429), then the
//! handler.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tokio_util::sync::CancellationToken;

use crate::config::SecurityArgs;
use crate::error::problem_response;
use crate::rate_limit::{too_many_requests, Bucket, RateLimit};

/// Shortest accepted API key: a guessable key is no key.
pub const MIN_KEY_LEN: usize = 16;
/// Failed authentications a client address may make a second, on average...
pub const FAILURES_PER_SEC: u32 = 1;
/// ...and at once.
pub const FAILURE_BURST: u32 = 10;

/// Paths that never need a key: probes and descriptions of the service.
/// The console's page and assets are open too: they hold no data, and the page asks for
/// a key before it calls the API.
pub const OPEN_PATHS: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/ui",
    "/ui/",
    "/ui/app.js",
    "/ui/app.css",
];

/// A list of API keys as given on the command line; `Debug` shows only how many.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeyList(Vec<String>);

impl ApiKeyList {
    pub fn keys(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Debug for ApiKeyList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeyList(<{} redacted>)", self.0.len())
    }
}

/// Parses `k1,k2,...`: items are trimmed, empty ones dropped. A list without any key
/// (`,`, `""`) is an error rather than auth silently off. (`JOBGATE_API_KEYS` set to the
/// empty string never gets here: it counts as unset, see
/// [`ProducerConfig::from_env_and_args`](crate::ProducerConfig::from_env_and_args).)
pub fn parse_key_list(s: &str) -> Result<ApiKeyList, String> {
    let keys: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        return Err("the list holds no API keys".to_owned());
    }
    check_keys(&keys)?;
    Ok(ApiKeyList(keys))
}

/// [`parse_key_list`] for clap, whose own error for a value parser quotes the value:
/// this one never does (the value is a secret).
#[derive(Debug, Clone, Copy)]
pub struct KeyListParser;

impl clap::builder::TypedValueParser for KeyListParser {
    type Value = ApiKeyList;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<ApiKeyList, clap::Error> {
        let name = arg.map_or_else(|| "--api-keys".to_owned(), ToString::to_string);
        let refuse = |why: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{name}' (not shown: it is a secret): {why}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse("the keys are not UTF-8".to_owned()))?;
        parse_key_list(text).map_err(refuse)
    }
}

/// The keys of a keys file: one a line, trimmed; blank lines and `#` comments ignored.
pub fn parse_keys_file(text: &str) -> Result<Vec<String>, String> {
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    check_keys(&keys)?;
    Ok(keys)
}

/// Reads a keys file; an unreadable file or one without keys is an error.
pub fn load_keys_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the API keys file {}: {e}", path.display()))?;
    let keys = parse_keys_file(&text)
        .map_err(|e| anyhow::anyhow!("API keys file {}: {e}", path.display()))?;
    anyhow::ensure!(
        !keys.is_empty(),
        "the API keys file {} holds no keys",
        path.display()
    );
    Ok(keys)
}

/// A key must fit in a header after `Bearer `: visible ASCII without spaces. The error
/// never quotes the key.
fn check_keys(keys: &[String]) -> Result<(), String> {
    for (i, key) in keys.iter().enumerate() {
        if key.len() < MIN_KEY_LEN {
            return Err(format!(
                "API key #{} is shorter than {MIN_KEY_LEN} characters; use a long random key \
                 (e.g. `openssl rand -hex 32`)",
                i + 1
            ));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "API key #{} has characters other than visible ASCII",
                i + 1
            ));
        }
    }
    Ok(())
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// What a caller may do: every caller may send jobs and read; only an admin may replay
/// and purge dead jobs, and read the status of any job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A key of `JOBGATE_API_KEYS`, or anyone when keys are off and anonymous
    /// clients are allowed.
    Reader,
    /// A key of `JOBGATE_ADMIN_KEYS`, or a loopback client when no keys are configured
    /// (like RabbitMQ's `guest` user).
    Admin,
}

/// The accepted keys, as SHA-256 digests, each with its role.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<([u8; 32], Role)>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys(<{} redacted>)", self.digests.len())
    }
}

impl ApiKeys {
    pub fn new<I, S>(keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::with_admins(keys, std::iter::empty::<&str>())
    }

    /// `readers` and `admins`; a key in both lists is an admin.
    pub fn with_admins<I, S, J, T>(readers: I, admins: J) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
        J: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let admins: Vec<[u8; 32]> = admins
            .into_iter()
            .map(|k| digest(k.as_ref().as_bytes()))
            .collect();
        let readers = readers
            .into_iter()
            .map(|k| digest(k.as_ref().as_bytes()))
            .filter(|d| !admins.contains(d));
        Self {
            digests: readers
                .map(|d| (d, Role::Reader))
                .chain(admins.iter().map(|d| (*d, Role::Admin)))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The digest of `presented` when it is one of the keys. Every key is compared, in
    /// constant time, whatever matches.
    pub fn verify(&self, presented: &str) -> Option<[u8; 32]> {
        self.verify_role(presented).map(|(digest, _)| digest)
    }

    /// [`ApiKeys::verify`], with the key's role.
    pub fn verify_role(&self, presented: &str) -> Option<([u8; 32], Role)> {
        let candidate = digest(presented.as_bytes());
        let (found, admin) = self.digests.iter().fold(
            (Choice::from(0), Choice::from(0)),
            |(found, admin), (d, role)| {
                let this = d.ct_eq(&candidate);
                let is_admin = Choice::from(u8::from(*role == Role::Admin));
                (found | this, admin | (this & is_admin))
            },
        );
        let role = if bool::from(admin) {
            Role::Admin
        } else {
            Role::Reader
        };
        bool::from(found).then_some((candidate, role))
    }
}

/// Who sent the request, when auth is on: the SHA-256 digest of its API key (never
/// the key). The guard puts it in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiKeyId(pub [u8; 32]);

/// Auth and rate limit of the HTTP API; both may be off.
#[derive(Debug, Default)]
pub struct Security {
    pub keys: Option<ApiKeys>,
    pub rate_limit: Option<RateLimit>,
    /// Without keys: answer only loopback clients (the default of the binary).
    pub loopback_only: bool,
    /// Failed authentications per client address (on with keys, from the config).
    pub failures: Option<RateLimit>,
}

impl Security {
    /// Neither auth nor rate limit.
    pub fn off() -> Self {
        Self::default()
    }

    /// Keys (none: every client may send jobs) and a rate limit.
    pub fn new(keys: Option<ApiKeys>, rate_limit: Option<RateLimit>) -> Self {
        Self {
            keys: keys.filter(|k| !k.is_empty()),
            rate_limit,
            loopback_only: false,
            failures: None,
        }
    }

    /// From the configuration; reads the keys file (an error when it cannot be read or
    /// holds no keys).
    pub fn from_args(args: &SecurityArgs) -> anyhow::Result<Self> {
        let readers = match (&args.api_keys, &args.api_keys_file) {
            (_, Some(path)) => load_keys_file(path)?,
            (Some(list), None) => list.keys().to_vec(),
            (None, None) => Vec::new(),
        };
        let admins = args.admin_keys.as_ref().map_or(&[][..], ApiKeyList::keys);
        let keys = Some(ApiKeys::with_admins(&readers, admins));
        let rate_limit = RateLimit::from_settings(args.rate_limit_per_sec, args.rate_limit_burst);
        let mut security = Self::new(keys, rate_limit);
        security.loopback_only = security.keys.is_none() && !args.allow_anonymous;
        security.failures = RateLimit::from_settings(FAILURES_PER_SEC, Some(FAILURE_BURST));
        Ok(security)
    }

    /// Drops idle rate-limit buckets every `every` until `stop` is cancelled.
    pub fn spawn_housekeeping(self: &Arc<Self>, every: Duration, stop: CancellationToken) {
        if self.rate_limit.is_none() && self.failures.is_none() {
            return;
        }
        let security = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {
                        for limit in [&security.rate_limit, &security.failures].into_iter().flatten() {
                            limit.retain_recent();
                        }
                    }
                }
            }
        });
    }
}

/// The 401 answer, with `WWW-Authenticate`.
pub fn unauthorized(detail: &str) -> Response {
    let mut response = problem_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        detail.to_owned(),
        None,
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"jobgate\""),
    );
    response
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Middleware: open paths pass; others need a valid key (when auth is on), then a
/// token from the caller's bucket (when the rate limit is on).
pub async fn guard(
    State(security): State<Arc<Security>>,
    mut request: Request,
    next: Next,
) -> Response {
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_canonical());
    // A failed authentication: 401, or 429 once this address failed too often.
    let refuse = |detail: &str| {
        let failures = security.failures.as_ref();
        let bucket = peer.map_or(Bucket::Unknown, Bucket::Addr);
        if let Some(Err(wait)) = failures.map(|limit| limit.check(&bucket)) {
            tracing::info!(?bucket, "too many failed authentications from this address");
            return too_many_requests(wait);
        }
        unauthorized(detail)
    };
    let (bucket, role) = match &security.keys {
        Some(keys) => match bearer_token(&request) {
            None => {
                return refuse(
                    "This endpoint needs an API key: send `Authorization: Bearer <key>`.",
                )
            }
            Some(token) => match keys.verify_role(token) {
                Some((digest, role)) => (Bucket::Key(digest), role),
                None => {
                    tracing::info!(
                        path = request.uri().path(),
                        "request with an unknown API key refused"
                    );
                    return refuse("The API key is not valid.");
                }
            },
        },
        None if security.loopback_only && !peer.is_some_and(|ip| ip.is_loopback()) => {
            return refuse(
                "No API keys are configured, so this producer answers only clients on the \
                 same host (like RabbitMQ's guest user). Set JOBGATE_API_KEYS (or \
                 JOBGATE_API_KEYS_FILE) and send `Authorization: Bearer <key>`, or set \
                 JOBGATE_ALLOW_ANONYMOUS=true to accept jobs from anyone.",
            )
        }
        // Loopback only, like RabbitMQ's guest user: the operator on the host.
        None if security.loopback_only => (peer.map_or(Bucket::Unknown, Bucket::Addr), Role::Admin),
        // Anyone may send jobs and read; nobody may replay or purge without admin keys.
        None => (peer.map_or(Bucket::Unknown, Bucket::Addr), Role::Reader),
    };
    if let Some(limit) = &security.rate_limit {
        if let Err(wait) = limit.check(&bucket) {
            tracing::debug!(?bucket, ?wait, "request over the rate limit refused");
            return too_many_requests(wait);
        }
    }
    if let Bucket::Key(digest) = &bucket {
        request.extensions_mut().insert(ApiKeyId(*digest));
    }
    request.extensions_mut().insert(role);
    // A batch pays the rest of its items from the same bucket.
    request.extensions_mut().insert(bucket);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lists_are_trimmed_and_debug_hides_them() {
        let (k1, k2) = ("k1-0123456789abcdef", "k2-0123456789abcdef");
        let list = parse_key_list(&format!(" {k1}, {k2} ,,")).unwrap();
        assert_eq!(list.keys(), [k1, k2]);
        let shown = format!("{list:?}");
        assert!(!shown.contains(k1) && !shown.contains(k2), "{shown}");
        assert!(parse_key_list(" , ").is_err());
        assert!(parse_key_list("").is_err());
        let err = parse_key_list("0123456789abcdef,bad key 0123456789").unwrap_err();
        assert!(!err.contains("bad key"), "{err}");
        // A short key is refused, without quoting it.
        let err = parse_key_list("0123456789abcdef,twelve-chars").unwrap_err();
        assert!(err.contains("#2") && err.contains("16"), "{err}");
        assert!(!err.contains("twelve-chars"), "{err}");
    }

    #[test]
    fn keys_file_skips_blanks_and_comments() {
        let text = "# ops team\n\n  alpha-0123456789ab  \n#beta\nbeta-0123456789abc\n   \n";
        let keys = parse_keys_file(text).unwrap();
        assert_eq!(keys, ["alpha-0123456789ab", "beta-0123456789abc"]);
        assert!(parse_keys_file("short\n").is_err());
    }

    #[test]
    fn empty_or_missing_keys_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# nothing here\n\n").unwrap();
        let err = load_keys_file(&path).unwrap_err().to_string();
        assert!(err.contains("no keys"), "{err}");
        let err = load_keys_file(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
        std::fs::write(&path, "secret-1-0123456789\n").unwrap();
        assert_eq!(load_keys_file(&path).unwrap(), ["secret-1-0123456789"]);
    }

    #[test]
    fn verify_accepts_only_configured_keys() {
        let keys = ApiKeys::new(["k1", "k2"]);
        assert!(keys.verify("k1").is_some());
        assert!(keys.verify("k2").is_some());
        assert_ne!(keys.verify("k1"), keys.verify("k2"));
        assert!(keys.verify("k3").is_none());
        assert!(keys.verify("k").is_none());
        assert!(keys.verify("k1k1").is_none());
        assert!(keys.verify("").is_none());
    }

    #[test]
    fn admin_keys_are_keys_with_the_admin_role() {
        let keys = ApiKeys::with_admins(["reader", "both"], ["admin", "both"]);
        assert_eq!(keys.len(), 3);
        assert_eq!(
            keys.verify_role("reader").map(|(_, r)| r),
            Some(Role::Reader)
        );
        assert_eq!(keys.verify_role("admin").map(|(_, r)| r), Some(Role::Admin));
        assert_eq!(keys.verify_role("both").map(|(_, r)| r), Some(Role::Admin));
        assert!(keys.verify_role("nobody").is_none());
        assert_eq!(
            keys.verify("admin"),
            keys.verify_role("admin").map(|(d, _)| d)
        );
    }

    mod routes {
        use std::num::NonZeroU32;

        use axum::body::Body;
        use axum::http::{HeaderMap, Request, StatusCode};
        use axum::Router;
        use jobgate_shared::broker::memory::MemoryBroker;
        use serde_json::Value;

        use super::*;
        use crate::startup::app;
        use crate::state::AppState;

        fn secured(broker: &MemoryBroker, security: Security) -> Router {
            let state = AppState::new(Arc::new(broker.clone()), vec!["q".into()], 1024)
                .with_security(Arc::new(security));
            app(state)
        }

        fn keys_only() -> Security {
            Security::new(Some(ApiKeys::new(["k1", "k2"])), None)
        }

        fn limited(keys: Option<ApiKeys>, per_sec: u32, burst: u32) -> Security {
            let rate = RateLimit::new(
                NonZeroU32::new(per_sec).unwrap(),
                NonZeroU32::new(burst).unwrap(),
            );
            Security::new(keys, Some(rate))
        }

        fn job(key: Option<&str>) -> Request<Body> {
            let mut request = Request::post("/jobs/q").header("content-type", "text/plain");
            if let Some(key) = key {
                request = request.header("authorization", format!("Bearer {key}"));
            }
            request.body(Body::from("x")).unwrap()
        }

        async fn send(app: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
            crate::test_support::send(app.clone(), request).await
        }

        #[tokio::test]
        async fn no_key_is_401_problem_with_www_authenticate() {
            let broker = MemoryBroker::new();
            let app = secured(&broker, keys_only());
            let (status, headers, json) = send(&app, job(None)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(headers["www-authenticate"], "Bearer realm=\"jobgate\"");
            assert_eq!(headers["content-type"], "application/problem+json");
            assert_eq!(json["type"], "urn:jobgate:problem:unauthorized");
            assert_eq!(json["status"], 401);
            assert!(json["detail"].as_str().is_some_and(|d| !d.is_empty()));
            // Another scheme is no key either.
            let request = Request::post("/jobs/q")
                .header("authorization", "Basic azE6")
                .body(Body::from("x"))
                .unwrap();
            assert_eq!(send(&app, request).await.0, StatusCode::UNAUTHORIZED);
            assert!(broker.published().is_empty());
        }

        #[tokio::test]
        async fn wrong_key_is_401_and_nothing_is_published() {
            let broker = MemoryBroker::new();
            let app = secured(&broker, keys_only());
            for wrong in ["k3", "k", "k1k1", "K1"] {
                let (status, headers, json) = send(&app, job(Some(wrong))).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}");
                assert!(headers.contains_key("www-authenticate"));
                assert_eq!(json["type"], "urn:jobgate:problem:unauthorized");
            }
            assert!(broker.published().is_empty());
        }

        #[tokio::test]
        async fn right_key_is_202() {
            let broker = MemoryBroker::new();
            let app = secured(&broker, keys_only());
            assert_eq!(send(&app, job(Some("k1"))).await.0, StatusCode::ACCEPTED);
            let request = Request::post("/jobs")
                .header("authorization", "bearer k2")
                .body(Body::from("y"))
                .unwrap();
            assert_eq!(send(&app, request).await.0, StatusCode::ACCEPTED);
            assert_eq!(broker.published().len(), 2);
        }

        #[tokio::test]
        async fn probes_stay_open_and_other_paths_are_guarded() {
            let broker = MemoryBroker::new();
            let app = secured(&broker, limited(Some(ApiKeys::new(["k1"])), 1, 1));
            for _ in 0..3 {
                for path in ["/healthz", "/readyz"] {
                    let request = Request::get(path).body(Body::empty()).unwrap();
                    assert_eq!(send(&app, request).await.0, StatusCode::OK, "{path}");
                }
            }
            let request = Request::get("/elsewhere").body(Body::empty()).unwrap();
            assert_eq!(send(&app, request).await.0, StatusCode::UNAUTHORIZED);
        }

        fn from(ip: &str, key: Option<&str>) -> Request<Body> {
            let mut request = job(key);
            let addr = SocketAddr::new(ip.parse().unwrap(), 4000);
            request.extensions_mut().insert(ConnectInfo(addr));
            request
        }

        fn configured(args: &[&str]) -> Security {
            use clap::Parser;
            let config =
                crate::config::ProducerConfig::try_parse_from([&["producer"], args].concat())
                    .unwrap();
            Security::from_args(&config.security).unwrap()
        }

        #[tokio::test]
        async fn without_keys_only_loopback_clients_are_answered() {
            let broker = MemoryBroker::new();
            let app = secured(&broker, configured(&[]));
            let (status, headers, json) = send(&app, from("10.0.0.1", None)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(headers["content-type"], "application/problem+json");
            let detail = json["detail"].as_str().unwrap();
            assert!(
                detail.contains("JOBGATE_API_KEYS")
                    && detail.contains("JOBGATE_ALLOW_ANONYMOUS=true"),
                "{detail}"
            );
            for local in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
                assert_eq!(
                    send(&app, from(local, None)).await.0,
                    StatusCode::ACCEPTED,
                    "{local}"
                );
            }
            // No peer address known: not provably local.
            assert_eq!(send(&app, job(None)).await.0, StatusCode::UNAUTHORIZED);
            let app = secured(&broker, configured(&["--allow-anonymous", "true"]));
            assert_eq!(
                send(&app, from("10.0.0.1", None)).await.0,
                StatusCode::ACCEPTED
            );
            assert_eq!(broker.published().len(), 4);
        }

        #[tokio::test]
        async fn failed_authentications_are_rate_limited_per_client_address() {
            let broker = MemoryBroker::new();
            let key = "right-0123456789abcdef";
            let app = secured(&broker, configured(&["--api-keys", key]));
            for _ in 0..FAILURE_BURST {
                let (status, _, _) =
                    send(&app, from("10.0.0.1", Some("wrong-0123456789abc"))).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED);
            }
            let (status, headers, json) = send(&app, from("10.0.0.1", None)).await;
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{json}");
            assert!(headers.contains_key("retry-after"));
            assert_eq!(json["type"], "urn:jobgate:problem:rate-limited");
            // The right key still passes; another address is not affected.
            assert_eq!(
                send(&app, from("10.0.0.1", Some(key))).await.0,
                StatusCode::ACCEPTED
            );
            assert_eq!(
                send(&app, from("10.0.0.2", Some("nope"))).await.0,
                StatusCode::UNAUTHORIZED
            );
        }

        #[tokio::test]
        async fn auth_off_lets_everything_through() {
            let broker = MemoryBroker::new();
            let app = secured(&broker, Security::off());
            assert_eq!(send(&app, job(None)).await.0, StatusCode::ACCEPTED);
            assert_eq!(
                send(&app, job(Some("anything"))).await.0,
                StatusCode::ACCEPTED
            );
        }

        #[tokio::test]
        async fn burst_then_429_with_retry_after_and_keys_have_their_own_buckets() {
            let broker = MemoryBroker::new();
            let app = secured(&broker, limited(Some(ApiKeys::new(["k1", "k2"])), 1, 3));
            for _ in 0..3 {
                assert_eq!(send(&app, job(Some("k1"))).await.0, StatusCode::ACCEPTED);
            }
            let (status, headers, json) = send(&app, job(Some("k1"))).await;
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(json["type"], "urn:jobgate:problem:rate-limited");
            assert_eq!(headers["content-type"], "application/problem+json");
            let after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(after >= 1, "{after}");
            // k2 has a bucket of its own.
            assert_eq!(send(&app, job(Some("k2"))).await.0, StatusCode::ACCEPTED);
            // A wrong key is 401, not 429: auth comes first and takes no token.
            assert_eq!(
                send(&app, job(Some("bad"))).await.0,
                StatusCode::UNAUTHORIZED
            );
            assert_eq!(send(&app, job(None)).await.0, StatusCode::UNAUTHORIZED);
            assert_eq!(broker.published().len(), 4);
        }

        #[tokio::test]
        async fn without_auth_the_limit_is_per_client_address() {
            let broker = MemoryBroker::new();
            let app = secured(&broker, limited(None, 1, 2));
            let from = |ip: &str| {
                let mut request = job(None);
                let addr: SocketAddr = format!("{ip}:4000").parse().unwrap();
                request.extensions_mut().insert(ConnectInfo(addr));
                request
            };
            assert_eq!(send(&app, from("10.0.0.1")).await.0, StatusCode::ACCEPTED);
            assert_eq!(send(&app, from("10.0.0.1")).await.0, StatusCode::ACCEPTED);
            assert_eq!(
                send(&app, from("10.0.0.1")).await.0,
                StatusCode::TOO_MANY_REQUESTS
            );
            assert_eq!(send(&app, from("10.0.0.2")).await.0, StatusCode::ACCEPTED);
            // No address known (in-process): one shared bucket, not a failure.
            assert_eq!(send(&app, job(None)).await.0, StatusCode::ACCEPTED);
        }
    }

    #[test]
    fn debug_never_shows_keys() {
        let security = Security::new(Some(ApiKeys::new(["topsecret"])), None);
        let shown = format!("{security:?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
