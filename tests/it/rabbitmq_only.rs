//! Scenarios that only make sense on RabbitMQ: the management API's view of a job, a
//! queue deleted by hand, and the prefetch (`basic.qos`) above the concurrency.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    assert_problem, assert_processed_exactly_once, brokers_shared, rabbit, unique, vars,
    wait_until, Backend, Consumer, Producer,
};

const BACKEND: Backend = Backend::Rabbitmq;

#[tokio::test]
async fn management_api_shows_the_job_with_its_real_body_and_properties() {
    let _brokers = brokers_shared().await;
    let queue = unique("props");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let body = r#"{"to":"ada@example.com","subject":"hi"}"#;
    let response = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let job_id = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let info = rabbit::queue_info(&queue).await.expect("queue exists");
    assert_eq!(info["durable"], true);
    assert_eq!(info["type"], "quorum");
    assert_eq!(
        info["arguments"]["x-dead-letter-routing-key"],
        format!("{queue}.dlq")
    );
    assert!(
        rabbit::queue_info(&format!("{queue}.dlq")).await.is_some(),
        "DLQ declared"
    );

    let messages = rabbit::peek(&queue, 1).await;
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m["payload"], body);
    assert_eq!(m["routing_key"], queue.as_str());
    let p = &m["properties"];
    assert_eq!(p["message_id"], job_id.as_str());
    assert_eq!(p["content_type"], "application/json");
    assert_eq!(p["delivery_mode"], 2);
    assert_eq!(p["headers"]["x-attempt"], 1);
    assert!(p["timestamp"].as_u64().is_some(), "timestamp set: {p}");
}

/// An operator deletes the queue: the publish that finds it missing is refused (503,
/// never a 202 for a job no queue holds), and from the next request on every job is
/// taken again, each round. A channel that published to the deleted quorum queue keeps
/// RabbitMQ's state for it and nacked a publish to the queue declared again (seen in CI
/// under load), so the producer must go on with a fresh connection, not the old one.
#[tokio::test]
async fn a_queue_deleted_behind_the_producers_back_gets_503_then_is_declared_again() {
    let _brokers = brokers_shared().await;
    let queue = unique("deleted");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    for round in 0..4 {
        producer.post_many(&queue, 10).await;
        rabbit::delete_queue(&queue).await;

        // `mandatory` makes RabbitMQ return the unroutable message: never a false 202.
        let response = producer.post(&queue, "unroutable").await;
        assert_problem(response, 503, "broker-unavailable").await;
        wait_until(
            Duration::from_secs(10),
            "the queue to be declared again",
            || async { rabbit::queue_info(&queue).await.is_some() },
        )
        .await;
        producer.post_many(&queue, 20).await;
        assert_eq!(
            BACKEND.pending(&queue).await,
            20,
            "round {round}: only the jobs after the redeclare are queued"
        );
    }
}

/// An operator deletes one of the queues a consumer drains. RabbitMQ cancels that one
/// subscription (`basic.cancel`); the consumer must notice, declare the queue again and
/// subscribe to it again, with no restart, and go on draining the other queue. Jobs
/// posted after, to either queue, are processed by the same process, each once.
#[tokio::test]
async fn a_queue_deleted_under_a_consumer_is_subscribed_again_and_the_other_keeps_draining() {
    let _brokers = brokers_shared().await;
    let (deleted, kept) = (unique("gone"), unique("kept"));
    let _cleanup = BACKEND.cleanup(&[&deleted, &kept]);
    let producer = Producer::start(BACKEND, &[&deleted, &kept], &[]).await;
    let consumer = Consumer::start(BACKEND, &format!("{deleted},{kept}"), &[]).await;
    let mut ids = producer.post_many(&deleted, 3).await;
    ids.extend(producer.post_many(&kept, 3).await);
    assert_processed_exactly_once(&[&consumer], &ids, Duration::from_secs(30)).await;

    rabbit::delete_queue(&deleted).await;
    wait_until(
        Duration::from_secs(20),
        "the deleted queue to be declared again with the consumer on it",
        || async {
            rabbit::queue_info(&deleted)
                .await
                .is_some_and(|q| q["consumers"] == 1)
        },
    )
    .await;
    ids.extend(producer.post_many(&deleted, 5).await);
    ids.extend(producer.post_many(&kept, 5).await);
    assert_processed_exactly_once(&[&consumer], &ids, Duration::from_secs(30)).await;
}

