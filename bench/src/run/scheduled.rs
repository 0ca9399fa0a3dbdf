//! Scheduled jobs (issue 16): how late a job with `Jobgate-Not-Before` starts. One
//! `consumer` with the default delay tiers (1 s to 60 s) and the `http` handler, which
//! POSTs each job to a local endpoint that notes when it arrived; [`JOBS`] jobs are
//! posted with due times spread over [`SPREAD`], each an exact RFC 3339 time (ms), so
//! the lateness of each is its arrival at the endpoint minus its due time. A job that
//! arrives before its time is counted as early (jobgate promises none).
//!
//! Also runnable alone: `bench --scheduled-only` (a minute or so per backend).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use tokio::task::JoinHandle;

use super::{forget, push, say, Bench, Broker, STOP_GRACE};
use crate::rabbit;
use crate::report::Lateness;

/// Scheduled jobs per backend.
const JOBS: u64 = 200;
/// Due times from 1 s to this long after they are posted.
const SPREAD: Duration = Duration::from_secs(15);
/// The consumer's default tiers (`JOBGATE_RETRY_BASE_MS` .. `JOBGATE_RETRY_MAX_MS`).
const TIERS: [u64; 7] = [1, 2, 4, 8, 16, 32, 60];
/// How long after the last due time every job must have arrived.
const LIMIT: Duration = Duration::from_secs(60);

/// An HTTP endpoint on loopback that notes when each job (`Job-Id`) first arrived.
struct Arrivals {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<HashMap<String, SystemTime>>>,
    server: JoinHandle<()>,
}

impl Arrivals {
    async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the arrivals endpoint")?;
        let addr = listener.local_addr()?;
        let seen: Arc<Mutex<HashMap<String, SystemTime>>> = Arc::default();
        let noted = Arc::clone(&seen);
        let app = axum::Router::new().route(
            "/job",
            axum::routing::post(move |headers: axum::http::HeaderMap| async move {
                let now = SystemTime::now();
                let id = headers
                    .get("Job-Id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let mut seen = noted.lock().unwrap_or_else(|e| e.into_inner());
                seen.entry(id).or_insert(now);
                "done"
            }),
        );
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("bench: warning: the arrivals endpoint stopped: {error}");
            }
        });
        Ok(Self { addr, seen, server })
    }

    fn arrived(&self, id: &str) -> Option<SystemTime> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(id).copied()
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Lateness in ms (negative: early) of jobs `due` that `arrived`.
pub(super) fn lateness(pairs: &[(SystemTime, SystemTime)]) -> Lateness {
    let mut late_ms: Vec<u64> = Vec::new();
    let mut early = 0;
    for (due, arrived) in pairs {
        match arrived.duration_since(*due) {
            Ok(late) => late_ms.push(u64::try_from(late.as_millis()).unwrap_or(u64::MAX)),
            Err(_) => early += 1,
        }
    }
    late_ms.sort_unstable();
    let at = |p: f64| crate::stats::percentile(&late_ms, p).unwrap_or(0);
    Lateness {
        jobs: pairs.len() as u64,
        early,
        p50_ms: at(50.0),
        p99_ms: at(99.0),
        max_ms: at(100.0),
    }
}

