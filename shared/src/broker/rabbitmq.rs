//! RabbitMQ backend (AMQP 0-9-1 through `lapin`).
//!
//! Delivery guarantee, in plain words:
//! - Ingress: a job is published persistent (`delivery_mode` 2) and `mandatory` on a
//!   channel in confirm mode into a durable quorum queue. `publish` returns `Ok` only
//!   when RabbitMQ acked it; a nack, an unroutable return, a lost connection or no
//!   confirm within the publish timeout is an error, never a silent success.
//! - Workers: deliveries are acked only after the worker's outcome is durable. A crash
//!   or a lost connection before the ack makes RabbitMQ redeliver: at least once.
//!
//! Both sides run a supervisor task that connects, declares the topology, serves, and
//! on any connection or channel failure reconnects with backoff. Readiness is true only
//! while a session is up (and, for publishers, the broker is not blocking us).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, DefaultConnectionBuilder, Event};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{
    dlq_name, Delivery, JobSource, PublishError, Publisher, Settle, SettleError, SourceStatus,
};
use crate::backoff::Backoff;
use crate::job::{self, Job, JobMeta};
use crate::retry::retry_queue_name;

mod confirms;
mod nodes;
mod tls;

pub use nodes::NodeCursor;
pub use tls::{AmqpEndpoint, AmqpTls, ManagementDefaults};

/// AMQP heartbeat interval in seconds when the URL does not set one (see [`connect`]).
pub const DEFAULT_HEARTBEAT_SECS: u16 = 5;
/// How long a settle (ack/nack) or a declare may take before we give up on it.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the supervisor checks the health of a session besides listening to events.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// A publisher connection that lived this long was healthy: when it is lost, the next
/// one is opened at once and the reconnect backoff starts over.
const STABLE_SESSION: Duration = Duration::from_secs(5);
/// How long a retired publishing connection stays open for the confirms still in
/// flight on it (at most the publish timeout, which bounds every publish begun on it).
const RETIRED_DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How often a publisher connection sends its alarm probe (see [`probe_for_alarm`]).
const ALARM_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Routing key of the alarm probe: `amq.` queue names are reserved, so no queue can
/// have it and the broker drops the message (it is not `mandatory`).
const ALARM_PROBE_KEY: &str = "amq.jobgate.alarm-probe";

/// `x-delivery-limit` of `Q.dlq`: how often a dead job may be handed out and come back
/// before RabbitMQ drops it. RabbitMQ 4.0 and later give a quorum queue a limit of 20
/// when it has none, and every `consumer dlq list` hands each listed job out once: a
/// dead job would vanish after some twenty listings. This is as good as no limit on
/// every version. Not -1, RabbitMQ 4's "no limit": RabbitMQ 3.10 takes -1 as a limit
/// every return exceeds and drops the message at its first return (checked on 3.10.8).
pub const DLQ_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// Declares, idempotently, the queues of job queue `queue`, on a channel of its own
/// (closed again), so a refused declare never closes a channel that publishes or
/// consumes:
/// - `queue.dlq`: durable quorum queue that keeps dead jobs until an operator acts, with
///   the delivery limit [`DLQ_DELIVERY_LIMIT`] (see [`declare_dead_letter_queue`] for
///   one declared before jobgate set it);
/// - `queue`: durable quorum queue whose rejected messages go to `queue.dlq`;
/// - `queue.retry.<tier>` for each of `retry_tiers`: durable quorum queues whose
///   messages expire after the tier's delay and are dead-lettered back to `queue`
///   (at-least-once dead-lettering, so an expiring retry is never dropped).
///
/// Both binaries call this at every (re)connect; the producer passes no tiers (the
/// retry schedule is the consumer's). The arguments must never change for an existing
/// queue (RabbitMQ refuses a redeclare with other arguments), so they live here only.
/// Each declare is bounded by [`OPERATION_TIMEOUT`]; a name AMQP cannot carry is an
/// error (queue names are validated long before, so that is a bug, not a panic).
pub async fn declare_topology(
    conn: &Connection,
    queue: &str,
    retry_tiers: &[Duration],
) -> Result<(), String> {
    let channel = bounded("channel.open", conn.create_channel()).await?;
    let (channel, declared) = match declare_dead_letter_queue(conn, channel, queue).await {
        Ok(channel) => {
            let rest = declare_queue_and_tiers(&channel, queue, retry_tiers).await;
            (Some(channel), rest)
        }
        Err(error) => (None, Err(error)),
    };
    if let Some(channel) = channel {
        let close = channel.close(200, ShortString::from("declared"));
        let _ = tokio::time::timeout(OPERATION_TIMEOUT, close).await;
    }
    declared
}

/// The arguments every jobgate queue has.
fn quorum_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn queue_name(queue: &str) -> Result<ShortString, String> {
    job::amqp::short("the queue name", queue).map_err(|e| e.to_string())
}

