#!/usr/bin/env bash
# Two builds of Herald side by side, in one run: durable publish on the disk store
# (fsync always and never, 16 and 256 publishers awaiting each ack, and 64 publishers
# on 64 KiB segments so that checkpoints run during the measurement), and fan-out to
# 1000 WebSocket subscribers on the memory store. The builds alternate, RUNS times
# each; the medians are printed at the end (per_second, p50 and p99 in microseconds, and
# the server's CPU time per delivery or acknowledged publish, connection set-up included).
#
# ONLY=name runs one scenario (memory-256: WebSocket publishers on the memory store,
# where the cost of reading frames shows most).
#
# Usage (from the repository root), e.g. to compare with an older commit:
#   git worktree add /tmp/herald-old <commit> && (cd /tmp/herald-old && cargo build --release)
#   cargo build --release
#   RUNS=3 tools/bench-ab.sh /tmp/herald-old/target/release/herald target/release/herald
set -euo pipefail

OLD=$1
NEW=$2
RUNS=${RUNS:-3}
PORT=${PORT:-7199}
WORK=$(mktemp -d /tmp/herald-ab.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

wait_ready() {
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$PORT/healthz" && return 0
    sleep 0.05
  done
  echo "server on $PORT did not start" >&2
  return 1
}

# scenario name, bench arguments, serve arguments
scenarios=(
  "always-16|publish --publishers 16 --messages 20000|--fsync always"
  "never-16|publish --publishers 16 --messages 40000|--fsync never"
  "always-256|publish --publishers 256 --messages 20000|--fsync always"
  "checkpoints-64|publish --publishers 64 --messages 20000|--fsync always --segment-bytes 65536 --retention-max-messages 1000"
  "fanout-1000|fanout --subscribers 1000 --messages 5000|--store memory"
  "memory-256|publish --publishers 256 --messages 40000|--store memory"
)

if [ -n "${ONLY:-}" ]; then
  for s in "${scenarios[@]}"; do
    [ "${s%%|*}" = "$ONLY" ] && scenarios=("$s") && break
  done
fi

for run in $(seq "$RUNS"); do
  for s in "${scenarios[@]}"; do
    IFS='|' read -r name bench serve <<<"$s"
    for which in old new; do
      bin=$OLD
      [ "$which" = new ] && bin=$NEW
      dir=$(mktemp -d -p "$WORK")
      # shellcheck disable=SC2086 # the argument strings are word lists
      "$bin" serve --listen "127.0.0.1:$PORT" --data-dir "$dir" $serve >"$WORK/server.log" 2>&1 &
      pid=$!
      wait_ready
      cpu0=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
      # shellcheck disable=SC2086
      result=$("$NEW" bench $bench --url "http://127.0.0.1:$PORT" --json)
      cpu1=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
      # The server's CPU time over the run (connection set-up included), per item.
      result=$(jq -c --argjson ticks $((cpu1 - cpu0)) --argjson hz "$(getconf CLK_TCK)" \
        '. + {server_cpu_ns: ($ticks * 1e9 / $hz / (.deliveries // .count) | floor)}' <<<"$result")
      echo "$run $name $which $result" >>"$WORK/results"
      kill "$pid"
      wait "$pid" 2>/dev/null || true
    done
  done
done

echo "scenario build median_per_second median_p50_us median_p99_us median_server_cpu_ns_per_item"
while read -r name; do
  for which in old new; do
    grep " $name $which " "$WORK/results" | cut -d' ' -f4- | jq -s -r --arg n "$name" --arg w "$which" '
      def median: sort | .[(length - 1) / 2 | floor];
      [$n, $w, (map(.per_second // .deliveries_per_second) | median), (map(.p50_us // 0) | median), (map(.p99_us // 0) | median), (map(.server_cpu_ns) | median)] | @tsv'
  done
done < <(printf '%s\n' "${scenarios[@]}" | cut -d'|' -f1)
