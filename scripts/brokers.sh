#!/usr/bin/env bash
# Bring real RabbitMQ and Kafka brokers up on a Debian machine WITHOUT Docker.
#
#   scripts/brokers.sh up|down|status|restart|kill|install|pause|resume [rabbitmq|kafka|redis|all]   (default: all)
#
# `up` first installs every missing Debian package of the brokers asked for in ONE apt
# step, then starts them, and returns only when each is usable as jobgate uses it
# (Kafka: controller, partition leaders and the group coordinator; RabbitMQ: feature
# flags and a quorum queue round trip; Redis: a write), not merely listening.
#
# RabbitMQ: Debian's rabbitmq-server package (installed with apt-get on first use),
#           AMQP on 127.0.0.1:5672, management API on :15672 (guest/guest), prometheus :15692,
#           AMQPS (TLS) on 127.0.0.1:5671 (PLAIN, or EXTERNAL with the test client certificate).
# Kafka:    Apache Kafka from Maven Central jars (single combined KRaft node),
#           PLAINTEXT on 127.0.0.1:9092, controller on 127.0.0.1:9093,
#           SASL_SSL on 127.0.0.1:9094 (PLAIN, SCRAM-SHA-256/512; user jobgate),
#           SSL with required client certificates on 127.0.0.1:9095.
# TLS:      a test CA and certificates made with openssl on first use (scripts/lib/tls.sh).
# Redis:    Debian's redis-server package (installed with apt-get on first use), on
#           127.0.0.1:6379, no persistence (the idempotency store of several producers).
#
# Idempotent: a broker that already answers is checked, reused and left alone.
# See `scripts/brokers.sh help` for the environment variables.
set -euo pipefail

readonly PROG="scripts/brokers.sh"
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR

# ---------------------------------------------------------------- configuration
KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
KAFKA_FALLBACK_VERSION="${KAFKA_FALLBACK_VERSION:-4.1.0}"
LOG4J_VERSION="${LOG4J_VERSION:-2.24.3}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms512m -Xmx512m}"
KAFKA_HOST=127.0.0.1
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
# The TLS listeners of the TLS/SASL tests (tests/it/tls.rs uses the same values).
KAFKA_SASL_SSL_PORT="${KAFKA_SASL_SSL_PORT:-9094}"
KAFKA_SSL_PORT="${KAFKA_SSL_PORT:-9095}"
KAFKA_SASL_USER=jobgate
KAFKA_SASL_PASSWORD=jobgate-test-secret
RABBITMQ_HOST=127.0.0.1
RABBITMQ_PORT=5672
RABBITMQ_MGMT_PORT=15672
RABBITMQ_TLS_PORT=5671
RABBITMQ_TLS_CONF=/etc/rabbitmq/conf.d/90-jobgate-tls.conf
RABBITMQ_TLS_FILES=/etc/rabbitmq/jobgate-tls
RABBITMQ_TIMEOUT="${RABBITMQ_TIMEOUT:-90}"
RABBITMQ_NOFILE="${RABBITMQ_NOFILE:-65536}"
KAFKA_TIMEOUT="${KAFKA_TIMEOUT:-120}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/jobgate"
STATE_ROOT="${JOBGATE_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/jobgate}"
KAFKA_STATE="$STATE_ROOT/kafka"
KAFKA_DATA="$KAFKA_STATE/data"
KAFKA_LOGS="$KAFKA_STATE/logs"
KAFKA_CONFIG_DIR="$KAFKA_STATE/config"
KAFKA_PROPS="$KAFKA_CONFIG_DIR/server.properties"
KAFKA_LOG4J="$KAFKA_CONFIG_DIR/log4j2.properties"
KAFKA_PIDFILE="$KAFKA_STATE/kafka.pid"
KAFKA_CLUSTER_ID_FILE="$KAFKA_STATE/cluster.id"
KAFKA_SERVER_LOG="$KAFKA_LOGS/server.log"
KAFKA_STDOUT="$KAFKA_LOGS/kafka.out"
RABBITMQ_STATE="$STATE_ROOT/rabbitmq"
REDIS_HOST=127.0.0.1
REDIS_PORT="${REDIS_PORT:-6379}"
REDIS_TIMEOUT="${REDIS_TIMEOUT:-30}"
REDIS_STATE="$STATE_ROOT/redis"

# shellcheck source=lib/tls.sh
source "$SCRIPT_DIR/lib/tls.sh"
# shellcheck source=lib/cluster.sh
source "$SCRIPT_DIR/lib/cluster.sh"

# ---------------------------------------------------------------- helpers
log()  { printf 'brokers: %s\n' "$*"; }
warn() { printf 'brokers: WARNING: %s\n' "$*" >&2; }
err()  { printf 'brokers: ERROR: %s\n' "$*" >&2; }
die()  { err "$@"; exit 1; }

usage() {
  cat <<EOF
usage: $PROG up|down|status|restart|kill|install|pause|resume|env [TARGET]   (default: all)

TARGET: all (rabbitmq, kafka, redis), rabbitmq, kafka, redis; the loopback clusters
rabbitmq-cluster and kafka-cluster (three nodes each, scripts/lib/cluster.sh); one node
of them: rabbitmq-1..3, kafka-1..3.

  up       start the broker(s) (install/fetch on first use) and wait until each is usable;
           reuse one already answering (after the same usability check)
  install  install the Debian packages the broker(s) need (one apt-get step), start nothing
  down     stop the broker(s) (SIGTERM for Kafka, 'rabbitmqctl stop' for RabbitMQ)
  status   print up/down per broker; exit 0 if all requested are up, 1 otherwise
  restart  down, then up
  kill     SIGKILL the broker(s) immediately (crash tests); data survives
  pause    SIGSTOP the broker (rabbitmq or kafka): frozen, its sockets stay open
  resume   SIGCONT a paused broker
  env      print the JOBGATE_* settings that point both binaries at TARGET, NAME=value a line

RabbitMQ: amqp://guest:guest@127.0.0.1:5672  management http://127.0.0.1:15672 (guest/guest)
          amqps://guest:guest@127.0.0.1:$RABBITMQ_TLS_PORT (TLS; CA $TLS_DIR/ca.pem)
Kafka:    127.0.0.1:$KAFKA_PORT (PLAINTEXT), KRaft controller 127.0.0.1:$KAFKA_CONTROLLER_PORT
          127.0.0.1:$KAFKA_SASL_SSL_PORT (SASL_SSL: PLAIN/SCRAM-SHA-256/512, $KAFKA_SASL_USER/$KAFKA_SASL_PASSWORD)
          127.0.0.1:$KAFKA_SSL_PORT (SSL, client certificate $TLS_DIR/client.pem required)
Redis:    redis://127.0.0.1:$REDIS_PORT (no persistence)
rabbitmq-cluster: nodes jobgate-1..3@localhost, AMQP 127.0.0.1:5681..5683, management :15681..15683
kafka-cluster:    127.0.0.1:9192,127.0.0.1:9292,127.0.0.1:9392 (KRaft, three voters)

environment:
  KAFKA_VERSION           Kafka version from Maven Central (default 4.1.1)
  KAFKA_FALLBACK_VERSION  tried when KAFKA_VERSION does not resolve (default 4.1.0)
  KAFKA_HEAP_OPTS         JVM heap options (default "-Xms512m -Xmx512m")
  RABBITMQ_TIMEOUT / KAFKA_TIMEOUT / REDIS_TIMEOUT   readiness timeouts in seconds (90 / 120 / 30)
  REDIS_PORT              Redis port (default 6379)
  JOBGATE_STATE_DIR       state root (default \${XDG_STATE_HOME:-~/.local/state}/jobgate)
  XDG_CACHE_HOME          jar cache root (jars in \${XDG_CACHE_HOME:-~/.cache}/jobgate/kafka-VERSION/libs)
EOF
}

