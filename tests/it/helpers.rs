//! Test harness: real brokers, real binaries started as a user starts them.
//!
//! Every test gets its own queue names (unique per test), so tests run in parallel.
//! Tests that stop a broker take the broker lock exclusively; all others share it.
//! [`Backend`] points the binaries at RabbitMQ or Kafka and inspects either broker the
//! same way, so each scenario is written once and runs against both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const MANAGEMENT_URL: &str = "http://127.0.0.1:15672";
pub const KAFKA_BROKERS: &str = "127.0.0.1:9092";
/// Partitions of each topic jobgate creates (its default).
pub const KAFKA_PARTITIONS: u64 = 6;

/// The root of the workspace.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Brings the brokers up once per test run (a no-op when they already answer), and
/// builds the binaries under test so a plain `cargo test` never runs stale ones.
fn prepare() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let root = workspace_root();
        let status = std::process::Command::new("bash")
            .arg(root.join("scripts/brokers.sh"))
            .args(["up", "all"])
            .status()
            .expect("run scripts/brokers.sh");
        assert!(status.success(), "scripts/brokers.sh up all failed");
        let status = std::process::Command::new(env!("CARGO"))
            .current_dir(&root)
            .args([
                "build", "--quiet", "-p", "producer", "-p", "consumer", "--bins",
            ])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
}

/// The path of a workspace binary (built by [`prepare`]).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/it-<hash> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// A unique name for this test's queues.
pub fn unique(prefix: &str) -> String {
    // The tail of a UUID v7 is random (its head is the clock).
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("it-{prefix}-{}", &id[20..])
}

static BROKER_LOCK: RwLock<()> = RwLock::const_new(());

/// The state dir of `scripts/brokers.sh` (its `STATE_ROOT`): broker data, the test
/// certificates (`tls/`) and the broker lock.
pub fn state_dir() -> PathBuf {
    let root = match std::env::var_os("JOBGATE_STATE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".local/state")
            })
            .join("jobgate"),
    };
    std::fs::create_dir_all(&root).expect("create the jobgate state dir");
    root
}

/// The broker lock file shared by every test process on this machine, in the state
/// dir, so concurrent `cargo test` runs see the same lock.
fn broker_lock_path() -> PathBuf {
    state_dir().join("brokers.lock")
}

/// Takes the OS lock on [`broker_lock_path`] (shared or exclusive) on a blocking thread.
/// Each guard opens its own file: with `flock` semantics every open file description is
/// its own lock, so shared holders in one process never block each other, and an
/// exclusive holder waits for the shared holders of every process.
async fn lock_file(exclusive: bool) -> std::fs::File {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(broker_lock_path())
            .expect("open the broker lock file");
        if exclusive {
            file.lock().expect("lock the broker lock file");
        } else {
            file.lock_shared()
                .expect("lock the broker lock file shared");
        }
        file
    })
    .await
    .expect("the lock task does not panic")
}

/// Holds the broker lock, in this process and across processes, until dropped.
pub struct BrokerGuard<G> {
    // Field order is drop order: the file lock goes first, then the in-process lock.
    _file: std::fs::File,
    _local: G,
}

/// Taken by every test that needs the brokers as they are.
pub async fn brokers_shared() -> BrokerGuard<RwLockReadGuard<'static, ()>> {
    prepare();
    let local = BROKER_LOCK.read().await;
    let file = lock_file(false).await;
    BrokerGuard {
        _file: file,
        _local: local,
    }
}

/// Taken by tests that stop or disturb a broker: they run alone, across processes.
pub async fn brokers_exclusive() -> BrokerGuard<RwLockWriteGuard<'static, ()>> {
    prepare();
    // The in-process write lock first: once it is held, this process has no shared file
    // locks of its own left, so waiting for the file lock cannot wait on ourselves.
    let local = BROKER_LOCK.write().await;
    let file = lock_file(true).await;
    BrokerGuard {
        _file: file,
        _local: local,
    }
}

/// Polls `check` every 50 ms until it returns true; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running binary whose JSON log lines (stderr) are collected.
pub struct Process {
    pub name: String,
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
}

