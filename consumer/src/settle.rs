//! Settling a delivery by its outcome: the one place that decides what becomes of a
//! job after an attempt, for every backend.
//!
//! | outcome                         | what happens                                                 |
//! |---------------------------------|--------------------------------------------------------------|
//! | `Done`, `DoneWith`              | ack                                                          |
//! | `Retry`, attempts left          | copy with `x-attempt`+1 to `Q.retry.<tier>` (confirmed), ack |
//! | `Retry`, last attempt, or `Dead`| copy with `x-error`, ... to `Q.dlq` (confirmed), ack         |
//!
//! A job that ends (`Done`, `Dead`) may also have a callback message
//! ([`Settler::on_end`], see [`crate::callback`]): it is published and confirmed, after
//! the dead-letter copy, before the ack, like the copies.
//!
//! The copy is confirmed by the broker before the original is acked, so a crash in
//! between gives a duplicate, never a loss. A copy the broker does not take (it is away,
//! refuses, or does not confirm in time) is published again, with a capped, jittered
//! exponential backoff ([`COPY_BACKOFF_MIN`] to [`COPY_BACKOFF_MAX`]), for as long as it
//! takes: the job keeps its worker slot meanwhile, so a consumer whose copies cannot be
//! published stops taking new jobs instead of churning through them. Only when the
//! worker gives up on its in-flight jobs (the shutdown grace ran out) does the retrying
//! stop, and the delivery is then left unsettled: the broker delivers it again (RabbitMQ
//! when the channel closes; Kafka from the last committed offset). Nothing is ever acked
//! without a durable copy, and nothing is handed back for an immediate redelivery, which
//! on RabbitMQ would loop the job at full speed and on Kafka cannot be done for one
//! record at all (its partition could never commit past it again).

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use jobgate_shared::backoff::Backoff;
use jobgate_shared::broker::{dlq_name, PublishError, Publisher, Settle};
use jobgate_shared::job::{
    Job, JobMeta, HEADER_ATTEMPTS, HEADER_DUE_AT, HEADER_ERROR, HEADER_FAILED_AT,
    HEADER_LAST_ERROR, HEADER_ORIGINAL_QUEUE,
};
use jobgate_shared::retry::{retry_queue_name, RetryPolicy};
use tokio_util::sync::CancellationToken;

use crate::handler::Outcome;

/// First wait before a retry or dead-letter copy is published again; it doubles (with
/// jitter) after every failed try, up to [`COPY_BACKOFF_MAX`].
pub const COPY_BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest wait between two tries of one copy.
pub const COPY_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Reasons travel in headers and logs: keep them short.
const MAX_REASON_CHARS: usize = 500;

/// What [`settle`] made of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Done: acked.
    Done,
    /// The retry copy is in its tier (confirmed); the original acked.
    Retried,
    /// The dead-letter copy is in `Q.dlq` (confirmed); the original acked.
    Dead,
    /// The worker stopped waiting (shutdown) before the copy was confirmed: the
    /// delivery was left unsettled, and the broker delivers the job again.
    Unsettled,
}

/// What settling needs besides the delivery: where copies go, the retry schedule,
/// when to stop trying, and whom to tell about each failed try.
pub struct Settler<'a> {
    /// Publishes retry and dead-letter copies (confirmed).
    pub outcomes: &'a dyn Publisher,
    pub policy: &'a RetryPolicy,
    /// Cancelled when the worker gives up on its in-flight jobs: a copy that is not
    /// confirmed by then is not tried again, and the delivery is left unsettled.
    pub abandon: &'a CancellationToken,
    /// Waits between tries of one copy (see [`Settler::copy_backoff`]).
    pub backoff: Backoff,
    /// Called after every failed try of a copy (the metric counts them).
    pub on_publish_failure: &'a (dyn Fn() + Send + Sync),
    /// Called when the job ends (done, or dead-lettered): a message it returns (the
    /// job's completion callback) is published, confirmed, before the ack.
    pub on_end: Option<&'a OnEnd<'a>>,
}

/// What [`Settler::on_end`] calls: the message (a completion callback) to publish
/// before the ack of a job that ended, if any.
pub type OnEnd<'f> = dyn Fn(&Job, Ending<'_>) -> Option<Message> + Send + Sync + 'f;

/// How a job ended for good, as [`Settler::on_end`] is told.
#[derive(Debug, Clone, Copy)]
pub enum Ending<'a> {
    /// Done, with the handler's result if any.
    Done { result: Option<&'a [u8]> },
    /// Dead-lettered for `reason`.
    Dead { reason: &'a str },
}

/// A message to publish (confirmed) before a delivery is acked.
#[derive(Debug, Clone)]
pub struct Message {
    pub destination: String,
    pub meta: JobMeta,
    pub body: Bytes,
}

impl Settler<'_> {
    /// The waits between tries of one copy: [`COPY_BACKOFF_MIN`] doubling to
    /// [`COPY_BACKOFF_MAX`], each with up to 25 % jitter.
    pub fn copy_backoff() -> Backoff {
        Backoff::new(COPY_BACKOFF_MIN, COPY_BACKOFF_MAX)
    }
}