impl Bench<'_> {
    /// Every name the consumer's default tiers make for `queue`, for deletion.
    fn scheduled_names(queue: &str) -> Vec<String> {
        let mut names: Vec<String> = TIERS
            .iter()
            .flat_map(|s| rabbit::all_queues(queue, Duration::from_secs(*s)))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    pub(super) async fn scheduled(&self) -> Result<Lateness> {
        let q = self.queue("scheduled");
        self.create(&q).await?;
        let names = Self::scheduled_names(&q);
        match &self.broker {
            Broker::Rabbit(_) => push(&self.leftovers.rabbit, names.clone()),
            Broker::Kafka(_) => push(&self.leftovers.kafka_topics, names.clone()),
        }
        let arrivals = Arrivals::start().await?;
        let (mut producer, base) = self.start_producer(&q, "scheduled", &[]).await?;
        let mut env = self.broker_env();
        env.extend([
            ("JOBGATE_QUEUE", q.clone()),
            ("JOBGATE_HANDLER", "http".to_owned()),
            ("JOBGATE_HTTP_URL", format!("http://{}/job", arrivals.addr)),
            ("JOBGATE_KAFKA_GROUP", "{queue}.group".to_owned()),
            ("JOBGATE_SHUTDOWN_GRACE_MS", "5000".to_owned()),
        ]);
        let mut consumer = self.bins.spawn(
            "consumer",
            &format!("{}-consumer-scheduled", self.backend),
            &env,
        )?;
        self.wait_settled(&q, 1, std::slice::from_mut(&mut consumer))
            .await?;

        let url = format!("{base}/jobs/{q}");
        let mut due_of: Vec<(String, SystemTime)> = Vec::new();
        let step = SPREAD.saturating_sub(Duration::from_secs(1)) / u32::try_from(JOBS).unwrap_or(1);
        for i in 0..u32::try_from(JOBS).unwrap_or(0) {
            let due = SystemTime::now() + Duration::from_secs(1) + step * i;
            let at = humantime::format_rfc3339_millis(due).to_string();
            let answer = self
                .http
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("Jobgate-Not-Before", &at)
                .body(super::BODY)
                .send()
                .await
                .context("POST a scheduled job")?;
            if answer.status() != reqwest::StatusCode::ACCEPTED {
                bail!("scheduled job: HTTP {}", answer.status());
            }
            let json: serde_json::Value = answer.json().await.context("202 body")?;
            let id = json["job_id"].as_str().unwrap_or_default().to_owned();
            // The due time as the producer wrote it: ms since the epoch.
            due_of.push((id, humantime::parse_rfc3339(&at).unwrap_or(due)));
        }
        let last_due = due_of
            .iter()
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_else(SystemTime::now);
        let begun = Instant::now();
        let pairs = loop {
            consumer.check_alive()?;
            producer.check_alive()?;
            let pairs: Vec<(SystemTime, SystemTime)> = due_of
                .iter()
                .filter_map(|(id, due)| arrivals.arrived(id).map(|a| (*due, a)))
                .collect();
            if pairs.len() == due_of.len() {
                break pairs;
            }
            let overdue = SystemTime::now()
                .duration_since(last_due)
                .unwrap_or_default();
            if overdue > LIMIT || begun.elapsed() > SPREAD + LIMIT * 2 {
                bail!(
                    "{} of {JOBS} scheduled jobs arrived {LIMIT:?} after the last was due",
                    pairs.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        consumer.stop(STOP_GRACE).await?;
        producer.stop(STOP_GRACE).await?;
        // The queue, its dead-letter queue and every tier the consumer declared.
        match &self.broker {
            Broker::Rabbit(r) => {
                r.delete(&names).await?;
                forget(&self.leftovers.rabbit, &names);
            }
            Broker::Kafka(k) => {
                let g = Self::group(&q);
                let groups = [format!("{g}.retry"), g];
                k.delete(&names, &groups).await?;
                forget(&self.leftovers.kafka_topics, &names);
                forget(&self.leftovers.kafka_groups, &groups);
            }
        }
        let measured = lateness(&pairs);
        say(format!(
            "  scheduled jobs: lateness p50 {} ms, p99 {} ms, max {} ms, {} early of {}",
            measured.p50_ms, measured.p99_ms, measured.max_ms, measured.early, measured.jobs
        ));
        Ok(measured)
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn lateness_counts_early_jobs_apart_and_takes_percentiles_of_the_rest() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let pairs: Vec<_> = (0..100)
            .map(|i| (at(10_000), at(10_000 + i * 10)))
            .chain([(at(10_000), at(9_000))])
            .collect();
        let l = lateness(&pairs);
        assert_eq!((l.jobs, l.early), (101, 1));
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (490, 980, 990));
    }
}
