//! Issue 15's yardstick for the RabbitMQ ingress: the plain Go service of
//! `bench/go-baseline` (net/http and amqp091-go, confirms on 4 channels), on a queue of
//! its own, under the ingress's loads: the same closed loop, then an open loop at the
//! ingress open loop's rate, so that throughput, latency and CPU per request compare.

use anyhow::Result;

use super::{require_clean, say, show, show_open, with_cpu, Bench};
use crate::load::{closed_loop, open_loop};
use crate::procs::{free_port, wait_ready};
use crate::report::GoBaseline;

/// Confirm channels of the Go service, as in the comparison.
const CHANNELS: u16 = 4;

impl Bench<'_> {
    /// `None` on Kafka, on a cluster, and when no Go baseline was given (`--go-baseline`).
    pub(super) async fn go_baseline(&self, open_rate: f64) -> Result<Option<GoBaseline>> {
        if self.backend != "rabbitmq" {
            return Ok(None);
        }
        let Some(program) = &self.args.go_baseline else {
            say("  Go baseline: not measured (no --go-baseline, or a cluster run)");
            return Ok(None);
        };
        say(format!(
            "{}: Go baseline (net/http + amqp091-go, {CHANNELS} confirm channels)",
            self.backend
        ));
        let q = self.queue("go-baseline");
        self.create(&q).await?;
        let port = free_port()?;
        let mut service = self.bins.spawn_program(
            program,
            &format!("{}-go-baseline", self.backend),
            &[
                ("LISTEN", format!("127.0.0.1:{port}")),
                ("AMQP_URL", self.args.amqp_url.clone()),
                ("QUEUE", q.clone()),
                ("CHANNELS", CHANNELS.to_string()),
            ],
        )?;
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&self.http, &base, &mut service).await?;
        let clients = self.args.in_flight as usize;
        let closed = with_cpu(&service, self.post_op(&base), |op| {
            closed_loop(clients, self.timed(self.duration), op)
        })
        .await?;
        say(format!(
            "  Go closed loop, {clients} clients: {}",
            show(&closed)
        ));
        require_clean("Go baseline closed loop", &closed)?;
        let open = with_cpu(&service, self.post_op(&base), |op| {
            open_loop(open_rate, self.duration, 20_000, op)
        })
        .await?;
        say(format!(
            "  Go open loop at {open_rate:.0}/s: {}",
            show_open(&open)
        ));
        let peak_rss_kib = self.stop_serving(service, &q).await?;
        Ok(Some(GoBaseline {
            closed,
            open,
            peak_rss_kib,
        }))
    }
}
