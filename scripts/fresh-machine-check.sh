#!/usr/bin/env bash
# Rehearses a new user's (and CI's) first run: removes what jobgate installs and caches
# on this machine, clones the repository afresh into a temporary folder and runs
# `bash .ci/run` there twice in a row, the way CI runs it. Prints the time of each run
# and exits non-zero if either fails.
#
#   scripts/fresh-machine-check.sh
#
# What it removes first (needs root, like the brokers' install):
#   - the running brokers (scripts/brokers.sh down all, the loopback clusters, then any
#     epmd left behind);
#   - jobgate's Debian packages (rabbitmq-server, redis-server, chromium,
#     chromium-driver) with everything apt
#     installed only for them (Erlang, ...), their data and config, and apt's package
#     lists (a new machine may have none);
#   - ~/.cache/jobgate (Kafka jars, jobgate's Maven repository, the readiness probe) and
#     ~/.local/state/jobgate (broker data and logs).
# What it keeps: the Rust toolchain, Cargo's registry, and one build folder shared by
# both runs (JOBGATE_REHEARSAL_TARGET, default ~/.cache/jobgate-rehearsal-target): the
# risk rehearsed is the brokers' set-up, not the compiler.
#
# Run 1 starts from the purged machine. Between the runs the brokers are stopped, so
# run 2 starts as CI does on a machine that already has the packages: nothing running.
# It rehearses the last COMMIT of this checkout (uncommitted changes are not in it).
set -euo pipefail

readonly PROG="scripts/fresh-machine-check.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
# scripts/brokers.sh installs the first two, scripts/browser.sh (the console's browser
# tests) the other two.
readonly PACKAGES=(rabbitmq-server redis-server chromium chromium-driver)
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/jobgate"
STATE_ROOT="${JOBGATE_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/jobgate}"
TARGET_DIR="${JOBGATE_REHEARSAL_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/jobgate-rehearsal-target}"

log() { printf 'fresh-machine-check: %s\n' "$*"; }
die() { printf 'fresh-machine-check: ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# stop_brokers [CHECKOUT]: whatever the scripts/brokers.sh of CHECKOUT (default: this
# one) started, the loopback clusters too (a test or bench that died may have left one
# up), and the Erlang port mapper that `rabbitmqctl stop` leaves running.
stop_brokers() {
  local brokers="${1:-$ROOT}/scripts/brokers.sh" target
  for target in all rabbitmq-cluster kafka-cluster; do
    bash "$brokers" down "$target" >/dev/null || log "brokers.sh down $target failed; going on"
  done
  if pgrep -x epmd >/dev/null 2>&1; then
    as_root pkill -x epmd || true
  fi
}

# purge_packages: jobgate's packages and their now-unneeded dependencies, data, config.
purge_packages() {
  local -a installed=() p
  for p in "${PACKAGES[@]}"; do
    if dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^[ir]'; then
      installed+=("$p")
    fi
  done
  if ((${#installed[@]})); then
    log "purging ${installed[*]} and what was installed only for them"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
      purge --autoremove "${installed[@]}" >/dev/null
  fi
  as_root rm -rf /var/lib/rabbitmq /var/log/rabbitmq /etc/rabbitmq /var/lib/redis /etc/redis \
    /etc/security/limits.d/jobgate-rabbitmq.conf
  # A new machine may have no package lists at all.
  as_root find /var/lib/apt/lists -maxdepth 1 -type f ! -name lock -delete
}

purge_caches() {
  log "removing $CACHE_ROOT and $STATE_ROOT"
  rm -rf "$CACHE_ROOT" "$STATE_ROOT"
}

# check_purged: nothing of jobgate's is left that would make run 1 easier than a new
# machine's.
check_purged() {
  local p
  for p in "${PACKAGES[@]}" erlang-base; do
    if dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii'; then
      die "$p is still installed after the purge"
    fi
  done
  [[ ! -e $CACHE_ROOT && ! -e $STATE_ROOT ]] || die "caches still present"
  for port in 5672 15672 9092 9093 6379; do
    if timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
      die "something still listens on 127.0.0.1:$port"
    fi
  done
}

# clone_fresh DIR: a fresh clone of this checkout's HEAD into DIR.
clone_fresh() {
  local dir=$1
  if [[ -n $(git -C "$ROOT" status --porcelain) ]]; then
    log "note: uncommitted changes in $ROOT are NOT part of the rehearsal"
  fi
  git clone -q --no-local "$ROOT" "$dir"
  git -C "$dir" checkout -q "$(git -C "$ROOT" rev-parse HEAD)"
  log "cloned $(git -C "$dir" log -1 --format='%h %s') into $dir"
}

# ci_run DIR N: `bash .ci/run` in DIR as CI runs it; log in DIR/../ci-run-N.log.
ci_run() {
  local dir=$1 n=$2 t0=$SECONDS rc=0 out
  out="$(dirname "$dir")/ci-run-$n.log"
  log "run $n: bash .ci/run (log: $out)"
  (cd "$dir" && CI=true CARGO_TARGET_DIR="$TARGET_DIR" bash .ci/run </dev/null >"$out" 2>&1) || rc=$?
  RUN_SECONDS[n]=$((SECONDS - t0))
  RUN_RC[n]=$rc
  if [[ $rc -eq 0 ]]; then
    log "run $n: passed in ${RUN_SECONDS[n]}s"
  else
    log "run $n: FAILED (exit $rc) after ${RUN_SECONDS[n]}s; last lines of $out:"
    tail -n 60 "$out" >&2
  fi
  grep -E '^test result:' "$out" | sed "s/^/fresh-machine-check: run $n: /" || true
}

main() {
  [[ $# -eq 0 ]] || die "usage: $PROG (no arguments)"
  local work
  work=$(mktemp -d /tmp/jobgate-fresh.XXXXXX)
  declare -ga RUN_SECONDS=() RUN_RC=()

  stop_brokers
  purge_packages
  purge_caches
  check_purged
  clone_fresh "$work/jobgate"

  ci_run "$work/jobgate" 1
  stop_brokers "$work/jobgate"
  ci_run "$work/jobgate" 2

  log "summary: run 1 (purged machine) exit ${RUN_RC[1]} in ${RUN_SECONDS[1]}s; run 2 (packages kept, brokers stopped) exit ${RUN_RC[2]} in ${RUN_SECONDS[2]}s; logs in $work"
  if [[ ${RUN_RC[1]} -ne 0 || ${RUN_RC[2]} -ne 0 ]]; then
    die "the rehearsal failed"
  fi
  log "PASSED: two runs of .ci/run in a row from a purged machine"
}

main "$@"
