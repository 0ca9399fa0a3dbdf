//! Completion callbacks, the consumer's side (issue 16).
//!
//! When a job with a callback URL (message header `x-callback-url`, from the request
//! header `Jobgate-Callback`) ends (`done`, `dead`, or acked unrun because the status
//! store says `cancelled` or `done`), the worker publishes a callback message to the
//! job queue's callbacks queue `Q.callbacks` and waits for the broker's confirm before
//! it acks the job (the same confirmed-copy-then-ack path as retries and dead letters,
//! [`crate::settle`]). Its body is the job's final status, the JSON that
//! `GET /jobs/{queue}/{job_id}` answers. A crash before the ack redelivers the job,
//! which then publishes the callback again: at least once.
//!
//! A second worker in the same process drains `Q.callbacks` with [`CallbackHandler`],
//! which POSTs each body, signed, to its URL. Its failures go through the same retry
//! tiers (`Q.callbacks.retry.<tier>`) and dead-letter queue (`Q.callbacks.dlq`) as any
//! job: one mechanism. The URL is checked against `JOBGATE_CALLBACK_ALLOW` when the
//! message is built and again before it is sent, since a message published by hand
//! can carry any URL: a refused URL is logged and counted, never connected to.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use async_trait::async_trait;
use bytes::Bytes;
use jobgate_shared::callback::{
    self, callbacks_queue_name, job_queue_of, CallbackAllow, HEADER_CALLBACK_URL,
};
use jobgate_shared::job::{Job, JobMeta};
use jobgate_shared::metrics::Registry;
use jobgate_shared::status::{self, JobStatus, State, StatusStore};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use reqwest::header::{HeaderValue, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;

use crate::config::ConsumerConfig;
use crate::handler::{Handler, Outcome};
use crate::settle::{Ending, Message};

/// Default of `JOBGATE_CALLBACK_TIMEOUT_MS`.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Shortest `JOBGATE_CALLBACK_SECRET`, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;
/// Message headers a callback message keeps from its job (the rest stay behind).
const KEPT_HEADERS: [&str; 3] = ["traceparent", "tracestate", "x-request-id"];

/// The callback secret (`JOBGATE_CALLBACK_SECRET`); `Debug` never shows it.
#[derive(Clone)]
pub struct CallbackSecret(String);

impl std::fmt::Debug for CallbackSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallbackSecret(***)")
    }
}

/// A value parser that never quotes the value in its errors (clap's own errors do).
fn parse_secret(text: &str) -> Result<CallbackSecret, String> {
    Ok(CallbackSecret(text.to_owned()))
}

/// The consumer's callback settings.
#[derive(Debug, Clone, clap::Args)]
pub struct CallbackArgs {
    /// Hosts callbacks may go to (comma list: `host`, `host:port`, `*.domain`, IP
    /// addresses), checked again before every callback is queued and sent; the same
    /// list as the producer's. Unset: no callbacks (a job's callback URL is dropped,
    /// logged and counted) and no callback worker.
    #[arg(long, env = "JOBGATE_CALLBACK_ALLOW", value_parser = CallbackAllow::parse)]
    pub callback_allow: Option<CallbackAllow>,

    /// The key of every callback's `Jobgate-Signature` (HMAC-SHA256), at least 16
    /// bytes; required with `JOBGATE_CALLBACK_ALLOW`. Never logged.
    #[arg(long, env = "JOBGATE_CALLBACK_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub callback_secret: Option<CallbackSecret>,

    /// How long one callback request may take (connect, send, answer), in milliseconds.
    #[arg(long, env = "JOBGATE_CALLBACK_TIMEOUT_MS", default_value_t = DEFAULT_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub callback_timeout_ms: u64,
}

