#!/usr/bin/env bash
# Benchmark jobgate against the raw broker clients; writes BENCHMARKS.md and
# bench/results.json.
#
#   scripts/bench.sh [bench options]     e.g. --backend rabbitmq --duration 5 --jobs 10000
#   scripts/bench.sh --cluster           also on the three-node clusters, beside the single node
#
# With Go installed it also builds bench/go-baseline (net/http + amqp091-go) into
# target/release/go-baseline and measures it beside the RabbitMQ ingress.
#   scripts/bench.sh --profile 10        only a CPU profile of the producer under load:
#                                        bench/flamegraph-<backend>.svg, bench/profile-<backend>.txt
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
profile=false
go_given=false
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --backend) backend=${args[i + 1]:-} ;;
    --backend=*) backend=${args[i]#--backend=} ;;
    --profile | --profile=*) profile=true ;;
    --go-baseline | --go-baseline=*) go_given=true ;;
    -h | --help) backend=none profile=false ;;
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

if [[ $profile != true ]]; then
  # Issue 15's yardstick for the RabbitMQ ingress: the plain Go service of
  # bench/go-baseline (its module comes from the Go module proxy), measured beside it.
  go_args=()
  if [[ $go_given != true && " ${brokers[*]} " == *" rabbitmq "* ]]; then
    if command -v go >/dev/null 2>&1; then
      (cd bench/go-baseline && go build -o ../../target/release/go-baseline .) ||
        die "building the Go baseline (bench/go-baseline) failed"
      go_args=(--go-baseline target/release/go-baseline)
    else
      echo "bench.sh: no Go toolchain (go): the Go baseline is left out of the report" >&2
    fi
  fi
  exec target/release/bench "$@" "${go_args[@]}"
fi

# --profile: perf from Debian's linux-perf, the flame graph from inferno (crates.io).
as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
if ! command -v perf >/dev/null 2>&1; then
  echo "bench.sh: installing linux-perf (perf) from Debian's packages" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
    install --no-install-recommends linux-perf >/dev/null || die "could not install linux-perf"
fi
tools=target/tools
if [[ ! -x $tools/bin/inferno-flamegraph ]]; then
  echo "bench.sh: building inferno (flame graphs) from crates.io into $tools" >&2
  cargo install --quiet --locked --root "$tools" inferno || die "could not install inferno"
fi
rm -f target/profile/*.perf.data
target/release/bench "$@" || die "the profile run failed"
for data in target/profile/*.perf.data; do
  [[ -e $data ]] || die "the bench wrote no recording to target/profile"
  name=$(basename "$data" .perf.data)
  perf script -i "$data" 2>/dev/null | "$tools/bin/inferno-collapse-perf" >"target/profile/$name.folded" ||
    die "could not fold the stacks of $data"
  "$tools/bin/inferno-flamegraph" --title "jobgate producer under load ($name)" \
    <"target/profile/$name.folded" >"bench/flamegraph-$name.svg" || die "no flame graph for $name"
  {
    echo "# Hottest functions of the producer under load ($name), self time"
    echo "# perf report --no-children --sort symbol of $data (cpu-clock samples)"
    perf report -i "$data" --no-children -g none --sort symbol --stdio --percent-limit 0.5 2>/dev/null |
      grep -E '^ +[0-9.]+%' | sed -E 's/[ -]+$//' | head -60
  } >"bench/profile-$name.txt"
  echo "bench.sh: wrote bench/flamegraph-$name.svg and bench/profile-$name.txt" >&2
done
