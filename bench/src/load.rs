//! Load shapes: a closed loop (N workers, each starting its next operation when the
//! last one answered) and an open loop (operations started on a fixed schedule).
//! An operation is any async call that succeeds or fails: a confirmed publish, an HTTP
//! request.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
// tokio's clock (the system clock unless paused in tests).
use tokio::time::Instant;

use crate::report::Phase;
use crate::stats::{
    busy_between, parse_machine_ticks, per_second, scheduled_count, scheduled_offset,
    slowest_window, Latencies, OpenLoopDetail, SLOW,
};

/// One operation: `Ok` when it succeeded (confirm, 202), else why not.
pub type Op = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// How long a closed loop runs.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// Runs `warmup` unmeasured, then measures `measure`.
    Time { warmup: Duration, measure: Duration },
    /// Runs exactly this many operations, all measured (filling a backlog).
    Count(u64),
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    latencies: Latencies,
}

impl Tally {
    fn add(&mut self, result: Result<(), String>, latency: Duration) {
        match result {
            Ok(()) => {
                self.ok += 1;
                self.latencies.record(latency);
            }
            Err(e) => {
                self.failed += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies.merge(other.latencies);
    }

    fn into_phase(self, elapsed: Duration, target_rate: Option<f64>) -> Phase {
        Phase {
            ok: self.ok,
            failed: self.failed,
            seconds: elapsed.as_secs_f64(),
            per_sec: per_second(self.ok, elapsed),
            latency: Some(self.latencies.summary()),
            target_rate,
            first_error: self.first_error,
            cpu_us_per_request: None,
            slowest: None,
            open_loop: None,
            slow_split: None,
        }
    }
}

/// `workers` concurrent loops of `op`: at most `workers` operations in flight. With a
/// time budget, only operations started after the warm-up and finished before the end
/// count.
pub async fn closed_loop(workers: usize, budget: Budget, op: Op) -> Phase {
    let start = Instant::now();
    let (measure_from, end, tickets) = match budget {
        Budget::Time { warmup, measure } => (start + warmup, Some(start + warmup + measure), None),
        Budget::Count(n) => (start, None, Some((Arc::new(AtomicU64::new(0)), n))),
    };
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let op = Arc::clone(&op);
        let tickets = tickets.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut last_done = start;
            loop {
                let began = Instant::now();
                if end.is_some_and(|end| began >= end) {
                    break;
                }
                if let Some((taken, total)) = &tickets {
                    if taken.fetch_add(1, Ordering::Relaxed) >= *total {
                        break;
                    }
                }
                let result = op().await;
                let done = Instant::now();
                last_done = done;
                if began >= measure_from && end.is_none_or(|end| done <= end) {
                    tally.add(result, done - began);
                }
            }
            (tally, last_done)
        }));
    }
    let mut total = Tally::default();
    let mut last_done = start;
    for task in tasks {
        match task.await {
            Ok((tally, done)) => {
                total.merge(tally);
                last_done = last_done.max(done);
            }
            Err(e) => {
                total.failed += 1;
                total
                    .first_error
                    .get_or_insert(format!("load task failed: {e}"));
            }
        }
    }
    let elapsed = match end {
        Some(end) => end - measure_from,
        None => last_done - start,
    };
    total.into_phase(elapsed, None)
}

/// One answered open-loop request.
struct Answer {
    result: Result<(), String>,
    due: Instant,
    sent: Instant,
    done: Instant,
}

/// What an open loop counts as its answers come in.
struct OpenTally {
    start: Instant,
    tally: Tally,
    lags: Latencies,
    from_send: Latencies,
    slow: u64,
    /// (due from the start, latency) of every request answered, for the slowest window.
    schedule: Vec<(Duration, Duration)>,
}

impl OpenTally {
    fn record(&mut self, answer: Answer) {
        let latency = answer.done.saturating_duration_since(answer.due);
        let took = answer.done.saturating_duration_since(answer.sent);
        self.schedule.push((answer.due - self.start, latency));
        self.lags
            .record(answer.sent.saturating_duration_since(answer.due));
        if answer.result.is_ok() {
            self.from_send.record(took);
            self.slow += u64::from(took > SLOW);
        }
        self.tally.add(answer.result, latency);
    }
}