impl CallbackArgs {
    /// Refuses settings that do not fit: an allow-list without a secret (callbacks
    /// would go out unsigned), or a short secret.
    pub fn check(&self) -> anyhow::Result<()> {
        match (&self.callback_allow, &self.callback_secret) {
            (Some(_), None) => bail!(
                "JOBGATE_CALLBACK_ALLOW is set but JOBGATE_CALLBACK_SECRET is not: callbacks \
                 are signed with it"
            ),
            (_, Some(secret)) if secret.0.len() < MIN_SECRET_BYTES => {
                bail!("JOBGATE_CALLBACK_SECRET must be at least {MIN_SECRET_BYTES} bytes long")
            }
            _ => Ok(()),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.callback_timeout_ms)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallbackLabels {
    queue: String,
    outcome: &'static str,
}

/// `jobgate_callbacks_total{queue,outcome}`, by job queue: `queued` (a callback
/// message was built; it is confirmed before its job is acked), `refused` (the URL is
/// not allowed: dropped or dead-lettered, never sent), `delivered` (answered 2xx),
/// `failed` (an attempt that did not get a 2xx; the callbacks queue's retries and DLQ
/// take it from there).
#[derive(Debug, Clone, Default)]
pub struct CallbackMetrics(Family<CallbackLabels, Counter>);

impl CallbackMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "callbacks",
            "Completion callbacks by job queue and outcome (queued, refused, delivered, failed)",
            m.0.clone(),
        );
        m
    }

    fn count(&self, queue: &str, outcome: &'static str) {
        let queue = job_queue_of(queue).to_owned();
        self.0
            .get_or_create(&CallbackLabels { queue, outcome })
            .inc();
    }
}

/// What the job worker needs to queue callbacks.
#[derive(Debug)]
pub struct Callbacks {
    /// None: callbacks are off, and every callback URL is refused.
    allow: Option<CallbackAllow>,
    metrics: CallbackMetrics,
}

impl Callbacks {
    pub fn new(allow: Option<CallbackAllow>, metrics: CallbackMetrics) -> Self {
        Self { allow, metrics }
    }

    /// The callback message of a job that ended as `ending`, built from what the
    /// consumer knows; none when the job has no callback URL or its URL is refused.
    pub fn on_end(&self, job: &Job, ending: Ending<'_>) -> Option<Message> {
        job.meta.headers.get(HEADER_CALLBACK_URL)?;
        let status = match ending {
            Ending::Done { result } => final_status(&job.meta, State::Done, None, result),
            Ending::Dead { reason } => final_status(&job.meta, State::Dead, Some(reason), None),
        };
        self.message(&job.meta, &status)
    }

    /// The callback message of a job acked unrun because the store says it is `state`
    /// (`cancelled`, or `done` already: a redelivery after a crash before the ack, whose
    /// callback may not have been queued). The body is the stored status when it can
    /// be read, else built from the message.
    pub async fn on_skip(
        &self,
        store: Option<&StatusStore>,
        meta: &JobMeta,
        state: State,
    ) -> Option<Message> {
        meta.headers.get(HEADER_CALLBACK_URL)?;
        let stored = match store {
            Some(store) => match store.get(&meta.queue, &meta.id).await {
                Ok(stored) => stored.filter(|s| s.state == state),
                Err(error) => {
                    tracing::warn!(job_id = %meta.id, queue = %meta.queue, %error, "could not read the job's status for its callback; sending what the message says");
                    None
                }
            },
            None => None,
        };
        let status = stored.unwrap_or_else(|| final_status(meta, state, None, None));
        self.message(meta, &status)
    }

