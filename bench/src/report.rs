//! What a run measured (`bench/results.json`) and how it reads (`BENCHMARKS.md`).
//! Rendering is pure: the figures in, the Markdown out.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::stats::{ratio, LatencySummary, OpenLoopDetail, SlowestWindow};

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    pub settings: Settings,
    pub backends: Vec<BackendResults>,
    /// `--cluster`: the main phases again on the three-node clusters (no knobs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<BackendResults>,
}

/// Where and when the run happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub nproc: usize,
    pub mem_total_mib: u64,
    pub date: String,
    pub git_commit: String,
    /// `/proc/loadavg` before and after: other work on the machine skews every figure.
    pub load_before: String,
    pub load_after: String,
}

/// The knobs of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub duration_s: f64,
    pub knob_duration_s: f64,
    pub warmup_s: f64,
    pub in_flight: usize,
    pub body_bytes: usize,
    pub consumers: Vec<usize>,
    pub consumer_concurrency: u16,
    pub publish_channels: u16,
    pub max_in_flight: u32,
    pub kafka_partitions: i32,
    /// jobgate's `linger.ms` (results written before it was a knob had 2).
    #[serde(default = "linger_before_the_knob")]
    pub kafka_linger_ms: u32,
}

fn linger_before_the_knob() -> u32 {
    2
}

/// One measured phase: how many operations succeeded and failed in how long.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Phase {
    pub ok: u64,
    pub failed: u64,
    pub seconds: f64,
    pub per_sec: f64,
    /// Latency of the successful operations (none for drains).
    pub latency: Option<LatencySummary>,
    /// Open loop only: the rate requests were scheduled at.
    pub target_rate: Option<f64>,
    /// The first failure, to tell what went wrong.
    pub first_error: Option<String>,
    /// HTTP ingress phases: the producer's CPU time (user + system) per request sent,
    /// in microseconds, over the whole phase (its warm-up's requests and CPU alike).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_request: Option<f64>,
    /// Open loop only: its slowest 100 ms of send schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slowest: Option<SlowestWindow>,
    /// Open loop only: how late its requests went out, their send-to-answer latency,
    /// and how busy the machine was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_loop: Option<OpenLoopDetail>,
    /// Ingress open loop only: where its slow requests waited, from the producer's own
    /// histograms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_split: Option<SlowSplit>,
}

/// The producer's view of an ingress phase's slow requests: how many took longer than
/// [`SlowSplit::over_ms`] from request to answer, and how many of its publishes waited
/// that long for the broker's confirm (delivery report). Close counts put the tail in
/// the broker client or the broker; far fewer publishes put it on the HTTP side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SlowSplit {
    pub over_ms: f64,
    pub requests: u64,
    pub publishes: u64,
}

/// N consumer processes draining a backlog.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Drain {
    pub consumers: usize,
    pub concurrency: u16,
    pub phase: Phase,
    /// Largest VmHWM among the consumer processes, in KiB.
    pub peak_rss_kib: u64,
    /// CPU time of all consumer processes (start-up included) per job, in microseconds.
    pub cpu_us_per_job: f64,
    /// Started before the backlog (slow-downstream phase): seconds from spawning the
    /// processes until they all consumed (Kafka: their group stable, every partition
    /// owned), which the drain's time then leaves out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_s: Option<f64>,
}

/// N consumer processes draining a backlog through a downstream that takes `job_ms`
/// a job (the `http` handler): what scaling replicas is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scaling {
    pub job_ms: f64,
    /// `processes × concurrency / job time`.
    pub ideal_per_sec: f64,
    pub drain: Drain,
}

/// One setting changed from the defaults, and what the phase it matters to did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnobRun {
    pub knob: String,
    pub value: String,
    /// What was measured: `ingress closed loop`, `raw publish`, `drain x1`, ...
    pub measured: String,
    pub phase: Phase,
    /// The same measurement with default settings, for the change: publish side
    /// measured again just before the knob phases, consume side from the main phases.
    pub baseline_per_sec: f64,
}

/// The figures of one backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendResults {
    pub backend: String,
    /// Jobs in the backlog of the consume and drain phases.
    pub backlog_jobs: u64,
    pub raw_publish: Phase,
    pub library_publish: Phase,
    pub ingress_closed: Phase,
    pub ingress_open: Phase,
    /// The raw client in an open loop at the ingress open loop's rate (none in results
    /// written before it).
    #[serde(default)]
    pub raw_open: Option<Phase>,
    /// RabbitMQ: the Go service of `bench/go-baseline` under the ingress's loads (none
    /// on Kafka, without `--go-baseline`, and in results written before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub go_baseline: Option<GoBaseline>,
    pub producer_peak_rss_kib: u64,
    pub raw_consume: Phase,
    pub drains: Vec<Drain>,
    /// The slow-downstream phase, per consumer count (none in results written before it).
    #[serde(default)]
    pub downstream: Vec<Scaling>,
    /// How late scheduled jobs started (none in results written before it).
    #[serde(default)]
    pub scheduled: Option<Lateness>,
    pub knobs: Vec<KnobRun>,
    pub ratios: Ratios,
}

/// The Go baseline's phases: the ingress's closed loop, then its open loop's rate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GoBaseline {
    pub closed: Phase,
    pub open: Phase,
    /// The Go service's peak resident memory (`VmHWM`) over both phases.
    pub peak_rss_kib: u64,
}

/// Scheduled jobs (`Jobgate-Not-Before`): how long after its due time each started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lateness {
    pub jobs: u64,
    /// Jobs that started before their due time (jobgate promises none).
    pub early: u64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

impl Lateness {
    pub fn line(&self) -> String {
        format!(
            "{} scheduled jobs: start - due p50 {} ms, p99 {} ms, max {} ms; {} early",
            self.jobs, self.p50_ms, self.p99_ms, self.max_ms, self.early
        )
    }
}