/// `JOBGATE_PREFETCH` above the concurrency: the broker hands the consumer that many
/// jobs while it runs one; at SIGTERM the ones it had not started go back to the queue
/// and another consumer processes them, each exactly once.
#[tokio::test]
async fn prefetch_above_concurrency_holds_jobs_and_gives_back_the_unstarted_at_shutdown() {
    let _brokers = brokers_shared().await;
    let queue = unique("prefetch");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let ids = producer.post_many(&queue, 10).await;
    let mut first = Consumer::start(
        BACKEND,
        &queue,
        &vars(&[
            ("JOBGATE_CONCURRENCY", "1"),
            ("JOBGATE_PREFETCH", "5"),
            ("JOBGATE_LOG_DELAY_MS", "3000"),
        ]),
    )
    .await;
    // Five delivered (one running, four waiting in the consumer), five still ready.
    wait_until(Duration::from_secs(20), "five jobs delivered", || async {
        rabbit::ready_count(&queue).await == 5
    })
    .await;
    assert_eq!(first.started().len(), 1, "{}", first.process.dump());

    first.process.terminate();
    assert_eq!(
        first.process.wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
    // The running job finished and was acked; the four waiting ones went back.
    assert_eq!(first.processed().len(), 1, "{}", first.process.dump());
    assert_eq!(rabbit::ready_count(&queue).await, 9);

    let fresh = Consumer::start(BACKEND, &queue, &vars(&[("JOBGATE_CONCURRENCY", "8")])).await;
    assert_processed_exactly_once(&[&first, &fresh], &ids, Duration::from_secs(60)).await;
}

/// At SIGTERM the prefetched jobs a consumer had not started go back to the queue AT
/// ONCE (nack with requeue right after the cancel), not when its channel closes at the
/// end of the grace: while its one running job still runs, the other nine are ready.
#[tokio::test]
async fn prefetched_jobs_go_back_right_after_sigterm_not_after_the_grace() {
    let _brokers = brokers_shared().await;
    let queue = unique("giveback");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let ids = producer.post_many(&queue, 10).await;
    let mut first = Consumer::start(
        BACKEND,
        &queue,
        &vars(&[
            ("JOBGATE_CONCURRENCY", "1"),
            ("JOBGATE_PREFETCH", "10"),
            ("JOBGATE_LOG_DELAY_MS", "20000"),
            ("JOBGATE_SHUTDOWN_GRACE_MS", "60000"),
        ]),
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "all ten jobs delivered",
        || async { rabbit::ready_count(&queue).await == 0 },
    )
    .await;
    wait_until(Duration::from_secs(20), "one job started", || {
        std::future::ready(first.started().len() == 1)
    })
    .await;

    first.process.terminate();
    wait_until(
        Duration::from_secs(10),
        "the nine unstarted jobs to be ready again while the running one runs",
        || async { rabbit::ready_count(&queue).await == 9 },
    )
    .await;
    assert!(
        first.processed().is_empty(),
        "the running job is still running (20 s): the nine came back before the grace \
         ended\n{}",
        first.process.dump()
    );
    let fresh = Consumer::start(BACKEND, &queue, &vars(&[("JOBGATE_CONCURRENCY", "8")])).await;
    assert_processed_exactly_once(&[&first, &fresh], &ids, Duration::from_secs(60)).await;
    assert_eq!(
        first.process.wait_exit(Duration::from_secs(40)).await,
        Some(0)
    );
}

/// How one request of [`a_neighbours_deleted_queue_costs_the_healthy_queue_nothing`]
/// ended, by queue.
#[derive(Debug, Default)]
struct Tally {
    accepted: Vec<String>,
    /// When each accepted request was sent.
    accepted_at: Vec<tokio::time::Instant>,
    /// 503s whose text says the job may have been queued (sent, confirm lost).
    ambiguous: usize,
    /// Every other answer, with what it was.
    refused: Vec<String>,
}

/// Two queues on one producer, clients posting to both, and the second deleted by hand
/// again and again (RabbitMQ 3.10 may close the whole connection for it: 541
/// INTERNAL_ERROR). The healthy queue must not pay for it: a job that had not left the
/// process when the connection closed goes out on the next one within the publish
/// timeout, and each queue has a connection of its own, so no confirm of the healthy
/// queue is lost with the victim's connection: the healthy queue gets no 503 at all,
/// not even the ambiguous one ("may have been queued"). Every 202'd job of the healthy
/// queue is in it afterwards, as is every victim job posted after the last deletion,
/// and every request of both is answered (202 or 503), none hangs.
#[tokio::test]
async fn a_neighbours_deleted_queue_costs_the_healthy_queue_nothing() {
    use std::sync::{Arc, Mutex};
    let _brokers = brokers_shared().await;
    let healthy = unique("healthy");
    let victim = unique("victim");
    let _cleanup = BACKEND.cleanup(&[&healthy, &victim]);
    let producer = Producer::start(BACKEND, &[&healthy, &victim], &[]).await;
    let tallies: Arc<Mutex<[Tally; 2]>> = Arc::default();
    // Posting goes on until the victim took a job after the last deletion (or 60 s
    // after it): a fixed end could come before the producer had declared the victim
    // again on a slow machine, and then no job could show that it did.
    let posting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut clients = Vec::new();
    for client in 0..32 {
        let which = client % 2;
        let queue = [&healthy, &victim][which].clone();
        let (http, url) = (
            producer.http.clone(),
            producer.url(&format!("/jobs/{queue}")),
        );
        let (tallies, posting) = (Arc::clone(&tallies), Arc::clone(&posting));
        clients.push(tokio::spawn(async move {
            while posting.load(std::sync::atomic::Ordering::SeqCst) {
                let started = tokio::time::Instant::now();
                let sent = http
                    .post(&url)
                    .timeout(Duration::from_secs(30))
                    .body("{}")
                    .send()
                    .await;
                let (status, body) = match sent {
                    Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                    Err(e) => (0, format!("{e:?}")),
                };
                let mut tallies = tallies.lock().unwrap();
                let tally = &mut tallies[which];
                match status {
                    202 => {
                        let v: Value = serde_json::from_str(&body).unwrap();
                        tally
                            .accepted
                            .push(v["job_id"].as_str().unwrap().to_owned());
                        tally.accepted_at.push(started);
                    }
                    503 if body.contains("may have been queued") => tally.ambiguous += 1,
                    _ => tally.refused.push(format!("{status} {body}")),
                }
            }
        }));
    }
    // Delete the victim 8 times while the clients post (a 404 means it was gone already).
    let http = reqwest::Client::new();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(1_400)).await;
        let response = http
            .delete(format!(
                "{}/api/queues/%2f/{victim}",
                crate::helpers::MANAGEMENT_URL
            ))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success() || response.status() == 404,
            "delete the victim queue: {}",
            response.status()
        );
    }
    let last_deletion = tokio::time::Instant::now();
    let victim_posted_again = || {
        let tallies = tallies.lock().unwrap();
        tallies[1].accepted_at.iter().any(|at| *at > last_deletion)
    };
    while !victim_posted_again() && last_deletion.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A little more traffic on both queues after that, then the clients stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    posting.store(false, std::sync::atomic::Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let tallies = std::mem::take(&mut *tallies.lock().unwrap());
    let [healthy_tally, victim_tally] = tallies;
    let summary = format!(
        "healthy: {} accepted, {} ambiguous, {} other; victim: {} accepted, {} ambiguous, {} other",
        healthy_tally.accepted.len(),
        healthy_tally.ambiguous,
        healthy_tally.refused.len(),
        victim_tally.accepted.len(),
        victim_tally.ambiguous,
        victim_tally.refused.len(),
    );
    eprintln!("{summary}");
    assert!(
        healthy_tally.refused.is_empty() && healthy_tally.ambiguous == 0,
        "the healthy queue paid for its neighbour ({summary}): {:?}",
        &healthy_tally.refused[..healthy_tally.refused.len().min(3)]
    );
    assert!(healthy_tally.accepted.len() > 100, "{summary}");
    // The victim's answers: 202, the ambiguous 503, or 503 broker-unavailable; no hang.
    for answer in &victim_tally.refused {
        assert!(
            answer.starts_with("503 ") && answer.contains("broker-unavailable"),
            "the victim queue answered {answer} ({summary})"
        );
    }
    // Every 202 of the healthy queue is in it, and every victim 202 the deletions could
    // not have removed.
    let victim_kept = victim_tally
        .accepted_at
        .iter()
        .filter(|at| **at > last_deletion)
        .count();
    assert!(
        victim_kept > 0,
        "the victim queue took no job within 60 s of the last deletion ({summary})"
    );
    wait_until(
        Duration::from_secs(30),
        "each queue to hold its 202s",
        || async {
            rabbit::ready_count(&healthy).await as usize == healthy_tally.accepted.len()
                && rabbit::ready_count(&victim).await as usize >= victim_kept
        },
    )
    .await;
}

