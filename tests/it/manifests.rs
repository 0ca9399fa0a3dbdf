//! The deployment files, checked against the binaries they deploy.
//!
//! No Docker engine and no cluster are needed: every YAML document of
//! `docker-compose.yml`, `deploy/compose/` (Prometheus, Grafana) and `deploy/kubernetes/`
//! is parsed, and each reference in them is compared with what `producer` and `consumer`
//! really accept and serve: their clap definitions (variables, defaults, value parsers)
//! and their HTTP routers, driven without a socket (probe and scrape paths, metric
//! names). A renamed variable, a moved port or a probe path nobody serves fails here,
//! not in a cluster.
//!
//! Each test gathers every problem it finds and reports them all at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use clap::{CommandFactory, FromArgMatches};
use jobgate_shared::broker::memory::MemoryBroker;
use jobgate_shared::broker::JobSource;
use serde::Deserialize;
use serde_norway::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::helpers::workspace_root;

/// Which of the two binaries a container or Compose service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Binary {
    Producer,
    Consumer,
}

impl Binary {
    fn from_name(name: &str) -> Option<Binary> {
        match name {
            "producer" => Some(Binary::Producer),
            "consumer" => Some(Binary::Consumer),
            _ => None,
        }
    }

    fn command(self) -> clap::Command {
        match self {
            Binary::Producer => producer::ProducerConfig::command(),
            Binary::Consumer => consumer::ConsumerConfig::command(),
        }
    }

    /// Every argument of the binary, subcommands included.
    fn args(self) -> Vec<clap::Arg> {
        fn walk(command: &clap::Command, out: &mut Vec<clap::Arg>) {
            out.extend(command.get_arguments().cloned());
            for sub in command.get_subcommands() {
                walk(sub, out);
            }
        }
        let mut out = Vec::new();
        walk(&self.command(), &mut out);
        out
    }

    /// The environment variables the binary reads.
    fn accepted_env(self) -> BTreeSet<String> {
        self.args()
            .iter()
            .filter_map(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned())
            .collect()
    }

    /// The clap default of the argument read from `var` (from the definition, so the
    /// test's own environment cannot change it).
    fn default_of(self, var: &str) -> Option<String> {
        let arg = self
            .args()
            .into_iter()
            .find(|arg| arg.get_env().is_some_and(|env| env == var))
            .unwrap_or_else(|| panic!("{self:?} has no argument for {var}"));
        arg.get_default_values()
            .first()
            .map(|value| value.to_string_lossy().into_owned())
    }

    /// The variable holding the address of the HTTP listener with the probes and
    /// `/metrics`.
    fn listen_var(self) -> &'static str {
        match self {
            Binary::Producer => "JOBGATE_LISTEN",
            Binary::Consumer => "JOBGATE_METRICS_LISTEN",
        }
    }

    /// `GET path` on the binary's listener: status and body. Sent through the real
    /// routers (no socket) with a healthy in-memory broker.
    async fn get(self, path: &str) -> (StatusCode, String) {
        send(self.router().await, Request::get(path)).await
    }

    /// The binary's HTTP listener as a router, with a healthy in-memory broker. Before
    /// returning it, every labelled metric gets a series (a metric family without one
    /// is not rendered at all): the producer takes a job and refuses one, the
    /// consumer's metrics record a done and a dead job and some Kafka lag.
    async fn router(self) -> Router {
        match self {
            Binary::Producer => {
                let router = producer::app(producer::AppState::new(
                    Arc::new(MemoryBroker::new()),
                    vec!["default".to_owned()],
                    1024,
                ));
                for path in ["/jobs/default", "/jobs/unknown"] {
                    send(router.clone(), Request::post(path)).await;
                }
                router
            }
            Binary::Consumer => {
                let broker = MemoryBroker::new();
                let mut registry = jobgate_shared::metrics::registry();
                let metrics = consumer::WorkerMetrics::register(&mut registry);
                drop(metrics.job_started("default"));
                metrics.handler_finished("default", Duration::from_millis(1));
                metrics.job_settled("default", consumer::settle::Settled::Done);
                metrics.job_settled("default", consumer::settle::Settled::Dead);
                let source = broker.status();
                source.set_queue_lag("default", [(0, 1)]);
                consumer::probes::app(consumer::probes::ProbeState {
                    registry: Arc::new(registry),
                    metrics,
                    source,
                    outcomes: Arc::new(broker),
                    draining: CancellationToken::new(),
                })
            }
        }
    }

    /// Whether the binary answers `GET path` with a success (the probes answer 200
    /// with a healthy broker).
    async fn serves(self, path: &str) -> bool {
        self.get(path).await.0.is_success()
    }

    /// The metric names the binary's `/metrics` shows: families (`# TYPE` lines) and
    /// series (`jobgate_jobs_total`, `..._bucket`).
    async fn metric_names(self) -> BTreeSet<String> {
        let (status, text) = self.get("/metrics").await;
        assert!(status.is_success(), "{self:?} GET /metrics: {status}");
        text.lines()
            .filter_map(|line| match line.strip_prefix("# TYPE ") {
                Some(family) => family.split_whitespace().next(),
                None if line.starts_with('#') => None,
                None => line.split(['{', ' ']).next(),
            })
            .map(str::to_owned)
            .collect()
    }
}

/// Sends a request with an empty body through `router`; returns status and body.
async fn send(router: Router, request: axum::http::request::Builder) -> (StatusCode, String) {
    let request = request.body(Body::empty()).expect("request");
    let response = router.oneshot(request).await.expect("the router answers");
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The environment a container or service gets, and the settings it results in.
#[derive(Debug, Clone)]
struct Settings {
    binary: Binary,
    env: BTreeMap<String, String>,
}

impl Settings {
    /// The value the binary runs with: from the environment, else its default.
    fn get(&self, var: &str) -> Option<String> {
        self.env
            .get(var)
            .cloned()
            .or_else(|| self.binary.default_of(var))
    }

    /// The port of the HTTP listener with the probes and `/metrics`.
    fn listen_port(&self) -> Result<u16, String> {
        let var = self.binary.listen_var();
        let value = self
            .get(var)
            .ok_or_else(|| format!("{var} is not set, so {:?} serves no probes", self.binary))?;
        value
            .parse::<SocketAddr>()
            .map(|addr| addr.port())
            .map_err(|e| format!("{var}={value} is not a socket address: {e}"))
    }

    fn shutdown_grace(&self) -> Duration {
        let ms = self
            .get("JOBGATE_SHUTDOWN_GRACE_MS")
            .expect("the shutdown grace has a default");
        Duration::from_millis(ms.parse().expect("JOBGATE_SHUTDOWN_GRACE_MS is a number"))
    }

    fn queues(&self) -> Vec<String> {
        let var = match self.binary {
            Binary::Producer => "JOBGATE_QUEUES",
            Binary::Consumer => "JOBGATE_QUEUE",
        };
        let list = self.get(var).unwrap_or_default();
        list.split(',').map(|q| q.trim().to_owned()).collect()
    }

    /// `JOBGATE_*` variables the binary does not read (typos, the other binary's).
    fn unknown_vars(&self) -> Vec<String> {
        let accepted = self.binary.accepted_env();
        self.env
            .keys()
            .filter(|var| var.starts_with("JOBGATE_") && !accepted.contains(*var))
            .cloned()
            .collect()
    }
}

/// Problems found so far; the test fails with all of them.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.0.push(problem());
        }
    }

    fn push(&mut self, problem: String) {
        self.0.push(problem);
    }

    /// Takes `other`'s problems, each prefixed with `what` (an overlay's name).
    fn extend_from(&mut self, what: &str, other: Problems) {
        self.0.extend(
            other
                .0
                .into_iter()
                .map(|problem| format!("{what}: {problem}")),
        );
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} problem(s) in the deployment files:\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

// ---------------------------------------------------------------- YAML helpers

/// Every document of a YAML file, with `<<` merge keys resolved (Compose uses them).
fn load_yaml(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{}: merge keys: {e}", path.display()));
            value
        })
        .filter(|value| !value.is_null())
        .collect()
}

/// The files under `dir` (recursively) whose names end in one of `extensions`.
fn files_under(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .is_some_and(|ext| extensions.iter().any(|want| ext == *want))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The value at `keys` below `value`.
fn at<'a>(value: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(value, |value, key| value.get(*key))
}

/// A scalar as text (`8080`, `"8080"` and `true` alike).
fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn text_at(value: &Value, keys: &[&str]) -> Option<String> {
    at(value, keys).and_then(text)
}

fn seq_at<'a>(value: &'a Value, keys: &[&str]) -> &'a [Value] {
    at(value, keys)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A mapping of scalars (labels, selectors, ConfigMap data) as text.
fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
        .collect()
}

/// Whether every label of `selector` is among `labels` (an empty selector matches
/// nothing here: ours always select).
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn port_of_host_port(target: &str) -> Option<(String, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    Some((host.to_owned(), port.parse().ok()?))
}

// ---------------------------------------------------------------- Kubernetes

/// A container port: its name (optional) and number.
#[derive(Debug, Clone)]
struct ContainerPort {
    name: Option<String>,
    number: u16,
}

/// Resolves a probe's or Service's port (a number or a port name) against the
/// container's declared ports.
fn resolve_port(ports: &[ContainerPort], port: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => {
            let n = u16::try_from(n.as_u64()?).ok()?;
            ports.iter().any(|p| p.number == n).then_some(n)
        }
        Value::String(name) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.number),
        _ => None,
    }
}

/// A Deployment's pod as the checks need it.
#[derive(Debug, Clone)]
struct Workload {
    name: String,
    labels: BTreeMap<String, String>,
    ports: Vec<ContainerPort>,
    /// The ports the liveness and readiness probes ask.
    probe_ports: BTreeSet<u16>,
    /// The `prometheus.io/port` annotation's port, when the pod is scraped.
    scrape_port: Option<u16>,
    /// The container's environment as written: `valueFrom` references unresolved.
    container: Value,
    settings: Settings,
}

