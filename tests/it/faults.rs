//! Fault injection with a ledger, Jepsen style: jobs flow through the real binaries while
//! a broker stops or crashes, consumer replicas are SIGKILLed mid-job, or the producer is
//! SIGTERMed under load. Afterwards every job that got a 202 is accounted for: processed
//! once, more than once (a duplicate: allowed, at least once, but bounded by what was in
//! flight), or lost (never allowed).
//!
//! Processing is traced outside the consumers: they run the `exec` handler, whose command
//! appends `$JOB_ID` to a file, so a job finished by a replica that is SIGKILLed right
//! after still counts. Every scenario holds [`brokers_exclusive`]: a broker fault disturbs
//! every other test, and the ones that only kill jobgate processes run alone too, so
//! their ledgers measure the fault and not the load of other tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::Value;

use crate::consumer_metrics::listener_url;
use crate::helpers::{
    brokers_exclusive, brokers_sh, http_client, rabbit, unique, wait_until, Backend, Consumer,
    Producer, Site, KAFKA_PARTITIONS,
};
use crate::macros::SCENARIO_LIMIT;

/// The producer's `JOBGATE_PUBLISH_TIMEOUT_MS` in these scenarios.
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_millis(2000);
/// A request's limit on the client side. The producer answers within its publish
/// timeout; a request still unanswered this long after is a hang, and fails the test.
const ANSWER_LIMIT: Duration = PUBLISH_TIMEOUT.saturating_add(Duration::from_secs(5));
/// Every answer must come within the publish timeout; this margin covers scheduling on
/// a loaded 2-core machine (a hang is a failure at `ANSWER_LIMIT` anyway).
const ANSWERED_WITHIN: Duration = PUBLISH_TIMEOUT.saturating_add(Duration::from_millis(1500));
/// How long a posting client waits after a request that got no 202.
const BACK_OFF: Duration = Duration::from_millis(500);
/// How long the consumers get to process every accepted job once the fault is over.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);
/// The Kafka consumer's `auto.commit.interval.ms`: a job finished less than this long
/// before its replica dies may not be committed, and runs again.
const KAFKA_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

on_both_backends!(
    consumer_replicas_sigkilled_mid_job_lose_no_job,
    producer_sigterm_under_load_answers_every_request_and_loses_no_job,
);

#[tokio::test]
async fn rabbitmq_stop_app_under_load_loses_no_job() {
    bounded(broker_outage_loses_no_job(BrokerFault::RabbitmqStopApp)).await;
}

#[tokio::test]
async fn rabbitmq_node_restart_under_load_loses_no_job() {
    bounded(broker_outage_loses_no_job(BrokerFault::RabbitmqRestart)).await;
}

#[tokio::test]
async fn kafka_broker_sigkilled_under_load_loses_no_job() {
    bounded(broker_outage_loses_no_job(BrokerFault::KafkaKill)).await;
}

#[tokio::test]
async fn rabbitmq_frozen_with_sigstop_under_load_turns_unready_and_loses_no_job() {
    bounded(broker_outage_loses_no_job(BrokerFault::RabbitmqFreeze)).await;
}

#[tokio::test]
async fn kafka_frozen_with_sigstop_under_load_turns_unready_and_loses_no_job() {
    bounded(broker_outage_loses_no_job(BrokerFault::KafkaFreeze)).await;
}

/// The same backstop `on_both_backends!` puts around a scenario.
async fn bounded(scenario: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(SCENARIO_LIMIT, scenario)
        .await
        .expect("the scenario finished within SCENARIO_LIMIT");
}

