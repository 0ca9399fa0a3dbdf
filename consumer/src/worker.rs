//! The worker loop.
//!
//! Delivery guarantee, in plain words: a delivery is settled only after the handler
//! finished with it and its outcome is durable: for done, the ack itself; for a retry or
//! a dead job, the broker confirmed the copy in the retry tier or the dead-letter queue
//! before the original is acked (see [`crate::settle`]). If the process crashes, is
//! killed, or loses the broker before that, the broker delivers the job again. So every
//! job is processed at least once; handlers must be idempotent on the job id.
//!
//! Concurrency is bounded by a semaphore; each job runs in its own task, so a panic in
//! a handler is a failed attempt, not a dead worker, and a job past the job timeout is
//! cancelled (its task dropped) and retried. On shutdown the worker stops taking
//! deliveries (the subscription is cancelled), gives back the ones it had not started,
//! waits for in-flight jobs up to the grace period, settles them, and closes the
//! connection; jobs still running then are redelivered by the broker.
//!
//! A job source that ends by itself (a panic, say) is a crash, not a shutdown: the
//! worker finishes what it runs the same way and then returns [`SourceDied`], so the
//! process exits non-zero and its supervisor sees it, instead of a replica that
//! quietly stopped consuming.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobgate_shared::broker::{Delivery, JobSource, SharedPublisher};
use jobgate_shared::job::Job;
use jobgate_shared::retry::RetryPolicy;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backend;
use crate::config::ConsumerConfig;
use crate::handler::{Handler, Outcome};
use crate::metrics::WorkerMetrics;
use crate::probes;
use crate::settle;

/// The job source ended while the worker was not shutting down (it panicked, or
/// returned by itself): the worker stopped, and the process must not pass for one that
/// was told to.
#[derive(Debug, thiserror::Error)]
#[error("the job source stopped unexpectedly: {0}")]
pub struct SourceDied(pub String);

/// What the worker loop needs besides a source, a publisher and a handler.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs processed at once.
    pub concurrency: usize,
    /// How long in-flight jobs may take after shutdown began.
    pub shutdown_grace: Duration,
    /// Attempts and retry delays.
    pub retry: RetryPolicy,
    /// A job running longer is cancelled and retried.
    pub job_timeout: Option<Duration>,
}

