//! The worker loop.
//!
//! Delivery guarantee, in plain words: a delivery is settled only after the handler
//! finished with it and its outcome is durable: for done, the ack itself; for a retry or
//! a dead job, the broker confirmed the copy in the retry tier or the dead-letter queue
//! before the original is acked (see [`crate::settle`]; a copy the broker does not take
//! is tried again, the job keeping its slot, until it does). If the process crashes, is
//! killed, or loses the broker before that, the broker delivers the job again. So every
//! job is processed at least once; handlers must be idempotent on the job id.
//!
//! Such a redelivery counts as an attempt: a job source tells how many earlier
//! deliveries of a message ended without an outcome ([`JobMeta::redeliveries`]), the
//! handler sees the attempt number with them counted, and a job past the attempt limit
//! that way is dead-lettered with the reason, without running the handler again. So a
//! job that kills its consumer every time (a poison message) ends in `Q.dlq` instead of
//! taking the fleet down forever.
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
use std::time::{Duration, Instant, SystemTime};

use jobgate_shared::broker::{Delivery, JobSource, SharedPublisher};
use jobgate_shared::job::{Job, JobMeta};
use jobgate_shared::retry::RetryPolicy;
use jobgate_shared::status::{State, StatusStore, Transition, Verdict};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backend;
use crate::config::ConsumerConfig;
use crate::handler::{Handler, Outcome};
use crate::job_policy;
use crate::metrics::WorkerMetrics;
use crate::probes;
use crate::schedule;
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
    /// What a job may ask for with `Jobgate-Max-Attempts` and `Jobgate-Timeout`.
    pub policy_ceilings: job_policy::Ceilings,
    /// The job status store (`JOBGATE_REDIS_URL`): each attempt is recorded, and jobs
    /// found cancelled or done are acked unrun. None: no status.
    pub status: Option<StatusStore>,
    /// Completion callbacks (`JOBGATE_CALLBACK_ALLOW`): a job with a callback URL that
    /// ends gets its callback message queued before its ack. None: callback URLs are
    /// ignored (the callback worker itself, and embedders that want none).
    pub callbacks: Option<Arc<crate::callback::Callbacks>>,
}

