//! Scheduled jobs: a job whose `x-not-before` (ms since the epoch, written by the
//! producer from `Jobgate-Delay` or `Jobgate-Not-Before`) is still ahead when a
//! consumer receives it is not run, and no attempt is counted: a copy goes to a delay
//! tier (`Q.retry.<tier>`, confirmed) and the delivery is acked, the same path as a
//! retry (see [`crate::settle::hop`]). The tier brings it back to `Q`, where the next
//! consumer looks again. Such a *hop* never changes the job's status (it stays
//! `scheduled`), and a job found `cancelled` (or `done`) on a hop is acked for good.
//!
//! Which tier: [`RetryPolicy::hop_tier`], the longest no longer than the time left, so a
//! hop never carries the job past its due time, except the last one when less than the
//! shortest tier is left. The job then reaches `Q` less than one shortest tier
//! (`JOBGATE_RETRY_BASE_MS`) after its due time on RabbitMQ, where the tier queue's TTL
//! decides. On Kafka the hop's `x-due-at` (which the retry forwarder honours) is the due
//! time itself when it falls within the tier, so that last overshoot is gone there.
//! Every hop adds the time it spends in the consumer and the broker.
//!
//! Cost: a job scheduled `d` ahead takes about `d / JOBGATE_RETRY_MAX_MS` hops (30 days
//! with the default 60 s: about 43 200), each a publish and an ack.
//!
//! A due time that does not parse (a message published by hand with a junk header) is
//! no schedule: the job runs now, and a warning says so.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jobgate_shared::job::{JobMeta, HEADER_DUE_AT, HEADER_NOT_BEFORE};
use jobgate_shared::retry::{retry_queue_name, RetryPolicy};

/// The due time a job carries, if any; a junk value is none (logged).
pub fn due_time(meta: &JobMeta) -> Option<SystemTime> {
    let text = meta.headers.get(HEADER_NOT_BEFORE)?;
    let due = text
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)));
    if due.is_none() {
        tracing::warn!(job_id = %meta.id, queue = %meta.queue, value = %text.escape_debug(), "the job's {HEADER_NOT_BEFORE} is not a time in ms since the epoch; running it now");
    }
    due
}

/// A copy of a job that is not due yet, on its way through a delay tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The tier it waits in.
    pub tier: Duration,
    /// `Q.retry.<tier>`.
    pub destination: String,
    /// The job as it is published there: the same attempt, `x-due-at` set.
    pub copy: JobMeta,
}

fn epoch_millis(at: SystemTime) -> String {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        .to_string()
}

/// The hop of a job received at `now` whose due time is `due`; none when it is due.
pub fn hop(meta: &JobMeta, policy: &RetryPolicy, due: SystemTime, now: SystemTime) -> Option<Hop> {
    let remaining = due.duration_since(now).ok().filter(|r| !r.is_zero())?;
    let tier = policy.hop_tier(remaining);
    let mut copy = meta.clone();
    // A new message: the broker counts its deliveries afresh. Not an attempt: the
    // attempt number stays.
    copy.redeliveries = 0;
    // Back when the tier ends, or at the due time when that comes first (only a last
    // hop's tier can pass it; Kafka's forwarder honours this, RabbitMQ's TTL does not).
    let back_at = now.checked_add(tier).map_or(due, |end| end.min(due));
    copy.headers
        .insert(HEADER_DUE_AT.to_owned(), epoch_millis(back_at));
    Some(Hop {
        tier,
        destination: retry_queue_name(&meta.queue, tier),
        copy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn scheduled(value: &str) -> JobMeta {
        let mut meta = JobMeta::new("q", None);
        meta.headers
            .insert(HEADER_NOT_BEFORE.to_owned(), value.to_owned());
        meta
    }

    #[test]
    fn the_due_time_is_read_and_junk_is_no_schedule() {
        assert_eq!(due_time(&scheduled("90000")), Some(at(90_000)));
        assert_eq!(due_time(&scheduled(" 5 ")), Some(at(5)));
        for junk in ["", "soon", "-5", "1.5", "99999999999999999999999", "\u{0}"] {
            assert_eq!(due_time(&scheduled(junk)), None, "{junk:?}");
        }
        assert_eq!(due_time(&JobMeta::new("q", None)), None);
    }

    #[test]
    fn a_job_not_due_hops_through_the_longest_tier_that_fits_keeping_its_attempt() {
        let mut meta = scheduled("0");
        meta.attempt = 2;
        meta.redeliveries = 3;
        let now = at(1_000_000);
        let far = hop(&meta, &policy(), at(1_000_000 + 3_600_000), now).unwrap();
        assert_eq!(far.tier, Duration::from_secs(60));
        assert_eq!(far.destination, "q.retry.1m");
        assert_eq!(far.copy.attempt, 2, "a hop is no attempt");
        assert_eq!(far.copy.redeliveries, 0);
        assert_eq!(far.copy.headers[HEADER_DUE_AT], "1060000");
        assert_eq!(far.copy.headers[HEADER_NOT_BEFORE], "0", "kept");

        let near = hop(&meta, &policy(), at(1_005_500), now).unwrap();
        assert_eq!(near.destination, "q.retry.4s");
        assert_eq!(near.copy.headers[HEADER_DUE_AT], "1004000");

        // Less than the shortest tier left: the shortest tier, back at the due time
        // where the broker can tell (Kafka).
        let last = hop(&meta, &policy(), at(1_000_300), now).unwrap();
        assert_eq!(last.destination, "q.retry.1s");
        assert_eq!(last.copy.headers[HEADER_DUE_AT], "1000300");
    }

    #[test]
    fn a_job_due_now_or_before_does_not_hop() {
        let meta = scheduled("0");
        assert_eq!(hop(&meta, &policy(), at(5), at(5)), None);
        assert_eq!(hop(&meta, &policy(), at(4), at(5)), None);
    }
}
