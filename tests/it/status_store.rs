//! The job status store itself against a real Redis (`redis://127.0.0.1:6379`, issue
//! 16): the transition script's rules, one write after another as the producer and
//! consumers may send them, in any order. Each test uses its own queue name.

use std::time::{Duration, SystemTime};

use jobgate_shared::status::{
    Answer, State, StatusStore, Transition, Verdict, MAX_ERROR_BYTES, MAX_RESULT_BYTES,
};

use crate::helpers::{brokers_shared, unique};

const REDIS_URL: &str = "redis://127.0.0.1:6379";
const OWNER: &str = "owner-a";

fn store(ttl: Duration) -> StatusStore {
    StatusStore::new(&REDIS_URL.parse().unwrap(), ttl).expect("a status store")
}

/// A store, a queue of this test's own and a job id.
fn fresh() -> (StatusStore, String, &'static str) {
    (store(Duration::from_secs(600)), unique("status"), "job-1")
}

async fn apply(store: &StatusStore, queue: &str, id: &str, t: Transition<'_>) -> Answer {
    store.apply(queue, id, t).await.expect("Redis answers")
}

async fn state_of(store: &StatusStore, queue: &str, id: &str) -> (State, u32) {
    let status = store.get(queue, id).await.unwrap().expect("a record");
    (status.state, status.attempts)
}

fn applied(state: State) -> Answer {
    Answer {
        verdict: Verdict::Applied,
        state: Some(state),
    }
}

fn answer(verdict: Verdict, state: State) -> Answer {
    Answer {
        verdict,
        state: Some(state),
    }
}

fn retrying(attempt: u32) -> Transition<'static> {
    Transition::Retrying {
        attempt,
        due: SystemTime::now() + Duration::from_secs(1),
        error: "boom",
    }
}

#[tokio::test]
async fn a_job_goes_queued_running_retrying_running_done() {
    let _brokers = brokers_shared().await;
    let (s, q, id) = fresh();
    let queued = Transition::Queued { owner: OWNER };
    assert_eq!(apply(&s, &q, id, queued).await, applied(State::Queued));
    let status = s.get(&q, id).await.unwrap().unwrap();
    assert_eq!((status.state, status.attempts), (State::Queued, 0));
    assert!(status.created_at.is_some());
    let running = |attempt| Transition::Running { attempt };
    assert_eq!(apply(&s, &q, id, running(1)).await, applied(State::Running));
    assert_eq!(
        apply(&s, &q, id, retrying(1)).await,
        applied(State::Retrying)
    );
    let status = s.get(&q, id).await.unwrap().unwrap();
    assert_eq!(status.last_error.as_deref(), Some("boom"));
    assert!(status.next_attempt_at.is_some());
    assert_eq!(apply(&s, &q, id, running(2)).await, applied(State::Running));
    assert!(s
        .get(&q, id)
        .await
        .unwrap()
        .unwrap()
        .next_attempt_at
        .is_none());
    let done = Transition::Done {
        attempt: 2,
        result: Some(b"42"),
    };
    assert_eq!(apply(&s, &q, id, done).await, applied(State::Done));
    let status = s.get(&q, id).await.unwrap().unwrap();
    assert_eq!((status.state, status.attempts), (State::Done, 2));
    assert_eq!(status.result.as_deref(), Some("42"));
    assert!(status.finished_at.is_some());
    assert_eq!(status.owner.as_deref(), Some(OWNER));
}

#[tokio::test]
async fn a_late_running_never_overwrites_a_final_state() {
    let _brokers = brokers_shared().await;
    let s = store(Duration::from_secs(600));
    let q = unique("status");
    let late = Transition::Running { attempt: 1 };
    let finals = [
        (
            "done",
            Transition::Done {
                attempt: 1,
                result: None,
            },
            State::Done,
            Verdict::Skip,
        ),
        (
            "dead",
            Transition::Dead {
                attempt: 1,
                error: "bad",
            },
            State::Dead,
            Verdict::Stale,
        ),
    ];
    for (id, last, state, verdict) in finals {
        apply(&s, &q, id, Transition::Queued { owner: OWNER }).await;
        apply(&s, &q, id, Transition::Running { attempt: 1 }).await;
        assert_eq!(apply(&s, &q, id, last).await, applied(state));
        assert_eq!(
            apply(&s, &q, id, late).await,
            answer(verdict, state),
            "{id}"
        );
        assert_eq!(
            apply(&s, &q, id, retrying(1)).await,
            answer(Verdict::Stale, state)
        );
        assert_eq!(state_of(&s, &q, id).await.0, state, "{id}");
    }
    // Cancelled: a consumer that receives it skips it; nothing moves it back.
    apply(&s, &q, "cancelled", Transition::Queued { owner: OWNER }).await;
    let cancel = Transition::Cancel { owner: OWNER };
    assert_eq!(
        apply(&s, &q, "cancelled", cancel).await,
        applied(State::Cancelled)
    );
    assert_eq!(
        apply(&s, &q, "cancelled", late).await,
        answer(Verdict::Skip, State::Cancelled)
    );
    let done = Transition::Done {
        attempt: 1,
        result: None,
    };
    assert_eq!(
        apply(&s, &q, "cancelled", done).await,
        answer(Verdict::Stale, State::Cancelled)
    );
}

