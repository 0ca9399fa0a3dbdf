//! jobgate load generator: how much of the broker's own ceiling jobgate keeps.
//!
//! For each backend it measures, in one run, on this machine:
//! - the raw publish ceiling of the client library with jobgate's settings, the same
//!   loop through jobgate's publisher (no HTTP), and the HTTP ingress of the release
//!   `producer` binary (closed loop, then open loop at half that rate);
//! - the raw consume rate of the client library, and the time 1, 2, 4 `consumer`
//!   processes take to drain the same backlog;
//! - peak RSS of the binaries; then the effect of the binaries' tuning knobs.
//!
//! It writes `BENCHMARKS.md` and `bench/results.json`. Layout: [`stats`] (percentiles,
//! ratios, schedule), [`load`] (closed and open loops), [`report`] (results and their
//! Markdown), [`procs`] (the binaries under test), [`rabbit`] and [`kafka`] (raw
//! clients, probes, cleanup), [`run`] (the phases in order).

mod kafka;
mod load;
mod procs;
mod rabbit;
mod report;
mod run;
mod stats;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

/// Which backends to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Which {
    Rabbitmq,
    Kafka,
    All,
}

impl Which {
    /// The backends measured, in order.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Which::Rabbitmq => &["rabbitmq"],
            Which::Kafka => &["kafka"],
            Which::All => &["rabbitmq", "kafka"],
        }
    }
}

/// Measures raw broker ceilings against jobgate's ingress and workers; writes
/// BENCHMARKS.md and bench/results.json.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench", version, about)]
pub struct Args {
    /// Backend(s) to measure.
    #[arg(long, value_enum, default_value_t = Which::All)]
    pub backend: Which,
    /// Seconds of each measured phase (after the warm-up).
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub duration: f64,
    /// Seconds of each knob-variant phase.
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    pub knob_duration: f64,
    /// Unmeasured seconds before each timed phase (connections, caches, JIT of the broker).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Backlog size (jobs) for the consume and drain phases [default: 50000 for
    /// RabbitMQ, 500000 for Kafka, whose consumers commit once a second and are fast:
    /// a drain must last several seconds to be measured].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub jobs: Option<u64>,
    /// Messages in flight for the raw publishers and closed-loop HTTP clients.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub in_flight: u64,
    /// Consumer process counts to drain the backlog with (comma list).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub consumers: Vec<usize>,
    /// `JOBGATE_CONCURRENCY` of each consumer, also the raw consumer's prefetch.
    #[arg(long, default_value_t = 8)]
    pub consumer_concurrency: u16,
    /// `JOBGATE_PUBLISH_CHANNELS` of the producer (and the raw publisher's channels).
    #[arg(long, default_value_t = 2)]
    pub publish_channels: u16,
    /// `JOBGATE_MAX_IN_FLIGHT` of the producer.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: u32,
    /// Partitions of the bench's Kafka topics: 12, which 1, 2 and 4 replicas split
    /// evenly (a partition has one owner, so jobgate's default of 6 gives 4 replicas
    /// 2, 2, 1 and 1 of them, and the busiest two set the pace).
    #[arg(long, default_value_t = 12)]
    pub kafka_partitions: i32,
    /// Skip the knob variants (channels, in-flight limits, concurrency).
    #[arg(long)]
    pub no_knobs: bool,
    /// Time the slow downstream takes per job (milliseconds): `--consumers` processes
    /// with the `http` handler drain `--downstream-jobs` through it, against the ideal
    /// `processes × concurrency / job time`.
    #[arg(long, default_value_t = 20.0, value_parser = positive_secs)]
    pub downstream_ms: f64,
    /// Backlog of the slow-downstream phase (0: skip it).
    #[arg(long, default_value_t = 3000)]
    pub downstream_jobs: u64,
    /// Also measure each backend on its three-node loopback cluster (`scripts/brokers.sh
    /// up rabbitmq-cluster` / `up kafka-cluster`, started for those phases and stopped
    /// after them): the main phases without the knobs, shown beside the single node.
    #[arg(long, conflicts_with_all = ["soak", "big_batches"])]
    pub cluster: bool,
    /// Backlog (jobs) of the consume and drain phases on a cluster: three brokers on
    /// this machine's cores are much slower than one, Kafka's most of all.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub cluster_jobs: u64,
    /// AMQP URL of RabbitMQ (the one of scripts/brokers.sh), or a comma-separated list
    /// of a cluster's nodes.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Kafka bootstrap servers (the one of scripts/brokers.sh).
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Directory of the release `producer` and `consumer` (default: the bench's own).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The Go baseline (`bench/go-baseline`: net/http and amqp091-go with confirms on 4
    /// channels, which `scripts/bench.sh` builds when Go is installed), measured beside
    /// the RabbitMQ ingress under the same loads; without it the report leaves that
    /// comparison out and says so.
    #[arg(long)]
    pub go_baseline: Option<PathBuf>,
    /// Markdown report to write.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// JSON results to write.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Hand-written analysis appended to the report.
    #[arg(long)]
    pub notes: Option<PathBuf>,
    /// Measure nothing: render the report again from the JSON results (after editing
    /// the notes, say).
    #[arg(long)]
    pub render_only: bool,
    /// Run only the soak, for this many seconds per backend: a producer and a consumer
    /// under steady traffic, their resident memory sampled every 15 s; writes
    /// `--soak-report` and exits 1 when a process's memory grows.
    #[arg(long, value_parser = positive_secs)]
    pub soak: Option<f64>,
    /// Requests per second of the soak's traffic.
    #[arg(long, default_value_t = 300.0, value_parser = positive_secs)]
    pub soak_rate: f64,
    /// Run only the big-batch check: the producer's peak resident memory (VmHWM) while
    /// 16 clients at once send 10 MiB `[0,0,...]` batches (4 rounds); exits 1 when it
    /// reaches 64 MiB.
    #[arg(long, conflicts_with = "soak")]
    pub big_batches: bool,
    /// Run only the scheduled-jobs phase (how late jobs with `Jobgate-Not-Before` start)
    /// and print its figures; writes no report.
    #[arg(long, conflicts_with_all = ["soak", "big_batches", "cluster", "profile"])]
    pub scheduled_only: bool,
    /// Run only the profile, for this many seconds per backend: `perf record` of the
    /// release producer under the closed-loop ingress load; the recording goes to
    /// `--profile-dir` (scripts/bench.sh --profile makes the flame graph from it).
    #[arg(long, value_parser = positive_secs, conflicts_with_all = ["soak", "big_batches", "cluster"])]
    pub profile: Option<f64>,
    /// Where `--profile` writes `<backend>.perf.data` [default: target/profile].
    #[arg(long)]
    pub profile_dir: Option<PathBuf>,
    /// The soak's report [default: bench/soak.md].
    #[arg(long)]
    pub soak_report: Option<PathBuf>,
    /// The whole run is abandoned (exit 1) after this many seconds (twice as many with
    /// `--cluster`; a soak gets at least its own length plus 5 minutes, per backend).
    #[arg(long, default_value_t = 1200)]
    pub max_seconds: u64,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("expected a positive number of seconds, got {s:?}")),
    }
}