# Run a command as root: directly when root, via sudo when available. Fd 9 (the
# lock held by with_lock) is closed so daemons spawned here (epmd, beam) can't keep it.
as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@" 9>&-
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@" 9>&-
  else
    die "need root for '$*' (not root and no sudo)"
  fi
}

# port_open HOST PORT: true when a TCP connection succeeds.
port_open() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# Run "$@" with an exclusive lock on LOCKFILE so concurrent invocations don't race.
with_lock() {
  local lockfile=$1; shift
  mkdir -p "$(dirname "$lockfile")"
  (
    exec 9>"$lockfile"
    if ! flock -w 600 9; then
      die "timed out waiting for lock $lockfile"
    fi
    "$@"
  )
}

fmt_secs() { printf '%ss' "$1"; }

# ---------------------------------------------------------------- Debian packages
# Every package jobgate needs is installed by ONE step, before any broker starts: one
# `apt-get update` and one `apt-get install` for all the brokers asked for, under
# jobgate's own apt lock (and apt's lock timeout for anybody else's apt), so that
# `up all` never runs two package installs at once.

# packages_for BROKER: the Debian packages BROKER needs, one a line (only the missing
# ones are installed; tools that came with the machine by other means count as present).
packages_for() {
  case $1 in
    rabbitmq*) printf '%s\n' rabbitmq-server curl ;;
    redis) printf '%s\n' redis-server ;;
    kafka*)
      # Java 17+ runs Kafka; javac compiles the readiness probe; Maven fetches the jars.
      command -v java >/dev/null 2>&1 || printf '%s\n' openjdk-17-jre-headless
      command -v javac >/dev/null 2>&1 || printf '%s\n' openjdk-17-jdk-headless
      command -v mvn >/dev/null 2>&1 || printf '%s\n' maven
      ;;
  esac
  # The test certificates of the TLS listeners (scripts/lib/tls.sh).
  case $1 in
    rabbitmq* | kafka*) command -v openssl >/dev/null 2>&1 || printf '%s\n' openssl ;;
  esac
}

pkg_installed() {
  [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]
}

# missing_packages BROKER...: the packages of BROKER... that are not installed yet.
missing_packages() {
  local b p
  for b in "$@"; do
    for p in $(packages_for "$b"); do
      if ! pkg_installed "$p"; then printf '%s\n' "$p"; fi
    done
  done | sort -u
}

# apt_get ARGS...: apt-get as root, non-interactive, waiting up to 5 min for apt's locks.
apt_get() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 "$@"
}

# apt_update: `apt-get update`, tried again while another apt holds the lists lock
# (older apt does not apply DPkg::Lock::Timeout to that lock).
apt_update() {
  local tries=0
  until apt_get update; do
    tries=$((tries + 1))
    ((tries < 6)) || return 1
    warn "apt-get update failed (try $tries); trying again in 10s"
    sleep 10
  done
}

