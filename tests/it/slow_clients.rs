//! Slow and hostile clients against the real `producer` binary (issue 13): connections
//! stalled mid-headers or mid-body are closed after their timeouts while other clients
//! keep getting 202; idle keep-alive connections are closed; past the connection cap,
//! new connections wait until one closes. The broker does not matter here: RabbitMQ.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{brokers_shared, unique, vars, Backend, Cleanup, Producer};

/// The producer's `host:port`.
fn addr(producer: &Producer) -> String {
    producer.base_url.trim_start_matches("http://").to_owned()
}

/// A complete `POST /jobs/{queue}` with a small body, keep-alive.
fn job_request(queue: &str) -> String {
    format!(
        "POST /jobs/{queue} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 7\r\n\r\n{{\"n\":1}}"
    )
}

/// Reads one response (head and `Content-Length` body) off `stream`.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return text;
            }
        }
        let n = stream.read(&mut chunk).await.expect("read a response");
        assert!(n > 0, "the connection closed mid-response: {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the producer closed `stream` (EOF or reset) within `limit`; whatever it
/// sent before is returned.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()?;
    Some(String::from_utf8_lossy(&seen).into_owned())
}

#[tokio::test]
async fn stalled_headers_and_bodies_are_closed_after_their_timeouts_while_jobs_keep_flowing() {
    let _brokers = brokers_shared().await;
    let backend = Backend::Rabbitmq;
    let queue = unique("slow");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(
        backend,
        &[&queue],
        &vars(&[
            ("JOBGATE_HEADER_READ_TIMEOUT_MS", "2000"),
            ("JOBGATE_BODY_READ_TIMEOUT_MS", "2000"),
        ]),
    )
    .await;
    let target = addr(&producer);

    // 200 connections stop in the middle of their headers; one in the middle of its body.
    let mut stalled_heads = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(&target).await.expect("connect");
        stream
            .write_all(format!("POST /jobs/{queue} HTTP/1.1\r\nHost: x\r\nX-Job-a: ").as_bytes())
            .await
            .unwrap();
        stalled_heads.push(stream);
    }
    let mut stalled_body = TcpStream::connect(&target).await.expect("connect");
    stalled_body
        .write_all(
            format!(
                "POST /jobs/{queue} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
            )
            .as_bytes(),
        )
        .await
        .unwrap();

    // Meanwhile, other clients are served as usual.
    let started = tokio::time::Instant::now();
    let mut accepted: u64 = 0;
    while started.elapsed() < Duration::from_secs(3) {
        producer.post_ok(&queue, "{\"n\":1}").await;
        accepted += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Each stalled connection is closed, the stalled body with a 408 problem first.
    let answer = closed_within(&mut stalled_body, Duration::from_secs(10))
        .await
        .expect("the connection with a stalled body was closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("urn:jobgate:problem:body-timeout"),
        "{answer}"
    );
    for (i, stream) in stalled_heads.iter_mut().enumerate() {
        let sent = closed_within(stream, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("stalled connection {i} is still open"));
        // No answer to a request that never finished its head.
        assert!(!sent.starts_with("HTTP/1.1 2"), "{sent}");
    }
    producer.post_ok(&queue, "{\"n\":2}").await;
    assert_eq!(backend.pending(&queue).await, accepted + 1);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let _brokers = brokers_shared().await;
    let backend = Backend::Rabbitmq;
    let queue = unique("idle");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(
        backend,
        &[&queue],
        &vars(&[
            ("JOBGATE_HEADER_READ_TIMEOUT_MS", "60000"),
            ("JOBGATE_IDLE_TIMEOUT_MS", "500"),
        ]),
    )
    .await;
    let mut stream = TcpStream::connect(addr(&producer)).await.unwrap();
    // Two requests on one connection: keep-alive works...
    for _ in 0..2 {
        stream
            .write_all(job_request(&queue).as_bytes())
            .await
            .unwrap();
        let answer = read_response(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }
    // ...and then, without a request, the connection is closed (long before the
    // header-read timeout of 60 s).
    let sent = closed_within(&mut stream, Duration::from_secs(5))
        .await
        .expect("the idle connection was closed");
    assert_eq!(sent, "");
}

/// A producer on RabbitMQ capped at `max_connections` (long header-read timeout, short
/// idle timeout), once the harness's own keep-alive connection (readiness) has gone
/// idle and been closed, so every connection opened next counts against the cap.
/// Returned with its queue's clean-up first, which is dropped last.
async fn capped_producer(prefix: &str, max_connections: u32) -> (Cleanup, Producer, String) {
    let backend = Backend::Rabbitmq;
    let queue = unique(prefix);
    let cleanup = backend.cleanup(&[&queue]);
    let producer = Producer::start(
        backend,
        &[&queue],
        &vars(&[
            ("JOBGATE_MAX_CONNECTIONS", &max_connections.to_string()),
            ("JOBGATE_HEADER_READ_TIMEOUT_MS", "60000"),
            ("JOBGATE_IDLE_TIMEOUT_MS", "300"),
        ]),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    (cleanup, producer, queue)
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let _brokers = brokers_shared().await;
    let (_cleanup, producer, queue) = capped_producer("cap", 3).await;
    let target = addr(&producer);
    let mut holders = Vec::new();
    for _ in 0..3 {
        holders.push(TcpStream::connect(&target).await.unwrap());
    }
    // The 4th connection is taken by the kernel but not served...
    let mut fourth = TcpStream::connect(&target).await.unwrap();
    fourth
        .write_all(job_request(&queue).as_bytes())
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(1500), read_response(&mut fourth)).await;
    assert!(early.is_err(), "answered past the cap: {early:?}");
    // ...until one of the three closes.
    drop(holders.pop());
    let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut fourth))
        .await
        .expect("served once a connection closed");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
}