/// The point of the run: how much of the broker's ceiling jobgate keeps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    pub ingress_over_raw_publish: Option<f64>,
    pub library_over_raw_publish: Option<f64>,
    pub ingress_over_library: Option<f64>,
    /// Per consumer count: drain rate over the raw consume rate of one client.
    pub drain_over_raw_consume: Vec<(usize, Option<f64>)>,
    /// Per consumer count: drain rate over the drain rate of the smallest count.
    pub scaling: Vec<(usize, Option<f64>)>,
}

impl Ratios {
    pub fn compute(
        raw_publish: &Phase,
        library_publish: &Phase,
        ingress_closed: &Phase,
        raw_consume: &Phase,
        drains: &[Drain],
    ) -> Self {
        let base = drains.first().map_or(0.0, |d| d.phase.per_sec);
        Self {
            ingress_over_raw_publish: ratio(ingress_closed.per_sec, raw_publish.per_sec),
            library_over_raw_publish: ratio(library_publish.per_sec, raw_publish.per_sec),
            ingress_over_library: ratio(ingress_closed.per_sec, library_publish.per_sec),
            drain_over_raw_consume: drains
                .iter()
                .map(|d| (d.consumers, ratio(d.phase.per_sec, raw_consume.per_sec)))
                .collect(),
            scaling: drains
                .iter()
                .map(|d| (d.consumers, ratio(d.phase.per_sec, base)))
                .collect(),
        }
    }
}

fn show_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".into(), |r| format!("{r:.2}"))
}

fn show_change(now: f64, before: f64) -> String {
    ratio(now - before, before).map_or_else(|| "n/a".into(), |r| format!("{:+.0}%", r * 100.0))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn backend_title(name: &str) -> &str {
    match name {
        "rabbitmq" => "RabbitMQ",
        "kafka" => "Kafka",
        other => other,
    }
}

/// One table row: rate, counts, latency percentiles.
/// What the Go rows of the publish table are, or why a RabbitMQ run has none.
fn go_baseline_note(out: &mut String, b: &BackendResults) {
    match &b.go_baseline {
        Some(g) => {
            let _ = writeln!(
                out,
                "The Go rows: `bench/go-baseline`, the plain service of issue 15 (net/http, \
                 amqp091-go, persistent messages confirmed on 4 channels, 202 once \
                 confirmed), on a queue of its own under the ingress's two loads; its CPU \
                 column is the Go process's own. Its peak RSS: {}.{}\n",
                mib(g.peak_rss_kib),
                g.open.slowest.map_or_else(String::new, |w| format!(
                    " Its open loop's slowest 100 ms: the {} requests due {:.1} s into it \
                     waited up to {:.1} ms.",
                    w.requests, w.at_s, w.max_ms
                )),
            );
        }
        None if b.backend == "rabbitmq" => {
            let _ = writeln!(
                out,
                "The Go baseline was not measured in this run (`--go-baseline`; \
                 `scripts/bench.sh` builds it when Go is installed).\n"
            );
        }
        None => {}
    }
}

/// The open loops side by side: the latency from the due time (the table above) split
/// into the generator's lag and the system's send-to-answer time, with the machine's
/// load; then, for the ingress, where the producer says its slow requests waited.
fn open_loops(out: &mut String, b: &BackendResults) {
    let mut loops = Vec::new();
    if let Some(raw) = &b.raw_open {
        loops.push(("raw client", raw));
    }
    loops.push(("HTTP ingress", &b.ingress_open));
    if let Some(g) = &b.go_baseline {
        loops.push(("Go service", &g.open));
    }
    let slow_ms = crate::stats::SLOW.as_secs_f64() * 1000.0;
    if loops.iter().any(|(_, p)| p.open_loop.is_some()) {
        open_loop_table(out, &loops, slow_ms);
    }
    if let Some(t) = b.ingress_open.slow_split {
        let _ = writeln!(
            out,
            "The producer's own histograms for its open loop: {} requests took over \
             {:.0} ms from request to answer, and {} publishes waited over {:.0} ms for the \
             broker's confirm (close counts put the tail in the broker or its client, far \
             fewer publishes on the HTTP side).\n",
            t.requests, t.over_ms, t.publishes, t.over_ms
        );
    }
}

fn open_loop_table(out: &mut String, loops: &[(&str, &Phase)], slow_ms: f64) {
    let _ = writeln!(
        out,
        "Open loops, from the due time and from the send: p99 from due = sent late + \
         send to answer, roughly; a generator sending late means a machine with no CPU \
         to spare.\n\n\
         | open loop | p99 ms from due | sent late, p99 ms | p99 ms from send | over \
         {slow_ms:.0} ms from send | machine busy |\n|---|---|---|---|---|---|"
    );
    for (what, p) in loops {
        let Some(d) = p.open_loop else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {what} | {:.2} | {:.2} | {:.2} | {} of {} | {} |",
            p.latency.unwrap_or_default().p99_ms,
            d.send_lag_p99_ms,
            d.from_send.p99_ms,
            d.slow,
            d.from_send.count,
            d.machine_busy_shown(),
        );
    }
    let _ = writeln!(out);
}

fn phase_row(out: &mut String, what: &str, p: &Phase) {
    let l = p.latency.unwrap_or_default();
    let cpu = p
        .cpu_us_per_request
        .map_or_else(|| "-".to_owned(), |us| format!("{us:.0}"));
    let lat = |v: f64| {
        if p.latency.is_some() {
            format!("{v:.2}")
        } else {
            "-".into()
        }
    };
    let _ = writeln!(
        out,
        "| {what} | {:.0} | {} | {} | {:.1} | {} | {} | {} | {} | {cpu} |",
        p.per_sec,
        p.ok,
        p.failed,
        p.seconds,
        lat(l.p50_ms),
        lat(l.p99_ms),
        lat(l.p999_ms),
        lat(l.max_ms),
    );
}

