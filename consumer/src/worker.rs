//! The worker loop.
//!
//! Delivery guarantee, in plain words: a delivery is settled only after the handler
//! finished with it and its outcome is durable (ack for done; for retry and dead the
//! broker takes the job back before the original is removed). If the process crashes,
//! is killed, or loses the broker before that, the broker delivers the job again. So
//! every job is processed at least once; handlers must be idempotent on the job id.
//!
//! Concurrency is bounded by a semaphore; each job runs in its own task, so a panic
//! in a handler is a failed attempt, not a dead worker. On shutdown the worker stops
//! taking deliveries (the subscription is cancelled), gives back the ones it had not
//! started, waits for in-flight jobs up to the grace period, settles them, and closes
//! the connection; jobs still running then are redelivered by the broker.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jobgate_shared::broker::kafka::{self, KafkaSource};
use jobgate_shared::broker::rabbitmq::{self, RabbitSource};
use jobgate_shared::broker::{Delivery, JobSource};
use jobgate_shared::config::Backend;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ConsumerConfig;
use crate::handler::{Handler, Outcome};

/// What the worker loop needs besides a source and a handler.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs processed at once.
    pub concurrency: usize,
    /// How long in-flight jobs may take after shutdown began.
    pub shutdown_grace: Duration,
}

impl From<&ConsumerConfig> for WorkerOptions {
    fn from(c: &ConsumerConfig) -> Self {
        Self {
            concurrency: usize::from(c.concurrency),
            shutdown_grace: c.shutdown_grace(),
        }
    }
}

/// Builds the job source for the configured backend.
pub fn source_from_config(config: &ConsumerConfig) -> Box<dyn JobSource> {
    match config.broker.backend {
        Backend::Rabbitmq => Box::new(RabbitSource::new(rabbitmq::SourceOptions {
            url: config.broker.amqp_url.clone(),
            queues: config.queue.clone(),
            connect_timeout: config.broker.connect_timeout(),
            prefetch: config.concurrency,
        })),
        Backend::Kafka => Box::new(KafkaSource::new(kafka::SourceOptions {
            topics: config.broker.kafka_topics(),
            queues: config.queue.clone(),
            group_template: config.kafka_group.clone(),
            session_timeout: Duration::from_millis(config.kafka_session_timeout_ms),
        })),
    }
}

/// Runs the whole worker around `handler` until `shutdown` completes: the entry point
/// for users who write their own handler.
pub async fn run<H: Handler>(
    config: ConsumerConfig,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_boxed(config, Box::new(handler), shutdown).await
}

/// [`run`] for a handler chosen at run time.
pub async fn run_boxed(
    config: ConsumerConfig,
    handler: Box<dyn Handler>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tracing::info!(queues = ?config.queue, concurrency = config.concurrency, backend = ?config.broker.backend, "consumer starting");
    let source = source_from_config(&config);
    run_with_source(
        source,
        Arc::from(handler),
        WorkerOptions::from(&config),
        shutdown,
    )
    .await;
    tracing::info!("consumer stopped");
    Ok(())
}

/// The worker loop over any [`JobSource`] (unit tests use the in-memory one).
pub async fn run_with_source(
    mut source: Box<dyn JobSource>,
    handler: Arc<dyn Handler>,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let concurrency = options.concurrency.max(1);
    let (tx, mut rx) = mpsc::channel::<Delivery>(concurrency);
    let stop = CancellationToken::new();
    let source_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            source.run(tx, stop).await;
            source
        })
    };

    let permits = Arc::new(Semaphore::new(concurrency));
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let delivery = tokio::select! {
            biased;
            () = &mut shutdown => break,
            next = rx.recv() => match next {
                Some(d) => d,
                None => break,
            },
        };
        let handler = Arc::clone(&handler);
        tracker.spawn(async move {
            process(handler, delivery).await;
            drop(permit);
        });
    }

    // Stop taking work: cancel the subscription, give back what was fetched but not
    // started so other replicas get it at once.
    stop.cancel();
    rx.close();
    while let Some(unstarted) = rx.recv().await {
        if let Err(error) = unstarted.settle.requeue().await {
            tracing::debug!(%error, "could not give back an unstarted job; the broker will redeliver it");
        }
    }
    let mut source = match source_task.await {
        Ok(source) => Some(source),
        Err(error) => {
            tracing::error!(%error, "job source task failed");
            None
        }
    };

    tracker.close();
    let in_flight = tracker.len();
    if in_flight > 0 {
        tracing::info!(in_flight, grace = ?options.shutdown_grace, "waiting for in-flight jobs");
    }
    if tokio::time::timeout(options.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = tracker.len(),
            "grace period over; unfinished jobs go back to the broker"
        );
    }
    if let Some(source) = source.as_mut() {
        source.close().await;
    }
}

