//! The socket side of the producer: accepting connections and serving HTTP/1 on them,
//! with the limits a public listener needs (issue 13), in place of `axum::serve`, which
//! has none of them.
//!
//! - **Connection cap** (`JOBGATE_MAX_CONNECTIONS`): a permit is taken *before* each
//!   `accept`, so past the cap new connections wait in the kernel's listen backlog
//!   (their TCP handshake completes, nothing is read) until a connection closes; none is
//!   refused by the producer itself.
//! - **Listen backlog** (`JOBGATE_LISTEN_BACKLOG`, [`bind`]): how many such connections
//!   the kernel holds; past it their SYNs are dropped and clients retry seconds later.
//! - **Header-read timeout** (`JOBGATE_HEADER_READ_TIMEOUT_MS`): hyper's own, with a
//!   tokio timer. hyper starts it whenever it waits for a request head: on a new
//!   connection and, on a keep-alive connection, as soon as the previous response is
//!   written. So it bounds the idle wait between requests too; a connection that sends
//!   no complete head in time is closed without an answer.
//! - **Idle timeout** (`JOBGATE_IDLE_TIMEOUT_MS`): a keep-alive connection without a
//!   request for this long after its last one is closed (hyper's graceful shutdown,
//!   which closes an idle connection at once). Effective idle limit: the smaller of
//!   the two timeouts.
//! - The **body-read timeout** is HTTP, not sockets: see [`crate::body_deadline`].
//!
//! Shutdown: when `shutdown` completes, accepting stops and every connection is told
//! to finish (hyper: the request in progress is answered, then the connection closes);
//! [`serve`] returns when all have.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Binds the HTTP listener on `addr` (`host:port`, the first address that binds) with a
/// listen backlog of `backlog` connections (the kernel caps it at `net.core.somaxconn`).
///
/// Why not `TcpListener::bind`: its backlog is fixed at 1024. Under an open-loop load a
/// pause of the broker of 100 ms (a quorum-queue WAL roll-over, say) leaves every
/// in-flight request waiting on its confirm, so clients open new connections for new
/// requests; past 1024 waiting to be accepted the kernel dropped their SYNs, and those
/// clients retried 1, 3 and 7 s later: a 100 ms pause became seconds of latency
/// (bench/notes.md, "The open loop's tail").
pub async fn bind(addr: &str, backlog: u32) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std's TcpListener::bind does: a restart may rebind at once while the old
        // process's connections are in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(backlog)) {
            Ok(listener) => return Ok(listener),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// The limits of the listener (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` completes and every connection closed.
/// Requests carry the peer's `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let stop = CancellationToken::new();
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_on_signal.cancel();
    });
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = accept(&listener, &connections) => accepted,
        };
        let (stream, peer, permit) = accepted;
        let app = app.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            serve_connection(stream, peer, app, limits, stop).await;
            drop(permit);
        });
    }
    // No new connections: the listener closes; the kernel refuses new ones.
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Warns when `max_connections` client connections could not all be open at once under
/// this process's open-file soft limit (`ulimit -n`): the cap would never be reached, and
/// past the limit `accept` fails (logged, retried every second) instead of connections
/// waiting their turn in the listen backlog. The limit is read from `/proc/self/limits`
/// (Linux); where there is none, nothing is said.
pub fn warn_if_over_open_files_limit(max_connections: usize) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    if let Some(limit) = exceeded_open_files_limit(max_connections, &limits) {
        tracing::warn!(
            max_connections,
            open_files_limit = limit,
            "JOBGATE_MAX_CONNECTIONS is above the open-file limit (ulimit -n), which the \
             broker connections share too: raise the limit or lower JOBGATE_MAX_CONNECTIONS"
        );
    }
}

/// The open-file soft limit in the text of `/proc/<pid>/limits` when `max_connections`
/// is above it; `None` when it is not, or the limit is unlimited or not in the text.
fn exceeded_open_files_limit(max_connections: usize, proc_limits: &str) -> Option<u64> {
    let soft_limit: u64 = proc_limits.lines().find_map(|line| {
        // "Max open files            1024                 1048576              files"
        let values = line.strip_prefix("Max open files")?;
        values.split_whitespace().next()?.parse().ok()
    })?;
    let over = u64::try_from(max_connections).map_or(true, |n| n > soft_limit);
    over.then_some(soft_limit)
}

