//! The arithmetic of the bench, free of I/O: latency percentiles, rates, ratios and
//! the open-loop send schedule.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency samples, in microseconds, in the order they were taken.
#[derive(Debug, Default, Clone)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        self.0
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// Percentiles of the samples (none taken: all zero, count 0).
    pub fn summary(mut self) -> LatencySummary {
        self.0.sort_unstable();
        let ms = |p: f64| percentile(&self.0, p).map_or(0.0, |us| us as f64 / 1000.0);
        LatencySummary {
            count: self.0.len() as u64,
            p50_ms: ms(50.0),
            p99_ms: ms(99.0),
            p999_ms: ms(99.9),
            max_ms: ms(100.0),
        }
    }
}

/// Nearest-rank percentile `p` (0..=100) of `sorted` (ascending): the smallest sample
/// that at least `p`% of the samples do not exceed. `None` without samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // The epsilon keeps float error (99.9% of 1000 = 999.0000000000001) from moving the
    // rank up by one.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// The slowest stretch of an open loop: the 100 ms of send schedule whose requests
/// waited longest. In an open loop one stall of the system under test delays every
/// request due during it, so a single stall can set the p99: when it happened tells
/// what caused it (a timer, a flush, a collection).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SlowestWindow {
    /// When its requests were due, in seconds from the start of the phase.
    pub at_s: f64,
    /// Requests due in it.
    pub requests: u64,
    /// The longest latency among them, in milliseconds.
    pub max_ms: f64,
}

/// An open loop's requests beyond their latency from the due time: how late the
/// generator sent them and what the system under test took from the send on. A
/// generator that falls behind (a saturated machine) shows in the first; the second is
/// the comparable figure for the system, since the generator's lag is not its doing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OpenLoopDetail {
    /// 99th percentile of (actual send - due time), in milliseconds.
    pub send_lag_p99_ms: f64,
    /// Latency from each successful request's send to its answer.
    pub from_send: LatencySummary,
    /// Successful requests whose send-to-answer took longer than [`SLOW`].
    pub slow: u64,
    /// Share of the machine's CPU time that was busy (not idle, not waiting for I/O)
    /// while the loop ran, 0 to 1; `None` where `/proc/stat` cannot be read.
    pub machine_busy: Option<f64>,
}

impl OpenLoopDetail {
    /// [`Self::machine_busy`] as the log and the report show it: "67 %", or "-".
    pub fn machine_busy_shown(&self) -> String {
        self.machine_busy
            .map_or_else(|| "-".to_owned(), |f| format!("{:.0} %", f * 100.0))
    }
}

/// What counts as a slow open-loop request: under the 5 ms p99 goal, and a bucket bound
/// of the producer's latency histograms (0.5 ms doubling), so the bench's count and the
/// producer's compare.
pub const SLOW: Duration = Duration::from_millis(4);

/// The machine's CPU time so far, from `/proc/stat`'s first line: (all, idle + iowait),
/// in clock ticks.
pub fn parse_machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let idle = fields.get(3)? + fields.get(4)?;
    Some((fields.iter().sum(), idle))
}

/// The busy share of the machine's CPU time between two [`parse_machine_ticks`] readings.
pub fn busy_between(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let all = after.0.checked_sub(before.0)?;
    let idle = after.1.checked_sub(before.1)?;
    (all > 0).then(|| 1.0 - idle as f64 / all as f64)
}

/// Width of the windows [`slowest_window`] compares.
pub const WINDOW: Duration = Duration::from_millis(100);

/// The [`WINDOW`] of `samples` (due offset from the phase's start, latency) with the
/// longest latency; `None` without samples.
pub fn slowest_window(samples: &[(Duration, Duration)]) -> Option<SlowestWindow> {
    let slot = |due: Duration| due.as_micros() / WINDOW.as_micros();
    let (worst_due, _) = samples.iter().max_by_key(|(_, latency)| *latency)?;
    let worst = slot(*worst_due);
    let in_worst = samples.iter().filter(|(due, _)| slot(*due) == worst);
    let (requests, max) = in_worst.fold((0u64, Duration::ZERO), |(n, max), (_, latency)| {
        (n + 1, max.max(*latency))
    });
    Some(SlowestWindow {
        at_s: (worst as f64) * WINDOW.as_secs_f64(),
        requests,
        max_ms: max.as_secs_f64() * 1000.0,
    })
}