/// Runs one job and settles it by its outcome.
async fn process(handler: Arc<dyn Handler>, delivery: Delivery) {
    let Delivery { job, settle } = delivery;
    let (job_id, queue, attempt) = (
        job.meta.id.clone(),
        job.meta.queue.clone(),
        job.meta.attempt,
    );
    tracing::debug!(%job_id, %queue, attempt, "job started");
    // Own task: a panic in the handler is caught here as a failed attempt.
    let outcome = match tokio::spawn(async move { handler.handle(&job).await }).await {
        Ok(outcome) => outcome,
        Err(error) => Outcome::Retry {
            reason: format!("handler panicked: {error}"),
            delay: None,
        },
    };
    let settled = match &outcome {
        Outcome::Done => settle.ack().await,
        Outcome::Retry { reason, .. } => {
            tracing::warn!(%job_id, %queue, attempt, %reason, "job failed; it will be retried");
            settle.requeue().await
        }
        Outcome::Dead { reason } => {
            tracing::warn!(%job_id, %queue, attempt, %reason, "job failed for good; dead-lettered");
            settle.reject().await
        }
    };
    match settled {
        Ok(()) => tracing::debug!(%job_id, %queue, attempt, ?outcome, "job settled"),
        Err(error) => {
            tracing::warn!(%job_id, %queue, %error, "could not settle; the broker will redeliver the job")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;
    use jobgate_shared::broker::memory::{MemoryBroker, Settlement};
    use jobgate_shared::job::{Job, JobMeta};
    use tokio::sync::Notify;

    use super::*;

    fn job(body: &'static str) -> Job {
        Job {
            meta: JobMeta::new("q", None),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    /// Done for "ok", Dead for "dead", a panic for "panic", Retry once for "flaky".
    struct ScriptedHandler {
        flaky_seen: AtomicUsize,
        running: AtomicUsize,
        max_running: AtomicUsize,
    }

    #[async_trait]
    impl Handler for ScriptedHandler {
        async fn handle(&self, job: &Job) -> Outcome {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            match &job.body[..] {
                b"ok" => Outcome::Done,
                b"dead" => Outcome::Dead {
                    reason: "bad input".into(),
                },
                b"panic" => panic!("handler bug"),
                b"flaky" if self.flaky_seen.fetch_add(1, Ordering::SeqCst) == 0 => Outcome::Retry {
                    reason: "try again".into(),
                    delay: None,
                },
                _ => Outcome::Done,
            }
        }
    }

    #[tokio::test]
    async fn outcomes_are_settled_and_a_panic_does_not_stop_the_worker() {
        let broker = MemoryBroker::new();
        let jobs = [
            job("ok"),
            job("dead"),
            job("panic"),
            job("flaky"),
            job("ok"),
        ];
        for j in &jobs {
            broker.enqueue(j.clone());
        }
        let handler = Arc::new(ScriptedHandler {
            flaky_seen: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
        });
        let done = Arc::new(Notify::new());
        let watcher = {
            let (broker, done) = (broker.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                // ok, dead, ok, flaky twice (requeued then acked); the panicking job is
                // requeued on every attempt, so wait for at least two of its attempts.
                while broker.settled().len() < 8 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                done.notify_one();
            })
        };
        let options = WorkerOptions {
            concurrency: 2,
            shutdown_grace: Duration::from_secs(5),
        };
        run_with_source(
            Box::new(broker.clone()),
            handler.clone(),
            options,
            done.notified(),
        )
        .await;
        watcher.await.unwrap();

        let settled = broker.settled();
        let of = |j: &Job| -> Vec<Settlement> {
            settled
                .iter()
                .filter(|(id, _)| *id == j.meta.id)
                .map(|(_, s)| *s)
                .collect()
        };
        assert_eq!(of(&jobs[0]), vec![Settlement::Acked]);
        assert_eq!(of(&jobs[1]), vec![Settlement::Rejected]);
        assert!(of(&jobs[2]).len() >= 2 && of(&jobs[2]).iter().all(|s| *s == Settlement::Requeued));
        assert_eq!(of(&jobs[3]), vec![Settlement::Requeued, Settlement::Acked]);
        assert_eq!(of(&jobs[4]), vec![Settlement::Acked]);
        assert!(
            handler.max_running.load(Ordering::SeqCst) <= 2,
            "concurrency bound held"
        );
    }

    #[tokio::test]
    async fn shutdown_waits_for_in_flight_jobs_within_the_grace_period() {
        struct Slow;
        #[async_trait]
        impl Handler for Slow {
            async fn handle(&self, _: &Job) -> Outcome {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Outcome::Done
            }
        }
        let broker = MemoryBroker::new();
        let j = job("x");
        broker.enqueue(j.clone());
        // Shut down while the job is in flight (it takes 200 ms).
        let shutdown = tokio::time::sleep(Duration::from_millis(50));
        let options = WorkerOptions {
            concurrency: 1,
            shutdown_grace: Duration::from_secs(5),
        };
        run_with_source(Box::new(broker.clone()), Arc::new(Slow), options, shutdown).await;
        assert_eq!(
            broker.settled(),
            vec![(j.meta.id.clone(), Settlement::Acked)]
        );
    }

    #[tokio::test]
    async fn jobs_still_running_after_the_grace_period_are_left_unsettled() {
        struct Stuck;
        #[async_trait]
        impl Handler for Stuck {
            async fn handle(&self, _: &Job) -> Outcome {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Outcome::Done
            }
        }
        let broker = MemoryBroker::new();
        broker.enqueue(job("x"));
        let options = WorkerOptions {
            concurrency: 1,
            shutdown_grace: Duration::from_millis(50),
        };
        let shutdown = tokio::time::sleep(Duration::from_millis(50));
        run_with_source(Box::new(broker.clone()), Arc::new(Stuck), options, shutdown).await;
        // Not acked: the real broker redelivers it when the connection closes.
        assert!(broker.settled().is_empty());
    }
}
