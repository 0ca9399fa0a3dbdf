//! The `http` handler: POSTs each job's body to a fixed URL.

use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use async_trait::async_trait;
use jobgate_shared::job::{Job, JobMeta};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{Response, StatusCode, Url};

use super::snippet;
use crate::handler::{Handler, Outcome};

/// Content type sent for a job that has none.
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";
/// A `Retry-After` longer than this is cut to it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// At most this many characters of an answer's body go into a failure reason.
const REASON_BODY_CHARS: usize = 200;
/// At most this many bytes of an error answer's body are read (for the reason).
const ERROR_BODY_READ: usize = 2048;
/// At most this many bytes of a successful answer's body are kept as the job's result
/// (the status store's bound); a longer body closes the connection instead.
const SUCCESS_BODY_DRAIN: usize = jobgate_shared::status::MAX_RESULT_BYTES;

/// POSTs the body of each job, byte for byte, to one URL (`JOBGATE_HTTP_URL`), and
/// turns the answer into the job's outcome.
///
/// The request carries `Content-Type` (the job's content type, or
/// `application/octet-stream`), `Job-Id`, `Job-Attempt` (1-based), `Job-Queue`, the
/// job's `X-Job-*`, `traceparent` and `tracestate` headers, and a
/// `User-Agent` of `jobgate-consumer/<version>`. A user and password in the URL are sent
/// as HTTP basic authentication. One client is shared by all jobs, so connections are
/// pooled and kept alive. `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` are honoured.
///
/// | answer | outcome |
/// |---|---|
/// | `2xx` | `Done` |
/// | `408`, `429`, `5xx` | `Retry`, after `Retry-After` (seconds or an HTTP date, at most 1 hour) when the answer has one |
/// | no answer within the timeout, connection refused or reset, DNS or TLS failure | `Retry` |
/// | `3xx` | `Dead`: redirects are not followed (re-sending a POST elsewhere would surprise); point the URL at the final address |
/// | any other status (`400`, `401`, `403`, `404`, `409`, `422`, ...) | `Dead` |
///
/// Every reason names the status; it holds at most 200 characters of the answer's body,
/// on one line, and never the URL (which may hold a password or a token).
///
/// The endpoint must be idempotent on `Job-Id`: a job can be POSTed again after a
/// timeout even though the endpoint did its work.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
    url: Url,
    timeout: Duration,
}

impl HttpHandler {
    /// A handler that POSTs to `url`, each request (connect, send, answer) taking at
    /// most `timeout`.
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        // The parse error only: the URL itself may hold a password.
        let url =
            Url::parse(url).map_err(|e| anyhow::anyhow!("JOBGATE_HTTP_URL is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!(
                "JOBGATE_HTTP_URL must be an http:// or https:// URL, not {}://",
                url.scheme()
            );
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .user_agent(concat!("jobgate-consumer/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            client,
            url,
            timeout,
        })
    }

    fn failed_request(&self, error: &reqwest::Error) -> String {
        if error.is_timeout() {
            return format!(
                "no answer within {} ms (JOBGATE_HTTP_TIMEOUT_MS)",
                self.timeout.as_millis()
            );
        }
        let mut reason = String::from(if error.is_connect() {
            "cannot connect"
        } else {
            "request failed"
        });
        // Not `error` itself: its message holds the URL.
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        snippet(reason.as_bytes(), 300, false)
    }
}