/// Every Kubernetes object under deploy/kubernetes, by kind.
#[derive(Default)]
struct Cluster {
    config_maps: BTreeMap<String, BTreeMap<String, String>>,
    secrets: BTreeMap<String, BTreeSet<String>>,
    trigger_auths: BTreeMap<String, Value>,
    deployments: Vec<Value>,
    services: Vec<Value>,
    budgets: Vec<Value>,
    scaled_objects: Vec<Value>,
    network_policies: Vec<Value>,
    /// The brokers' operators' resources: `RabbitmqCluster` (RabbitMQ Cluster
    /// Operator), `Kafka` and `KafkaNodePool` (Strimzi).
    rabbitmq_clusters: Vec<Value>,
    kafkas: Vec<Value>,
    kafka_node_pools: Vec<Value>,
    kustomizations: Vec<(PathBuf, Value)>,
    /// Every file with objects other than Kustomizations: each must be deployed.
    resource_files: BTreeSet<PathBuf>,
    /// `stringData` of the Secrets (example values, in the repository).
    secret_data: BTreeMap<(String, String), String>,
}

impl Cluster {
    /// Every document of every file under `dir`, as written (no overlay applied).
    fn load(dir: &Path, problems: &mut Problems) -> Cluster {
        let documents = files_under(dir, &["yaml", "yml"])
            .into_iter()
            .flat_map(|path| {
                load_yaml(&path)
                    .into_iter()
                    .map(move |doc| (path.clone(), doc))
            });
        Cluster::from_documents(documents, problems)
    }

    /// The objects of `documents`, each with the file it comes from.
    fn from_documents(
        documents: impl IntoIterator<Item = (PathBuf, Value)>,
        problems: &mut Problems,
    ) -> Cluster {
        let mut cluster = Cluster::default();
        {
            for (path, doc) in documents {
                let name = text_at(&doc, &["metadata", "name"]).unwrap_or_default();
                match text_at(&doc, &["kind"]).as_deref() {
                    Some("ConfigMap") => {
                        cluster
                            .config_maps
                            .insert(name, string_map(doc.get("data")));
                    }
                    Some("Secret") => {
                        let keys = ["data", "stringData"]
                            .iter()
                            .flat_map(|field| string_map(doc.get(*field)).into_keys())
                            .collect();
                        for (key, value) in string_map(doc.get("stringData")) {
                            cluster.secret_data.insert((name.clone(), key), value);
                        }
                        cluster.secrets.insert(name, keys);
                    }
                    Some("TriggerAuthentication") => {
                        cluster.trigger_auths.insert(name, doc);
                    }
                    Some("Deployment") => cluster.deployments.push(doc),
                    Some("Service") => cluster.services.push(doc),
                    Some("PodDisruptionBudget") => cluster.budgets.push(doc),
                    Some("ScaledObject") => cluster.scaled_objects.push(doc),
                    Some("NetworkPolicy") => cluster.network_policies.push(doc),
                    Some("RabbitmqCluster") => {
                        // The operator creates this Secret; example values stand in for
                        // the generated ones (a base64url user and password, as it makes
                        // them) so that URLs built from it can be parsed.
                        let secret = format!("{name}-default-user");
                        let samples = [
                            ("username", "default_user_c2FtcGxlLXVzZXI".to_owned()),
                            ("password", "c2FtcGxlLXBhc3N3b3Jk-_0".to_owned()),
                            ("host", format!("{name}.sample-namespace.svc")),
                            ("port", "5672".to_owned()),
                            ("provider", "rabbitmq".to_owned()),
                            ("type", "rabbitmq".to_owned()),
                            ("default_user.conf", "<secret>".to_owned()),
                        ];
                        for (key, value) in &samples {
                            cluster
                                .secret_data
                                .insert((secret.clone(), (*key).to_owned()), value.clone());
                        }
                        let keys = samples.iter().map(|(key, _)| (*key).to_owned()).collect();
                        cluster.secrets.insert(secret, keys);
                        cluster.rabbitmq_clusters.push(doc);
                    }
                    Some("Kafka") => cluster.kafkas.push(doc),
                    Some("KafkaNodePool") => cluster.kafka_node_pools.push(doc),
                    Some("Kustomization") => {
                        cluster.kustomizations.push((path.clone(), doc));
                        continue;
                    }
                    other => problems.push(format!(
                        "{}: a {other:?} that this test does not check; add a check for it",
                        path.display()
                    )),
                }
                cluster.resource_files.insert(path.clone());
            }
        }
        cluster
    }

