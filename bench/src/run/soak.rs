//! `--soak SECONDS`: a producer and a consumer under steady traffic for a long time,
//! their resident memory sampled all along. Memory that grows with uptime (a confirm
//! kept per publish, a map that only grows) shows here and in no short phase: the
//! alarm probe alone publishes once a second for as long as the producer runs.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;

use super::{say, show, Bench, RETRY_TIER, STOP_GRACE};
use crate::load::open_loop;
use crate::report::Phase;

/// How often the memory of both processes is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// Memory before this much uptime is start-up (allocator arenas, caches filling): the
/// soak compares what comes after it.
const SETTLING: Duration = Duration::from_secs(60);
/// Growth from the first settled sample to the last that still counts as flat: the
/// larger of these.
const FLAT_MIB: f64 = 4.0;
const FLAT_FRACTION: f64 = 0.10;

/// One reading of both processes' resident memory.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    producer_kib: u64,
    consumer_kib: u64,
}

/// What the soak saw.
pub(super) struct Soak {
    backend: &'static str,
    rate: f64,
    traffic: Phase,
    samples: Vec<Sample>,
}

impl Bench<'_> {
    /// Runs the soak of `duration` at `rate` requests a second: the producer takes
    /// them, one consumer drains the queue as they come.
    pub(super) async fn soak(&self, duration: Duration, rate: f64) -> Result<Soak> {
        let q = self.queue("soak");
        self.create(&q).await?;
        let (mut producer, base) = self.start_producer(&q, "soak", &[]).await?;
        let mut env = self.broker_env();
        env.extend([
            ("JOBGATE_QUEUE", q.clone()),
            ("JOBGATE_CONCURRENCY", "8".to_owned()),
            ("JOBGATE_HANDLER", "log".to_owned()),
            ("JOBGATE_RETRY_BASE_MS", RETRY_TIER.as_millis().to_string()),
            ("JOBGATE_RETRY_MAX_MS", RETRY_TIER.as_millis().to_string()),
            ("JOBGATE_KAFKA_GROUP", "{queue}.group".to_owned()),
        ]);
        let mut consumer =
            self.bins
                .spawn("consumer", &format!("{}-consumer-soak", self.backend), &env)?;
        say(format!(
            "{}: soak of {duration:?} at {rate:.0} requests/s; memory read every {SAMPLE_EVERY:?}",
            self.backend
        ));
        let start = Instant::now();
        let traffic = open_loop(rate, duration, 20_000, self.post_op(&base));
        let sampling = async {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            while start.elapsed() < duration {
                tick.tick().await;
                producer.check_alive()?;
                consumer.check_alive()?;
                let sample = Sample {
                    at: start.elapsed(),
                    producer_kib: producer.rss_kib()?,
                    consumer_kib: consumer.rss_kib()?,
                };
                say(format!(
                    "  {:>5.0} s: producer {:.1} MiB, consumer {:.1} MiB",
                    sample.at.as_secs_f64(),
                    mib(sample.producer_kib),
                    mib(sample.consumer_kib)
                ));
                samples.push(sample);
            }
            anyhow::Ok(samples)
        };
        let (traffic, samples) = tokio::join!(traffic, sampling);
        let samples = samples?;
        say(format!("  soak traffic: {}", show(&traffic)));
        producer.stop(STOP_GRACE).await?;
        consumer.stop(STOP_GRACE).await?;
        self.drop_queue(&q).await?;
        Ok(Soak {
            backend: self.backend,
            rate,
            traffic,
            samples,
        })
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Growth of one process from its first settled sample to its last, and whether that
/// is flat.
fn growth(samples: &[Sample], of: impl Fn(&Sample) -> u64) -> Option<(f64, f64, bool)> {
    let settled: Vec<u64> = samples
        .iter()
        .filter(|s| s.at >= SETTLING)
        .map(of)
        .collect();
    let (first, last) = (*settled.first()?, *settled.last()?);
    let grown = mib(last) - mib(first);
    let flat = grown <= FLAT_MIB.max(mib(first) * FLAT_FRACTION);
    Some((mib(first), mib(last), flat))
}

/// The soak report (Markdown).
pub(super) fn render(soaks: &[Soak], machine: &str) -> String {
    let mut md = String::from(
        "# jobgate soak: memory over uptime\n\n\
         Written by `scripts/bench.sh --soak SECONDS` (the bench's `--soak`). One producer and one \
         consumer (handler `log`, concurrency 8) run under open-loop traffic at a fixed rate; \
         their resident memory (`VmRSS`) is read every 15 s. The producer's RabbitMQ alarm \
         probe publishes once a second all along. Flat means: from the first sample after one \
         minute of uptime to the last, growth of at most 4 MiB or 10 %, whichever is larger.\n\n",
    );
    let _ = writeln!(md, "Machine: {machine}\n");
    for soak in soaks {
        let t = &soak.traffic;
        let _ = writeln!(
            md,
            "## {}\n\n{:.0} requests/s for {:.0} s: {} accepted, {} failed{}.\n",
            soak.backend,
            soak.rate,
            t.seconds,
            t.ok,
            t.failed,
            t.first_error
                .as_deref()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        );
        for (name, of) in [
            (
                "producer",
                (|s: &Sample| s.producer_kib) as fn(&Sample) -> u64,
            ),
            ("consumer", |s: &Sample| s.consumer_kib),
        ] {
            match growth(&soak.samples, of) {
                Some((first, last, flat)) => {
                    let _ = writeln!(
                        md,
                        "- {name}: {first:.1} MiB after 1 min, {last:.1} MiB at the end: {}",
                        if flat { "flat" } else { "GROWS" }
                    );
                }
                None => {
                    let _ = writeln!(md, "- {name}: the soak was too short to say (under 1 min)");
                }
            }
        }
        md.push_str("\n| uptime s | producer MiB | consumer MiB |\n|---:|---:|---:|\n");
        for s in &soak.samples {
            let _ = writeln!(
                md,
                "| {:.0} | {:.1} | {:.1} |",
                s.at.as_secs_f64(),
                mib(s.producer_kib),
                mib(s.consumer_kib)
            );
        }
        md.push('\n');
    }
    md
}

/// True when every process of every soak stayed flat.
pub(super) fn all_flat(soaks: &[Soak]) -> bool {
    soaks.iter().all(|soak| {
        [
            growth(&soak.samples, |s| s.producer_kib),
            growth(&soak.samples, |s| s.consumer_kib),
        ]
        .iter()
        .all(|g| g.is_some_and(|(_, _, flat)| flat))
    })
}

/// Writes the report to `path`.
pub(super) fn write(path: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(producer: &[u64]) -> Vec<Sample> {
        producer
            .iter()
            .enumerate()
            .map(|(i, &kib)| Sample {
                at: SAMPLE_EVERY * u32::try_from(i).unwrap(),
                producer_kib: kib,
                consumer_kib: 10_240,
            })
            .collect()
    }

    #[test]
    fn growth_counts_from_the_first_settled_sample() {
        // Start-up growth (before one minute) does not count.
        let s = samples(&[1_024, 8_192, 16_384, 20_480, 20_480, 21_504, 22_528]);
        let (first, last, flat) = growth(&s, |s| s.producer_kib).unwrap();
        assert_eq!((first, last), (20.0, 22.0));
        assert!(flat);
        let s = samples(&[20_480, 20_480, 20_480, 20_480, 20_480, 40_960]);
        assert!(!growth(&s, |s| s.producer_kib).unwrap().2);
        assert!(growth(&samples(&[1, 2]), |s| s.producer_kib).is_none());
    }
}