#[async_trait]
impl Handler for HttpHandler {
    async fn handle(&self, job: &Job) -> Outcome {
        let content_type = job
            .meta
            .content_type
            .as_deref()
            .filter(|ct| !ct.trim().is_empty())
            .unwrap_or(DEFAULT_CONTENT_TYPE);
        let request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, header_value(content_type))
            .header("Job-Id", header_value(&job.meta.id))
            .header("Job-Attempt", HeaderValue::from(job.meta.attempt))
            .header("Job-Queue", header_value(&job.meta.queue))
            .headers(forwarded_headers(job))
            .body(job.body.clone());
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                return Outcome::Retry {
                    reason: self.failed_request(&error),
                    delay: None,
                }
            }
        };
        let status = response.status();
        if status.is_success() {
            let body = read_success(response, &job.meta).await;
            return if body.is_empty() {
                Outcome::Done
            } else {
                Outcome::DoneWith(body.into())
            };
        }
        let delay = retry_after(response.headers(), SystemTime::now());
        let location = response
            .headers()
            .get(LOCATION)
            .map(|l| l.as_bytes().to_vec());
        let body = read_prefix(response, ERROR_BODY_READ).await;
        let mut reason = format!("endpoint answered HTTP {}", status_text(status));
        if status.is_redirection() {
            reason.push_str(" (redirects are not followed");
            if let Some(location) = location {
                reason.push_str("; Location: ");
                reason.push_str(&snippet(&location, REASON_BODY_CHARS, false));
            }
            reason.push(')');
        } else {
            let body = snippet(&body, REASON_BODY_CHARS, false);
            if !body.is_empty() {
                reason.push_str(": ");
                reason.push_str(&body);
            }
        }
        if is_transient(status) {
            Outcome::Retry { reason, delay }
        } else {
            Outcome::Dead { reason }
        }
    }
}

/// `408`, `429` and `5xx` are worth another try; other failures are not.
pub(crate) fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// "503 Service Unavailable", or "599" for a code without a name.
pub(crate) fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(name) => format!("{} {name}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The delay a `Retry-After` header asks for (RFC 9110 §10.2.3: seconds, or an HTTP
/// date), at most [`MAX_RETRY_AFTER`]; a date in the past is no delay. `None` without a
/// header or with one that is neither.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: only an overflow can fail, and that is "very long".
        Duration::from_secs(value.parse().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The job's metadata headers the request carries: `x-job-*`, `traceparent` and
/// `tracestate` (as the producer took them from the client). Names that are not valid
/// HTTP header names (a message published by hand, say) are skipped.
fn forwarded_headers(job: &Job) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &job.meta.headers {
        let lower = name.to_ascii_lowercase();
        if !(lower.starts_with("x-job-") || lower == "traceparent" || lower == "tracestate") {
            continue;
        }
        if let Ok(name) = reqwest::header::HeaderName::from_bytes(lower.as_bytes()) {
            headers.insert(name, header_value(value));
        }
    }
    headers
}

/// `text` as a header value; control characters (not allowed in one) are
/// percent-encoded, so a hand-published job with an odd id or type is still sent.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| {
        let mut encoded = String::with_capacity(text.len() + 8);
        for c in text.chars() {
            if c.is_ascii_control() && c != '\t' {
                encoded.push_str(&format!("%{:02X}", c as u32));
            } else {
                encoded.push(c);
            }
        }
        HeaderValue::from_str(&encoded).unwrap_or(HeaderValue::from_static("invalid"))
    })
}

