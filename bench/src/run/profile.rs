//! `--profile SECONDS`: where the producer's CPU goes under the closed-loop ingress
//! load. `perf record` (Debian's linux-perf; the `cpu-clock` software event, which
//! works in VMs without hardware counters; call graphs unwound from DWARF, since
//! release builds keep no frame pointers) samples the release `producer` for SECONDS
//! while the bench's clients post; `scripts/bench.sh --profile` turns the recording
//! into a flame graph and a table of the hottest functions under `bench/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{say, show, Bench, STOP_GRACE};
use crate::load::{closed_loop, Budget};
use crate::report::Phase;

/// Samples a second per CPU: enough for a profile of a few seconds, cheap enough not to
/// change what it measures much.
const FREQUENCY: &str = "499";

/// What a profile run measured besides the recording.
pub(super) struct Profiled {
    pub phase: Phase,
    /// The producer's CPU time per accepted request while it was recorded.
    pub cpu_us_per_request: f64,
    pub perf_data: PathBuf,
}

impl Profiled {
    pub(super) fn line(&self, backend: &str) -> String {
        format!(
            "{backend}: ingress {} while recorded; producer CPU {:.1} µs per 202; recording {}",
            show(&self.phase),
            self.cpu_us_per_request,
            self.perf_data.display()
        )
    }
}

/// `perf record` of process `pid` for `seconds`, into `out`.
async fn record(pid: u32, seconds: Duration, out: &Path) -> Result<()> {
    let out = out.to_owned();
    let secs = format!("{:.1}", seconds.as_secs_f64());
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", FREQUENCY])
            .args(["--call-graph", "dwarf,8192", "-p", &pid.to_string(), "-o"])
            .arg(&out)
            .args(["--", "sleep", &secs])
            .stdin(std::process::Stdio::null())
            .status()
    })
    .await
    .context("joining perf")?
    .context("running perf (Debian's linux-perf; scripts/bench.sh --profile installs it)")?;
    if !status.success() {
        bail!("perf record failed ({status})");
    }
    Ok(())
}

impl Bench<'_> {
    /// A producer warmed up for the warm-up time, then recorded for `seconds` under the
    /// same closed loop as the main ingress phase; the recording goes to `dir`.
    pub(super) async fn profile(&self, seconds: Duration, dir: &Path) -> Result<Profiled> {
        let q = self.queue("profile");
        self.create(&q).await?;
        let (mut producer, base) = self.start_producer(&q, "profile", &[]).await?;
        let clients = self.args.in_flight as usize;
        let warm = Budget::Time {
            warmup: Duration::ZERO,
            measure: self.warmup,
        };
        closed_loop(clients, warm, self.post_op(&base)).await;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let perf_data = dir.join(format!("{}.perf.data", self.backend));
        let cpu_before = producer.cpu_seconds()?;
        let measured = Budget::Time {
            warmup: Duration::ZERO,
            measure: seconds,
        };
        let (phase, recorded) = tokio::join!(
            closed_loop(clients, measured, self.post_op(&base)),
            record(producer.pid(), seconds, &perf_data),
        );
        let cpu = producer.cpu_seconds()? - cpu_before;
        producer.check_alive()?;
        producer.stop(STOP_GRACE).await?;
        self.drop_queue(&q).await?;
        recorded?;
        say(format!("  recorded: {}", show(&phase)));
        Ok(Profiled {
            cpu_us_per_request: cpu * 1e6 / phase.ok.max(1) as f64,
            phase,
            perf_data,
        })
    }
}