impl From<&ConsumerConfig> for WorkerOptions {
    fn from(c: &ConsumerConfig) -> Self {
        Self {
            concurrency: usize::from(c.concurrency),
            shutdown_grace: c.shutdown_grace(),
            retry: c.retry_policy(),
            job_timeout: c.job_timeout(),
        }
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

/// [`run`] for a handler chosen at run time. With `metrics_listen` set, the metrics and
/// probes listener runs beside the worker and stops with it; an address that cannot be
/// bound is an error before anything else starts.
pub async fn run_boxed(
    config: ConsumerConfig,
    handler: Box<dyn Handler>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tracing::info!(queues = ?config.queue, concurrency = config.concurrency, backend = ?config.broker.backend, "consumer starting");
    let listener = match config.metrics_listen {
        Some(addr) => Some(probes::bind(addr).await?),
        None => None,
    };
    let source = backend::source(&config);
    let outcomes = backend::outcome_publisher(&config)?;
    let options = WorkerOptions::from(&config);

    let mut registry = jobgate_shared::metrics::registry();
    let metrics = WorkerMetrics::register(&mut registry);
    let draining = CancellationToken::new();
    let stop_listener = CancellationToken::new();
    let server = listener.map(|listener| {
        let state = probes::ProbeState {
            registry: Arc::new(registry),
            metrics: metrics.clone(),
            source: source.status(),
            outcomes: Arc::clone(&outcomes),
            draining: draining.clone(),
        };
        tokio::spawn(probes::serve(listener, state, stop_listener.clone()))
    });
    // Readiness turns false as soon as shutdown begins, before in-flight jobs finish.
    let shutdown = {
        let draining = draining.clone();
        async move {
            shutdown.await;
            draining.cancel();
        }
    };

    let worked = run_with_source_and_metrics(
        source,
        Arc::clone(&outcomes),
        Arc::from(handler),
        options,
        metrics,
        shutdown,
    )
    .await;
    outcomes.close().await;
    stop_listener.cancel();
    if let Some(server) = server {
        if tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .is_err()
        {
            tracing::warn!("the metrics listener did not stop in time");
        }
    }
    match worked {
        Ok(()) => {
            tracing::info!("consumer stopped");
            Ok(())
        }
        Err(died) => {
            tracing::error!(error = %died, "consumer stopped: its job source died");
            Err(died.into())
        }
    }
}

/// The worker loop over any [`JobSource`] (unit tests use the in-memory one).
/// `outcomes` publishes retries and dead letters. Its metrics are not exported; see
/// [`run_with_source_and_metrics`]. `Ok` after `shutdown`; [`SourceDied`] when the
/// source ended first (its in-flight jobs were still finished and settled).
pub async fn run_with_source(
    source: Box<dyn JobSource>,
    outcomes: SharedPublisher,
    handler: Arc<dyn Handler>,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SourceDied> {
    let metrics = WorkerMetrics::default();
    run_with_source_and_metrics(source, outcomes, handler, options, metrics, shutdown).await
}

/// [`run_with_source`] that records every attempt in `metrics`.
pub async fn run_with_source_and_metrics(
    mut source: Box<dyn JobSource>,
    outcomes: SharedPublisher,
    handler: Arc<dyn Handler>,
    options: WorkerOptions,
    metrics: WorkerMetrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SourceDied> {
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
    let options = Arc::new(options);
    // Set when the deliveries ran dry: the source ended (it runs until `stop`).
    let mut source_ended = false;
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
                None => {
                    source_ended = true;
                    break;
                }
            },
        };
        let (handler, outcomes, options, metrics) = (
            Arc::clone(&handler),
            Arc::clone(&outcomes),
            Arc::clone(&options),
            metrics.clone(),
        );
        tracker.spawn(async move {
            process(handler, &outcomes, &options, &metrics, delivery).await;
            drop(permit);
        });
    }

    // Stop taking work: cancel the subscription, give back what was fetched but not
    // started so other replicas get it at once.
    stop.cancel();
    rx.close();
    while let Some(Delivery { job, settle }) = rx.recv().await {
        if let Err(error) = settle.requeue().await {
            let (job_id, queue) = (&job.meta.id, &job.meta.queue);
            tracing::debug!(%job_id, %queue, %error, "could not give back an unstarted job; the broker will redeliver it");
        }
    }
    let (mut source, died) = match source_task.await {
        Ok(source) if source_ended => (
            Some(source),
            Some(SourceDied("it ended by itself".to_owned())),
        ),
        Ok(source) => (Some(source), None),
        Err(error) => {
            let why = if error.is_panic() {
                format!("it panicked: {}", panic_message(error.into_panic()))
            } else {
                error.to_string()
            };
            tracing::error!(error = %why, "job source task failed");
            (None, Some(SourceDied(why)))
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
    died.map_or(Ok(()), Err)
}

/// Runs one job and settles it by its outcome, inside the job's span (which continues
/// the trace the job's headers carry), recording the attempt in `metrics`.
async fn process(
    handler: Arc<dyn Handler>,
    outcomes: &SharedPublisher,
    options: &WorkerOptions,
    metrics: &WorkerMetrics,
    delivery: Delivery,
) {
    let Delivery { job, settle } = delivery;
    let meta = &job.meta;
    let span =
        tracing::info_span!("job", job_id = %meta.id, queue = %meta.queue, attempt = meta.attempt);
    jobgate_shared::telemetry::continue_trace(&span, &meta.headers);
    async {
        let (job_id, queue, attempt) = (&meta.id, &meta.queue, meta.attempt);
        tracing::debug!(%job_id, %queue, attempt, "job started");
        let in_flight = metrics.job_started(queue);
        let started = Instant::now();
        let outcome = run_handler(handler, job.clone(), options.job_timeout).await;
        metrics.handler_finished(queue, started.elapsed());
        let settled =
            settle::settle(outcomes.as_ref(), &options.retry, &job, settle, outcome).await;
        metrics.job_settled(queue, settled);
        drop(in_flight);
    }
    .instrument(span)
    .await;
}

/// Runs the handler in its own task: a panic becomes a failed attempt, and a job past
/// `timeout` is cancelled (its task aborted, dropping whatever it was doing). The task
/// runs in the caller's span (the job's), so the handler's logs belong to the job.
async fn run_handler(handler: Arc<dyn Handler>, job: Job, timeout: Option<Duration>) -> Outcome {
    let handle = async move { handler.handle(&job).await };
    let mut task = tokio::spawn(handle.instrument(tracing::Span::current()));
    let joined = match timeout {
        Some(limit) => match tokio::time::timeout(limit, &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                task.abort();
                return Outcome::Retry {
                    reason: format!("job timed out after {limit:?}"),
                    delay: None,
                };
            }
        },
        None => task.await,
    };
    match joined {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => Outcome::Retry {
            reason: format!("handler panicked: {}", panic_message(error.into_panic())),
            delay: None,
        },
        Err(error) => Outcome::Retry {
            reason: format!("handler task failed: {error}"),
            delay: None,
        },
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;
    use jobgate_shared::broker::memory::{MemoryBroker, Settlement};
    use jobgate_shared::broker::PublishError;
    use jobgate_shared::job::JobMeta;

    use super::*;

    fn job(body: &'static str) -> Job {
        Job {
            meta: JobMeta::new("q", None),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    fn options(concurrency: usize) -> WorkerOptions {
        WorkerOptions {
            concurrency,
            shutdown_grace: Duration::from_secs(5),
            retry: RetryPolicy {
                max_attempts: 3,
                base: Duration::from_secs(1),
                max: Duration::from_secs(4),
            },
            job_timeout: Some(Duration::from_millis(300)),
        }
    }

    /// Done for "ok", Dead for "dead", a panic for "panic", Retry for "retry",
    /// a hang for "hang".
    #[derive(Default)]
    struct ScriptedHandler {
        running: AtomicUsize,
        max_running: AtomicUsize,
    }

    #[async_trait]
    impl Handler for ScriptedHandler {
        async fn handle(&self, job: &Job) -> Outcome {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            match &job.body[..] {
                b"dead" => Outcome::Dead {
                    reason: "bad input".into(),
                },
                b"panic" => panic!("handler bug"),
                b"retry" => Outcome::Retry {
                    reason: "try again".into(),
                    delay: None,
                },
                b"hang" => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Outcome::Done
                }
                _ => Outcome::Done,
            }
        }
    }

    /// Runs the worker over `jobs` until `settlements` deliveries were settled.
    async fn run_jobs(
        broker: &MemoryBroker,
        handler: Arc<dyn Handler>,
        options: WorkerOptions,
        settlements: usize,
    ) {
        let until_settled = {
            let broker = broker.clone();
            async move {
                while broker.settled().len() < settlements {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let outcomes: SharedPublisher = Arc::new(broker.clone());
        run_with_source(
            Box::new(broker.clone()),
            outcomes,
            handler,
            options,
            until_settled,
        )
        .await
        .expect("the source runs until shutdown");
    }

    fn settled_of(broker: &MemoryBroker, j: &Job) -> Vec<Settlement> {
        let all = broker.settled();
        let mine = all.iter().filter(|(id, _)| *id == j.meta.id);
        mine.map(|(_, s)| *s).collect()
    }

    fn copies_of(broker: &MemoryBroker, j: &Job) -> Vec<(String, JobMeta)> {
        let all = broker.published_to();
        let mine = all.into_iter().filter(|(_, c)| c.meta.id == j.meta.id);
        mine.map(|(to, c)| (to, c.meta)).collect()
    }

    #[tokio::test]
    async fn each_outcome_is_settled_after_its_copy_is_published() {
        let broker = MemoryBroker::new();
        let jobs = [
            job("ok"),
            job("dead"),
            job("panic"),
            job("retry"),
            job("hang"),
        ];
        for j in &jobs {
            broker.enqueue(j.clone());
        }
        let handler = Arc::new(ScriptedHandler::default());
        run_jobs(&broker, handler.clone(), options(2), jobs.len()).await;

        // Every delivery was acked: its outcome is durable somewhere.
        for j in &jobs {
            assert_eq!(
                settled_of(&broker, j),
                vec![Settlement::Acked],
                "{:?}",
                j.body
            );
        }
        assert!(copies_of(&broker, &jobs[0]).is_empty(), "done: no copy");

        let dead = copies_of(&broker, &jobs[1]);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0, "q.dlq");
        let h = &dead[0].1.headers;
        assert_eq!(h["x-error"], "bad input");
        assert_eq!(h["x-attempts"], "1");
        assert_eq!(h["x-original-queue"], "q");
        assert!(
            h["x-failed-at"].ends_with('Z'),
            "RFC 3339 UTC: {}",
            h["x-failed-at"]
        );

        for (j, why) in [
            (&jobs[2], "handler panicked: handler bug"),
            (&jobs[3], "try again"),
            (&jobs[4], "job timed out"),
        ] {
            let retry = copies_of(&broker, j);
            assert_eq!(retry.len(), 1, "{:?}", j.body);
            assert_eq!(retry[0].0, "q.retry.1s");
            assert_eq!(retry[0].1.attempt, 2);
            assert!(
                retry[0].1.headers["x-last-error"].starts_with(why),
                "{:?}",
                retry[0].1.headers
            );
            assert!(retry[0].1.headers.contains_key("x-due-at"));
        }
        assert!(
            handler.max_running.load(Ordering::SeqCst) <= 2,
            "concurrency bound held"
        );
    }

    /// Runs the worker over `broker` with `concurrency` until `settled` deliveries were
    /// settled, and returns the metrics it recorded, rendered.
    async fn metrics_after(broker: &MemoryBroker, concurrency: usize, settled: usize) -> String {
        let mut registry = jobgate_shared::metrics::registry();
        let metrics = WorkerMetrics::register(&mut registry);
        let until_settled = {
            let broker = broker.clone();
            async move {
                while broker.settled().len() < settled {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let outcomes: SharedPublisher = Arc::new(broker.clone());
        run_with_source_and_metrics(
            Box::new(broker.clone()),
            outcomes,
            Arc::new(ScriptedHandler::default()),
            options(concurrency),
            metrics,
            until_settled,
        )
        .await
        .expect("the source runs until shutdown");
        jobgate_shared::metrics::render(&registry)
    }

    #[tokio::test]
    async fn metrics_count_each_attempt_by_its_outcome() {
        let broker = MemoryBroker::new();
        let mut last = job("retry");
        last.meta.attempt = 3;
        for j in [job("ok"), job("ok"), job("retry"), job("dead"), last] {
            broker.enqueue(j);
        }
        let text = metrics_after(&broker, 2, 5).await;
        for line in [
            "jobgate_jobs_total{queue=\"q\",outcome=\"done\"} 2",
            "jobgate_jobs_total{queue=\"q\",outcome=\"retried\"} 1",
            // "dead" and a failed last attempt.
            "jobgate_jobs_total{queue=\"q\",outcome=\"dead\"} 2",
            "jobgate_dlq_publishes_total{queue=\"q\"} 2",
            "jobgate_job_attempts_total{queue=\"q\"} 5",
            "jobgate_job_duration_seconds_count{queue=\"q\"} 5",
            "jobgate_jobs_in_flight{queue=\"q\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(text.contains("jobgate_last_success_timestamp_seconds{queue=\"q\"}"));
    }

    #[tokio::test]
    async fn an_outcome_that_could_not_be_published_is_an_attempt_without_an_outcome() {
        let broker = MemoryBroker::new();
        broker.enqueue(job("dead"));
        broker.fail_publishes(usize::MAX, PublishError::Unavailable);
        // Until the job is given back (settled by a requeue).
        let text = metrics_after(&broker, 1, 1).await;
        // The job given back may be delivered (and attempted) again before the worker
        // stops; none of its attempts has an outcome.
        assert!(
            text.contains("jobgate_job_attempts_total{queue=\"q\"} "),
            "{text}"
        );
        assert!(!text.contains("jobgate_jobs_total{"), "{text}");
        assert!(!text.contains("jobgate_dlq_publishes_total{"), "{text}");
    }

    #[tokio::test]
    async fn the_last_attempt_goes_to_the_dead_letter_queue() {
        let broker = MemoryBroker::new();
        let mut last = job("retry");
        last.meta.attempt = 3;
        broker.enqueue(last.clone());
        run_jobs(&broker, Arc::new(ScriptedHandler::default()), options(1), 1).await;
        let copies = copies_of(&broker, &last);
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].0, "q.dlq");
        assert_eq!(copies[0].1.headers["x-attempts"], "3");
        assert_eq!(copies[0].1.headers["x-error"], "try again");
        assert!(!copies[0].1.headers.contains_key("x-due-at"));
    }

    #[tokio::test]
    async fn a_copy_that_cannot_be_published_gives_the_job_back_instead_of_acking() {
        let broker = MemoryBroker::new();
        let j = job("dead");
        broker.enqueue(j.clone());
        broker.fail_publishes(usize::MAX, PublishError::Unavailable);
        let until_requeued = {
            let broker = broker.clone();
            async move {
                while broker.settled().is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let outcomes: SharedPublisher = Arc::new(broker.clone());
        run_with_source(
            Box::new(broker.clone()),
            outcomes,
            Arc::new(ScriptedHandler::default()),
            options(1),
            until_requeued,
        )
        .await
        .expect("the source runs until shutdown");
        assert_eq!(settled_of(&broker, &j)[0], Settlement::Requeued);
        assert!(copies_of(&broker, &j).is_empty());
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
        let outcomes: SharedPublisher = Arc::new(broker.clone());
        let mut opts = options(1);
        opts.job_timeout = None;
        run_with_source(
            Box::new(broker.clone()),
            outcomes,
            Arc::new(Slow),
            opts,
            shutdown,
        )
        .await
        .expect("the source runs until shutdown");
        assert_eq!(
            broker.settled(),
            vec![(j.meta.id.clone(), Settlement::Acked)]
        );
    }

    /// A source that delivers `jobs`, then panics (`panic`) or returns.
    struct DyingSource {
        jobs: Vec<Job>,
        panic: bool,
        acked: Arc<AtomicUsize>,
    }

    struct CountingSettle(Arc<AtomicUsize>);

    #[async_trait]
    impl jobgate_shared::broker::Settle for CountingSettle {
        async fn ack(self: Box<Self>) -> Result<(), jobgate_shared::broker::SettleError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn requeue(self: Box<Self>) -> Result<(), jobgate_shared::broker::SettleError> {
            Ok(())
        }
        async fn reject(self: Box<Self>) -> Result<(), jobgate_shared::broker::SettleError> {
            Ok(())
        }
    }

    #[async_trait]
    impl JobSource for DyingSource {
        async fn run(&mut self, tx: mpsc::Sender<Delivery>, _stop: CancellationToken) {
            for job in self.jobs.drain(..) {
                let settle = Box::new(CountingSettle(Arc::clone(&self.acked)));
                let _ = tx.send(Delivery { job, settle }).await;
            }
            if self.panic {
                panic!("timestamp overflow");
            }
        }

        fn is_ready(&self) -> bool {
            true
        }

        async fn close(&mut self) {}
    }

    /// Runs the worker over a source that delivers two jobs and dies, with no shutdown;
    /// returns what the worker returned and how many jobs were acked.
    async fn run_until_source_dies(panic: bool) -> (Result<(), SourceDied>, usize) {
        let acked = Arc::new(AtomicUsize::new(0));
        let source = DyingSource {
            jobs: vec![job("ok"), job("ok")],
            panic,
            acked: Arc::clone(&acked),
        };
        let outcomes: SharedPublisher = Arc::new(MemoryBroker::new());
        let handler = Arc::new(ScriptedHandler::default());
        let never = std::future::pending::<()>();
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            run_with_source(Box::new(source), outcomes, handler, options(2), never),
        )
        .await
        .expect("the worker stops when its source dies, without a shutdown");
        (result, acked.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_source_that_panics_stops_the_worker_with_an_error() {
        let (result, acked) = run_until_source_dies(true).await;
        let died = result.expect_err("a dead source is an error");
        assert!(died.to_string().contains("timestamp overflow"), "{died}");
        assert_eq!(acked, 2, "the jobs it had delivered were still finished");
    }

    #[tokio::test]
    async fn a_source_that_ends_by_itself_stops_the_worker_with_an_error() {
        let (result, acked) = run_until_source_dies(false).await;
        assert!(
            result.is_err(),
            "a source ending outside shutdown is an error"
        );
        assert_eq!(acked, 2);
    }

    #[tokio::test]
    async fn jobs_still_running_after_the_grace_period_are_left_unsettled() {
        let broker = MemoryBroker::new();
        broker.enqueue(job("hang"));
        let mut opts = options(1);
        opts.job_timeout = None;
        opts.shutdown_grace = Duration::from_millis(50);
        let shutdown = tokio::time::sleep(Duration::from_millis(50));
        let outcomes: SharedPublisher = Arc::new(broker.clone());
        run_with_source(
            Box::new(broker.clone()),
            outcomes,
            Arc::new(ScriptedHandler::default()),
            opts,
            shutdown,
        )
        .await
        .expect("the source runs until shutdown");
        // Not acked: the real broker redelivers it when the connection closes.
        assert!(broker.settled().is_empty());
    }
}