/// A way to take a broker away, and to bring it back.
#[derive(Debug, Clone, Copy)]
enum BrokerFault {
    /// `rabbitmqctl stop_app`, then `start_app`: the node stays, AMQP closes.
    RabbitmqStopApp,
    /// The whole RabbitMQ node stopped (`rabbitmqctl stop`) and started again.
    RabbitmqRestart,
    /// The Kafka broker SIGKILLed, then started again on the same data.
    KafkaKill,
    /// The RabbitMQ node frozen with SIGSTOP (its sockets stay open: a half-open
    /// connection, as with a hung node), then thawed with SIGCONT.
    RabbitmqFreeze,
    /// The Kafka broker frozen with SIGSTOP, then thawed with SIGCONT.
    KafkaFreeze,
}

impl BrokerFault {
    fn backend(self) -> Backend {
        match self {
            Self::RabbitmqStopApp | Self::RabbitmqRestart | Self::RabbitmqFreeze => {
                Backend::Rabbitmq
            }
            Self::KafkaKill | Self::KafkaFreeze => Backend::Kafka,
        }
    }

    /// Whether the broker keeps its sockets open while away: nothing tells the clients
    /// it is gone but silence (heartbeats, timeouts).
    fn is_freeze(self) -> bool {
        matches!(self, Self::RabbitmqFreeze | Self::KafkaFreeze)
    }

    async fn inject(self) {
        match self {
            Self::RabbitmqStopApp => rabbit::stop_app().await,
            Self::RabbitmqRestart => brokers_sh(&["down", "rabbitmq"]).await,
            Self::KafkaKill => brokers_sh(&["kill", "kafka"]).await,
            Self::RabbitmqFreeze => brokers_sh(&["pause", "rabbitmq"]).await,
            Self::KafkaFreeze => brokers_sh(&["pause", "kafka"]).await,
        }
    }

    /// Returns once the broker accepts clients again.
    async fn heal(self) {
        match self {
            Self::RabbitmqStopApp => rabbit::start_app().await,
            Self::RabbitmqRestart => brokers_sh(&["up", "rabbitmq"]).await,
            Self::KafkaKill => brokers_sh(&["up", "kafka"]).await,
            Self::RabbitmqFreeze => {
                brokers_sh(&["resume", "rabbitmq"]).await;
                brokers_sh(&["up", "rabbitmq"]).await;
            }
            Self::KafkaFreeze => {
                brokers_sh(&["resume", "kafka"]).await;
                brokers_sh(&["up", "kafka"]).await;
            }
        }
    }
}

/// Jobs one disruption of `replicas` consumer replicas can run twice: those whose
/// processing finished (the trace is written) but whose settlement the broker never got.
pub(crate) fn in_flight_window(
    backend: Backend,
    replicas: usize,
    concurrency: usize,
    handler: Duration,
) -> usize {
    match backend {
        // The running jobs, plus the prefetched ones (the prefetch is the concurrency) a
        // worker may still run after its channel closed.
        Backend::Rabbitmq => replicas * concurrency * 2,
        // The running and prefetched jobs, plus those finished since the last
        // auto-commit: at most `concurrency` per handler duration.
        Backend::Kafka => {
            let per_commit = KAFKA_COMMIT_INTERVAL
                .as_millis()
                .div_ceil(handler.as_millis().max(1));
            replicas * concurrency * (2 + usize::try_from(per_commit).unwrap())
        }
    }
}

