# shellcheck shell=bash
# Three-node clusters on loopback for the failover tests; sourced by scripts/brokers.sh
# (which provides as_root, port_open, log/err/die, the Kafka helpers and the settings).
#
# rabbitmq-cluster: nodes jobgate-1..3@localhost of Debian's rabbitmq-server, run as the
#   rabbitmq user beside the single node (which keeps 5672): AMQP 127.0.0.1:5681..5683,
#   management :15681..15683, Prometheus :15701..15703, Erlang distribution
#   :25681..25683. They share the rabbitmq user's Erlang cookie and are joined to
#   jobgate-1; a quorum queue gets a member on each. Data in $RABBIT_CLUSTER_BASE.
# kafka-cluster: brokers 1..3 in combined KRaft mode, three controller voters: PLAINTEXT
#   127.0.0.1:9192/9292/9392, controllers :9193/9293/9393, heap $KAFKA_CLUSTER_HEAP_OPTS
#   each; internal topics and defaults with replication 3 and min.insync.replicas 2.
#   State in $KAFKA_CLUSTER_STATE.
# One node of either: rabbitmq-N / kafka-N (up, down, kill, restart, pause, resume,
# status). A node that comes back rejoins its cluster by itself.

CLUSTER_NODES=(1 2 3)
RABBIT_CLUSTER_BASE=/var/lib/rabbitmq/jobgate-cluster
RABBIT_CLUSTER_LOGS=/var/log/rabbitmq/jobgate-cluster
RABBIT_CLUSTER_CONF=/etc/rabbitmq/jobgate-cluster
KAFKA_CLUSTER_STATE="$STATE_ROOT/kafka-cluster"
KAFKA_CLUSTER_HEAP_OPTS="${KAFKA_CLUSTER_HEAP_OPTS:--Xms256m -Xmx512m}"

# ---------------------------------------------------------------- RabbitMQ cluster
rnode_name()      { printf 'jobgate-%s@localhost\n' "$1"; }
rnode_port()      { printf '%s\n' $((5680 + $1)); }
rnode_mgmt_port() { printf '%s\n' $((15680 + $1)); }

# rnode_run N COMMAND...: COMMAND (a RabbitMQ wrapper) with node N's environment.
rnode_run() {
  local n=$1
  shift
  as_root env \
    RABBITMQ_NODENAME="$(rnode_name "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$(rnode_port "$n")" \
    RABBITMQ_DIST_PORT=$((25680 + n)) \
    RABBITMQ_MNESIA_BASE="$RABBIT_CLUSTER_BASE/node-$n" \
    RABBITMQ_LOG_BASE="$RABBIT_CLUSTER_LOGS/node-$n" \
    RABBITMQ_CONFIG_FILE="$RABBIT_CLUSTER_CONF/node-$n.conf" \
    RABBITMQ_CONFIG_FILES="$RABBIT_CLUSTER_CONF/node-$n.d" \
    RABBITMQ_ENABLED_PLUGINS_FILE=/etc/rabbitmq/enabled_plugins \
    "$@"
}

rnode_ctl() { local n=$1; shift; as_root "$(rabbit_bin rabbitmqctl)" -n "$(rnode_name "$n")" "$@"; }

rnode_mgmt_ok() {
  curl -fsS --max-time 5 -o /dev/null -u guest:guest \
    "http://127.0.0.1:$(rnode_mgmt_port "$1")/api/overview" 2>/dev/null
}

rnode_up() { port_open 127.0.0.1 "$(rnode_port "$1")" && rnode_mgmt_ok "$1"; }

rnode_ping() { rnode_ctl "$1" -q ping >/dev/null 2>&1; }

