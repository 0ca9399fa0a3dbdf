//! The retry schedule: how many attempts a job gets, and how long it waits between
//! them. Delays are served by the broker from fixed *tiers* (a RabbitMQ queue or a
//! Kafka topic per tier, `Q.retry.<tier>`), so the schedule decides both the topology
//! and each retry's tier. This is the one place that knows it.

use std::time::Duration;

/// Attempts and backoff: attempt `n` (1-based) that fails waits `base * 2^(n-1)`,
/// capped at `max`, before attempt `n + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. After the last, the job is dead-lettered.
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// The delay tiers, shortest first: `base`, `2*base`, `4*base`, ... and `max`.
    pub fn tiers(&self) -> Vec<Duration> {
        let base = self.base.max(Duration::from_millis(1));
        let max = self.max.max(base);
        let mut tiers = Vec::new();
        let mut tier = base;
        while tier < max {
            tiers.push(tier);
            tier = tier.saturating_mul(2);
        }
        tiers.push(max);
        tiers
    }

    /// True when a failed attempt `attempt` may be retried.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The tier a retry after failed attempt `attempt` waits in. A delay the handler
    /// asked for (`Retry-After`, say) wins: the shortest tier at least that long, or the
    /// longest tier.
    pub fn tier_for(&self, attempt: u32, requested: Option<Duration>) -> Duration {
        let tiers = self.tiers();
        let wanted = requested.unwrap_or_else(|| {
            let doublings = attempt.saturating_sub(1).min(31);
            self.base.saturating_mul(1u32 << doublings)
        });
        tiers
            .iter()
            .copied()
            .find(|t| *t >= wanted)
            .unwrap_or_else(|| *tiers.last().expect("at least one tier"))
    }

    /// The tier a scheduled job that is due in `remaining` waits in next (a *hop*): the
    /// longest tier no longer than `remaining`, so a hop never carries a job past its
    /// due time; under the shortest tier, the shortest tier. A job due in `r` thus
    /// takes about `r / max` hops of the longest tier, a few shorter ones, and reaches
    /// its queue at most one shortest tier (`base`) after its due time, plus the time
    /// each hop spends in the consumer and the broker. Where the broker honours the
    /// hop's own due time (Kafka's forwarder, `x-due-at`), that last overshoot is gone.
    pub fn hop_tier(&self, remaining: Duration) -> Duration {
        let tiers = self.tiers();
        tiers
            .iter()
            .rev()
            .copied()
            .find(|t| *t <= remaining)
            .unwrap_or(tiers[0])
    }
}