/// The `exec` command runs what jobs say: it must not see the consumer's broker URL (or
/// any `JOBGATE_*` setting), only the variables `JOBGATE_EXEC_ENV` names, and a job id
/// published by hand as a path (`../../tmp/x`) reaches it as a safe, derived id.
#[tokio::test]
async fn the_exec_command_gets_no_broker_url_and_no_path_as_job_id() {
    let _brokers = brokers_shared().await;
    let queue = unique("execenv");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    let seen = std::env::temp_dir().join(format!("{queue}.seen"));
    let script = r#"printf "%s|%s|%s\n" "${JOBGATE_AMQP_URL-withheld}" "$SEEN_FILE" "$JOB_ID" >> "$SEEN_FILE""#;
    let consumer = Consumer::start(
        BACKEND,
        &queue,
        &vars(&[
            ("JOBGATE_HANDLER", "exec"),
            ("JOBGATE_EXEC_COMMAND", &format!("sh -c '{script}'")),
            ("SEEN_FILE", seen.to_str().unwrap()),
            ("JOBGATE_EXEC_ENV", "PATH,SEEN_FILE"),
        ]),
    )
    .await;
    // A message published by hand whose message_id is a path.
    let channel = rabbit::connect().await.create_channel().await.unwrap();
    let properties = lapin::BasicProperties::default().with_message_id("../../tmp/x".into());
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"{}",
            properties,
        )
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "the command to run", || async {
        std::fs::read_to_string(&seen).is_ok_and(|s| !s.is_empty())
    })
    .await;
    drop(consumer);
    let line = std::fs::read_to_string(&seen).unwrap();
    let _ = std::fs::remove_file(&seen);
    let fields: Vec<&str> = line.trim_end().split('|').collect();
    assert_eq!(
        fields[0], "withheld",
        "the command saw the broker URL: {line}"
    );
    assert_eq!(fields[1], seen.to_str().unwrap());
    assert!(
        jobgate_shared::job::is_safe_id(fields[2]) && !fields[2].contains('/'),
        "JOB_ID {:?} is not a safe id",
        fields[2]
    );
}

