//! Test harness: real brokers, real binaries started as a user starts them.
//!
//! Every test gets its own queue names (unique per test), so tests run in parallel.
//! Tests that stop a broker take the broker lock exclusively; all others share it.

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
            .args(["up", "rabbitmq"])
            .status()
            .expect("run scripts/brokers.sh");
        assert!(status.success(), "scripts/brokers.sh up rabbitmq failed");
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

/// Taken by every test that needs the brokers as they are.
pub async fn brokers_shared() -> RwLockReadGuard<'static, ()> {
    prepare();
    BROKER_LOCK.read().await
}

/// Taken by tests that stop or disturb a broker: they run alone.
pub async fn brokers_exclusive() -> RwLockWriteGuard<'static, ()> {
    prepare();
    BROKER_LOCK.write().await
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
    async fn spawn(name: &str, bin: &str, env: &[(&str, String)]) -> Self {
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

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("process still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit (at most `limit`) and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {limit:?}", self.name))
            .expect("wait for child");
        status.code()
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
    /// Starts a producer for `queues` on a free port, with extra `JOBGATE_*` settings.
    pub async fn start(queues: &[&str], env: &[(&str, String)]) -> Self {
        let mut all = vec![
            ("JOBGATE_LISTEN", "127.0.0.1:0".to_owned()),
            ("JOBGATE_QUEUES", queues.join(",")),
            ("JOBGATE_AMQP_URL", AMQP_URL.to_owned()),
        ];
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
        let producer = Self {
            process,
            base_url: format!("http://{}", addr.unwrap()),
            http: reqwest::Client::new(),
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
        assert_eq!(response.status(), 202, "expected 202");
        let json: Value = response.json().await.unwrap();
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

/// A running `consumer`.
pub struct Consumer {
    pub process: Process,
}

impl Consumer {
    /// Starts a consumer draining `queue`, with extra `JOBGATE_*` settings; returns once
    /// it is subscribed.
    pub async fn start(queue: &str, env: &[(&str, String)]) -> Self {
        let mut all = vec![
            ("JOBGATE_QUEUE", queue.to_owned()),
            ("JOBGATE_AMQP_URL", AMQP_URL.to_owned()),
        ];
        all.extend(env.iter().cloned());
        let process = Process::spawn("consumer", "consumer", &all).await;
        let consumer = Self { process };
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

/// RabbitMQ, seen from outside jobgate: the management HTTP API and `rabbitmqctl`.
pub mod rabbit {
    use super::*;

    fn http() -> reqwest::Client {
        reqwest::Client::new()
    }

    /// The management API's view of a queue (`None` when it does not exist).
    pub async fn queue_info(queue: &str) -> Option<Value> {
        let r = http()
            .get(format!("{MANAGEMENT_URL}/api/queues/%2f/{queue}"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API answers");
        if r.status() == 404 {
            return None;
        }
        Some(r.error_for_status().unwrap().json().await.unwrap())
    }

    /// Messages ready in `queue`, exact (a passive declare, not the sampled stats).
    pub async fn ready_count(queue: &str) -> u32 {
        use lapin::options::QueueDeclareOptions;
        let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
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
    }

    /// Peeks at up to `count` messages through the management API (requeued afterwards).
    pub async fn peek(queue: &str, count: u32) -> Vec<Value> {
        http()
            .post(format!("{MANAGEMENT_URL}/api/queues/%2f/{queue}/get"))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"count": count, "ackmode": "ack_requeue_true", "encoding": "auto"}))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Deletes a queue through the management API.
    pub async fn delete_queue(queue: &str) {
        http()
            .delete(format!("{MANAGEMENT_URL}/api/queues/%2f/{queue}"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }

    fn rabbitmqctl(args: &[&str]) {
        let status = std::process::Command::new("rabbitmqctl")
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("run rabbitmqctl");
        assert!(status.success(), "rabbitmqctl {args:?} failed");
    }

    /// Stops the RabbitMQ application (the node stays, AMQP is closed).
    pub fn stop_app() {
        rabbitmqctl(&["stop_app"]);
    }

    /// Starts it again and waits until it accepts AMQP connections.
    pub async fn start_app() {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    }
}