/// Settles `settle` (the delivery of `job`) by `outcome` and says what became of it.
/// Errors are logged: whatever is not settled is delivered again by the broker. A
/// failed ack after a confirmed copy still counts as that outcome: the copy is durable,
/// the redelivery a duplicate.
pub async fn settle(
    settler: &Settler<'_>,
    job: &Job,
    settle: Box<dyn Settle>,
    outcome: Outcome,
) -> Settled {
    let meta = &job.meta;
    let policy = settler.policy;
    let (job_id, queue, attempt) = (&meta.id, &meta.queue, meta.attempt);
    let (settled, copy) = match &outcome {
        Outcome::Done | Outcome::DoneWith(_) => (Settled::Done, None),
        Outcome::Retry { reason, delay } if policy.may_retry(attempt) => {
            let tier = policy.tier_for(attempt, *delay);
            tracing::warn!(%job_id, %queue, attempt, %reason, retry_in = ?tier, "job failed; it will be retried");
            (
                Settled::Retried,
                Some((
                    retry_queue_name(queue, tier),
                    retry_copy(meta, reason, tier),
                )),
            )
        }
        Outcome::Retry { reason, .. } | Outcome::Dead { reason } => {
            tracing::warn!(%job_id, %queue, attempt, %reason, "job failed for good; dead-lettered");
            (
                Settled::Dead,
                Some((dlq_name(queue), dead_copy(meta, reason))),
            )
        }
    };
    let ending = match (&outcome, settled) {
        (Outcome::DoneWith(result), _) => Some(Ending::Done {
            result: Some(&result[..]),
        }),
        (Outcome::Done, _) => Some(Ending::Done { result: None }),
        (Outcome::Retry { reason, .. } | Outcome::Dead { reason }, Settled::Dead) => {
            Some(Ending::Dead { reason })
        }
        _ => None,
    };
    let mut messages: Vec<Message> = copy
        .map(|(destination, meta)| Message {
            destination,
            meta,
            body: job.body.clone(),
        })
        .into_iter()
        .collect();
    messages.extend(ending.and_then(|ending| settler.on_end.and_then(|f| f(job, ending))));
    if !ack_after(settler, meta, settle, &messages).await {
        return Settled::Unsettled;
    }
    tracing::debug!(%job_id, %queue, attempt, ?outcome, "job settled");
    settled
}

/// Publishes each of `messages` until the broker confirms it, then acks `settle` (the
/// delivery of the job `meta`). False when the worker gave up first (shutdown): the
/// delivery is then left unsettled and the broker delivers the job again. A failed ack
/// after the confirms is logged (the redelivery is a duplicate).
pub async fn ack_after(
    settler: &Settler<'_>,
    meta: &JobMeta,
    settle: Box<dyn Settle>,
    messages: &[Message],
) -> bool {
    let (job_id, queue) = (&meta.id, &meta.queue);
    for Message {
        destination,
        meta: copy,
        body,
    } in messages
    {
        if publish_until_confirmed(settler, destination, copy, body)
            .await
            .is_err()
        {
            tracing::warn!(%job_id, %queue, %destination, "shutting down before the job's outcome could be published; the job is left unsettled and will be delivered again");
            // Dropping the handle settles nothing: RabbitMQ redelivers the job when the
            // channel closes, Kafka replays it from the committed offset.
            drop(settle);
            return false;
        }
    }
    if let Err(error) = settle.ack().await {
        tracing::warn!(%job_id, %queue, %error, "could not settle; the broker will redeliver the job");
    }
    true
}

/// Sends `job`, a scheduled job that is not due yet, through a delay tier again: `hop`
/// goes to its tier (confirmed, tried until it is, like a retry copy), then `settle` is
/// acked. Not an attempt. False when the worker gave up first (shutdown): the delivery
/// is left unsettled and the broker delivers it again.
pub async fn hop(
    settler: &Settler<'_>,
    job: &Job,
    settle: Box<dyn Settle>,
    hop: &crate::schedule::Hop,
) -> bool {
    let (job_id, queue) = (&job.meta.id, &job.meta.queue);
    if publish_until_confirmed(settler, &hop.destination, &hop.copy, &job.body)
        .await
        .is_err()
    {
        tracing::warn!(%job_id, %queue, destination = %hop.destination, "shutting down before a scheduled job's hop was published; it is left unsettled and will be delivered again");
        drop(settle);
        return false;
    }
    if let Err(error) = settle.ack().await {
        tracing::warn!(%job_id, %queue, %error, "could not ack a scheduled job after its hop; the broker will redeliver it (a duplicate)");
    }
    true
}

