//! Replicas on a slow downstream: what users scale consumer processes for. A local
//! HTTP endpoint takes a set time per job (the `http` handler POSTs each job to it);
//! 1, 2, 4 `consumer` processes drain the same backlog through it, and each count's
//! rate is set against the ideal `processes × concurrency / job time`. The processes
//! start before the backlog is published, and the clock starts once they all consume
//! (on Kafka: their group stable, every partition owned) and the bench's publisher has
//! sent the first job: the rate is what running replicas do; how long they took to
//! settle is reported beside it. (Until 2026-12-04 the clock also ran while the bench's
//! Kafka publisher connected, 0.6 s in which no job existed: a third of a 4-process
//! drain of 3 000 jobs.) Replicas run for
//! days, so a few seconds of rebalancing at start would otherwise dominate a backlog
//! that takes seconds to drain.
//!
//! The clock stops when the downstream has answered every job once (not when the
//! broker says nothing waits): a Kafka group commits its offsets once a second, so its
//! lag reaches zero up to a second after the last job is done, which on a drain of a
//! few seconds is a large share of it; RabbitMQ's ready count reaches zero when the
//! last jobs are delivered, before they are done. The downstream sees both alike.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::task::JoinHandle;

use super::{say, Bench, Done, Start, Timing};
use crate::report::Scaling;

/// An HTTP server on loopback that answers every `POST /job` 200 after `job_time`,
/// with no limit on concurrent requests: the consumers' concurrency is the only bound.
/// It notes which jobs it answered, per queue (the `http` handler's `Job-Queue` and
/// `Job-Id` headers).
pub struct SlowDownstream {
    pub addr: SocketAddr,
    answered: Arc<Mutex<HashMap<String, Answered>>>,
    server: JoinHandle<()>,
}

/// The jobs of one queue the downstream answered.
#[derive(Debug, Default)]
struct Answered {
    ids: HashSet<String>,
    /// When the last job not answered before was.
    last: Option<Instant>,
}

impl SlowDownstream {
    pub async fn start(job_time: Duration) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the slow downstream")?;
        let addr = listener.local_addr()?;
        let answered: Arc<Mutex<HashMap<String, Answered>>> = Arc::default();
        let noted = Arc::clone(&answered);
        let app = axum::Router::new().route(
            "/job",
            axum::routing::post(move |headers: axum::http::HeaderMap| async move {
                tokio::time::sleep(job_time).await;
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let mut answered = noted.lock().unwrap_or_else(|e| e.into_inner());
                let queue = answered.entry(header("Job-Queue")).or_default();
                if queue.ids.insert(header("Job-Id")) {
                    queue.last = Some(Instant::now());
                }
                "done"
            }),
        );
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("bench: warning: the slow downstream stopped: {error}");
            }
        });
        Ok(Self {
            addr,
            answered,
            server,
        })
    }

    /// How many distinct jobs of `queue` were answered, and when the last of them was.
    pub fn answered(&self, queue: &str) -> (u64, Option<Instant>) {
        let answered = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        answered
            .get(queue)
            .map_or((0, None), |a| (a.ids.len() as u64, a.last))
    }

    pub fn url(&self) -> String {
        format!("http://{}/job", self.addr)
    }
}

impl Drop for SlowDownstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Jobs per second that `consumers` processes of `concurrency` could reach if each job
/// took exactly `job_time` and nothing else cost anything.
pub fn ideal_per_sec(consumers: usize, concurrency: u16, job_time: Duration) -> f64 {
    let job_s = job_time.as_secs_f64();
    if job_s <= 0.0 {
        return 0.0;
    }
    consumers as f64 * f64::from(concurrency) / job_s
}

impl Bench<'_> {
    /// The backlog of `--downstream-jobs` drained through the slow downstream by each
    /// consumer count of `--consumers`.
    pub(super) async fn scaling(&self) -> Result<Vec<Scaling>> {
        let job_time = Duration::from_secs_f64(self.args.downstream_ms / 1000.0);
        let downstream = SlowDownstream::start(job_time).await?;
        let concurrency = self.args.consumer_concurrency;
        let jobs = self.args.downstream_jobs;
        let extra = [
            ("JOBGATE_HANDLER", "http".to_owned()),
            ("JOBGATE_HTTP_URL", downstream.url()),
        ];
        let mut runs = Vec::new();
        for &n in &self.args.consumers {
            let drain = self
                .drain_with(
                    n,
                    concurrency,
                    jobs,
                    "downstream",
                    &extra,
                    Timing {
                        start: Start::Warm,
                        done: Done::Answered(&downstream),
                    },
                )
                .await?;
            let ideal = ideal_per_sec(n, concurrency, job_time);
            say(format!(
                "  slow downstream ({:.0} ms a job), x{n}: {:.0} jobs/s of an ideal {ideal:.0}",
                self.args.downstream_ms, drain.phase.per_sec
            ));
            runs.push(Scaling {
                job_ms: self.args.downstream_ms,
                ideal_per_sec: ideal,
                drain,
            });
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ideal_is_processes_times_concurrency_over_the_job_time() {
        let job = Duration::from_millis(20);
        assert_eq!(ideal_per_sec(1, 8, job), 400.0);
        assert_eq!(ideal_per_sec(4, 8, job), 1600.0);
        assert_eq!(ideal_per_sec(4, 8, Duration::ZERO), 0.0);
    }

    #[tokio::test]
    async fn the_downstream_answers_200_once_the_job_time_passed() {
        let downstream = SlowDownstream::start(Duration::from_millis(200))
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let start = std::time::Instant::now();
        let posts = (0..4).map(|_| http.post(downstream.url()).body("{}").send());
        for answer in futures::future::join_all(posts).await {
            assert_eq!(answer.unwrap().status(), 200);
        }
        assert!(start.elapsed() >= Duration::from_millis(200));
    }
}