#[tokio::test]
async fn writes_of_an_older_attempt_do_not_overwrite_a_newer_one() {
    let _brokers = brokers_shared().await;
    let (s, q, id) = fresh();
    apply(&s, &q, id, Transition::Running { attempt: 2 }).await;
    // Attempt 1's failure arrives after attempt 2 started.
    assert_eq!(
        apply(&s, &q, id, retrying(1)).await,
        answer(Verdict::Stale, State::Running)
    );
    assert_eq!(
        apply(&s, &q, id, retrying(2)).await,
        applied(State::Retrying)
    );
    // A late start of attempt 2 (or 1) after attempt 2 failed.
    for attempt in [1, 2] {
        assert_eq!(
            apply(&s, &q, id, Transition::Running { attempt }).await,
            answer(Verdict::Stale, State::Retrying)
        );
    }
    assert_eq!(state_of(&s, &q, id).await, (State::Retrying, 2));
    // The same attempt delivered again after a crash starts again.
    apply(&s, &q, id, Transition::Running { attempt: 3 }).await;
    assert_eq!(
        apply(&s, &q, id, Transition::Running { attempt: 3 }).await,
        applied(State::Running)
    );
}

#[tokio::test]
async fn a_queued_write_after_the_consumer_started_keeps_the_state_and_adds_the_owner() {
    let _brokers = brokers_shared().await;
    let (s, q, id) = fresh();
    apply(&s, &q, id, Transition::Running { attempt: 1 }).await;
    let status = s.get(&q, id).await.unwrap().unwrap();
    assert_eq!(
        status.owner, None,
        "no owner until the producer's write lands"
    );
    assert_eq!(
        apply(&s, &q, id, Transition::Queued { owner: OWNER }).await,
        answer(Verdict::Stale, State::Running)
    );
    let status = s.get(&q, id).await.unwrap().unwrap();
    assert_eq!(status.state, State::Running);
    assert_eq!(status.owner.as_deref(), Some(OWNER));
    assert!(status.created_at.is_some());
    assert!(s.get_for(&q, id, OWNER).await.unwrap().is_some());
    assert!(s.get_for(&q, id, "owner-b").await.unwrap().is_none());
}