/// Declares `queue.dlq` with [`DLQ_DELIVERY_LIMIT`] on `channel`; returns the channel to
/// go on with. A `Q.dlq` declared by an earlier jobgate has no delivery limit argument,
/// and RabbitMQ refuses to redeclare it with one (closing the channel): it is then
/// declared again as it is, on a new channel, with a warning that on RabbitMQ 4 the
/// broker's default limit applies to it, so existing deployments keep starting.
pub async fn declare_dead_letter_queue(
    conn: &Connection,
    channel: Channel,
    queue: &str,
) -> Result<Channel, String> {
    let dlq = dlq_name(queue);
    let mut args = quorum_arguments();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DLQ_DELIVERY_LIMIT),
    );
    let declare = channel.queue_declare(queue_name(&dlq)?, durable(), args);
    match tokio::time::timeout(OPERATION_TIMEOUT, declare).await {
        Ok(Ok(_)) => return Ok(channel),
        Ok(Err(error)) if declared_without_delivery_limit(&error) => {}
        Ok(Err(error)) => return Err(format!("queue.declare {dlq}: {error}")),
        Err(_) => {
            return Err(format!(
                "queue.declare {dlq}: no answer within {OPERATION_TIMEOUT:?}"
            ))
        }
    }
    tracing::warn!(
        queue = %dlq,
        "the dead-letter queue was declared by an earlier jobgate without a delivery limit; \
         on RabbitMQ 4.0 and later the broker's default (20) applies to it and a dead job \
         handed out that often (each `consumer dlq list` counts) is dropped: set a policy \
         with `delivery-limit` {DLQ_DELIVERY_LIMIT} on it, or delete the empty queue and \
         let jobgate declare it again"
    );
    let channel = bounded("channel.open", conn.create_channel()).await?;
    bounded(
        "queue.declare",
        channel.queue_declare(queue_name(&dlq)?, durable(), quorum_arguments()),
    )
    .await?;
    Ok(channel)
}

/// RabbitMQ's answer to a declare whose `x-delivery-limit` differs from the existing
/// queue's (which has none).
fn declared_without_delivery_limit(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => {
            *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                && e.get_message().as_str().contains("x-delivery-limit")
        }
        _ => false,
    }
}

/// Declares `queue` and its retry tiers (see [`declare_topology`]).
async fn declare_queue_and_tiers(
    channel: &Channel,
    queue: &str,
    retry_tiers: &[Duration],
) -> Result<(), String> {
    let declare = |q: ShortString, args: FieldTable| {
        bounded("queue.declare", channel.queue_declare(q, durable(), args))
    };
    let text = |v: &str| AMQPValue::LongString(v.into());
    let dlq = dlq_name(queue);
    let mut args = quorum_arguments();
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(&dlq));
    declare(queue_name(queue)?, args).await?;

    for tier in retry_tiers {
        let ttl = i64::try_from(tier.as_millis()).unwrap_or(i64::MAX);
        let mut args = quorum_arguments();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert("x-dead-letter-routing-key".into(), text(queue));
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
        declare(queue_name(&retry_queue_name(queue, *tier))?, args).await?;
    }
    Ok(())
}

/// Connects to a node of `endpoint` with a client-visible connection name (shown in the
/// management UI), at most `timeout` per node. An `amqps://` URL connects over TLS with
/// the endpoint's files (read now, so a rotated certificate is used from the next
/// connection).
///
/// With several nodes this is one attempt round: each node once, in the order of
/// `cursor` (see [`NodeCursor`]: spread over the nodes, failover to the next), until one
/// answers; the cursor then moves past that node. The node connected to is logged
/// (`node`, password masked), as are the nodes that did not answer before it; when none
/// does, the error names each node and its reason. The caller waits out its backoff
/// before the next round.
///
/// The AMQP heartbeat is [`DEFAULT_HEARTBEAT_SECS`] unless the URL's query says
/// otherwise (`?heartbeat=N`, as in RabbitMQ's URI spec). Without it a broker that stops
/// answering but keeps the socket open (frozen, a half-open connection) would look alive
/// until RabbitMQ's own proposal (60 s) ran out twice: lapin closes the connection after
/// two heartbeat intervals without a frame, readiness turns false, and the supervisor
/// reconnects.
pub async fn connect(
    endpoint: &AmqpEndpoint,
    name: &str,
    timeout: Duration,
    cursor: &mut NodeCursor,
) -> Result<Connection, String> {
    let nodes = endpoint.parsed_nodes()?;
    let tls = if endpoint.is_tls() {
        Some(endpoint.tls_config()?)
    } else {
        endpoint.check_tls_files()?;
        None
    };
    let mut failed = Vec::new();
    for i in cursor.round(nodes.len()) {
        let node = &nodes[i];
        match connect_node(node, name, timeout, tls.clone()).await {
            Ok(conn) => {
                cursor.connected_to(i);
                if !failed.is_empty() {
                    let failed = failed.join("; ");
                    tracing::warn!(node = %node.url, %failed, "RabbitMQ nodes did not answer; connected to the next");
                }
                tracing::info!(node = %node.url, connection = name, "connected to RabbitMQ");
                return Ok(conn);
            }
            // One node: its error as it is, as before lists existed.
            Err(error) if nodes.len() == 1 => return Err(error),
            Err(error) => failed.push(format!("{}: {error}", node.url)),
        }
    }
    Err(format!("no RabbitMQ node answered ({})", failed.join("; ")))
}