fn errors(out: &mut String, named: &[(&str, &Phase)]) {
    for (what, p) in named {
        if let Some(e) = &p.first_error {
            let _ = writeln!(out, "- first failure of *{what}*: `{e}`");
        }
    }
}

/// `BENCHMARKS.md`. `notes` (the hand-written analysis, `bench/notes.md`) is appended
/// as it is.
pub fn render_markdown(r: &Report, notes: Option<&str>) -> String {
    let m = &r.machine;
    let s = &r.settings;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmarks\n\n\
         Written by `scripts/bench.sh` (the `bench/` crate); the same figures are in \
         `bench/results.json`. Do not edit this file by hand: run the bench again. The \
         analysis at the end comes from `bench/notes.md`.\n"
    );

    let _ = writeln!(out, "## Machine and run\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| CPU | {} ({} cores) |", m.cpu_model, m.nproc);
    let _ = writeln!(out, "| memory | {} MiB |", m.mem_total_mib);
    let _ = writeln!(out, "| date (UTC) | {} |", m.date);
    let _ = writeln!(out, "| git commit | `{}` |", m.git_commit);
    let _ = writeln!(
        out,
        "| load average before / after | {} / {} |",
        m.load_before, m.load_after
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Settings: each measured phase runs {:.0} s after a {:.0} s warm-up (knob variants: \
         {:.0} s); {} messages in flight, which is also the number of closed-loop HTTP \
         clients; job body {} bytes of JSON; backlogs drained by {} consumer \
         process(es) (log handler, `RUST_LOG=warn`, `JOBGATE_CONCURRENCY={}`); producer \
         `JOBGATE_PUBLISH_CHANNELS={}`, `JOBGATE_MAX_IN_FLIGHT={}`, `RUST_LOG=warn`; Kafka \
         topics with {} partitions, producer `acks=all`, idempotent, `linger.ms={}` (as \
         jobgate's, `JOBGATE_KAFKA_LINGER_MS`).\n",
        s.duration_s,
        s.warmup_s,
        s.knob_duration_s,
        s.in_flight,
        s.body_bytes,
        s.consumers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" / "),
        s.consumer_concurrency,
        s.publish_channels,
        s.max_in_flight,
        s.kafka_partitions,
        s.kafka_linger_ms,
    );

    // The ratios first: they are what the figures are for.
    let _ = writeln!(out, "## Ratios\n");
    let _ = write!(out, "| |");
    for b in &r.backends {
        let _ = write!(out, " {} |", backend_title(&b.backend));
    }
    let _ = write!(out, "\n|---|");
    for _ in &r.backends {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out);
    let row = |out: &mut String, label: &str, f: &dyn Fn(&BackendResults) -> String| {
        let _ = write!(out, "| {label} |");
        for b in &r.backends {
            let _ = write!(out, " {} |", f(b));
        }
        let _ = writeln!(out);
    };
    row(&mut out, "HTTP ingress / raw publish", &|b| {
        show_ratio(b.ratios.ingress_over_raw_publish)
    });
    row(
        &mut out,
        "jobgate publisher (no HTTP) / raw publish",
        &|b| show_ratio(b.ratios.library_over_raw_publish),
    );
    row(&mut out, "HTTP ingress / jobgate publisher", &|b| {
        show_ratio(b.ratios.ingress_over_library)
    });
    if r.backends.iter().any(|b| b.go_baseline.is_some()) {
        row(&mut out, "HTTP ingress / Go service, closed loop", &|b| {
            b.go_baseline.as_ref().map_or_else(
                || "-".into(),
                |g| show_ratio(ratio(b.ingress_closed.per_sec, g.closed.per_sec)),
            )
        });
    }
    row(&mut out, "drain / raw consume, per consumer count", &|b| {
        b.ratios
            .drain_over_raw_consume
            .iter()
            .map(|(n, r)| format!("x{n}: {}", show_ratio(*r)))
            .collect::<Vec<_>>()
            .join(", ")
    });
    row(&mut out, "drain scaling over consumer counts", &|b| {
        b.ratios
            .scaling
            .iter()
            .map(|(_, r)| show_ratio(*r))
            .collect::<Vec<_>>()
            .join(" -> ")
    });
    row(&mut out, "slow downstream: jobs/s over the ideal", &|b| {
        b.downstream
            .iter()
            .map(|d| {
                let r = ratio(d.drain.phase.per_sec, d.ideal_per_sec);
                format!("x{}: {}", d.drain.consumers, show_ratio(r))
            })
            .collect::<Vec<_>>()
            .join(", ")
    });
    row(
        &mut out,
        "slow downstream: scaling over consumer counts",
        &|b| {
            let base = b.downstream.first().map_or(0.0, |d| d.drain.phase.per_sec);
            b.downstream
                .iter()
                .map(|d| show_ratio(ratio(d.drain.phase.per_sec, base)))
                .collect::<Vec<_>>()
                .join(" -> ")
        },
    );
    let _ = writeln!(out);

    for b in &r.backends {
        let title = backend_title(&b.backend);
        let _ = writeln!(out, "## {title}\n");
        let _ = writeln!(out, "### Publish side\n");
        let _ = writeln!(
            out,
            "| path | ok/s | ok | failed | s | p50 ms | p99 ms | p99.9 ms | max ms | producer CPU µs per request |\n\
             |---|---|---|---|---|---|---|---|---|---|"
        );
        phase_row(
            &mut out,
            &format!("raw client, {} in flight", s.in_flight),
            &b.raw_publish,
        );
        phase_row(
            &mut out,
            &format!("jobgate publisher (no HTTP), {} in flight", s.in_flight),
            &b.library_publish,
        );
        phase_row(
            &mut out,
            &format!("HTTP ingress, closed loop, {} clients", s.in_flight),
            &b.ingress_closed,
        );
        if let Some(raw_open) = &b.raw_open {
            phase_row(
                &mut out,
                &format!(
                    "raw client, open loop at {:.0}/s",
                    raw_open.target_rate.unwrap_or_default()
                ),
                raw_open,
            );
        }
        phase_row(
            &mut out,
            &format!(
                "HTTP ingress, open loop at {:.0}/s",
                b.ingress_open.target_rate.unwrap_or_default()
            ),
            &b.ingress_open,
        );
        if let Some(g) = &b.go_baseline {
            phase_row(
                &mut out,
                &format!(
                    "Go service (net/http + amqp091-go), closed loop, {} clients",
                    s.in_flight
                ),
                &g.closed,
            );
            phase_row(
                &mut out,
                &format!(
                    "Go service, open loop at {:.0}/s",
                    g.open.target_rate.unwrap_or_default()
                ),
                &g.open,
            );
        }
        let _ = writeln!(
            out,
            "\nLatency of the raw and jobgate publishers is publish-to-confirm; of the \
             ingress, request-to-202 (open loop: from the scheduled send time). Producer \
             CPU per request: its user and system time over the phase, warm-up included, \
             divided by the requests sent then. Peak RSS of the producer (VmHWM, both \
             ingress phases): {}.{}\n",
            mib(b.producer_peak_rss_kib),
            b.ingress_open.slowest.map_or_else(String::new, |w| format!(
                " The open loop's slowest 100 ms: the {} requests due {:.1} s into it \
                 waited up to {:.1} ms (in an open loop one stall delays every request \
                 due during it, so one stall can set the p99).",
                w.requests, w.at_s, w.max_ms,
            )),
        );
        go_baseline_note(&mut out, b);
        open_loops(&mut out, b);
        let mut publish_phases = vec![
            ("raw publish", &b.raw_publish),
            ("jobgate publisher", &b.library_publish),
            ("ingress closed loop", &b.ingress_closed),
            ("ingress open loop", &b.ingress_open),
        ];
        if let Some(g) = &b.go_baseline {
            publish_phases.extend([("Go closed loop", &g.closed), ("Go open loop", &g.open)]);
        }
        errors(&mut out, &publish_phases);

        let _ = writeln!(
            out,
            "### Consume side\n\nBacklog: {} jobs.\n",
            b.backlog_jobs
        );
        let _ = writeln!(
            out,
            "| path | jobs | s | jobs/s | / raw | peak RSS per process | CPU µs per job |\n\
             |---|---|---|---|---|---|---|"
        );
        let raw = if b.backend == "kafka" {
            "raw client (offsets stored per job, auto-commit)".to_owned()
        } else {
            format!(
                "raw client, prefetch {}, ack per job",
                s.consumer_concurrency
            )
        };
        let _ = writeln!(
            out,
            "| {raw} | {} | {:.2} | {:.0} | 1.00 | - | - |",
            b.raw_consume.ok, b.raw_consume.seconds, b.raw_consume.per_sec
        );
        for d in &b.drains {
            let _ = writeln!(
                out,
                "| {} `consumer` process(es), concurrency {} | {} | {:.2} | {:.0} | {} | {} | {:.0} |",
                d.consumers,
                d.concurrency,
                d.phase.ok,
                d.phase.seconds,
                d.phase.per_sec,
                show_ratio(ratio(d.phase.per_sec, b.raw_consume.per_sec)),
                mib(d.peak_rss_kib),
                d.cpu_us_per_job,
            );
        }
        let _ = writeln!(out);
        errors(&mut out, &[("raw consume", &b.raw_consume)]);
        downstream_table(&mut out, b);
        if let Some(l) = &b.scheduled {
            let _ = writeln!(
                out,
                "### Scheduled jobs\n\n\
                 {} jobs posted with `Jobgate-Not-Before` times spread over 15 s, one \
                 `consumer` with the default delay tiers (1 s to 60 s) and the `http` \
                 handler; lateness is the job's arrival at a local endpoint minus its due \
                 time.\n\n\
                 | start - due p50 ms | p99 ms | max ms | early |\n\
                 |---|---|---|---|\n\
                 | {} | {} | {} | {} |\n",
                l.jobs, l.p50_ms, l.p99_ms, l.max_ms, l.early
            );
        }

        if !b.knobs.is_empty() {
            let _ = writeln!(
                out,
                "### Knobs\n\nOne setting changed at a time, {:.0} s each. \"default ok/s\" is \
                 the same measurement with the defaults: for the publish side measured \
                 again just before these variants (the load of the machine drifts), for \
                 the consume side the main figures above.\n",
                s.knob_duration_s
            );
            let _ = writeln!(
                out,
                "| setting | measured | ok/s | default ok/s | change | failed | p99 ms | producer CPU µs per request |\n\
                 |---|---|---|---|---|---|---|---|"
            );
            for k in &b.knobs {
                let _ = writeln!(
                    out,
                    "| `{}={}` | {} | {:.0} | {:.0} | {} | {} | {} | {} |",
                    k.knob,
                    k.value,
                    k.measured,
                    k.phase.per_sec,
                    k.baseline_per_sec,
                    show_change(k.phase.per_sec, k.baseline_per_sec),
                    k.phase.failed,
                    k.phase
                        .latency
                        .map_or_else(|| "-".into(), |l| format!("{:.2}", l.p99_ms)),
                    k.phase
                        .cpu_us_per_request
                        .map_or_else(|| "-".into(), |us| format!("{us:.0}")),
                );
            }
            let _ = writeln!(out);
        }
    }

    if !r.clusters.is_empty() {
        clusters_section(&mut out, r);
    }

    let _ = writeln!(out, "{}", HOW_TO_RUN.trim_end());
    if let Some(notes) = notes {
        let _ = writeln!(out, "\n{}", notes.trim_end());
    }
    out
}