# install_packages_now PKG...: the one update and the one install (hold the apt lock).
install_packages_now() {
  local t0=$SECONDS apt_log="$STATE_ROOT/apt.log" created_policy=0 rc=0 p
  local -a missing=()
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  ((${#missing[@]})) || return 0 # another `up` installed them while we waited
  log "installing ${missing[*]} with apt-get (log: $apt_log)"
  # No init system here: keep maintainer scripts from trying to start services.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
    created_policy=1
  fi
  {
    as_root env DEBIAN_FRONTEND=noninteractive dpkg --configure -a || true
    apt_update &&
      apt_get install -y --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
  } >"$apt_log" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]]; then
    # A failing service start in a postinst leaves packages half-configured; finish them.
    warn "apt-get exited $rc; trying 'dpkg --configure -a'"
    as_root env DEBIAN_FRONTEND=noninteractive dpkg --configure -a >>"$apt_log" 2>&1 || true
  fi
  [[ $created_policy -eq 0 ]] || as_root rm -f /usr/sbin/policy-rc.d
  local -a still=()
  for p in "${missing[@]}"; do pkg_installed "$p" || still+=("$p"); done
  if ((${#still[@]})); then
    tail -n 30 "$apt_log" >&2 || true
    die "installing ${still[*]} failed (see $apt_log)"
  fi
  log "installed ${missing[*]} in $(fmt_secs $((SECONDS - t0)))"
}

# install_for BROKER...: make sure everything BROKER... needs is installed.
install_for() {
  local -a missing
  mapfile -t missing < <(missing_packages "$@")
  ((${#missing[@]})) || return 0
  with_lock "$STATE_ROOT/apt.lock" install_packages_now "${missing[@]}"
}

# ---------------------------------------------------------------- RabbitMQ
rabbit_bin() {
  local name=$1
  if command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
  elif [[ -x /usr/sbin/$name ]]; then
    printf '/usr/sbin/%s\n' "$name"
  else
    return 1
  fi
}

rabbit_installed() { rabbit_bin rabbitmq-server >/dev/null 2>&1; }

rabbitmqctl_()        { as_root "$(rabbit_bin rabbitmqctl)" "$@"; }
rabbitmq_plugins_()   { as_root "$(rabbit_bin rabbitmq-plugins)" "$@"; }
rabbitmq_diag_()      { as_root "$(rabbit_bin rabbitmq-diagnostics)" "$@"; }

rabbit_mgmt_ok() {
  curl -fsS --max-time 5 -o /dev/null -u guest:guest \
    "http://$RABBITMQ_HOST:$RABBITMQ_MGMT_PORT/api/overview" 2>/dev/null
}

rabbit_up() { port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT" && rabbit_mgmt_ok; }

rabbit_ping() { rabbit_installed && rabbitmq_diag_ -q ping >/dev/null 2>&1; }

rabbit_version() {
  curl -fsS --max-time 5 -u guest:guest "http://$RABBITMQ_HOST:$RABBITMQ_MGMT_PORT/api/overview" 2>/dev/null |
    grep -o '"rabbitmq_version":"[^"]*"' | head -n1 | cut -d'"' -f4 || true
}

rabbit_log_tail() {
  local f
  for f in "$RABBITMQ_STATE/start.out" /var/log/rabbitmq/rabbit@*.log; do
    if [[ -s $f && -r $f ]]; then
      printf -- '----- tail of %s -----\n' "$f" >&2
      tail -n 40 "$f" >&2 || true
    fi
  done
}

rabbit_enable_plugins() {
  local enabled=/etc/rabbitmq/enabled_plugins online=$1
  # rabbitmq_auth_mechanism_ssl: the EXTERNAL login (a client certificate) on AMQPS.
  local -a plugins=(rabbitmq_management rabbitmq_prometheus rabbitmq_auth_mechanism_ssl)
  local p missing=0
  for p in "${plugins[@]}"; do
    [[ -r $enabled ]] && grep -qw "$p" "$enabled" || missing=1
  done
  ((missing)) || return 0
  log "rabbitmq: enabling plugins ${plugins[*]}"
  if [[ $online == online ]]; then
    rabbitmq_plugins_ -q enable "${plugins[@]}" >/dev/null
  else
    rabbitmq_plugins_ -q --offline enable "${plugins[@]}" >/dev/null
  fi
}

# rabbit_write_tls_config: the AMQPS listener on 127.0.0.1:$RABBITMQ_TLS_PORT with the
# test certificates (copied where the rabbitmq user can read them). A client
# certificate is checked when one is sent, and is then a login of its own (EXTERNAL,
# user = the certificate's CN); PLAIN logins work over TLS as over plain AMQP.
# Read when the node starts.
rabbit_write_tls_config() {
  local owner=root
  id rabbitmq >/dev/null 2>&1 && owner=rabbitmq
  as_root mkdir -p "$RABBITMQ_TLS_FILES" "$(dirname "$RABBITMQ_TLS_CONF")"
  as_root cp "$TLS_DIR/ca.pem" "$TLS_DIR/server.pem" "$TLS_DIR/server.key" "$RABBITMQ_TLS_FILES/"
  as_root chown -R "$owner" "$RABBITMQ_TLS_FILES"
  as_root chmod 0700 "$RABBITMQ_TLS_FILES"
  as_root tee "$RABBITMQ_TLS_CONF" >/dev/null <<EOF
# Written by $PROG: the AMQPS listener of jobgate's TLS tests (loopback only).
listeners.ssl.1 = $RABBITMQ_HOST:$RABBITMQ_TLS_PORT
ssl_options.cacertfile = $RABBITMQ_TLS_FILES/ca.pem
ssl_options.certfile = $RABBITMQ_TLS_FILES/server.pem
ssl_options.keyfile = $RABBITMQ_TLS_FILES/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
ssl_cert_login_from = common_name
EOF
}

# rabbit_tls_user: the user of the test client certificate (EXTERNAL login: no password
# works for it), with all rights on the default vhost.
rabbit_tls_user() {
  local api="http://$RABBITMQ_HOST:$RABBITMQ_MGMT_PORT/api"
  rabbit_mgmt -o /dev/null -X PUT "$api/users/$TLS_CLIENT_CN" -d '{"password_hash":"","tags":""}' &&
    rabbit_mgmt -o /dev/null -X PUT "$api/permissions/%2f/$TLS_CLIENT_CN" \
      -d '{"configure":".*","write":".*","read":".*"}'
}

rabbit_enable_feature_flags() {
  local disabled
  rabbitmqctl_ -q enable_feature_flag all >/dev/null 2>&1 || true
  disabled=$(rabbitmqctl_ -q list_feature_flags name state 2>/dev/null | awk '$2 == "disabled" {print $1}')
  if [[ -n $disabled ]]; then
    err "rabbitmq: feature flags still disabled after 'rabbitmqctl enable_feature_flag all': $(tr '\n' ' ' <<<"$disabled")"
    return 1
  fi
}

# rabbit_mgmt CURL_ARGS...: a call to the management HTTP API as guest.
rabbit_mgmt() {
  curl -fsS --max-time 5 -u guest:guest -H 'content-type: application/json' "$@"
}

# rabbit_round_trip: a durable quorum queue declared, a message published to it through
# the default exchange, and fetched back: quorum queues (the Raft system), routing and
# the management API all work. The probe queue stays declared for the next check.
rabbit_round_trip() {
  local api="http://$RABBITMQ_HOST:$RABBITMQ_MGMT_PORT/api" q=jobgate.readiness token
  token="ready-$$-$RANDOM"
  rabbit_mgmt -o /dev/null -X PUT "$api/queues/%2f/$q" \
    -d '{"durable":true,"auto_delete":false,"arguments":{"x-queue-type":"quorum"}}' || return 1
  rabbit_mgmt -X POST "$api/exchanges/%2f/amq.default/publish" \
    -d "{\"properties\":{},\"routing_key\":\"$q\",\"payload\":\"$token\",\"payload_encoding\":\"string\"}" |
    grep -q '"routed":true' || return 1
  rabbit_mgmt -X POST "$api/queues/%2f/$q/get" \
    -d '{"count":10,"ackmode":"ack_requeue_false","encoding":"auto"}' | grep -q "$token"
}

# rabbit_wait_usable: wait until RabbitMQ is usable as jobgate uses it, not only
# listening: node running, management API up, every feature flag enabled, and a quorum
# queue round trip done.
rabbit_wait_usable() {
  local deadline=$((SECONDS + RABBITMQ_TIMEOUT))
  rabbit_enable_feature_flags || return 1
  until rabbit_round_trip; do
    if ((SECONDS >= deadline)); then
      err "rabbitmq: a quorum queue round trip through the management API did not succeed within ${RABBITMQ_TIMEOUT}s"
      rabbit_log_tail
      return 1
    fi
    sleep 1
  done
}

# Each quorum queue holds file handles; RabbitMQ sizes its handle budget from the
# descriptor limit it starts with, and Debian's default (1024) is used up by about 300
# quorum queues: after that new connections hang. The Debian wrapper starts the server
# through `su rabbitmq`, whose PAM session sets the limits: raise them there.
rabbit_raise_nofile() {
  local conf=/etc/security/limits.d/jobgate-rabbitmq.conf want hard
  # pam_limits cannot go above the hard limit we have (no CAP_SYS_RESOURCE in a
  # container): ask for at most that, or it applies nothing.
  want="$RABBITMQ_NOFILE"
  hard="$(ulimit -Hn)"
  if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then want="$hard"; fi
  local line="rabbitmq - nofile $want"
  if [ "$(cat "$conf" 2>/dev/null)" != "$line" ]; then
    printf '%s\n' "$line" | as_root tee "$conf" >/dev/null ||
      warn "rabbitmq: cannot write $conf; the descriptor limit stays low"
  fi
}

rabbit_wait_ready() {
  local deadline=$((SECONDS + RABBITMQ_TIMEOUT))
  while ((SECONDS < deadline)); do
    if rabbit_ping && rabbit_mgmt_ok; then
      return 0
    fi
    sleep 1
  done
  err "rabbitmq: not ready after ${RABBITMQ_TIMEOUT}s (ping and http://$RABBITMQ_HOST:$RABBITMQ_MGMT_PORT/api/overview)"
  rabbit_log_tail
  return 1
}

up_rabbitmq() {
  local t0=$SECONDS
  mkdir -p "$RABBITMQ_STATE"
  install_for rabbitmq
  if rabbit_up && ! port_open "$RABBITMQ_HOST" "$RABBITMQ_TLS_PORT"; then
    # Started before the TLS listener existed (an older checkout): the config file is
    # read at boot only.
    log "rabbitmq: running without the AMQPS listener on :$RABBITMQ_TLS_PORT; restarting it"
    down_rabbitmq || return 1
  fi
  if rabbit_up; then
    rabbit_wait_usable || return 1
    rabbit_tls_user || { err "rabbitmq: cannot create the TLS test user $TLS_CLIENT_CN"; return 1; }
    log "rabbitmq: already up on $RABBITMQ_HOST:$RABBITMQ_PORT (management :$RABBITMQ_MGMT_PORT answers, quorum queues work, RabbitMQ $(rabbit_version)); reusing it"
    return 0
  fi
  if rabbit_ping; then
    if ! port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT"; then
      # The Erlang node runs but the RabbitMQ application is stopped (an interrupted
      # `rabbitmqctl stop_app`, as the outage tests do): start the application.
      log "rabbitmq: node is running with the application stopped; rabbitmqctl start_app"
      rabbitmqctl_ -q start_app >/dev/null 2>&1 || warn "rabbitmq: 'rabbitmqctl start_app' failed"
    fi
    log "rabbitmq: node is running but the management API does not answer yet"
    rabbit_enable_plugins online
  else
    rabbit_enable_plugins offline
    rabbit_write_tls_config
    log "rabbitmq: starting rabbitmq-server -detached"
    rabbit_raise_nofile
    if ! as_root "$(rabbit_bin rabbitmq-server)" -detached >"$RABBITMQ_STATE/start.out" 2>&1 </dev/null 9>&-; then
      err "rabbitmq: 'rabbitmq-server -detached' failed"
      rabbit_log_tail
      return 1
    fi
  fi
  rabbit_wait_ready || return 1
  rabbit_wait_usable || return 1
  rabbit_tls_user || { err "rabbitmq: cannot create the TLS test user $TLS_CLIENT_CN"; return 1; }
  if ! port_open "$RABBITMQ_HOST" "$RABBITMQ_TLS_PORT"; then
    err "rabbitmq: the AMQPS listener on $RABBITMQ_HOST:$RABBITMQ_TLS_PORT is not open ($RABBITMQ_TLS_CONF)"
    rabbit_log_tail
    return 1
  fi
  log "rabbitmq: up on $RABBITMQ_HOST:$RABBITMQ_PORT, management http://$RABBITMQ_HOST:$RABBITMQ_MGMT_PORT (guest/guest), RabbitMQ $(rabbit_version), in $(fmt_secs $((SECONDS - t0)))"
}

rabbit_wait_port_closed() {
  local deadline=$((SECONDS + 30))
  while port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT"; do
    ((SECONDS < deadline)) || { warn "rabbitmq: port $RABBITMQ_PORT still open after 30s"; return 1; }
    sleep 0.5
  done
}

down_rabbitmq() {
  if ! rabbit_installed; then
    if port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT"; then
      err "rabbitmq: something listens on $RABBITMQ_PORT but rabbitmq-server is not installed here; not stopping it"
      return 1
    fi
    log "rabbitmq: not installed; nothing to stop"
    return 0
  fi
  if ! rabbit_ping && ! port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT"; then
    log "rabbitmq: already stopped"
    return 0
  fi
  log "rabbitmq: stopping (rabbitmqctl stop)"
  rabbitmqctl_ -q stop >/dev/null 2>&1 || warn "rabbitmq: 'rabbitmqctl stop' failed (already stopped?)"
  rabbit_wait_port_closed
  log "rabbitmq: stopped"
}

rabbit_os_pid() {
  local f pid
  for f in /var/lib/rabbitmq/mnesia/rabbit@*.pid; do
    [[ -r $f ]] || continue
    pid=$(tr -dc '0-9' <"$f")
    if [[ -n $pid && -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q beam; then
      printf '%s\n' "$pid"
      return 0
    fi
  done
  return 1
}

kill_rabbitmq() {
  local pid
  if ! pid=$(rabbit_os_pid); then
    log "rabbitmq: no running node found (pid file); nothing to kill"
    return 0
  fi
  log "rabbitmq: SIGKILL beam pid $pid"
  as_root kill -KILL "$pid" 2>/dev/null || true
  rabbit_wait_port_closed
  log "rabbitmq: killed"
}

# pause_rabbitmq / resume_rabbitmq: SIGSTOP / SIGCONT the Erlang VM: a frozen broker
# whose sockets stay open (the half-open connection of a hung node).
pause_rabbitmq() {
  local pid
  pid=$(rabbit_os_pid) || die "rabbitmq: no running node found (pid file)"
  log "rabbitmq: SIGSTOP beam pid $pid (frozen; 'resume rabbitmq' thaws it)"
  as_root kill -STOP "$pid"
}

resume_rabbitmq() {
  local pid
  pid=$(rabbit_os_pid) || die "rabbitmq: no running node found (pid file)"
  log "rabbitmq: SIGCONT beam pid $pid"
  as_root kill -CONT "$pid"
}

status_rabbitmq() {
  if rabbit_up; then
    log "rabbitmq: up ($RABBITMQ_HOST:$RABBITMQ_PORT, management :$RABBITMQ_MGMT_PORT, RabbitMQ $(rabbit_version))"
    return 0
  fi
  if port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT"; then
    log "rabbitmq: down (port $RABBITMQ_PORT open but management API on :$RABBITMQ_MGMT_PORT does not answer)"
  else
    log "rabbitmq: down"
  fi
  return 1
}

# ---------------------------------------------------------------- Kafka
kafka_libs_dir() { printf '%s/kafka-%s/libs\n' "$CACHE_ROOT" "$1"; }
kafka_marker()   { printf '%s/kafka-%s/.complete\n' "$CACHE_ROOT" "$1"; }

kafka_cached() {
  local v=$1
  [[ -f $(kafka_marker "$v") && -f $(kafka_libs_dir "$v")/kafka_2.13-$v.jar ]]
}

check_java() {
  local java_bin=java ver major
  if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
    java_bin="$JAVA_HOME/bin/java"
  fi
  command -v "$java_bin" >/dev/null 2>&1 || die "kafka: java not found (Java 17+ required)"
  ver=$("$java_bin" -version 2>&1 | head -n1 | sed -E 's/.*version "([^"]+)".*/\1/')
  major=${ver%%.*}
  [[ $major == 1 ]] && major=$(cut -d. -f2 <<<"$ver")
  if ! [[ $major =~ ^[0-9]+$ ]] || ((major < 17)); then
    die "kafka: Java 17+ required, found '$ver' ($java_bin)"
  fi
  JAVA_BIN=$java_bin
}

write_kafka_pom() {
  local pom=$1 v=$2 binding=$3
  cat >"$pom" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- throwaway pom written by $PROG to fetch Kafka $v jars -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>jobgate.local</groupId>
  <artifactId>kafka-jars</artifactId>
  <version>$v</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$v</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>$binding</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
}

# fetch_kafka VERSION: download the jars of one version into the cache.
fetch_kafka() {
  local v=$1 t0=$SECONDS base libs tmp pom mvn_log binding=log4j-slf4j-impl want
  base="$CACHE_ROOT/kafka-$v"
  libs=$(kafka_libs_dir "$v")
  mkdir -p "$base" || return 1
  tmp=$(mktemp -d "$base/fetch.XXXXXX") || return 1
  pom="$tmp/pom.xml"
  mvn_log="$base/mvn.log"
  command -v mvn >/dev/null 2>&1 || die "kafka: mvn (Maven) not found"
  log "kafka: fetching Kafka $v jars from Maven Central (log: $mvn_log)"
  local _
  for _ in 1 2; do
    rm -rf "$tmp/libs"
    write_kafka_pom "$pom" "$v" "$binding"
    # A Maven repository of jobgate's own, inside its cache: removing the cache is a
    # true fresh fetch, and the machine's ~/.m2 is neither needed nor touched.
    if ! mvn -q -B -Dstyle.color=never -Dmaven.repo.local="$CACHE_ROOT/m2" -f "$pom" \
      dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$tmp/libs" >"$mvn_log" 2>&1; then
      warn "kafka: Maven could not resolve Kafka $v"
      tail -n 15 "$mvn_log" >&2 || true
      rm -rf "$tmp"
      return 1
    fi
    # The SLF4J binding must match the slf4j-api that Kafka brings in.
    if compgen -G "$tmp/libs/slf4j-api-2.*.jar" >/dev/null; then
      want=log4j-slf4j2-impl
    else
      want=log4j-slf4j-impl
    fi
    [[ $want == "$binding" ]] && break
    log "kafka: slf4j-api is $(basename "$(compgen -G "$tmp/libs/slf4j-api-*.jar" | head -n1)"), switching binding to $want"
    binding=$want
  done
  if [[ ! -f $tmp/libs/kafka_2.13-$v.jar ]]; then
    rm -rf "$tmp"
    warn "kafka: kafka_2.13-$v.jar missing after the fetch"
    return 1
  fi
  rm -rf "$libs"
  mv "$tmp/libs" "$libs"
  rm -rf "$tmp"
  printf 'kafka %s, %s jars, %s\n' "$v" "$(find "$libs" -name '*.jar' | wc -l)" "$binding" >"$(kafka_marker "$v")"
  log "kafka: cached $(find "$libs" -name '*.jar' | wc -l) jars in $libs ($(fmt_secs $((SECONDS - t0))))"
}

# Sets KAFKA_LIBS and KAFKA_RESOLVED_VERSION.
resolve_kafka_libs() {
  local -a versions=("$KAFKA_VERSION")
  [[ -n $KAFKA_FALLBACK_VERSION && $KAFKA_FALLBACK_VERSION != "$KAFKA_VERSION" ]] &&
    versions+=("$KAFKA_FALLBACK_VERSION")
  local v
  for v in "${versions[@]}"; do
    if kafka_cached "$v"; then
      KAFKA_RESOLVED_VERSION=$v
      KAFKA_LIBS=$(kafka_libs_dir "$v")
      return 0
    fi
  done
  for v in "${versions[@]}"; do
    if with_lock "$CACHE_ROOT/kafka-$v.lock" fetch_kafka "$v"; then
      KAFKA_RESOLVED_VERSION=$v
      KAFKA_LIBS=$(kafka_libs_dir "$v")
      return 0
    fi
  done
  die "kafka: could not fetch any of: ${versions[*]}"
}

write_kafka_config() {
  mkdir -p "$KAFKA_DATA" "$KAFKA_LOGS" "$KAFKA_CONFIG_DIR"
  cat >"$KAFKA_PROPS.tmp" <<EOF
# Written by $PROG (regenerated on every 'up'): single combined KRaft node for local tests.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT,SASL_SSL://$KAFKA_HOST:$KAFKA_SASL_SSL_PORT,SSL://$KAFKA_HOST:$KAFKA_SSL_PORT
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,SASL_SSL://$KAFKA_HOST:$KAFKA_SASL_SSL_PORT,SSL://$KAFKA_HOST:$KAFKA_SSL_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL
log.dirs=$KAFKA_DATA

# The TLS listeners of jobgate's TLS/SASL tests, with the test PKI of scripts/lib/tls.sh.
# SASL_SSL: PLAIN and SCRAM logins (the SCRAM credentials are stored in the cluster by
# the readiness probe); SSL: every client must show a certificate the test CA signed.
ssl.keystore.type=PEM
ssl.keystore.location=$TLS_DIR/server-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
listener.name.ssl.ssl.client.auth=required
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$KAFKA_SASL_USER="$KAFKA_SASL_PASSWORD";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;


# Single node: every internal topic with replication factor / min ISR 1.
EOF
  kafka_test_properties 1 1 >>"$KAFKA_PROPS.tmp"
  mv "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"
  write_kafka_log4j
}

# kafka_test_properties REPLICATION MIN_ISR: the properties every test broker shares:
# the replication of its topics (internal ones too) and settings for faster, more
# predictable tests.
kafka_test_properties() {
  cat <<EOF
num.partitions=1
default.replication.factor=$1
min.insync.replicas=$2
offsets.topic.replication.factor=$1
transaction.state.log.replication.factor=$1
transaction.state.log.min.isr=$2
share.coordinator.state.topic.replication.factor=$1
share.coordinator.state.topic.min.isr=$2

group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
log.retention.hours=24
log.segment.bytes=67108864
EOF
}

# write_kafka_log4j: Kafka's log configuration, logging to $KAFKA_SERVER_LOG.
write_kafka_log4j() {
  cat >"$KAFKA_LOG4J.tmp" <<EOF
# Written by $PROG: Kafka logs INFO to $KAFKA_SERVER_LOG (not stdout).
name=jobgate-kafka
status=warn
appender.file.type=RollingFile
appender.file.name=FILE
appender.file.fileName=$KAFKA_SERVER_LOG
appender.file.filePattern=$KAFKA_SERVER_LOG.%i
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
appender.file.policies.type=Policies
appender.file.policies.size.type=SizeBasedTriggeringPolicy
appender.file.policies.size.size=50MB
appender.file.strategy.type=DefaultRolloverStrategy
appender.file.strategy.max=3
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=FILE
logger.request.name=kafka.request.logger
logger.request.level=WARN
logger.statechange.name=state.change.logger
logger.statechange.level=WARN
EOF
  mv "$KAFKA_LOG4J.tmp" "$KAFKA_LOG4J"
}

kafka_java() {
  local -a heap
  read -r -a heap <<<"$KAFKA_HEAP_OPTS"
  "$JAVA_BIN" "${heap[@]}" -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_LOG4J" -cp "$KAFKA_LIBS/*" "$@"
}

kafka_format_storage() {
  local cid
  if [[ -f $KAFKA_DATA/meta.properties ]]; then
    return 0
  fi
  if [[ -s $KAFKA_CLUSTER_ID_FILE ]]; then
    cid=$(<"$KAFKA_CLUSTER_ID_FILE")
  else
    cid=$(KAFKA_HEAP_OPTS="-Xmx256m" kafka_java kafka.tools.StorageTool random-uuid | tail -n1)
    [[ -n $cid ]] || die "kafka: 'StorageTool random-uuid' printed nothing"
    printf '%s\n' "$cid" >"$KAFKA_CLUSTER_ID_FILE"
  fi
  log "kafka: formatting storage $KAFKA_DATA (cluster id $cid)"
  if ! KAFKA_HEAP_OPTS="-Xmx256m" kafka_java kafka.tools.StorageTool format \
    -t "$cid" -c "$KAFKA_PROPS" --ignore-formatted >"$KAFKA_LOGS/format.out" 2>&1; then
    cat "$KAFKA_LOGS/format.out" >&2 || true
    die "kafka: storage format failed"
  fi
}

# kafka_pid: print the pid from the pid file when that process is our Kafka.
kafka_pid() {
  local pid
  [[ -r $KAFKA_PIDFILE ]] || return 1
  pid=$(tr -dc '0-9' <"$KAFKA_PIDFILE")
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
  printf '%s\n' "$pid"
}

kafka_log_tail() {
  local f
  for f in "$KAFKA_SERVER_LOG" "$KAFKA_STDOUT"; do
    if [[ -s $f ]]; then
      printf -- '----- tail of %s -----\n' "$f" >&2
      tail -n 40 "$f" >&2 || true
    fi
  done
}

# kafka_wait_ready PID LOG_OFFSET: wait for the port and for "Kafka Server started"
# in the server log after byte LOG_OFFSET.
kafka_wait_ready() {
  local pid=$1 offset=$2 deadline=$((SECONDS + KAFKA_TIMEOUT)) size
  while ((SECONDS < deadline)); do
    if [[ ! -r /proc/$pid/cmdline ]] || ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka'; then
      err "kafka: process $pid exited during startup"
      kafka_log_tail
      return 1
    fi
    if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
      size=$(stat -c %s "$KAFKA_SERVER_LOG" 2>/dev/null || echo 0)
      ((size < offset)) && offset=0 # the log rolled over
      # grep reads to the end (no -q): a grep that quits early would kill tail with
      # SIGPIPE, and pipefail would make a match look like a miss.
      if tail -c +"$((offset + 1))" "$KAFKA_SERVER_LOG" 2>/dev/null | grep 'Kafka Server started' >/dev/null; then
        return 0
      fi
    fi
    sleep 0.5
  done
  err "kafka: not ready after ${KAFKA_TIMEOUT}s (port $KAFKA_PORT + 'Kafka Server started' in $KAFKA_SERVER_LOG)"
  kafka_log_tail
  return 1
}

# kafka_probe_classes: the compiled readiness probe (scripts/lib/KafkaReady.java against
# the cached kafka-clients jar), compiled once per version of its source; prints its dir.
kafka_probe_classes() {
  local src="$SCRIPT_DIR/lib/KafkaReady.java" sum dir tmp javac_bin
  sum=$(sha256sum "$src" | cut -c1-16)
  dir="$CACHE_ROOT/kafka-ready-$KAFKA_RESOLVED_VERSION-$sum"
  if [[ ! -f $dir/KafkaReady.class ]]; then
    javac_bin="$(dirname "$JAVA_BIN")/javac"
    [[ -x $javac_bin ]] || javac_bin=$(command -v javac) || die "kafka: javac not found (a JDK 17+ is needed for the readiness probe)"
    tmp=$(mktemp -d "$CACHE_ROOT/kafka-ready.XXXXXX")
    if ! "$javac_bin" -nowarn -d "$tmp" -cp "$KAFKA_LIBS/*" "$src" >"$tmp/javac.out" 2>&1; then
      cat "$tmp/javac.out" >&2
      rm -rf "$tmp"
      die "kafka: compiling the readiness probe $src failed"
    fi
    # Another `up` may have compiled it meanwhile: first one in wins.
    mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
  fi
  printf '%s\n' "$dir"
}

# kafka_wait_usable SECONDS: wait until Kafka is usable as jobgate uses it: controller,
# a partition leader that takes acks=all writes, and a group coordinator that commits
# offsets (scripts/lib/KafkaReady.java). A port that accepts connections is not enough:
# right after a start, group calls fail with NOT_COORDINATOR for a while.
kafka_wait_usable() {
  local secs=$1 bootstrap=${2:-$KAFKA_HOST:$KAFKA_PORT} replication=${3:-1} classes out
  local scram_user=$KAFKA_SASL_USER
  classes=$(kafka_probe_classes)
  # The SCRAM login of the single node's SASL_SSL listener, stored (again) by the probe;
  # through the environment, not argv (which `ps` shows).
  ((replication == 1)) || scram_user=
  if ! out=$(KAFKA_READY_SCRAM_USER="$scram_user" KAFKA_READY_SCRAM_PASSWORD="$KAFKA_SASL_PASSWORD" \
    "$JAVA_BIN" -Xmx128m -Djava.awt.headless=true -Dlog4j2.level=OFF \
    -Dlog4j2.statusLoggerLevel=OFF -cp "$classes:$KAFKA_LIBS/*" KafkaReady \
    "$bootstrap" "$secs" "$replication" 2>&1); then
    err "kafka: not usable after ${secs}s:"
    printf '%s\n' "$out" >&2
    kafka_log_tail
    return 1
  fi
}

up_kafka() {
  local t0=$SECONDS pid offset
  install_for kafka
  check_java
  resolve_kafka_libs
  if port_open "$KAFKA_HOST" "$KAFKA_PORT" && kafka_pid >/dev/null &&
    ! { port_open "$KAFKA_HOST" "$KAFKA_SASL_SSL_PORT" && port_open "$KAFKA_HOST" "$KAFKA_SSL_PORT"; }; then
    # Started before the TLS listeners existed (an older checkout).
    log "kafka: running without the TLS listeners on :$KAFKA_SASL_SSL_PORT/:$KAFKA_SSL_PORT; restarting it"
    kafka_stop TERM "$KAFKA_STOP_TIMEOUT" || return 1
  fi
  if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
    if pid=$(kafka_pid); then
      log "kafka: already listening on $KAFKA_HOST:$KAFKA_PORT (pid $pid); checking it is usable"
    else
      log "kafka: something already accepts connections on $KAFKA_HOST:$KAFKA_PORT; checking it is usable"
    fi
    kafka_wait_usable "$KAFKA_TIMEOUT" || return 1
    log "kafka: up on $KAFKA_HOST:$KAFKA_PORT (controller, leaders and group coordinator answer); reusing it"
    return 0
  fi
  if pid=$(kafka_pid); then
    log "kafka: pid $pid is starting; waiting for it"
    kafka_wait_ready "$pid" 0 || return 1
  else
    write_kafka_config
    kafka_format_storage
    offset=$(kafka_log_offset)
    log "kafka: starting Kafka $KAFKA_RESOLVED_VERSION (state: $KAFKA_STATE)"
    pid=$(kafka_launch) || return 1
    kafka_wait_ready "$pid" "$offset" || return 1
  fi
  kafka_wait_usable "$KAFKA_TIMEOUT" || return 1
  if ! { port_open "$KAFKA_HOST" "$KAFKA_SASL_SSL_PORT" && port_open "$KAFKA_HOST" "$KAFKA_SSL_PORT"; }; then
    err "kafka: the TLS listeners on $KAFKA_HOST:$KAFKA_SASL_SSL_PORT and :$KAFKA_SSL_PORT are not both open"
    kafka_log_tail
    return 1
  fi
  log "kafka: up on $KAFKA_HOST:$KAFKA_PORT (Kafka $KAFKA_RESOLVED_VERSION, pid $pid; controller, leaders and group coordinator answer) in $(fmt_secs $((SECONDS - t0)))"
}

# kafka_log_offset: the size of the server log now (kafka_wait_ready reads past it).
kafka_log_offset() { stat -c %s "$KAFKA_SERVER_LOG" 2>/dev/null || echo 0; }

# kafka_launch: starts the broker of $KAFKA_PROPS (heap $KAFKA_HEAP_OPTS) detached and
# prints its pid once the pid file names it.
kafka_launch() {
  local -a heap
  local pid deadline
  read -r -a heap <<<"$KAFKA_HEAP_OPTS"
  printf -- '--- start %s ---\n' "$(date -Is)" >>"$KAFKA_STDOUT"
  # A new session, detached from this script; the inner shell records its own pid
  # and then becomes java (exec keeps the pid).
  # shellcheck disable=SC2016 # expanded by the inner bash
  setsid nohup bash -c 'printf "%s\n" "$$" >"$1"; shift; exec "$@"' _ "$KAFKA_PIDFILE" \
    "$JAVA_BIN" "${heap[@]}" -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_LOG4J" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
    >>"$KAFKA_STDOUT" 2>&1 </dev/null 9>&- &
  deadline=$((SECONDS + 10))
  until pid=$(kafka_pid); do
    if ((SECONDS >= deadline)); then
      err "kafka: the java process did not start ($KAFKA_PROPS)"
      kafka_log_tail
      return 1
    fi
    sleep 0.2
  done
  printf '%s\n' "$pid"
}

# kafka_stop SIGNAL WAIT_SECONDS
kafka_stop() {
  local sig=$1 wait_s=$2 pid deadline
  if ! pid=$(kafka_pid); then
    rm -f "$KAFKA_PIDFILE"
    if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
      err "${KAFKA_NAME:-kafka}: something listens on $KAFKA_HOST:$KAFKA_PORT but was not started by this script (no pid in $KAFKA_PIDFILE); not stopping it"
      return 1
    fi
    log "${KAFKA_NAME:-kafka}: already stopped"
    return 0
  fi
  log "${KAFKA_NAME:-kafka}: sending SIG$sig to pid $pid"
  kill -"$sig" "$pid" 2>/dev/null || true
  deadline=$((SECONDS + wait_s))
  while kafka_pid >/dev/null; do
    if ((SECONDS >= deadline)); then
      if [[ $sig == KILL ]]; then
        err "${KAFKA_NAME:-kafka}: pid $pid survived SIGKILL"
        return 1
      fi
      warn "${KAFKA_NAME:-kafka}: pid $pid still alive after ${wait_s}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sig=KILL
      deadline=$((SECONDS + 10))
    fi
    sleep 0.2
  done
  rm -f "$KAFKA_PIDFILE"
  deadline=$((SECONDS + 10))
  while port_open "$KAFKA_HOST" "$KAFKA_PORT" && ((SECONDS < deadline)); do sleep 0.2; done
  log "${KAFKA_NAME:-kafka}: stopped"
}

down_kafka() { kafka_stop TERM "$KAFKA_STOP_TIMEOUT"; }

# pause_kafka / resume_kafka: SIGSTOP / SIGCONT the broker's JVM (see pause_rabbitmq).
pause_kafka() {
  local pid
  pid=$(kafka_pid) || die "kafka: not running (no pid in $KAFKA_PIDFILE)"
  log "kafka: SIGSTOP pid $pid (frozen; 'resume kafka' thaws it)"
  kill -STOP "$pid"
}

resume_kafka() {
  local pid
  pid=$(kafka_pid) || die "kafka: not running (no pid in $KAFKA_PIDFILE)"
  log "kafka: SIGCONT pid $pid"
  kill -CONT "$pid"
}
kill_kafka() { kafka_stop KILL 10; }

status_kafka() {
  local pid
  if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
    if pid=$(kafka_pid); then
      log "kafka: up ($KAFKA_HOST:$KAFKA_PORT, pid $pid, state $KAFKA_STATE)"
    else
      log "kafka: up ($KAFKA_HOST:$KAFKA_PORT, not started by this script)"
    fi
    return 0
  fi
  if pid=$(kafka_pid); then
    log "kafka: down (pid $pid running but $KAFKA_HOST:$KAFKA_PORT not accepting connections yet)"
  else
    log "kafka: down"
  fi
  return 1
}

# ---------------------------------------------------------------- Redis
redis_bin() {
  local name=$1
  if command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
  elif [[ -x /usr/bin/$name ]]; then
    printf '/usr/bin/%s\n' "$name"
  else
    return 1
  fi
}

redis_installed() { redis_bin redis-server >/dev/null 2>&1; }

# redis_ping: true when a Redis answers PING on REDIS_HOST:REDIS_PORT (redis-cli when
# installed, else a raw PING over /dev/tcp).
redis_ping() {
  local cli
  if cli=$(redis_bin redis-cli 2>/dev/null); then
    [[ $(timeout 3 "$cli" -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
  else
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "PING\r\n" >&3 && IFS= read -r line <&3 && [[ $line == "+PONG"* ]]' \
      _ "$REDIS_HOST" "$REDIS_PORT" 2>/dev/null
  fi
}

# redis_usable: PING answers and a write is taken (not loading, not a read-only replica).
redis_usable() {
  redis_ping || return 1
  local cli
  cli=$(redis_bin redis-cli 2>/dev/null) || return 0 # not ours: PING is all we can ask
  [[ $(timeout 3 "$cli" -h "$REDIS_HOST" -p "$REDIS_PORT" set jobgate:readiness ok px 10000 2>/dev/null) == OK ]]
}

up_redis() {
  local t0=$SECONDS deadline
  mkdir -p "$REDIS_STATE"
  install_for redis
  if redis_usable; then
    log "redis: already up on $REDIS_HOST:$REDIS_PORT (answers PING, takes writes); reusing it"
    return 0
  fi
  log "redis: starting redis-server (state $REDIS_STATE)"
  if ! "$(redis_bin redis-server)" --port "$REDIS_PORT" --bind "$REDIS_HOST" --daemonize yes \
    --save '' --appendonly no --dir "$REDIS_STATE" --logfile "$REDIS_STATE/redis.log" \
    --pidfile "$REDIS_STATE/redis.pid" >"$REDIS_STATE/start.out" 2>&1 </dev/null 9>&-; then
    err "redis: 'redis-server --daemonize yes' failed"
    tail -n 20 "$REDIS_STATE/start.out" "$REDIS_STATE/redis.log" >&2 2>/dev/null || true
    return 1
  fi
  deadline=$((SECONDS + REDIS_TIMEOUT))
  until redis_usable; do
    if ((SECONDS >= deadline)); then
      err "redis: not answering PING or not taking a write after ${REDIS_TIMEOUT}s"
      tail -n 20 "$REDIS_STATE/redis.log" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
  log "redis: up on $REDIS_HOST:$REDIS_PORT in $(fmt_secs $((SECONDS - t0)))"
}

down_redis() {
  if ! redis_ping; then
    log "redis: already stopped"
    return 0
  fi
  log "redis: stopping (redis-cli shutdown nosave)"
  local cli
  if cli=$(redis_bin redis-cli 2>/dev/null); then
    timeout 10 "$cli" -h "$REDIS_HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  else
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "SHUTDOWN NOSAVE\r\n" >&3' \
      _ "$REDIS_HOST" "$REDIS_PORT" 2>/dev/null || true
  fi
  local deadline=$((SECONDS + 10))
  while port_open "$REDIS_HOST" "$REDIS_PORT"; do
    ((SECONDS < deadline)) || { warn "redis: port $REDIS_PORT still open after 10s"; return 1; }
    sleep 0.2
  done
  log "redis: stopped"
}

kill_redis() {
  local pid
  if [[ -r $REDIS_STATE/redis.pid ]] && pid=$(tr -dc '0-9' <"$REDIS_STATE/redis.pid") && [[ -n $pid ]] &&
    [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q redis-server; then
    log "redis: SIGKILL pid $pid"
    kill -KILL "$pid" 2>/dev/null || true
  else
    log "redis: no running redis-server started by this script; nothing to kill"
  fi
}

status_redis() {
  if redis_ping; then
    log "redis: up ($REDIS_HOST:$REDIS_PORT)"
    return 0
  fi
  log "redis: down"
  return 1
}

# ---------------------------------------------------------------- dispatch
# act ACTION BROKER: run one action for one broker under that broker's lock.
# target_kind TARGET: the function suffix of TARGET and, for one node of a cluster, its
# number: "rabbitmq", "kafka_cluster", "rabbitmq_node 2", ...
target_kind() {
  case $1 in
    rabbitmq-[1-3] | kafka-[1-3]) printf '%s_node %s\n' "${1%-*}" "${1##*-}" ;;
    rabbitmq-cluster | kafka-cluster) printf '%s_cluster\n' "${1%-cluster}" ;;
    *) printf '%s\n' "$1" ;;
  esac
}

act() {
  local action=$1 target=$2 kind node lock
  read -r kind node <<<"$(target_kind "$target")"
  # One lock for a cluster and its nodes.
  case $kind in
    *_node | *_cluster) lock="${target%-*}-cluster" ;;
    *) lock=$target ;;
  esac
  case $action in
    status | env) "${action}_$kind" ${node:+"$node"} ;;
    restart) with_lock "$STATE_ROOT/$lock.lock" sh_restart "$kind" ${node:+"$node"} ;;
    *) with_lock "$STATE_ROOT/$lock.lock" "${action}_$kind" ${node:+"$node"} ;;
  esac
}

sh_restart() {
  "down_$1" "${@:2}"
  "up_$1" "${@:2}"
}

main() {
  local action=${1:-} target=${2:-all}
  case $action in
    up | down | status | restart | kill | install | pause | resume | env) ;;
    -h | --help | help) usage; return 0 ;;
    "") usage >&2; return 2 ;;
    *) err "unknown action '$action'"; usage >&2; return 2 ;;
  esac
  [[ $# -le 2 ]] || { usage >&2; return 2; }
  local -a brokers
  case $target in
    all) brokers=(rabbitmq kafka redis) ;;
    redis) brokers=(redis) ;;
    rabbitmq | rabbit) brokers=(rabbitmq) ;;
    kafka) brokers=(kafka) ;;
    rabbitmq-cluster | kafka-cluster | rabbitmq-[1-3] | kafka-[1-3]) brokers=("$target") ;;
    *) err "unknown broker '$target'"; usage >&2; return 2 ;;
  esac
  local b kind
  for b in "${brokers[@]}"; do
    read -r kind _ <<<"$(target_kind "$b")"
    [[ $action == install || $action == restart ]] && continue
    declare -F "${action}_$kind" >/dev/null || {
      err "'$action' does not apply to '$b'"
      return 2
    }
  done
  if [[ $action == pause || $action == resume || $action == env ]] && [[ ${#brokers[@]} -ne 1 ]]; then
    err "'$action' takes one broker, cluster or node"
    return 2
  fi
  if [[ $action == env ]]; then
    for b in "${brokers[@]}"; do act env "$b"; done
    return 0
  fi
  mkdir -p "$STATE_ROOT"
  case $action in
    # One package step for all of them, before any starts (never two apt-gets at once).
    up | restart)
      install_for "${brokers[@]}"
      # Before the brokers (which may start in parallel) read them.
      [[ ${brokers[*]} == redis ]] || with_lock "$STATE_ROOT/tls.lock" tls_ensure
      ;;
    install) install_for "${brokers[@]}"; return 0 ;;
  esac

  # Each action runs as a background job and is then waited for: that keeps `set -e`
  # in force inside it (it is ignored in functions called from `||`/`if`), and lets
  # `all` acts on both brokers in parallel (status stays sequential for tidy output).
  local t0=$SECONDS rc=0 b
  local -A pids=()
  if [[ ${#brokers[@]} -gt 1 && $action != status ]]; then
    for b in "${brokers[@]}"; do
      act "$action" "$b" &
      pids[$b]=$!
    done
    for b in "${brokers[@]}"; do
      if ! wait "${pids[$b]}"; then
        [[ $action == status ]] || err "$b: '$action' failed"
        rc=1
      fi
    done
  else
    for b in "${brokers[@]}"; do
      act "$action" "$b" &
      if ! wait "$!"; then
        [[ $action == status ]] || err "$b: '$action' failed"
        rc=1
      fi
    done
  fi
  if [[ $action != status ]]; then
    if [[ $rc -eq 0 ]]; then
      log "$action ${target}: done in $(fmt_secs $((SECONDS - t0)))"
    else
      err "$action ${target}: failed after $(fmt_secs $((SECONDS - t0)))"
    fi
  fi
  return "$rc"
}

main "$@"