    /// The environment of a container: `envFrom` ConfigMaps and Secrets, then `env`.
    /// Secret values are not in the repository; they read as `<secret>`. A `value`
    /// with `$(VAR)` references is expanded as the kubelet does, from the variables
    /// defined before it, a Secret's standing in with its example value (`stringData`
    /// here, or the sample of a Secret an operator creates); a reference to a variable
    /// not defined before it is a problem (Kubernetes would leave it as it is).
    fn container_env(
        &self,
        what: &str,
        container: &Value,
        problems: &mut Problems,
    ) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        // What $(VAR) expands to: the values, with Secrets' example values.
        let mut samples: BTreeMap<String, String> = BTreeMap::new();
        for source in seq_at(container, &["envFrom"]) {
            if let Some(name) = text_at(source, &["configMapRef", "name"]) {
                match self.config_maps.get(&name) {
                    Some(data) => {
                        env.extend(data.clone());
                        samples.extend(data.clone());
                    }
                    None => problems.push(format!("{what}: envFrom names no ConfigMap {name}")),
                }
            }
            if let Some(name) = text_at(source, &["secretRef", "name"]) {
                match self.secrets.get(&name) {
                    Some(keys) => {
                        for key in keys {
                            let sample = self.secret_data.get(&(name.clone(), key.clone()));
                            samples
                                .insert(key.clone(), sample.cloned().unwrap_or("<secret>".into()));
                            env.insert(key.clone(), "<secret>".into());
                        }
                    }
                    None => problems.push(format!("{what}: envFrom names no Secret {name}")),
                }
            }
        }
        for var in seq_at(container, &["env"]) {
            let name = text_at(var, &["name"]).unwrap_or_default();
            let value = if let Some(value) = text_at(var, &["value"]) {
                let (expanded, undefined) = expand_references(&value, &samples);
                for reference in undefined {
                    problems.push(format!(
                        "{what}: {name} refers to $({reference}), which is not defined before it \
                         in the container's env or envFrom (Kubernetes would pass it on as it is)"
                    ));
                }
                samples.insert(name.clone(), expanded.clone());
                expanded
            } else if let Some(secret) = at(var, &["valueFrom", "secretKeyRef"]) {
                let (secret_name, key) = (
                    text_at(secret, &["name"]).unwrap_or_default(),
                    text_at(secret, &["key"]).unwrap_or_default(),
                );
                problems.check(
                    self.secrets
                        .get(&secret_name)
                        .is_some_and(|keys| keys.contains(&key)),
                    || format!("{what}: {name} refers to {secret_name}/{key}, no such Secret key"),
                );
                let sample = self.secret_data.get(&(secret_name, key));
                samples.insert(name.clone(), sample.cloned().unwrap_or("<secret>".into()));
                "<secret>".to_owned()
            } else if let Some(cm) = at(var, &["valueFrom", "configMapKeyRef"]) {
                let (cm_name, key) = (
                    text_at(cm, &["name"]).unwrap_or_default(),
                    text_at(cm, &["key"]).unwrap_or_default(),
                );
                match self
                    .config_maps
                    .get(&cm_name)
                    .and_then(|data| data.get(&key))
                {
                    Some(value) => {
                        samples.insert(name.clone(), value.clone());
                        value.clone()
                    }
                    None => {
                        problems.push(format!(
                            "{what}: {name} refers to {cm_name}/{key}, no such ConfigMap key"
                        ));
                        String::new()
                    }
                }
            } else {
                problems.push(format!("{what}: {name} has neither value nor valueFrom"));
                String::new()
            };
            env.insert(name, value);
        }
        env
    }

    /// Checks each Deployment's pod against its binary; returns the workloads.
    async fn check_deployments(&self, problems: &mut Problems) -> Vec<Workload> {
        let mut workloads = Vec::new();
        for deployment in &self.deployments {
            let name = text_at(deployment, &["metadata", "name"]).unwrap_or_default();
            let pod = at(deployment, &["spec", "template"])
                .cloned()
                .unwrap_or_default();
            let labels = string_map(at(&pod, &["metadata", "labels"]));
            let selector = string_map(at(deployment, &["spec", "selector", "matchLabels"]));
            problems.check(selects(&selector, &labels), || {
                format!("Deployment {name}: selector {selector:?} does not match the pod labels {labels:?}")
            });

            let containers = seq_at(&pod, &["spec", "containers"]);
            problems.check(containers.len() == 1, || {
                format!(
                    "Deployment {name}: expected one container, found {}",
                    containers.len()
                )
            });
            let Some(container) = containers.first() else {
                continue;
            };
            let container_name = text_at(container, &["name"]).unwrap_or_default();
            let Some(binary) = Binary::from_name(&container_name) else {
                problems.push(format!(
                    "Deployment {name}: container {container_name:?} is neither producer nor consumer"
                ));
                continue;
            };
            let what = format!("Deployment {name}, container {container_name}");
            let settings = Settings {
                binary,
                env: self.container_env(&what, container, problems),
            };
            let ports: Vec<ContainerPort> = seq_at(container, &["ports"])
                .iter()
                .filter_map(|port| {
                    Some(ContainerPort {
                        name: text_at(port, &["name"]),
                        number: text_at(port, &["containerPort"])?.parse().ok()?,
                    })
                })
                .collect();

            check_settings(&what, &settings, problems);
            let listen = settings.listen_port();
            match &listen {
                Ok(port) => problems.check(ports.iter().any(|p| p.number == *port), || {
                    format!(
                        "{what}: {} listens on {port} but the container declares {:?}",
                        binary.listen_var(),
                        ports.iter().map(|p| p.number).collect::<Vec<_>>()
                    )
                }),
                Err(e) => problems.push(format!("{what}: {e}")),
            }
            for port in &ports {
                problems.check(listen.as_ref().is_ok_and(|l| *l == port.number), || {
                    format!(
                        "{what}: containerPort {} is not a port the binary listens on",
                        port.number
                    )
                });
            }

            // Probes: liveness on /healthz, readiness on /readyz, on the listener.
            let mut probe_ports = BTreeSet::new();
            for (probe, want_path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
            {
                let Some(get) = at(container, &[probe, "httpGet"]) else {
                    problems.push(format!("{what}: no {probe} with httpGet"));
                    continue;
                };
                let path = text_at(get, &["path"]).unwrap_or_default();
                problems.check(path == want_path, || {
                    format!("{what}: {probe} path is {path}, want {want_path}")
                });
                problems.check(binary.serves(&path).await, || {
                    format!("{what}: {probe} path {path} is not served by the {binary:?}")
                });
                let port = get.get("port").and_then(|p| resolve_port(&ports, p));
                probe_ports.extend(port);
                problems.check(
                    port.is_some() && port == listen.as_ref().ok().copied(),
                    || {
                        format!(
                            "{what}: {probe} port {:?} is not the declared listener port",
                            get.get("port")
                        )
                    },
                );
            }

            // Prometheus discovery by annotation: the listener's port and a served path.
            let annotations = string_map(at(&pod, &["metadata", "annotations"]));
            let mut scrape_port = None;
            if annotations.get("prometheus.io/scrape").map(String::as_str) == Some("true") {
                let port = annotations
                    .get("prometheus.io/port")
                    .and_then(|p| p.parse().ok());
                scrape_port = port;
                problems.check(
                    port.is_some() && port == listen.as_ref().ok().copied(),
                    || format!("{what}: prometheus.io/port {port:?} is not the listener port"),
                );
                let path = annotations
                    .get("prometheus.io/path")
                    .cloned()
                    .unwrap_or_else(|| "/metrics".into());
                problems.check(binary.serves(&path).await, || {
                    format!("{what}: prometheus.io/path {path} is not served")
                });
            }

            // Resources: requests and a memory limit.
            for keys in [
                ["resources", "requests", "cpu"],
                ["resources", "requests", "memory"],
                ["resources", "limits", "memory"],
            ] {
                problems.check(at(container, &keys).is_some(), || {
                    format!("{what}: no {}", keys.join("."))
                });
            }

            // The kubelet's SIGKILL must come after the preStop pause plus the grace.
            let termination = at(&pod, &["spec", "terminationGracePeriodSeconds"])
                .and_then(Value::as_u64)
                .map(Duration::from_secs)
                .unwrap_or(Duration::from_secs(30)); // Kubernetes' default
            let pre_stop = pre_stop_sleep(container);
            let grace = settings.shutdown_grace();
            problems.check(termination > pre_stop + grace, || {
                format!(
                    "{what}: terminationGracePeriodSeconds {termination:?} is not above the preStop \
                     pause {pre_stop:?} plus JOBGATE_SHUTDOWN_GRACE_MS {grace:?}"
                )
            });

            workloads.push(Workload {
                name,
                labels,
                ports,
                probe_ports,
                scrape_port,
                container: container.clone(),
                settings,
            });
        }
        workloads
    }

    fn check_services(&self, workloads: &[Workload], problems: &mut Problems) {
        for service in &self.services {
            let name = text_at(service, &["metadata", "name"]).unwrap_or_default();
            let selector = string_map(at(service, &["spec", "selector"]));
            let selected: Vec<&Workload> = workloads
                .iter()
                .filter(|w| selects(&selector, &w.labels))
                .collect();
            problems.check(!selected.is_empty(), || {
                format!("Service {name}: selector {selector:?} matches no Deployment's pods")
            });
            for port in seq_at(service, &["spec", "ports"]) {
                let target = port.get("targetPort").or_else(|| port.get("port"));
                for workload in &selected {
                    problems.check(
                        target
                            .and_then(|t| resolve_port(&workload.ports, t))
                            .is_some(),
                        || {
                            format!(
                                "Service {name}: targetPort {target:?} is no container port of {}",
                                workload.name
                            )
                        },
                    );
                }
            }
        }
    }

    fn check_budgets(&self, workloads: &[Workload], problems: &mut Problems) {
        for workload in workloads {
            let covered = self.budgets.iter().any(|pdb| {
                selects(
                    &string_map(at(pdb, &["spec", "selector", "matchLabels"])),
                    &workload.labels,
                )
            });
            problems.check(covered, || {
                format!(
                    "Deployment {}: no PodDisruptionBudget selects its pods",
                    workload.name
                )
            });
        }
        for pdb in &self.budgets {
            let name = text_at(pdb, &["metadata", "name"]).unwrap_or_default();
            let selector = string_map(at(pdb, &["spec", "selector", "matchLabels"]));
            problems.check(
                workloads.iter().any(|w| selects(&selector, &w.labels)),
                || format!("PodDisruptionBudget {name}: selector {selector:?} matches no pods"),
            );
        }
    }

    fn check_scaled_objects(&self, workloads: &[Workload], problems: &mut Problems) {
        for scaled in &self.scaled_objects {
            let name = text_at(scaled, &["metadata", "name"]).unwrap_or_default();
            let target = text_at(scaled, &["spec", "scaleTargetRef", "name"]).unwrap_or_default();
            let Some(workload) = workloads.iter().find(|w| w.name == target) else {
                problems.push(format!(
                    "ScaledObject {name}: scaleTargetRef {target:?} is no Deployment"
                ));
                continue;
            };
            let settings = &workload.settings;
            problems.check(settings.binary == Binary::Consumer, || {
                format!("ScaledObject {name}: scales {target}, which is not a consumer")
            });
            let queues = settings.queues();
            let triggers = seq_at(scaled, &["spec", "triggers"]);
            problems.check(!triggers.is_empty(), || {
                format!("ScaledObject {name}: no triggers")
            });
            for trigger in triggers {
                let meta = |key: &str| text_at(trigger, &["metadata", key]).unwrap_or_default();
                match text_at(trigger, &["type"]).as_deref() {
                    Some("rabbitmq") => {
                        // The management API counts unacked messages; AMQP does not.
                        problems.check(meta("protocol") == "http", || {
                            format!(
                                "ScaledObject {name}: the rabbitmq trigger must use protocol http"
                            )
                        });
                        problems.check(meta("mode") == "QueueLength", || {
                            format!("ScaledObject {name}: the rabbitmq trigger must use mode QueueLength")
                        });
                        problems.check(queues.contains(&meta("queueName")), || {
                            format!("ScaledObject {name}: queueName {} is not drained by {target} ({queues:?})", meta("queueName"))
                        });
                        let auth =
                            text_at(trigger, &["authenticationRef", "name"]).unwrap_or_default();
                        match self.trigger_auths.get(&auth) {
                            None => problems.push(format!(
                                "ScaledObject {name}: authenticationRef {auth:?} is no TriggerAuthentication"
                            )),
                            Some(auth_doc) => {
                                // Parameters read from the target's container env.
                                for reference in seq_at(auth_doc, &["spec", "env"]) {
                                    let var = text_at(reference, &["name"]).unwrap_or_default();
                                    let container = text_at(reference, &["containerName"]);
                                    let container_name = text_at(&workload.container, &["name"]);
                                    problems.check(container.is_none() || container == container_name, || {
                                        format!("TriggerAuthentication {auth}: containerName {container:?} is not {target}'s container {container_name:?}")
                                    });
                                    let Some(value) = settings.env.get(&var) else {
                                        problems.push(format!("TriggerAuthentication {auth}: {target} has no variable {var}"));
                                        continue;
                                    };
                                    if text_at(reference, &["parameter"]).as_deref() == Some("host") {
                                        problems.check(management_url(value).is_some(), || {
                                            format!("TriggerAuthentication {auth}: host ({var}) is not an http://user:password@host:15672/ URL: {value}")
                                        });
                                    }
                                }
                                for reference in seq_at(auth_doc, &["spec", "secretTargetRef"]) {
                                    let secret = text_at(reference, &["name"]).unwrap_or_default();
                                    let key = text_at(reference, &["key"]).unwrap_or_default();
                                    problems.check(
                                        self.secrets.get(&secret).is_some_and(|keys| keys.contains(&key)),
                                        || format!("TriggerAuthentication {auth}: no Secret key {secret}/{key}"),
                                    );
                                }
                            }
                        }
                    }
                    Some("kafka") => {
                        let topic = meta("topic");
                        problems.check(queues.contains(&topic), || {
                            format!("ScaledObject {name}: topic {topic} is not drained by {target} ({queues:?})")
                        });
                        let group = settings
                            .get("JOBGATE_KAFKA_GROUP")
                            .unwrap_or_default()
                            .replace("{queue}", &topic);
                        problems.check(meta("consumerGroup") == group, || {
                            format!("ScaledObject {name}: consumerGroup {} is not the consumer's group {group}", meta("consumerGroup"))
                        });
                        // The same Services and ports; KEDA, in its own namespace, may
                        // need the namespace in the name (`svc.ns.svc:9092`).
                        let brokers = settings.get("JOBGATE_KAFKA_BROKERS").unwrap_or_default();
                        let services = |list: &str| -> Vec<Option<(String, u16)>> {
                            list.split(',')
                                .map(|b| service_and_port(b.trim()))
                                .collect()
                        };
                        problems.check(
                            services(&meta("bootstrapServers")) == services(&brokers)
                                && !services(&brokers).contains(&None),
                            || format!("ScaledObject {name}: bootstrapServers {} are not JOBGATE_KAFKA_BROKERS {brokers}", meta("bootstrapServers")),
                        );
                        problems.check(meta("lagThreshold").parse::<u64>().is_ok(), || {
                            format!("ScaledObject {name}: lagThreshold is not a number")
                        });
                    }
                    other => problems.push(format!(
                        "ScaledObject {name}: trigger type {other:?} is not checked here"
                    )),
                }
            }
        }
    }

    /// Every pod spec: no service account token (jobgate never calls the API server),
    /// and no emptyDir without a size limit (a full one evicts the pod, not the node).
    fn check_pod_specs(&self, problems: &mut Problems) {
        for deployment in &self.deployments {
            let name = text_at(deployment, &["metadata", "name"]).unwrap_or_default();
            let spec = at(deployment, &["spec", "template", "spec"])
                .cloned()
                .unwrap_or_default();
            problems.check(
                spec.get("automountServiceAccountToken") == Some(&Value::Bool(false)),
                || {
                    format!(
                        "Deployment {name}: the pod spec lacks automountServiceAccountToken: false"
                    )
                },
            );
            for volume in seq_at(&spec, &["volumes"]) {
                if let Some(empty_dir) = volume.get("emptyDir") {
                    let volume_name = text_at(volume, &["name"]).unwrap_or_default();
                    problems.check(text_at(empty_dir, &["sizeLimit"]).is_some(), || {
                        format!("Deployment {name}: emptyDir {volume_name} has no sizeLimit")
                    });
                }
            }
        }
    }

    /// The NetworkPolicies selecting `workload` (an empty podSelector selects every pod).
    fn policies_of<'a>(&'a self, workload: &Workload) -> Vec<&'a Value> {
        self.network_policies
            .iter()
            .filter(|policy| {
                let selector = string_map(at(policy, &["spec", "podSelector", "matchLabels"]));
                selector.is_empty() || selects(&selector, &workload.labels)
            })
            .collect()
    }

    /// Each workload's ingress is isolated and opens exactly the ports its probes,
    /// Services and scrape annotation use; its egress, when isolated, reaches DNS and
    /// both brokers.
    fn check_network_policies(&self, workloads: &[Workload], problems: &mut Problems) {
        for policy in &self.network_policies {
            let name = text_at(policy, &["metadata", "name"]).unwrap_or_default();
            problems.check(
                at(policy, &["spec", "podSelector", "matchExpressions"]).is_none(),
                || format!("NetworkPolicy {name}: matchExpressions are not checked here"),
            );
            problems.check(
                workloads
                    .iter()
                    .any(|w| self.policies_of(w).contains(&policy)),
                || format!("NetworkPolicy {name}: selects no jobgate pods"),
            );
        }
        for workload in workloads {
            let what = format!("Deployment {}", workload.name);
            let policies = self.policies_of(workload);
            let isolates = |direction: &str| {
                policies.iter().any(|policy| {
                    let types: Vec<String> = seq_at(policy, &["spec", "policyTypes"])
                        .iter()
                        .filter_map(text)
                        .collect();
                    // Without policyTypes a policy isolates ingress, and egress if it
                    // has egress rules.
                    types.iter().any(|t| t == direction)
                        || (types.is_empty()
                            && (direction == "Ingress"
                                || at(policy, &["spec", "egress"]).is_some()))
                })
            };
            // The ports each direction's rules open, by number and protocol; None: all.
            let opened = |direction: &str, problems: &mut Problems| {
                let mut ports: Option<BTreeSet<(u16, String)>> = Some(BTreeSet::new());
                for policy in &policies {
                    let policy_name = text_at(policy, &["metadata", "name"]).unwrap_or_default();
                    for rule in seq_at(policy, &["spec", direction]) {
                        let rule_ports = seq_at(rule, &["ports"]);
                        if rule_ports.is_empty() {
                            ports = None;
                        }
                        for port in rule_ports {
                            let protocol =
                                text_at(port, &["protocol"]).unwrap_or_else(|| "TCP".into());
                            let number = match (direction, port.get("port")) {
                                // Ingress: a container port of the pod (name or number).
                                ("ingress", Some(p)) => resolve_port(&workload.ports, p),
                                // Egress: a port somewhere else, by number.
                                (_, Some(p)) => text(p).and_then(|p| p.parse().ok()),
                                (_, None) => None,
                            };
                            match number {
                                Some(number) => {
                                    if let Some(ports) = ports.as_mut() {
                                        ports.insert((number, protocol));
                                    }
                                }
                                None => problems.push(format!(
                                    "NetworkPolicy {policy_name}: {direction} port {:?} is no \
                                     port of {} (or not a number)",
                                    port.get("port"),
                                    workload.name
                                )),
                            }
                        }
                    }
                }
                ports
            };

            problems.check(isolates("Ingress"), || {
                format!("{what}: no NetworkPolicy isolates its ingress (default deny)")
            });
            // Who needs which port of the pod.
            let mut needed: BTreeMap<u16, BTreeSet<String>> = BTreeMap::new();
            for port in &workload.probe_ports {
                needed.entry(*port).or_default().insert("its probes".into());
            }
            if let Some(port) = workload.scrape_port {
                needed.entry(port).or_default().insert("Prometheus".into());
            }
            for service in &self.services {
                let service_name = text_at(service, &["metadata", "name"]).unwrap_or_default();
                if !selects(
                    &string_map(at(service, &["spec", "selector"])),
                    &workload.labels,
                ) {
                    continue;
                }
                for port in seq_at(service, &["spec", "ports"]) {
                    let target = port.get("targetPort").or_else(|| port.get("port"));
                    if let Some(number) = target.and_then(|t| resolve_port(&workload.ports, t)) {
                        needed
                            .entry(number)
                            .or_default()
                            .insert(format!("Service {service_name}"));
                    }
                }
            }
            match opened("ingress", problems) {
                None => problems.push(format!(
                    "{what}: a NetworkPolicy ingress rule opens every port; name the ports"
                )),
                Some(open) => {
                    for (port, users) in &needed {
                        problems.check(open.contains(&(*port, "TCP".to_owned())), || {
                            let users: Vec<&str> = users.iter().map(String::as_str).collect();
                            format!(
                                "{what}: no NetworkPolicy lets {} reach port {port}",
                                users.join(", ")
                            )
                        });
                    }
                    for (port, protocol) in &open {
                        problems.check(needed.contains_key(port), || {
                            format!("{what}: ingress opens {port}/{protocol}, which no probe or Service uses")
                        });
                    }
                }
            }

            // Egress is checked where it is isolated: unisolated, everything may leave.
            let egress_isolated = isolates("Egress");
            problems.check(egress_isolated, || {
                format!("{what}: no NetworkPolicy limits its egress")
            });
            if let Some(open) = opened("egress", problems).filter(|_| egress_isolated) {
                let mut needed = vec![
                    (53, "UDP".to_owned(), "DNS".to_owned()),
                    (53, "TCP".to_owned(), "DNS".to_owned()),
                ];
                let amqp = self.amqp_url_of(workload).unwrap_or_default();
                for node in amqp.split(',') {
                    match amqp_port(node.trim()) {
                        Some(port) => needed.push((port, "TCP".into(), "RabbitMQ".into())),
                        None => {
                            problems.push(format!("{what}: no AMQP URL with a port ({node:?})"))
                        }
                    }
                }
                let brokers = workload
                    .settings
                    .get("JOBGATE_KAFKA_BROKERS")
                    .unwrap_or_default();
                for broker in brokers.split(',') {
                    match port_of_host_port(broker.trim()) {
                        Some((_, port)) => needed.push((port, "TCP".into(), "Kafka".into())),
                        None => problems.push(format!("{what}: Kafka broker {broker} has no port")),
                    }
                }
                for (port, protocol, whom) in needed {
                    problems.check(open.contains(&(port, protocol.clone())), || {
                        format!("{what}: egress to {whom} ({port}/{protocol}) is not allowed")
                    });
                }
            }
        }
    }

    /// The example value of a workload's `JOBGATE_AMQP_URL` (literal, with its `$(VAR)`
    /// references expanded, or from a Secret).
    fn amqp_url_of(&self, workload: &Workload) -> Option<String> {
        let var = seq_at(&workload.container, &["env"])
            .iter()
            .find(|var| text_at(var, &["name"]).as_deref() == Some("JOBGATE_AMQP_URL"));
        match var.and_then(|var| at(var, &["valueFrom", "secretKeyRef"])) {
            Some(secret) => {
                let key = (text_at(secret, &["name"])?, text_at(secret, &["key"])?);
                self.secret_data.get(&key).cloned()
            }
            None => workload.settings.get("JOBGATE_AMQP_URL"),
        }
    }

    fn check_kustomizations(&self, problems: &mut Problems) {
        let mut deployed = BTreeSet::new();
        for (path, kustomization) in &self.kustomizations {
            let dir = path.parent().expect("a file has a directory");
            for resource in seq_at(kustomization, &["resources"]) {
                let resource = text(resource).unwrap_or_default();
                let target = dir.join(&resource);
                if target.is_file() {
                    deployed.insert(normalize(&target));
                }
                let exists = if target.is_dir() {
                    target.join("kustomization.yaml").is_file()
                } else {
                    target.is_file()
                };
                problems.check(exists, || {
                    format!(
                        "{}: resource {resource} is neither a file nor a kustomization",
                        path.display()
                    )
                });
            }
        }
        for file in &self.resource_files {
            problems.check(deployed.contains(&normalize(file)), || {
                format!("{}: no kustomization.yaml lists it", file.display())
            });
        }
    }
}

