#!/usr/bin/env bash
# Queue round trips (enqueue, fetch, ack) on one node and on cluster nodes sharing their
# queues through Redis (docs/BENCHMARKS.md, "Queues shared over Redis"), for
#   memory:  one node on the memory store, no Redis
#   disk:    one node on the disk store (fsync always, the default)
#   1-node:  one node (role all) on Redis
#   2-node:  two nodes (role all) on Redis, half the workers on each (two load
#            generators at once on one queue; their rates are summed, their p50s
#            averaged)
# with WORKERS concurrent workers (each a list: "1 8 64"), and the Redis server's CPU
# per round trip (INFO cpu, user + sys). Each case runs RUNS times; every run's figures
# are printed as JSON lines, then the medians.
#
# Usage (from the repository root, Redis on 127.0.0.1:6379):
#   cargo build --release && RUNS=3 tools/queue-cluster-bench.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BIN=${BIN:-target/release/herald}
RUNS=${RUNS:-3}
WORKERS=${WORKERS:-1 8 64}
MESSAGES=${MESSAGES:-20000}
REDIS=${REDIS:-redis://127.0.0.1:6379/}
PREFIX="herald-qbench:$$:"
WORK=$(mktemp -d /tmp/herald-queue-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; redis-cli --scan --pattern "${PREFIX}*" | xargs -r redis-cli del >/dev/null; rm -rf "$WORK"' EXIT

# node PORT KIND: KIND is memory, disk or redis.
node() {
  case "$2" in
    memory) "$BIN" serve --listen "127.0.0.1:$1" --store memory 2>>"$WORK/log" & ;;
    disk) "$BIN" serve --listen "127.0.0.1:$1" --data-dir "$WORK/data-$1" 2>>"$WORK/log" & ;;
    redis) "$BIN" serve --listen "127.0.0.1:$1" --cluster "$REDIS" --cluster-prefix "$PREFIX" 2>>"$WORK/log" & ;;
  esac
  wait_ready "http://127.0.0.1:$1"
}

redis_cpu() {
  redis-cli info cpu | awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { printf "%.6f", s }'
}

# measure NAME WORKERS URL...: the workers split evenly over the URLs, all at once.
measure() {
  local name=$1 workers=$2
  shift 2
  local n=$# per=$(( workers / $# )) before after
  [ "$per" -ge 1 ] || per=1
  before=$(redis_cpu)
  local i=0
  for url in "$@"; do
    "$BIN" bench queue --url "$url" --queue "bench.$name.$workers.$$" --workers "$per" \
      --messages $(( MESSAGES / n )) --json >"$WORK/out.$i" &
    i=$(( i + 1 ))
  done
  wait $(jobs -p | tail -n "$n")
  after=$(redis_cpu)
  jq -s -c --arg name "$name" --argjson workers "$workers" \
    --arg cpu "$(echo "$after $before $MESSAGES $n" | awk '{ printf "%.2f", ($1 - $2) * 1e6 / ($3 + 500 * $4) }')" \
    '{case: $name, workers: $workers, per_second: (map(.per_second) | add),
      p50_us: ((map(.p50_us) | add) / length | floor), p99_us: (map(.p99_us) | max),
      redis_cpu_us_per_round_trip: ($cpu | tonumber)}' "$WORK"/out.* | tee -a "$WORK/results"
  rm -f "$WORK"/out.*
}

for _ in $(seq "$RUNS"); do
  for w in $WORKERS; do
    node 17401 memory
    measure memory "$w" http://127.0.0.1:17401
    stop_nodes

    node 17402 disk
    measure disk "$w" http://127.0.0.1:17402
    stop_nodes

    node 17411 redis
    measure 1-node "$w" http://127.0.0.1:17411
    stop_nodes

    node 17421 redis
    node 17422 redis
    if [ "$w" -ge 2 ]; then
      measure 2-node "$w" http://127.0.0.1:17421 http://127.0.0.1:17422
    fi
    stop_nodes
  done
done

echo "medians over $RUNS runs:"
jq -s -c 'group_by([.case, .workers])[] | . as $runs
  | def median(f): ([$runs[] | f] | sort | .[(length - 1) / 2 | floor]);
  {case: $runs[0].case, workers: $runs[0].workers,
   per_second: median(.per_second), p50_us: median(.p50_us), p99_us: median(.p99_us),
   redis_cpu_us_per_round_trip: median(.redis_cpu_us_per_round_trip)}' "$WORK/results"
