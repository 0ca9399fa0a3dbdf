//! The worker's Prometheus metrics: one struct that holds every family, and the few
//! calls the worker makes as a job goes through an attempt. Served on
//! `JOBGATE_METRICS_LISTEN` (see [`crate::probes`]).
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `jobgate_jobs_total` | `queue`, `outcome` | attempts settled as `done`, `retried` or `dead`; deliveries acked unrun as `cancelled` or `duplicate` (the status store says the job is cancelled, or done already) |
//! | `jobgate_jobs_deferred_total` | `queue` | scheduled jobs received before their due time and sent through a delay tier again (hops; not attempts) |
//! | `jobgate_job_duration_seconds` | `queue` | handler time per attempt |
//! | `jobgate_jobs_in_flight` | `queue` | attempts running or being settled |
//! | `jobgate_job_attempts_total` | `queue` | handler runs, first attempts included |
//! | `jobgate_dlq_publishes_total` | `queue` | dead-letter copies the broker confirmed |
//! | `jobgate_outcome_publish_failures_total` | `queue` | tries of a retry or dead-letter copy the broker did not confirm (each is tried again) |
//! | `jobgate_kafka_consumer_lag` | `queue`, `partition` | Kafka: messages behind the high watermark |
//! | `jobgate_last_success_timestamp_seconds` | `queue` | unix time of the last done job |
//! | `jobgate_broker_up` | | 1 while subscribed and the outcome publisher is connected |
//! | `jobgate_status_store_failures_total` | `op` | job status reads and writes that failed (the job ran all the same) |
//!
//! A retry or dead-letter copy that the broker does not confirm is published again until
//! it is; an attempt whose copy was still unconfirmed when the worker shut down counts
//! as an attempt but has no outcome (the broker delivers the job again). A job
//! dead-lettered because its earlier deliveries ended without an outcome (the consumer
//! crashed while running it) has an outcome (`dead`) but no handler run.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use jobgate_shared::metrics::{latency_histogram, InFlight, Registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::settle::Settled;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    queue: String,
    /// `done`, `retried`, `dead`, `cancelled` or `duplicate`.
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    queue: String,
    partition: i32,
}

type HistogramFamily = Family<QueueLabels, Histogram, fn() -> Histogram>;

/// Every metric of the worker. Cloning shares the families.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    jobs: Family<OutcomeLabels, Counter>,
    deferred: Family<QueueLabels, Counter>,
    duration: HistogramFamily,
    in_flight: Family<QueueLabels, Gauge>,
    attempts: Family<QueueLabels, Counter>,
    dlq_publishes: Family<QueueLabels, Counter>,
    outcome_publish_failures: Family<QueueLabels, Counter>,
    kafka_lag: Family<PartitionLabels, Gauge>,
    last_success: Family<QueueLabels, Gauge<f64, AtomicU64>>,
    broker_up: Gauge,
    /// Job status calls that failed.
    pub status_failures: jobgate_shared::status::StoreFailures,
}

impl Default for WorkerMetrics {
    /// Metrics that no registry exports (for a worker run without a metrics listener).
    fn default() -> Self {
        Self {
            jobs: Family::default(),
            deferred: Family::default(),
            duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            in_flight: Family::default(),
            attempts: Family::default(),
            dlq_publishes: Family::default(),
            outcome_publish_failures: Family::default(),
            kafka_lag: Family::default(),
            last_success: Family::default(),
            broker_up: Gauge::default(),
            status_failures: jobgate_shared::status::StoreFailures::default(),
        }
    }
}

