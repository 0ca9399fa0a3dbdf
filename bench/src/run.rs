//! The phases of a run, in order, for each backend; then the report.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::kafka::{self, Kafka};
use crate::load::{closed_loop, open_loop, Budget, Op};
use crate::procs::{free_port, wait_ready, Binaries};
use crate::rabbit::{self, Rabbit};
use crate::report::{
    render_markdown, BackendResults, Drain, KnobRun, Machine, Phase, Ratios, Report, Settings,
    SlowSplit,
};
use crate::stats::above_bucket;
use crate::Args;

mod big_batches;
mod cluster;
pub use cluster::stop_clusters;
mod downstream;
mod go_baseline;
mod profile;
mod scheduled;
mod soak;

/// The job body every phase sends: a small JSON document, as a typical job.
const BODY: &str = r#"{"task":"send-welcome-email","to":"someone@example.com","template":"welcome-v2","locale":"en","attempt_hint":1}"#;

/// When a drain's consumers start: before the backlog is there (warm: the time leaves
/// out their start-up and, on Kafka, the group's rebalances) or after (cold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Cold,
    Warm,
}

/// When a drain's clock starts and stops.
#[derive(Clone, Copy)]
struct Timing<'a> {
    start: Start,
    done: Done<'a>,
}

impl Timing<'_> {
    /// Consumers started on a full backlog, until the broker has nothing waiting.
    const COLD: Self = Timing {
        start: Start::Cold,
        done: Done::Backlog,
    };
}

/// When a drain is done.
#[derive(Clone, Copy)]
enum Done<'a> {
    /// The broker has nothing waiting (RabbitMQ: no ready message; Kafka: no lag of
    /// the group's committed offsets).
    Backlog,
    /// The slow downstream answered every job once (see `downstream`).
    Answered(&'a downstream::SlowDownstream),
}

/// The consumers get one retry tier of this length (the fewest queues to create).
const RETRY_TIER: Duration = Duration::from_secs(1);

/// The raw publisher as jobgate configures it, or with one setting changed.
#[derive(Debug, Clone, Copy)]
enum RawVariant {
    AsJobgate,
    /// RabbitMQ confirm channels.
    Channels(u16),
    /// Kafka `linger.ms`.
    LingerMs(u32),
}

impl RawVariant {
    fn label(self) -> String {
        match self {
            Self::AsJobgate => "default".into(),
            Self::Channels(n) => format!("channels-{n}"),
            Self::LingerMs(ms) => format!("linger-{ms}"),
        }
    }
}

/// A backlog must be drained within this long, or the run fails.
const DRAIN_LIMIT: Duration = Duration::from_secs(180);

/// How long a stopped binary may take to exit.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Queues, topics and groups created so far, deleted at the end whatever happened.
#[derive(Default)]
pub struct Leftovers {
    rabbit: Mutex<Vec<String>>,
    kafka_topics: Mutex<Vec<String>>,
    kafka_groups: Mutex<Vec<String>>,
}

fn push(list: &Mutex<Vec<String>>, items: impl IntoIterator<Item = String>) {
    list.lock().unwrap_or_else(|e| e.into_inner()).extend(items);
}

fn forget(list: &Mutex<Vec<String>>, done: &[String]) {
    list.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|name| !done.contains(name));
}

fn take(list: &Mutex<Vec<String>>) -> Vec<String> {
    std::mem::take(&mut *list.lock().unwrap_or_else(|e| e.into_inner()))
}

impl Leftovers {
    /// Deletes everything recorded; failures are reported, not fatal.
    pub async fn clean(&self, args: &Args) {
        let queues = take(&self.rabbit);
        if !queues.is_empty() {
            match Rabbit::connect(&args.amqp_url).await {
                Ok(r) => {
                    if let Err(e) = r.delete(&queues).await {
                        eprintln!("bench: warning: deleting RabbitMQ queues: {e:#}");
                    }
                    r.close().await;
                }
                Err(e) => eprintln!("bench: warning: cannot delete queues {queues:?}: {e:#}"),
            }
        }
        let topics = take(&self.kafka_topics);
        let groups = take(&self.kafka_groups);
        if !topics.is_empty() || !groups.is_empty() {
            let deleted = match Kafka::new(&args.kafka_brokers, args.kafka_partitions) {
                Ok(k) => k.delete(&topics, &groups).await,
                Err(e) => Err(e),
            };
            if let Err(e) = deleted {
                eprintln!("bench: warning: cannot delete topics {topics:?}: {e:#}");
            }
        }
    }
}

/// A connected backend: the raw client side of the bench.
enum Broker {
    // Boxed: both sides are large (a lapin connection; the Kafka admin client and
    // topic spec), and only one is held.
    Rabbit(Box<Rabbit>),
    Kafka(Box<Kafka>),
}

/// The context of one backend's phases.
struct Bench<'a> {
    args: &'a Args,
    bins: Binaries,
    http: reqwest::Client,
    run_id: String,
    backend: &'static str,
    broker: Broker,
    leftovers: &'a Leftovers,
    warmup: Duration,
    duration: Duration,
    knob_duration: Duration,
    /// Backlog of the consume and drain phases.
    jobs: u64,
}

