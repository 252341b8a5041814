#!/usr/bin/env bash
# A local Redis Cluster of three primaries on 127.0.0.1:7101-7103 (no replicas), from the
# Debian redis-server binary, for the tests and benchmarks that run Herald on Redis
# Cluster (docs/cluster.md). Idempotent: does nothing if the cluster already answers.
#
#   tools/redis-cluster.sh start    # start (or check) it
#   tools/redis-cluster.sh stop     # stop it and delete its files
set -euo pipefail

PORTS=(7101 7102 7103)
DIR=${HERALD_REDIS_CLUSTER_DIR:-/tmp/herald-redis-cluster}

healthy() {
  redis-cli -p "${PORTS[0]}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'
}

case "${1:-start}" in
  start)
    mkdir -p "$DIR"
    # One starter at a time (test binaries may call this concurrently).
    exec 9>"$DIR/lock"
    flock 9
    healthy && exit 0
    for port in "${PORTS[@]}"; do
      redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
      rm -rf "${DIR:?}/$port" && mkdir -p "$DIR/$port"
      redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --dir "$DIR/$port" \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
        --save "" --appendonly no --logfile "$DIR/$port/redis.log" </dev/null >/dev/null 2>&1 9>&-
    done
    for port in "${PORTS[@]}"; do
      for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
    done
    redis-cli --cluster create "${PORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
    for _ in $(seq 200); do healthy && exit 0; sleep 0.05; done
    echo "the Redis Cluster on ${PORTS[*]} did not reach cluster_state:ok" >&2
    exit 1
    ;;
  stop)
    for port in "${PORTS[@]}"; do redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; done
    rm -rf "$DIR"
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