impl WorkerMetrics {
    /// Creates the metrics and registers them in `registry` (whose prefix is
    /// `jobgate`, see [`jobgate_shared::metrics::registry`]).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            status_failures: jobgate_shared::status::StoreFailures::register(registry),
            ..Self::default()
        };
        registry.register(
            "jobs",
            "Job attempts settled, by outcome (done, retried, dead), and deliveries acked unrun (cancelled, duplicate)",
            m.jobs.clone(),
        );
        registry.register(
            "jobs_deferred",
            "Scheduled jobs received before their due time and sent through a delay tier again (hops, not attempts)",
            m.deferred.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Handler time per attempt",
            m.duration.clone(),
        );
        registry.register(
            "jobs_in_flight",
            "Job attempts running or being settled",
            m.in_flight.clone(),
        );
        registry.register(
            "job_attempts",
            "Handler runs, first attempts included",
            m.attempts.clone(),
        );
        registry.register(
            "dlq_publishes",
            "Jobs published to the dead-letter queue (confirmed by the broker)",
            m.dlq_publishes.clone(),
        );
        registry.register(
            "outcome_publish_failures",
            "Tries of a retry or dead-letter copy that the broker did not confirm (each is tried again)",
            m.outcome_publish_failures.clone(),
        );
        registry.register(
            "kafka_consumer_lag",
            "Kafka: messages of an owned partition behind its high watermark",
            m.kafka_lag.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last job done",
            m.last_success.clone(),
        );
        registry.register(
            "broker_up",
            "1 while subscribed to the broker and able to publish outcomes, else 0",
            m.broker_up.clone(),
        );
        m
    }

    /// A handler run begins: one more attempt, one more in flight until the returned
    /// guard is dropped (after settling).
    pub fn job_started(&self, queue: &str) -> InFlight {
        let labels = QueueLabels {
            queue: queue.to_owned(),
        };
        self.attempts.get_or_create(&labels).inc();
        InFlight::enter(&self.in_flight.get_or_create(&labels))
    }

    /// An outcome is settled without a handler run (a job dead-lettered because its
    /// earlier deliveries ended without an outcome): in flight until the returned guard
    /// is dropped, not an attempt.
    pub fn job_settling(&self, queue: &str) -> InFlight {
        let labels = QueueLabels {
            queue: queue.to_owned(),
        };
        InFlight::enter(&self.in_flight.get_or_create(&labels))
    }

    /// The handler returned (or was cancelled) after `duration`.
    pub fn handler_finished(&self, queue: &str, duration: Duration) {
        let labels = QueueLabels {
            queue: queue.to_owned(),
        };
        self.duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
    }

    /// A delivery was acked without running it: `outcome` is `cancelled` (the job was
    /// cancelled) or `duplicate` (the job is done already: a redelivery).
    pub fn job_skipped(&self, queue: &str, outcome: &'static str) {
        self.jobs
            .get_or_create(&OutcomeLabels {
                queue: queue.to_owned(),
                outcome,
            })
            .inc();
    }

    /// A scheduled job not due yet went through a delay tier again (a hop).
    pub fn job_deferred(&self, queue: &str) {
        let labels = QueueLabels {
            queue: queue.to_owned(),
        };
        self.deferred.get_or_create(&labels).inc();
    }

    /// The attempt was settled as `settled`.
    pub fn job_settled(&self, queue: &str, settled: Settled) {
        let outcome = match settled {
            Settled::Done => "done",
            Settled::Retried => "retried",
            Settled::Dead => "dead",
            // Not settled: the broker delivers the job again, with its own outcome.
            Settled::Unsettled => return,
        };
        let labels = QueueLabels {
            queue: queue.to_owned(),
        };
        match settled {
            Settled::Done => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                self.last_success.get_or_create(&labels).set(now);
            }
            Settled::Dead => {
                self.dlq_publishes.get_or_create(&labels).inc();
            }
            Settled::Retried | Settled::Unsettled => {}
        }
        self.jobs
            .get_or_create(&OutcomeLabels {
                queue: labels.queue,
                outcome,
            })
            .inc();
    }

    /// A try of a retry or dead-letter copy of a job of `queue` was not confirmed.
    pub fn outcome_publish_failed(&self, queue: &str) {
        let labels = QueueLabels {
            queue: queue.to_owned(),
        };
        self.outcome_publish_failures.get_or_create(&labels).inc();
    }

    /// Sets `jobgate_broker_up`.
    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.set(i64::from(up));
    }

    /// Replaces the Kafka lag gauges by `partitions` (queue, partition, lag): partitions
    /// no longer owned disappear.
    pub fn set_kafka_lag(&self, partitions: &[(String, i32, i64)]) {
        self.kafka_lag.clear();
        for (queue, partition, lag) in partitions {
            let labels = PartitionLabels {
                queue: queue.clone(),
                partition: *partition,
            };
            self.kafka_lag.get_or_create(&labels).set(*lag);
        }
    }
}

#[cfg(test)]
mod tests {
    use jobgate_shared::metrics::{registry, render};

    use super::*;

    #[test]
    fn an_attempt_is_counted_by_outcome_and_leaves_nothing_in_flight() {
        let mut registry = registry();
        let metrics = WorkerMetrics::register(&mut registry);
        for settled in [Settled::Done, Settled::Retried, Settled::Dead] {
            let in_flight = metrics.job_started("mail");
            metrics.handler_finished("mail", Duration::from_millis(3));
            assert!(render(&registry).contains("jobgate_jobs_in_flight{queue=\"mail\"} 1"));
            metrics.job_settled("mail", settled);
            drop(in_flight);
        }
        let unsettled = metrics.job_started("mail");
        metrics.outcome_publish_failed("mail");
        metrics.outcome_publish_failed("mail");
        metrics.job_settled("mail", Settled::Unsettled);
        drop(unsettled);

        let text = render(&registry);
        for line in [
            "jobgate_jobs_total{queue=\"mail\",outcome=\"done\"} 1",
            "jobgate_jobs_total{queue=\"mail\",outcome=\"retried\"} 1",
            "jobgate_jobs_total{queue=\"mail\",outcome=\"dead\"} 1",
            "jobgate_job_attempts_total{queue=\"mail\"} 4",
            "jobgate_dlq_publishes_total{queue=\"mail\"} 1",
            "jobgate_outcome_publish_failures_total{queue=\"mail\"} 2",
            "jobgate_jobs_in_flight{queue=\"mail\"} 0",
            "jobgate_job_duration_seconds_count{queue=\"mail\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(
            text.contains("jobgate_last_success_timestamp_seconds{queue=\"mail\"} 1"),
            "a unix time in seconds (2001 or later): {text}"
        );
    }

    #[test]
    fn kafka_lag_shows_owned_partitions_only() {
        let mut registry = registry();
        let metrics = WorkerMetrics::register(&mut registry);
        metrics.set_kafka_lag(&[("q".into(), 0, 5), ("q".into(), 1, 0)]);
        metrics.set_kafka_lag(&[("q".into(), 1, 2)]);
        let text = render(&registry);
        assert!(
            text.contains("jobgate_kafka_consumer_lag{queue=\"q\",partition=\"1\"} 2"),
            "{text}"
        );
        assert!(!text.contains("partition=\"0\""), "revoked: {text}");
        metrics.set_broker_up(true);
        assert!(render(&registry).contains("jobgate_broker_up 1"));
    }
}