impl From<&ConsumerConfig> for WorkerOptions {
    /// The options of `c`, without the status store (see [`ConsumerConfig::status`]).
    fn from(c: &ConsumerConfig) -> Self {
        Self {
            concurrency: usize::from(c.concurrency),
            shutdown_grace: c.shutdown_grace(),
            retry: c.retry_policy(),
            job_timeout: c.job_timeout(),
            policy_ceilings: c.policy_ceilings(),
            status: None,
            callbacks: None,
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
    config.callback.check()?;
    let listener = match config.metrics_listen {
        Some(addr) => Some(probes::bind(addr).await?),
        None => None,
    };
    let source = backend::source(&config);
    let outcomes = backend::outcome_publisher(&config)?;
    let mut options = WorkerOptions::from(&config);
    options.status = config.status.store()?;
    match &options.status {
        Some(store) => tracing::info!(store = %store.describe(), "job status"),
        None => tracing::info!("job status off (JOBGATE_REDIS_URL is not set)"),
    }

    let mut registry = jobgate_shared::metrics::registry();
    let metrics = WorkerMetrics::register(&mut registry);
    let draining = CancellationToken::new();
    let callback_metrics = crate::callback::CallbackMetrics::register(&mut registry);
    options.callbacks = Some(Arc::new(crate::callback::Callbacks::new(
        config.callback.callback_allow.clone(),
        callback_metrics.clone(),
    )));
    // The callbacks queues' worker: the same machinery with the callback handler.
    let callback_worker = match &config.callback.callback_allow {
        Some(allow) => {
            let handler = crate::callback::CallbackHandler::new(
                &config.callback,
                allow.clone(),
                callback_metrics,
            )?;
            let c = crate::callback::worker_config(&config);
            tracing::info!(%allow, queues = ?c.queue, "completion callbacks on");
            let (source, outcomes) = (backend::source(&c), backend::outcome_publisher(&c)?);
            let stop = draining.clone();
            let metrics = metrics.clone();
            Some(tokio::spawn(async move {
                let worked = run_with_source_and_metrics(
                    source,
                    Arc::clone(&outcomes),
                    Arc::new(handler),
                    WorkerOptions::from(&c),
                    metrics,
                    stop.cancelled_owned(),
                )
                .await;
                outcomes.close().await;
                worked
            }))
        }
        None => {
            tracing::info!("completion callbacks off (JOBGATE_CALLBACK_ALLOW is not set)");
            None
        }
    };
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
    // The callback worker stops with the job worker (also when its source died).
    draining.cancel();
    let worked = match callback_worker {
        Some(task) => match task.await {
            Ok(callbacks) => worked.and(callbacks),
            Err(error) => worked.and(Err(SourceDied(format!(
                "the callback worker failed: {error}"
            )))),
        },
        None => worked,
    };
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
    // Cancelled when the worker stops waiting for its in-flight jobs (the shutdown
    // grace ran out): copies not confirmed by then are no longer tried again.
    let abandon = CancellationToken::new();
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
        let (handler, outcomes, options, metrics, abandon) = (
            Arc::clone(&handler),
            Arc::clone(&outcomes),
            Arc::clone(&options),
            metrics.clone(),
            abandon.clone(),
        );
        tracker.spawn(async move {
            let context = Context {
                outcomes: &outcomes,
                options: &options,
                metrics: &metrics,
                abandon: &abandon,
            };
            process(handler, &context, delivery).await;
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
        abandon.cancel();
    }
    if let Some(source) = source.as_mut() {
        source.close().await;
    }
    died.map_or(Ok(()), Err)
}

/// What every job task shares.
struct Context<'a> {
    outcomes: &'a SharedPublisher,
    options: &'a WorkerOptions,
    metrics: &'a WorkerMetrics,
    abandon: &'a CancellationToken,
}

/// Runs one job and settles it by its outcome, inside the job's span (which continues
/// the trace the job's headers carry), recording the attempt in `metrics`.
///
/// Earlier deliveries of the message that ended without an outcome count as attempts:
/// the handler sees the attempt with them counted, and a job they take past the attempt
/// limit is dead-lettered without running the handler again.
async fn process(handler: Arc<dyn Handler>, context: &Context<'_>, delivery: Delivery) {
    let Delivery { mut job, settle } = delivery;
    if !settle.is_current() {
        // Kafka: its partition moved to another consumer while it waited here; the new
        // owner delivers it from the committed offset. Nothing to settle.
        let (job_id, queue) = (&job.meta.id, &job.meta.queue);
        tracing::debug!(%job_id, %queue, "job not started: it is delivered to another consumer");
        return;
    }
    if let Some(due) = schedule::due_time(&job.meta) {
        let now = SystemTime::now();
        if let Some(hop) = schedule::hop(&job.meta, &context.options.retry, due, now) {
            defer(context, &job, settle, &hop).await;
            return;
        }
    }
    // The job's own attempt limit and timeout, under the ceilings.
    let options = context.options;
    let policy = job_policy::for_job(
        &job.meta,
        &options.retry,
        options.job_timeout,
        &options.policy_ceilings,
    );
    let exhausted = count_redeliveries(&mut job.meta, &policy.retry);
    let meta = &job.meta;
    let span =
        tracing::info_span!("job", job_id = %meta.id, queue = %meta.queue, attempt = meta.attempt);
    jobgate_shared::telemetry::continue_trace(&span, &meta.headers);
    async {
        let (job_id, queue, attempt) = (&meta.id, &meta.queue, meta.attempt);
        let metrics = context.metrics;
        // In flight while the handler runs and the outcome is settled.
        let (outcome, in_flight) = match exhausted {
            Some(reason) => {
                tracing::warn!(%job_id, %queue, redeliveries = meta.redeliveries, %reason, "job not run again");
                (Outcome::Dead { reason }, metrics.job_settling(queue))
            }
            None => {
                if let Some(skipped) = skip_by_status(context, meta).await {
                    // Nothing to run: the job was cancelled, or is done already (this is
                    // a redelivery after a crash between the handler and the ack, which
                    // may have come before its callback was queued: queue it again).
                    tracing::info!(%job_id, %queue, attempt, state = %skipped, "job acked without running it");
                    ack_skipped(context, meta, settle, skipped).await;
                    return;
                }
                if let Err(error) = settle.started().await {
                    // Counting is a protection, not a condition of the work: the job runs.
                    tracing::warn!(%job_id, %queue, %error, "could not record the start of the job; a crash now would not count as an attempt");
                }
                if meta.redeliveries > 0 {
                    tracing::info!(%job_id, %queue, attempt, redeliveries = meta.redeliveries, "job delivered again after deliveries without an outcome");
                }
                tracing::debug!(%job_id, %queue, attempt, "job started");
                let in_flight = metrics.job_started(queue);
                let started = Instant::now();
                let outcome = run_handler(handler, job.clone(), policy.timeout).await;
                metrics.handler_finished(queue, started.elapsed());
                (outcome, in_flight)
            }
        };
        let report = || metrics.outcome_publish_failed(queue);
        let on_end = context.options.callbacks.as_deref().map(|callbacks| {
            move |job: &Job, ending: settle::Ending<'_>| callbacks.on_end(job, ending)
        });
        let settler = settler(
            context,
            &policy.retry,
            &report,
            on_end.as_ref().map(|f| f as &settle::OnEnd<'_>),
        );
        // `done` is recorded before the ack: a crash between the two redelivers a job
        // whose status says done, and that copy is acked unrun (see `skip_by_status`).
        if let Outcome::Done | Outcome::DoneWith(_) = &outcome {
            let result = match &outcome {
                Outcome::DoneWith(result) => Some(&result[..]),
                _ => None,
            };
            record(context, meta, Transition::Done { attempt, result }).await;
        }
        let failure = match &outcome {
            Outcome::Retry { reason, delay } => Some((reason.clone(), *delay)),
            Outcome::Dead { reason } => Some((reason.clone(), None)),
            Outcome::Done | Outcome::DoneWith(_) => None,
        };
        let settled = settle::settle(&settler, &job, settle, outcome).await;
        // A retry or dead letter is recorded once its copy is durable.
        match (settled, failure) {
            (settle::Settled::Retried, Some((error, delay))) => {
                let due = SystemTime::now() + policy.retry.tier_for(attempt, delay);
                record(context, meta, Transition::Retrying { attempt, due, error: &error }).await;
            }
            (settle::Settled::Dead, Some((error, _))) => {
                record(context, meta, Transition::Dead { attempt, error: &error }).await;
            }
            _ => {}
        }
        metrics.job_settled(queue, settled);
        drop(in_flight);
    }
    .instrument(span)
    .await;
}

/// A scheduled job that is not due yet: unless the status store says it is cancelled
/// (or done: a duplicate), it hops through a delay tier (`hop`), its status unchanged.
/// Neither an attempt nor an outcome: counted in `jobgate_jobs_deferred_total`.
async fn defer(
    context: &Context<'_>,
    job: &Job,
    settle: Box<dyn jobgate_shared::broker::Settle>,
    hop: &schedule::Hop,
) {
    let meta = &job.meta;
    let (job_id, queue) = (&meta.id, &meta.queue);
    if let Some(store) = context.options.status.as_ref() {
        match store.get(queue, job_id).await {
            // Only a final state of this job's own life (a replayed job starts anew).
            Ok(Some(status))
                if matches!(status.state, State::Cancelled | State::Done)
                    && status.replays == jobgate_shared::status::replays_of(meta) =>
            {
                tracing::info!(%job_id, %queue, state = %status.state, "scheduled job acked without running it");
                ack_skipped(context, meta, settle, status.state).await;
                return;
            }
            Ok(_) => {}
            Err(error) => {
                // It hops all the same: the next hop, or the attempt, looks again.
                context.metrics.status_failures.record("read");
                tracing::warn!(%job_id, %queue, %error, "could not read the scheduled job's status; it waits all the same");
            }
        }
    }
    let report = || context.metrics.outcome_publish_failed(queue);
    // A hop ends nothing: no callback.
    let settler = settler(context, &context.options.retry, &report, None);
    tracing::debug!(%job_id, %queue, destination = %hop.destination, due_at = meta.headers.get(jobgate_shared::job::HEADER_NOT_BEFORE).map(String::as_str), "scheduled job not due yet; it waits in a delay tier");
    if settle::hop(&settler, job, settle, hop).await {
        context.metrics.job_deferred(queue);
    }
}

/// Acks a job found `skipped` (`cancelled`, or `done`: a duplicate) without running
/// it, its completion callback (if it has one) queued first: a `done` job's may have
/// been lost with the crash that led to this redelivery. Counts it by `skipped`.
async fn ack_skipped(
    context: &Context<'_>,
    meta: &JobMeta,
    settle: Box<dyn jobgate_shared::broker::Settle>,
    skipped: State,
) {
    let callback = match &context.options.callbacks {
        Some(callbacks) => {
            let store = context.options.status.as_ref();
            callbacks.on_skip(store, meta, skipped).await
        }
        None => None,
    };
    let report = || context.metrics.outcome_publish_failed(&meta.queue);
    let settler = settler(context, &context.options.retry, &report, None);
    settle::ack_after(&settler, meta, settle, callback.as_slice()).await;
    let outcome = if skipped == State::Cancelled {
        "cancelled"
    } else {
        "duplicate"
    };
    context.metrics.job_skipped(&meta.queue, outcome);
}

/// The settler of a job's delivery: copies through the worker's publisher, tried again
/// until confirmed or abandoned, each failed try reported to `report`.
fn settler<'a>(
    context: &'a Context<'_>,
    policy: &'a jobgate_shared::retry::RetryPolicy,
    report: &'a (dyn Fn() + Send + Sync),
    on_end: Option<&'a settle::OnEnd<'a>>,
) -> settle::Settler<'a> {
    settle::Settler {
        outcomes: context.outcomes.as_ref(),
        policy,
        abandon: context.abandon,
        backoff: settle::Settler::copy_backoff(),
        on_publish_failure: report,
        on_end,
    }
}

/// With a status store: records that attempt `meta.attempt` starts, unless the job is
/// `cancelled` or `done` already, whose state is returned (ack it, do not run it). A
/// store that cannot be reached is no reason to hold a job back: it runs (at least
/// once, as without a store), and the failure is logged and counted.
async fn skip_by_status(context: &Context<'_>, meta: &JobMeta) -> Option<State> {
    let store = context.options.status.as_ref()?;
    let running = Transition::Running {
        attempt: meta.attempt,
    };
    let replays = jobgate_shared::status::replays_of(meta);
    match store
        .apply_in(&meta.queue, &meta.id, replays, running)
        .await
    {
        Ok(answer) if answer.verdict == Verdict::Skip => answer.state,
        Ok(_) => None,
        Err(error) => {
            context.metrics.status_failures.record(running.name());
            tracing::warn!(job_id = %meta.id, queue = %meta.queue, %error, "could not read or record the job's status; running it anyway");
            None
        }
    }
}

/// Records `transition` of the job in the status store, if there is one; a failure is
/// logged and counted, never a change to the job's outcome.
async fn record(context: &Context<'_>, meta: &JobMeta, transition: Transition<'_>) {
    let Some(store) = context.options.status.as_ref() else {
        return;
    };
    let replays = jobgate_shared::status::replays_of(meta);
    if let Err(error) = store
        .apply_in(&meta.queue, &meta.id, replays, transition)
        .await
    {
        context.metrics.status_failures.record(transition.name());
        tracing::warn!(job_id = %meta.id, queue = %meta.queue, op = transition.name(), %error, "could not record the job's status");
    }
}

/// Counts the earlier deliveries of `meta`'s message that ended without an outcome as
/// attempts: `meta.attempt` becomes the effective attempt. When they take the job past
/// the attempt limit, `meta.attempt` is the number of attempts that started and the
/// reason to dead-letter the job without running it again is returned.
fn count_redeliveries(meta: &mut JobMeta, policy: &RetryPolicy) -> Option<String> {
    let effective = meta.effective_attempt();
    if meta.redeliveries == 0 || effective <= policy.max_attempts {
        meta.attempt = effective;
        return None;
    }
    meta.attempt = effective - 1;
    let times = match meta.redeliveries {
        1 => "once".to_owned(),
        n => format!("{n} times"),
    };
    Some(format!(
        "delivered {times} without an outcome (the consumer crashed, was killed or lost its \
         broker connection while running it); {} of {} attempts used",
        meta.attempt, policy.max_attempts
    ))
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
            policy_ceilings: job_policy::Ceilings::default(),
            status: None,
            callbacks: None,
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
    async fn a_copy_that_fails_keeps_the_job_until_it_is_published_then_acks_it_once() {
        let broker = MemoryBroker::new();
        let j = job("dead");
        broker.enqueue(j.clone());
        broker.fail_publishes(3, PublishError::Unavailable);
        // Until settled: 200, 400 and 800 ms of backoff (with jitter) pass first.
        let text = metrics_after(&broker, 1, 1).await;
        assert_eq!(
            settled_of(&broker, &j),
            vec![Settlement::Acked],
            "never given back"
        );
        assert_eq!(copies_of(&broker, &j).len(), 1);
        for line in [
            "jobgate_outcome_publish_failures_total{queue=\"q\"} 3",
            "jobgate_jobs_total{queue=\"q\",outcome=\"dead\"} 1",
            "jobgate_job_attempts_total{queue=\"q\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[tokio::test]
    async fn a_copy_still_failing_at_the_end_of_the_grace_leaves_the_job_unsettled() {
        let broker = MemoryBroker::new();
        let j = job("dead");
        broker.enqueue(j.clone());
        broker.fail_publishes(usize::MAX, PublishError::Unavailable);
        let mut registry = jobgate_shared::metrics::registry();
        let metrics = WorkerMetrics::register(&mut registry);
        let mut opts = options(1);
        opts.shutdown_grace = Duration::from_millis(500);
        let outcomes: SharedPublisher = Arc::new(broker.clone());
        let started = Instant::now();
        run_with_source_and_metrics(
            Box::new(broker.clone()),
            outcomes,
            Arc::new(ScriptedHandler::default()),
            opts,
            metrics,
            tokio::time::sleep(Duration::from_millis(300)),
        )
        .await
        .expect("the source runs until shutdown");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // Neither acked nor handed back: the real broker redelivers it after the close.
        assert!(broker.settled().is_empty(), "{:?}", broker.settled());
        assert!(copies_of(&broker, &j).is_empty());
        // Give the abandoned task a moment to report.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = jobgate_shared::metrics::render(&registry);
        assert!(
            text.contains("jobgate_job_attempts_total{queue=\"q\"} 1"),
            "{text}"
        );
        assert!(!text.contains("jobgate_jobs_total{"), "no outcome: {text}");
        assert!(
            text.contains("jobgate_outcome_publish_failures_total{queue=\"q\"} "),
            "{text}"
        );
    }

    /// Records the attempt number each run of the handler saw.
    #[derive(Default)]
    struct AttemptRecorder {
        seen: std::sync::Mutex<Vec<u32>>,
    }

    #[async_trait]
    impl Handler for AttemptRecorder {
        async fn handle(&self, job: &Job) -> Outcome {
            self.seen.lock().unwrap().push(job.meta.attempt);
            Outcome::Retry {
                reason: "still failing".into(),
                delay: None,
            }
        }
    }

    #[tokio::test]
    async fn deliveries_without_an_outcome_count_as_attempts() {
        let broker = MemoryBroker::new();
        // Attempt 1 on the wire, delivered once before without an outcome: attempt 2.
        let mut j = job("x");
        j.meta.redeliveries = 1;
        broker.enqueue(j.clone());
        let handler = Arc::new(AttemptRecorder::default());
        run_jobs(&broker, handler.clone(), options(1), 1).await;
        assert_eq!(*handler.seen.lock().unwrap(), vec![2]);
        let copies = copies_of(&broker, &j);
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].0, "q.retry.2s", "the second attempt's delay");
        assert_eq!(copies[0].1.attempt, 3);
        assert_eq!(copies[0].1.redeliveries, 0);

        // Two earlier deliveries on attempt 1 with 3 attempts allowed: this is the last.
        let mut last = job("x");
        last.meta.redeliveries = 2;
        broker.enqueue(last.clone());
        run_jobs(&broker, handler.clone(), options(1), 2).await;
        assert_eq!(*handler.seen.lock().unwrap(), vec![2, 3]);
        let copies = copies_of(&broker, &last);
        assert_eq!(copies[0].0, "q.dlq");
        assert_eq!(copies[0].1.headers["x-attempts"], "3");
        assert_eq!(copies[0].1.headers["x-error"], "still failing");
    }

    #[tokio::test]
    async fn a_job_past_its_attempts_by_deliveries_without_an_outcome_is_dead_lettered_unrun() {
        let broker = MemoryBroker::new();
        let mut poison = job("x");
        poison.meta.attempt = 2;
        poison.meta.redeliveries = 2;
        broker.enqueue(poison.clone());
        let handler = Arc::new(AttemptRecorder::default());
        let text = {
            let mut registry = jobgate_shared::metrics::registry();
            let metrics = WorkerMetrics::register(&mut registry);
            let until_settled = {
                let broker = broker.clone();
                async move {
                    while broker.settled().is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            };
            let outcomes: SharedPublisher = Arc::new(broker.clone());
            run_with_source_and_metrics(
                Box::new(broker.clone()),
                outcomes,
                handler.clone(),
                options(1),
                metrics,
                until_settled,
            )
            .await
            .expect("the source runs until shutdown");
            jobgate_shared::metrics::render(&registry)
        };
        assert!(handler.seen.lock().unwrap().is_empty(), "not run again");
        assert_eq!(settled_of(&broker, &poison), vec![Settlement::Acked]);
        let copies = copies_of(&broker, &poison);
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].0, "q.dlq");
        let h = &copies[0].1.headers;
        assert_eq!(h["x-attempts"], "3", "attempts that started");
        assert!(
            h["x-error"].starts_with("delivered 2 times without an outcome (the consumer crashed"),
            "{}",
            h["x-error"]
        );
        assert!(
            h["x-error"].ends_with("3 of 3 attempts used"),
            "{}",
            h["x-error"]
        );
        assert!(
            text.contains("jobgate_jobs_total{queue=\"q\",outcome=\"dead\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("jobgate_job_attempts_total{"),
            "no handler run: {text}"
        );
        assert!(
            text.contains("jobgate_jobs_in_flight{queue=\"q\"} 0"),
            "{text}"
        );
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

    /// A delivery another consumer has taken over (a revoked Kafka partition): counts
    /// whatever the worker does with it.
    struct MovedSettle(Arc<AtomicUsize>);

    #[async_trait]
    impl jobgate_shared::broker::Settle for MovedSettle {
        fn is_current(&self) -> bool {
            false
        }
        async fn started(&self) -> Result<(), jobgate_shared::broker::SettleError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn ack(self: Box<Self>) -> Result<(), jobgate_shared::broker::SettleError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn requeue(self: Box<Self>) -> Result<(), jobgate_shared::broker::SettleError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn reject(self: Box<Self>) -> Result<(), jobgate_shared::broker::SettleError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Delivers a moved delivery, then a current one, then waits for the shutdown.
    struct MovedThenCurrent {
        touched: Arc<AtomicUsize>,
        acked: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl JobSource for MovedThenCurrent {
        async fn run(&mut self, tx: mpsc::Sender<Delivery>, stop: CancellationToken) {
            let moved = Box::new(MovedSettle(Arc::clone(&self.touched)));
            let current = Box::new(CountingSettle(Arc::clone(&self.acked)));
            let _ = tx
                .send(Delivery {
                    job: job("moved"),
                    settle: moved,
                })
                .await;
            let _ = tx
                .send(Delivery {
                    job: job("ok"),
                    settle: current,
                })
                .await;
            stop.cancelled().await;
        }

        fn is_ready(&self) -> bool {
            true
        }

        async fn close(&mut self) {}
    }

    #[tokio::test]
    async fn a_delivery_taken_over_by_another_consumer_is_neither_run_nor_settled() {
        let (touched, acked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let source = MovedThenCurrent {
            touched: Arc::clone(&touched),
            acked: Arc::clone(&acked),
        };
        let handler = Arc::new(AttemptRecorder::default());
        let done = {
            let acked = Arc::clone(&acked);
            async move {
                while acked.load(Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let outcomes: SharedPublisher = Arc::new(MemoryBroker::new());
        let mut opts = options(1);
        opts.retry.max_attempts = 1;
        run_with_source(Box::new(source), outcomes, handler.clone(), opts, done)
            .await
            .expect("the source runs until shutdown");
        // Concurrency 1: the moved delivery was taken first, and dropped.
        assert_eq!(
            *handler.seen.lock().unwrap(),
            [1],
            "only the current job ran"
        );
        assert_eq!(
            touched.load(Ordering::SeqCst),
            0,
            "nothing settled the moved one"
        );
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

    fn with_header(mut j: Job, name: &str, value: &str) -> Job {
        j.meta.headers.insert(name.to_owned(), value.to_owned());
        j
    }

    fn millis_from_now(ms: i64) -> String {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        (i128::try_from(now).unwrap() + i128::from(ms)).to_string()
    }

    #[tokio::test]
    async fn a_scheduled_job_not_due_hops_to_a_tier_unrun_and_one_due_runs() {
        let broker = MemoryBroker::new();
        let later = with_header(job("retry"), "x-not-before", &millis_from_now(3_000));
        let past = with_header(job("ok"), "x-not-before", &millis_from_now(-1_000));
        let junk = with_header(job("ok"), "x-not-before", "next tuesday");
        for j in [&later, &past, &junk] {
            broker.enqueue(j.clone());
        }
        let handler = Arc::new(AttemptRecorder::default());
        let mut registry = jobgate_shared::metrics::registry();
        let metrics = WorkerMetrics::register(&mut registry);
        let until_settled = {
            let broker = broker.clone();
            async move {
                while broker.settled().len() < 3 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let outcomes: SharedPublisher = Arc::new(broker.clone());
        run_with_source_and_metrics(
            Box::new(broker.clone()),
            outcomes,
            handler.clone(),
            options(1),
            metrics,
            until_settled,
        )
        .await
        .expect("the source runs until shutdown");
        // The two that are due ran (and asked for a retry); the other did not.
        assert_eq!(*handler.seen.lock().unwrap(), vec![1, 1]);
        let copies = copies_of(&broker, &later);
        assert_eq!(copies.len(), 1, "{copies:?}");
        // Three seconds left, tiers of 1, 2 and 4 s: the longest that fits.
        assert_eq!(copies[0].0, "q.retry.2s");
        assert_eq!(copies[0].1.attempt, 1, "a hop is no attempt");
        assert!(copies[0].1.headers.contains_key("x-due-at"));
        assert!(!copies[0].1.headers.contains_key("x-last-error"));
        assert_eq!(settled_of(&broker, &later), vec![Settlement::Acked]);
        for ran in [&past, &junk] {
            assert_eq!(copies_of(&broker, ran)[0].0, "q.retry.1s", "its retry");
        }
        let text = jobgate_shared::metrics::render(&registry);
        assert!(
            text.contains("jobgate_jobs_deferred_total{queue=\"q\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("jobgate_job_attempts_total{queue=\"q\"} 2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_job_asking_for_one_attempt_is_dead_lettered_after_its_first_failure() {
        let broker = MemoryBroker::new();
        let once = with_header(job("retry"), "x-max-attempts", "1");
        let junk = with_header(job("retry"), "x-max-attempts", "none");
        broker.enqueue(once.clone());
        broker.enqueue(junk.clone());
        run_jobs(&broker, Arc::new(ScriptedHandler::default()), options(1), 2).await;
        let copies = copies_of(&broker, &once);
        assert_eq!(copies[0].0, "q.dlq");
        assert_eq!(copies[0].1.headers["x-attempts"], "1");
        assert_eq!(
            copies_of(&broker, &junk)[0].0,
            "q.retry.1s",
            "the default (3)"
        );

        // Deliveries without an outcome count against the job's own limit too.
        let mut crashed = with_header(job("retry"), "x-max-attempts", "2");
        crashed.meta.redeliveries = 2;
        broker.enqueue(crashed.clone());
        run_jobs(&broker, Arc::new(ScriptedHandler::default()), options(1), 3).await;
        let copies = copies_of(&broker, &crashed);
        assert_eq!(copies[0].0, "q.dlq");
        assert!(
            copies[0].1.headers["x-error"].ends_with("2 of 2 attempts used"),
            "{}",
            copies[0].1.headers["x-error"]
        );
    }

    #[tokio::test]
    async fn a_job_may_ask_for_a_shorter_or_longer_timeout_than_the_consumer_has() {
        struct Sleeps;
        #[async_trait]
        impl Handler for Sleeps {
            async fn handle(&self, _: &Job) -> Outcome {
                tokio::time::sleep(Duration::from_millis(150)).await;
                Outcome::Done
            }
        }
        let broker = MemoryBroker::new();
        // The consumer's timeout is 300 ms.
        let short = with_header(job("x"), "x-timeout-ms", "20");
        let plain = job("x");
        broker.enqueue(short.clone());
        broker.enqueue(plain.clone());
        run_jobs(&broker, Arc::new(Sleeps), options(2), 2).await;
        let copies = copies_of(&broker, &short);
        assert_eq!(copies.len(), 1);
        assert!(
            copies[0].1.headers["x-last-error"].contains("timed out after 20ms"),
            "{:?}",
            copies[0].1.headers
        );
        assert!(copies_of(&broker, &plain).is_empty(), "done in time");
    }
}