/// The producer's `queued` and a consumer's first `running` each read their clock before
/// their write lands; when the later-timed `queued` lands first, the record still never
/// says the job was created after it started (the console's timeline showed that).
#[tokio::test]
async fn a_start_timed_before_the_queued_write_that_landed_first_is_not_before_the_creation() {
    let _brokers = brokers_shared().await;
    let (s, q, id) = fresh();
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let script = redis::Script::new(jobgate_shared::status::TRANSITION_SCRIPT);
    // ARGV: op, now (ms), ttl (ms), attempt, owner, text, due, truncated, replays.
    let key = format!("jobgate:status:{q}:{id}");
    let write = |op: &str, now: u64, attempt: u32| {
        let mut call = script.prepare_invoke();
        call.key(&key)
            .arg(op)
            .arg(now)
            .arg(600_000)
            .arg(attempt)
            .arg(OWNER)
            .arg("")
            .arg(0)
            .arg("0")
            .arg(0);
        call
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let landed: Vec<String> = write("queued", now, 0)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(landed, ["applied", "queued"]);
    let landed: Vec<String> = write("running", now - 40, 1)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(landed, ["applied", "running"]);
    let status = s.get(&q, id).await.unwrap().expect("a record");
    assert_eq!(status.state, State::Running);
    assert_eq!(status.created_at, status.started_at, "{status:?}");
    assert_eq!(status.owner.as_deref(), Some(OWNER));

    // In the usual order nothing moves: created first, started later.
    let (s, q, id) = fresh();
    apply(&s, &q, id, Transition::Queued { owner: OWNER }).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    apply(&s, &q, id, Transition::Running { attempt: 1 }).await;
    let status = s.get(&q, id).await.unwrap().expect("a record");
    assert!(status.created_at < status.started_at, "{status:?}");
}

#[tokio::test]
async fn cancel_takes_waiting_jobs_of_its_owner_only() {
    let _brokers = brokers_shared().await;
    let s = store(Duration::from_secs(600));
    let q = unique("status");
    let cancel = |owner| Transition::Cancel { owner };
    // Unknown, or another owner's: missing, and nothing written.
    let missing = Answer {
        verdict: Verdict::Missing,
        state: None,
    };
    assert_eq!(apply(&s, &q, "nobody", cancel(OWNER)).await, missing);
    assert!(s.get(&q, "nobody").await.unwrap().is_none());
    apply(&s, &q, "queued", Transition::Queued { owner: OWNER }).await;
    assert_eq!(apply(&s, &q, "queued", cancel("owner-b")).await, missing);
    assert_eq!(state_of(&s, &q, "queued").await.0, State::Queued);
    assert_eq!(
        apply(&s, &q, "queued", cancel(OWNER)).await,
        applied(State::Cancelled)
    );
    assert_eq!(
        apply(&s, &q, "queued", cancel(OWNER)).await,
        answer(Verdict::Final, State::Cancelled)
    );
    // Waiting for a retry: cancellable, and the due time goes.
    apply(&s, &q, "retrying", Transition::Queued { owner: OWNER }).await;
    apply(&s, &q, "retrying", Transition::Running { attempt: 1 }).await;
    apply(&s, &q, "retrying", retrying(1)).await;
    assert_eq!(
        apply(&s, &q, "retrying", cancel(OWNER)).await,
        applied(State::Cancelled)
    );
    assert!(s
        .get(&q, "retrying")
        .await
        .unwrap()
        .unwrap()
        .next_attempt_at
        .is_none());
    // Running: refused, left running.
    apply(&s, &q, "running", Transition::Queued { owner: OWNER }).await;
    apply(&s, &q, "running", Transition::Running { attempt: 1 }).await;
    assert_eq!(
        apply(&s, &q, "running", cancel(OWNER)).await,
        answer(Verdict::Running, State::Running)
    );
    // Done: refused.
    let done = Transition::Done {
        attempt: 1,
        result: None,
    };
    apply(&s, &q, "running", done).await;
    assert_eq!(
        apply(&s, &q, "running", cancel(OWNER)).await,
        answer(Verdict::Final, State::Done)
    );
}

#[tokio::test]
async fn errors_and_results_are_bounded_and_the_record_expires() {
    let _brokers = brokers_shared().await;
    let s = store(Duration::from_secs(30));
    let q = unique("status");
    let long_error = "e".repeat(MAX_ERROR_BYTES * 3);
    apply(
        &s,
        &q,
        "dead",
        Transition::Dead {
            attempt: 1,
            error: &long_error,
        },
    )
    .await;
    let status = s.get(&q, "dead").await.unwrap().unwrap();
    assert_eq!(status.last_error.map(|e| e.len()), Some(MAX_ERROR_BYTES));

    let big = vec![b'r'; MAX_RESULT_BYTES + 10];
    let done = Transition::Done {
        attempt: 1,
        result: Some(&big),
    };
    apply(&s, &q, "big", done).await;
    let status = s.get(&q, "big").await.unwrap().unwrap();
    assert_eq!(status.result.map(|r| r.len()), Some(MAX_RESULT_BYTES));
    assert!(status.result_truncated);
    let small = Transition::Done {
        attempt: 1,
        result: Some(b"ok"),
    };
    apply(&s, &q, "small", small).await;
    assert!(!s.get(&q, "small").await.unwrap().unwrap().result_truncated);

    // Every applied write starts the TTL anew: the record goes by itself.
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("jobgate:status:{q}:big"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 30_000, "{ttl}");
}

#[tokio::test]
async fn a_batch_is_queued_in_one_write() {
    let _brokers = brokers_shared().await;
    let s = store(Duration::from_secs(600));
    let q = unique("status");
    let ids: Vec<String> = (0..50).map(|i| format!("item-{i}")).collect();
    // One of them was started by a consumer already.
    apply(&s, &q, "item-7", Transition::Running { attempt: 1 }).await;
    s.queued_many(&q, &ids, OWNER).await.unwrap();
    for id in &ids {
        let status = s.get_for(&q, id, OWNER).await.unwrap().expect(id);
        let expected = if id == "item-7" {
            State::Running
        } else {
            State::Queued
        };
        assert_eq!(status.state, expected, "{id}");
    }
}

#[tokio::test]
async fn a_store_that_cannot_be_reached_is_an_error_within_its_bound() {
    let s = StatusStore::new(
        &"redis://127.0.0.1:1".parse().unwrap(),
        Duration::from_secs(60),
    )
    .unwrap();
    // Each call is bounded (one second), so these return errors instead of hanging.
    assert!(s
        .apply("q", "id", Transition::Running { attempt: 1 })
        .await
        .is_err());
    assert!(s.get("q", "id").await.is_err());
}

async fn apply_in(
    store: &StatusStore,
    queue: &str,
    id: &str,
    replays: u32,
    t: Transition<'_>,
) -> Answer {
    store
        .apply_in(queue, id, replays, t)
        .await
        .expect("Redis answers")
}

/// A dead job replayed from its DLQ starts a new life, whichever write of that life
/// comes first (the tool's `replayed` or the consumer's `running`); writes of the old
/// life are stale from then on, and the new life ends in a state of its own.
#[tokio::test]
async fn a_replayed_dead_job_starts_a_new_life_and_the_old_life_is_stale() {
    let _brokers = brokers_shared().await;
    let s = store(Duration::from_secs(600));
    let q = unique("status");
    for (id, tool_first) in [("tool-first", true), ("consumer-first", false)] {
        apply(&s, &q, id, Transition::Queued { owner: OWNER }).await;
        apply(&s, &q, id, Transition::Running { attempt: 1 }).await;
        apply(&s, &q, id, retrying(1)).await;
        apply(&s, &q, id, Transition::Running { attempt: 2 }).await;
        let dead = Transition::Dead {
            attempt: 2,
            error: "boom",
        };
        assert_eq!(apply(&s, &q, id, dead).await, applied(State::Dead));
        // The tool's write without a new life is refused: only a replay starts one.
        assert_eq!(
            apply_in(&s, &q, id, 0, Transition::Replayed).await,
            answer(Verdict::Stale, State::Dead),
            "{id}"
        );

        let running = Transition::Running { attempt: 1 };
        if tool_first {
            assert_eq!(
                apply_in(&s, &q, id, 1, Transition::Replayed).await,
                applied(State::Queued),
                "{id}"
            );
            let status = s.get(&q, id).await.unwrap().unwrap();
            assert_eq!(
                (status.state, status.attempts, status.replays),
                (State::Queued, 0, 1)
            );
            assert!(
                status.replayed_at.is_some() && status.finished_at.is_none(),
                "{status:?}"
            );
            assert_eq!(
                status.last_error.as_deref(),
                Some("boom"),
                "the old life's error stays"
            );
            assert_eq!(status.owner.as_deref(), Some(OWNER), "the owner stays");
            assert_eq!(
                apply_in(&s, &q, id, 1, running).await,
                applied(State::Running)
            );
        } else {
            assert_eq!(
                apply_in(&s, &q, id, 1, running).await,
                applied(State::Running)
            );
            // The tool's write lands after the consumer's start: nothing to do.
            assert_eq!(
                apply_in(&s, &q, id, 1, Transition::Replayed).await,
                answer(Verdict::Stale, State::Running),
                "{id}"
            );
        }
        assert_eq!(state_of(&s, &q, id).await, (State::Running, 1), "{id}");

        // A late write of the first life changes nothing now.
        let old_done = Transition::Done {
            attempt: 2,
            result: None,
        };
        assert_eq!(
            apply_in(&s, &q, id, 0, old_done).await,
            answer(Verdict::Stale, State::Running),
            "{id}"
        );
        let done = Transition::Done {
            attempt: 1,
            result: Some(b"second life"),
        };
        assert_eq!(apply_in(&s, &q, id, 1, done).await, applied(State::Done));
        let status = s.get(&q, id).await.unwrap().unwrap();
        assert_eq!(
            (status.state, status.attempts, status.replays),
            (State::Done, 1, 1)
        );
        assert_eq!(status.result.as_deref(), Some("second life"));
        // Done is final within its life: a running of the same life is skipped.
        assert_eq!(
            apply_in(&s, &q, id, 1, running).await,
            answer(Verdict::Skip, State::Done)
        );
    }
    // No record (never written, or expired): the tool's write creates nothing.
    assert_eq!(
        apply_in(&s, &q, "unknown", 1, Transition::Replayed).await,
        Answer {
            verdict: Verdict::Missing,
            state: None
        }
    );
    assert!(s.get(&q, "unknown").await.unwrap().is_none());
}
