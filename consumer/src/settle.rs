//! Settling a delivery by its outcome: the one place that decides what becomes of a
//! job after an attempt, for every backend.
//!
//! | outcome                         | what happens                                                 |
//! |---------------------------------|--------------------------------------------------------------|
//! | `Done`                          | ack                                                          |
//! | `Retry`, attempts left          | copy with `x-attempt`+1 to `Q.retry.<tier>` (confirmed), ack |
//! | `Retry`, last attempt, or `Dead`| copy with `x-error`, ... to `Q.dlq` (confirmed), ack         |
//!
//! The copy is confirmed by the broker before the original is acked, so a crash in
//! between gives a duplicate, never a loss. If the copy cannot be published (the
//! broker is away), the publish is tried again a few times; then the original is given
//! back to the broker untouched, to be delivered again.

use std::time::{Duration, SystemTime};

use jobgate_shared::backoff::Backoff;
use jobgate_shared::broker::{dlq_name, Publisher, Settle};
use jobgate_shared::job::{
    Job, JobMeta, HEADER_ATTEMPTS, HEADER_DUE_AT, HEADER_ERROR, HEADER_FAILED_AT,
    HEADER_LAST_ERROR, HEADER_ORIGINAL_QUEUE,
};
use jobgate_shared::retry::{retry_queue_name, RetryPolicy};

use crate::handler::Outcome;

/// Publishing a retry or dead letter is tried this often before giving up.
const PUBLISH_TRIES: usize = 4;
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
    /// The copy could not be published: the original went back to the broker.
    GivenBack,
}

/// Settles `settle` (the delivery of `job`) by `outcome` and says what became of it.
/// Errors are logged: whatever is not settled is delivered again by the broker. A
/// failed ack after a confirmed copy still counts as that outcome: the copy is durable,
/// the redelivery a duplicate.
pub async fn settle(
    outcomes: &dyn Publisher,
    policy: &RetryPolicy,
    job: &Job,
    settle: Box<dyn Settle>,
    outcome: Outcome,
) -> Settled {
    let meta = &job.meta;
    let (job_id, queue, attempt) = (&meta.id, &meta.queue, meta.attempt);
    let (settled, copy) = match &outcome {
        Outcome::Done => (Settled::Done, None),
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
    if let Some((destination, copy)) = copy {
        if let Err(error) = publish_with_retries(outcomes, &destination, &copy, &job.body).await {
            tracing::warn!(%job_id, %queue, %destination, %error, "could not publish the job's outcome; it goes back to the broker");
            if let Err(error) = settle.requeue().await {
                tracing::warn!(%job_id, %queue, %error, "could not give the job back; the broker will redeliver it");
            }
            return Settled::GivenBack;
        }
    }
    match settle.ack().await {
        Ok(()) => tracing::debug!(%job_id, %queue, attempt, ?outcome, "job settled"),
        Err(error) => {
            tracing::warn!(%job_id, %queue, %error, "could not settle; the broker will redeliver the job")
        }
    }
    settled
}

async fn publish_with_retries(
    outcomes: &dyn Publisher,
    destination: &str,
    meta: &JobMeta,
    body: &[u8],
) -> Result<(), jobgate_shared::broker::PublishError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let mut tries = 0;
    loop {
        match outcomes.publish_to(destination, meta, body).await {
            Ok(()) => return Ok(()),
            Err(error) if tries + 1 >= PUBLISH_TRIES => return Err(error),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(backoff.next_delay()).await;
            }
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
    copy.attempt = meta.attempt.saturating_add(1);
    copy.headers.insert(HEADER_LAST_ERROR.into(), short(reason));
    copy.headers
        .insert(HEADER_DUE_AT.into(), epoch_millis(SystemTime::now() + tier));
    copy
}

/// The job as it goes to the dead-letter queue: same id and body, plus why and when.
fn dead_copy(meta: &JobMeta, reason: &str) -> JobMeta {
    let mut copy = meta.clone();
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