rnode_pid() {
  local f pid
  f="$RABBIT_CLUSTER_BASE/node-$1/$(rnode_name "$1").pid"
  [[ -r $f ]] || return 1
  pid=$(tr -dc '0-9' <"$f")
  [[ -n $pid && -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q beam || return 1
  printf '%s\n' "$pid"
}

rnode_log_tail() {
  local f
  for f in "$RABBIT_CLUSTER_LOGS/node-$1"/*.log "$RABBIT_CLUSTER_BASE/node-$1/start.out"; do
    if [[ -s $f && -r $f ]]; then
      printf -- '----- tail of %s -----\n' "$f" >&2
      tail -n 30 "$f" >&2 || true
    fi
  done
}

rnode_write_config() {
  local n=$1 owner=root
  id rabbitmq >/dev/null 2>&1 && owner=rabbitmq
  as_root mkdir -p "$RABBIT_CLUSTER_BASE/node-$n" "$RABBIT_CLUSTER_LOGS/node-$n" \
    "$RABBIT_CLUSTER_CONF/node-$n.d"
  as_root chown -R "$owner" "$RABBIT_CLUSTER_BASE" "$RABBIT_CLUSTER_LOGS"
  as_root tee "$RABBIT_CLUSTER_CONF/node-$n.conf" >/dev/null <<EOF
# Written by $PROG: node $n of the loopback test cluster (scripts/lib/cluster.sh).
listeners.tcp.default = 127.0.0.1:$(rnode_port "$n")
management.tcp.ip = 127.0.0.1
management.tcp.port = $(rnode_mgmt_port "$n")
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = $((15700 + n))
# As the RabbitMQ Cluster Operator sets it: a node that sees only a minority of the
# cluster pauses (closes its listeners) instead of serving alone.
cluster_partition_handling = pause_minority
EOF
}

# rnode_start N: starts node N (detached) unless it runs; does not wait.
rnode_start() {
  local n=$1
  rnode_ping "$n" && return 0
  rnode_write_config "$n"
  log "rabbitmq-$n: starting $(rnode_name "$n") (AMQP 127.0.0.1:$(rnode_port "$n"), management :$(rnode_mgmt_port "$n"))"
  rabbit_raise_nofile
  if ! rnode_run "$n" "$(rabbit_bin rabbitmq-server)" -detached \
    >"$STATE_ROOT/rabbitmq-$n.start.out" 2>&1 </dev/null 9>&-; then
    err "rabbitmq-$n: 'rabbitmq-server -detached' failed"
    cat "$STATE_ROOT/rabbitmq-$n.start.out" >&2 || true
    return 1
  fi
}

# rnode_wait_up N: waits until node N answers AMQP and management. A node whose Erlang
# VM is gone while it should be starting is started again (twice at most): RabbitMQ
# 3.10 nodes started together can crash at boot syncing feature flags with a peer that
# is still booting (`incompatible_feature_flags`, `{badmap,undefined}` in
# rabbit_feature_flags:enable_dependencies), and start fine once their peers run.
rnode_wait_up() {
  local n=$1 deadline=$((SECONDS + RABBITMQ_TIMEOUT)) since=$SECONDS restarts=0
  until rnode_ping "$n" && rnode_up "$n"; do
    if ((SECONDS >= deadline)); then
      err "rabbitmq-$n: not up after ${RABBITMQ_TIMEOUT}s"
      rnode_log_tail "$n"
      return 1
    fi
    # The VM writes its pid file within seconds of `-detached`; no VM after 15 s means
    # it stopped.
    if ((SECONDS - since >= 15 && restarts < 2)) && ! rnode_pid "$n" >/dev/null && ! rnode_ping "$n"; then
      restarts=$((restarts + 1))
      warn "rabbitmq-$n: stopped while starting ($(rnode_boot_failure "$n")); starting it again ($restarts of 2)"
      rnode_start "$n" || return 1
      since=$SECONDS
      deadline=$((SECONDS + RABBITMQ_TIMEOUT))
    fi
    sleep 1
  done
}

# rnode_boot_failure N: why node N's last boot failed, as its log says (one line).
rnode_boot_failure() {
  local reason
  reason=$(grep -ho 'Application rabbit exited with reason: {{[a-z_]*' \
    "$RABBIT_CLUSTER_LOGS/node-$1"/*.log 2>/dev/null | tail -n 1)
  printf '%s\n' "${reason:-no reason in its log}"
}

# rnode_running_nodes: the running members of the cluster, as node 1 sees them.
rnode_running_nodes() {
  local n
  for n in "${CLUSTER_NODES[@]}"; do
    rnode_ping "$n" || continue
    rnode_ctl "$n" -q cluster_status --formatter json 2>/dev/null |
      grep -o '"running_nodes":\[[^]]*\]' && return 0
  done
  return 1
}

# rnode_join N: node N joins node 1's cluster unless it is a member already.
rnode_join() {
  local n=$1
  rnode_ctl 1 -q cluster_status --formatter json 2>/dev/null | grep -o '"disk_nodes":\[[^]]*\]' |
    grep -q "\"$(rnode_name "$n")\"" && return 0
  log "rabbitmq-$n: joining $(rnode_name 1)"
  # The CLI prints the node's log lines of the join: kept out of the way.
  local out="$STATE_ROOT/rabbitmq-$n.join.log"
  rnode_ctl "$n" -q stop_app >"$out" 2>&1 &&
    rnode_ctl "$n" -q reset >>"$out" 2>&1 &&
    rnode_ctl "$n" -q join_cluster "$(rnode_name 1)" >>"$out" 2>&1 &&
    rnode_ctl "$n" -q start_app >>"$out" 2>&1 || { cat "$out" >&2; return 1; }
}

# rabbit_cluster_usable: every node runs, every feature flag is on, and a quorum queue
# declared through node 1 has a member on each node and takes a message.
rabbit_cluster_usable() {
  local api="http://127.0.0.1:$(rnode_mgmt_port 1)/api" q=jobgate.cluster-readiness token
  local deadline=$((SECONDS + RABBITMQ_TIMEOUT)) members
  rnode_ctl 1 -q enable_feature_flag all >/dev/null 2>&1 || true
  token="ready-$$-$RANDOM"
  while ((SECONDS < deadline)); do
    if rabbit_mgmt -o /dev/null -X PUT "$api/queues/%2f/$q" \
      -d '{"durable":true,"auto_delete":false,"arguments":{"x-queue-type":"quorum"}}' &&
      members=$(rabbit_mgmt "$api/queues/%2f/$q" | grep -o '"members":\[[^]]*\]') &&
      [[ $(grep -o 'jobgate-[0-9]@localhost' <<<"$members" | sort -u | wc -l) -eq ${#CLUSTER_NODES[@]} ]] &&
      rabbit_mgmt -X POST "$api/exchanges/%2f/amq.default/publish" \
        -d "{\"properties\":{},\"routing_key\":\"$q\",\"payload\":\"$token\",\"payload_encoding\":\"string\"}" |
      grep -q '"routed":true' &&
      rabbit_mgmt -X POST "$api/queues/%2f/$q/get" \
        -d '{"count":10,"ackmode":"ack_requeue_false","encoding":"auto"}' | grep -q "$token"; then
      return 0
    fi
    sleep 1
  done
  err "rabbitmq-cluster: no quorum queue with a member on every node within ${RABBITMQ_TIMEOUT}s (members: ${members:-none})"
  return 1
}

up_rabbitmq_cluster() {
  local t0=$SECONDS n
  rabbit_enable_plugins offline
  for n in "${CLUSTER_NODES[@]}"; do rnode_start "$n" || return 1; done
  for n in "${CLUSTER_NODES[@]}"; do rnode_wait_up "$n" || return 1; done
  for n in "${CLUSTER_NODES[@]:1}"; do
    rnode_join "$n" || { err "rabbitmq-$n: joining the cluster failed"; rnode_log_tail "$n"; return 1; }
  done
  for n in "${CLUSTER_NODES[@]}"; do rnode_wait_up "$n" || return 1; done
  rabbit_cluster_usable || return 1
  log "rabbitmq-cluster: up, nodes $(rnode_running_nodes | grep -o 'jobgate-[0-9]@localhost' | tr '\n' ' ')in $(fmt_secs $((SECONDS - t0)))"
}

down_rabbitmq_cluster() {
  local n
  # In parallel: a node stopped alone waits for its peers when it starts again.
  for n in "${CLUSTER_NODES[@]}"; do down_rabbitmq_node "$n" & done
  wait
}

status_rabbitmq_cluster() {
  local n rc=0
  for n in "${CLUSTER_NODES[@]}"; do status_rabbitmq_node "$n" || rc=1; done
  return "$rc"
}

up_rabbitmq_node() {
  rnode_start "$1" && rnode_wait_up "$1" && log "rabbitmq-$1: up on 127.0.0.1:$(rnode_port "$1")"
}

down_rabbitmq_node() {
  local n=$1 deadline
  if ! rnode_ping "$n"; then
    log "rabbitmq-$n: already stopped"
    return 0
  fi
  log "rabbitmq-$n: stopping (rabbitmqctl stop)"
  rnode_ctl "$n" -q stop >/dev/null 2>&1 || warn "rabbitmq-$n: 'rabbitmqctl stop' failed"
  deadline=$((SECONDS + 30))
  while port_open 127.0.0.1 "$(rnode_port "$n")" && ((SECONDS < deadline)); do sleep 0.5; done
  log "rabbitmq-$n: stopped"
}

kill_rabbitmq_node() {
  local n=$1 pid deadline
  pid=$(rnode_pid "$n") || { log "rabbitmq-$n: not running; nothing to kill"; return 0; }
  log "rabbitmq-$n: SIGKILL beam pid $pid"
  as_root kill -KILL "$pid" 2>/dev/null || true
  deadline=$((SECONDS + 30))
  while port_open 127.0.0.1 "$(rnode_port "$n")" && ((SECONDS < deadline)); do sleep 0.2; done
}

pause_rabbitmq_node() {
  local pid
  pid=$(rnode_pid "$1") || die "rabbitmq-$1: not running"
  log "rabbitmq-$1: SIGSTOP beam pid $pid"
  as_root kill -STOP "$pid"
}

resume_rabbitmq_node() {
  local pid
  pid=$(rnode_pid "$1") || die "rabbitmq-$1: not running"
  log "rabbitmq-$1: SIGCONT beam pid $pid"
  as_root kill -CONT "$pid"
}

status_rabbitmq_node() {
  if rnode_up "$1"; then
    log "rabbitmq-$1: up ($(rnode_name "$1"), 127.0.0.1:$(rnode_port "$1"), management :$(rnode_mgmt_port "$1"))"
  else
    log "rabbitmq-$1: down"
    return 1
  fi
}

# ---------------------------------------------------------------- Kafka cluster
knode_port() { printf '%s\n' $((9092 + 100 * $1)); }

# knode_select N: points the single-node Kafka helpers (kafka_pid, kafka_launch,
# kafka_stop, ...) at node N. Call it in a subshell.
knode_select() {
  local n=$1
  KAFKA_PORT=$(knode_port "$n")
  KAFKA_CONTROLLER_PORT=$((KAFKA_PORT + 1))
  KAFKA_STATE="$KAFKA_CLUSTER_STATE/node-$n"
  KAFKA_DATA="$KAFKA_STATE/data"
  KAFKA_LOGS="$KAFKA_STATE/logs"
  KAFKA_CONFIG_DIR="$KAFKA_STATE/config"
  KAFKA_PROPS="$KAFKA_CONFIG_DIR/server.properties"
  KAFKA_LOG4J="$KAFKA_CONFIG_DIR/log4j2.properties"
  KAFKA_PIDFILE="$KAFKA_STATE/kafka.pid"
  KAFKA_CLUSTER_ID_FILE="$KAFKA_CLUSTER_STATE/cluster.id"
  KAFKA_SERVER_LOG="$KAFKA_LOGS/server.log"
  KAFKA_STDOUT="$KAFKA_LOGS/kafka.out"
  KAFKA_HEAP_OPTS=$KAFKA_CLUSTER_HEAP_OPTS
  KAFKA_NAME="kafka-$n"
}

kafka_cluster_bootstrap() {
  local n out=()
  for n in "${CLUSTER_NODES[@]}"; do out+=("127.0.0.1:$(knode_port "$n")"); done
  (IFS=,; printf '%s\n' "${out[*]}")
}

knode_write_config() {
  local n=$1 voters=() m
  for m in "${CLUSTER_NODES[@]}"; do voters+=("$m@127.0.0.1:$(($(knode_port "$m") + 1))"); done
  mkdir -p "$KAFKA_DATA" "$KAFKA_LOGS" "$KAFKA_CONFIG_DIR"
  cat >"$KAFKA_PROPS.tmp" <<EOF
# Written by $PROG (regenerated on every 'up'): node $n of the loopback test cluster.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$(IFS=,; printf '%s' "${voters[*]}")
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$KAFKA_DATA

# Three brokers: every topic with three copies, two of which an acks=all write needs.
EOF
  kafka_test_properties 3 2 >>"$KAFKA_PROPS.tmp"
  mv "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"
  write_kafka_log4j
}

# knode_start N: starts node N (detached) unless it runs; prints "pid offset", the
# offset "running" when it ran already.
knode_start() {
  local n=$1 pid offset
  knode_select "$n"
  if pid=$(kafka_pid); then
    printf '%s running\n' "$pid"
    return 0
  fi
  knode_write_config "$n"
  kafka_format_storage >&2
  offset=$(kafka_log_offset)
  log "kafka-$n: starting (PLAINTEXT 127.0.0.1:$KAFKA_PORT, controller :$KAFKA_CONTROLLER_PORT)" >&2
  pid=$(kafka_launch) || return 1
  printf '%s %s\n' "$pid" "$offset"
}

up_kafka_cluster() {
  local t0=$SECONDS n started
  local -A pids=() offsets=()
  check_java
  resolve_kafka_libs
  mkdir -p "$KAFKA_CLUSTER_STATE"
  # All three before any wait: a controller quorum needs two of them.
  for n in "${CLUSTER_NODES[@]}"; do
    started=$(knode_start "$n") || return 1
    pids[$n]=${started% *}
    offsets[$n]=${started#* }
  done
  for n in "${CLUSTER_NODES[@]}"; do
    [[ ${offsets[$n]} == running ]] && continue
    (knode_select "$n"; kafka_wait_ready "${pids[$n]}" "${offsets[$n]}") || return 1
  done
  kafka_wait_usable "$KAFKA_TIMEOUT" "$(kafka_cluster_bootstrap)" "${#CLUSTER_NODES[@]}" || return 1
  log "kafka-cluster: up on $(kafka_cluster_bootstrap) (Kafka $KAFKA_RESOLVED_VERSION; a topic with three copies takes acks=all writes, the group coordinator answers) in $(fmt_secs $((SECONDS - t0)))"
}

down_kafka_cluster() {
  local n
  for n in "${CLUSTER_NODES[@]}"; do down_kafka_node "$n" & done
  wait
}

status_kafka_cluster() {
  local n rc=0
  for n in "${CLUSTER_NODES[@]}"; do status_kafka_node "$n" || rc=1; done
  return "$rc"
}

up_kafka_node() {
  local started
  check_java
  resolve_kafka_libs
  started=$(knode_start "$1") || return 1
  if [[ ${started#* } != running ]]; then
    (knode_select "$1"; kafka_wait_ready "${started% *}" "${started#* }") || return 1
  fi
  log "kafka-$1: up on 127.0.0.1:$(knode_port "$1")"
}

down_kafka_node() { (knode_select "$1"; kafka_stop TERM "$KAFKA_STOP_TIMEOUT"); }
kill_kafka_node()  { (knode_select "$1"; kafka_stop KILL 10); }

pause_kafka_node() {
  (knode_select "$1"
    pid=$(kafka_pid) || die "kafka-$1: not running"
    log "kafka-$1: SIGSTOP pid $pid"
    kill -STOP "$pid")
}

resume_kafka_node() {
  (knode_select "$1"
    pid=$(kafka_pid) || die "kafka-$1: not running"
    log "kafka-$1: SIGCONT pid $pid"
    kill -CONT "$pid")
}

status_kafka_node() {
  if port_open 127.0.0.1 "$(knode_port "$1")"; then
    log "kafka-$1: up (127.0.0.1:$(knode_port "$1"))"
  else
    log "kafka-$1: down"
    return 1
  fi
}

# ---------------------------------------------------------------- env
# env_TARGET: the JOBGATE_* settings that point both binaries at TARGET.
env_rabbitmq() {
  printf 'JOBGATE_BACKEND=rabbitmq\nJOBGATE_AMQP_URL=amqp://guest:guest@%s:%s/%%2f\n' \
    "$RABBITMQ_HOST" "$RABBITMQ_PORT"
}

env_kafka() {
  printf 'JOBGATE_BACKEND=kafka\nJOBGATE_KAFKA_BROKERS=%s:%s\n' "$KAFKA_HOST" "$KAFKA_PORT"
}

env_redis() { printf 'JOBGATE_REDIS_URL=redis://%s:%s\n' "$REDIS_HOST" "$REDIS_PORT"; }

env_rabbitmq_cluster() {
  local n urls=()
  for n in "${CLUSTER_NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$(rnode_port "$n")/%2f"); done
  printf 'JOBGATE_BACKEND=rabbitmq\nJOBGATE_AMQP_URL=%s\n' "$(IFS=,; printf '%s' "${urls[*]}")"
}

env_kafka_cluster() {
  printf 'JOBGATE_BACKEND=kafka\nJOBGATE_KAFKA_BROKERS=%s\n' "$(kafka_cluster_bootstrap)"
}