/// One connection attempt to one node.
async fn connect_node(
    node: &tls::AmqpNode,
    name: &str,
    timeout: Duration,
    tls: Option<lapin::tcp::OwnedTLSConfig>,
) -> Result<Connection, String> {
    let mut uri = node.uri.clone();
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let builder = DefaultConnectionBuilder::new()
        .map_err(|e| e.to_string())?
        .with_uri(uri)
        .with_properties(props);
    let builder = match tls {
        Some(tls) => builder.with_tls_config(tls),
        None => builder,
    };
    match tokio::time::timeout(timeout, builder.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
}

/// A name for connections that tells operators which process holds them.
pub fn connection_name(role: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!("jobgate-{role}@{host}:{}", std::process::id())
}

/// The consumer tag of this process's subscription to `queue` (shown in the management
/// UI). It holds `HOSTNAME`, which can be long: a tag over AMQP's 255 bytes is left
/// empty, and the broker then makes one up.
fn consumer_tag(queue: &str) -> ShortString {
    ShortString::try_new(format!("{}-{queue}", connection_name("consumer"))).unwrap_or_default()
}

/// Runs `op` with [`OPERATION_TIMEOUT`], flattening the timeout into a string error.
async fn bounded<T>(
    what: &str,
    op: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(OPERATION_TIMEOUT, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {OPERATION_TIMEOUT:?}")),
    }
}

/// RabbitMQ blocks a connection under a resource alarm (and sends `connection.blocked`)
/// only when the connection next publishes. So that readiness turns false before a job
/// runs into the alarm, a publisher connection publishes an empty, unroutable message
/// every [`ALARM_PROBE_INTERVAL`] while it is not blocked. It runs on its own task: a
/// blocked connection may hold the frame back, and the watcher must not wait on it.
///
/// `channel` must NOT be in confirm mode: lapin keeps a pending confirm for every
/// publish on a confirm channel until the broker answers or the channel closes, and a
/// probe nobody awaits would add 86,400 of them a day to a long-lived connection.
fn probe_for_alarm(channel: &Channel) {
    let channel = channel.clone();
    tokio::spawn(async move {
        let publish = channel.basic_publish(
            ShortString::default(),
            ShortString::from(ALARM_PROBE_KEY),
            BasicPublishOptions::default(),
            &[],
            lapin::BasicProperties::default(),
        );
        // A channel without confirms: nothing comes back, nothing is kept.
        let _ = tokio::time::timeout(ALARM_PROBE_INTERVAL, publish).await;
    });
}

/// Watches a connection until it fails (or `cancel` fires) and keeps `blocked` up to
/// date with RabbitMQ's `connection.blocked` / `connection.unblocked` notifications.
/// With `probe`, sends the alarm probe on that channel (publishers only).
async fn watch_connection(
    conn: &Connection,
    channels: &[Channel],
    probe: Option<&Channel>,
    blocked: &AtomicBool,
    cancel: &CancellationToken,
) {
    let mut events = conn.events_listener();
    let mut tick = tokio::time::interval(HEALTH_CHECK_INTERVAL);
    let mut probe_tick = tokio::time::interval(ALARM_PROBE_INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            event = events.next() => match event {
                Some(Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(%reason, "RabbitMQ blocks publishers (resource alarm)");
                    blocked.store(true, Ordering::SeqCst);
                }
                Some(Event::ConnectionUnblocked) => {
                    tracing::info!("RabbitMQ unblocked publishers");
                    blocked.store(false, Ordering::SeqCst);
                }
                Some(Event::Error(error)) => {
                    tracing::warn!(%error, "RabbitMQ connection failed");
                    return;
                }
                Some(_) => {}
                None => return,
            },
            _ = tick.tick() => {
                if !conn.status().connected() || channels.iter().any(|c| !c.status().connected()) {
                    tracing::warn!("RabbitMQ connection or channel closed");
                    return;
                }
            }
            _ = probe_tick.tick(), if probe.is_some() => {
                if let Some(channel) = probe {
                    if !blocked.load(Ordering::SeqCst) {
                        probe_for_alarm(channel);
                    }
                }
            }
        }
    }
}

/// Closes a connection politely, without waiting long for a broker that is gone.
async fn close_connection(conn: &Connection, why: &str) {
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        conn.close(200, ShortString::from(why)),
    )
    .await;
}

// ---------------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------------

/// The moment `timeout` from now. A timeout too long for the clock (the setting is any
/// number of milliseconds) waits 30 years instead of panicking on every publish.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

/// Options of the RabbitMQ publisher.
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    pub endpoint: AmqpEndpoint,
    /// Job queues whose topology is declared at every connect.
    pub queues: Vec<String>,
    pub connect_timeout: Duration,
    /// How long `publish` waits for the confirm, reconnects included.
    pub publish_timeout: Duration,
    /// Confirm channels; publishes are spread over them round-robin.
    pub channels: usize,
    /// Retry tiers to declare (empty for the producer).
    pub retry_tiers: Vec<Duration>,
}

/// A channel in confirm mode and the task that answers its confirms.
struct ConfirmChannel {
    channel: Channel,
    confirms: confirms::Confirms,
}

/// One live connection with its channels.
struct PublishSession {
    conn: Connection,
    /// Channels in confirm mode for jobs; [`PublishSession::channel`] picks among them.
    channels: Vec<ConfirmChannel>,
    /// The alarm probe's channel, without confirms (see [`probe_for_alarm`]).
    probe: Channel,
    next: AtomicUsize,
    blocked: AtomicBool,
    /// Fired when a publish found its queue missing (see [`PublishPath::retire`]); a
    /// child of the path's `cancel`.
    retired: CancellationToken,
}

impl PublishSession {
    /// Round-robin: confirms of many requests are in flight together on each channel;
    /// no channel per request and no lock held across a confirm.
    fn channel(&self) -> &ConfirmChannel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        &self.channels[i]
    }

    /// Every channel of the session, for the connection watcher.
    fn all_channels(&self) -> Vec<Channel> {
        let confirm = self.channels.iter().map(|c| c.channel.clone());
        confirm.chain([self.probe.clone()]).collect()
    }
}

/// Why a publish attempt on one session did not end in an answer of the broker.
enum Attempt {
    /// The broker answered (or the confirm was lost after the message left): final.
    Answered(Result<(), PublishError>),
    /// The message never left the process (the channel or connection was closing):
    /// it can go out on the next session.
    NotSent(String),
}