/// A purge sent while a listing holds the dead jobs (RabbitMQ hands them out unacked
/// until the listing ends) removes every one of them, as does the listing's own
/// producer. The console's Refresh then Purge purged 0 of 3 when the two met: the
/// producer now runs one dead-letter operation per queue at a time.
#[tokio::test]
async fn a_purge_while_a_listing_holds_the_dead_jobs_removes_them_all() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

    const DEAD: u32 = 2000;
    let _brokers = brokers_shared().await;
    let queue = unique("purge-turns");
    let _cleanup = BACKEND.cleanup(&[&queue]);
    // No keys: a loopback client is an admin.
    let producer = Producer::start(BACKEND, &[&queue], &[]).await;
    let dlq = format!("{queue}.dlq");

    let conn = rabbit::connect().await;
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for n in 0..DEAD {
        let confirm = channel
            .basic_publish(
                "".into(),
                dlq.as_str().into(),
                BasicPublishOptions::default(),
                format!("dead job {n}").as_bytes(),
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for confirm in futures::future::join_all(confirms).await {
        assert!(confirm.unwrap().is_ack());
    }
    let ready = || ready_on(&channel, &dlq);
    wait_until(
        Duration::from_secs(30),
        "the dead jobs to be ready",
        || async { ready().await == DEAD },
    )
    .await;

    // A listing of 500, and while it holds some of them (fewer are ready), a purge.
    let list = producer
        .http
        .get(producer.url(&format!("/queues/{queue}/dead?limit=500")))
        .send();
    let listing = tokio::spawn(list);
    let mut held = false;
    while !listing.is_finished() {
        if ready().await < DEAD {
            held = true;
            break;
        }
    }
    assert!(held, "the listing was seen holding dead jobs");
    let purge = producer
        .http
        .delete(producer.url(&format!("/queues/{queue}/dead?confirm={queue}")))
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 200);
    let purged: Value = purge.json().await.unwrap();
    assert_eq!(purged["purged"], DEAD, "{purged}");

    let listed = listing.await.unwrap().unwrap();
    assert_eq!(listed.status(), 200);
    let listed: Value = listed.json().await.unwrap();
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(500));
    assert_eq!(listed["total"], DEAD);
    assert_eq!(ready().await, 0, "nothing came back after the purge");
    let _ = conn.close(200, "bye".into()).await;
}

/// Messages ready in `queue`, exact (a passive declare on `channel`).
async fn ready_on(channel: &lapin::Channel, queue: &str) -> u32 {
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    declared.message_count()
}