/// `path` without `.` and `..` components (the files exist: `canonicalize`).
fn normalize(path: &Path) -> PathBuf {
    path.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The port of an `amqp://` or `amqps://` URL: explicit, or the scheme's default.
fn amqp_port(url: &str) -> Option<u16> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match port_of_host_port(host_port) {
        Some((_, port)) => Some(port),
        None => match scheme {
            "amqp" => Some(5672),
            "amqps" => Some(5671),
            _ => None,
        },
    }
}

/// The pause of a `preStop: exec: sleep N` hook, zero without one.
fn pre_stop_sleep(container: &Value) -> Duration {
    let command: Vec<String> = seq_at(container, &["lifecycle", "preStop", "exec", "command"])
        .iter()
        .filter_map(text)
        .collect();
    match command.as_slice() {
        [] => Duration::ZERO,
        [sleep, secs] if sleep == "sleep" => {
            Duration::from_secs(secs.parse().expect("preStop sleeps whole seconds"))
        }
        other => panic!("a preStop hook this test cannot size: {other:?}"),
    }
}

/// What both deployment kinds share: every `JOBGATE_*` variable is one the binary
/// reads, and each value parses as the binary would parse it.
fn check_settings(what: &str, settings: &Settings, problems: &mut Problems) {
    let unknown = settings.unknown_vars();
    problems.check(unknown.is_empty(), || {
        format!("{what}: the {:?} reads no {unknown:?}", settings.binary)
    });
    // Let clap parse the literal values (secrets and Compose's ${...} aside).
    let mut argv = vec![format!("{:?}", settings.binary).to_lowercase()];
    let command = settings.binary.command();
    // Top-level arguments only: a subcommand's flags are not valid before it.
    for arg in command.get_arguments() {
        let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let Some(value) = settings.env.get(&*env.to_string_lossy()) else {
            continue;
        };
        if value.contains("<secret>") || value.contains("${") {
            continue;
        }
        argv.push(format!("--{long}={value}"));
    }
    let matches = match command.try_get_matches_from(&argv) {
        Ok(matches) => matches,
        Err(e) => {
            problems.push(format!(
                "{what}: the {:?} refuses its settings: {e}",
                settings.binary
            ));
            return;
        }
    };
    // What the binaries check right after parsing (BrokerArgs::check): every node of
    // JOBGATE_AMQP_URL an AMQP URL, none mixing TLS, the Kafka security settings.
    let broker = match settings.binary {
        Binary::Producer => {
            producer::ProducerConfig::from_arg_matches(&matches).map(|config| config.broker)
        }
        Binary::Consumer => {
            consumer::ConsumerConfig::from_arg_matches(&matches).map(|config| config.broker)
        }
    };
    match broker.map(|broker| broker.check()) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!(
            "{what}: the {:?} would not start: {e}",
            settings.binary
        )),
        Err(e) => problems.push(format!("{what}: {e}")),
    }
}