/// The publishing path of one job queue: its own connection and channels, kept up by
/// its own supervisor (see [`RabbitPublisher`]).
struct PublishPath {
    options: PublisherOptions,
    /// The live session, `None` while (re)connecting.
    session: watch::Sender<Option<Arc<PublishSession>>>,
    /// Since when there has been no session (`None` while connected). A publish waits
    /// for the next session only within a publish timeout of the loss; after that the
    /// broker counts as away and publishes fail at once.
    down_since: Mutex<Option<Instant>>,
    cancel: CancellationToken,
}

impl PublishPath {
    /// Starts the path of `options.queues` (one queue). It connects in the background:
    /// until the broker answers, `is_ready` is false and `publish` waits for it, at most
    /// the publish timeout.
    fn start(options: PublisherOptions) -> Arc<Self> {
        let publisher = Arc::new(Self {
            options,
            session: watch::Sender::new(None),
            down_since: Mutex::new(Some(Instant::now())),
            cancel: CancellationToken::new(),
        });
        tokio::spawn(Arc::clone(&publisher).supervise());
        publisher
    }

    fn current(&self) -> Option<Arc<PublishSession>> {
        self.session.borrow().clone()
    }

    fn set_current(&self, session: Option<Arc<PublishSession>>) {
        let mut down_since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        *down_since = match (&session, *down_since) {
            (Some(_), _) => None,
            (None, Some(since)) => Some(since),
            (None, None) => Some(Instant::now()),
        };
        self.session.send_replace(session);
    }

