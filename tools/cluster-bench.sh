#!/usr/bin/env bash
# Scale-out over Redis, measured on one machine (docs/BENCHMARKS.md, "Cluster"):
# fan-out to SUBS raw WebSocket subscribers and acknowledged publish latency, for
#   single: one node on the memory store, no Redis (the baseline)
#   1-node: one node (role all) on Redis
#   2-node: an ingest node + one fan-out node (subscribers on the fan-out node)
#   3-node: an ingest node + two fan-out nodes (subscribers split between them)
# and the Redis server's CPU per published message (INFO cpu, user + sys, around the
# fan-out run, and around the publish run: 20 000 publishes plus 500 warm-up ones). Each topology runs RUNS times; every run's figures are printed as
# JSON lines, then the medians.
#
# Usage (from the repository root, Redis on 127.0.0.1:6379):
#   cargo build --release && RUNS=3 tools/cluster-bench.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BIN=${BIN:-target/release/herald}
RUNS=${RUNS:-3}
SUBS=${SUBS:-1000}
MESSAGES=${MESSAGES:-2000}
REDIS=${REDIS:-redis://127.0.0.1:6379/}
PREFIX="herald-bench:$$:"
WORK=$(mktemp -d /tmp/herald-cluster-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; redis-cli --scan --pattern "${PREFIX}*" | xargs -r redis-cli del >/dev/null; rm -rf "$WORK"' EXIT

# node PORT ROLE: a cluster node (or, with ROLE=single, a memory-store node).
node() {
  if [ "$2" = single ]; then
    "$BIN" serve --listen "127.0.0.1:$1" --store memory 2>>"$WORK/log" &
  else
    "$BIN" serve --listen "127.0.0.1:$1" --cluster "$REDIS" --cluster-prefix "$PREFIX" --role "$2" 2>>"$WORK/log" &
  fi
  wait_ready "http://127.0.0.1:$1"
}

redis_cpu() {
  redis-cli info cpu | awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { printf "%.6f", s }'
}

run_topology() {
  local name=$1 ingest=$2
  shift 2
  local subs=()
  for url in "$@"; do subs+=(--sub-url "$url"); done
  local before after
  before=$(redis_cpu)
  local fanout
  fanout=$("$BIN" bench fanout --url "$ingest" "${subs[@]}" --subscribers "$SUBS" --messages "$MESSAGES" --json)
  after=$(redis_cpu)
  local publish pbefore pafter
  pbefore=$(redis_cpu)
  publish=$("$BIN" bench publish --url "$ingest" --publishers 16 --messages 20000 --json)
  pafter=$(redis_cpu)
  jq -cn --arg name "$name" --argjson f "$fanout" --argjson p "$publish" \
    --arg cpu "$(echo "$after $before $MESSAGES" | awk '{ printf "%.2f", ($1 - $2) * 1e6 / $3 }')" \
    --arg pcpu "$(echo "$pafter $pbefore 20500" | awk '{ printf "%.2f", ($1 - $2) * 1e6 / $3 }')" \
    '{topology: $name, deliveries_per_second: $f.deliveries_per_second,
      publish_per_second: $p.per_second, publish_p50_us: $p.p50_us, publish_p99_us: $p.p99_us,
      redis_cpu_us_per_message: ($cpu | tonumber), redis_cpu_us_per_publish: ($pcpu | tonumber)}' | tee -a "$WORK/results"
}

for _ in $(seq "$RUNS"); do
  node 17301 single
  run_topology single http://127.0.0.1:17301 http://127.0.0.1:17301
  stop_nodes

  node 17311 all
  run_topology 1-node http://127.0.0.1:17311 http://127.0.0.1:17311
  stop_nodes

  node 17321 ingest
  node 17322 fanout
  run_topology 2-node http://127.0.0.1:17321 http://127.0.0.1:17322
  stop_nodes

  node 17331 ingest
  node 17332 fanout
  node 17333 fanout
  run_topology 3-node http://127.0.0.1:17331 http://127.0.0.1:17332 http://127.0.0.1:17333
  stop_nodes
done

echo "medians over $RUNS runs:"
jq -s -c 'group_by(.topology)[] | . as $runs
  | def median(f): ([$runs[] | f] | sort | .[(length - 1) / 2 | floor]);
  {topology: $runs[0].topology,
   deliveries_per_second: median(.deliveries_per_second),
   publish_per_second: median(.publish_per_second),
   publish_p50_us: median(.publish_p50_us), publish_p99_us: median(.publish_p99_us),
   redis_cpu_us_per_message: median(.redis_cpu_us_per_message),
   redis_cpu_us_per_publish: median(.redis_cpu_us_per_publish)}' "$WORK/results"