/// A short, stable name for a tier: `500ms`, `2s`, `1m`, `90s`.
pub fn tier_label(tier: Duration) -> String {
    let ms = tier.as_millis();
    if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Whether `label` has the shape of a [`tier_label`] (digits, then `ms`, `s` or `m`):
/// what [`retry_topic_pattern`] matches after `Q.retry.`.
pub fn is_tier_label(label: &str) -> bool {
    let unit_at = label
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(label.len());
    unit_at > 0 && matches!(&label[unit_at..], "ms" | "s" | "m")
}

/// The queue (RabbitMQ) or topic (Kafka) where retries of `queue` wait `tier`.
pub fn retry_queue_name(queue: &str, tier: Duration) -> String {
    format!("{queue}.retry.{}", tier_label(tier))
}

/// A regular expression (librdkafka's `^...` subscription syntax) matching the retry
/// topic of `queue` for ANY tier, today's and those of earlier retry settings, so that
/// records waiting in a tier the configuration no longer has are still forwarded.
/// Queue names hold only letters, digits, `.`, `_` and `-`, so `.` is the one character
/// to escape; the tier label's shape keeps the tiers of a queue named `Q.retry.x` apart.
pub fn retry_topic_pattern(queue: &str) -> String {
    format!(r"^{}\.retry\.[0-9]+(ms|s|m)$", queue.replace('.', r"\."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_topic_pattern_escapes_the_queue_name_and_names_every_tier() {
        assert_eq!(
            retry_topic_pattern("emails.eu-1"),
            r"^emails\.eu-1\.retry\.[0-9]+(ms|s|m)$"
        );
    }

    #[test]
    fn every_tier_label_has_the_shape_the_pattern_matches() {
        for ms in [1, 500, 1000, 1500, 60_000, 90_000, 3_600_000] {
            let label = tier_label(Duration::from_millis(ms));
            assert!(is_tier_label(&label), "{label}");
        }
        for junk in ["", "s", "ms", "1", "1h", "1.5s", "x1s", "1sx", "-1s"] {
            assert!(!is_tier_label(junk), "{junk:?}");
        }
    }

    fn policy(base_ms: u64, max_ms: u64) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(base_ms),
            max: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn tiers_double_up_to_the_cap() {
        let secs = |v: &[u64]| {
            v.iter()
                .map(|s| Duration::from_secs(*s))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            policy(1000, 60_000).tiers(),
            secs(&[1, 2, 4, 8, 16, 32, 60])
        );
        assert_eq!(policy(1000, 4000).tiers(), secs(&[1, 2, 4]));
        assert_eq!(policy(5000, 1000).tiers(), secs(&[5]), "max below base");
    }

    #[test]
    fn each_failed_attempt_waits_in_the_next_tier() {
        let p = policy(1000, 10_000);
        let waits: Vec<u64> = (1..=6).map(|a| p.tier_for(a, None).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn a_requested_delay_picks_the_shortest_tier_that_covers_it() {
        let p = policy(1000, 10_000);
        assert_eq!(
            p.tier_for(1, Some(Duration::from_millis(2500))),
            Duration::from_secs(4)
        );
        assert_eq!(
            p.tier_for(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(10)
        );
        assert_eq!(p.tier_for(4, Some(Duration::ZERO)), Duration::from_secs(1));
    }

    #[test]
    fn a_hop_never_passes_the_due_time_and_the_last_one_is_the_shortest_tier() {
        let p = policy(1000, 60_000);
        let hop = |ms: u64| p.hop_tier(Duration::from_millis(ms)).as_millis();
        assert_eq!(hop(3_600_000), 60_000, "far away: the longest tier");
        assert_eq!(hop(60_000), 60_000);
        assert_eq!(hop(59_999), 32_000);
        assert_eq!(hop(5_000), 4_000);
        assert_eq!(hop(1_000), 1_000);
        assert_eq!(hop(999), 1_000, "under the shortest tier: it");
        assert_eq!(hop(1), 1_000);
        // Walking a schedule hop by hop: never past the due time until the last hop,
        // which overshoots by less than the shortest tier.
        for due_ms in [1u64, 999, 1_000, 1_001, 7_777, 61_000, 3_600_123] {
            let (mut at, mut hops) = (0u64, 0);
            while at < due_ms {
                let tier = u64::try_from(hop(due_ms - at)).unwrap();
                if due_ms - at >= 1_000 {
                    assert!(at + tier <= due_ms, "{due_ms}: hop {tier} from {at}");
                }
                at += tier;
                hops += 1;
            }
            assert!(at - due_ms < 1_000, "{due_ms}: {at}");
            assert!(hops <= due_ms / 60_000 + 8, "{due_ms}: {hops} hops");
        }
    }

    #[test]
    fn attempts_run_out() {
        let p = policy(1000, 10_000);
        assert!(p.may_retry(4));
        assert!(!p.may_retry(5));
    }

    #[test]
    fn names_are_short_and_stable() {
        assert_eq!(
            retry_queue_name("mail", Duration::from_millis(500)),
            "mail.retry.500ms"
        );
        assert_eq!(
            retry_queue_name("mail", Duration::from_secs(2)),
            "mail.retry.2s"
        );
        assert_eq!(
            retry_queue_name("mail", Duration::from_secs(120)),
            "mail.retry.2m"
        );
        assert_eq!(
            retry_queue_name("mail", Duration::from_secs(90)),
            "mail.retry.90s"
        );
    }
}