/// Waits for a free connection slot, then for a connection.
async fn accept(
    listener: &TcpListener,
    connections: &Arc<Semaphore>,
) -> (TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit) {
    let permit = Arc::clone(connections)
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => return (stream, peer, permit),
            // The peer gave up between SYN and accept: nothing to do.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            // Out of descriptors, say: wait instead of spinning (as axum::serve does).
            Err(error) => {
                tracing::error!(%error, "accepting a connection failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// What the idle watchdog sees of a connection's requests: counters and a time the
/// request path updates with a few atomic stores (no channel, no wake-up, no timer per
/// request), read by the watchdog when its timer fires, about once per idle timeout.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    /// Requests started on the connection so far.
    started: AtomicU64,
    /// Requests whose handler has not answered yet.
    in_flight: AtomicU64,
    /// When the last request was answered, in nanoseconds since `epoch`.
    last_answered_nanos: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            started: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_answered_nanos: AtomicU64::new(0),
        }
    }

    fn request_started(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    fn request_answered(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_answered_nanos.store(nanos, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// When the connection will have been idle for `timeout`: `None` while a request is
    /// in flight or before the first one (then the header-read timeout alone applies).
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.started.load(Ordering::SeqCst) == 0 || self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let answered = Duration::from_nanos(self.last_answered_nanos.load(Ordering::SeqCst));
        Some(self.epoch + answered + timeout)
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    // Answers go out at once: with Nagle's algorithm on, a 202 written while the
    // client's previous segment is still unacknowledged would wait for that ACK, which
    // a client delaying its ACKs sends up to 40 ms late.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
    }
    let activity = Arc::new(Activity::new());
    let watched = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        let activity = Arc::clone(&activity);
        activity.request_started();
        async move {
            let _done = scopeguard(move || activity.request_answered());
            let response = app
                .oneshot(request.map(axum::body::Body::new))
                .await
                .unwrap_or_else(|never: Infallible| match never {});
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let idle = idle_for(&watched, limits.idle_timeout);
    tokio::pin!(idle);
    let mut finishing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    // Header timeouts, resets, malformed requests: the client's doing.
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !finishing => {
                finishing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = &mut idle, if !finishing => {
                tracing::debug!(%peer, "idle keep-alive connection closed");
                finishing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Completes once the connection has answered at least one request and then gone
/// `timeout` without starting another. Before the first request the header-read
/// timeout alone applies.
async fn idle_for(activity: &Activity, timeout: Duration) {
    loop {
        match activity.idle_deadline(timeout) {
            Some(deadline) if Instant::now() >= deadline => return,
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => tokio::time::sleep(timeout).await,
        }
    }
}

/// Runs `f` when dropped: a request's end is counted even when hyper drops its future
/// (the client went away).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/self/limits` of a shell with `ulimit -n 1024` (the header and some rows).
    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units
Max processes             96363                96363                processes
Max open files            1024                 1048576              files
Max locked memory         8388608              8388608              bytes
";

    #[test]
    fn more_connections_than_open_files_is_reported_with_the_soft_limit() {
        assert_eq!(exceeded_open_files_limit(4096, LIMITS), Some(1024));
        assert_eq!(exceeded_open_files_limit(1025, LIMITS), Some(1024));
    }

    #[test]
    fn connections_within_the_limit_are_fine() {
        assert_eq!(exceeded_open_files_limit(1024, LIMITS), None);
        assert_eq!(exceeded_open_files_limit(100, LIMITS), None);
    }

    #[test]
    fn an_unlimited_missing_or_garbled_limit_says_nothing() {
        let unlimited = LIMITS.replace("1024                 1048576", "unlimited   unlimited");
        for text in [
            unlimited.as_str(),
            "",
            "Max open files",
            "Max open files  -1  x",
        ] {
            assert_eq!(
                exceeded_open_files_limit(usize::MAX, text),
                None,
                "{text:?}"
            );
        }
    }

    /// Whether `idle_for` completed within `within` (paused time: instantly).
    async fn idle_within(activity: &Activity, timeout: Duration, within: Duration) -> bool {
        tokio::time::timeout(within, idle_for(activity, timeout))
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_a_timeout_after_its_last_answer() {
        let timeout = Duration::from_secs(5);
        let activity = Activity::new();
        // Before the first request: never (the header-read timeout's job).
        assert!(!idle_within(&activity, timeout, Duration::from_secs(60)).await);

        activity.request_started();
        // A request in flight for a minute is not idleness.
        assert!(!idle_within(&activity, timeout, Duration::from_secs(60)).await);
        activity.request_answered();
        let answered = Instant::now();
        assert!(idle_within(&activity, timeout, Duration::from_secs(6)).await);
        assert_eq!(
            Instant::now() - answered,
            timeout,
            "exactly the timeout after"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_new_request_starts_the_idle_clock_again() {
        let timeout = Duration::from_secs(5);
        let activity = Arc::new(Activity::new());
        activity.request_started();
        activity.request_answered();
        let watched = Arc::clone(&activity);
        let idle = tokio::spawn(async move { idle_for(&watched, timeout).await });
        // A request every 4 s for 20 s: never 5 s without one.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            assert!(!idle.is_finished(), "closed while requests kept coming");
            activity.request_started();
            activity.request_answered();
        }
        let last = Instant::now();
        idle.await.unwrap();
        assert_eq!(Instant::now() - last, timeout);
    }

    #[test]
    fn this_process_has_a_readable_limit_on_linux() {
        if cfg!(target_os = "linux") {
            let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
            assert!(exceeded_open_files_limit(usize::MAX, &limits).is_some());
        }
    }
}