/// `value` with its `$(VAR)` references expanded as the kubelet expands an env value:
/// `$(NAME)` of a variable in `defined` becomes its value, `$$` is one `$`, anything
/// else stays as written. Also returns the names referred to but not defined.
fn expand_references(value: &str, defined: &BTreeMap<String, String>) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut undefined = Vec::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail
            .strip_prefix("$(")
            .and_then(|inner| inner.split_once(')'))
        {
            match defined.get(name) {
                Some(expanded) => out.push_str(expanded),
                None => {
                    if !undefined.iter().any(|u| u == name) {
                        undefined.push(name.to_owned());
                    }
                    out.push_str(&tail[..name.len() + 3]);
                }
            }
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    (out, undefined)
}

/// `host:port` as the Service it names and the port: the first DNS label
/// (`svc`, `svc.ns`, `svc.ns.svc.cluster.local` are one Service).
fn service_and_port(server: &str) -> Option<(String, u16)> {
    let (host, port) = port_of_host_port(server)?;
    let service = host.split('.').next().filter(|s| !s.is_empty())?;
    Some((service.to_owned(), port))
}

/// The host of a RabbitMQ management API URL as KEDA's rabbitmq trigger takes it:
/// `http://user:password@host:15672/` (or https).
fn management_url(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let authority = rest.split('/').next()?;
    let (userinfo, host_port) = authority.rsplit_once('@')?;
    let (user, password) = userinfo.split_once(':')?;
    let (host, port) = port_of_host_port(host_port)?;
    (!user.is_empty() && !password.is_empty() && !host.is_empty() && port == 15672).then_some(host)
}

impl Cluster {
    /// The brokers an operator runs in this overlay (`RabbitmqCluster`, Strimzi's
    /// `Kafka`), and jobgate pointed at them: the backend, each node or bootstrap
    /// server one the operator creates, on a port it opens, with its credentials.
    fn check_operator_brokers(&self, workloads: &[Workload], problems: &mut Problems) {
        // The operators copy their resource's labels to the brokers' pods: a label
        // jobgate's NetworkPolicies select would cut the brokers' own traffic.
        for resource in self
            .rabbitmq_clusters
            .iter()
            .chain(&self.kafkas)
            .chain(&self.kafka_node_pools)
        {
            let kind = text_at(resource, &["kind"]).unwrap_or_default();
            let name = text_at(resource, &["metadata", "name"]).unwrap_or_default();
            let labels = string_map(at(resource, &["metadata", "labels"]));
            for policy in &self.network_policies {
                let selector = string_map(at(policy, &["spec", "podSelector", "matchLabels"]));
                let policy_name = text_at(policy, &["metadata", "name"]).unwrap_or_default();
                problems.check(!selects(&selector, &labels), || {
                    format!(
                        "{kind} {name}: NetworkPolicy {policy_name} selects its labels \
                         {labels:?}, and so the broker's pods the operator labels alike"
                    )
                });
            }
        }

        for cluster in &self.rabbitmq_clusters {
            let name = text_at(cluster, &["metadata", "name"]).unwrap_or_default();
            let replicas = at(cluster, &["spec", "replicas"])
                .and_then(Value::as_u64)
                .unwrap_or(1);
            let port = if at(cluster, &["spec", "tls", "secretName"]).is_some() {
                5671
            } else {
                5672
            };
            let secret = format!("{name}-default-user");
            let sample = |key: &str| self.secret_data.get(&(secret.clone(), key.to_owned()));
            for workload in workloads {
                let what = format!("Deployment {}", workload.name);
                let backend = workload.settings.get("JOBGATE_BACKEND").unwrap_or_default();
                problems.check(backend == "rabbitmq", || {
                    format!("{what}: JOBGATE_BACKEND is {backend}, beside RabbitmqCluster {name}")
                });
                let url = self.amqp_url_of(workload).unwrap_or_default();
                if url.contains("<secret>") || self.secret_data.values().any(|v| *v == url) {
                    problems.push(format!(
                        "{what}: JOBGATE_AMQP_URL is not built from RabbitmqCluster {name}'s \
                         Secret {secret} (with $(VAR) references)"
                    ));
                    continue;
                }
                let mut pods = BTreeSet::new();
                for node in url.split(',').map(str::trim) {
                    // A node that does not parse is reported by check_settings.
                    let Ok(uri) = node.parse::<lapin::uri::AMQPUri>() else {
                        continue;
                    };
                    let host = &uri.authority.host;
                    let labels: Vec<&str> = host.split('.').collect();
                    let pod = labels[0]
                        .strip_prefix(&format!("{name}-server-"))
                        .and_then(|i| i.parse::<u64>().ok())
                        .filter(|_| labels.get(1) == Some(&format!("{name}-nodes").as_str()));
                    match pod {
                        Some(i) => {
                            problems.check(i < replicas, || {
                                format!("{what}: JOBGATE_AMQP_URL names pod {i} of RabbitmqCluster {name}, which has {replicas}")
                            });
                            pods.insert(i);
                        }
                        None => problems.check(labels[0] == name, || {
                            format!(
                                "{what}: JOBGATE_AMQP_URL node {host} is neither RabbitmqCluster \
                                 {name}'s Service nor one of its pods ({name}-server-N.{name}-nodes)"
                            )
                        }),
                    }
                    problems.check(uri.authority.port == port, || {
                        format!("{what}: JOBGATE_AMQP_URL node {host} on port {}, RabbitmqCluster {name} listens on {port}", uri.authority.port)
                    });
                    let userinfo = &uri.authority.userinfo;
                    problems.check(
                        Some(&userinfo.username) == sample("username")
                            && Some(&userinfo.password) == sample("password"),
                        || format!("{what}: JOBGATE_AMQP_URL node {host} does not log in as {secret}'s username and password"),
                    );
                }
                problems.check(
                    pods.is_empty() || pods.len() as u64 == replicas,
                    || format!("{what}: JOBGATE_AMQP_URL lists pods {pods:?} of RabbitmqCluster {name}'s {replicas}: one left out is never tried"),
                );
            }
        }

        for kafka in &self.kafkas {
            let name = text_at(kafka, &["metadata", "name"]).unwrap_or_default();
            let listeners: Vec<(u16, bool)> = seq_at(kafka, &["spec", "kafka", "listeners"])
                .iter()
                .filter_map(|l| {
                    let port = text_at(l, &["port"])?.parse().ok()?;
                    Some((port, l.get("tls") == Some(&Value::Bool(true))))
                })
                .collect();
            let brokers: u64 = self
                .kafka_node_pools
                .iter()
                .filter(|pool| {
                    string_map(at(pool, &["metadata", "labels"])).get("strimzi.io/cluster")
                        == Some(&name)
                        && seq_at(pool, &["spec", "roles"])
                            .iter()
                            .any(|role| text(role).as_deref() == Some("broker"))
                })
                .filter_map(|pool| at(pool, &["spec", "replicas"]).and_then(Value::as_u64))
                .sum();
            problems.check(brokers > 0, || {
                format!("Kafka {name}: no KafkaNodePool (label strimzi.io/cluster: {name}) gives it brokers")
            });
            let bootstrap = format!("{name}-kafka-bootstrap");
            for workload in workloads {
                let what = format!("Deployment {}", workload.name);
                let settings = &workload.settings;
                let backend = settings.get("JOBGATE_BACKEND").unwrap_or_default();
                problems.check(backend == "kafka", || {
                    format!("{what}: JOBGATE_BACKEND is {backend}, beside Kafka {name}")
                });
                let protocol = settings
                    .get("JOBGATE_KAFKA_SECURITY_PROTOCOL")
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                let tls = protocol == "ssl" || protocol == "sasl_ssl";
                let servers = settings.get("JOBGATE_KAFKA_BROKERS").unwrap_or_default();
                for server in servers.split(',').map(str::trim) {
                    match service_and_port(server) {
                        Some((service, port)) => {
                            problems.check(service == bootstrap, || {
                                format!("{what}: JOBGATE_KAFKA_BROKERS names {service}, not {bootstrap}, the bootstrap Service of Kafka {name}")
                            });
                            problems.check(listeners.contains(&(port, tls)), || {
                                format!("{what}: JOBGATE_KAFKA_BROKERS port {port} is no listener of Kafka {name} with tls {tls} (JOBGATE_KAFKA_SECURITY_PROTOCOL {protocol}); listeners {listeners:?}")
                            });
                        }
                        None => problems.push(format!(
                            "{what}: JOBGATE_KAFKA_BROKERS {server} is not host:port"
                        )),
                    }
                }
                let factor = settings
                    .get("JOBGATE_KAFKA_REPLICATION_FACTOR")
                    .unwrap_or_default();
                if let Ok(factor) = factor.parse::<u64>() {
                    problems.check(factor <= brokers, || {
                        format!("{what}: JOBGATE_KAFKA_REPLICATION_FACTOR {factor} is above Kafka {name}'s {brokers} brokers: no topic could be created")
                    });
                }
            }
        }
    }
}