/// [`show`], and the slowest 100 ms of an open loop.
fn show_open(p: &Phase) -> String {
    let slowest = p.slowest.map_or_else(String::new, |w| {
        format!(
            "; slowest 100 ms: due at {:.1} s, up to {:.1} ms",
            w.at_s, w.max_ms
        )
    });
    let detail = p.open_loop.map_or_else(String::new, |d| {
        format!(
            "; sent late p99 {:.2} ms, from send p99 {:.2} ms, machine busy {}",
            d.send_lag_p99_ms,
            d.from_send.p99_ms,
            d.machine_busy_shown()
        )
    });
    format!("{}{slowest}{detail}", show(p))
}

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

fn show(p: &Phase) -> String {
    let mut s = format!("{:.0}/s ({} ok, {} failed", p.per_sec, p.ok, p.failed);
    if let Some(l) = p.latency {
        s += &format!(", p50 {:.2} ms, p99 {:.2} ms", l.p50_ms, l.p99_ms);
    }
    if let Some(e) = &p.first_error {
        s += &format!(", first failure: {e}");
    }
    s + ")"
}

/// Publishes once, retrying for up to 10 s, before a phase is timed: a fresh Kafka
/// topic answers its first records only once its partition leaders are known (up to a
/// second here), which would otherwise eat into a short warm-up.
async fn prime(op: &Op) -> Result<()> {
    let mut last = String::new();
    for _ in 0..40 {
        match op().await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("the first publish did not succeed within 10 s: {last}")
}

/// Runs the load `run` with `op`, and gives its phase the producer's CPU time per
/// request: the process's CPU time before and after, over every request `op` sent
/// (the warm-up's too, whose CPU is in the difference).
async fn with_cpu<F>(
    producer: &crate::procs::Running,
    op: Op,
    run: impl FnOnce(Op) -> F,
) -> Result<Phase>
where
    F: std::future::Future<Output = Phase>,
{
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted: Op = {
        let sent = Arc::clone(&sent);
        Arc::new(move || {
            sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            op()
        })
    };
    let before = producer.cpu_seconds()?;
    let mut phase = run(counted).await;
    let cpu = producer.cpu_seconds()? - before;
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    phase.cpu_us_per_request = (sent > 0).then(|| cpu * 1e6 / sent as f64);
    Ok(phase)
}

/// A phase that should have failed nothing: any failure stops the run.
fn require_clean(what: &str, p: &Phase) -> Result<()> {
    if p.ok == 0 || p.failed > 0 {
        bail!("{what}: {}", show(p));
    }
    Ok(())
}

impl Bench<'_> {
    fn queue(&self, phase: &str) -> String {
        format!("bench-{}-{}-{phase}", self.run_id, self.backend)
    }

    /// Waits until `consumers` processes consume `queue`: RabbitMQ counts them on the
    /// queue; on Kafka their group must be stable with every partition owned.
    async fn wait_settled(
        &self,
        queue: &str,
        consumers: usize,
        procs: &mut [crate::procs::Running],
    ) -> Result<()> {
        let begun = Instant::now();
        loop {
            for p in procs.iter_mut() {
                p.check_alive()?;
            }
            let settled = match &self.broker {
                Broker::Rabbit(r) => r.consumers(queue).await? >= consumers as u64,
                Broker::Kafka(k) => k.group_settled(&Self::group(queue), consumers)?,
            };
            if settled {
                return Ok(());
            }
            if begun.elapsed() > DRAIN_LIMIT {
                bail!("{consumers} consumer(s) did not settle on {queue} within {DRAIN_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn group(queue: &str) -> String {
        format!("{queue}.group")
    }

    /// Creates the queue or topic and records it (and what jobgate adds) for deletion.
    async fn create(&self, queue: &str) -> Result<()> {
        match &self.broker {
            Broker::Rabbit(r) => {
                push(
                    &self.leftovers.rabbit,
                    rabbit::all_queues(queue, RETRY_TIER),
                );
                r.declare(queue).await
            }
            Broker::Kafka(k) => {
                push(
                    &self.leftovers.kafka_topics,
                    kafka::all_topics(queue, RETRY_TIER),
                );
                let g = Self::group(queue);
                push(&self.leftovers.kafka_groups, [format!("{g}.retry"), g]);
                k.create(queue).await
            }
        }
    }

    /// Deletes what `create` (and jobgate) made for `queue`, now rather than at the
    /// end, so the broker does not carry old backlogs into later phases.
    async fn drop_queue(&self, queue: &str) -> Result<()> {
        match &self.broker {
            Broker::Rabbit(r) => {
                let queues = rabbit::all_queues(queue, RETRY_TIER);
                r.delete(&queues).await?;
                forget(&self.leftovers.rabbit, &queues);
            }
            Broker::Kafka(k) => {
                let g = Self::group(queue);
                let topics = kafka::all_topics(queue, RETRY_TIER);
                let groups = [format!("{g}.retry"), g];
                k.delete(&topics, &groups).await?;
                forget(&self.leftovers.kafka_topics, &topics);
                forget(&self.leftovers.kafka_groups, &groups);
            }
        }
        Ok(())
    }

    async fn raw_op(&self, queue: &str, variant: RawVariant) -> Result<Op> {
        match &self.broker {
            Broker::Rabbit(r) => {
                let channels = match variant {
                    RawVariant::Channels(n) => n,
                    _ => self.args.publish_channels,
                };
                r.raw_publish_op(queue, usize::from(channels), BODY).await
            }
            Broker::Kafka(k) => {
                let linger = match variant {
                    RawVariant::LingerMs(ms) => ms,
                    _ => jobgate_shared::config::DEFAULT_KAFKA_LINGER_MS,
                };
                k.raw_publish_op(queue, linger, BODY)
            }
        }
    }

    fn timed(&self, measure: Duration) -> Budget {
        Budget::Time {
            warmup: self.warmup,
            measure,
        }
    }

    /// Raw publishes with `in_flight` in flight for `measure`.
    async fn raw_publish(
        &self,
        in_flight: usize,
        measure: Duration,
        variant: RawVariant,
    ) -> Result<Phase> {
        let q = self.queue(&format!("raw-publish-{in_flight}-{}", variant.label()));
        self.create(&q).await?;
        let op = self.raw_op(&q, variant).await?;
        prime(&op).await?;
        let phase = closed_loop(in_flight, self.timed(measure), op).await;
        self.drop_queue(&q).await?;
        Ok(phase)
    }

    /// Raw publishes started at `rate` a second, as the ingress's open loop: the
    /// broker's own tail at that rate, beside the ingress's.
    async fn raw_open(&self, rate: f64) -> Result<Phase> {
        let q = self.queue("raw-open");
        self.create(&q).await?;
        let op = self.raw_op(&q, RawVariant::AsJobgate).await?;
        prime(&op).await?;
        let phase = open_loop(rate, self.duration, 20_000, op).await;
        self.drop_queue(&q).await?;
        Ok(phase)
    }

    async fn library_publish(&self) -> Result<Phase> {
        let q = self.queue("library-publish");
        self.create(&q).await?;
        let in_flight = self.args.in_flight as usize;
        let phase = match &self.broker {
            Broker::Rabbit(r) => {
                let (op, publisher) = r
                    .library_publish_op(&q, usize::from(self.args.publish_channels), BODY)
                    .await?;
                prime(&op).await?;
                let phase = closed_loop(in_flight, self.timed(self.duration), op).await;
                jobgate_shared::broker::Publisher::close(&*publisher).await;
                phase
            }
            Broker::Kafka(k) => {
                let (op, publisher) = k.library_publish_op(&q, BODY).await?;
                prime(&op).await?;
                let phase = closed_loop(in_flight, self.timed(self.duration), op).await;
                jobgate_shared::broker::Publisher::close(&*publisher).await;
                phase
            }
        };
        self.drop_queue(&q).await?;
        Ok(phase)
    }

    fn broker_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("JOBGATE_BACKEND", self.backend.to_owned()),
            ("JOBGATE_AMQP_URL", self.args.amqp_url.clone()),
            ("JOBGATE_KAFKA_BROKERS", self.args.kafka_brokers.clone()),
            (
                "JOBGATE_KAFKA_PARTITIONS",
                self.args.kafka_partitions.to_string(),
            ),
        ]
    }

    /// Starts a `producer` for `queue` with `overrides` on top of the bench's settings.
    async fn start_producer(
        &self,
        queue: &str,
        label: &str,
        overrides: &[(&'static str, String)],
    ) -> Result<(crate::procs::Running, String)> {
        let port = free_port()?;
        let mut env = self.broker_env();
        env.extend([
            ("JOBGATE_LISTEN", format!("127.0.0.1:{port}")),
            ("JOBGATE_QUEUES", queue.to_owned()),
            (
                "JOBGATE_PUBLISH_CHANNELS",
                self.args.publish_channels.to_string(),
            ),
            ("JOBGATE_MAX_IN_FLIGHT", self.args.max_in_flight.to_string()),
        ]);
        env.extend(overrides.iter().cloned());
        let mut producer = self.bins.spawn(
            "producer",
            &format!("{}-producer-{label}", self.backend),
            &env,
        )?;
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&self.http, &base, &mut producer).await?;
        Ok((producer, base))
    }

    fn post_op(&self, base: &str) -> Op {
        let http = self.http.clone();
        let url = format!("{base}/jobs");
        Arc::new(move || {
            let http = http.clone();
            let url = url.clone();
            Box::pin(async move {
                let answer = http
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(BODY)
                    .send()
                    .await
                    .map_err(|e| format!("POST /jobs: {e}"))?;
                let status = answer.status();
                let text = answer.text().await.unwrap_or_default();
                if status == reqwest::StatusCode::ACCEPTED {
                    Ok(())
                } else {
                    Err(format!(
                        "HTTP {status}: {}",
                        text.chars().take(200).collect::<String>()
                    ))
                }
            })
        })
    }

    /// Closed-loop HTTP load on a fresh producer; its peak RSS too.
    async fn ingress_closed(
        &self,
        label: &str,
        clients: usize,
        measure: Duration,
        overrides: &[(&'static str, String)],
    ) -> Result<(Phase, u64)> {
        let q = self.queue(&format!("ingress-{label}"));
        self.create(&q).await?;
        let (producer, base) = self.start_producer(&q, label, overrides).await?;
        let budget = self.timed(measure);
        let phase = with_cpu(&producer, self.post_op(&base), |op| {
            closed_loop(clients, budget, op)
        })
        .await?;
        let rss = self.stop_serving(producer, &q).await?;
        Ok((phase, rss))
    }

    /// After an HTTP phase: checks that the service under load (a producer or the Go
    /// baseline) is still up, reads its peak RSS (KiB), stops it and drops its queue.
    async fn stop_serving(&self, mut service: crate::procs::Running, queue: &str) -> Result<u64> {
        service.check_alive()?;
        let rss = service.peak_rss_kib()?;
        service.stop(STOP_GRACE).await?;
        self.drop_queue(queue).await?;
        Ok(rss)
    }

    /// The main ingress figures: closed loop, then open loop at half its rate, on one
    /// producer; returns both and the producer's peak RSS over both.
    async fn ingress(&self) -> Result<(Phase, Phase, u64)> {
        let q = self.queue("ingress");
        self.create(&q).await?;
        let (producer, base) = self.start_producer(&q, "main", &[]).await?;
        let clients = self.args.in_flight as usize;
        let budget = self.timed(self.duration);
        let closed = with_cpu(&producer, self.post_op(&base), |op| {
            closed_loop(clients, budget, op)
        })
        .await?;
        say(format!(
            "  ingress closed loop, {clients} clients: {}",
            show(&closed)
        ));
        require_clean("ingress closed loop", &closed)?;
        let rate = closed.per_sec / 2.0;
        let duration = self.duration;
        let before = self.slow_counts(&base).await;
        let mut open = with_cpu(&producer, self.post_op(&base), |op| {
            open_loop(rate, duration, 20_000, op)
        })
        .await?;
        if let (Some(before), Some(after)) = (before, self.slow_counts(&base).await) {
            open.slow_split = Some(SlowSplit {
                over_ms: crate::stats::SLOW.as_secs_f64() * 1000.0,
                requests: after.0.saturating_sub(before.0),
                publishes: after.1.saturating_sub(before.1),
            });
        }
        say(format!(
            "  ingress open loop at {rate:.0}/s: {}",
            show_open(&open)
        ));
        let rss = self.stop_serving(producer, &q).await?;
        Ok((closed, open, rss))
    }

    /// From the producer's `/metrics`: requests to `/jobs` and confirmed publishes that
    /// took longer than [`crate::stats::SLOW`] (a bucket bound of
    /// `jobgate_shared::metrics::latency_histogram`) so far (`None` when it cannot be read).
    async fn slow_counts(&self, base: &str) -> Option<(u64, u64)> {
        let answer = self.http.get(format!("{base}/metrics")).send().await.ok()?;
        let text = answer.text().await.ok()?;
        let le = crate::stats::SLOW.as_secs_f64().to_string();
        let requests = above_bucket(
            &text,
            "jobgate_http_request_duration_seconds",
            "route=\"/jobs\"",
            &le,
        )?;
        let publishes = above_bucket(
            &text,
            "jobgate_publish_duration_seconds",
            "result=\"confirmed\"",
            &le,
        )?;
        Some((requests, publishes))
    }

    /// Publishes `jobs` jobs into `queue` (created here) as fast as the raw client can.
    async fn fill(&self, queue: &str, jobs: u64) -> Result<()> {
        let filler = self.filler(queue).await?;
        self.fill_rest(queue, filler, jobs).await
    }

    /// A publisher for the backlog of `queue` (created first), connected: it has
    /// published the backlog's first job. Its start-up (a Kafka client's bootstrap,
    /// metadata and producer id took 0.6 s, on a fresh topic with a retry or two) is
    /// the bench's, so a drain's clock starts after it.
    async fn filler(&self, queue: &str) -> Result<Op> {
        self.create(queue).await?;
        // Filling is not measured: on Kafka, without linger it is several times faster.
        let variant = match self.broker {
            Broker::Kafka(_) => RawVariant::LingerMs(0),
            Broker::Rabbit(_) => RawVariant::AsJobgate,
        };
        let op = self.raw_op(queue, variant).await?;
        prime(&op).await?;
        Ok(op)
    }

    /// The rest of a backlog of `jobs` after the [`Self::filler`]'s first.
    async fn fill_rest(&self, queue: &str, filler: Op, jobs: u64) -> Result<()> {
        let rest = Budget::Count(jobs - 1);
        let phase = closed_loop(self.args.in_flight as usize, rest, filler).await;
        if jobs > 1 {
            require_clean(&format!("filling {queue}"), &phase)?;
        }
        say(format!("  filled {queue}: {}", show(&phase)));
        Ok(())
    }

    async fn raw_consume(&self, prefetch: u16) -> Result<Phase> {
        let q = self.queue(&format!("raw-consume-{prefetch}"));
        self.fill(&q, self.jobs).await?;
        let phase = match &self.broker {
            Broker::Rabbit(r) => r.raw_consume(&q, prefetch, self.jobs).await?,
            Broker::Kafka(k) => k.raw_consume(&q, &Self::group(&q), self.jobs).await?,
        };
        self.drop_queue(&q).await?;
        Ok(phase)
    }

    /// Jobs of the backlog not yet done, as the broker sees it.
    async fn backlog(&self, queue: &str, probe: Option<&kafka::LagProbe>) -> Result<u64> {
        match (&self.broker, probe) {
            (Broker::Rabbit(r), _) => r.ready(queue).await,
            (Broker::Kafka(_), Some(p)) => p.lag().await,
            (Broker::Kafka(_), None) => bail!("no lag probe"),
        }
    }

    /// Fills a backlog, starts `consumers` processes and times them until it is gone.
    async fn drain(&self, consumers: usize, concurrency: u16) -> Result<Drain> {
        self.drain_with(consumers, concurrency, self.jobs, "", &[], Timing::COLD)
            .await
    }

    /// [`Self::drain`] of `jobs` jobs with extra consumer settings (`extra` overrides the
    /// defaults; `label`, a few lower-case letters and digits, names the variant).
    async fn drain_with(
        &self,
        consumers: usize,
        concurrency: u16,
        jobs: u64,
        label: &str,
        extra: &[(&'static str, String)],
        timing: Timing<'_>,
    ) -> Result<Drain> {
        let Timing {
            start: start_as,
            done,
        } = timing;
        let label = if label.is_empty() {
            String::new()
        } else {
            format!("-{label}")
        };
        let q = self.queue(&format!("drain-{consumers}x{concurrency}{label}"));
        match start_as {
            Start::Cold => self.fill(&q, jobs).await?,
            Start::Warm => self.create(&q).await?,
        }
        let probe = match &self.broker {
            Broker::Kafka(k) => Some(k.lag_probe(&q, &Self::group(&q))?),
            Broker::Rabbit(_) => None,
        };
        let mut env = self.broker_env();
        env.extend([
            ("JOBGATE_QUEUE", q.clone()),
            ("JOBGATE_CONCURRENCY", concurrency.to_string()),
            ("JOBGATE_HANDLER", "log".to_owned()),
            ("JOBGATE_RETRY_BASE_MS", RETRY_TIER.as_millis().to_string()),
            ("JOBGATE_RETRY_MAX_MS", RETRY_TIER.as_millis().to_string()),
            ("JOBGATE_KAFKA_GROUP", "{queue}.group".to_owned()),
            ("JOBGATE_SHUTDOWN_GRACE_MS", "5000".to_owned()),
        ]);
        env.extend(extra.iter().cloned());
        let mut start = Instant::now();
        let mut procs = Vec::new();
        for i in 0..consumers {
            let name = format!(
                "{}-consumer-{consumers}x{concurrency}{label}-{i}",
                self.backend
            );
            procs.push(self.bins.spawn("consumer", &name, &env)?);
        }
        let mut settled_s = None;
        if start_as == Start::Warm {
            self.wait_settled(&q, consumers, &mut procs).await?;
            settled_s = Some(start.elapsed().as_secs_f64());
            let filler = self.filler(&q).await?;
            // From the first job on: the time the processes take is measured, not the
            // time the bench's publisher takes to connect.
            start = Instant::now();
            self.fill_rest(&q, filler, jobs).await?;
        }
        let poll = match self.broker {
            Broker::Rabbit(_) => Duration::from_millis(20),
            Broker::Kafka(_) => kafka::PROBE_INTERVAL,
        };
        let elapsed = loop {
            for p in &mut procs {
                p.check_alive()?;
            }
            match done {
                Done::Backlog => {
                    if self.backlog(&q, probe.as_ref()).await? == 0 {
                        break start.elapsed();
                    }
                }
                Done::Answered(downstream) => {
                    if let (n, Some(last)) = downstream.answered(&q) {
                        if n >= jobs {
                            break last.saturating_duration_since(start);
                        }
                    }
                }
            }
            if start.elapsed() > DRAIN_LIMIT {
                bail!("{consumers} consumer(s) did not drain {q} within {DRAIN_LIMIT:?}");
            }
            tokio::time::sleep(poll).await;
        };
        let mut peak = 0;
        let mut cpu = 0.0;
        for p in &procs {
            peak = peak.max(p.peak_rss_kib()?);
            cpu += p.cpu_seconds()?;
        }
        for p in procs {
            p.stop(STOP_GRACE).await?;
        }
        self.drop_queue(&q).await?;
        Ok(Drain {
            consumers,
            concurrency,
            phase: Phase {
                ok: jobs,
                seconds: elapsed.as_secs_f64(),
                per_sec: crate::stats::per_second(jobs, elapsed),
                ..Phase::default()
            },
            peak_rss_kib: peak,
            settled_s,
            cpu_us_per_job: cpu * 1e6 / jobs.max(1) as f64,
        })
    }

    /// Each knob changed alone. The machine's load drifts over a run (other work, the
    /// broker's own housekeeping), so the publish-side baselines are measured again
    /// here, with the knob phases' duration, right before the variants.
    async fn knobs(&self, raw_consume: &Phase, drain_1: Option<&Drain>) -> Result<Vec<KnobRun>> {
        let mut runs = Vec::new();
        let c = self.args.in_flight as usize;
        let k = self.knob_duration;
        let raw_publish = &self.raw_publish(c, k, RawVariant::AsJobgate).await?;
        let (ingress, _) = &self.ingress_closed("baseline", c, k, &[]).await?;
        say(format!(
            "  baselines again: raw publish {}, ingress {}",
            show(raw_publish),
            show(ingress)
        ));
        let knob = |knob: &str, value: String, measured: &str, phase: Phase, baseline: f64| {
            say(format!(
                "  knob {knob}={value}, {measured}: {}",
                show(&phase)
            ));
            KnobRun {
                knob: knob.into(),
                value,
                measured: measured.into(),
                phase,
                baseline_per_sec: baseline,
            }
        };
        if matches!(self.broker, Broker::Kafka(_)) {
            let default = jobgate_shared::config::DEFAULT_KAFKA_LINGER_MS;
            for linger in [0u32, 2, 10].into_iter().filter(|&ms| ms != default) {
                let p = self.raw_publish(c, k, RawVariant::LingerMs(linger)).await?;
                runs.push(knob(
                    "linger.ms (raw producer)",
                    linger.to_string(),
                    "raw publish",
                    p,
                    raw_publish.per_sec,
                ));
                let env = [("JOBGATE_KAFKA_LINGER_MS", linger.to_string())];
                let (p, _) = self
                    .ingress_closed(&format!("linger-{linger}"), c, k, &env)
                    .await?;
                runs.push(knob(
                    "JOBGATE_KAFKA_LINGER_MS",
                    linger.to_string(),
                    "ingress closed loop",
                    p,
                    ingress.per_sec,
                ));
            }
        }
        if matches!(self.broker, Broker::Rabbit(_)) {
            let default = self.args.publish_channels;
            for channels in [1u16, 4, 8].into_iter().filter(|&n| n != default) {
                let p = self
                    .raw_publish(c, k, RawVariant::Channels(channels))
                    .await?;
                runs.push(knob(
                    "confirm channels (raw publisher)",
                    channels.to_string(),
                    "raw publish",
                    p,
                    raw_publish.per_sec,
                ));
                let env = [("JOBGATE_PUBLISH_CHANNELS", channels.to_string())];
                let (p, _) = self
                    .ingress_closed(&format!("channels-{channels}"), c, k, &env)
                    .await?;
                runs.push(knob(
                    "JOBGATE_PUBLISH_CHANNELS",
                    channels.to_string(),
                    "ingress closed loop",
                    p,
                    ingress.per_sec,
                ));
            }
        }
        // Below the client count: the producer sheds load with 503 instead of queueing.
        let limit = (c / 2).max(1);
        let env = [("JOBGATE_MAX_IN_FLIGHT", limit.to_string())];
        let (p, _) = self.ingress_closed("max-in-flight", c, k, &env).await?;
        runs.push(knob(
            "JOBGATE_MAX_IN_FLIGHT",
            limit.to_string(),
            "ingress closed loop",
            p,
            ingress.per_sec,
        ));
        // How the ceiling and the ingress follow the number of messages in flight.
        for n in [c / 4, c * 4].into_iter().filter(|&n| n >= 1 && n != c) {
            let p = self.raw_publish(n, k, RawVariant::AsJobgate).await?;
            runs.push(knob(
                "--in-flight",
                n.to_string(),
                "raw publish",
                p,
                raw_publish.per_sec,
            ));
            let (p, _) = self
                .ingress_closed(&format!("clients-{n}"), n, k, &[])
                .await?;
            runs.push(knob(
                "--in-flight",
                n.to_string(),
                "ingress closed loop",
                p,
                ingress.per_sec,
            ));
        }
        // Consumer concurrency (= prefetch): raw consume and one consumer process.
        let more = self.args.consumer_concurrency.saturating_mul(4);
        if more != self.args.consumer_concurrency {
            // The raw Kafka consumer has no prefetch to change.
            if matches!(self.broker, Broker::Rabbit(_)) {
                let p = self.raw_consume(more).await?;
                runs.push(knob(
                    "JOBGATE_CONCURRENCY",
                    more.to_string(),
                    "raw consume (prefetch)",
                    p,
                    raw_consume.per_sec,
                ));
            }
            if let Some(base) = drain_1 {
                let d = self.drain(base.consumers, more).await?;
                runs.push(knob(
                    "JOBGATE_CONCURRENCY",
                    more.to_string(),
                    &format!("drain x{}", base.consumers),
                    d.phase,
                    base.phase.per_sec,
                ));
                // The same prefetch with the default concurrency: is it the prefetch?
                if matches!(self.broker, Broker::Rabbit(_)) {
                    let extra = [("JOBGATE_PREFETCH", more.to_string())];
                    let d = self
                        .drain_with(
                            base.consumers,
                            self.args.consumer_concurrency,
                            self.jobs,
                            &format!("prefetch{more}"),
                            &extra,
                            Timing::COLD,
                        )
                        .await?;
                    runs.push(knob(
                        "JOBGATE_PREFETCH",
                        more.to_string(),
                        &format!("drain x{}", base.consumers),
                        d.phase,
                        base.phase.per_sec,
                    ));
                }
            }
        }
        Ok(runs)
    }

    async fn measure(&self) -> Result<BackendResults> {
        let c = self.args.in_flight as usize;
        say(format!("{}: raw publish, {c} in flight", self.backend));
        let raw_publish = self
            .raw_publish(c, self.duration, RawVariant::AsJobgate)
            .await?;
        say(format!("  raw publish: {}", show(&raw_publish)));
        require_clean("raw publish", &raw_publish)?;

        say(format!("{}: jobgate publisher, no HTTP", self.backend));
        let library_publish = self.library_publish().await?;
        say(format!("  jobgate publisher: {}", show(&library_publish)));
        require_clean("jobgate publisher", &library_publish)?;

        say(format!("{}: HTTP ingress", self.backend));
        let (ingress_closed, ingress_open, producer_peak_rss_kib) = self.ingress().await?;
        let rate = ingress_open.target_rate.unwrap_or_default();
        say(format!(
            "{}: raw publish, open loop at {rate:.0}/s",
            self.backend
        ));
        let raw_open = self.raw_open(rate).await?;
        say(format!(
            "  raw publish, open loop: {}",
            show_open(&raw_open)
        ));
        let go_baseline = self.go_baseline(rate).await?;

        say(format!(
            "{}: raw consume of {} jobs",
            self.backend, self.jobs
        ));
        let raw_consume = self.raw_consume(self.args.consumer_concurrency).await?;
        say(format!("  raw consume: {}", show(&raw_consume)));

        let mut drains = Vec::new();
        for &n in &self.args.consumers {
            say(format!(
                "{}: drain of {} jobs by {n} consumer(s)",
                self.backend, self.jobs
            ));
            let d = self.drain(n, self.args.consumer_concurrency).await?;
            say(format!(
                "  drain x{n}: {:.2} s, {:.0} jobs/s",
                d.phase.seconds, d.phase.per_sec
            ));
            drains.push(d);
        }

        let downstream = if self.args.downstream_jobs == 0 {
            Vec::new()
        } else {
            say(format!(
                "{}: {} jobs through a slow downstream ({} ms a job)",
                self.backend, self.args.downstream_jobs, self.args.downstream_ms
            ));
            self.scaling().await?
        };

        say(format!(
            "{}: scheduled jobs, lateness against their due time",
            self.backend
        ));
        let scheduled = Some(self.scheduled().await?);

        let knobs = if self.args.no_knobs {
            Vec::new()
        } else {
            say(format!("{}: knobs", self.backend));
            self.knobs(&raw_consume, drains.first()).await?
        };
        let ratios = Ratios::compute(
            &raw_publish,
            &library_publish,
            &ingress_closed,
            &raw_consume,
            &drains,
        );
        Ok(BackendResults {
            backend: self.backend.to_owned(),
            backlog_jobs: self.jobs,
            raw_publish,
            library_publish,
            ingress_closed,
            ingress_open,
            raw_open: Some(raw_open),
            go_baseline,
            producer_peak_rss_kib,
            raw_consume,
            drains,
            downstream,
            scheduled,
            knobs,
            ratios,
        })
    }
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn command_output(program: &str, args: &[&str], dir: &PathBuf) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn machine(root: &PathBuf) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or_else(|| "unknown".into(), |(_, m)| m.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024);
    let commit = command_output("git", &["rev-parse", "--short=12", "HEAD"], root)
        .unwrap_or_else(|| "unknown".into());
    let dirty = command_output(
        "git",
        &["status", "--porcelain", "--untracked-files=no"],
        root,
    )
    .is_some_and(|s| !s.is_empty());
    Machine {
        cpu_model,
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_total_mib,
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        git_commit: if dirty {
            format!("{commit} (with uncommitted changes)")
        } else {
            commit
        },
        load_before: load_average(),
        load_after: String::new(),
    }
}

/// Runs every phase of every backend asked for, then writes the report. The caller
/// deletes what `leftovers` recorded, whatever happened.
pub async fn run(args: &Args, root: PathBuf, leftovers: &Leftovers) -> Result<()> {
    if let Some(seconds) = args.soak {
        return soak_all(args, &root, leftovers, Duration::from_secs_f64(seconds)).await;
    }
    if args.big_batches {
        return big_batches_all(args, &root, leftovers).await;
    }
    if let Some(seconds) = args.profile {
        return profile_all(args, &root, leftovers, Duration::from_secs_f64(seconds)).await;
    }
    if args.scheduled_only {
        for bench in benches(args, &root, leftovers).await? {
            say(format!("{}: scheduled jobs", bench.backend));
            let measured = bench.scheduled().await;
            bench.close().await;
            let measured = measured.with_context(|| format!("{} scheduled jobs", bench.backend))?;
            println!("{}: {}", bench.backend, measured.line());
        }
        return Ok(());
    }
    let report = measure_all(args, &root, leftovers).await?;
    write_report(args, &root, &report)
}

/// `--soak`: the soak of each backend asked for, and its report.
async fn soak_all(
    args: &Args,
    root: &PathBuf,
    leftovers: &Leftovers,
    duration: Duration,
) -> Result<()> {
    let machine = machine(root);
    let mut soaks = Vec::new();
    for bench in benches(args, root, leftovers).await? {
        let soaked = bench.soak(duration, args.soak_rate).await;
        bench.close().await;
        soaks.push(soaked.with_context(|| format!("{} soak", bench.backend))?);
    }
    let path = args
        .soak_report
        .clone()
        .unwrap_or_else(|| root.join("bench/soak.md"));
    let summary = format!(
        "{}, {} cores, commit {}",
        machine.cpu_model, machine.nproc, machine.git_commit
    );
    soak::write(&path, &soak::render(&soaks, &summary))?;
    say(format!("soak report: {}", path.display()));
    if !soak::all_flat(&soaks) {
        bail!("memory grows over uptime: see {}", path.display());
    }
    Ok(())
}

/// `--big-batches`: the producer's peak memory under huge batches, per backend asked
/// for; exit 1 when a peak passes the goal.
async fn big_batches_all(args: &Args, root: &Path, leftovers: &Leftovers) -> Result<()> {
    let mut over = Vec::new();
    for bench in benches(args, root, leftovers).await? {
        let measured = bench.big_batches().await;
        bench.close().await;
        let measured = measured.with_context(|| format!("{} big batches", bench.backend))?;
        if measured.peak_mib() >= big_batches::GOAL_MIB {
            over.push(measured.line());
        }
    }
    if !over.is_empty() {
        bail!("peak memory over the goal: {}", over.join("; "));
    }
    Ok(())
}

/// `--profile`: a recording of the producer's CPU under load, per backend asked for.
async fn profile_all(
    args: &Args,
    root: &Path,
    leftovers: &Leftovers,
    seconds: Duration,
) -> Result<()> {
    let dir = args
        .profile_dir
        .clone()
        .unwrap_or_else(|| root.join("target/profile"));
    for bench in benches(args, root, leftovers).await? {
        say(format!(
            "{}: profile of the producer, {seconds:?}",
            bench.backend
        ));
        let profiled = bench.profile(seconds, &dir).await;
        bench.close().await;
        let profiled = profiled.with_context(|| format!("{} profile", bench.backend))?;
        println!("{}", profiled.line(bench.backend));
    }
    Ok(())
}

/// `--render-only`: the Markdown again from the JSON of the last run and the notes.
pub fn render_again(args: &Args, root: &Path) -> Result<()> {
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| root.join("bench/results.json"));
    let text = std::fs::read_to_string(&json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let report: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bench result", json_path.display()))?;
    write_report(args, root, &report)
}

fn write_report(args: &Args, root: &Path, report: &Report) -> Result<()> {
    let md_path = args
        .report
        .clone()
        .unwrap_or_else(|| root.join("BENCHMARKS.md"));
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| root.join("bench/results.json"));
    let notes_path = args
        .notes
        .clone()
        .unwrap_or_else(|| root.join("bench/notes.md"));
    let notes = std::fs::read_to_string(&notes_path).ok();
    std::fs::write(&md_path, render_markdown(report, notes.as_deref()))
        .with_context(|| format!("writing {}", md_path.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    say(format!(
        "wrote {} and {}",
        md_path.display(),
        json_path.display()
    ));
    Ok(())
}

/// The context of each backend asked for, connected, with the binaries and their logs.
async fn benches<'a>(
    args: &'a Args,
    root: &Path,
    leftovers: &'a Leftovers,
) -> Result<Vec<Bench<'a>>> {
    let uuid = uuid::Uuid::now_v7().simple().to_string();
    let run_id = uuid[uuid.len() - 8..].to_owned();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => crate::procs::default_bin_dir()?,
    };
    let bins = Binaries {
        dir: bin_dir,
        logs: root.join("target/bench-logs").join(&run_id),
    };
    say(format!(
        "run {run_id}; logs of the binaries in {}",
        bins.logs.display()
    ));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()
        .context("HTTP client")?;
    let backends = args.backend.names();
    let mut benches = Vec::new();
    for &backend in backends {
        let broker = match backend {
            "rabbitmq" => Broker::Rabbit(Box::new(Rabbit::connect(&args.amqp_url).await?)),
            _ => Broker::Kafka(Box::new(Kafka::new(
                &args.kafka_brokers,
                args.kafka_partitions,
            )?)),
        };
        benches.push(Bench {
            args,
            bins: bins.clone(),
            http: http.clone(),
            run_id: run_id.clone(),
            backend,
            broker,
            leftovers,
            warmup: Duration::from_secs_f64(args.warmup),
            duration: Duration::from_secs_f64(args.duration),
            knob_duration: Duration::from_secs_f64(args.knob_duration),
            jobs: args
                .jobs
                .unwrap_or(if backend == "kafka" { 500_000 } else { 50_000 }),
        });
    }
    Ok(benches)
}

impl Bench<'_> {
    /// Closes the raw client's connection.
    async fn close(&self) {
        if let Broker::Rabbit(r) = &self.broker {
            r.close().await;
        }
    }
}

async fn measure_all(args: &Args, root: &PathBuf, leftovers: &Leftovers) -> Result<Report> {
    let mut machine = machine(root);
    let mut results = Vec::new();
    let mut clusters = Vec::new();
    for bench in benches(args, root, leftovers).await? {
        let measured = bench.measure().await;
        bench.close().await;
        results.push(measured.with_context(|| format!("{} phases", bench.backend))?);
        if args.cluster {
            clusters.push(cluster::measure_on_cluster(args, root, bench.backend).await?);
        }
    }
    machine.load_after = load_average();
    Ok(Report {
        machine,
        settings: Settings {
            duration_s: args.duration,
            knob_duration_s: args.knob_duration,
            warmup_s: args.warmup,
            in_flight: args.in_flight as usize,
            body_bytes: BODY.len(),
            consumers: args.consumers.clone(),
            consumer_concurrency: args.consumer_concurrency,
            publish_channels: args.publish_channels,
            max_in_flight: args.max_in_flight,
            kafka_partitions: args.kafka_partitions,
            kafka_linger_ms: jobgate_shared::config::DEFAULT_KAFKA_LINGER_MS,
        },
        backends: results,
        clusters,
    })
}
