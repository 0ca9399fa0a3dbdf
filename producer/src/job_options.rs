//! Per-job options from request headers, for single jobs and batches alike (a batch's
//! headers apply to every item):
//!
//! | request header          | value                                   | message header    |
//! |-------------------------|-----------------------------------------|-------------------|
//! | `Jobgate-Delay`         | seconds from now (`90`, `1.5`)          | `x-not-before` ms |
//! | `Jobgate-Not-Before`    | RFC 3339 time (`2026-01-05T10:00:00Z`)  | `x-not-before` ms |
//! | `Jobgate-Max-Attempts`  | attempts in all, 1 to 1000              | `x-max-attempts`  |
//! | `Jobgate-Timeout`       | seconds (`30`) or a duration (`1m 30s`) | `x-timeout-ms`    |
//!
//! A due time at or before now (a delay of 0, a time in the past) means "run now": no
//! header. A due time further away than `JOBGATE_SCHEDULE_MAX` is refused, so is a
//! delay and a time together, and anything that does not parse: 400 `bad-schedule` or
//! `bad-job-policy`, nothing published. The consumer bounds the policy by its own
//! ceilings; here only the format and absolute bounds are checked.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use jobgate_shared::job::{HEADER_MAX_ATTEMPTS, HEADER_NOT_BEFORE, HEADER_TIMEOUT_MS};

/// Request header: run the job no sooner than this many seconds from now.
pub const DELAY: &str = "jobgate-delay";
/// Request header: run the job no sooner than this RFC 3339 time.
pub const NOT_BEFORE: &str = "jobgate-not-before";
/// Request header: the attempts the job gets (bounded by the consumer's ceiling).
pub const MAX_ATTEMPTS: &str = "jobgate-max-attempts";
/// Request header: the job timeout (bounded by the consumer's ceiling).
pub const TIMEOUT: &str = "jobgate-timeout";

/// Default of `JOBGATE_SCHEDULE_MAX`: how far ahead a job may be scheduled (30 days).
pub const DEFAULT_SCHEDULE_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most attempts a job may ask for (`JOBGATE_MAX_ATTEMPTS` has the same bound).
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;
/// Longest timeout a job may ask for (7 days); the consumer's ceiling is usually lower.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a request asked for its job(s), checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobOptions {
    /// When the job is due, if in the future.
    pub due: Option<SystemTime>,
    pub max_attempts: Option<u32>,
    pub timeout: Option<Duration>,
}

/// A job option header that cannot be honoured: 400, nothing published. The text names
/// the header (and the setting, for a schedule past the horizon).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadJobOption {
    /// `Jobgate-Delay` or `Jobgate-Not-Before`: `bad-schedule`.
    #[error("{0}")]
    Schedule(String),
    /// `Jobgate-Max-Attempts` or `Jobgate-Timeout`: `bad-job-policy`.
    #[error("{0}")]
    Policy(String),
}

impl IntoResponse for BadJobOption {
    fn into_response(self) -> Response {
        let (slug, title, detail) = match self {
            Self::Schedule(why) => ("bad-schedule", "Bad schedule", why),
            Self::Policy(why) => ("bad-job-policy", "Bad job policy", why),
        };
        crate::error::problem_response(
            axum::http::StatusCode::BAD_REQUEST,
            slug,
            title,
            format!("{detail} Nothing was queued."),
            None,
        )
    }
}

/// The one value of header `name`, as text; none when absent. Repeated or not
/// visible ASCII is an error made by `bad`.
fn single<'a>(
    headers: &'a HeaderMap,
    name: &str,
    bad: fn(String) -> BadJobOption,
) -> Result<Option<&'a str>, BadJobOption> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(bad(format!("Header {name} is repeated.")));
    }
    value.to_str().map(|v| Some(v.trim())).map_err(|_| {
        bad(format!(
            "Header {name} has characters other than visible ASCII."
        ))
    })
}

/// Seconds as a plain decimal number (`90`, `1.5`; no sign, no exponent).
fn decimal_seconds(text: &str) -> Option<Duration> {
    let plain = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().filter(|b| *b == b'.').count() <= 1
        && text.bytes().any(|b| b.is_ascii_digit());
    if !plain {
        return None;
    }
    Duration::try_from_secs_f64(text.parse::<f64>().ok()?).ok()
}