/// The slow-downstream phase of one backend: each consumer count against its ideal.
fn downstream_table(out: &mut String, b: &BackendResults) {
    let Some(first) = b.downstream.first() else {
        return;
    };
    let _ = writeln!(
        out,
        "### Replicas on a slow downstream\n\n\
         {} jobs, each POSTed by the `http` handler to a local endpoint that answers after \
         {:.0} ms; the ideal is `processes × concurrency / job time`. The processes start \
         before the jobs are published; \"settled after\" is how long they took to all \
         consume (Kafka: the group stable with every partition owned), and the drain's \
         time starts once the bench's publisher, connected after that, has sent the first \
         job. It ends when the endpoint has answered every job once (not \
         when the broker's backlog is empty: a Kafka group commits once a second).\n",
        first.drain.phase.ok, first.job_ms
    );
    let _ = writeln!(
        out,
        "| `consumer` processes | concurrency | settled after s | s | jobs/s | ideal jobs/s | / ideal | over x{} |\n\
         |---|---|---|---|---|---|---|---|",
        first.drain.consumers
    );
    for d in &b.downstream {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {} | {} |",
            d.drain.consumers,
            d.drain.concurrency,
            d.drain
                .settled_s
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.1}")),
            d.drain.phase.seconds,
            d.drain.phase.per_sec,
            d.ideal_per_sec,
            show_ratio(ratio(d.drain.phase.per_sec, d.ideal_per_sec)),
            show_ratio(ratio(d.drain.phase.per_sec, first.drain.phase.per_sec)),
        );
    }
    let _ = writeln!(out);
}