/// A broker taken away while 2 replicas consume and 4 clients post: requests during the
/// outage get 202 or 503, none hangs; once the broker is back the same producer and
/// consumers carry on, and no accepted job is lost.
async fn broker_outage_loses_no_job(fault: BrokerFault) {
    const REPLICAS: usize = 2;
    const CONCURRENCY: usize = 4;
    const HANDLER: Duration = Duration::from_millis(50);
    let _brokers = brokers_exclusive().await;
    let backend = fault.backend();
    let queue = unique("fault");
    let _cleanup = backend.cleanup(&[&queue]);
    let ledger = Ledger::new(backend, &queue);
    let producer = Producer::start(backend, &[&queue], &ledger.producer_env()).await;
    let mut consumers = Vec::new();
    for _ in 0..REPLICAS {
        consumers.push(
            Consumer::start(backend, &queue, &ledger.consumer_env(CONCURRENCY, HANDLER)).await,
        );
    }
    backend
        .wait_group_stable(&consumers.iter().collect::<Vec<_>>(), KAFKA_PARTITIONS)
        .await;

    let load = ledger.load(&producer, 300, 4, Duration::from_millis(100));
    ledger.wait_accepted(50).await;
    ledger.fault_begins();
    let outage = async {
        fault.inject().await;
        // Enough requests meet the broker gone (answered 503, or 202 if it came back
        // within the publish timeout).
        ledger.wait_answered_during_fault(8).await;
        if fault.is_freeze() {
            // No error reaches the producer from a silent broker: it must notice by
            // itself (AMQP heartbeat, Kafka metadata requests) and say it is not ready.
            wait_until(
                Duration::from_secs(30),
                "the producer's /readyz to turn 503 while the broker is frozen",
                || async { producer.readyz().await == 503 },
            )
            .await;
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            for consumer in &consumers {
                let readyz = format!("{}/readyz", listener_url(consumer).await);
                wait_until(
                    Duration::from_secs(30),
                    "each consumer's /readyz to turn 503 while the broker is frozen",
                    || async {
                        http.get(&readyz)
                            .send()
                            .await
                            .is_ok_and(|r| r.status() == 503)
                    },
                )
                .await;
            }
        }
    };
    // Bring the broker back even when the outage failed, for the other tests.
    let outcome = std::panic::AssertUnwindSafe(outage).catch_unwind().await;
    fault.heal().await;
    ledger.fault_ends();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    load.finish().await;

    // The same processes, no restart: ready again, and new jobs get 202.
    producer.wait_ready(Duration::from_secs(60)).await;
    ledger.post_expecting_202(&producer, 20).await;

    ledger
        .settle_and_verify(
            &mut consumers,
            &Expect {
                fault: "broker outage",
                broker_down: true,
                producer_stops: false,
                max_duplicates: in_flight_window(backend, REPLICAS, CONCURRENCY, HANDLER),
            },
        )
        .await;
}