/// An RFC 3339 time: `Z` or an offset `±HH:MM`, fractional seconds allowed.
fn rfc3339(text: &str) -> Option<SystemTime> {
    // humantime reads UTC (`Z`) only; an offset is taken off here.
    let split = text
        .len()
        .checked_sub(6)
        .and_then(|i| Some((i, text.get(i..)?)));
    let (local, east_secs) = match split {
        Some((i, tail)) if tail.starts_with(['+', '-']) && tail.get(3..4) == Some(":") => {
            let hours: u64 = tail.get(1..3)?.parse().ok()?;
            let minutes: u64 = tail.get(4..6)?.parse().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let secs = i64::try_from(hours * 3600 + minutes * 60).ok()?;
            (&text[..i], if tail.starts_with('-') { -secs } else { secs })
        }
        _ => (text.strip_suffix(['Z', 'z'])?, 0),
    };
    let as_utc = humantime::parse_rfc3339(&format!("{local}Z")).ok()?;
    // The local time is `east_secs` ahead of UTC.
    let shift = Duration::from_secs(east_secs.unsigned_abs());
    if east_secs >= 0 {
        as_utc.checked_sub(shift)
    } else {
        as_utc.checked_add(shift)
    }
}

fn epoch_millis(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

impl JobOptions {
    /// The options of a request received at `now`; a due time more than `horizon`
    /// away is refused, naming `JOBGATE_SCHEDULE_MAX`.
    pub fn from_headers(
        headers: &HeaderMap,
        now: SystemTime,
        horizon: Duration,
    ) -> Result<Self, BadJobOption> {
        let schedule = BadJobOption::Schedule;
        let policy = BadJobOption::Policy;
        let delay = single(headers, DELAY, schedule)?;
        let not_before = single(headers, NOT_BEFORE, schedule)?;
        let wait = match (delay, not_before) {
            (Some(_), Some(_)) => {
                return Err(schedule(
                    "Give Jobgate-Delay or Jobgate-Not-Before, not both.".to_owned(),
                ))
            }
            (Some(text), None) => Some(decimal_seconds(text).ok_or_else(|| {
                schedule(format!(
                    "Jobgate-Delay {text:?} is not a number of seconds (like 90 or 1.5)."
                ))
            })?),
            (None, Some(text)) => {
                let at = rfc3339(text).ok_or_else(|| {
                    schedule(format!(
                        "Jobgate-Not-Before {text:?} is not an RFC 3339 time (like \
                         2026-01-05T10:00:00Z or 2026-01-05T11:00:00+01:00)."
                    ))
                })?;
                // In the past: due now.
                Some(at.duration_since(now).unwrap_or(Duration::ZERO))
            }
            (None, None) => None,
        };
        let wait = wait.filter(|w| !w.is_zero());
        if let Some(wait) = wait {
            if wait > horizon {
                let header = if delay.is_some() {
                    "Jobgate-Delay"
                } else {
                    "Jobgate-Not-Before"
                };
                return Err(schedule(format!(
                    "{header}: the job would be due in {}, beyond the scheduling horizon of {} \
                     (JOBGATE_SCHEDULE_MAX).",
                    humantime::format_duration(Duration::from_secs(wait.as_secs())),
                    humantime::format_duration(horizon)
                )));
            }
        }
        let due = match wait {
            Some(wait) => Some(
                now.checked_add(wait)
                    .ok_or_else(|| schedule("The due time is out of range.".to_owned()))?,
            ),
            None => None,
        };

        let max_attempts = single(headers, MAX_ATTEMPTS, policy)?
            .map(|text| {
                text.parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_ATTEMPTS_LIMIT).contains(n))
                    .ok_or_else(|| {
                        policy(format!(
                            "Jobgate-Max-Attempts {text:?} is not a whole number from 1 to \
                             {MAX_ATTEMPTS_LIMIT}."
                        ))
                    })
            })
            .transpose()?;
        let timeout = single(headers, TIMEOUT, policy)?
            .map(|text| {
                decimal_seconds(text)
                    .or_else(|| humantime::parse_duration(text).ok())
                    .filter(|t| t.as_millis() >= 1 && *t <= MAX_TIMEOUT)
                    .ok_or_else(|| {
                        policy(format!(
                            "Jobgate-Timeout {text:?} is not a duration from 1ms to {} \
                             (seconds like 30, or like 1m 30s).",
                            humantime::format_duration(MAX_TIMEOUT)
                        ))
                    })
            })
            .transpose()?;
        Ok(Self {
            due,
            max_attempts,
            timeout,
        })
    }

    /// Writes the options into a job's message headers.
    pub fn apply(&self, headers: &mut BTreeMap<String, String>) {
        if let Some(due) = self.due {
            headers.insert(HEADER_NOT_BEFORE.to_owned(), epoch_millis(due).to_string());
        }
        if let Some(n) = self.max_attempts {
            headers.insert(HEADER_MAX_ATTEMPTS.to_owned(), n.to_string());
        }
        if let Some(timeout) = self.timeout {
            headers.insert(
                HEADER_TIMEOUT_MS.to_owned(),
                timeout.as_millis().to_string(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const HORIZON: Duration = DEFAULT_SCHEDULE_MAX;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_767_607_200) // 2026-01-05T10:00:00Z
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<JobOptions, BadJobOption> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        JobOptions::from_headers(&headers, now(), HORIZON)
    }

    fn due_in(pairs: &[(&str, &str)]) -> Option<Duration> {
        parse(pairs)
            .unwrap()
            .due
            .map(|due| due.duration_since(now()).unwrap())
    }

    #[test]
    fn a_delay_is_seconds_from_now_and_zero_means_now() {
        assert_eq!(
            due_in(&[("Jobgate-Delay", "90")]),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            due_in(&[("Jobgate-Delay", "1.5")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(due_in(&[("Jobgate-Delay", "0")]), None);
        assert_eq!(due_in(&[("Jobgate-Delay", "0.0")]), None);
        assert_eq!(due_in(&[]), None);
        for junk in ["-1", "1e3", "soon", "", ".", "1.2.3", "NaN", "inf", "+5"] {
            let error = parse(&[("Jobgate-Delay", junk)]);
            assert!(
                matches!(&error, Err(BadJobOption::Schedule(why)) if why.contains("Jobgate-Delay")),
                "{junk:?}: {error:?}"
            );
        }
    }

    #[test]
    fn a_time_is_rfc3339_with_z_or_an_offset_and_the_past_means_now() {
        let hour = Some(Duration::from_secs(3600));
        assert_eq!(
            due_in(&[("Jobgate-Not-Before", "2026-01-05T11:00:00Z")]),
            hour
        );
        assert_eq!(
            due_in(&[("Jobgate-Not-Before", "2026-01-05T12:00:00+01:00")]),
            hour
        );
        assert_eq!(
            due_in(&[("Jobgate-Not-Before", "2026-01-05T05:00:00-06:00")]),
            hour
        );
        assert_eq!(
            due_in(&[("Jobgate-Not-Before", "2026-01-05T10:00:00.250Z")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            due_in(&[("Jobgate-Not-Before", "2020-01-01T00:00:00Z")]),
            None
        );
        for junk in [
            "tomorrow",
            "2026-01-05",
            "2026-01-05T11:00:00",
            "2026-01-05T11:00:00+25:00",
            "2026-01-05T11:00:00+0100",
            "2026-13-05T11:00:00Z",
        ] {
            assert!(
                matches!(
                    parse(&[("Jobgate-Not-Before", junk)]),
                    Err(BadJobOption::Schedule(_))
                ),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn both_at_once_a_repeat_or_beyond_the_horizon_is_refused() {
        let both = parse(&[
            ("Jobgate-Delay", "5"),
            ("Jobgate-Not-Before", "2026-01-05T11:00:00Z"),
        ]);
        assert!(matches!(both, Err(BadJobOption::Schedule(why)) if why.contains("not both")));
        let twice = parse(&[("Jobgate-Delay", "5"), ("Jobgate-Delay", "6")]);
        assert!(matches!(twice, Err(BadJobOption::Schedule(why)) if why.contains("repeated")));
        let days_30 = HORIZON.as_secs().to_string();
        assert_eq!(due_in(&[("Jobgate-Delay", &days_30)]), Some(HORIZON));
        let beyond = (HORIZON.as_secs() + 1).to_string();
        let error = parse(&[("Jobgate-Delay", &beyond)]);
        assert!(
            matches!(&error, Err(BadJobOption::Schedule(why)) if why.contains("JOBGATE_SCHEDULE_MAX") && why.contains("30days")),
            "{error:?}"
        );
        let far = parse(&[("Jobgate-Not-Before", "2030-01-01T00:00:00Z")]);
        assert!(
            matches!(far, Err(BadJobOption::Schedule(why)) if why.contains("JOBGATE_SCHEDULE_MAX"))
        );
        assert!(parse(&[("Jobgate-Delay", "99999999999999999999999")]).is_err());
    }

    #[test]
    fn the_policy_headers_are_checked_and_written_as_message_headers() {
        let options = parse(&[
            ("Jobgate-Max-Attempts", "1"),
            ("Jobgate-Timeout", "1m 30s"),
            ("Jobgate-Delay", "2"),
        ])
        .unwrap();
        assert_eq!(options.max_attempts, Some(1));
        assert_eq!(options.timeout, Some(Duration::from_secs(90)));
        let mut headers = BTreeMap::new();
        options.apply(&mut headers);
        assert_eq!(headers["x-max-attempts"], "1");
        assert_eq!(headers["x-timeout-ms"], "90000");
        assert_eq!(
            headers["x-not-before"],
            (epoch_millis(now()) + 2000).to_string()
        );
        assert_eq!(
            parse(&[("Jobgate-Timeout", "0.5")]).unwrap().timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse(&[("Jobgate-Timeout", "250ms")]).unwrap().timeout,
            Some(Duration::from_millis(250))
        );
        for (name, junk) in [
            ("Jobgate-Max-Attempts", "0"),
            ("Jobgate-Max-Attempts", "1001"),
            ("Jobgate-Max-Attempts", "-1"),
            ("Jobgate-Max-Attempts", "two"),
            ("Jobgate-Timeout", "0"),
            ("Jobgate-Timeout", "0.0001"),
            ("Jobgate-Timeout", "8days"),
            ("Jobgate-Timeout", "forever"),
        ] {
            let error = parse(&[(name, junk)]);
            assert!(
                matches!(&error, Err(BadJobOption::Policy(why)) if why.contains(name)),
                "{name}: {junk:?}: {error:?}"
            );
        }
        let mut none = BTreeMap::new();
        parse(&[]).unwrap().apply(&mut none);
        assert!(none.is_empty());
    }

    #[tokio::test]
    async fn single_and_batch_jobs_carry_the_options_and_bad_ones_are_400() {
        use std::sync::Arc;

        use axum::body::Body;
        use axum::http::{Request, StatusCode};
        use http_body_util::BodyExt;
        use jobgate_shared::broker::memory::MemoryBroker;
        use tower::ServiceExt;

        use crate::startup::app;
        use crate::state::AppState;

        let broker = MemoryBroker::new();
        let router = app(
            AppState::new(Arc::new(broker.clone()), vec!["q".into()], 1024)
                .with_schedule_max(Duration::from_secs(3600)),
        );
        let single = Request::post("/jobs/q")
            .header("Jobgate-Delay", "60")
            .header("Jobgate-Max-Attempts", "2")
            .body(Body::from("x"))
            .unwrap();
        let batch = Request::post("/jobs/q/batch")
            .header("content-type", "application/x-ndjson")
            .header("Jobgate-Delay", "60")
            .header("Jobgate-Max-Attempts", "2")
            .body(Body::from("1\n2\n"))
            .unwrap();
        let before = epoch_millis(SystemTime::now());
        for request in [single, batch] {
            let response = router.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::ACCEPTED);
        }
        let published = broker.published();
        assert_eq!(published.len(), 3);
        for job in &published {
            let due: u128 = job.meta.headers["x-not-before"].parse().unwrap();
            assert!(due >= before + 60_000, "{due} {before}");
            assert_eq!(job.meta.headers["x-max-attempts"], "2");
        }
        for (path, header, value, slug) in [
            ("/jobs/q", "Jobgate-Delay", "3601", "bad-schedule"),
            ("/jobs/q/batch", "Jobgate-Delay", "3601", "bad-schedule"),
            ("/jobs/q", "Jobgate-Not-Before", "noon", "bad-schedule"),
            (
                "/jobs/q/batch",
                "Jobgate-Timeout",
                "never",
                "bad-job-policy",
            ),
            ("/jobs/q", "Jobgate-Max-Attempts", "0", "bad-job-policy"),
        ] {
            let request = Request::post(path)
                .header("content-type", "application/x-ndjson")
                .header(header, value)
                .body(Body::from("1"))
                .unwrap();
            let response = router.clone().oneshot(request).await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::BAD_REQUEST,
                "{path} {header}"
            );
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(
                json["type"],
                format!("urn:jobgate:problem:{slug}"),
                "{json}"
            );
            let detail = json["detail"].as_str().unwrap();
            assert!(detail.contains(header), "{detail}");
        }
        assert_eq!(broker.published().len(), 3, "nothing more was published");
    }
}