/// `--cluster`: each backend's single-node figures beside its three-node cluster's.
fn clusters_section(out: &mut String, r: &Report) {
    let _ = writeln!(
        out,
        "## Single node and three-node cluster\n\n\
         `scripts/bench.sh --cluster`: the main phases again (no knobs) on the loopback \
         clusters of `scripts/brokers.sh` (`up rabbitmq-cluster`: three RabbitMQ nodes, \
         jobgate's quorum queues replicated on all three, the AMQP URL list of \
         `brokers.sh env`; `up kafka-cluster`: three KRaft brokers, topics with \
         replication factor 3 and `min.insync.replicas` 2, `acks=all`), each cluster \
         started for its phases and stopped after them, with a smaller backlog \
         (`--cluster-jobs`). All three nodes share the same {} cores as the single \
         node and the load generator, so this shows what replication costs on one \
         machine, not what a cluster of separate machines gains.\n",
        r.machine.nproc
    );
    let _ = writeln!(
        out,
        "| backend | measured | single node | 3-node cluster | cluster / single |\n\
         |---|---|---|---|---|"
    );
    for cluster in &r.clusters {
        let Some(single) = r.backends.iter().find(|b| b.backend == cluster.backend) else {
            continue;
        };
        let title = backend_title(&cluster.backend);
        let p99 = |p: &Phase| p.latency.map_or(0.0, |l| l.p99_ms);
        // (what, single node, cluster, decimals shown)
        let mut rows: Vec<(String, f64, f64, usize)> = vec![
            (
                "raw publish, ok/s".into(),
                single.raw_publish.per_sec,
                cluster.raw_publish.per_sec,
                0,
            ),
            (
                "HTTP ingress, closed loop, ok/s".into(),
                single.ingress_closed.per_sec,
                cluster.ingress_closed.per_sec,
                0,
            ),
            (
                "HTTP ingress, closed loop, p99 ms".into(),
                p99(&single.ingress_closed),
                p99(&cluster.ingress_closed),
                2,
            ),
            (
                "HTTP ingress, open loop at half the closed rate, p99 ms".into(),
                p99(&single.ingress_open),
                p99(&cluster.ingress_open),
                2,
            ),
            (
                "HTTP ingress / raw publish".into(),
                single.ratios.ingress_over_raw_publish.unwrap_or_default(),
                cluster.ratios.ingress_over_raw_publish.unwrap_or_default(),
                2,
            ),
            (
                "backlog of the consume and drain phases, jobs".into(),
                single.backlog_jobs as f64,
                cluster.backlog_jobs as f64,
                0,
            ),
            (
                "raw consume, jobs/s".into(),
                single.raw_consume.per_sec,
                cluster.raw_consume.per_sec,
                0,
            ),
        ];
        for d in &cluster.drains {
            if let Some(s) = single.drains.iter().find(|s| s.consumers == d.consumers) {
                rows.push((
                    format!("drain by {} `consumer` process(es), jobs/s", d.consumers),
                    s.phase.per_sec,
                    d.phase.per_sec,
                    0,
                ));
            }
        }
        for d in &cluster.downstream {
            if let Some(s) = single
                .downstream
                .iter()
                .find(|s| s.drain.consumers == d.drain.consumers)
            {
                rows.push((
                    format!("slow downstream, {} process(es), jobs/s", d.drain.consumers),
                    s.drain.phase.per_sec,
                    d.drain.phase.per_sec,
                    0,
                ));
            }
        }
        for (what, single, cluster, decimals) in rows {
            let _ = writeln!(
                out,
                "| {title} | {what} | {single:.decimals$} | {cluster:.decimals$} | {} |",
                show_ratio(ratio(cluster, single)),
            );
        }
    }
    let _ = writeln!(out);
    for c in &r.clusters {
        let title = backend_title(&c.backend);
        errors(
            out,
            &[
                (&format!("{title} cluster raw publish"), &c.raw_publish),
                (
                    &format!("{title} cluster ingress closed loop"),
                    &c.ingress_closed,
                ),
                (
                    &format!("{title} cluster ingress open loop"),
                    &c.ingress_open,
                ),
            ],
        );
    }
}

