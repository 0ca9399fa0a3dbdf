//! Exponential backoff with jitter, used wherever jobgate reconnects to a broker.

use std::time::Duration;

/// Doubles from `min` up to `max`; each delay gets up to 25% random jitter so that
/// many replicas that lost the broker together do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }

    /// The schedule used for broker reconnects: 100 ms doubling to 5 s.
    pub fn for_reconnect() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        base + base.mul_f64(0.25 * jitter_fraction())
    }

    /// Start again from `min` (after a success).
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// A cheap fraction in [0, 1) that differs between calls and processes; good enough
/// for jitter, where no cryptographic quality is needed.
fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = (nanos ^ std::process::id().rotate_left(16)).wrapping_mul(2_654_435_761);
    f64::from(mixed % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_are_capped_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let bases = [100u64, 200, 350, 350];
        for base in bases {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(base), "{d:?} < {base}ms");
            assert!(
                d < Duration::from_millis(base * 5 / 4 + 1),
                "{d:?} too large"
            );
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(126));
    }
}