    fn message(&self, meta: &JobMeta, status: &JobStatus) -> Option<Message> {
        let (job_id, queue) = (&meta.id, &meta.queue);
        let raw = meta.headers.get(HEADER_CALLBACK_URL)?;
        let url = match callback::check(self.allow.as_ref(), raw) {
            Ok(url) => url,
            Err(reason) => {
                self.metrics.count(queue, "refused");
                tracing::warn!(%job_id, %queue, %reason, "callback dropped: its URL is refused");
                return None;
            }
        };
        let body = match serde_json::to_vec(status) {
            Ok(body) => Bytes::from(body),
            Err(error) => {
                tracing::error!(%job_id, %queue, %error, "callback dropped: the status cannot be written as JSON");
                return None;
            }
        };
        let mut headers: std::collections::BTreeMap<String, String> = KEPT_HEADERS
            .iter()
            .filter_map(|name| Some(((*name).to_owned(), meta.headers.get(*name)?.clone())))
            .collect();
        headers.insert(HEADER_CALLBACK_URL.to_owned(), url.to_string());
        let copy = JobMeta {
            id: meta.id.clone(),
            // The job queue: the worker's publisher serves it (the destination differs).
            queue: meta.queue.clone(),
            content_type: Some("application/json".to_owned()),
            enqueued_at: Some(SystemTime::now()),
            attempt: 1,
            headers,
            redeliveries: 0,
        };
        self.metrics.count(queue, "queued");
        tracing::debug!(%job_id, %queue, state = %status.state, "callback queued");
        Some(Message {
            destination: callbacks_queue_name(queue),
            meta: copy,
            body,
        })
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// The final status of a job as the consumer knows it without a store: the shape of
/// `GET /jobs/{queue}/{job_id}` (`created_at` is when the producer accepted it).
pub fn final_status(
    meta: &JobMeta,
    state: State,
    error: Option<&str>,
    result: Option<&[u8]>,
) -> JobStatus {
    let now = rfc3339(SystemTime::now());
    let result_truncated = result.is_some_and(|r| r.len() > status::MAX_RESULT_BYTES);
    let result = result.map(|r| {
        let text = String::from_utf8_lossy(&r[..r.len().min(status::MAX_RESULT_BYTES)]);
        status::cut(&text, status::MAX_RESULT_BYTES)
    });
    JobStatus {
        job_id: meta.id.clone(),
        queue: meta.queue.clone(),
        state,
        attempts: if state == State::Cancelled {
            0
        } else {
            meta.attempt
        },
        created_at: meta.enqueued_at.map(rfc3339),
        updated_at: now.clone(),
        started_at: None,
        finished_at: Some(now),
        next_attempt_at: None,
        scheduled_for: meta
            .headers
            .get(jobgate_shared::job::HEADER_NOT_BEFORE)
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
            .map(rfc3339),
        last_error: error.map(|e| status::cut(e, status::MAX_ERROR_BYTES)),
        result: result.filter(|r| !r.is_empty()),
        result_truncated,
        replays: status::replays_of(meta),
        replayed_at: None,
        owner: None,
    }
}

/// The settings of the callback worker: those of `config` for the callbacks queues of
/// its job queues (`Q.callbacks`), with their own Kafka consumer groups.
pub fn worker_config(config: &ConsumerConfig) -> ConsumerConfig {
    let mut c = config.clone();
    c.queue = config
        .queue
        .iter()
        .map(|q| callbacks_queue_name(q))
        .collect();
    if !c.broker.kafka_group.contains("{queue}") {
        // One fixed group for every queue: the callbacks get one of their own.
        c.broker.kafka_group = format!("{}.callbacks", c.broker.kafka_group);
    }
    c
}

/// POSTs each callback message's body to its URL, signed (see the README, "Completion
/// callbacks"): `Content-Type: application/json`, `Jobgate-Signature:
/// t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, `Jobgate-Job-Id`,
/// `Jobgate-Queue`. Redirects are not followed.
///
/// | answer | outcome |
/// |---|---|
/// | `2xx` | `Done` |
/// | `408`, `429`, `5xx`, no answer in time, cannot connect | `Retry` (the tiers; `Retry-After` honoured up to an hour) |
/// | `3xx` | `Dead`: redirects are not followed |
/// | other `4xx` | `Dead`: the receiver refuses it; `consumer dlq replay --queue Q.callbacks` sends it again |
/// | URL missing or not allowed | `Dead`, never connected to |
pub struct CallbackHandler {
    client: reqwest::Client,
    secret: Arc<CallbackSecret>,
    allow: CallbackAllow,
    timeout: Duration,
    metrics: CallbackMetrics,
}

impl CallbackHandler {
    pub fn new(
        args: &CallbackArgs,
        allow: CallbackAllow,
        metrics: CallbackMetrics,
    ) -> anyhow::Result<Self> {
        let Some(secret) = args.callback_secret.clone() else {
            bail!("JOBGATE_CALLBACK_SECRET is not set");
        };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(args.timeout())
            .timeout(args.timeout())
            .user_agent(concat!("jobgate-callbacks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            secret: Arc::new(secret),
            allow,
            timeout: args.timeout(),
            metrics,
        })
    }

    async fn send(&self, job: &Job) -> Outcome {
        let meta = &job.meta;
        let raw = meta
            .headers
            .get(HEADER_CALLBACK_URL)
            .map_or("", String::as_str);
        let url = match self.allow.check(raw) {
            Ok(url) => url,
            Err(reason) => {
                self.metrics.count(&meta.queue, "refused");
                tracing::warn!(job_id = %meta.id, queue = %meta.queue, %reason, "callback not sent: its URL is refused");
                return Outcome::Dead {
                    reason: format!("callback not sent: {reason}"),
                };
            }
        };
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let signature = callback::signature(self.secret.0.as_bytes(), at, &job.body);
        let request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(callback::SIGNATURE_HEADER, signature)
            .header(callback::QUEUE_HEADER, job_queue_of(&meta.queue))
            .body(job.body.clone());
        let request = match HeaderValue::from_str(&meta.id) {
            Ok(id) => request.header(callback::JOB_ID_HEADER, id),
            Err(_) => request,
        };
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                let retry_after =
                    crate::handlers::http::retry_after(response.headers(), SystemTime::now());
                let location = response.headers().get(LOCATION).is_some();
                classify(status, retry_after, location)
            }
            Err(error) if error.is_timeout() => Outcome::Retry {
                reason: format!(
                    "no answer within {} ms (JOBGATE_CALLBACK_TIMEOUT_MS)",
                    self.timeout.as_millis()
                ),
                delay: None,
            },
            // Not the error's own text: it holds the URL, whose query may be a token.
            Err(error) => Outcome::Retry {
                reason: if error.is_connect() {
                    "cannot connect to the callback URL".to_owned()
                } else {
                    "the callback request failed".to_owned()
                },
                delay: None,
            },
        }
    }
}