/// Starts `op` at `rate` a second for `duration`, whatever the answers; each latency is
/// counted from the operation's scheduled start. Past `max_outstanding` unanswered
/// operations, a due one is counted failed instead of sent (the generator's own limit,
/// named in the error).
pub async fn open_loop(rate: f64, duration: Duration, max_outstanding: usize, op: Op) -> Phase {
    let count = scheduled_count(rate, duration);
    let outstanding = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now() + Duration::from_millis(20);
    let mut seen = OpenTally {
        start,
        tally: Tally::default(),
        lags: Latencies::default(),
        from_send: Latencies::default(),
        slow: 0,
        schedule: Vec::with_capacity(usize::try_from(count).unwrap_or(0)),
    };
    let machine_before = machine_ticks();
    for i in 0..count {
        // tokio's timer ticks in whole milliseconds, so a request goes out up to a
        // millisecond after it is due, in bursts of `rate / 1000`; the detail keeps the
        // latency from the send apart. (A thread of its own on the OS's fine timer sent
        // on time but cost the bench 35 µs more CPU per request, taken from the system
        // under test on two cores.)
        let due = start + scheduled_offset(i, rate);
        tokio::time::sleep_until(due).await;
        if outstanding.load(Ordering::Relaxed) >= max_outstanding {
            seen.tally.add(
                Err(format!(
                    "{max_outstanding} requests unanswered: the bench skipped a due request"
                )),
                Duration::ZERO,
            );
            continue;
        }
        outstanding.fetch_add(1, Ordering::Relaxed);
        let op = Arc::clone(&op);
        let outstanding = Arc::clone(&outstanding);
        tasks.spawn(async move {
            let sent = Instant::now();
            let result = op().await;
            let done = Instant::now();
            outstanding.fetch_sub(1, Ordering::Relaxed);
            Answer {
                result,
                due,
                sent,
                done,
            }
        });
        // Collect what finished so far: keeps the set small on long runs.
        while let Some(finished) = tasks.try_join_next() {
            if let Ok(answer) = finished {
                seen.record(answer);
            }
        }
    }
    let mut last_done = start;
    while let Some(finished) = tasks.join_next().await {
        match finished {
            Ok(answer) => {
                last_done = last_done.max(answer.done);
                seen.record(answer);
            }
            Err(e) => seen
                .tally
                .add(Err(format!("load task failed: {e}")), Duration::ZERO),
        }
    }
    let machine_busy = machine_before
        .zip(machine_ticks())
        .and_then(|(before, after)| busy_between(before, after));
    let elapsed = last_done.saturating_duration_since(start).max(duration);
    Phase {
        slowest: slowest_window(&seen.schedule),
        open_loop: Some(OpenLoopDetail {
            send_lag_p99_ms: seen.lags.summary().p99_ms,
            from_send: seen.from_send.summary(),
            slow: seen.slow,
            machine_busy,
        }),
        ..seen.tally.into_phase(elapsed, Some(rate))
    }
}

/// The machine's CPU ticks now (`None` where `/proc/stat` cannot be read).
fn machine_ticks() -> Option<(u64, u64)> {
    parse_machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting_op(calls: Arc<AtomicU64>, fail_every: u64) -> Op {
        Arc::new(move || {
            let calls = Arc::clone(&calls);
            Box::pin(async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::task::yield_now().await;
                if fail_every > 0 && n.is_multiple_of(fail_every) {
                    Err(format!("call {n} failed"))
                } else {
                    Ok(())
                }
            })
        })
    }

    #[tokio::test]
    async fn a_counted_closed_loop_runs_exactly_that_many_operations() {
        let calls = Arc::new(AtomicU64::new(0));
        let phase = closed_loop(7, Budget::Count(100), counting_op(Arc::clone(&calls), 10)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 100);
        assert_eq!((phase.ok, phase.failed), (90, 10));
        assert_eq!(phase.latency.unwrap().count, 90);
        assert!(phase.first_error.unwrap().ends_with("failed"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_open_loop_sends_on_schedule_and_counts_every_answer() {
        let calls = Arc::new(AtomicU64::new(0));
        let phase = open_loop(
            100.0,
            Duration::from_secs(2),
            1000,
            counting_op(Arc::clone(&calls), 0),
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 200);
        assert_eq!((phase.ok, phase.failed), (200, 0));
        assert_eq!(phase.target_rate, Some(100.0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_open_loop_does_not_wait_for_slow_answers() {
        // Every answer takes 1 s, far longer than the 10 ms between sends: a closed
        // loop would send 2 requests in 2 s, the open loop sends all 200 on schedule
        // and reports the 1 s each took.
        let op: Op = Arc::new(|| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            })
        });
        let phase = open_loop(100.0, Duration::from_secs(2), 1000, op).await;
        assert_eq!(phase.ok, 200);
        let l = phase.latency.unwrap();
        assert!(l.p50_ms >= 1000.0, "{l:?}");
        // All 200 were slow from their send on, and none was sent late.
        let detail = phase.open_loop.unwrap();
        assert_eq!((detail.slow, detail.from_send.count), (200, 200));
        assert!(detail.from_send.p50_ms >= 1000.0, "{detail:?}");
        assert_eq!(detail.send_lag_p99_ms, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_outstanding_limit_due_requests_are_counted_as_failed() {
        let op: Op = Arc::new(|| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            })
        });
        let phase = open_loop(100.0, Duration::from_secs(1), 30, op).await;
        assert_eq!((phase.ok, phase.failed), (30, 70));
        assert!(phase
            .first_error
            .unwrap()
            .contains("30 requests unanswered"));
    }
}