/// What `kubectl apply -k dir` applies, each object with the file it comes from: the
/// `resources` (files, and kustomization directories rendered in turn), then the
/// `patches` in order. Enough of Kustomize for these overlays, and strict about the
/// rest: a field or patch it does not apply is an error, not skipped.
///
/// Patches: JSON 6902 operations (`add`, `replace`, `remove`, `test`) on one `target`,
/// or a strategic merge patch of mappings (`null` deletes a key, `$patch: delete` the
/// object). A strategic merge of a list is refused: Kustomize releases put new items
/// first or last (kustomize issues 2907, 3157), and in `env` the order decides whether
/// a `$(VAR)` reference is expanded, so such patches use JSON 6902 indices.
fn render_kustomization(dir: &Path) -> Result<Vec<(PathBuf, Value)>, String> {
    let path = dir.join("kustomization.yaml");
    let kustomization = load_yaml(&path)
        .pop()
        .ok_or_else(|| format!("{} is empty", path.display()))?;
    for field in kustomization
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| text(k))
    {
        if !["apiVersion", "kind", "resources", "patches", "images"].contains(&field.as_str()) {
            return Err(format!(
                "{}: this test does not render `{field}`",
                path.display()
            ));
        }
    }
    let mut objects = Vec::new();
    for resource in seq_at(&kustomization, &["resources"]) {
        let target = dir.join(text(resource).unwrap_or_default());
        if target.is_dir() {
            objects.extend(render_kustomization(&target)?);
        } else {
            objects.extend(
                load_yaml(&target)
                    .into_iter()
                    .map(|doc| (target.clone(), doc)),
            );
        }
    }
    for (i, patch) in seq_at(&kustomization, &["patches"]).iter().enumerate() {
        let what = format!("{}, patch {}", path.display(), i + 1);
        let body = match (text_at(patch, &["patch"]), text_at(patch, &["path"])) {
            (Some(inline), None) => inline,
            (None, Some(file)) => std::fs::read_to_string(dir.join(&file))
                .map_err(|e| format!("{what}: {file}: {e}"))?,
            _ => return Err(format!("{what}: needs one of `patch` and `path`")),
        };
        let body: Value =
            serde_norway::from_str(&body).map_err(|e| format!("{what}: not YAML: {e}"))?;
        let (kind, name) = match patch.get("target") {
            Some(target) => {
                for key in target
                    .as_mapping()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, _)| text(k))
                {
                    if key != "kind" && key != "name" {
                        return Err(format!("{what}: target {key} is not rendered by this test"));
                    }
                }
                (text_at(target, &["kind"]), text_at(target, &["name"]))
            }
            None => (
                text_at(&body, &["kind"]),
                text_at(&body, &["metadata", "name"]),
            ),
        };
        let is_target = |doc: &Value| {
            kind.is_some()
                && name.is_some()
                && text_at(doc, &["kind"]) == kind
                && text_at(doc, &["metadata", "name"]) == name
        };
        let matched = objects.iter().filter(|(_, doc)| is_target(doc)).count();
        if matched != 1 {
            return Err(format!(
                "{what}: target {kind:?} {name:?} matches {matched} objects"
            ));
        }
        let (_, doc) = objects
            .iter_mut()
            .find(|(_, doc)| is_target(doc))
            .expect("one target");
        match &body {
            Value::Sequence(ops) => json_patch(doc, ops).map_err(|e| format!("{what}: {e}"))?,
            _ if text_at(&body, &["$patch"]).as_deref() == Some("delete") => {
                objects.retain(|(_, doc)| !is_target(doc));
            }
            _ => merge_patch(doc, &body, "").map_err(|e| format!("{what}: {e}"))?,
        }
    }
    Ok(objects)
}

/// Applies JSON 6902 operations to `doc`, in order; a failed `test` is an error (as it
/// fails `kustomize build`).
fn json_patch(doc: &mut Value, ops: &[Value]) -> Result<(), String> {
    fn child<'a>(value: &'a mut Value, token: &str) -> Option<&'a mut Value> {
        match value {
            Value::Sequence(items) => items.get_mut(token.parse::<usize>().ok()?),
            Value::Mapping(map) => map.get_mut(token),
            _ => None,
        }
    }
    for op in ops {
        let kind = text_at(op, &["op"]).unwrap_or_default();
        let path = text_at(op, &["path"]).unwrap_or_default();
        let tokens: Vec<String> = path
            .strip_prefix('/')
            .ok_or_else(|| format!("path {path:?} does not start with /"))?
            .split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
        let (last, parents) = tokens.split_last().expect("split yields one token");
        let mut parent = &mut *doc;
        for token in parents {
            parent = child(parent, token).ok_or_else(|| format!("{kind} {path}: no {token}"))?;
        }
        let value = op.get("value").cloned();
        let missing = || format!("{kind} {path}: nothing at {last}");
        match (kind.as_str(), parent) {
            ("test", parent) => {
                let found = child(parent, last).map(|v| v.clone());
                if found != value {
                    return Err(format!(
                        "test {path} failed: it is {found:?}, not {value:?}"
                    ));
                }
            }
            ("replace", parent) => {
                *child(parent, last).ok_or_else(missing)? = value.ok_or("replace without value")?;
            }
            ("add", Value::Sequence(items)) => {
                let value = value.ok_or("add without value")?;
                match last.as_str() {
                    "-" => items.push(value),
                    index => match index.parse::<usize>() {
                        Ok(i) if i <= items.len() => items.insert(i, value),
                        _ => return Err(missing()),
                    },
                }
            }
            ("add", Value::Mapping(map)) => {
                map.insert(
                    Value::String(last.clone()),
                    value.ok_or("add without value")?,
                );
            }
            ("remove", Value::Sequence(items)) => match last.parse::<usize>() {
                Ok(i) if i < items.len() => {
                    items.remove(i);
                }
                _ => return Err(missing()),
            },
            ("remove", Value::Mapping(map)) => {
                map.remove(last.as_str()).ok_or_else(missing)?;
            }
            (other, _) => return Err(format!("{other} {path}: not applied by this test")),
        }
    }
    Ok(())
}