/// The workspace root (this crate's parent directory).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Takes a SHARED lock on the brokers lock file for the whole run: tests that stop or
/// restart brokers take it exclusively, so they wait for the bench and it for them.
fn lock_brokers() -> Result<File> {
    let dir = match std::env::var_os("JOBGATE_STATE_DIR") {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("XDG_STATE_HOME") {
            Some(d) => PathBuf::from(d).join("jobgate"),
            None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                .join(".local/state/jobgate"),
        },
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("brokers.lock");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if file.try_lock_shared().is_err() {
        eprintln!(
            "bench: waiting for {} (a test is restarting brokers)",
            path.display()
        );
        file.lock_shared()
            .with_context(|| format!("locking {}", path.display()))?;
    }
    Ok(file)
}

/// How long the whole run may take before it is abandoned.
fn run_limit(args: &Args) -> Duration {
    // A soak lasts what it was asked to per backend, plus start-up and shutdown.
    let backends = args.backend.names().len() as f64;
    let soak_limit = args
        .soak
        .map_or(0.0, |seconds| (seconds + 300.0) * backends);
    // The cluster phases repeat the main ones (without the knobs) on slower brokers.
    let sites = if args.cluster { 2 } else { 1 };
    (Duration::from_secs(args.max_seconds) * sites).max(Duration::from_secs_f64(soak_limit))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.consumers.is_empty() || args.consumers.contains(&0) {
        eprintln!("bench: error: --consumers needs counts of at least 1");
        return ExitCode::from(2);
    }
    if args.render_only {
        return match run::render_again(&args, &workspace_root()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let _lock = match lock_brokers() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let limit = run_limit(&args);
    let leftovers = run::Leftovers::default();
    let outcome = tokio::select! {
        r = tokio::time::timeout(limit, run::run(&args, workspace_root(), &leftovers)) => match r {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("the run took longer than --max-seconds ({limit:?}); abandoned")),
        },
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Queues and topics go whatever happened (the binaries were killed on drop).
    leftovers.clean(&args).await;
    if args.cluster {
        // Already stopped unless the run was cut short in a cluster's phases.
        run::stop_clusters(&workspace_root()).await;
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_soak_of_both_backends_gets_its_length_twice() {
        let args = |extra: &[&str]| {
            Args::try_parse_from([&["bench"][..], extra].concat()).expect("valid arguments")
        };
        // 900 s per backend, both backends: 2 x (900 + 300) s, past the 1200 s default.
        assert_eq!(
            run_limit(&args(&["--soak", "900"])),
            Duration::from_secs(2400)
        );
        assert_eq!(
            run_limit(&args(&["--soak", "900", "--backend", "kafka"])),
            Duration::from_secs(1200)
        );
        assert_eq!(
            run_limit(&args(&["--soak", "1200", "--backend", "rabbitmq"])),
            Duration::from_secs(1500)
        );
        assert_eq!(run_limit(&args(&[])), Duration::from_secs(1200));
        assert_eq!(run_limit(&args(&["--cluster"])), Duration::from_secs(2400));
    }
}
