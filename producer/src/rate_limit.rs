//! Per-client rate limiting: one GCRA bucket (the `governor` crate) per API key, or per
//! client IP address when auth is off. A client over its quota gets 429 problem+json
//! with `Retry-After`.
//!
//! Buckets are keyed by the SHA-256 digest of the API key, never the key itself. Idle
//! buckets are dropped by [`RateLimit::retain_recent`], which `run` calls every minute,
//! so memory stays bounded by the clients seen in the last minute or so.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::error::problem_response;

/// Whose bucket a request draws from.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// The SHA-256 digest of the caller's API key.
    Key([u8; 32]),
    /// The caller's IP address (auth off).
    Addr(IpAddr),
    /// Auth off and no peer address known (in-process tests): one shared bucket.
    Unknown,
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Even the digest stays out of logs: it identifies a key.
            Self::Key(_) => f.write_str("Key(..)"),
            Self::Addr(ip) => write!(f, "Addr({ip})"),
            Self::Unknown => f.write_str("Unknown"),
        }
    }
}

/// A keyed rate limiter.
pub struct RateLimit {
    limiter: RateLimiter<Bucket, DefaultKeyedStateStore<Bucket>, DefaultClock>,
    clock: DefaultClock,
    per_sec: NonZeroU32,
    burst: NonZeroU32,
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("per_sec", &self.per_sec)
            .field("burst", &self.burst)
            .field("buckets", &self.limiter.len())
            .finish()
    }
}

impl RateLimit {
    /// `per_sec` requests a second on average, up to `burst` at once.
    pub fn new(per_sec: NonZeroU32, burst: NonZeroU32) -> Self {
        let clock = DefaultClock::default();
        let quota = Quota::per_second(per_sec).allow_burst(burst);
        Self {
            limiter: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
            per_sec,
            burst,
        }
    }

    /// From the configuration: `None` (off) when `per_sec` is 0; the burst defaults to
    /// `per_sec` and is at least 1.
    pub fn from_settings(per_sec: u32, burst: Option<u32>) -> Option<Self> {
        let per_sec = NonZeroU32::new(per_sec)?;
        let burst = burst.and_then(NonZeroU32::new).unwrap_or(per_sec);
        Some(Self::new(per_sec, burst))
    }

    /// Takes one request from `bucket`; `Err` holds how long until one would pass.
    pub fn check(&self, bucket: &Bucket) -> Result<(), Duration> {
        self.limiter
            .check_key(bucket)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Takes `n` more requests' worth from `bucket` (a batch pays one per item), all or
    /// none. `Err(Some(wait))`: not now; `Err(None)`: never, `n` is over the burst.
    pub fn check_n(&self, bucket: &Bucket, n: usize) -> Result<(), Option<Duration>> {
        let Some(n) = u32::try_from(n).ok().and_then(NonZeroU32::new) else {
            return if n == 0 { Ok(()) } else { Err(None) };
        };
        match self.limiter.check_key_n(bucket, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(self.clock.now()))),
            Err(_insufficient) => Err(None),
        }
    }

    /// The burst: the most one request (or batch) can ever take at once.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// Drops buckets that are full again (their clients have been idle long enough).
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// Whole seconds to wait, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The 429 answer.
pub fn too_many_requests(wait: Duration) -> Response {
    let secs = retry_after_secs(wait);
    problem_response(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "Too many requests",
        format!("This client is over its request rate; retry in {secs} s."),
        Some(Duration::from_secs(secs)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn burst_then_refused_with_a_wait() {
        let limit = RateLimit::new(nz(1), nz(3));
        let b = Bucket::Key([1; 32]);
        for _ in 0..3 {
            assert!(limit.check(&b).is_ok());
        }
        let wait = limit.check(&b).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another bucket is untouched.
        assert!(limit.check(&Bucket::Key([2; 32])).is_ok());
        assert_eq!(limit.len(), 2);
    }

    #[test]
    fn settings_zero_is_off_and_burst_defaults_to_the_rate() {
        assert!(RateLimit::from_settings(0, Some(5)).is_none());
        let limit = RateLimit::from_settings(2, None).unwrap();
        assert_eq!(limit.burst, nz(2));
        let limit = RateLimit::from_settings(2, Some(0)).unwrap();
        assert_eq!(limit.burst, nz(2));
        let limit = RateLimit::from_settings(2, Some(7)).unwrap();
        assert_eq!(limit.burst, nz(7));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn debug_hides_key_digests() {
        assert_eq!(format!("{:?}", Bucket::Key([7; 32])), "Key(..)");
    }
}