/// The first `limit` bytes of the body (fewer when it is shorter or breaks off).
async fn read_prefix(mut response: Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(limit - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// Reads a successful answer's body: the job's result (kept in its status when there is
/// a status store). At most [`SUCCESS_BODY_DRAIN`] bytes and one more are kept, so the
/// store can tell a longer body was cut; a short body also lets the connection go back
/// to the pool.
async fn read_success(mut response: Response, meta: &JobMeta) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() <= SUCCESS_BODY_DRAIN {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(SUCCESS_BODY_DRAIN + 1 - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(job_id = %meta.id, queue = %meta.queue, %error, "could not read the body of a successful answer");
                break;
            }
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use axum::extract::{Path, Query, State};
    use axum::http::HeaderMap as AxumHeaders;
    use axum::response::IntoResponse;
    use axum::routing::post;
    use axum::Router;
    use bytes::Bytes;
    use jobgate_shared::job::JobMeta;

    use super::*;

    /// One request as the test server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        path: String,
        headers: AxumHeaders,
        body: Bytes,
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    /// `POST /status/{code}` answers `code`; `?retry_after=V` adds `Retry-After: V`,
    /// `?retry_after_in=S` adds an HTTP date S seconds ahead, `?body_len=N` a body of N
    /// bytes (lines of `x`). `POST /slow` answers 200 after 5 s. Every request is logged.
    async fn server() -> (SocketAddr, Log) {
        async fn status(
            State(log): State<Log>,
            Path(code): Path<u16>,
            Query(query): Query<HashMap<String, String>>,
            headers: AxumHeaders,
            body: Bytes,
        ) -> impl IntoResponse {
            log.lock().unwrap().push(Seen {
                path: format!("/status/{code}"),
                headers,
                body,
            });
            let mut answer = axum::http::HeaderMap::new();
            if let Some(v) = query.get("retry_after") {
                answer.insert(RETRY_AFTER, v.parse().unwrap());
            }
            if let Some(s) = query.get("retry_after_in") {
                let at = SystemTime::now() + Duration::from_secs(s.parse().unwrap());
                answer.insert(RETRY_AFTER, httpdate::fmt_http_date(at).parse().unwrap());
            }
            if (300..400).contains(&code) {
                answer.insert(LOCATION, "/status/200".parse().unwrap());
            }
            let len: usize = query.get("body_len").map_or(0, |n| n.parse().unwrap());
            let body = "xxxxxxxxxxxxxxxxxxx\n".repeat(len / 20);
            (StatusCode::from_u16(code).unwrap(), answer, body)
        }
        async fn slow(State(log): State<Log>, headers: AxumHeaders, body: Bytes) -> StatusCode {
            log.lock().unwrap().push(Seen {
                path: "/slow".into(),
                headers,
                body,
            });
            tokio::time::sleep(Duration::from_secs(5)).await;
            StatusCode::OK
        }
        let log = Log::default();
        let app = Router::new()
            .route("/status/{code}", post(status))
            .route("/slow", post(slow))
            .with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, log)
    }

    fn job(body: &'static [u8], content_type: Option<&str>) -> Job {
        let mut meta = JobMeta::new("emails", content_type.map(str::to_owned));
        meta.attempt = 3;
        Job {
            meta,
            body: Bytes::from_static(body),
        }
    }

    async fn outcome(addr: SocketAddr, path_and_query: &str) -> Outcome {
        outcome_with_timeout(addr, path_and_query, Duration::from_secs(10)).await
    }

    async fn outcome_with_timeout(addr: SocketAddr, pq: &str, timeout: Duration) -> Outcome {
        let handler = HttpHandler::new(&format!("http://{addr}{pq}"), timeout).unwrap();
        handler.handle(&job(b"{}", Some("application/json"))).await
    }

    fn retry(outcome: Outcome) -> (String, Option<Duration>) {
        match outcome {
            Outcome::Retry { reason, delay } => (reason, delay),
            other => panic!("expected Retry, got {other:?}"),
        }
    }

    fn dead(outcome: Outcome) -> String {
        match outcome {
            Outcome::Dead { reason } => reason,
            other => panic!("expected Dead, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn posts_the_exact_body_and_the_job_headers() {
        let (addr, log) = server().await;
        let handler = HttpHandler::new(
            &format!("http://{addr}/status/200"),
            Duration::from_secs(10),
        )
        .unwrap();
        let body: &'static [u8] = b"\x00\x9f\x92\x96\xff binary\r\n\x00";
        let job = job(body, Some("application/x-thing; charset=binary"));
        assert_eq!(handler.handle(&job).await, Outcome::Done);

        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        let seen = &seen[0];
        assert_eq!(seen.body.as_ref(), body);
        let h = &seen.headers;
        assert_eq!(h["content-type"], "application/x-thing; charset=binary");
        assert_eq!(h["job-id"], job.meta.id.as_str());
        assert_eq!(h["job-attempt"], "3");
        assert_eq!(h["job-queue"], "emails");
        assert_eq!(h["content-length"], body.len().to_string().as_str());
        assert!(h["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("jobgate-consumer/"));
    }

    #[tokio::test]
    async fn a_successful_answer_body_is_the_result_kept_to_the_store_bound() {
        let (addr, _log) = server().await;
        let max = jobgate_shared::status::MAX_RESULT_BYTES;
        for (len, kept) in [(40, 40), (200_000, max + 1)] {
            let handler = HttpHandler::new(
                &format!("http://{addr}/status/200?body_len={len}"),
                Duration::from_secs(10),
            )
            .unwrap();
            match handler.handle(&job(b"{}", None)).await {
                // One byte past the bound tells the store the result was cut.
                Outcome::DoneWith(result) => {
                    assert_eq!(result.len(), kept, "{len}");
                    assert!(result.starts_with(b"xxxxxxxxxxxxxxxxxxx\n"));
                }
                other => panic!("expected DoneWith, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn job_metadata_and_trace_context_are_forwarded() {
        let (addr, log) = server().await;
        let handler = HttpHandler::new(
            &format!("http://{addr}/status/200"),
            Duration::from_secs(10),
        )
        .unwrap();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut job = job(b"{}", Some("application/json"));
        for (name, value) in [
            ("x-job-tenant", "acme"),
            ("traceparent", tp),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("x-last-error", "not forwarded"),
            ("x-job-bad name", "skipped"),
        ] {
            job.meta.headers.insert(name.into(), value.into());
        }
        assert_eq!(handler.handle(&job).await, Outcome::Done);
        let seen = log.lock().unwrap().clone();
        let h = &seen[0].headers;
        assert_eq!(h["x-job-tenant"], "acme");
        assert_eq!(h["traceparent"], tp);
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
        assert!(!h.contains_key("x-last-error"));
        assert!(!h.keys().any(|k| k.as_str().starts_with("x-job-bad")));
    }

    #[tokio::test]
    async fn a_job_without_content_type_is_sent_as_octet_stream() {
        let (addr, log) = server().await;
        let handler = HttpHandler::new(
            &format!("http://{addr}/status/204"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(handler.handle(&job(b"raw", None)).await, Outcome::Done);
        let seen = log.lock().unwrap()[0].clone();
        assert_eq!(seen.headers["content-type"], "application/octet-stream");
        assert_eq!(seen.body.as_ref(), b"raw");
    }

    #[tokio::test]
    async fn one_client_serves_many_jobs() {
        let (addr, log) = server().await;
        let handler = HttpHandler::new(
            &format!("http://{addr}/status/200"),
            Duration::from_secs(10),
        )
        .unwrap();
        for _ in 0..5 {
            assert_eq!(handler.handle(&job(b"x", None)).await, Outcome::Done);
        }
        assert_eq!(log.lock().unwrap().len(), 5);
    }

    #[tokio::test]
    async fn server_errors_are_retried() {
        let (addr, _) = server().await;
        let (reason, delay) = retry(outcome(addr, "/status/500").await);
        assert!(reason.contains("500 Internal Server Error"), "{reason}");
        assert_eq!(delay, None);
        let (reason, _) = retry(outcome(addr, "/status/502").await);
        assert!(reason.contains("502"), "{reason}");
    }

    #[tokio::test]
    async fn retry_after_in_seconds_is_the_delay() {
        let (addr, _) = server().await;
        let (reason, delay) = retry(outcome(addr, "/status/503?retry_after=7").await);
        assert!(reason.contains("503"), "{reason}");
        assert_eq!(delay, Some(Duration::from_secs(7)));
    }

    #[tokio::test]
    async fn retry_after_as_http_date_is_the_delay() {
        let (addr, _) = server().await;
        let (reason, delay) = retry(outcome(addr, "/status/429?retry_after_in=120").await);
        assert!(reason.contains("429 Too Many Requests"), "{reason}");
        let delay = delay.expect("a delay");
        // The date has whole seconds, and the request took some time.
        assert!(
            delay >= Duration::from_secs(110) && delay <= Duration::from_secs(120),
            "{delay:?}"
        );
    }

    #[tokio::test]
    async fn retry_after_is_capped_at_one_hour() {
        let (addr, _) = server().await;
        let (_, delay) = retry(outcome(addr, "/status/503?retry_after=86400").await);
        assert_eq!(delay, Some(MAX_RETRY_AFTER));
    }

    #[tokio::test]
    async fn request_timeout_is_retried() {
        let (addr, _) = server().await;
        let (reason, _) = retry(outcome(addr, "/status/408").await);
        assert!(reason.contains("408"), "{reason}");
    }

    #[tokio::test]
    async fn client_errors_are_dead() {
        let (addr, _) = server().await;
        let reason = dead(outcome(addr, "/status/400").await);
        assert!(reason.contains("400 Bad Request"), "{reason}");
        let reason = dead(outcome(addr, "/status/404").await);
        assert!(reason.contains("404 Not Found"), "{reason}");
        let reason = dead(outcome(addr, "/status/422").await);
        assert!(reason.contains("422"), "{reason}");
    }

    #[tokio::test]
    async fn redirects_are_not_followed_and_dead() {
        let (addr, log) = server().await;
        let reason = dead(outcome(addr, "/status/302").await);
        assert!(reason.contains("302 Found"), "{reason}");
        assert!(reason.contains("not followed"), "{reason}");
        assert!(reason.contains("/status/200"), "{reason}");
        let paths: Vec<String> = log.lock().unwrap().iter().map(|s| s.path.clone()).collect();
        assert_eq!(paths, ["/status/302"], "the redirect must not be followed");
        dead(outcome(addr, "/status/307").await);
    }

    #[tokio::test]
    async fn reasons_hold_only_a_short_snippet_of_the_body() {
        let (addr, _) = server().await;
        let reason = dead(outcome(addr, "/status/400?body_len=10000").await);
        assert!(reason.contains("xxx"), "{reason}");
        assert!(!reason.contains('\n'), "{reason}");
        let body_part = reason.split_once(": ").expect("a body snippet").1;
        assert!(body_part.chars().count() <= 200, "{reason}");
        assert!(reason.chars().count() < 260, "{reason}");
    }

    #[tokio::test]
    async fn no_answer_within_the_timeout_is_retried() {
        let (addr, log) = server().await;
        let started = std::time::Instant::now();
        let (reason, delay) =
            retry(outcome_with_timeout(addr, "/slow", Duration::from_millis(200)).await);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the timeout did not apply"
        );
        assert!(reason.contains("200 ms"), "{reason}");
        assert_eq!(delay, None);
        assert_eq!(
            log.lock().unwrap().len(),
            1,
            "the request did reach the server"
        );
    }

    #[tokio::test]
    async fn connection_refused_is_retried() {
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let (reason, delay) = retry(outcome(closed, "/hook").await);
        assert!(reason.starts_with("cannot connect"), "{reason}");
        assert!(!reason.contains("127.0.0.1"), "no URL in reasons: {reason}");
        assert_eq!(delay, None);
    }

    #[tokio::test]
    async fn https_is_supported() {
        // A TLS handshake against a plain-HTTP server: it fails as a connection failure
        // (so TLS is built in), not as a URL the client cannot handle.
        let (addr, _) = server().await;
        let handler = HttpHandler::new(
            &format!("https://{addr}/status/200"),
            Duration::from_secs(10),
        )
        .unwrap();
        let (reason, _) = retry(handler.handle(&job(b"x", None)).await);
        assert!(reason.starts_with("cannot connect"), "{reason}");
    }

    #[test]
    fn urls_are_checked_and_passwords_not_echoed() {
        let e = HttpHandler::new("ftp://u:secret@host/", Duration::from_secs(1)).unwrap_err();
        assert!(!format!("{e:#}").contains("secret"));
        let e = HttpHandler::new("http//missing-colon", Duration::from_secs(1)).unwrap_err();
        assert!(format!("{e:#}").contains("JOBGATE_HTTP_URL"));
        assert!(HttpHandler::new("https://example.com/hook", Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn retry_after_parsing() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let parse = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after(&h, now)
        };
        assert_eq!(parse("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse("99999999999999999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:50:07 GMT"),
            Some(Duration::from_secs(30))
        );
        // The obsolete forms RFC 9110 still asks recipients to accept.
        assert_eq!(
            parse("Sunday, 06-Nov-94 08:49:47 GMT"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse("Sun Nov  6 08:49:57 1994"),
            Some(Duration::from_secs(20))
        );
        assert_eq!(parse("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(
            parse("Mon, 07 Nov 1994 08:49:37 GMT"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse("-5"), None);
        assert_eq!(parse("1.5"), None);
        assert_eq!(parse("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn odd_header_values_are_encoded_not_refused() {
        assert_eq!(header_value("abc-123"), "abc-123");
        assert_eq!(header_value("a\nb\x00c"), "a%0Ab%00c");
    }
}
