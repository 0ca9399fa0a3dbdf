//! Publisher confirms of one channel, each given to the publish it belongs to.
//!
//! RabbitMQ answers a `mandatory` publish that no queue takes with a `basic.return`
//! (the message, its properties and routing key, but no delivery tag), then with the
//! `basic.ack` that covers it, often a `multiple` ack that confirms a whole batch.
//! lapin 4 keeps the returns in one FIFO and gives the oldest to whichever confirm it
//! completes next, and it completes a batch in hash order: with many publishes in
//! flight an unroutable job's confirm came back as a plain ack (a 202 for a job no
//! queue holds) and a routable job's carried the return (a false 503).
//!
//! So the confirms of a channel are not awaited by their publishers but by one task,
//! [`settle_confirms`], which pairs returns with publishes by what the return says:
//! the message id and the routing key ([`ReturnKey`]). It works because:
//! - RabbitMQ sends a message's return before the ack that covers it, acks a channel's
//!   unroutable messages in publish order, and lapin pops a return at every completed
//!   confirm, so a return is popped at the latest by the completion of its own publish;
//! - lapin completes every confirm of one ack (a `multiple` batch) under one lock. Once
//!   one of them is seen complete, taking that lock ([`barrier`]) waits for the rest,
//!   so every return of the batch is in hand before any publish of it is answered.
//!
//! The task also owns every confirm until the broker answers it or the channel closes:
//! a publish that gave up waiting (its timeout) leaves nothing behind in lapin, where a
//! dropped confirm would be kept until the channel closes (issue 12, item 9).

use std::collections::HashMap;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::message::BasicReturnMessage;
use lapin::{Channel, Confirmation, PublisherConfirm};
use tokio::sync::{mpsc, oneshot};

use crate::broker::PublishError;

/// What ties a `basic.return` to its publish: the message id and the queue it was
/// published to. Two publishes alike in both that are in flight together go to the
/// same queue, so one is routable exactly when the other is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ReturnKey {
    pub message_id: String,
    pub routing_key: String,
}

impl ReturnKey {
    fn of_return(message: &BasicReturnMessage) -> Self {
        Self {
            message_id: message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default(),
            routing_key: message.delivery.routing_key.to_string(),
        }
    }
}

/// A publish that left the process, waiting for the broker's answer.
pub(super) struct Sent {
    pub key: ReturnKey,
    pub confirm: PublisherConfirm,
    /// Where the answer goes; the publisher may have stopped waiting (timed out).
    pub answer: oneshot::Sender<Result<(), PublishError>>,
}

/// The channel of confirms to hand [`Sent`] publishes to, and the task that answers them.
pub(super) fn start(channel: Channel) -> mpsc::UnboundedSender<Sent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(settle_confirms(channel, rx));
    tx
}

/// Waits until lapin has completed every confirm of the ack it is completing now, if
/// any: lapin completes all confirms of one `basic.ack` while holding the lock of the
/// channel's acknowledgements, and `wait_for_confirms` takes that lock as its first
/// step. It is polled once and dropped: only the lock matters, not the wait.
fn barrier(channel: &Channel) {
    drop(channel.wait_for_confirms().now_or_never());
}

/// Answers the publishes of one channel (see the module's documentation). Ends when
/// every sender is gone and every confirm is answered; a closed channel answers all
/// its confirms with an error, so that always comes.
async fn settle_confirms(channel: Channel, mut sent: mpsc::UnboundedReceiver<Sent>) {
    let mut pending = FuturesUnordered::new();
    // Returns whose publish was not answered yet, by key (a count: ids may repeat).
    let mut returned: HashMap<ReturnKey, usize> = HashMap::new();
    let mut open = true;
    loop {
        tokio::select! {
            next = sent.recv(), if open => match next {
                Some(Sent { key, confirm, answer }) => {
                    pending.push(async move { (key, answer, confirm.await) });
                }
                None => open = false,
            },
            Some(first) = pending.next() => {
                barrier(&channel);
                let mut done = vec![first];
                while let Some(Some(more)) = pending.next().now_or_never() {
                    done.push(more);
                }
                for (_, _, confirmation) in &mut done {
                    if let Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message))) = confirmation {
                        *returned.entry(ReturnKey::of_return(message)).or_default() += 1;
                    }
                }
                for (key, answer, confirmation) in done {
                    let outcome = outcome(confirmation, take(&mut returned, &key));
                    if let Err(unheard) = answer.send(outcome) {
                        tracing::debug!(job_id = %key.message_id, queue = %key.routing_key, outcome = ?unheard, "the broker answered a publish after its timeout");
                    }
                }
                if pending.is_empty() && !returned.is_empty() {
                    // Cannot happen by the reasoning above; if it did, it is a lapin or
                    // broker change that this code must learn about.
                    tracing::error!(returns = ?returned.keys().collect::<Vec<_>>(), "RabbitMQ returned messages that no publish here was waiting for");
                    returned.clear();
                }
            }
            else => return,
        }
    }
}

/// Takes one return of `key`, if there is one.
fn take(returned: &mut HashMap<ReturnKey, usize>, key: &ReturnKey) -> bool {
    match returned.get_mut(key) {
        Some(1) => {
            returned.remove(key);
            true
        }
        Some(n) => {
            *n -= 1;
            true
        }
        None => false,
    }
}

/// What the broker's answer means for the job: only an ack without a return of its
/// own is "taken". `was_returned` comes from the pairing, not from lapin's.
fn outcome(
    confirmation: lapin::Result<Confirmation>,
    was_returned: bool,
) -> Result<(), PublishError> {
    match confirmation {
        Ok(Confirmation::Ack(_)) if was_returned => Err(PublishError::Unroutable),
        Ok(Confirmation::Ack(_)) => Ok(()),
        Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked),
        // Only a channel out of confirm mode answers this: nobody confirmed the message,
        // so it must not count as taken.
        Ok(Confirmation::NotRequested) => Err(PublishError::Broker(
            "the channel is not in confirm mode; the message was not confirmed".to_owned(),
        )),
        // The message left the process; the channel closed before its confirm came.
        Err(error) => Err(PublishError::Unconfirmed(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_ack_without_a_return_of_its_own_confirms_a_publish() {
        assert_eq!(outcome(Ok(Confirmation::Ack(None)), false), Ok(()));
        assert_eq!(
            outcome(Ok(Confirmation::Ack(None)), true),
            Err(PublishError::Unroutable)
        );
        assert_eq!(
            outcome(Ok(Confirmation::Nack(None)), false),
            Err(PublishError::Nacked)
        );
        assert!(matches!(
            outcome(Ok(Confirmation::NotRequested), false),
            Err(PublishError::Broker(_))
        ));
    }

    #[test]
    fn returns_are_counted_per_key() {
        let key = |id: &str| ReturnKey {
            message_id: id.into(),
            routing_key: "q".into(),
        };
        let mut returned = HashMap::from([(key("a"), 2)]);
        assert!(take(&mut returned, &key("a")));
        assert!(!take(&mut returned, &key("b")));
        assert!(take(&mut returned, &key("a")));
        assert!(!take(&mut returned, &key("a")));
        assert!(returned.is_empty());
    }
}
