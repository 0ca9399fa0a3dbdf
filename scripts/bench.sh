#!/usr/bin/env bash
# Benchmark jobgate against the raw broker clients; writes BENCHMARKS.md and
# bench/results.json.
#
#   scripts/bench.sh [bench options]     e.g. --backend rabbitmq --duration 5 --jobs 10000
#   scripts/bench.sh --cluster           also on the three-node clusters, beside the single node
#
# Brings RabbitMQ and Kafka up (scripts/brokers.sh, reused when already up), builds the
# release `producer`, `consumer` and `bench` binaries, and runs target/release/bench with
# the options given (`target/release/bench --help` lists them). A few minutes for both
# backends with the defaults. With --cluster the bench itself starts each backend's
# cluster (scripts/brokers.sh up rabbitmq-cluster / up kafka-cluster) after the
# single-node phases and stops it after its own. Run it on a quiet machine: other work skews every figure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { printf 'bench.sh: ERROR: %s\n' "$*" >&2; exit 1; }

backend=all
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --backend) backend=${args[i + 1]:-} ;;
    --backend=*) backend=${args[i]#--backend=} ;;
    -h | --help) backend=none ;;
  esac
done

case $backend in
  all) brokers=(rabbitmq kafka) ;;
  rabbitmq | kafka) brokers=("$backend") ;;
  none) brokers=() ;;
  *) die "unknown --backend '$backend' (rabbitmq, kafka or all)" ;;
esac

for b in "${brokers[@]}"; do
  bash scripts/brokers.sh up "$b" || die "could not bring $b up (see scripts/brokers.sh status)"
done

cargo build --release -p producer -p consumer -p jobgate-bench ||
  die "release build failed"

exec target/release/bench "$@"