const HOW_TO_RUN: &str = r#"## How to run

```sh
scripts/bench.sh                      # both backends, defaults (a few minutes)
scripts/bench.sh --backend rabbitmq --duration 5 --jobs 10000
scripts/bench.sh --no-knobs           # skip the knob variants
scripts/bench.sh --cluster            # also on the three-node clusters (twice as long)
scripts/bench.sh --profile 10         # only: a flame graph of the producer under load
scripts/bench.sh --scheduled-only     # only: how late scheduled jobs start (about a minute)
target/release/bench --render-only    # rewrite this file from bench/results.json + bench/notes.md
```

The script brings the brokers up (`scripts/brokers.sh up rabbitmq`, `... up kafka`), builds
`producer`, `consumer` and `bench` in release mode and runs `target/release/bench` with
the arguments given (see `target/release/bench --help`); with `--cluster` the bench
starts each backend's three-node cluster after its single-node phases (`scripts/brokers.sh
up rabbitmq-cluster`, `up kafka-cluster`) and stops it when done. The bench holds a shared lock on
`$JOBGATE_STATE_DIR/brokers.lock` so tests that restart brokers wait for it; it talks to
127.0.0.1 only, uses queues and topics named `bench-*` and deletes them at the end.

## How it measures

- **raw publish**: N tasks, each publishing one job and awaiting its confirm, in a loop
  (N messages in flight). RabbitMQ: lapin, 2 confirm channels round-robin, persistent,
  `mandatory`, jobgate's AMQP properties, a quorum queue. Kafka: rdkafka `FutureProducer`,
  `acks=all`, `enable.idempotence=true`, `linger.ms` as jobgate's default, jobgate's headers, keyed by job id.
- **jobgate publisher**: the same loop through `jobgate-shared`'s `Publisher` (what the
  producer calls), no HTTP: separates the cost of HTTP from that of the publisher.
- **ingress, closed loop**: N HTTP/1.1 keep-alive clients, each `POST /jobs` then the next
  when the answer came, against the release `producer` binary.
- **ingress, open loop**: requests sent on a fixed schedule at half the closed-loop rate,
  whatever the answers; latency counts from the scheduled send time, so a stall shows in
  the percentiles instead of slowing the sender (no coordinated omission). The open-loop
  table splits it into how late the bench sent (tokio's millisecond timer, and any wait
  for a CPU) and the time from the send to the answer, with the machine's busy share
  (`/proc/stat`) over the loop; for the ingress, the producer's histograms say how many
  of its requests and confirms took over 4 ms.
- **raw consume**: one client draining the backlog: lapin `basic_consume` with the
  consumer's prefetch and one ack per job, acks sent concurrently as jobgate's tasks
  do; rdkafka `StreamConsumer`, offsets stored per
  message and auto-committed every second (as jobgate).
- **drain**: the backlog is published first, then N `consumer` processes are started; the
  time runs from their start until the broker shows the backlog gone: RabbitMQ's ready
  count (passive declare, polled every 20 ms; at most prefetch x N jobs may still be
  unacked), Kafka's committed offsets of the group at the end offsets (polled every
  100 ms). Kafka commits every second, so Kafka times are late by up to about 1 s; the
  raw Kafka consume is timed the same way (until its commits reach the end) to compare
  like with like.
- **slow downstream**: a smaller backlog (`--downstream-jobs`, 3000) drained by 1, 2, 4
  `consumer` processes with the `http` handler, which POSTs each job to an endpoint in the
  bench that answers after `--downstream-ms` (20 ms): the case replicas are for. Timed as
  the drains; the ideal is `processes × concurrency / job time`.
- **scheduled jobs**: 200 jobs posted with `Jobgate-Not-Before` times from 1 to 15 s ahead
  to one `consumer` with the default delay tiers (1 s to 60 s) and the `http` handler; a
  job's lateness is its arrival at an endpoint in the bench minus its due time.
- **peak RSS**: `VmHWM` from `/proc/<pid>/status` of the producer after both ingress
  phases and of every consumer process just before it is stopped.
- The load generator runs on the same cores as the broker and the binaries under test:
  on a small machine it takes a good share of the CPU, and so does the broker."#;

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(per_sec: f64) -> Phase {
        Phase {
            ok: (per_sec * 10.0) as u64,
            seconds: 10.0,
            per_sec,
            ..Phase::default()
        }
    }

    fn detail(lag_ms: f64, p99_ms: f64, slow: u64, busy: Option<f64>) -> OpenLoopDetail {
        OpenLoopDetail {
            send_lag_p99_ms: lag_ms,
            from_send: LatencySummary {
                count: 15000,
                p99_ms,
                ..LatencySummary::default()
            },
            slow,
            machine_busy: busy,
        }
    }

    fn drain(consumers: usize, per_sec: f64) -> Drain {
        Drain {
            consumers,
            concurrency: 8,
            phase: phase(per_sec),
            peak_rss_kib: 20 * 1024,
            cpu_us_per_job: 95.0,
            settled_s: None,
        }
    }

    /// `consumers` processes of concurrency 8 through a 20 ms downstream.
    fn downstream(consumers: usize, per_sec: f64) -> Scaling {
        Scaling {
            job_ms: 20.0,
            ideal_per_sec: consumers as f64 * 400.0,
            drain: Drain {
                phase: Phase {
                    ok: 3000,
                    seconds: 3000.0 / per_sec,
                    per_sec,
                    ..Phase::default()
                },
                ..drain(consumers, per_sec)
            },
        }
    }

    fn sample() -> Report {
        let drains = vec![drain(1, 1000.0), drain(2, 1800.0), drain(4, 2500.0)];
        let mut ingress = phase(3000.0);
        ingress.latency = Some(LatencySummary {
            count: 30000,
            p50_ms: 1.25,
            p99_ms: 7.5,
            p999_ms: 12.0,
            max_ms: 40.0,
        });
        ingress.failed = 3;
        ingress.first_error = Some("503 overloaded".into());
        ingress.cpu_us_per_request = Some(61.4);
        let ratios = Ratios::compute(
            &phase(6000.0),
            &phase(5000.0),
            &ingress,
            &phase(4000.0),
            &drains,
        );
        Report {
            machine: Machine {
                cpu_model: "Test CPU".into(),
                nproc: 2,
                mem_total_mib: 4096,
                date: "2026-11-28T18:00:00Z".into(),
                git_commit: "abc123".into(),
                load_before: "0.5 0.4 0.3".into(),
                load_after: "1.5 1.0 0.5".into(),
            },
            settings: Settings {
                duration_s: 10.0,
                knob_duration_s: 5.0,
                warmup_s: 1.0,
                in_flight: 64,
                body_bytes: 120,
                consumers: vec![1, 2, 4],
                consumer_concurrency: 8,
                publish_channels: 2,
                max_in_flight: 1024,
                kafka_partitions: 6,
                kafka_linger_ms: 0,
            },
            backends: vec![BackendResults {
                backend: "rabbitmq".into(),
                backlog_jobs: 25000,
                raw_publish: phase(6000.0),
                library_publish: phase(5000.0),
                ingress_closed: ingress,
                ingress_open: Phase {
                    target_rate: Some(1500.0),
                    slowest: Some(SlowestWindow {
                        at_s: 4.2,
                        requests: 150,
                        max_ms: 91.5,
                    }),
                    open_loop: Some(detail(0.35, 6.1, 180, Some(0.72))),
                    slow_split: Some(SlowSplit {
                        over_ms: 4.0,
                        requests: 120,
                        publishes: 118,
                    }),
                    ..phase(1500.0)
                },
                raw_open: Some(Phase {
                    target_rate: Some(1500.0),
                    open_loop: Some(detail(0.2, 2.5, 40, None)),
                    ..phase(1500.0)
                }),
                go_baseline: Some(GoBaseline {
                    closed: phase(2000.0),
                    open: Phase {
                        target_rate: Some(1500.0),
                        ..phase(1500.0)
                    },
                    peak_rss_kib: 12 * 1024,
                }),
                producer_peak_rss_kib: 30 * 1024,
                raw_consume: phase(4000.0),
                drains,
                downstream: vec![
                    downstream(1, 380.0),
                    downstream(2, 700.0),
                    downstream(4, 1200.0),
                ],
                scheduled: Some(Lateness {
                    jobs: 200,
                    early: 0,
                    p50_ms: 480,
                    p99_ms: 990,
                    max_ms: 1010,
                }),
                knobs: vec![KnobRun {
                    knob: "JOBGATE_PUBLISH_CHANNELS".into(),
                    value: "4".into(),
                    measured: "ingress closed loop".into(),
                    phase: phase(3300.0),
                    baseline_per_sec: 3000.0,
                }],
                ratios,
            }],
            clusters: Vec::new(),
        }
    }

    /// [`sample`] with its RabbitMQ figures measured again on a cluster at `factor` of
    /// the single node's rates.
    fn with_cluster(factor: f64) -> Report {
        let mut report = sample();
        let mut cluster = report.backends[0].clone();
        cluster.raw_publish = phase(6000.0 * factor);
        cluster.ingress_closed.per_sec *= factor;
        cluster.raw_consume = phase(4000.0 * factor);
        cluster.drains = vec![drain(1, 1000.0 * factor), drain(2, 1800.0 * factor)];
        cluster.downstream = vec![downstream(1, 380.0 * factor)];
        cluster.knobs.clear();
        cluster.ratios = Ratios::compute(
            &cluster.raw_publish,
            &cluster.library_publish,
            &cluster.ingress_closed,
            &cluster.raw_consume,
            &cluster.drains,
        );
        report.clusters.push(cluster);
        report
    }

    #[test]
    fn a_rabbitmq_run_without_the_go_baseline_says_so_and_has_no_go_rows() {
        let mut report = sample();
        report.backends[0].go_baseline = None;
        let md = render_markdown(&report, None);
        assert!(
            md.contains("The Go baseline was not measured in this run"),
            "{md}"
        );
        assert!(!md.contains("Go service"), "{md}");
        report.backends[0].backend = "kafka".into();
        let md = render_markdown(&report, None);
        assert!(!md.contains("Go baseline"), "{md}");
    }

    #[test]
    fn results_from_before_the_open_loop_detail_render_without_its_table() {
        let mut report = sample();
        let b = &mut report.backends[0];
        b.ingress_open.open_loop = None;
        b.raw_open.as_mut().unwrap().open_loop = None;
        let md = render_markdown(&report, None);
        assert!(!md.contains("| open loop | p99 ms from due"), "{md}");
        assert!(
            md.contains("The producer's own histograms for its open loop: 120 requests"),
            "{md}"
        );
    }

    #[test]
    fn ratios_relate_each_path_to_its_raw_ceiling() {
        let r = &sample().backends[0].ratios;
        assert_eq!(r.ingress_over_raw_publish, Some(0.5));
        assert_eq!(r.ingress_over_library, Some(0.6));
        assert_eq!(
            r.drain_over_raw_consume,
            vec![(1, Some(0.25)), (2, Some(0.45)), (4, Some(0.625))]
        );
        assert_eq!(
            r.scaling,
            vec![(1, Some(1.0)), (2, Some(1.8)), (4, Some(2.5))]
        );
        let none = Ratios::compute(
            &Phase::default(),
            &Phase::default(),
            &phase(1.0),
            &Phase::default(),
            &[],
        );
        assert_eq!(none.ingress_over_raw_publish, None);
        assert!(none.scaling.is_empty());
    }

    #[test]
    fn the_report_shows_machine_ratios_tables_knobs_and_notes() {
        let md = render_markdown(&sample(), Some("## Analysis\n\nchannels help.\n"));
        for expected in [
            "| CPU | Test CPU (2 cores) |",
            "| git commit | `abc123` |",
            "| HTTP ingress / raw publish | 0.50 |",
            "| drain / raw consume, per consumer count | x1: 0.25, x2: 0.45, x4: 0.62 |",
            "| drain scaling over consumer counts | 1.00 -> 1.80 -> 2.50 |",
            "## RabbitMQ",
            "Backlog: 25000 jobs.",
            "| HTTP ingress, closed loop, 64 clients | 3000 | 30000 | 3 | 10.0 | 1.25 | 7.50 | 12.00 | 40.00 | 61 |",
            "| HTTP ingress, open loop at 1500/s | 1500 |",
            "| raw client, open loop at 1500/s | 1500 |",
            "| HTTP ingress / Go service, closed loop | 1.50 |",
            "| Go service (net/http + amqp091-go), closed loop, 64 clients | 2000 |",
            "| Go service, open loop at 1500/s | 1500 |",
            "its CPU column is the Go process's own. Its peak RSS: 12.0 MiB.",
            "| jobgate publisher (no HTTP), 64 in flight | 5000 | 50000 | 0 | 10.0 | - | - | - | - | - |",
            "Peak RSS of the producer (VmHWM, both ingress phases): 30.0 MiB. The open loop's slowest 100 ms: the 150 requests due 4.2 s into it waited up to 91.5 ms",
            "| open loop | p99 ms from due | sent late, p99 ms | p99 ms from send | over 4 ms from send | machine busy |",
            "| raw client | 0.00 | 0.20 | 2.50 | 40 of 15000 | - |",
            "| HTTP ingress | 0.00 | 0.35 | 6.10 | 180 of 15000 | 72 % |",
            "The producer's own histograms for its open loop: 120 requests took over 4 ms from request to answer, and 118 publishes waited over 4 ms for the broker's confirm",
            "- first failure of *ingress closed loop*: `503 overloaded`",
            "| 4 `consumer` process(es), concurrency 8 | 25000 | 10.00 | 2500 | 0.62 | 20.0 MiB | 95 |",
            "| `JOBGATE_PUBLISH_CHANNELS=4` | ingress closed loop | 3300 | 3000 | +10% | 0 | - | - |",
            "| slow downstream: jobs/s over the ideal | x1: 0.95, x2: 0.88, x4: 0.75 |",
            "| slow downstream: scaling over consumer counts | 1.00 -> 1.84 -> 3.16 |",
            "### Replicas on a slow downstream",
            "\n### Scheduled jobs\n\n",
            "\n| start - due p50 ms | p99 ms | max ms | early |\n|---|---|---|---|\n| 480 | 990 | 1010 | 0 |\n",
            "3000 jobs, each POSTed by the `http` handler to a local endpoint that answers after 20 ms",
            "| 4 | 8 | - | 2.50 | 1200 | 1600 | 0.75 | 3.16 |",
            "## How to run",
            "channels help.",
        ] {
            assert!(md.contains(expected), "missing {expected:?} in:\n{md}");
        }
        // The analysis comes last, after the generated part.
        assert!(md.find("## How to run") < md.find("## Analysis"));
        assert!(!render_markdown(&sample(), None).contains("## Analysis"));
    }

    #[test]
    fn cluster_figures_stand_beside_the_single_node_ones() {
        let md = render_markdown(&with_cluster(0.5), None);
        for expected in [
            "## Single node and three-node cluster",
            "| backend | measured | single node | 3-node cluster | cluster / single |",
            "| RabbitMQ | raw publish, ok/s | 6000 | 3000 | 0.50 |",
            "| RabbitMQ | HTTP ingress, closed loop, ok/s | 3000 | 1500 | 0.50 |",
            "| RabbitMQ | HTTP ingress, closed loop, p99 ms | 7.50 | 7.50 | 1.00 |",
            "| RabbitMQ | HTTP ingress / raw publish | 0.50 | 0.50 | 1.00 |",
            "| RabbitMQ | drain by 2 `consumer` process(es), jobs/s | 1800 | 900 | 0.50 |",
            "- first failure of *RabbitMQ cluster ingress closed loop*: `503 overloaded`",
            "| RabbitMQ | slow downstream, 1 process(es), jobs/s | 380 | 190 | 0.50 |",
        ] {
            assert!(md.contains(expected), "missing {expected:?} in:\n{md}");
        }
        // Only the consumer counts measured on both sites have a row.
        assert!(!md.contains("| RabbitMQ | drain by 4"));
        assert!(md.find("## Single node and three-node cluster") < md.find("## How to run"));
        assert!(!render_markdown(&sample(), None).contains("## Single node and three-node cluster"));
    }

    #[test]
    fn a_report_read_back_from_its_json_renders_the_same() {
        for report in [sample(), with_cluster(0.7)] {
            let json = serde_json::to_string(&report).unwrap();
            let back: Report = serde_json::from_str(&json).unwrap();
            assert_eq!(render_markdown(&back, None), render_markdown(&report, None));
        }
        // A run without `--cluster` writes no `clusters`, as results written before it
        // existed: they still read.
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(!json.contains("clusters"), "{json}");
        let back: Report = serde_json::from_str(&json).unwrap();
        assert!(back.clusters.is_empty());
    }

    #[test]
    fn missing_measurements_show_as_not_available() {
        assert_eq!(show_ratio(None), "n/a");
        assert_eq!(show_change(5.0, 0.0), "n/a");
        assert_eq!(show_change(90.0, 100.0), "-10%");
    }
}
