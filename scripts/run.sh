#!/usr/bin/env bash
# Runs the whole system on this machine without Docker: the broker (scripts/brokers.sh;
# RabbitMQ, or Kafka with JOBGATE_BACKEND=kafka), Redis for job status (unless
# JOBGATE_REDIS_URL names a Redis of your own), one producer on :8080 and
# JOBGATE_CONSUMERS consumer processes (default 3), all in the foreground. Ctrl-C (or SIGTERM) stops jobgate gracefully; the brokers keep running
# (`scripts/brokers.sh down` stops them). Every JOBGATE_* variable is passed through.
set -euo pipefail
cd "$(dirname "$0")/.."

consumers="${JOBGATE_CONSUMERS:-3}"
case "${JOBGATE_BACKEND:-rabbitmq}" in
  kafka) bash scripts/brokers.sh up kafka ;;
  *) bash scripts/brokers.sh up rabbitmq ;;
esac
# Job status (GET/DELETE /jobs/{queue}/{id}) needs a store: Debian's Redis on
# 127.0.0.1:6379 (scripts/brokers.sh), unless one is named.
if [[ -z "${JOBGATE_REDIS_URL:-}" ]]; then
  bash scripts/brokers.sh up redis
  export JOBGATE_REDIS_URL="redis://127.0.0.1:${REDIS_PORT:-6379}"
fi
cargo build --release --bins

pids=()
stop() {
  trap - INT TERM
  echo "run: stopping jobgate (graceful)" >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  exit 0
}
trap stop INT TERM

./target/release/producer &
pids+=("$!")
for _ in $(seq 1 "$consumers"); do
  ./target/release/consumer &
  pids+=("$!")
done
echo "run: producer on ${JOBGATE_LISTEN:-0.0.0.0:8080}, $consumers consumer(s) on ${JOBGATE_BACKEND:-rabbitmq}; Ctrl-C to stop" >&2
wait -n "${pids[@]}" || true
stop