/// Merges a strategic merge patch of mappings into `target` (see
/// [`render_kustomization`]); `at` is the path so far, for errors.
fn merge_patch(target: &mut Value, patch: &Value, at: &str) -> Result<(), String> {
    let (Value::Mapping(target), Value::Mapping(patch)) = (target, patch) else {
        return Err(format!("{at}: a strategic merge patch of a non-mapping"));
    };
    for (key, value) in patch {
        let here = format!("{at}.{}", text(key).unwrap_or_default());
        if value.is_null() {
            target.remove(key);
            continue;
        }
        match target.get_mut(key) {
            Some(existing @ Value::Mapping(_)) if value.is_mapping() => {
                merge_patch(existing, value, &here)?;
            }
            Some(Value::Sequence(_)) => {
                return Err(format!(
                    "{here}: a strategic merge of a list, whose new items kustomize releases \
                     place differently: use a JSON 6902 patch"
                ));
            }
            _ => {
                target.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(())
}

/// Every overlay under `dir` (each directory with a kustomization.yaml but `base`,
/// which is never applied alone), rendered, by its path.
fn kubernetes_overlays(dir: &Path, problems: &mut Problems) -> Vec<(String, Cluster)> {
    let mut overlays = Vec::new();
    for path in files_under(dir, &["yaml"]) {
        let Some(overlay) = path
            .parent()
            .filter(|_| path.file_name().is_some_and(|f| f == "kustomization.yaml"))
        else {
            continue;
        };
        if overlay == dir.join("base") {
            continue;
        }
        let name = match overlay.strip_prefix(dir) {
            Ok(rel) if rel.as_os_str().is_empty() => "deploy/kubernetes".to_owned(),
            Ok(rel) => format!("deploy/kubernetes/{}", rel.display()),
            Err(_) => overlay.display().to_string(),
        };
        match render_kustomization(overlay) {
            Ok(objects) => {
                let mut found = Problems::default();
                let cluster = Cluster::from_documents(objects, &mut found);
                problems.extend_from(&name, found);
                overlays.push((name, cluster));
            }
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    overlays
}

/// Each overlay as `kubectl apply -k` would apply it, checked against the binaries;
/// and every file under deploy/kubernetes part of a kustomization.
#[tokio::test]
async fn kubernetes_manifests_match_the_binaries() {
    let dir = workspace_root().join("deploy/kubernetes");
    let mut problems = Problems::default();
    Cluster::load(&dir, &mut problems).check_kustomizations(&mut problems);
    let overlays = kubernetes_overlays(&dir, &mut problems);
    assert!(!overlays.is_empty(), "deploy/kubernetes has overlays");
    for (name, cluster) in &overlays {
        let mut found = Problems::default();
        let workloads = cluster.check_deployments(&mut found).await;
        let binaries: BTreeSet<Binary> = workloads.iter().map(|w| w.settings.binary).collect();
        found.check(
            binaries == BTreeSet::from([Binary::Producer, Binary::Consumer]),
            || format!("deploys {binaries:?}, not both binaries"),
        );
        found.check(
            !cluster.services.is_empty() && !cluster.scaled_objects.is_empty(),
            || "has no Service or no ScaledObject".to_owned(),
        );
        cluster.check_services(&workloads, &mut found);
        cluster.check_budgets(&workloads, &mut found);
        cluster.check_scaled_objects(&workloads, &mut found);
        cluster.check_operator_brokers(&workloads, &mut found);
        problems.extend_from(name, found);
    }
    problems.assert_none();
}

#[tokio::test]
async fn kubernetes_pods_are_locked_down() {
    let dir = workspace_root().join("deploy/kubernetes");
    let mut problems = Problems::default();
    for (name, cluster) in kubernetes_overlays(&dir, &mut Problems::default()) {
        let mut found = Problems::default();
        let workloads = cluster.check_deployments(&mut Problems::default()).await;
        cluster.check_pod_specs(&mut found);
        cluster.check_network_policies(&workloads, &mut found);
        problems.extend_from(&name, found);
    }
    problems.assert_none();
}

#[test]
fn env_references_and_overlay_patches_work_as_kubernetes_and_kustomize_do() {
    let defined = BTreeMap::from([("USER".to_owned(), "u".to_owned())]);
    assert_eq!(
        expand_references("a://$(USER):$(PASS)@h/$$(USER)$", &defined),
        (
            "a://u:$(PASS)@h/$(USER)$".to_owned(),
            vec!["PASS".to_owned()]
        )
    );

    let yaml = |text: &str| serde_norway::from_str::<Value>(text).unwrap();
    let mut doc = yaml("env: [{name: URL, value: x}, {name: B}]");
    let ops = yaml(
        "[{op: test, path: /env/0/name, value: URL},
          {op: replace, path: /env/0, value: {name: URL, value: y}},
          {op: add, path: /env/0, value: {name: USER}},
          {op: add, path: /env/-, value: {name: LAST}},
          {op: remove, path: /env/2}]",
    );
    json_patch(&mut doc, ops.as_sequence().unwrap()).unwrap();
    assert_eq!(
        doc,
        yaml("env: [{name: USER}, {name: URL, value: y}, {name: LAST}]")
    );
    let failing = yaml("[{op: test, path: /env/0/name, value: URL}]");
    assert!(json_patch(&mut doc, failing.as_sequence().unwrap()).is_err());

    let mut config = yaml("data: {A: '1', B: '2'}\nlist: [1]");
    merge_patch(&mut config, &yaml("data: {A: '3', B: null, C: '4'}"), "").unwrap();
    assert_eq!(config, yaml("data: {A: '3', C: '4'}\nlist: [1]"));
    assert!(merge_patch(&mut config, &yaml("list: [2]"), "").is_err());

    assert_eq!(
        service_and_port("kafka-bootstrap.ns.svc:9092"),
        Some(("kafka-bootstrap".to_owned(), 9092))
    );
    assert_eq!(
        management_url("http://u:p@r.ns.svc:15672/").as_deref(),
        Some("r.ns.svc")
    );
    assert_eq!(management_url("http://r.ns.svc:15672/"), None);
}

// ---------------------------------------------------------------- Compose

/// A Compose service's environment (mapping or `KEY=value` list form).
fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(text)
            .filter_map(|item| {
                let (k, v) = item.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect(),
        other => string_map(other),
    }
}

/// The container-side ports of a Compose service: `ports` ("host:container") and
/// `expose`.
fn compose_ports(service: &Value) -> BTreeSet<u16> {
    let published = seq_at(service, &["ports"]).iter().filter_map(|p| {
        let p = text(p)?;
        let container = p.rsplit(':').next()?;
        container.split('/').next()?.parse().ok()
    });
    let exposed = seq_at(service, &["expose"])
        .iter()
        .filter_map(|p| text(p)?.split('/').next()?.parse().ok());
    published.chain(exposed).collect()
}

/// `http://host:port/path` inside a health check command.
fn url_in(words: &[String]) -> Option<(String, u16, String)> {
    let url = words.iter().find_map(|w| w.strip_prefix("http://"))?;
    let (authority, path) = url.split_once('/').unwrap_or((url, ""));
    let (host, port) = port_of_host_port(authority)?;
    Some((host, port, format!("/{path}")))
}

#[tokio::test]
async fn compose_files_match_the_binaries() {
    let root = workspace_root();
    let mut problems = Problems::default();
    let compose = load_yaml(&root.join("docker-compose.yml"))
        .pop()
        .expect("docker-compose.yml has a document");
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has services");
    let service_named = |name: &str| services.get(name);

    // jobgate services: the Dockerfile target names the binary.
    let mut jobgate: BTreeMap<String, Settings> = BTreeMap::new();
    for (name, service) in services {
        let name = text(name).unwrap_or_default();
        let what = format!("docker-compose.yml, service {name}");
        // Bind mounts from the repository must exist (Prometheus, Grafana configs).
        for volume in seq_at(service, &["volumes"]).iter().filter_map(text) {
            if let Some(source) = volume.split(':').next().filter(|s| s.starts_with("./")) {
                problems.check(root.join(source).exists(), || {
                    format!("{what}: mounts {source}, which does not exist")
                });
            }
        }
        let Some(binary) =
            text_at(service, &["build", "target"]).and_then(|t| Binary::from_name(&t))
        else {
            continue;
        };
        let settings = Settings {
            binary,
            env: compose_env(service),
        };
        check_settings(&what, &settings, &mut problems);
        let ports = compose_ports(service);
        match settings.listen_port() {
            Ok(port) => problems.check(ports.contains(&port), || {
                format!(
                    "{what}: {} listens on {port}, not among the service's ports {ports:?}",
                    binary.listen_var()
                )
            }),
            Err(e) => problems.push(format!("{what}: {e}")),
        }
        let check: Vec<String> = seq_at(service, &["healthcheck", "test"])
            .iter()
            .filter_map(text)
            .collect();
        if let Some((_, port, path)) = url_in(&check) {
            problems.check(settings.listen_port() == Ok(port), || {
                format!("{what}: the health check asks port {port}, not the listener")
            });
            problems.check(binary.serves(&path).await, || {
                format!("{what}: the health check asks {path}, which is not served")
            });
        }
        match text_at(service, &["stop_grace_period"]).map(|d| humantime::parse_duration(&d)) {
            Some(Ok(stop)) => problems.check(stop > settings.shutdown_grace(), || {
                format!(
                    "{what}: stop_grace_period {stop:?} is not above the shutdown grace {:?}",
                    settings.shutdown_grace()
                )
            }),
            _ => problems.push(format!("{what}: no valid stop_grace_period")),
        }
        jobgate.insert(name, settings);
    }
    assert_eq!(
        jobgate.values().map(|s| s.binary).collect::<BTreeSet<_>>(),
        BTreeSet::from([Binary::Producer, Binary::Consumer]),
        "docker-compose.yml runs both binaries"
    );

    // Prometheus: every target is a service, on the port that serves the path.
    let prometheus = load_yaml(&root.join("deploy/compose/prometheus.yml"))
        .pop()
        .expect("prometheus.yml has a document");
    let mut scraped = BTreeSet::new();
    for job in seq_at(&prometheus, &["scrape_configs"]) {
        let job_name = text_at(job, &["job_name"]).unwrap_or_default();
        let path = text_at(job, &["metrics_path"]).unwrap_or_else(|| "/metrics".into());
        let mut targets = Vec::new();
        for sd in seq_at(job, &["dns_sd_configs"]) {
            let port: Option<u16> = text_at(sd, &["port"]).and_then(|p| p.parse().ok());
            problems.check(text_at(sd, &["type"]).as_deref() == Some("A"), || {
                format!("prometheus.yml, job {job_name}: Docker's DNS answers type A")
            });
            for name in seq_at(sd, &["names"]).iter().filter_map(text) {
                targets.push((name, port));
            }
        }
        for st in seq_at(job, &["static_configs"]) {
            for target in seq_at(st, &["targets"]).iter().filter_map(text) {
                match port_of_host_port(&target) {
                    Some((host, port)) => targets.push((host, Some(port))),
                    None => problems.push(format!(
                        "prometheus.yml, job {job_name}: target {target} has no port"
                    )),
                }
            }
        }
        problems.check(!targets.is_empty(), || {
            format!("prometheus.yml, job {job_name}: no targets")
        });
        for (host, port) in targets {
            let what = format!("prometheus.yml, job {job_name}, target {host}:{port:?}");
            let Some(service) = service_named(&host) else {
                problems.push(format!("{what}: no Compose service {host}"));
                continue;
            };
            match jobgate.get(&host) {
                Some(settings) => {
                    problems.check(
                        port.is_some() && settings.listen_port().ok() == port,
                        || format!("{what}: {host} listens on {:?}", settings.listen_port()),
                    );
                    problems.check(settings.binary.serves(&path).await, || {
                        format!("{what}: {path} is not served by the {:?}", settings.binary)
                    });
                    scraped.insert(settings.binary);
                }
                None => problems.check(
                    port.is_some_and(|p| compose_ports(service).contains(&p)),
                    || {
                        format!(
                            "{what}: not a port the service exposes ({:?})",
                            compose_ports(service)
                        )
                    },
                ),
            }
        }
    }
    problems.check(scraped.len() == 2, || {
        format!("Prometheus scrapes only {scraped:?}")
    });

    // Grafana: the datasource is the Prometheus service, the dashboard uses it.
    let provisioning = root.join("deploy/compose/grafana/provisioning");
    let mut datasource_uids = BTreeSet::new();
    for path in files_under(&provisioning.join("datasources"), &["yml", "yaml"]) {
        for doc in load_yaml(&path) {
            for ds in seq_at(&doc, &["datasources"]) {
                datasource_uids.extend(text_at(ds, &["uid"]));
                let url = text_at(ds, &["url"]).unwrap_or_default();
                let target = url.strip_prefix("http://").and_then(port_of_host_port);
                problems.check(
                    target.as_ref().is_some_and(|(host, port)| {
                        service_named(host).is_some_and(|s| compose_ports(s).contains(port))
                    }),
                    || {
                        format!(
                            "{}: datasource url {url} is no service port",
                            path.display()
                        )
                    },
                );
            }
        }
    }
    let grafana = service_named("grafana").expect("a grafana service");
    let mounts: Vec<(String, String)> = seq_at(grafana, &["volumes"])
        .iter()
        .filter_map(text)
        .filter_map(|v| {
            let mut parts = v.split(':');
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect();
    let mut exported = Binary::Producer.metric_names().await;
    exported.extend(Binary::Consumer.metric_names().await);
    let mut dashboards = 0;
    for path in files_under(&provisioning.join("dashboards"), &["yml", "yaml"]) {
        for doc in load_yaml(&path) {
            for provider in seq_at(&doc, &["providers"]) {
                let dir = text_at(provider, &["options", "path"]).unwrap_or_default();
                let Some((source, _)) = mounts.iter().find(|(_, target)| *target == dir) else {
                    problems.push(format!(
                        "{}: provider path {dir} is no mount of grafana",
                        path.display()
                    ));
                    continue;
                };
                for json in files_under(&root.join(source.trim_start_matches("./")), &["json"]) {
                    dashboards += 1;
                    let text = std::fs::read_to_string(&json).expect("read dashboard");
                    let dashboard: serde_json::Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", json.display()));
                    let mut uids = BTreeSet::new();
                    collect_datasource_uids(&dashboard, &mut uids);
                    problems.check(!uids.is_empty() && uids.is_subset(&datasource_uids), || {
                        format!(
                            "{}: datasource uids {uids:?}, provisioned {datasource_uids:?}",
                            json.display()
                        )
                    });
                    // Every jobgate_* metric a panel queries is one a binary declares.
                    let mut exprs = Vec::new();
                    collect_exprs(&dashboard, &mut exprs);
                    for name in exprs.iter().flat_map(|e| jobgate_metric_names(e)) {
                        problems.check(exported.contains(&name), || {
                            format!(
                                "{}: queries {name}, which no binary exports",
                                json.display()
                            )
                        });
                    }
                }
            }
        }
    }
    problems.check(dashboards > 0, || {
        "Grafana provisions no dashboard".to_owned()
    });
    problems.assert_none();
}

/// Why `image` is not pinned to one release, if it is not: it needs a tag with a
/// major, minor and patch version (`4.1.4-management`, `v3.5.0`) or a digest. A
/// missing tag is `latest`; `4-management` follows every 4.x release.
fn unpinned_image(image: &str) -> Option<String> {
    if image.contains("@sha256:") {
        return None;
    }
    if image.contains("${") {
        return Some("the image comes from a variable".into());
    }
    // A ':' after the last '/' starts the tag (before it: a registry's port).
    let last_part = image.rsplit('/').next().unwrap_or(image);
    let Some((_, tag)) = last_part.split_once(':') else {
        return Some("no tag, so `latest`".into());
    };
    let version = tag.strip_prefix('v').unwrap_or(tag);
    let version = version.split('-').next().unwrap_or_default();
    let parts: Vec<&str> = version.split('.').collect();
    let pinned = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (!pinned).then(|| format!("tag {tag} is not an exact major.minor.patch version"))
}

/// Why a Compose `ports` entry is reachable from beyond this machine, if it is: its
/// host address must be loopback (`127.0.0.1:8080:8080`, `[::1]:8080:8080`, or
/// `host_ip: 127.0.0.1` in the long form). Without one Docker binds every interface.
fn published_beyond_loopback(port: &Value) -> Option<String> {
    let host_ip = match port {
        Value::Mapping(_) => text_at(port, &["host_ip"]),
        other => {
            let spec = text(other)?;
            let spec = spec.split('/').next().unwrap_or_default();
            if let Some(rest) = spec.strip_prefix('[') {
                rest.split_once(']').map(|(ip, _)| ip.to_owned())
            } else {
                let parts: Vec<&str> = spec.split(':').collect();
                (parts.len() == 3).then(|| parts[0].to_owned())
            }
        }
    };
    match host_ip.as_deref() {
        Some(ip)
            if ip
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()) =>
        {
            None
        }
        Some(ip) => Some(format!("published on {ip}, not loopback")),
        None => Some("published on every interface (no 127.0.0.1:)".into()),
    }
}

/// Why Grafana's admin account is weak, if it is. Grafana creates `admin`/`admin` on
/// its first start unless told a password or told not to create the account.
fn weak_grafana_admin(env: &BTreeMap<String, String>) -> Option<String> {
    let var = |name: &str| env.get(name).map(String::as_str);
    if var("GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION") == Some("true") {
        return None;
    }
    if var("GF_SECURITY_ADMIN_PASSWORD__FILE").is_some() {
        return None;
    }
    match var("GF_SECURITY_ADMIN_PASSWORD") {
        None => Some("no admin password: Grafana's default admin/admin".into()),
        Some(value) if required_variable(value) => None,
        Some(value) if value.contains("${") => Some(format!(
            "admin password {value} has a default or is not required"
        )),
        Some(_) => Some("the admin password is written in docker-compose.yml".into()),
    }
}

/// Whether `value` is exactly `${NAME:?message}` or `${NAME?message}`: a variable
/// Compose refuses to start without (and no default).
fn required_variable(value: &str) -> bool {
    let Some(inner) = value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) else {
        return false;
    };
    let name_end = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let operator = &inner[name_end..];
    name_end > 0 && (operator.starts_with(":?") || operator.starts_with('?'))
}

#[test]
fn image_pins_ports_and_grafana_admins_are_told_apart() {
    for pinned in [
        "rabbitmq:4.1.4-management",
        "prom/prometheus:v3.5.0",
        "ghcr.io/kafbat/kafka-ui:v1.3.0",
        "registry:5000/team/app:1.2.3",
        "nginx@sha256:0123abcd",
    ] {
        assert_eq!(unpinned_image(pinned), None, "{pinned}");
    }
    for floating in [
        "rabbitmq:4-management",
        "ghcr.io/kafbat/kafka-ui:latest",
        "grafana/grafana",
        "registry:5000/team/app",
        "apache/kafka:4.1",
        "app:1.2.x",
        "${IMAGE:-app:1.2.3}",
    ] {
        assert!(unpinned_image(floating).is_some(), "{floating}");
    }

    let port = |yaml: &str| serde_norway::from_str::<Value>(yaml).unwrap();
    for local in [
        "127.0.0.1:8080:8080",
        "127.0.0.1:5672:5672/tcp",
        "\"[::1]:80:8080\"",
        "{target: 80, published: 8080, host_ip: 127.0.0.1}",
    ] {
        assert_eq!(published_beyond_loopback(&port(local)), None, "{local}");
    }
    for open in [
        "8080:8080",
        "\"8080\"",
        "0.0.0.0:8080:8080",
        "{target: 80, published: 8080}",
    ] {
        assert!(published_beyond_loopback(&port(open)).is_some(), "{open}");
    }

    let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    for safe in [
        env(&[("GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION", "true")]),
        env(&[(
            "GF_SECURITY_ADMIN_PASSWORD",
            "${GRAFANA_PASSWORD:?set-it in .env}",
        )]),
        env(&[("GF_SECURITY_ADMIN_PASSWORD__FILE", "/run/secrets/grafana")]),
    ] {
        assert_eq!(weak_grafana_admin(&safe), None, "{safe:?}");
    }
    for weak in [
        env(&[]),
        env(&[("GF_SECURITY_ADMIN_PASSWORD", "admin")]),
        env(&[("GF_SECURITY_ADMIN_PASSWORD", "${GRAFANA_PASSWORD:-admin}")]),
        env(&[("GF_SECURITY_ADMIN_PASSWORD", "${GRAFANA_PASSWORD}")]),
        env(&[("GF_SECURITY_ADMIN_PASSWORD", "${GRAFANA_PASSWORD-x?}")]),
        env(&[("GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION", "false")]),
    ] {
        assert!(weak_grafana_admin(&weak).is_some(), "{weak:?}");
    }
}

/// The Compose set-up is for one machine: nothing it publishes is reachable from
/// elsewhere, every image is one known release, and the UIs that come with it cannot
/// be used to change things with a well-known password (Grafana) or none (Kafka UI).
#[test]
fn compose_defaults_are_safe() {
    let root = workspace_root();
    let mut problems = Problems::default();
    let compose = load_yaml(&root.join("docker-compose.yml"))
        .pop()
        .expect("docker-compose.yml has a document");
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has services");
    let (mut kafka_uis, mut grafanas) = (0, 0);
    for (name, service) in services {
        let name = text(name).unwrap_or_default();
        let what = format!("docker-compose.yml, service {name}");
        match text_at(service, &["image"]) {
            Some(image) => {
                if let Some(why) = unpinned_image(&image) {
                    problems.push(format!("{what}: image {image}: {why}"));
                }
            }
            None => problems.check(service.get("build").is_some(), || {
                format!("{what}: neither image nor build")
            }),
        }
        for port in seq_at(service, &["ports"]) {
            if let Some(why) = published_beyond_loopback(port) {
                let shown = text(port).unwrap_or_else(|| format!("{port:?}"));
                problems.push(format!("{what}: port {shown} {why}"));
            }
        }
        problems.check(
            text_at(service, &["network_mode"]).as_deref() != Some("host"),
            || format!("{what}: network_mode host publishes every port on every interface"),
        );
        let image = text_at(service, &["image"]).unwrap_or_default();
        let env = compose_env(service);
        if image.contains("kafka-ui") {
            kafka_uis += 1;
            // Every configured cluster (KAFKA_CLUSTERS_<n>_NAME) is read-only, and the UI
            // cannot add clusters of its own (dynamic config).
            for var in env.keys().filter(|v| v.starts_with("KAFKA_CLUSTERS_")) {
                if let Some(cluster) = var.strip_suffix("_NAME") {
                    let readonly = format!("{cluster}_READONLY");
                    problems.check(env.get(&readonly).map(String::as_str) == Some("true"), || {
                        format!("{what}: {readonly} is not \"true\": Kafka UI can delete topics and write messages")
                    });
                }
            }
            problems.check(
                env.get("DYNAMIC_CONFIG_ENABLED").map(String::as_str) != Some("true"),
                || format!("{what}: DYNAMIC_CONFIG_ENABLED lets UI users add writable clusters"),
            );
        }
        if image.starts_with("grafana/") {
            grafanas += 1;
            if let Some(why) = weak_grafana_admin(&env) {
                problems.push(format!("{what}: {why}"));
            }
            if env.get("GF_AUTH_ANONYMOUS_ENABLED").map(String::as_str) == Some("true") {
                let role = env.get("GF_AUTH_ANONYMOUS_ORG_ROLE").map(String::as_str);
                problems.check(matches!(role, None | Some("Viewer")), || {
                    format!("{what}: anonymous visitors get the role {role:?}, not Viewer")
                });
            }
        }
    }
    problems.check(kafka_uis == 1 && grafanas == 1, || {
        format!("expected one Kafka UI and one Grafana, found {kafka_uis} and {grafanas}")
    });
    problems.assert_none();
}

/// Every `datasource.uid` in a Grafana dashboard (panels and their queries).
fn collect_datasource_uids(value: &serde_json::Value, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(uid) = map
                .get("datasource")
                .and_then(|ds| ds.get("uid"))
                .and_then(serde_json::Value::as_str)
            {
                out.insert(uid.to_owned());
            }
            map.values().for_each(|v| collect_datasource_uids(v, out));
        }
        serde_json::Value::Array(items) => {
            items.iter().for_each(|v| collect_datasource_uids(v, out))
        }
        _ => {}
    }
}

/// Every PromQL expression (`expr`) in a Grafana dashboard.
fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(expr) = map.get("expr").and_then(serde_json::Value::as_str) {
                out.push(expr.to_owned());
            }
            map.values().for_each(|v| collect_exprs(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `jobgate_*` metric names in a PromQL expression.
fn jobgate_metric_names(expr: &str) -> Vec<String> {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("jobgate_") {
        // Only at a word start: not inside another identifier or a label value.
        let preceded = rest[..start].chars().next_back().is_some_and(is_name_char);
        let tail = &rest[start..];
        let end = tail.find(|c| !is_name_char(c)).unwrap_or(tail.len());
        if !preceded {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}
