//! Per-job policy: a job may carry its own attempt limit (`x-max-attempts`, from the
//! request header `Jobgate-Max-Attempts`) and timeout (`x-timeout-ms`, from
//! `Jobgate-Timeout`). The consumer honours them up to its ceilings
//! (`JOBGATE_MAX_ATTEMPTS_CEILING`, `JOBGATE_JOB_TIMEOUT_CEILING`, never below its own
//! `JOBGATE_MAX_ATTEMPTS` and `JOBGATE_JOB_TIMEOUT_MS`): a value above is clamped, and
//! a junk value (a message published by hand) is ignored with a warning. The job's
//! attempt limit then governs everything that counts attempts: whether a failed
//! attempt is retried, the dead-letter reason, and the deliveries without an outcome
//! that take a job past its limit.

use std::time::Duration;

use jobgate_shared::job::{JobMeta, HEADER_MAX_ATTEMPTS, HEADER_TIMEOUT_MS};
use jobgate_shared::retry::RetryPolicy;

/// Default of `JOBGATE_MAX_ATTEMPTS_CEILING`.
pub const DEFAULT_MAX_ATTEMPTS_CEILING: u32 = 25;
/// Default of `JOBGATE_JOB_TIMEOUT_CEILING` (1 h).
pub const DEFAULT_JOB_TIMEOUT_CEILING: Duration = Duration::from_secs(3600);

/// The most a job may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceilings {
    pub max_attempts: u32,
    /// None: no ceiling (the consumer itself runs jobs without a timeout).
    pub job_timeout: Option<Duration>,
}

impl Default for Ceilings {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS_CEILING,
            job_timeout: Some(DEFAULT_JOB_TIMEOUT_CEILING),
        }
    }
}

/// What one job runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPolicy {
    /// The consumer's retry policy with the job's attempt limit.
    pub retry: RetryPolicy,
    /// The job's timeout (None: no limit).
    pub timeout: Option<Duration>,
}

/// A positive whole number from header `name` of `meta`; none when absent, or junk
/// (then with a warning: the consumer's default applies).
fn positive(meta: &JobMeta, name: &str) -> Option<u64> {
    let text = meta.headers.get(name)?;
    let value = text.trim().parse::<u64>().ok().filter(|n| *n > 0);
    if value.is_none() {
        tracing::warn!(job_id = %meta.id, queue = %meta.queue, header = name, value = %text.escape_debug(), "ignoring a per-job policy header that is not a positive whole number; the consumer's default applies");
    }
    value
}