#[async_trait]
impl Handler for CallbackHandler {
    async fn handle(&self, job: &Job) -> Outcome {
        let outcome = self.send(job).await;
        let queue = &job.meta.queue;
        match &outcome {
            Outcome::Done | Outcome::DoneWith(_) => self.metrics.count(queue, "delivered"),
            Outcome::Retry { reason, .. } | Outcome::Dead { reason } => {
                if !reason.starts_with("callback not sent") {
                    self.metrics.count(queue, "failed");
                }
            }
        }
        outcome
    }
}

/// What a callback's answer makes of the attempt (see [`CallbackHandler`]).
fn classify(status: StatusCode, retry_after: Option<Duration>, location: bool) -> Outcome {
    let named = crate::handlers::http::status_text(status);
    if status.is_success() {
        Outcome::Done
    } else if status.is_redirection() {
        let note = if location { " with a Location" } else { "" };
        Outcome::Dead {
            reason: format!("callback answered HTTP {named}{note}: redirects are not followed"),
        }
    } else if crate::handlers::http::is_transient(status) {
        Outcome::Retry {
            reason: format!("callback answered HTTP {named}"),
            delay: retry_after,
        }
    } else {
        Outcome::Dead {
            reason: format!("callback answered HTTP {named}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(url: Option<&str>) -> Job {
        let mut meta = JobMeta::new("emails", None);
        meta.attempt = 3;
        meta.headers.insert("x-job-tenant".into(), "acme".into());
        meta.headers.insert("traceparent".into(), "tp".into());
        if let Some(url) = url {
            meta.headers.insert(HEADER_CALLBACK_URL.into(), url.into());
        }
        Job {
            meta,
            body: Bytes::from_static(b"job body"),
        }
    }

    #[test]
    fn answers_are_classified() {
        let code = |n| StatusCode::from_u16(n).unwrap();
        assert!(matches!(classify(code(200), None, false), Outcome::Done));
        assert!(matches!(classify(code(204), None, false), Outcome::Done));
        for transient in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(
                    classify(code(transient), None, false),
                    Outcome::Retry { .. }
                ),
                "{transient}"
            );
        }
        let wait = Some(Duration::from_secs(7));
        assert!(matches!(
            classify(code(429), wait, false),
            Outcome::Retry { delay, .. } if delay == wait
        ));
        for refused in [301, 302, 307, 308, 400, 401, 403, 404, 410, 422] {
            assert!(
                matches!(classify(code(refused), None, true), Outcome::Dead { .. }),
                "{refused}"
            );
        }
        let Outcome::Dead { reason } = classify(code(302), None, true) else {
            unreachable!()
        };
        assert!(reason.contains("redirects are not followed"), "{reason}");
    }

    #[test]
    fn a_callback_message_carries_the_final_status_and_only_the_url_and_trace_headers() {
        let metrics = CallbackMetrics::default();
        let callbacks = Callbacks::new(
            Some(CallbackAllow::parse("hooks.example.com").unwrap()),
            metrics.clone(),
        );
        let done = job(Some("https://hooks.example.com/cb"));
        let copy = callbacks
            .on_end(
                &done,
                Ending::Done {
                    result: Some(b"ok"),
                },
            )
            .expect("a callback");
        assert_eq!(copy.destination, "emails.callbacks");
        assert_eq!(
            (copy.meta.id.as_str(), copy.meta.attempt),
            (done.meta.id.as_str(), 1)
        );
        assert_eq!(copy.meta.content_type.as_deref(), Some("application/json"));
        let names: Vec<&str> = copy.meta.headers.keys().map(String::as_str).collect();
        assert_eq!(names, ["traceparent", HEADER_CALLBACK_URL]);
        let status: serde_json::Value = serde_json::from_slice(&copy.body).unwrap();
        assert_eq!(status["state"], "done");
        assert_eq!(status["attempts"], 3);
        assert_eq!(status["result"], "ok");
        assert_eq!(status["job_id"], done.meta.id.as_str());
        assert!(status["finished_at"].is_string() && status["created_at"].is_string());

        let dead = callbacks
            .on_end(
                &done,
                Ending::Dead {
                    reason: "bad input",
                },
            )
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&dead.body).unwrap();
        assert_eq!(
            (status["state"].as_str(), status["last_error"].as_str()),
            (Some("dead"), Some("bad input"))
        );

        assert!(callbacks
            .on_end(&job(None), Ending::Done { result: None })
            .is_none());
        let elsewhere = job(Some("https://evil.net/"));
        assert!(callbacks
            .on_end(&elsewhere, Ending::Done { result: None })
            .is_none());
        let off = Callbacks::new(None, metrics.clone());
        assert!(off.on_end(&done, Ending::Done { result: None }).is_none());
        let count = |outcome| {
            let labels = CallbackLabels {
                queue: "emails".into(),
                outcome,
            };
            metrics.0.get_or_create(&labels).get()
        };
        assert_eq!((count("queued"), count("refused")), (2, 2));
    }

    #[test]
    fn an_allow_list_needs_a_long_enough_secret() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Args {
            #[command(flatten)]
            callback: CallbackArgs,
        }
        let parse = |args: &[&str]| {
            Args::try_parse_from([&["x"], args].concat())
                .unwrap()
                .callback
        };
        assert!(parse(&[]).check().is_ok(), "off by default");
        assert!(parse(&["--callback-allow", "a.com"]).check().is_err());
        assert!(
            parse(&["--callback-allow", "a.com", "--callback-secret", "short"])
                .check()
                .is_err()
        );
        let ok = parse(&[
            "--callback-allow",
            "a.com",
            "--callback-secret",
            "0123456789abcdef",
        ]);
        assert!(ok.check().is_ok());
        assert_eq!(ok.callback_timeout_ms, DEFAULT_TIMEOUT_MS);
        assert!(
            !format!("{ok:?}").contains("0123456789abcdef"),
            "the secret is never shown"
        );
    }
}