/// Issue 15's open-loop tail: clients that open a connection per request while the
/// broker pauses arrive in bursts larger than `TcpListener::bind`'s fixed backlog of
/// 1024. The kernel dropped the SYNs past it and those clients retried 1, 3 and 7 s
/// later. With `JOBGATE_LISTEN_BACKLOG` (4096 by default) a burst of 2000 connections
/// past the cap is held by the kernel, every handshake completed.
#[tokio::test]
async fn a_burst_of_connections_past_the_cap_waits_in_the_backlog() {
    const BURST: usize = 2000;
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("read net.core.somaxconn")
        .trim()
        .parse()
        .expect("net.core.somaxconn is a number");
    assert!(
        somaxconn > BURST,
        "net.core.somaxconn is {somaxconn}: the kernel caps every listen backlog there, \
         so this machine cannot hold a burst of {BURST} (raise it with sysctl)"
    );
    let _brokers = brokers_shared().await;
    let (_cleanup, producer, queue) = capped_producer("backlog", 1).await;
    let target = addr(&producer);
    // This connection takes the only permit: nothing more is accepted.
    let mut holder = TcpStream::connect(&target).await.unwrap();
    holder
        .write_all(job_request(&queue).as_bytes())
        .await
        .unwrap();
    assert!(read_response(&mut holder).await.starts_with("HTTP/1.1 202"));
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..BURST {
        let target = target.clone();
        // A dropped SYN is retried after 1 s and 3 s and then still finds the backlog
        // full (nothing is accepted meanwhile): 10 s cannot pass for a completed one.
        burst.spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(target)).await
        });
    }
    let mut connected = Vec::new();
    let mut failures = Vec::new();
    while let Some(joined) = burst.join_next().await {
        match joined.unwrap() {
            Ok(Ok(stream)) => connected.push(stream),
            Ok(Err(error)) => failures.push(error.to_string()),
            Err(_) => failures.push("no handshake within 10 s".to_owned()),
        }
    }
    failures.dedup();
    assert_eq!(
        connected.len(),
        BURST,
        "of {BURST} connections past the cap only {} completed their handshake; the \
         rest: {failures:?}",
        connected.len()
    );
    // Still served: the others and the holder close; the producer accepts the closed
    // ones in turn (each ends at once) and then serves the one kept.
    let mut kept = connected.swap_remove(0);
    kept.write_all(job_request(&queue).as_bytes())
        .await
        .unwrap();
    drop(connected);
    drop(holder);
    let answer = tokio::time::timeout(Duration::from_secs(10), read_response(&mut kept))
        .await
        .expect("a connection of the burst was served once the others closed");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
}
