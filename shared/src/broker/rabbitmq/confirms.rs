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
//!   so every return of the batch is in hand before any publish of it is answered;
//! - every publish of the batch is in hand too: a publisher takes a [`Ticket`] (a
//!   number, in order) before it sends, and hands the publish over (or gives the ticket
//!   back) at once. Seeing a confirm complete, the task first waits for every ticket
//!   taken until then. Without that, a return could be popped by the confirm of a
//!   publish whose handover had not arrived yet (the broker answers while the publisher
//!   is between `basic_publish` and its handover), and its own publish, handed over a
//!   moment later, was answered as taken: a 202 for a job no queue held, about once in
//!   4 000 mixed publishes under load.
//!
//! That wait holds up every answer of the channel, so the window between ticket and
//! handover has no await in it: the publisher polls `basic_publish` once (lapin queues
//! the frames in that poll) and hands over the rest of it, the wait for the frames to
//! be written ([`Sending`]). When the publisher awaited the write itself, it had to be
//! scheduled again to hand over, and under load the task waited 1-4 ms for it a few
//! hundred times a run (issue 15: a fifth as many since).
//!
//! The task also owns every publish until the broker answers it or the channel closes:
//! a publish that gave up waiting (its timeout) leaves nothing behind in lapin, where a
//! dropped confirm would be kept until the channel closes (issue 12, item 9).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

/// A publish whose frames are in lapin's queue, waiting for the broker's answer.
pub(super) struct Sent {
    pub key: ReturnKey,
    pub confirm: Sending,
    /// Where the answer goes; the publisher may have stopped waiting (timed out).
    pub answer: oneshot::Sender<Heard>,
}

/// lapin's `basic_publish` after its first poll, which queued the frames: the rest
/// waits for its I/O thread to write them, then yields the confirm.
pub(super) type Writing = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// How far a handed-over publish has got.
pub(super) enum Sending {
    /// Its frames are queued, not yet written.
    Writing(Writing),
    /// Written: only the broker's answer is left.
    Written(PublisherConfirm),
}

/// What the publisher of a handed-over publish hears back.
#[derive(Debug)]
pub(super) enum Heard {
    /// lapin could not write the frames (the channel or connection was closing): the
    /// broker has nothing, so the job can go out on another session.
    NotSent(String),
    /// The broker's answer, or the confirm lost after the message left: final.
    Answered(Result<(), PublishError>),
}

/// What a publisher tells the confirm task about its ticket.
enum Handoff {
    Sent(u64, Sent),
    /// The ticket was given back: nothing was sent, or the publisher gave up.
    Gone(u64),
}

/// The confirm task of one channel, as its publishers see it.
#[derive(Clone)]
pub(super) struct Confirms {
    tickets: Arc<AtomicU64>,
    handoffs: mpsc::UnboundedSender<Handoff>,
}

/// Taken before a publish is sent ([`Confirms::ticket`]); hands its confirm over, or
/// is given back when dropped without.
pub(super) struct Ticket {
    number: u64,
    handoffs: Option<mpsc::UnboundedSender<Handoff>>,
}

impl Confirms {
    /// The ticket of the next publish: take it before `basic_publish`.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            number: self.tickets.fetch_add(1, Ordering::SeqCst) + 1,
            handoffs: Some(self.handoffs.clone()),
        }
    }
}

impl Ticket {
    /// Hands the publish over to the confirm task; false when the task is gone (the
    /// session closed).
    pub fn hand_over(mut self, sent: Sent) -> bool {
        let handoffs = self.handoffs.take();
        handoffs.is_some_and(|h| h.send(Handoff::Sent(self.number, sent)).is_ok())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(handoffs) = self.handoffs.take() {
            let _ = handoffs.send(Handoff::Gone(self.number));
        }
    }
}

/// The channel's confirm task, answering the publishes handed to it.
pub(super) fn start(channel: Channel) -> Confirms {
    let (handoffs, rx) = mpsc::unbounded_channel();
    let tickets = Arc::new(AtomicU64::new(0));
    tokio::spawn(settle_confirms(channel, Arc::clone(&tickets), rx));
    Confirms { tickets, handoffs }
}