/// The policy of the job `meta` under the consumer's `retry` and `timeout` and its
/// `ceilings` (each never below the consumer's own setting).
pub fn for_job(
    meta: &JobMeta,
    retry: &RetryPolicy,
    timeout: Option<Duration>,
    ceilings: &Ceilings,
) -> JobPolicy {
    let mut policy = JobPolicy {
        retry: retry.clone(),
        timeout,
    };
    if let Some(asked) = positive(meta, HEADER_MAX_ATTEMPTS) {
        let ceiling = ceilings.max_attempts.max(retry.max_attempts);
        if asked > u64::from(ceiling) {
            tracing::info!(job_id = %meta.id, queue = %meta.queue, asked, ceiling, "the job asks for more attempts than JOBGATE_MAX_ATTEMPTS_CEILING; it gets the ceiling");
        }
        policy.retry.max_attempts = u32::try_from(asked).unwrap_or(u32::MAX).min(ceiling);
    }
    if let Some(asked_ms) = positive(meta, HEADER_TIMEOUT_MS) {
        let asked = Duration::from_millis(asked_ms);
        // No limit of its own: the consumer has no ceiling either.
        let ceiling = match (timeout, ceilings.job_timeout) {
            (Some(own), Some(ceiling)) => Some(ceiling.max(own)),
            _ => None,
        };
        let granted = match ceiling {
            Some(ceiling) if asked > ceiling => {
                tracing::info!(job_id = %meta.id, queue = %meta.queue, ?asked, ?ceiling, "the job asks for a longer timeout than JOBGATE_JOB_TIMEOUT_CEILING; it gets the ceiling");
                ceiling
            }
            _ => asked,
        };
        policy.timeout = Some(granted);
    }
    policy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }

    fn meta(pairs: &[(&str, &str)]) -> JobMeta {
        let mut meta = JobMeta::new("q", None);
        for (k, v) in pairs {
            meta.headers.insert((*k).to_owned(), (*v).to_owned());
        }
        meta
    }

    const FIVE_MIN: Option<Duration> = Some(Duration::from_secs(300));

    #[test]
    fn without_headers_the_consumer_settings_apply() {
        let p = for_job(&meta(&[]), &retry(5), FIVE_MIN, &Ceilings::default());
        assert_eq!(p.retry, retry(5));
        assert_eq!(p.timeout, FIVE_MIN);
    }

    #[test]
    fn a_job_may_ask_for_fewer_or_more_attempts_up_to_the_ceiling() {
        let ceilings = Ceilings::default();
        let p = for_job(
            &meta(&[("x-max-attempts", "1")]),
            &retry(5),
            None,
            &ceilings,
        );
        assert_eq!(p.retry.max_attempts, 1);
        assert_eq!(p.retry.base, Duration::from_secs(1), "the schedule stays");
        let p = for_job(
            &meta(&[("x-max-attempts", "20")]),
            &retry(5),
            None,
            &ceilings,
        );
        assert_eq!(p.retry.max_attempts, 20);
        let p = for_job(
            &meta(&[("x-max-attempts", "1000")]),
            &retry(5),
            None,
            &ceilings,
        );
        assert_eq!(p.retry.max_attempts, 25, "clamped");
        // A ceiling below the consumer's own limit counts as that limit.
        let low = Ceilings {
            max_attempts: 2,
            ..Ceilings::default()
        };
        let p = for_job(&meta(&[("x-max-attempts", "9")]), &retry(5), None, &low);
        assert_eq!(p.retry.max_attempts, 5);
        let p = for_job(
            &meta(&[("x-max-attempts", "99999999999999")]),
            &retry(5),
            None,
            &ceilings,
        );
        assert_eq!(p.retry.max_attempts, 25);
    }

    #[test]
    fn a_job_may_ask_for_a_shorter_or_longer_timeout_up_to_the_ceiling() {
        let ceilings = Ceilings::default();
        let timeout = |v: &str, own: Option<Duration>, c: &Ceilings| {
            for_job(&meta(&[("x-timeout-ms", v)]), &retry(5), own, c).timeout
        };
        assert_eq!(
            timeout("500", FIVE_MIN, &ceilings),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            timeout("1800000", FIVE_MIN, &ceilings),
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            timeout("86400000", FIVE_MIN, &ceilings),
            Some(Duration::from_secs(3600)),
            "clamped"
        );
        let low = Ceilings {
            job_timeout: Some(Duration::from_secs(60)),
            ..Ceilings::default()
        };
        assert_eq!(
            timeout("86400000", FIVE_MIN, &low),
            FIVE_MIN,
            "never below its own"
        );
        // A consumer without a timeout has no ceiling; a job may still set one.
        assert_eq!(
            timeout("86400000", None, &ceilings),
            Some(Duration::from_secs(86400))
        );
    }

    #[test]
    fn junk_is_ignored_and_the_defaults_apply() {
        for junk in ["", "0", "-1", "two", "1.5", "\u{0}"] {
            let m = meta(&[("x-max-attempts", junk), ("x-timeout-ms", junk)]);
            let p = for_job(&m, &retry(5), FIVE_MIN, &Ceilings::default());
            assert_eq!(p.retry.max_attempts, 5, "{junk:?}");
            assert_eq!(p.timeout, FIVE_MIN, "{junk:?}");
        }
    }
}