impl Process {
    /// Starts binary `bin` with `env` (and JSON logs), without waiting for anything.
    pub async fn spawn(name: &str, bin: &str, env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(binary(bin));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("JOBGATE_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,consumer=debug,producer=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let label = name.to_owned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("[{label}] {line}");
                }
                // Lines that are not JSON (a panic message, say) are kept as strings.
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push(value);
            }
        });
        Self {
            name: name.to_owned(),
            child,
            logs,
        }
    }

    /// Log lines whose `message` is `message`.
    pub fn lines(&self, message: &str) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l["message"] == message)
            .cloned()
            .collect()
    }

    /// Every log line for which `matches` is true, in the order they were written.
    pub fn lines_where(&self, matches: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| matches(l))
            .cloned()
            .collect()
    }

    /// The last log line for which `matches` is true.
    pub fn last_where(&self, matches: impl Fn(&Value) -> bool) -> Option<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|l| matches(l))
            .cloned()
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("process still running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// The process id (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("process still running")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGKILL: the process gets no chance to settle anything.
    pub fn kill(&self) {
        self.signal("-KILL");
    }

    /// Waits for the process to exit (at most `limit`) and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {limit:?}", self.name))
            .expect("wait for child");
        status.code()
    }

    /// True once the process has exited (killed, say), without waiting.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Every log line so far, for failure messages.
    pub fn dump(&self) -> String {
        let logs = self.logs.lock().unwrap();
        logs.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// A running `producer`.
pub struct Producer {
    pub process: Process,
    pub base_url: String,
    pub http: reqwest::Client,
}

impl Producer {
    /// Starts a producer on `backend` for `queues` on a free port, with extra
    /// `JOBGATE_*` settings; returns once it is ready.
    pub async fn start(backend: Backend, queues: &[&str], env: &[(&str, String)]) -> Self {
        let (process, base_url) = spawn_producer(backend, queues, env).await;
        let producer = Self {
            process,
            base_url,
            // Never hang a test on one request: the producer answers within its publish
            // timeout, so this only turns a hang into a failure.
            http: http_client(Duration::from_secs(60)),
        };
        producer.wait_ready(Duration::from_secs(30)).await;
        producer
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// POSTs one job body to `/jobs/{queue}`.
    pub async fn post(&self, queue: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/jobs/{queue}")))
            .body(body)
            .send()
            .await
            .expect("POST reaches the producer")
    }

    /// POSTs a job and returns its job id; panics unless the answer is 202.
    pub async fn post_ok(&self, queue: &str, body: impl Into<reqwest::Body>) -> String {
        let response = self.post(queue, body).await;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(
            status,
            202,
            "expected 202, got: {text}\nproducer log:\n{}",
            self.process.dump()
        );
        let json: Value = serde_json::from_str(&text).expect("a JSON answer");
        assert_eq!(json["message"], "Request received");
        assert_eq!(json["queue"], queue);
        json["job_id"].as_str().expect("job_id").to_owned()
    }

    /// POSTs `n` jobs concurrently; returns their ids.
    pub async fn post_many(&self, queue: &str, n: usize) -> Vec<String> {
        let posts = (0..n).map(|i| self.post_ok(queue, format!("{{\"n\":{i}}}")));
        futures::future::join_all(posts).await
    }

    pub async fn readyz(&self) -> u16 {
        match self.http.get(self.url("/readyz")).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    pub async fn wait_ready(&self, limit: Duration) {
        wait_until(limit, "the producer to be ready", || async {
            self.readyz().await == 200
        })
        .await;
    }
}

/// An HTTP client for the producer whose requests fail after `timeout`. It keeps an idle
/// connection 1 s at most, as the README asks of pooling clients: the producer closes a
/// keep-alive connection idle for `JOBGATE_IDLE_TIMEOUT_MS` (5 s), and a POST sent on it
/// at that moment fails unanswered (HTTP/1.1's keep-alive race, RFC 9112 9.6), which a
/// client cannot retry blindly.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(1))
        .build()
        .expect("HTTP client")
}

/// A producer that is not expected to become ready: started, and its address read.
pub async fn unready_producer(
    backend: Backend,
    queue: &str,
    env: &[(&'static str, String)],
) -> (Process, String) {
    spawn_producer(backend, &[queue], env).await
}

/// Starts a producer on `backend` for `queues` on a free port, with extra `JOBGATE_*`
/// settings; returns it and its base URL once it listens (ready or not).
async fn spawn_producer(
    backend: Backend,
    queues: &[&str],
    env: &[(&str, String)],
) -> (Process, String) {
    let mut all = vec![
        ("JOBGATE_LISTEN", "127.0.0.1:0".to_owned()),
        ("JOBGATE_QUEUES", queues.join(",")),
    ];
    all.extend(backend.env());
    all.extend(env.iter().cloned());
    let process = Process::spawn("producer", "producer", &all).await;
    let mut addr = None;
    wait_until(Duration::from_secs(20), "the producer to listen", || {
        addr = process
            .lines("producer listening")
            .first()
            .and_then(|l| l["addr"].as_str().map(str::to_owned));
        std::future::ready(addr.is_some())
    })
    .await;
    (process, format!("http://{}", addr.unwrap()))
}

/// Waits until the producer logged a line containing `reason`, then checks that it is
/// not ready and answers a job with a 503 problem (nothing was accepted).
pub async fn refused_with(process: &Process, base: &str, queue: &str, reason: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("a log line with {reason:?}"),
        || std::future::ready(process.dump().contains(reason)),
    )
    .await;
    let http = reqwest::Client::new();
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        503,
        "ready without a usable broker connection"
    );
    let response = http
        .post(format!("{base}/jobs/{queue}"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(response, 503, "broker-unavailable").await;
}

/// A running `consumer`.
pub struct Consumer {
    pub process: Process,
    /// The queue it drains.
    pub queue: String,
}

impl Consumer {
    /// Starts a consumer on `backend` draining `queue`, with extra `JOBGATE_*` settings;
    /// returns once it is subscribed (on Kafka: possibly before it owns partitions).
    pub async fn start(backend: Backend, queue: &str, env: &[(&str, String)]) -> Self {
        let mut all = vec![
            ("JOBGATE_QUEUE", queue.to_owned()),
            // Two retry tiers (1 s, 2 s) unless a test asks for others: fewer queues
            // and topics per test.
            ("JOBGATE_RETRY_MAX_MS", "2000".to_owned()),
        ];
        all.extend(backend.env());
        all.extend(env.iter().cloned());
        let process = Process::spawn("consumer", "consumer", &all).await;
        let consumer = Self {
            process,
            queue: queue.to_owned(),
        };
        wait_until(Duration::from_secs(30), "the consumer to subscribe", || {
            std::future::ready(!consumer.process.lines("consumer subscribed").is_empty())
        })
        .await;
        consumer
    }

    /// Job ids this consumer processed (the `log` handler's "job processed" lines).
    pub fn processed(&self) -> Vec<String> {
        ids(&self.process.lines("job processed"))
    }

    /// Job ids this consumer started.
    pub fn started(&self) -> Vec<String> {
        ids(&self.process.lines("job started"))
    }
}

fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l["job_id"].as_str().map(str::to_owned))
        .collect()
}

/// Counts how often each job id was processed across consumers.
pub fn processing_counts(consumers: &[&Consumer]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for c in consumers {
        for id in c.processed() {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits until every id in `expected` was processed by one of `consumers`, then
/// asserts that none was processed twice and no unknown id was processed.
pub async fn assert_processed_exactly_once(
    consumers: &[&Consumer],
    expected: &[String],
    limit: Duration,
) {
    let expected: BTreeSet<String> = expected.iter().cloned().collect();
    let start = Instant::now();
    loop {
        let counts = processing_counts(consumers);
        let seen: BTreeSet<String> = counts.keys().cloned().collect();
        if expected.is_subset(&seen) {
            let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
            assert!(twice.is_empty(), "processed more than once: {twice:?}");
            let unknown: Vec<_> = seen.difference(&expected).collect();
            assert!(
                unknown.is_empty(),
                "processed jobs nobody posted: {unknown:?}"
            );
            return;
        }
        if start.elapsed() > limit {
            let missing: Vec<_> = expected.difference(&seen).collect();
            let logs: String = consumers.iter().map(|c| c.process.dump()).collect();
            panic!(
                "{} of {} jobs not processed within {limit:?}: {missing:?}\n{logs}",
                missing.len(),
                expected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `JOBGATE_*` settings from string pairs.
pub fn vars(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// Asserts an RFC 9457 problem answer with `status` and type slug `slug`.
pub async fn assert_problem(response: reqwest::Response, status: u16, slug: &str) {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], status);
    assert_eq!(problem["type"], format!("urn:jobgate:problem:{slug}"));
    assert!(problem["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(problem["detail"].as_str().is_some_and(|t| !t.is_empty()));
}

/// Where a test's brokers are: the single nodes of `scripts/brokers.sh up all`, or its
/// loopback clusters (`up rabbitmq-cluster`, `up kafka-cluster`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Single,
    Cluster,
}

impl Site {
    /// The `scripts/brokers.sh env` target of `backend` here.
    fn target(self, backend: Backend) -> &'static str {
        match (backend, self) {
            (Backend::Rabbitmq, Site::Single) => "rabbitmq",
            (Backend::Kafka, Site::Single) => "kafka",
            (Backend::Rabbitmq, Site::Cluster) => "rabbitmq-cluster",
            (Backend::Kafka, Site::Cluster) => "kafka-cluster",
        }
    }

    /// The `JOBGATE_*` settings that point both binaries at `backend` here, as
    /// `scripts/brokers.sh env` prints them.
    pub fn env(self, backend: Backend) -> Vec<(&'static str, String)> {
        let out = std::process::Command::new("bash")
            .arg(workspace_root().join("scripts/brokers.sh"))
            .args(["env", self.target(backend)])
            .output()
            .expect("run scripts/brokers.sh env");
        assert!(
            out.status.success(),
            "scripts/brokers.sh env failed: {out:?}"
        );
        String::from_utf8(out.stdout)
            .expect("UTF-8")
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (&*Box::leak(k.to_owned().into_boxed_str()), v.to_owned()))
            .collect()
    }

    fn setting(self, backend: Backend, name: &str) -> String {
        self.env(backend)
            .into_iter()
            .find(|(k, _)| *k == name)
            .unwrap_or_else(|| panic!("scripts/brokers.sh env prints {name}"))
            .1
    }

    /// The AMQP URL of each node.
    pub fn amqp_urls(self) -> Vec<String> {
        self.setting(Backend::Rabbitmq, "JOBGATE_AMQP_URL")
            .split(',')
            .map(str::to_owned)
            .collect()
    }

    pub fn kafka_bootstrap(self) -> String {
        self.setting(Backend::Kafka, "JOBGATE_KAFKA_BROKERS")
    }
}

/// The message broker a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Rabbitmq,
    Kafka,
}

impl Backend {
    /// The `JOBGATE_*` settings that point the binaries at this broker.
    pub fn env(self) -> Vec<(&'static str, String)> {
        match self {
            Backend::Rabbitmq => vec![
                ("JOBGATE_BACKEND", "rabbitmq".to_owned()),
                ("JOBGATE_AMQP_URL", AMQP_URL.to_owned()),
            ],
            Backend::Kafka => vec![
                ("JOBGATE_BACKEND", "kafka".to_owned()),
                ("JOBGATE_KAFKA_BROKERS", KAFKA_BROKERS.to_owned()),
                // A killed consumer's partitions move on after this long.
                ("JOBGATE_KAFKA_SESSION_TIMEOUT_MS", "6000".to_owned()),
            ],
        }
    }

    /// Jobs of `queue` not yet acknowledged.
    ///
    /// RabbitMQ: the ready count (call it only while no consumer holds unacked
    /// messages). Kafka: over the partitions of topic `queue`, the high watermark minus
    /// the offset committed by group `jobgate.<queue>` (the low watermark when the group
    /// committed nothing there).
    pub async fn pending(self, queue: &str) -> u64 {
        self.pending_at(Site::Single, queue).await
    }

    /// [`Backend::pending`] on the brokers of `site`.
    pub async fn pending_at(self, site: Site, queue: &str) -> u64 {
        match (self, site) {
            (Backend::Rabbitmq, Site::Single) => u64::from(rabbit::ready_count(queue).await),
            (Backend::Rabbitmq, Site::Cluster) => {
                u64::from(rabbit::ready_count_at(&site.amqp_urls(), queue).await)
            }
            (Backend::Kafka, _) => kafka::pending_at(&site.kafka_bootstrap(), queue).await,
        }
    }

    /// Stops the broker (the outage test; hold [`brokers_exclusive`]).
    pub async fn stop(self) {
        match self {
            Backend::Rabbitmq => rabbit::stop_app().await,
            Backend::Kafka => brokers_sh(&["down", "kafka"]).await,
        }
    }

    /// Starts the broker again and waits until it accepts clients.
    pub async fn start(self) {
        match self {
            Backend::Rabbitmq => rabbit::start_app().await,
            Backend::Kafka => brokers_sh(&["up", "kafka"]).await,
        }
    }

    /// Waits until the consumers' group owns all `partitions` and no rebalance is under
    /// way (Kafka: each consumer's latest "partitions assigned"/"partitions revoked" line
    /// of group `jobgate.<queue>` is an assignment after which it owns at least one
    /// partition (`assigned` counts all it owns, also under incremental rebalances), and
    /// they add up to `partitions`).
    /// Jobs posted before that could be redelivered by a rebalance. RabbitMQ: no-op.
    pub async fn wait_group_stable(self, consumers: &[&Consumer], partitions: u64) {
        if self == Backend::Rabbitmq {
            return;
        }
        let limit = Duration::from_secs(60);
        let start = Instant::now();
        loop {
            let latest: Vec<Option<Value>> = consumers
                .iter()
                .map(|c| {
                    let group = kafka::group(&c.queue);
                    c.process.last_where(|l| {
                        (l["message"] == "partitions assigned"
                            || l["message"] == "partitions revoked")
                            // Only the job queue's group (not, say, a retry consumer's).
                            && (l["group"].is_null() || l["group"] == group.as_str())
                    })
                })
                .collect();
            let owned: Option<Vec<u64>> = latest
                .iter()
                .map(|line| {
                    let line = line.as_ref()?;
                    if line["message"] != "partitions assigned" {
                        return None;
                    }
                    line["assigned"].as_u64().filter(|n| *n > 0)
                })
                .collect();
            if owned.is_some_and(|o| o.iter().sum::<u64>() == partitions) {
                return;
            }
            if start.elapsed() > limit {
                let logs: String = consumers.iter().map(|c| c.process.dump()).collect();
                panic!(
                    "the consumer group did not settle on {partitions} partitions within \
                     {limit:?}; latest lines: {latest:?}\n{logs}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Deletes a test's queues (RabbitMQ: `Q` and every `Q.*` queue; Kafka: topics `Q` and
/// `Q.*` and group `jobgate.Q`) when dropped, whether the test passed or failed.
///
/// Declare it right after naming the queues, before starting any binary, so it drops
/// after them. Without it every run would leave its quorum queues and topics behind:
/// RabbitMQ reserves file handles for each quorum queue and, once its budget (about 300
/// queues with the default 1024 descriptors) is used up, accepts no new connections.
#[must_use = "the queues are deleted when this is dropped"]
pub struct Cleanup {
    backend: Backend,
    queues: Vec<String>,
}

impl Backend {
    /// See [`Cleanup`].
    pub fn cleanup(self, queues: &[&str]) -> Cleanup {
        Cleanup {
            backend: self,
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (backend, queues) = (self.backend, std::mem::take(&mut self.queues));
        // Drop cannot await, and the test's runtime may be unwinding: a thread of its own.
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let delete = async {
                    match backend {
                        Backend::Rabbitmq => rabbit::delete_all(&queues).await,
                        Backend::Kafka => kafka::delete_all(&queues).await,
                    }
                };
                tokio::time::timeout(Duration::from_secs(60), delete)
                    .await
                    .map_err(|_| "timed out".to_owned())?
            })
        })
        .join();
        // Best effort: never panic in drop (that would abort an unwinding test).
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup of {backend:?} queues failed: {e}"),
            Err(_) => eprintln!("cleanup of {backend:?} queues panicked"),
        }
    }
}

/// Whether `name` is queue `queue` or one of its companions (`queue.dlq`, ...).
fn belongs_to(name: &str, queue: &str) -> bool {
    name == queue
        || name
            .strip_prefix(queue)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// Runs `scripts/brokers.sh` with `args`; panics with its output unless it succeeds.
pub async fn brokers_sh(args: &[&str]) {
    let output = Command::new("bash")
        .arg(workspace_root().join("scripts/brokers.sh"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run scripts/brokers.sh");
    assert!(
        output.status.success(),
        "scripts/brokers.sh {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Kafka, seen from outside jobgate: an `rdkafka` client of its own. rdkafka calls
/// block, so each runs on tokio's blocking pool.
pub mod kafka {
    use super::*;

    use jobgate_shared::broker::kafka::{ensure_topics, Replication, TopicSpec};
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::error::{KafkaError, KafkaResult};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Topics of `partitions` partitions on the test broker, created as jobgate
    /// creates them (auto replication); `tiers` adds `Q.retry.<tier>` topics.
    pub async fn create_topics(queue: &str, partitions: i32, tiers: &[Duration]) -> TopicSpec {
        let spec = TopicSpec {
            brokers: KAFKA_BROKERS.into(),
            partitions,
            replication: Replication::default(),
            timeout: Duration::from_secs(10),
            linger: Duration::ZERO,
            security: Default::default(),
        };
        ensure_topics(&spec, &[queue.to_owned()], tiers)
            .await
            .expect("topics created");
        spec
    }

    /// The consumer group jobgate uses for `queue`.
    pub fn group(queue: &str) -> String {
        format!("jobgate.{queue}")
    }

    /// A client in group `group` that never joins it (no subscribe, no auto commit): it
    /// only reads metadata, watermarks and committed offsets, or records it assigns.
    pub fn client(group: &str) -> BaseConsumer {
        client_at(KAFKA_BROKERS, group)
    }

    /// [`client`] of the cluster at `bootstrap`.
    pub fn client_at(bootstrap: &str, group: &str) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("allow.auto.create.topics", "false")
            .create()
            .expect("create a Kafka client")
    }

    /// How long a helper keeps asking again after a retriable error.
    const RETRY_LIMIT: Duration = Duration::from_secs(60);

    /// Errors a Kafka broker gives while it starts, loads a group coordinator or elects
    /// a leader: asking again a little later succeeds.
    pub fn is_retriable(error: &KafkaError) -> bool {
        use rdkafka::types::RDKafkaErrorCode as C;
        matches!(
            error.rdkafka_error_code(),
            Some(
                C::NotCoordinator
                    | C::CoordinatorLoadInProgress
                    | C::CoordinatorNotAvailable
                    | C::LeaderNotAvailable
                    | C::NotLeaderForPartition
                    | C::NotController
                    | C::BrokerTransportFailure
                    | C::AllBrokersDown
                    | C::Resolve
                    | C::OperationTimedOut
                    | C::RequestTimedOut
                    | C::NetworkException
            )
        )
    }

    /// Runs a blocking Kafka call, asking again while it fails with a retriable error
    /// (for up to [`RETRY_LIMIT`]); any other error, or one that outlasts the limit,
    /// panics naming `what` and the error.
    pub fn retrying<T>(what: &str, mut call: impl FnMut() -> KafkaResult<T>) -> T {
        let start = Instant::now();
        let mut tries = 0u32;
        loop {
            tries += 1;
            match call() {
                Ok(value) => return value,
                Err(e) if is_retriable(&e) && start.elapsed() < RETRY_LIMIT => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!(
                    "Kafka: {what} failed after {tries} tries in {:?} (retriable errors are \
                     asked again for {RETRY_LIMIT:?}): {e}",
                    start.elapsed()
                ),
            }
        }
    }

    /// Partition count of `topic`, or `None` when the broker does not know it.
    pub fn partitions_of(client: &BaseConsumer, topic: &str) -> Option<i32> {
        retrying(&format!("metadata of topic {topic}"), || {
            let metadata = client.fetch_metadata(Some(topic), TIMEOUT)?;
            let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Ok(None);
            };
            match t.error() {
                None => Ok(Some(i32::try_from(t.partitions().len()).unwrap())),
                Some(e) => {
                    let e = KafkaError::MetadataFetch(e.into());
                    // A topic without a leader yet exists: ask again.
                    if is_retriable(&e) {
                        Err(e)
                    } else {
                        Ok(None)
                    }
                }
            }
        })
    }

    /// The offsets group `group` committed for `tpl` (retriable errors, whole or per
    /// partition, are asked again: right after a start the coordinator is not loaded).
    pub fn committed(client: &BaseConsumer, tpl: &TopicPartitionList) -> TopicPartitionList {
        retrying("committed offsets of the group", || {
            let committed = client.committed_offsets(tpl.clone(), TIMEOUT)?;
            for element in committed.elements() {
                element.error()?;
            }
            Ok(committed)
        })
    }

    /// Partition count of `topic` (`None`: it does not exist).
    pub async fn topic_partitions(topic: &str) -> Option<i32> {
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            partitions_of(&client(&format!("it-meta-{}", unique("x"))), &topic)
        })
        .await
        .unwrap()
    }

    /// Deletes topics `Q` and `Q.*` and group `jobgate.Q` of each queue `Q`.
    pub async fn delete_all(queues: &[String]) -> Result<(), String> {
        use rdkafka::admin::AdminOptions;

        let admin = admin()?;
        let metadata = admin
            .inner()
            .fetch_metadata(None, TIMEOUT)
            .map_err(|e| e.to_string())?;
        let topics: Vec<String> = metadata
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .filter(|t| queues.iter().any(|q| belongs_to(t, q)))
            .collect();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        delete_topics_with(&admin, &names).await?;
        // A group whose members' sessions have not expired yet cannot be deleted; its
        // committed offsets are dropped with the topics anyway, so this is a courtesy.
        let groups: Vec<String> = queues.iter().map(|q| group(q)).collect();
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let _ = admin.delete_groups(&groups, &options).await;
        Ok(())
    }

    /// Deletes exactly the topics `names` (an operator's `kafka-topics --delete`).
    pub async fn delete_topics(names: &[&str]) {
        let admin = admin().expect("Kafka admin client");
        delete_topics_with(&admin, names)
            .await
            .unwrap_or_else(|e| panic!("delete topics {names:?}: {e}"));
    }

    fn admin() -> Result<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>, String>
    {
        ClientConfig::new()
            .set("bootstrap.servers", KAFKA_BROKERS)
            .create()
            .map_err(|e| e.to_string())
    }

    async fn delete_topics_with(
        admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
        names: &[&str],
    ) -> Result<(), String> {
        if names.is_empty() {
            return Ok(());
        }
        let options = rdkafka::admin::AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let results = jobgate_shared::broker::kafka::admin::delete_topics(admin, names, &options)
            .await
            .map_err(|e| e.to_string())?;
        for result in results {
            result.map_err(|(topic, e)| format!("delete topic {topic}: {e}"))?;
        }
        Ok(())
    }

    pub async fn pending_at(bootstrap: &str, queue: &str) -> u64 {
        let (bootstrap, queue) = (bootstrap.to_owned(), queue.to_owned());
        tokio::task::spawn_blocking(move || {
            let client = client_at(&bootstrap, &group(&queue));
            let partitions =
                partitions_of(&client, &queue).unwrap_or_else(|| panic!("topic {queue} exists"));
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&queue, p);
            }
            let committed = committed(&client, &tpl);
            let mut pending = 0;
            for p in 0..partitions {
                let (low, high) = retrying(&format!("watermarks of {queue}/{p}"), || {
                    client.fetch_watermarks(&queue, p, TIMEOUT)
                });
                let from = match committed.find_partition(&queue, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                };
                pending += u64::try_from(high - from).expect("committed <= high watermark");
            }
            pending
        })
        .await
        .unwrap()
    }
}

/// RabbitMQ, seen from outside jobgate: the management HTTP API and `rabbitmqctl`.
pub mod rabbit {
    use super::*;

    fn http() -> reqwest::Client {
        reqwest::Client::new()
    }

    /// Sends a management API request as guest, asking again for up to a minute while
    /// the API refuses connections or answers 5xx (it starts after the broker); returns
    /// the first other answer. Panics naming `what` after that.
    async fn management(
        what: &str,
        request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> reqwest::Response {
        const LIMIT: Duration = Duration::from_secs(60);
        let start = Instant::now();
        loop {
            let error = match request(&http())
                .basic_auth("guest", Some("guest"))
                .timeout(Duration::from_secs(10))
                .send()
                .await
            {
                Ok(r) if !r.status().is_server_error() => return r,
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            assert!(
                start.elapsed() < LIMIT,
                "RabbitMQ management API: {what} failed for {:?}: {error}",
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// An AMQP connection to the test broker. A broker that is (re)starting refuses
    /// connections or stalls the handshake for a while: each try is bounded, and tries
    /// go on for up to a minute before the test fails saying so.
    pub async fn connect() -> lapin::Connection {
        connect_to(&[AMQP_URL.to_owned()]).await
    }

    /// A connection to the first of `urls` (the nodes of a cluster) that answers.
    pub async fn connect_to(urls: &[String]) -> lapin::Connection {
        const LIMIT: Duration = Duration::from_secs(60);
        let start = Instant::now();
        let mut tries = 0u32;
        loop {
            let url = &urls[tries as usize % urls.len()];
            tries += 1;
            let attempt = tokio::time::timeout(
                Duration::from_secs(10),
                lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
            )
            .await;
            let error = match attempt {
                Ok(Ok(conn)) => return conn,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer to the AMQP handshake within 10 s".to_owned(),
            };
            assert!(
                start.elapsed() < LIMIT,
                "RabbitMQ: no AMQP connection to {urls:?} after {tries} tries in {:?}: {error}",
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The management API's view of a queue (`None` when it does not exist).
    pub async fn queue_info(queue: &str) -> Option<Value> {
        let r = management(&format!("GET queue {queue}"), |c| {
            c.get(format!("{MANAGEMENT_URL}/api/queues/%2f/{queue}"))
        })
        .await;
        if r.status() == 404 {
            return None;
        }
        Some(r.error_for_status().unwrap().json().await.unwrap())
    }

    /// Messages ready in `queue`, exact (a passive declare, not the sampled stats).
    pub async fn ready_count(queue: &str) -> u32 {
        ready_count_at(&[AMQP_URL.to_owned()], queue).await
    }

    /// [`ready_count`] on the first of the nodes `urls` that answers.
    pub async fn ready_count_at(urls: &[String], queue: &str) -> u32 {
        use lapin::options::QueueDeclareOptions;
        let count = async {
            let conn = connect_to(urls).await;
            let channel = conn.create_channel().await.unwrap();
            let q = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .expect("queue exists");
            let _ = conn.close(200, "bye".into()).await;
            q.message_count()
        };
        // lapin waits for an answer without a limit of its own.
        tokio::time::timeout(Duration::from_secs(90), count)
            .await
            .expect("RabbitMQ answered the connection and passive declare within 90 s")
    }

    /// Deletes every queue `Q` and `Q.*` of each queue `Q` through the management API.
    pub async fn delete_all(queues: &[String]) -> Result<(), String> {
        let listed: Vec<Value> = http()
            .get(format!("{MANAGEMENT_URL}/api/queues/%2f?columns=name"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let names = listed
            .iter()
            .filter_map(|q| q["name"].as_str())
            .filter(|name| queues.iter().any(|q| belongs_to(name, q)));
        for name in names {
            let response = http()
                .delete(format!("{MANAGEMENT_URL}/api/queues/%2f/{name}"))
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            // 404: gone already.
            if !response.status().is_success() && response.status() != 404 {
                return Err(format!("delete queue {name}: {}", response.status()));
            }
        }
        Ok(())
    }

    /// Peeks at up to `count` messages through the management API (requeued afterwards).
    pub async fn peek(queue: &str, count: u32) -> Vec<Value> {
        management(&format!("peek at {queue}"), |c| {
            c.post(format!("{MANAGEMENT_URL}/api/queues/%2f/{queue}/get"))
                .json(&serde_json::json!({"count": count, "ackmode": "ack_requeue_true", "encoding": "auto"}))
        })
        .await
        .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Deletes a queue through the management API.
    pub async fn delete_queue(queue: &str) {
        management(&format!("delete queue {queue}"), |c| {
            c.delete(format!("{MANAGEMENT_URL}/api/queues/%2f/{queue}"))
        })
        .await
        .error_for_status()
        .unwrap();
    }

    async fn rabbitmqctl(args: &[&str]) {
        let status = Command::new("rabbitmqctl")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .await
            .expect("run rabbitmqctl");
        assert!(status.success(), "rabbitmqctl {args:?} failed");
    }

    /// Stops the RabbitMQ application (the node stays, AMQP is closed).
    pub async fn stop_app() {
        rabbitmqctl(&["stop_app"]).await;
    }

    /// Sets the memory high watermark (a fraction of the RAM); a tiny one raises a
    /// memory alarm and RabbitMQ blocks publishers (hold [`brokers_exclusive`]).
    pub async fn set_memory_watermark(fraction: &str) {
        rabbitmqctl(&["set_vm_memory_high_watermark", fraction]).await;
    }

    /// Starts it again and waits until it is usable (`scripts/brokers.sh up rabbitmq`:
    /// feature flags and a quorum queue round trip), not only accepting connections.
    pub async fn start_app() {
        rabbitmqctl(&["start_app"]).await;
        rabbitmqctl(&["await_startup"]).await;
        brokers_sh(&["up", "rabbitmq"]).await;
    }
}

/// `consumer dlq ...`, run as an operator runs it.
pub mod dlq {
    use super::*;

    /// Runs `consumer dlq <args>` against `backend`; returns stdout, panics unless it
    /// exits 0.
    pub async fn run(backend: Backend, args: &[&str]) -> String {
        run_with(backend, &[], args).await
    }

    /// [`run`] with extra `JOBGATE_*` settings (over the backend's).
    pub async fn run_with(backend: Backend, env: &[(&str, String)], args: &[&str]) -> String {
        let mut cmd = Command::new(binary("consumer"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("JOBGATE_RETRY_MAX_MS", "2000")
            .arg("dlq")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in backend.env() {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .expect("consumer dlq finishes")
            .expect("run consumer dlq");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "consumer dlq {args:?} failed: {:?}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// The dead jobs of `queue` (`consumer dlq list --json`).
    pub async fn list(backend: Backend, queue: &str) -> Vec<Value> {
        let out = run(
            backend,
            &["list", "--queue", queue, "--limit", "1000", "--json"],
        )
        .await;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect()
    }
}

/// Puts two messages on `queue` the way another tool (or a person in a management UI)
/// would: one with no metadata and an empty body; one with a junk attempt header, a
/// header that is not UTF-8, and no job id.
pub async fn publish_junk(backend: Backend, queue: &str) {
    match backend {
        Backend::Rabbitmq => {
            use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
            use lapin::types::{AMQPValue, FieldTable, LongString};
            let conn = rabbit::connect().await;
            let channel = conn.create_channel().await.unwrap();
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut headers = FieldTable::default();
            headers.insert("x-attempt".into(), AMQPValue::LongString("many".into()));
            headers.insert(
                "x-binary".into(),
                AMQPValue::LongString(LongString::from(vec![0xff, 0xfe, 0x00])),
            );
            let bare = lapin::BasicProperties::default();
            let odd = lapin::BasicProperties::default().with_headers(headers);
            for (body, props) in [(&b""[..], bare), (&b"\xff\x00 not utf-8"[..], odd)] {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        body,
                        props,
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                assert!(confirm.is_ack());
            }
            let _ = conn.close(200, "bye".into()).await;
        }
        Backend::Kafka => {
            use rdkafka::message::{Header, OwnedHeaders};
            use rdkafka::producer::{FutureProducer, FutureRecord};
            let producer: FutureProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", KAFKA_BROKERS)
                .create()
                .unwrap();
            let bare: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(queue).payload(&b""[..]);
            producer
                .send(bare, Duration::from_secs(10))
                .await
                .expect("produce a bare record");
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "x-attempt",
                    value: Some(&b"many"[..]),
                })
                .insert(Header {
                    key: "x-binary",
                    value: Some(&[0xff_u8, 0xfe, 0x00][..]),
                });
            let odd: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(queue)
                .key(&[0xff_u8, 0x00][..])
                .payload(&b"\xff\x00 not utf-8"[..])
                .headers(headers);
            producer
                .send(odd, Duration::from_secs(10))
                .await
                .expect("produce an odd record");
        }
    }
}

/// The OpenMetrics text both binaries serve at `/metrics`, read the way the tests need.
pub mod scraped {
    /// `GET {base}/metrics`: 200 with the OpenMetrics content type; returns the text.
    pub async fn fetch(http: &reqwest::Client, base: &str) -> String {
        let response = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            jobgate_shared::metrics::CONTENT_TYPE
        );
        response.text().await.expect("the metrics text")
    }

    /// The value of the sample `name{labels}` (labels as the encoder writes them, in
    /// order; `""` for none); `None` when there is no such sample.
    pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let head = if labels.is_empty() {
            format!("{name} ")
        } else {
            format!("{name}{{{labels}}} ")
        };
        text.lines()
            .find_map(|line| line.strip_prefix(&head))
            .map(|value| value.trim().parse().expect("a number"))
    }

    /// Every sample of `name` (any labels) as (labels, value).
    pub fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
        let head = format!("{name}{{");
        text.lines()
            .filter_map(|line| line.strip_prefix(&head))
            .map(|rest| {
                let (labels, value) = rest.split_once("} ").expect("labels, then a value");
                (labels.to_owned(), value.trim().parse().expect("a number"))
            })
            .collect()
    }
}