/// How long a confirm's answer waits for the publishes sent before it to be handed
/// over; they are normally a few microseconds away.
const HANDOFF_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Which tickets came back (handed over or given back): all up to `through`, and the
/// later ones in `above`.
#[derive(Debug, Default)]
struct Arrivals {
    through: u64,
    above: BTreeSet<u64>,
}

impl Arrivals {
    fn arrived(&mut self, number: u64) {
        self.above.insert(number);
        while self.above.remove(&(self.through + 1)) {
            self.through += 1;
        }
    }
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
async fn settle_confirms(
    channel: Channel,
    tickets: Arc<AtomicU64>,
    mut handoffs: mpsc::UnboundedReceiver<Handoff>,
) {
    let mut pending = FuturesUnordered::new();
    let mut arrivals = Arrivals::default();
    let receive = |handoff: Handoff, arrivals: &mut Arrivals| match handoff {
        Handoff::Sent(
            number,
            Sent {
                key,
                confirm,
                answer,
            },
        ) => {
            arrivals.arrived(number);
            Some(async move {
                let confirmation = match confirm {
                    Sending::Writing(writing) => match writing.await {
                        Ok(confirm) => Ok(confirm.await),
                        Err(unwritten) => Err(unwritten.to_string()),
                    },
                    Sending::Written(confirm) => Ok(confirm.await),
                };
                (key, answer, confirmation)
            })
        }
        Handoff::Gone(number) => {
            arrivals.arrived(number);
            None
        }
    };
    // Returns whose publish was not answered yet, by key (a count: ids may repeat).
    let mut returned: HashMap<ReturnKey, usize> = HashMap::new();
    let mut open = true;
    loop {
        tokio::select! {
            next = handoffs.recv(), if open => match next {
                Some(handoff) => pending.extend(receive(handoff, &mut arrivals)),
                None => open = false,
            },
            Some(first) = pending.next() => {
                // Every publish sent before this answer came is in hand first.
                let taken = tickets.load(Ordering::SeqCst);
                let catch_up = async {
                    while open && arrivals.through < taken {
                        // Those already queued first, without giving up the thread:
                        // `recv` counts against tokio's cooperative budget and, once it
                        // is spent, yields the task to the back of the run queue for a
                        // millisecond or more while every answer of the batch waits.
                        let next = match handoffs.try_recv() {
                            Ok(handoff) => Some(handoff),
                            Err(mpsc::error::TryRecvError::Disconnected) => None,
                            Err(mpsc::error::TryRecvError::Empty) => handoffs.recv().await,
                        };
                        match next {
                            Some(handoff) => pending.extend(receive(handoff, &mut arrivals)),
                            None => open = false,
                        }
                    }
                };
                if tokio::time::timeout(HANDOFF_WAIT, catch_up).await.is_err() {
                    // A publish stuck that long before lapin wrote it (a channel under
                    // flow control, a connection just blocked) was not seen by the
                    // broker, so it has no return in this answer.
                    tracing::warn!(waiting = taken.saturating_sub(arrivals.through), "publishes not handed over within {HANDOFF_WAIT:?}; answering the confirms without them");
                }
                barrier(&channel);
                let mut done = vec![first];
                while let Some(Some(more)) = pending.next().now_or_never() {
                    done.push(more);
                }
                for (_, _, confirmation) in &mut done {
                    if let Ok(Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message)))) = confirmation {
                        *returned.entry(ReturnKey::of_return(message)).or_default() += 1;
                    }
                }
                for (key, answer, confirmation) in done {
                    let heard = match confirmation {
                        Ok(confirmation) => Heard::Answered(outcome(confirmation, take(&mut returned, &key))),
                        Err(unwritten) => Heard::NotSent(unwritten),
                    };
                    if let Err(unheard) = answer.send(heard) {
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

    #[test]
    fn arrivals_count_through_the_first_ticket_missing() {
        let mut arrivals = Arrivals::default();
        for number in [2, 3, 5] {
            arrivals.arrived(number);
        }
        assert_eq!(arrivals.through, 0, "ticket 1 is still out");
        arrivals.arrived(1);
        assert_eq!(arrivals.through, 3);
        arrivals.arrived(4);
        assert_eq!(arrivals.through, 5);
        assert!(arrivals.above.is_empty());
    }
}