/// How many observations of a Prometheus histogram lie above bucket `le`, in an
/// exposition text: the series' `_count` less its `le` bucket, summed over the series
/// whose labels contain `label` (`route="/jobs"`). `None` when no such series is there.
pub fn above_bucket(text: &str, histogram: &str, label: &str, le: &str) -> Option<u64> {
    let sum = |prefix: &str, also: &str| -> Option<u64> {
        let mut found = false;
        let mut total = 0u64;
        for line in text.lines() {
            if line.starts_with(prefix) && line.contains(label) && line.contains(also) {
                let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
                total += value as u64;
                found = true;
            }
        }
        found.then_some(total)
    };
    let count = sum(&format!("{histogram}_count{{"), "")?;
    let within = sum(&format!("{histogram}_bucket{{"), &format!("le=\"{le}\""))?;
    Some(count.saturating_sub(within))
}

/// Events per second; 0 for an empty interval.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

/// `part / whole`, or `None` when the whole is not a positive number (nothing measured).
pub fn ratio(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0 && part.is_finite()).then(|| part / whole)
}

/// Open loop: when request `index` (0-based) is due, counted from the start, at `rate`
/// requests a second. The schedule never depends on answers, so a slow answer cannot
/// delay the requests after it (no coordinated omission).
pub fn scheduled_offset(index: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(index as f64 / rate)
}