    /// No session until the supervisor opens the next one, if `session` is still the
    /// current one: it may have been replaced already, and the new one stays.
    fn clear_if_current(&self, session: &Arc<PublishSession>) {
        // The lock `set_current` takes, held over the compare and the clear.
        let mut down_since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        let cleared = self.session.send_if_modified(|current| {
            let is_it = current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session));
            if is_it {
                *current = None;
            }
            is_it
        });
        if cleared && down_since.is_none() {
            *down_since = Some(Instant::now());
        }
    }

    /// True when the broker has been away for longer than a publish timeout.
    fn away_for_long(&self) -> bool {
        let down_since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        down_since.is_some_and(|since| since.elapsed() >= self.options.publish_timeout)
    }

    /// The live session other than `not`, waiting for the supervisor to open one while
    /// the broker has not been away for long; `None` when it has, or when closed.
    async fn session_other_than(
        &self,
        not: Option<&Arc<PublishSession>>,
    ) -> Option<Arc<PublishSession>> {
        let mut sessions = self.session.subscribe();
        loop {
            let usable = {
                let current = sessions.borrow_and_update();
                current
                    .as_ref()
                    .filter(|s| not.is_none_or(|n| !Arc::ptr_eq(s, n)))
                    .cloned()
            };
            if usable.is_some() {
                return usable;
            }
            if self.cancel.is_cancelled() || self.away_for_long() {
                return None;
            }
            // Wake up on a new session, and now and then to notice "away for long".
            let tick = tokio::time::sleep(HEALTH_CHECK_INTERVAL);
            tokio::select! {
                changed = sessions.changed() => if changed.is_err() { return None },
                () = tick => {}
            }
        }
    }

    async fn open_session(&self, cursor: &mut NodeCursor) -> Result<PublishSession, String> {
        let o = &self.options;
        let name = format!("{} {}", connection_name("producer"), o.queues.join(","));
        let conn = connect(&o.endpoint, &name, o.connect_timeout, cursor).await?;
        let setup = async {
            let mut channels = Vec::with_capacity(o.channels.max(1));
            for _ in 0..o.channels.max(1) {
                let channel = bounded("channel.open", conn.create_channel()).await?;
                bounded(
                    "confirm.select",
                    channel.confirm_select(ConfirmSelectOptions::default()),
                )
                .await?;
                channels.push(channel);
            }
            for queue in &o.queues {
                declare_topology(&conn, queue, &o.retry_tiers).await?;
            }
            let probe = bounded("channel.open", conn.create_channel()).await?;
            Ok::<_, String>((channels, probe))
        };
        match setup.await {
            Ok((channels, probe)) => Ok(PublishSession {
                conn,
                channels: channels
                    .into_iter()
                    .map(|channel| ConfirmChannel {
                        confirms: confirms::start(channel.clone()),
                        channel,
                    })
                    .collect(),
                probe,
                next: AtomicUsize::new(0),
                blocked: AtomicBool::new(false),
                retired: self.cancel.child_token(),
            }),
            Err(e) => {
                close_connection(&conn, "setup failed").await;
                Err(e)
            }
        }
    }

    async fn supervise(self: Arc<Self>) {
        let mut backoff = Backoff::for_reconnect();
        let mut cursor = NodeCursor::next_in_process();
        while !self.cancel.is_cancelled() {
            match self.open_session(&mut cursor).await {
                Ok(session) => {
                    let opened = Instant::now();
                    let session = Arc::new(session);
                    self.set_current(Some(Arc::clone(&session)));
                    tracing::info!(url = %self.options.endpoint, "publisher connected to RabbitMQ; topology declared");
                    watch_connection(
                        &session.conn,
                        &session.all_channels(),
                        Some(&session.probe),
                        &session.blocked,
                        &session.retired,
                    )
                    .await;
                    self.set_current(None);
                    if self.cancel.is_cancelled() {
                        close_connection(&session.conn, "producer shutting down").await;
                        break;
                    }
                    if session.retired.is_cancelled() {
                        self.drain_then_close(session);
                    } else {
                        close_connection(&session.conn, "reconnecting").await;
                    }
                    // A connection lost after a good while is usually back at once (a
                    // broker-side error closed it, or a node restarted): try again
                    // without waiting. One that keeps dying young backs off.
                    if opened.elapsed() >= STABLE_SESSION {
                        backoff.reset();
                        continue;
                    }
                }
                Err(error) => {
                    tracing::warn!(url = %self.options.endpoint, %error, "cannot connect to RabbitMQ");
                }
            }
            tokio::select! {
                () = self.cancel.cancelled() => break,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        self.set_current(None);
    }

    /// Publishes once on `session`: sends the message, then waits for the answer of the
    /// channel's confirm task.
    async fn publish_on(
        session: &PublishSession,
        destination: &str,
        meta: &JobMeta,
        body: &[u8],
    ) -> Attempt {
        let malformed = |e: job::WireError| PublishError::Malformed(e.to_string());
        let wire = job::amqp::properties(meta).and_then(|properties| {
            let routing_key = job::amqp::short("the queue name", destination)?;
            Ok((properties, routing_key))
        });
        let (properties, routing_key) = match wire {
            Ok(wire) => wire,
            Err(e) => return Attempt::Answered(Err(malformed(e))),
        };
        let target = session.channel();
        let key = confirms::ReturnKey {
            message_id: meta.id.clone(),
            routing_key: routing_key.to_string(),
        };
        let channel = target.channel.clone();
        // Owned, as the rest of the publish goes on in the confirm task. lapin copies
        // the body into its frames at the first poll; this copy lives until they are
        // written.
        let body = Bytes::copy_from_slice(body);
        let mut writing: confirms::Writing = Box::pin(async move {
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            channel
                .basic_publish(
                    ShortString::default(),
                    routing_key,
                    options,
                    &body,
                    properties,
                )
                .await
        });
        let (answer, answered) = oneshot::channel();
        // Taken just before the frames are queued, handed over right after, with no
        // await between: the confirm task waits for every ticket taken before it
        // answers (see `confirms`), so a publisher that had to be scheduled again to
        // hand over would hold up the answers of every other publish on the channel.
        let ticket = target.confirms.ticket();
        // The first poll queues the frames for lapin's I/O thread; it does not yield.
        let confirm = match futures::poll!(writing.as_mut()) {
            std::task::Poll::Pending => confirms::Sending::Writing(writing),
            std::task::Poll::Ready(Ok(confirm)) => confirms::Sending::Written(confirm),
            // lapin did not queue the frames: the broker has nothing.
            std::task::Poll::Ready(Err(e)) => return Attempt::NotSent(e.to_string()),
        };
        let handed = ticket.hand_over(confirms::Sent {
            key,
            confirm,
            answer,
        });
        if !handed {
            // The confirm task is gone only once the session is: the message went out
            // on a connection that no longer exists.
            return Attempt::Answered(Err(PublishError::Unconfirmed(
                "the connection closed before the broker confirmed the message".into(),
            )));
        }
        match answered.await {
            Ok(confirms::Heard::Answered(answer)) => Attempt::Answered(answer),
            Ok(confirms::Heard::NotSent(error)) => Attempt::NotSent(error),
            Err(_) => Attempt::Answered(Err(PublishError::Unconfirmed(
                "the confirm was dropped before the broker answered".into(),
            ))),
        }
    }

    /// Publishes, going on to the next session when the message could not be sent on
    /// this one: a job that never left the process is not failed for a connection that
    /// another queue's error closed, or that is being replaced.
    async fn publish_until_answered(
        &self,
        destination: &str,
        meta: &JobMeta,
        body: &[u8],
        deadline: Instant,
    ) -> Result<(), PublishError> {
        let mut tried: Option<Arc<PublishSession>> = None;
        loop {
            // Nothing was sent while waiting for a session: "unavailable", not "timeout".
            let next =
                tokio::time::timeout_at(deadline.into(), self.session_other_than(tried.as_ref()));
            let Ok(Some(session)) = next.await else {
                return Err(PublishError::Unavailable);
            };
            // Under a resource alarm the broker stops reading from the connection: a
            // publish would wait out the timeout, and the broker could still take the
            // message after the client was told 503. Refuse it at once instead.
            if session.blocked.load(Ordering::SeqCst) {
                return Err(PublishError::Unavailable);
            }
            let attempt = Self::publish_on(&session, destination, meta, body);
            let Ok(attempt) = tokio::time::timeout_at(deadline.into(), attempt).await else {
                return Err(PublishError::Timeout(self.options.publish_timeout));
            };
            match attempt {
                Attempt::Answered(answer) => {
                    if answer == Err(PublishError::Unroutable) {
                        self.retire(&session, &meta.queue);
                    }
                    return answer;
                }
                Attempt::NotSent(error) => {
                    tracing::debug!(job_id = %meta.id, %error, "publish not sent; trying the next connection");
                    tried = Some(session);
                }
            }
        }
    }

    /// The queue was deleted behind our back (by an operator, say). This request gets
    /// its 503; the next ones go out on a new connection, which declares the topology
    /// again before it is used. Not the old one: RabbitMQ 3.10 nacked a publish on it to
    /// the queue declared again (under load: a false 503 after the queue was back), and
    /// may close it whole (541). Its channels keep RabbitMQ's state for the deleted
    /// quorum queue, and a queue declared in the background is routable before its Raft
    /// cluster is up; the new connection is used only after its `queue.declare-ok`.
    ///
    /// The session stops being current here, before the 503 goes out, so no request
    /// after it can pick the old session; publishes wait for the new one, within their
    /// timeout. Every publish that finds the queue missing calls this; only the first
    /// does anything.
    fn retire(&self, session: &Arc<PublishSession>, queue: &str) {
        if session.retired.is_cancelled() {
            return;
        }
        tracing::warn!(%queue, "queue missing on the broker; declaring it again on a new connection");
        self.clear_if_current(session);
        session.retired.cancel();
    }

    /// Closes a retired session once the publishes begun on it have had their publish
    /// timeout to be answered (they may be to other queues of the path: retry tiers, the
    /// dead-letter queue), or at once when the path closes.
    fn drain_then_close(&self, session: Arc<PublishSession>) {
        let drain = self.options.publish_timeout.min(RETIRED_DRAIN_LIMIT);
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(drain) => {}
            }
            close_connection(&session.conn, "queue declared again on a new connection").await;
        });
    }

    async fn publish_to(
        &self,
        destination: &str,
        meta: &JobMeta,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let deadline = deadline_after(self.options.publish_timeout);
        self.publish_until_answered(destination, meta, body, deadline)
            .await
    }

    fn is_ready(&self) -> bool {
        self.current()
            .is_some_and(|s| !s.blocked.load(Ordering::SeqCst))
    }

    async fn close(&self) {
        self.cancel.cancel();
        if let Some(session) = self.current() {
            self.set_current(None);
            close_connection(&session.conn, "producer shutting down").await;
        }
    }
}