/// The worker gave up on the job before its copy was confirmed.
#[derive(Debug)]
struct Abandoned;

/// Publishes `meta`/`body` to `destination` until the broker confirms it, waiting
/// `settler.backoff` between tries; `Err` once `settler.abandon` fires while waiting.
/// A try already under way is not cut short (it ends within the publish timeout), so a
/// copy that is confirmed is never followed by a redelivery of the original for nothing.
async fn publish_until_confirmed(
    settler: &Settler<'_>,
    destination: &str,
    meta: &JobMeta,
    body: &[u8],
) -> Result<(), Abandoned> {
    let mut backoff = settler.backoff.clone();
    let mut failures: u64 = 0;
    loop {
        let error = match settler.outcomes.publish_to(destination, meta, body).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(job_id = %meta.id, queue = %meta.queue, %destination, failures, "the job's outcome was published after all");
                }
                return Ok(());
            }
            Err(error) => error,
        };
        failures += 1;
        (settler.on_publish_failure)();
        let wait = backoff.next_delay();
        let (job_id, queue) = (&meta.id, &meta.queue);
        if matches!(error, PublishError::Malformed(_)) {
            // Never expected: what a job source read can be written back. Still no ack
            // without a copy; the log says why the job is stuck.
            tracing::error!(%job_id, %queue, %destination, %error, failures, next_try_in = ?wait, "the job's outcome cannot be put on the wire; trying again");
        } else {
            tracing::warn!(%job_id, %queue, %destination, %error, failures, next_try_in = ?wait, "could not publish the job's outcome; the job keeps its slot and the copy is tried again");
        }
        tokio::select! {
            () = settler.abandon.cancelled() => return Err(Abandoned),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

fn short(reason: &str) -> String {
    reason.chars().take(MAX_REASON_CHARS).collect()
}

fn epoch_millis(at: SystemTime) -> String {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        .to_string()
}

/// The job as it goes to a retry tier: next attempt, why the last one failed, when due.
fn retry_copy(meta: &JobMeta, reason: &str, tier: Duration) -> JobMeta {
    let mut copy = meta.clone();
    // A new message: the broker counts its deliveries afresh.
    copy.redeliveries = 0;
    copy.attempt = meta.attempt.saturating_add(1);
    copy.headers.insert(HEADER_LAST_ERROR.into(), short(reason));
    copy.headers
        .insert(HEADER_DUE_AT.into(), epoch_millis(SystemTime::now() + tier));
    copy
}

/// The job as it goes to the dead-letter queue: same id and body, plus why and when.
fn dead_copy(meta: &JobMeta, reason: &str) -> JobMeta {
    let mut copy = meta.clone();
    copy.redeliveries = 0;
    copy.headers.remove(HEADER_DUE_AT);
    copy.headers.remove(HEADER_LAST_ERROR);
    copy.headers.insert(HEADER_ERROR.into(), short(reason));
    copy.headers
        .insert(HEADER_ATTEMPTS.into(), meta.attempt.to_string());
    copy.headers.insert(
        HEADER_FAILED_AT.into(),
        humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
    );
    copy.headers
        .insert(HEADER_ORIGINAL_QUEUE.into(), meta.queue.clone());
    copy
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;
    use jobgate_shared::broker::memory::{MemoryBroker, Settlement};
    use jobgate_shared::broker::{Delivery, JobSource};
    use tokio::sync::mpsc;

    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            base: Duration::from_secs(1),
            max: Duration::from_secs(4),
        }
    }

    /// One delivery of a fresh job from `broker`, as a worker receives it.
    async fn delivery(broker: &MemoryBroker) -> Delivery {
        broker.enqueue(Job {
            meta: JobMeta::new("q", None),
            body: Bytes::from_static(b"body"),
        });
        let (tx, mut rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let mut source = broker.clone();
        let running = tokio::spawn({
            let stop = stop.clone();
            async move { source.run(tx, stop).await }
        });
        let delivery = rx.recv().await.expect("the job is delivered");
        stop.cancel();
        running.await.unwrap();
        delivery
    }

    /// Settles `outcome` for a delivery of `broker` with quick backoff; returns what
    /// `settle` said and how many failed tries it reported.
    async fn settle_with(
        broker: &MemoryBroker,
        outcome: Outcome,
        abandon: &CancellationToken,
    ) -> (Settled, Job, usize) {
        let Delivery {
            job,
            settle: handle,
        } = delivery(broker).await;
        let failures = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&failures);
        let count = move || {
            counted.fetch_add(1, Ordering::SeqCst);
        };
        let policy = policy();
        let settler = Settler {
            outcomes: broker,
            policy: &policy,
            abandon,
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(4)),
            on_publish_failure: &count,
            on_end: None,
        };
        let settled = settle(&settler, &job, handle, outcome).await;
        (settled, job, failures.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_copy_that_fails_is_tried_until_confirmed_then_the_job_is_acked_once() {
        let broker = MemoryBroker::new();
        broker.fail_publishes(5, PublishError::Unavailable);
        let dead = Outcome::Dead {
            reason: "bad input".into(),
        };
        let (settled, job, failures) = settle_with(&broker, dead, &CancellationToken::new()).await;
        assert_eq!(settled, Settled::Dead);
        assert_eq!(failures, 5, "every failed try is reported");
        assert_eq!(
            broker.settled(),
            vec![(job.meta.id.clone(), Settlement::Acked)],
            "acked once, never requeued"
        );
        let copies = broker.published_to();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].0, "q.dlq");
        assert_eq!(copies[0].1.meta.id, job.meta.id);
    }

    #[tokio::test]
    async fn an_ending_job_publishes_its_callback_after_its_copy_and_before_its_ack() {
        let broker = MemoryBroker::new();
        let callback = |job: &Job, ending: Ending<'_>| {
            let what = match ending {
                Ending::Done { result } => format!("done {result:?}"),
                Ending::Dead { reason } => format!("dead {reason}"),
            };
            Some(Message {
                destination: "q.callbacks".into(),
                meta: job.meta.clone(),
                body: Bytes::from(what),
            })
        };
        let policy = policy();
        let abandon = CancellationToken::new();
        let settler = Settler {
            outcomes: &broker,
            policy: &policy,
            abandon: &abandon,
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(4)),
            on_publish_failure: &|| {},
            on_end: Some(&callback),
        };
        let cases = [
            (
                Outcome::Dead {
                    reason: "bad".into(),
                },
                Settled::Dead,
                vec!["q.dlq", "q.callbacks"],
                "dead bad",
            ),
            (
                Outcome::DoneWith(Bytes::from_static(b"r")),
                Settled::Done,
                vec!["q.callbacks"],
                "done Some([114])",
            ),
            (
                Outcome::Retry {
                    reason: "busy".into(),
                    delay: None,
                },
                Settled::Retried,
                vec!["q.retry.1s"],
                "",
            ),
        ];
        for (outcome, expected, destinations, body) in cases {
            let before = broker.published_to().len();
            let Delivery {
                job,
                settle: handle,
            } = delivery(&broker).await;
            assert_eq!(settle(&settler, &job, handle, outcome).await, expected);
            let published = broker.published_to();
            let mine = &published[before..];
            let to: Vec<&str> = mine.iter().map(|(to, _)| to.as_str()).collect();
            assert_eq!(to, destinations);
            if !body.is_empty() {
                assert_eq!(&mine.last().unwrap().1.body[..], body.as_bytes());
            }
            assert!(broker
                .settled()
                .contains(&(job.meta.id.clone(), Settlement::Acked)));
        }
    }

    #[tokio::test]
    async fn a_retry_copy_is_tried_until_confirmed_too() {
        let broker = MemoryBroker::new();
        broker.fail_publishes(2, PublishError::Timeout(Duration::from_secs(5)));
        let retry = Outcome::Retry {
            reason: "busy".into(),
            delay: None,
        };
        let (settled, job, failures) = settle_with(&broker, retry, &CancellationToken::new()).await;
        assert_eq!((settled, failures), (Settled::Retried, 2));
        assert_eq!(broker.settled(), vec![(job.meta.id, Settlement::Acked)]);
        assert_eq!(broker.published_to()[0].0, "q.retry.1s");
    }

    #[tokio::test]
    async fn shutdown_while_the_copy_fails_leaves_the_delivery_unsettled() {
        let broker = MemoryBroker::new();
        broker.fail_publishes(usize::MAX, PublishError::Unavailable);
        let abandon = CancellationToken::new();
        let stopper = {
            let abandon = abandon.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                abandon.cancel();
            })
        };
        let dead = Outcome::Dead {
            reason: "bad input".into(),
        };
        let (settled, _job, failures) = settle_with(&broker, dead, &abandon).await;
        stopper.await.unwrap();
        assert_eq!(settled, Settled::Unsettled);
        assert!(failures >= 2, "it kept trying until the stop: {failures}");
        assert!(
            broker.settled().is_empty(),
            "neither acked nor requeued: {:?}",
            broker.settled()
        );
        assert!(broker.published_to().is_empty());
    }
}