/// 3 replicas run a slow handler while jobs are posted; 5 times one of them is SIGKILLed
/// while it runs a job and a new one takes its place. The jobs it was running run again
/// elsewhere; none is lost.
async fn consumer_replicas_sigkilled_mid_job_lose_no_job(backend: Backend) {
    const REPLICAS: usize = 3;
    const CONCURRENCY: usize = 4;
    const KILLS: usize = 5;
    const HANDLER: Duration = Duration::from_millis(300);
    let _brokers = brokers_exclusive().await;
    let queue = unique("sigkill");
    let _cleanup = backend.cleanup(&[&queue]);
    let ledger = Ledger::new(backend, &queue);
    let producer = Producer::start(backend, &[&queue], &ledger.producer_env()).await;
    let env = ledger.consumer_env(CONCURRENCY, HANDLER);
    let mut consumers = Vec::new();
    for _ in 0..REPLICAS {
        consumers.push(Consumer::start(backend, &queue, &env).await);
    }
    backend
        .wait_group_stable(&consumers.iter().collect::<Vec<_>>(), KAFKA_PARTITIONS)
        .await;

    // Posting goes on until the last kill, so every victim has jobs to run.
    let load = ledger.load(&producer, 600, 4, Duration::from_millis(150));
    ledger.wait_accepted(20).await;
    ledger.fault_begins();
    for _ in 0..KILLS {
        // Not an assertion: spreads the kills over the posting, one a second or so.
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Mid-job: a replica that started a job whose processing has not finished (the
        // oldest replica first, so new ones die too).
        let mut victim = None;
        wait_until(Duration::from_secs(30), "a replica to run a job", || {
            let traced = ledger.traced();
            victim = consumers
                .iter()
                .position(|c| c.started().into_iter().any(|id| !traced.contains_key(&id)));
            std::future::ready(victim.is_some())
        })
        .await;
        let mut victim = consumers.remove(victim.expect("found a victim"));
        victim.process.kill();
        victim.process.wait_exit(Duration::from_secs(10)).await;
        consumers.push(Consumer::start(backend, &queue, &env).await);
    }
    ledger.fault_ends();
    load.stop().await;

    // A kill strands the victim's jobs; on Kafka each kill and each replacement also
    // rebalances the group, which strands every replica's uncommitted jobs.
    let disruptions = match backend {
        Backend::Rabbitmq => KILLS,
        Backend::Kafka => 2 * KILLS,
    };
    let window = match backend {
        Backend::Rabbitmq => in_flight_window(backend, 1, CONCURRENCY, HANDLER),
        Backend::Kafka => in_flight_window(backend, REPLICAS, CONCURRENCY, HANDLER),
    };
    ledger
        .settle_and_verify(
            &mut consumers,
            &Expect {
                fault: "consumer replicas SIGKILLed",
                broker_down: false,
                producer_stops: false,
                max_duplicates: disruptions * window,
            },
        )
        .await;
}

/// The producer SIGTERMed while 4 clients post: every request it took is answered (202,
/// or 503 while it stops), it exits 0, and every 202'd job is processed.
async fn producer_sigterm_under_load_answers_every_request_and_loses_no_job(backend: Backend) {
    const CONCURRENCY: usize = 8;
    let _brokers = brokers_exclusive().await;
    let queue = unique("psigterm");
    let _cleanup = backend.cleanup(&[&queue]);
    let ledger = Ledger::new(backend, &queue);
    let mut producer = Producer::start(backend, &[&queue], &ledger.producer_env()).await;
    let mut consumers = vec![
        Consumer::start(
            backend,
            &queue,
            &ledger.consumer_env(CONCURRENCY, Duration::ZERO),
        )
        .await,
    ];
    backend
        .wait_group_stable(&consumers.iter().collect::<Vec<_>>(), KAFKA_PARTITIONS)
        .await;

    // No pause between requests: the producer has requests in flight when the signal
    // comes.
    let load = ledger.load(&producer, 300, 4, Duration::ZERO);
    ledger.wait_accepted(50).await;
    ledger.fault_begins();
    producer.process.terminate();
    assert_eq!(
        producer.process.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "the producer exits 0 after SIGTERM"
    );
    load.finish().await;
    ledger.fault_ends();

    ledger
        .settle_and_verify(
            &mut consumers,
            &Expect {
                fault: "producer SIGTERMed",
                broker_down: false,
                producer_stops: true,
                // The consumer is not disturbed.
                max_duplicates: 0,
            },
        )
        .await;
}

/// What a scenario allows.
pub(crate) struct Expect {
    /// Names the fault in the summary.
    pub(crate) fault: &'static str,
    /// The broker is taken away: 503 `broker-unavailable` answers are allowed.
    pub(crate) broker_down: bool,
    /// The producer stops: 503 `shutting-down` answers, and requests cut off or refused
    /// after the signal, are allowed.
    pub(crate) producer_stops: bool,
    /// Most extra processing runs (a job processed 3 times counts 2).
    pub(crate) max_duplicates: usize,
}

/// How one request ended.
#[derive(Debug, Clone)]
enum Answer {
    /// 202 with this job id.
    Accepted(String),
    /// 503 problem+json with `Retry-After`, of this type slug.
    Unavailable(String),
    /// No connection: the producer is gone (its listener is closed).
    Refused,
    /// The connection closed before an answer came.
    CutOff(String),
    /// Anything else: another status, a malformed answer, or no answer within
    /// [`ANSWER_LIMIT`] (a hang).
    Wrong(String),
}

/// One request of the ledger.
#[derive(Debug)]
struct Request {
    started: Instant,
    /// Sent while the fault was under way.
    during_fault: bool,
    took: Duration,
    answer: Answer,
}

/// Every request and its answer, the processing trace, and the verdict.
pub(crate) struct Ledger {
    backend: Backend,
    /// Where the queue is: the single nodes, or a cluster.
    site: Site,
    queue: String,
    /// The file the consumers' `exec` command appends each processed job id to.
    trace: PathBuf,
    http: reqwest::Client,
    requests: Mutex<Vec<Request>>,
    fault: AtomicBool,
    /// When the ledger was opened, and when the fault began and ended (for the summary).
    times: Mutex<(Instant, Option<Instant>, Option<Instant>)>,
}

/// Posting tasks started by [`Ledger::load`].
pub(crate) struct Load {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The number of the next job to post.
    next: Arc<AtomicUsize>,
    jobs: usize,
}

impl Load {
    /// Waits until every job was posted.
    pub(crate) async fn finish(self) {
        for task in self.tasks {
            task.await.expect("a posting task panicked");
        }
    }

    /// Posts no new job, and waits for the requests under way.
    pub(crate) async fn stop(self) {
        self.next.store(self.jobs, Ordering::SeqCst);
        self.finish().await;
    }
}

impl Ledger {
    fn new(backend: Backend, queue: &str) -> Arc<Self> {
        Self::at(backend, Site::Single, queue)
    }

    /// A ledger of `queue` on the brokers of `site`.
    pub(crate) fn at(backend: Backend, site: Site, queue: &str) -> Arc<Self> {
        let trace = std::env::temp_dir().join(format!("{}.trace", unique("ledger")));
        std::fs::write(&trace, "").expect("create the trace file");
        Arc::new(Self {
            backend,
            site,
            queue: queue.to_owned(),
            trace,
            http: http_client(ANSWER_LIMIT),
            requests: Mutex::new(Vec::new()),
            fault: AtomicBool::new(false),
            times: Mutex::new((Instant::now(), None, None)),
        })
    }

    pub(crate) fn producer_env(&self) -> Vec<(&'static str, String)> {
        vec![(
            "JOBGATE_PUBLISH_TIMEOUT_MS",
            PUBLISH_TIMEOUT.as_millis().to_string(),
        )]
    }

    /// A consumer whose handler takes `handler`, then appends the job id to the trace.
    pub(crate) fn consumer_env(
        &self,
        concurrency: usize,
        handler: Duration,
    ) -> Vec<(&'static str, String)> {
        let script = format!(
            "sleep {}; echo \"$JOB_ID\" >> \"$LEDGER_TRACE\"",
            handler.as_secs_f64()
        );
        vec![
            ("JOBGATE_HANDLER", "exec".to_owned()),
            // `sh -c <script>`: the handler splits words like a shell, runs no shell.
            ("JOBGATE_EXEC_COMMAND", format!("sh -c '{script}'")),
            // The command gets only the consumer's variables named in JOBGATE_EXEC_ENV.
            ("LEDGER_TRACE", self.trace.display().to_string()),
            ("JOBGATE_EXEC_ENV", "PATH,LEDGER_TRACE".to_owned()),
            ("JOBGATE_CONCURRENCY", concurrency.to_string()),
            // Probes on a port of its own, to see readiness while the broker is away.
            ("JOBGATE_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        ]
    }

    /// How many times each job id was processed so far.
    fn traced(&self) -> BTreeMap<String, usize> {
        let text = std::fs::read_to_string(&self.trace).expect("read the trace file");
        let mut counts = BTreeMap::new();
        for id in text.lines().filter(|l| !l.is_empty()) {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
        counts
    }

    fn accepted(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match &r.answer {
                Answer::Accepted(id) => Some(id.clone()),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn fault_begins(&self) {
        self.times.lock().unwrap().1 = Some(Instant::now());
        self.fault.store(true, Ordering::SeqCst);
    }

    pub(crate) fn fault_ends(&self) {
        self.fault.store(false, Ordering::SeqCst);
        self.times.lock().unwrap().2 = Some(Instant::now());
    }

    /// Posts job `n` and records the answer.
    async fn post(&self, url: &str, n: usize) -> Answer {
        let during_fault = self.fault.load(Ordering::SeqCst);
        let started = Instant::now();
        let answer = match self
            .http
            .post(url)
            .body(format!("{{\"n\":{n}}}"))
            .send()
            .await
        {
            Ok(response) => classify(response).await,
            Err(e) if e.is_timeout() => Answer::Wrong(format!("no answer within {ANSWER_LIMIT:?}")),
            Err(e) if e.is_connect() => Answer::Refused,
            Err(e) => Answer::CutOff(format!("{e:?}")),
        };
        self.requests.lock().unwrap().push(Request {
            started,
            during_fault,
            took: started.elapsed(),
            answer: answer.clone(),
        });
        answer
    }

    /// Posts at most `jobs` jobs from `tasks` tasks, each pausing `pause` after a 202 and
    /// [`BACK_OFF`] after anything else.
    pub(crate) fn load(
        self: &Arc<Self>,
        producer: &Producer,
        jobs: usize,
        tasks: usize,
        pause: Duration,
    ) -> Load {
        let next = Arc::new(AtomicUsize::new(0));
        let url = producer.url(&format!("/jobs/{}", self.queue));
        let tasks = (0..tasks)
            .map(|_| {
                let (ledger, next, url) = (Arc::clone(self), Arc::clone(&next), url.clone());
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        if n >= jobs {
                            break;
                        }
                        match ledger.post(&url, n).await {
                            // The producer is gone: nobody takes the rest.
                            Answer::Refused => break,
                            Answer::Accepted(_) => tokio::time::sleep(pause).await,
                            // Back off, as a client told to retry later does, so the
                            // posting spans the fault instead of ending in it.
                            _ => tokio::time::sleep(BACK_OFF).await,
                        }
                    }
                })
            })
            .collect();
        Load { tasks, next, jobs }
    }

    pub(crate) async fn wait_accepted(&self, count: usize) {
        wait_until(Duration::from_secs(60), "jobs to be accepted", || {
            std::future::ready(self.accepted().len() >= count)
        })
        .await;
    }

    pub(crate) async fn wait_answered_during_fault(&self, count: usize) {
        wait_until(
            Duration::from_secs(60),
            "requests during the fault to be answered",
            || {
                let answered = self
                    .requests
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|r| r.during_fault)
                    .count();
                std::future::ready(answered >= count)
            },
        )
        .await;
    }

    /// Posts job after job (recorded, [`BACK_OFF`] apart) until one gets a 202 and
    /// returns how long that took; panics after `limit` with the last answer. For the
    /// moments right after a failover, when the producer is ready again but the broker
    /// may still be electing a queue leader: a 503 then is the failover's, not a fault.
    pub(crate) async fn post_until_accepted(
        &self,
        producer: &Producer,
        limit: Duration,
    ) -> Duration {
        let url = producer.url(&format!("/jobs/{}", self.queue));
        let start = Instant::now();
        for n in 2_000_000.. {
            let answer = self.post(&url, n).await;
            if matches!(answer, Answer::Accepted(_)) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "no 202 within {limit:?} after the fault; the last answer: {answer:?}"
            );
            tokio::time::sleep(BACK_OFF).await;
        }
        unreachable!("two million posts")
    }

    /// Posts `count` jobs one after the other; each must get 202.
    pub(crate) async fn post_expecting_202(&self, producer: &Producer, count: usize) {
        let url = producer.url(&format!("/jobs/{}", self.queue));
        for n in 0..count {
            let answer = self.post(&url, 1_000_000 + n).await;
            assert!(
                matches!(answer, Answer::Accepted(_)),
                "after the fault, a new job got {answer:?}"
            );
        }
    }

    /// Waits (at most [`DRAIN_LIMIT`]) until every accepted job was processed and the
    /// queue is empty, then stops `consumers` gracefully so nothing runs any more, and
    /// checks the ledger against `expect` ([`Ledger::verify`]).
    pub(crate) async fn settle_and_verify(&self, consumers: &mut [Consumer], expect: &Expect) {
        let start = Instant::now();
        let accepted: BTreeSet<String> = self.accepted().into_iter().collect();
        while start.elapsed() < DRAIN_LIMIT {
            let traced = self.traced();
            if accepted.iter().all(|id| traced.contains_key(id))
                && self.backend.pending_at(self.site, &self.queue).await == 0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for consumer in consumers.iter() {
            consumer.process.terminate();
        }
        for consumer in consumers.iter_mut() {
            assert_eq!(
                consumer.process.wait_exit(Duration::from_secs(40)).await,
                Some(0),
                "a consumer exits 0 after SIGTERM"
            );
        }
        // With every consumer gone, RabbitMQ has requeued what they held unacked and
        // Kafka has their final commits: what is pending now would run again.
        let left = self.backend.pending_at(self.site, &self.queue).await;
        self.verify(expect, left);
    }

    /// Classifies every accepted job, prints the summary and asserts what `expect` allows.
    fn verify(&self, expect: &Expect, left: u64) {
        let traced = self.traced();
        let requests = self.requests.lock().unwrap();
        let accepted: BTreeSet<&str> = requests
            .iter()
            .filter_map(|r| match &r.answer {
                Answer::Accepted(id) => Some(id.as_str()),
                _ => None,
            })
            .collect();
        let mut once = 0;
        let mut duplicated = BTreeMap::new();
        let mut lost = Vec::new();
        for id in &accepted {
            match traced.get(*id).copied().unwrap_or(0) {
                0 => lost.push(*id),
                1 => once += 1,
                n => {
                    duplicated.insert(*id, n);
                }
            }
        }
        let extra_runs: usize = duplicated.values().map(|n| n - 1).sum();
        let unaccepted: Vec<&String> = traced
            .keys()
            .filter(|id| !accepted.contains(id.as_str()))
            .collect();
        let mut unavailable: BTreeMap<(&str, bool), usize> = BTreeMap::new();
        let mut cut_off = Vec::new();
        let mut wrong = Vec::new();
        for r in requests.iter() {
            match &r.answer {
                Answer::Accepted(_) => {}
                Answer::Unavailable(slug) => {
                    *unavailable
                        .entry((slug.as_str(), r.during_fault))
                        .or_insert(0) += 1
                }
                Answer::Refused => cut_off.push((r.during_fault, "connection refused")),
                Answer::CutOff(why) => cut_off.push((r.during_fault, why.as_str())),
                Answer::Wrong(why) => wrong.push(why.as_str()),
            }
        }
        let during: Vec<&Request> = requests.iter().filter(|r| r.during_fault).collect();
        let max_during = during.iter().map(|r| r.took).max().unwrap_or_default();
        let (opened, began, ended) = *self.times.lock().unwrap();
        let timeline = match (began, ended) {
            (Some(began), Some(ended)) => {
                let in_flight = requests
                    .iter()
                    .filter(|r| r.started < began && r.started + r.took > began)
                    .count();
                let first_202 = requests
                    .iter()
                    .filter(|r| r.started >= ended && matches!(r.answer, Answer::Accepted(_)))
                    .map(|r| r.started + r.took - ended)
                    .min();
                format!(
                    "the fault began after {:?} with {in_flight} requests in flight and lasted \
                     {:?}; the first 202 after it came {first_202:?} after its end; verified \
                     after {:?}",
                    began - opened,
                    ended - began,
                    opened.elapsed()
                )
            }
            _ => "the fault never ended".to_owned(),
        };
        let summary = format!(
            "ledger ({:?}, {}): {} requests; accepted {}, processed once {once}, duplicates {} \
             ({extra_runs} extra runs, at most {} allowed), lost {}; 503s by (type, during \
             the fault) {unavailable:?}; refused or cut off {}; wrong {}; processed without \
             a 202: {}; {} requests during the fault, slowest answered in {max_during:?}; \
             left in the queue {left}; {timeline}; trace {}",
            self.backend,
            expect.fault,
            requests.len(),
            accepted.len(),
            duplicated.len(),
            expect.max_duplicates,
            lost.len(),
            cut_off.len(),
            wrong.len(),
            unaccepted.len(),
            during.len(),
            self.trace.display(),
        );
        println!("{summary}");

        assert!(wrong.is_empty(), "{summary}\nwrong answers: {wrong:?}");
        assert!(!accepted.is_empty(), "{summary}\nno job was accepted");
        assert!(!during.is_empty(), "{summary}\nno request met the fault");
        assert!(lost.is_empty(), "{summary}\nlost jobs: {lost:?}");
        assert!(
            extra_runs <= expect.max_duplicates,
            "{summary}\nmore duplicates than were in flight: {duplicated:?}"
        );
        for ((slug, during_fault), n) in &unavailable {
            let allowed = match *slug {
                "broker-unavailable" => expect.broker_down,
                "shutting-down" => expect.producer_stops && *during_fault,
                _ => false,
            };
            assert!(
                allowed,
                "{summary}\n{n} unexpected 503 {slug} (during the fault: {during_fault})"
            );
        }
        let unexpected_cut_off: Vec<_> = cut_off
            .iter()
            .filter(|(during, _)| !(expect.producer_stops && *during))
            .collect();
        assert!(
            unexpected_cut_off.is_empty(),
            "{summary}\nrequests without an answer: {unexpected_cut_off:?}"
        );
        let slow: Vec<Duration> = requests
            .iter()
            .filter(|r| matches!(r.answer, Answer::Accepted(_) | Answer::Unavailable(_)))
            .map(|r| r.took)
            .filter(|took| *took > ANSWERED_WITHIN)
            .collect();
        assert!(
            slow.is_empty(),
            "{summary}\nanswers later than the publish timeout ({PUBLISH_TIMEOUT:?}, with \
             {ANSWERED_WITHIN:?} allowed): {slow:?}"
        );
        assert_eq!(left, 0, "{summary}\nthe queue ends empty");
        drop(requests);
        // Kept when an assertion failed: the evidence.
        let _ = std::fs::remove_file(&self.trace);
    }
}

/// Classifies an HTTP answer: 202 with a job id, or 503 problem+json with `Retry-After`.
async fn classify(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").cloned();
    let retry_after = response.headers().contains_key("retry-after");
    let body = match response.text().await {
        Ok(body) => body,
        Err(e) if e.is_timeout() => {
            return Answer::Wrong(format!("{status}: body not read within {ANSWER_LIMIT:?}"))
        }
        Err(e) => return Answer::CutOff(format!("{status}: body cut off: {e:?}")),
    };
    let json: Option<Value> = serde_json::from_str(&body).ok();
    match (status, json) {
        (202, Some(json)) => match json["job_id"].as_str() {
            Some(id) => Answer::Accepted(id.to_owned()),
            None => Answer::Wrong(format!("202 without a job_id: {body}")),
        },
        (503, Some(json))
            if content_type
                .as_ref()
                .is_some_and(|c| c == "application/problem+json")
                && retry_after
                && json["status"] == 503 =>
        {
            match json["type"]
                .as_str()
                .and_then(|t| t.strip_prefix("urn:jobgate:problem:"))
            {
                Some(slug) => Answer::Unavailable(slug.to_owned()),
                None => Answer::Wrong(format!("503 with an unknown problem type: {body}")),
            }
        }
        _ => Answer::Wrong(format!(
            "{status} (content-type {content_type:?}, retry-after {retry_after}): {body}"
        )),
    }
}