/// Publishes jobs to RabbitMQ with publisher confirms; reconnects by itself.
///
/// Each job queue has a connection of its own ([`PublishPath`]), used for the queue
/// and its retry tiers and dead-letter queue: RabbitMQ closes a whole connection for
/// some errors of one queue (3.10 answers 541 INTERNAL_ERROR when a quorum queue is
/// deleted under a publisher), and the confirms in flight on it are lost. Then only
/// that queue's jobs pay; the other queues' connections never notice.
pub struct RabbitPublisher {
    paths: BTreeMap<String, Arc<PublishPath>>,
}

impl RabbitPublisher {
    /// Starts one path per queue of `options.queues`. They connect in the background:
    /// until the broker answers, `is_ready` is false and `publish` waits for it, at most
    /// the publish timeout.
    pub fn start(options: PublisherOptions) -> Arc<Self> {
        let paths = options
            .queues
            .iter()
            .map(|queue| {
                let options = PublisherOptions {
                    queues: vec![queue.clone()],
                    ..options.clone()
                };
                (queue.clone(), PublishPath::start(options))
            })
            .collect();
        Arc::new(Self { paths })
    }
}

#[async_trait]
impl Publisher for RabbitPublisher {
    async fn publish_to(
        &self,
        destination: &str,
        meta: &JobMeta,
        body: &[u8],
    ) -> Result<(), PublishError> {
        match self.paths.get(&meta.queue) {
            Some(path) => path.publish_to(destination, meta, body).await,
            // Queues are allow-listed long before a publish: a caller's bug.
            None => Err(PublishError::Broker(format!(
                "queue {:?} is not one this publisher serves",
                meta.queue
            ))),
        }
    }

    /// Ready when every queue's path is: a queue that cannot be served makes the
    /// process unready, as one shared connection did.
    fn is_ready(&self) -> bool {
        self.paths.values().all(|path| path.is_ready())
    }

    async fn close(&self) {
        futures::future::join_all(self.paths.values().map(|path| path.close())).await;
    }
}

// ---------------------------------------------------------------------------------
// Job source (workers)
// ---------------------------------------------------------------------------------

/// Options of the RabbitMQ job source.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub endpoint: AmqpEndpoint,
    /// Queues to drain.
    pub queues: Vec<String>,
    pub connect_timeout: Duration,
    /// `basic.qos` prefetch per queue: the worker's concurrency.
    pub prefetch: u16,
    /// Retry tiers to declare.
    pub retry_tiers: Vec<Duration>,
}

/// Consumes jobs from RabbitMQ queues; reconnects by itself.
pub struct RabbitSource {
    options: SourceOptions,
    /// Kept open after the subscription is cancelled, until in-flight deliveries are
    /// settled. The channel is kept too: lapin closes a channel when it is dropped,
    /// and unsettled deliveries would go back to the queue.
    session: Option<(Connection, Channel)>,
    /// Subscribed while a session consumes.
    status: SourceStatus,
}

impl RabbitSource {
    pub fn new(options: SourceOptions) -> Self {
        Self {
            options,
            session: None,
            status: SourceStatus::default(),
        }
    }