/// How many requests an open-loop run of `duration` at `rate` a second sends.
pub fn scheduled_count(rate: f64, duration: Duration) -> u64 {
    (rate * duration.as_secs_f64()).floor() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_busy_is_shown_in_whole_percent_or_as_a_dash() {
        let detail = |busy| OpenLoopDetail {
            send_lag_p99_ms: 0.0,
            from_send: LatencySummary::default(),
            slow: 0,
            machine_busy: busy,
        };
        assert_eq!(detail(Some(0.666)).machine_busy_shown(), "67 %");
        assert_eq!(detail(None).machine_busy_shown(), "-");
    }

    #[test]
    fn machine_busy_comes_from_the_idle_and_iowait_columns() {
        let before = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        let after = "cpu  400 0 150 1000 50 0 0 0 0 0\n";
        let (b, a) = (
            parse_machine_ticks(before).unwrap(),
            parse_machine_ticks(after).unwrap(),
        );
        assert_eq!(b, (1000, 850));
        // 600 ticks passed, 200 of them idle: two thirds busy.
        assert!((busy_between(b, a).unwrap() - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(busy_between(a, a), None);
        assert_eq!(parse_machine_ticks("intr 1 2 3"), None);
    }

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_thousand() {
        let sorted: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(500));
        assert_eq!(percentile(&sorted, 99.0), Some(990));
        assert_eq!(percentile(&sorted, 99.9), Some(999));
        assert_eq!(percentile(&sorted, 100.0), Some(1000));
        assert_eq!(percentile(&sorted, 0.0), Some(1));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn a_single_outlier_shows_in_p999_and_max_but_not_p99() {
        let mut l = Latencies::default();
        for _ in 0..999 {
            l.record(Duration::from_millis(2));
        }
        l.record(Duration::from_millis(700));
        let s = l.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50_ms, 2.0);
        assert_eq!(s.p99_ms, 2.0);
        assert_eq!(s.p999_ms, 2.0);
        assert_eq!(s.max_ms, 700.0);

        let mut l = Latencies::default();
        for ms in [5, 1, 3] {
            l.record(Duration::from_millis(ms));
        }
        let mut other = Latencies::default();
        other.record(Duration::from_micros(1500));
        l.merge(other);
        let s = l.summary();
        assert_eq!((s.count, s.p50_ms, s.max_ms), (4, 1.5, 5.0));
    }

    #[test]
    fn no_samples_summarise_to_zeroes() {
        assert_eq!(Latencies::default().summary(), LatencySummary::default());
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
        assert_eq!(ratio(50.0, 200.0), Some(0.25));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 2.0), None);
    }

    #[test]
    fn the_open_loop_schedule_is_evenly_spaced_and_fills_the_duration() {
        let rate = 400.0;
        assert_eq!(scheduled_offset(0, rate), Duration::ZERO);
        assert_eq!(scheduled_offset(1, rate), Duration::from_micros(2500));
        assert_eq!(scheduled_offset(400, rate), Duration::from_secs(1));
        let n = scheduled_count(rate, Duration::from_secs(10));
        assert_eq!(n, 4000);
        // The last request is due just before the end of the run, not after it.
        assert!(scheduled_offset(n - 1, rate) < Duration::from_secs(10));
        assert_eq!(scheduled_count(2.5, Duration::from_secs(1)), 2);
    }

    #[test]
    fn the_slowest_window_is_where_the_longest_wait_began() {
        let ms = Duration::from_millis;
        let samples = [
            (ms(10), ms(2)),
            (ms(120), ms(3)),
            (ms(250), ms(90)),
            (ms(260), ms(40)),
            (ms(310), ms(5)),
        ];
        let w = slowest_window(&samples).unwrap();
        assert_eq!(w.requests, 2);
        assert!((w.at_s - 0.2).abs() < 1e-9, "{w:?}");
        assert!((w.max_ms - 90.0).abs() < 1e-9, "{w:?}");
        assert_eq!(slowest_window(&[]), None);
    }

    #[test]
    fn observations_above_a_bucket_are_the_count_less_the_bucket() {
        let text = "# TYPE jobgate_publish_duration_seconds histogram\n\
            jobgate_publish_duration_seconds_bucket{le=\"0.032\",queue=\"q\",result=\"confirmed\"} 90\n\
            jobgate_publish_duration_seconds_bucket{le=\"0.064\",queue=\"q\",result=\"confirmed\"} 95\n\
            jobgate_publish_duration_seconds_count{queue=\"q\",result=\"confirmed\"} 100\n\
            jobgate_publish_duration_seconds_bucket{le=\"0.064\",queue=\"q\",result=\"failed\"} 1\n\
            jobgate_publish_duration_seconds_count{queue=\"q\",result=\"failed\"} 3\n";
        let h = "jobgate_publish_duration_seconds";
        assert_eq!(
            above_bucket(text, h, "result=\"confirmed\"", "0.064"),
            Some(5)
        );
        assert_eq!(above_bucket(text, h, "queue=\"q\"", "0.064"), Some(7));
        assert_eq!(above_bucket(text, h, "queue=\"other\"", "0.064"), None);
        assert_eq!(above_bucket(text, "jobgate_nothing", "", "0.064"), None);
    }

    #[test]
    fn the_slow_threshold_is_a_bucket_bound_of_the_producers_histograms() {
        use jobgate_shared::metrics::prometheus_client::metrics::family::Family;
        use jobgate_shared::metrics::prometheus_client::metrics::histogram::Histogram;
        use jobgate_shared::metrics::{latency_histogram, registry, render};
        let mut registry = registry();
        // Labelled, as the producer's are.
        let family =
            Family::<Vec<(String, String)>, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register("wait_seconds", "Waits", family.clone());
        let series = family.get_or_create(&vec![("route".to_owned(), "/jobs".to_owned())]);
        series.observe(0.003);
        series.observe(0.005);
        let text = render(&registry);
        let le = SLOW.as_secs_f64().to_string();
        assert_eq!(
            above_bucket(&text, "jobgate_wait_seconds", "route=\"/jobs\"", &le),
            Some(1),
            "no bucket le=\"{le}\" in:\n{text}"
        );
    }
}
