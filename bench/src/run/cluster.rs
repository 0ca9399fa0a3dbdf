//! `--cluster`: the main phases of a backend again on its three-node loopback cluster
//! (`scripts/brokers.sh up rabbitmq-cluster` / `up kafka-cluster`), so BENCHMARKS.md
//! shows what replication costs beside the single node. The cluster is started for
//! its phases and stopped after them: three idle brokers would skew every other figure.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{benches, say, Leftovers};
use crate::report::BackendResults;
use crate::{Args, Which};

/// Runs `scripts/brokers.sh ARGS`, its output going to the bench's; returns its stdout
/// when `capture` (for `env`).
async fn brokers_sh(root: &Path, args: &[&str], capture: bool) -> Result<String> {
    let script = root.join("scripts/brokers.sh");
    let owned: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let shown = format!("scripts/brokers.sh {}", owned.join(" "));
    let output = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new("bash");
        command
            .arg(&script)
            .args(&owned)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        if !capture {
            command.stdout(std::process::Stdio::inherit());
        }
        command.output()
    })
    .await
    .context("joining the brokers.sh task")?
    .with_context(|| format!("running {shown}"))?;
    if !output.status.success() {
        bail!("{shown} failed ({})", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The value of `name` among the `NAME=value` lines of `brokers.sh env`.
fn setting(env: &str, name: &str) -> Option<String> {
    env.lines()
        .filter_map(|line| line.split_once('='))
        .find(|(key, _)| key.trim() == name)
        .map(|(_, value)| value.trim().to_owned())
}

/// `args` pointed at the cluster whose `brokers.sh env` printed `env`, for `backend`
/// alone, without the knob variants (they are a single-node study).
fn cluster_args(args: &Args, backend: &str, env: &str) -> Result<Args> {
    let mut on_cluster = args.clone();
    on_cluster.no_knobs = true;
    on_cluster.cluster = false;
    on_cluster.jobs = Some(args.cluster_jobs);
    // The Go baseline is a yardstick for the single node's ingress only.
    on_cluster.go_baseline = None;
    match backend {
        "rabbitmq" => {
            on_cluster.backend = Which::Rabbitmq;
            on_cluster.amqp_url = setting(env, "JOBGATE_AMQP_URL")
                .context("brokers.sh env rabbitmq-cluster printed no JOBGATE_AMQP_URL")?;
        }
        _ => {
            on_cluster.backend = Which::Kafka;
            on_cluster.kafka_brokers = setting(env, "JOBGATE_KAFKA_BROKERS")
                .context("brokers.sh env kafka-cluster printed no JOBGATE_KAFKA_BROKERS")?;
        }
    }
    Ok(on_cluster)
}

/// Starts `backend`'s cluster, measures the main phases on it, deletes the bench's
/// queues or topics and stops the cluster again, also when a phase failed.
pub async fn measure_on_cluster(
    args: &Args,
    root: &Path,
    backend: &'static str,
) -> Result<BackendResults> {
    let cluster = format!("{backend}-cluster");
    say(format!("{backend}: the same phases on {cluster}"));
    brokers_sh(root, &["up", &cluster], false).await?;
    let env = brokers_sh(root, &["env", &cluster], true).await;
    let on_cluster = env.and_then(|env| cluster_args(args, backend, &env));
    let measured = match &on_cluster {
        Ok(on_cluster) => {
            let leftovers = Leftovers::default();
            let measured = async {
                let mut results = Vec::new();
                for bench in benches(on_cluster, root, &leftovers).await? {
                    let measured = bench.measure().await;
                    bench.close().await;
                    results.push(measured?);
                }
                results.pop().context("no backend measured")
            }
            .await;
            leftovers.clean(on_cluster).await;
            measured
        }
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    };
    if let Err(e) = brokers_sh(root, &["down", &cluster], false).await {
        eprintln!("bench: warning: stopping {cluster}: {e:#}");
    }
    measured.with_context(|| format!("{backend} phases on {cluster}"))
}

/// Stops both clusters (each a no-op when it is down): after a run cut short.
pub async fn stop_clusters(root: &Path) {
    for cluster in ["rabbitmq-cluster", "kafka-cluster"] {
        if let Err(e) = brokers_sh(root, &["down", cluster], false).await {
            eprintln!("bench: warning: stopping {cluster}: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn the_cluster_run_takes_the_urls_brokers_sh_env_prints_and_skips_the_knobs() {
        let args = Args::parse_from(["bench", "--cluster", "--backend", "all"]);
        let env =
            "JOBGATE_BACKEND=rabbitmq\nJOBGATE_AMQP_URL=amqp://a:5681/%2f,amqp://b:5682/%2f\n";
        let on = cluster_args(&args, "rabbitmq", env).unwrap();
        assert_eq!(on.amqp_url, "amqp://a:5681/%2f,amqp://b:5682/%2f");
        assert_eq!(on.backend, Which::Rabbitmq);
        assert!(on.no_knobs && !on.cluster);
        assert_eq!(on.jobs, Some(20_000), "the cluster's own backlog");
        assert_eq!(on.kafka_brokers, args.kafka_brokers, "Kafka untouched");

        let env = "JOBGATE_BACKEND=kafka\nJOBGATE_KAFKA_BROKERS=127.0.0.1:9192,127.0.0.1:9292\n";
        let on = cluster_args(&args, "kafka", env).unwrap();
        assert_eq!(on.kafka_brokers, "127.0.0.1:9192,127.0.0.1:9292");
        assert_eq!(on.backend, Which::Kafka);

        let err = cluster_args(&args, "kafka", "JOBGATE_BACKEND=kafka\n").unwrap_err();
        assert!(err.to_string().contains("JOBGATE_KAFKA_BROKERS"), "{err}");
    }
}