    async fn open(
        &self,
        cursor: &mut NodeCursor,
    ) -> Result<(Connection, Channel, Vec<lapin::Consumer>), String> {
        let o = &self.options;
        let name = connection_name("consumer");
        let conn = connect(&o.endpoint, &name, o.connect_timeout, cursor).await?;
        let setup = async {
            let channel = bounded("channel.open", conn.create_channel()).await?;
            bounded(
                "basic.qos",
                channel.basic_qos(o.prefetch.max(1), BasicQosOptions::default()),
            )
            .await?;
            let mut consumers = Vec::new();
            for queue in &o.queues {
                declare_topology(&conn, queue, &o.retry_tiers).await?;
                let name = job::amqp::short("the queue name", queue).map_err(|e| e.to_string())?;
                let consumer = bounded(
                    "basic.consume",
                    channel.basic_consume(
                        name,
                        consumer_tag(queue),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await?;
                consumers.push(consumer);
            }
            Ok::<_, String>((channel, consumers))
        };
        match setup.await {
            Ok((channel, consumers)) => Ok((conn, channel, consumers)),
            Err(e) => {
                close_connection(&conn, "setup failed").await;
                Err(e)
            }
        }
    }

    /// Serves one connection. Returns true when `stop` fired (subscriptions cancelled,
    /// connection kept for settling), false when the connection failed.
    async fn serve(
        &self,
        conn: &Connection,
        channel: &Channel,
        consumers: Vec<lapin::Consumer>,
        tx: &mpsc::Sender<Delivery>,
        stop: &CancellationToken,
    ) -> bool {
        let tags: Vec<ShortString> = consumers.iter().map(|c| c.tag()).collect();
        let mut deliveries = futures::stream::select_all(consumers.into_iter().map(until_ended));
        let lost = CancellationToken::new();
        let blocked = AtomicBool::new(false);
        let watch = watch_connection(conn, std::slice::from_ref(channel), None, &blocked, &lost);
        tokio::pin!(watch);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    stop_consuming(channel, &tags, &mut deliveries).await;
                    return true;
                }
                () = &mut watch => return false,
                next = deliveries.next() => match next {
                    Some(Subscription::Delivered(Ok(d))) => {
                        let queue = d.routing_key.to_string();
                        let queue = if self.options.queues.contains(&queue) { queue } else {
                            // Published via another exchange: the routing key is not the
                            // queue name; fall back to the only queue when there is one.
                            self.options.queues.first().cloned().unwrap_or(queue)
                        };
                        let mut meta = job::amqp::meta_from(&queue, &d.properties, &d.data);
                        meta.redeliveries = job::amqp::earlier_deliveries(&d.properties, d.redelivered);
                        let job = Job {
                            meta,
                            body: Bytes::from(d.data),
                        };
                        let settle = Box::new(RabbitSettle { acker: d.acker });
                        let delivery = Delivery { job, settle };
                        // A slot first, so that the delivery is still ours to give
                        // back when shutdown comes (or the worker is gone) meanwhile.
                        let slot = tokio::select! {
                            biased;
                            () = stop.cancelled() => None,
                            slot = tx.reserve() => slot.ok(),
                        };
                        match slot {
                            Some(slot) => slot.send(delivery),
                            None => {
                                give_back(delivery.settle).await;
                                stop_consuming(channel, &tags, &mut deliveries).await;
                                return true;
                            }
                        }
                    }
                    Some(Subscription::Delivered(Err(error))) => {
                        tracing::warn!(%error, "RabbitMQ consumer failed");
                        return false;
                    }
                    // One queue's subscription is enough: `select_all` alone would end
                    // only with the last one, and a queue deleted by hand would be left
                    // without its consumer while the others went on.
                    Some(Subscription::Ended(tag)) => {
                        tracing::warn!(consumer_tag = %tag, "RabbitMQ ended a subscription (its queue deleted?); subscribing again on a new connection");
                        return false;
                    }
                    None => {
                        tracing::warn!("RabbitMQ ended the subscription");
                        return false;
                    }
                },
            }
        }
    }
}

/// How long, after the subscriptions are cancelled, to wait for the next delivery lapin
/// already holds for them before taking the buffer as empty.
const PREFETCHED_DRAIN_WAIT: Duration = Duration::from_millis(200);

/// Gives a delivery that was never started back to the queue (nack with requeue), at
/// once: another replica can take it now rather than when this one's channel closes.
async fn give_back(settle: Box<dyn Settle>) {
    if let Err(error) = settle.requeue().await {
        tracing::debug!(%error, "could not give back an unstarted delivery; the broker will redeliver it when the channel closes");
    }
}

/// What one queue's subscription yields: its deliveries, then that it ended.
// Passed along by value, never stored in bulk: boxing the delivery would cost an
// allocation per job to save bytes on the one `Ended` per subscription.
#[allow(clippy::large_enum_variant)]
enum Subscription {
    Delivered(lapin::Result<lapin::message::Delivery>),
    /// lapin's stream ended: the broker cancelled the consumer (`basic.cancel`, sent
    /// when the queue is deleted) or the channel closed.
    Ended(ShortString),
}

type Subscriptions = futures::stream::SelectAll<futures::stream::BoxStream<'static, Subscription>>;

/// `consumer`'s deliveries, then [`Subscription::Ended`] once it ends.
fn until_ended(consumer: lapin::Consumer) -> futures::stream::BoxStream<'static, Subscription> {
    let tag = consumer.tag();
    consumer
        .map(Subscription::Delivered)
        .chain(futures::stream::once(
            async move { Subscription::Ended(tag) },
        ))
        .boxed()
}

/// At shutdown: cancels the subscriptions, then gives back every delivery the broker had
/// already sent for them (prefetched, up to `JOBGATE_PREFETCH`) that was never handed
/// to the worker. Without this they would stay unacked, locked to this replica, for the
/// whole shutdown grace. The channel stays open for the jobs still running.
async fn stop_consuming(channel: &Channel, tags: &[ShortString], deliveries: &mut Subscriptions) {
    for tag in tags {
        let cancel = channel.basic_cancel(tag.clone(), BasicCancelOptions::default());
        let _ = bounded("basic.cancel", cancel).await;
    }
    let mut given_back = 0usize;
    // Each cancelled subscription ends with its marker: the others may still hold
    // deliveries to give back.
    loop {
        match tokio::time::timeout(PREFETCHED_DRAIN_WAIT, deliveries.next()).await {
            Ok(Some(Subscription::Delivered(Ok(d)))) => {
                give_back(Box::new(RabbitSettle { acker: d.acker })).await;
                given_back += 1;
            }
            Ok(Some(Subscription::Ended(_))) => {}
            _ => break,
        }
    }
    if given_back > 0 {
        tracing::info!(
            given_back,
            "gave back prefetched jobs that were not started"
        );
    }
}

