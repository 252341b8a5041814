#!/usr/bin/env bash
# End-to-end fan-out over WebSocket, Herald beside nats-server, in one run: one
# publisher, S subscribers on WebSockets, 128-byte messages, deliveries per second to
# the last delivery, and each server's CPU time per delivery over the run. Herald and
# NATS runs alternate, RUNS times each; every result is a JSON line in $OUT and the
# medians are printed at the end.
#
# Usage (from the repository root):
#   cargo build --release
#   (cd tools/peer-bench && cargo build --release)
#   RUNS=3 tools/bench-fanout.sh
#
# Starts its own servers: Herald on the memory store and on the disk store (fsync
# always, the default), and a nats-server with a WebSocket listener (the machine's
# own nats-server has none).
set -euo pipefail

RUNS=${RUNS:-3}
MESSAGES=${MESSAGES:-5000}
OUT=${OUT:-/tmp/herald-bench-fanout.jsonl}
HERALD=${HERALD:-target/release/herald}
PEER=${PEER:-tools/peer-bench/target/release/peer-bench}
NATS_SERVER=${NATS_SERVER:-nats-server}
WORK=$(mktemp -d /tmp/herald-fanout.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
: >"$OUT"

cat >"$WORK/nats.conf" <<EOF
port: 4225
websocket {
  port: 8225
  no_tls: true
}
EOF
"$NATS_SERVER" -c "$WORK/nats.conf" >"$WORK/nats.log" 2>&1 &
nats_pid=$!
"$HERALD" serve --listen 127.0.0.1:7181 --store memory >"$WORK/memory.log" 2>&1 &
memory_pid=$!
"$HERALD" serve --listen 127.0.0.1:7182 --data-dir "$WORK/disk" >"$WORK/disk.log" 2>&1 &
disk_pid=$!
for port in 7181 7182; do
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.05; done
done
until (exec 3<>/dev/tcp/127.0.0.1/8225) 2>/dev/null; do sleep 0.05; done

# cpu PID: the process's user + system CPU time so far, in clock ticks.
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# measure STORE PID COMMAND...: runs the load generator, adds the server's CPU time per
# delivery over the run (connection set-up included) and the store, appends to $OUT.
measure() {
    local store=$1 pid=$2 before result ticks
    shift 2
    before=$(cpu "$pid")
    result=$("$@")
    ticks=$(( $(cpu "$pid") - before ))
    python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
store, ticks, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = {"store": store, **r, "server_cpu_ns_per_delivery": round(ticks * 1e9 / hz / r["deliveries"])}
print(json.dumps(r))' "$store" "$ticks" "$HZ" <<<"$result" | tee -a "$OUT"
}

for run in $(seq 1 "$RUNS"); do
    for subscribers in 100 1000; do
        measure memory "$memory_pid" "$HERALD" bench fanout --url http://127.0.0.1:7181 --subscribers $subscribers --messages "$MESSAGES" --json
        measure nats "$nats_pid" "$PEER" nats-ws-fanout --subscribers $subscribers --messages "$MESSAGES" --json
        measure disk "$disk_pid" "$HERALD" bench fanout --url http://127.0.0.1:7182 --subscribers $subscribers --messages "$MESSAGES" --json
    done
done

echo "== medians of $RUNS runs (deliveries per second; server CPU per delivery)"
python3 - "$OUT" <<'EOF'
import json, statistics, sys
from collections import defaultdict
groups = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    groups[(r["subscribers"], r["scenario"], r["store"])].append(r)
for (subs, scenario, store), rs in sorted(groups.items()):
    xs = [r["deliveries_per_second"] for r in rs]
    cpu = [r["server_cpu_ns_per_delivery"] for r in rs]
    print(f"{scenario:15} {store:7} subscribers={subs:<5} {statistics.median(xs):>10.0f}/s  "
          f"{statistics.median(cpu):>5.0f} ns CPU/delivery  runs {xs} {cpu}")
EOF