#[async_trait]
impl JobSource for RabbitSource {
    async fn run(&mut self, tx: mpsc::Sender<Delivery>, stop: CancellationToken) {
        let mut backoff = Backoff::for_reconnect();
        let mut cursor = NodeCursor::next_in_process();
        while !stop.is_cancelled() {
            match self.open(&mut cursor).await {
                Ok((conn, channel, consumers)) => {
                    backoff.reset();
                    tracing::info!(url = %self.options.endpoint, queues = ?self.options.queues, prefetch = self.options.prefetch, "consumer subscribed");
                    self.status.set_subscribed(true);
                    let stopped = self.serve(&conn, &channel, consumers, &tx, &stop).await;
                    self.status.set_subscribed(false);
                    if stopped {
                        self.session = Some((conn, channel));
                        return;
                    }
                    close_connection(&conn, "reconnecting").await;
                }
                Err(error) => {
                    tracing::warn!(url = %self.options.endpoint, %error, "cannot connect to RabbitMQ");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    fn is_ready(&self) -> bool {
        self.status.is_subscribed()
    }

    fn status(&self) -> SourceStatus {
        self.status.clone()
    }

    async fn close(&mut self) {
        if let Some((conn, _channel)) = self.session.take() {
            close_connection(&conn, "consumer shutting down").await;
        }
    }
}

struct RabbitSettle {
    acker: lapin::Acker,
}

fn settle_result(
    what: &str,
    r: Result<lapin::Result<bool>, tokio::time::error::Elapsed>,
) -> Result<(), SettleError> {
    match r {
        Ok(Ok(true)) => Ok(()),
        // lapin answers `false` without sending anything when the channel of the
        // delivery closed (or the delivery was settled already): nothing reached the
        // broker, which will deliver the job again.
        Ok(Ok(false)) => Err(SettleError(format!(
            "{what}: not sent, the delivery's channel is closed"
        ))),
        Ok(Err(e)) => Err(SettleError(format!("{what}: {e}"))),
        Err(_) => Err(SettleError(format!(
            "{what}: no answer within {OPERATION_TIMEOUT:?}"
        ))),
    }
}

#[async_trait]
impl Settle for RabbitSettle {
    async fn ack(self: Box<Self>) -> Result<(), SettleError> {
        let r = tokio::time::timeout(
            OPERATION_TIMEOUT,
            self.acker.ack(BasicAckOptions::default()),
        )
        .await;
        settle_result("basic.ack", r)
    }

    async fn requeue(self: Box<Self>) -> Result<(), SettleError> {
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        let r = tokio::time::timeout(OPERATION_TIMEOUT, self.acker.nack(options)).await;
        settle_result("basic.nack", r)
    }

    async fn reject(self: Box<Self>) -> Result<(), SettleError> {
        let options = BasicRejectOptions { requeue: false };
        let r = tokio::time::timeout(OPERATION_TIMEOUT, self.acker.reject(options)).await;
        settle_result("basic.reject", r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_timeout_too_long_for_the_clock_is_no_panic() {
        assert!(deadline_after(Duration::MAX) > Instant::now());
        assert!(deadline_after(Duration::from_secs(5)) > Instant::now());
    }

    #[test]
    fn a_settle_lapin_did_not_send_is_an_error() {
        assert!(settle_result("basic.ack", Ok(Ok(true))).is_ok());
        let error = settle_result("basic.ack", Ok(Ok(false))).unwrap_err();
        assert!(error.0.contains("not sent"), "{error}");
        assert!(settle_result("basic.nack", Ok(Ok(false))).is_err());
    }

    /// A loopback port nobody listens on: bound, then let go.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn when_no_node_answers_the_error_names_each_node_and_no_password() {
        let (a, b) = (closed_port(), closed_port());
        let list =
            format!("amqp://u:s3cret-a@127.0.0.1:{a}/%2f,amqp://u:s3cret-b@127.0.0.1:{b}/%2f");
        let endpoint = AmqpEndpoint::from(list.parse::<crate::config::SecretUrl>().unwrap());
        let mut cursor = NodeCursor::starting_at(1);
        let error = connect(&endpoint, "test", Duration::from_secs(5), &mut cursor)
            .await
            .unwrap_err();
        // Tried in the cursor's order (node 2 first), each once.
        let first = format!("amqp://u:***@127.0.0.1:{b}/%2f: ");
        let second = format!("amqp://u:***@127.0.0.1:{a}/%2f: ");
        assert!(error.starts_with("no RabbitMQ node answered"), "{error}");
        let (at_first, at_second) = (error.find(&first), error.find(&second));
        assert!(at_first.is_some() && at_first < at_second, "{error}");
        assert!(!error.contains("s3cret"), "{error}");
        // A failed round leaves the cursor where it was.
        assert_eq!(cursor, NodeCursor::starting_at(1));
    }

    #[tokio::test]
    async fn a_list_that_does_not_fit_is_refused_before_connecting() {
        let endpoint = AmqpEndpoint::from(
            "amqp://127.0.0.1:1,amqps://127.0.0.1:2"
                .parse::<crate::config::SecretUrl>()
                .unwrap(),
        );
        let mut cursor = NodeCursor::starting_at(0);
        let error = connect(&endpoint, "test", Duration::from_secs(5), &mut cursor)
            .await
            .unwrap_err();
        assert!(error.contains("mixes amqp:// and amqps://"), "{error}");
    }

    #[test]
    fn a_consumer_tag_too_long_for_amqp_is_left_to_the_broker() {
        assert!(consumer_tag("q").as_str().ends_with("-q"));
        assert_eq!(consumer_tag(&"q".repeat(300)).as_str(), "");
    }
}
