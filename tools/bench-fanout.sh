#!/usr/bin/env bash
# End-to-end fan-out over WebSocket, Herald beside nats-server, in one run: one
# publisher, S subscribers on WebSockets, 128-byte messages, deliveries per second to
# the last delivery. Herald and NATS runs alternate, RUNS times each; every result is a
# JSON line in $OUT and the medians are printed at the end.
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
"$HERALD" serve --listen 127.0.0.1:7181 --store memory >"$WORK/memory.log" 2>&1 &
"$HERALD" serve --listen 127.0.0.1:7182 --data-dir "$WORK/disk" >"$WORK/disk.log" 2>&1 &
for port in 7181 7182; do
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.05; done
done
until (exec 3<>/dev/tcp/127.0.0.1/8225) 2>/dev/null; do sleep 0.05; done

record() { sed "s/^{/{\"store\":\"$1\",/" | tee -a "$OUT"; }

for run in $(seq 1 "$RUNS"); do
    for subscribers in 100 1000; do
        "$HERALD" bench fanout --url http://127.0.0.1:7181 --subscribers $subscribers --messages "$MESSAGES" --json | record memory
        "$PEER" nats-ws-fanout --subscribers $subscribers --messages "$MESSAGES" --json | record nats
        "$HERALD" bench fanout --url http://127.0.0.1:7182 --subscribers $subscribers --messages "$MESSAGES" --json | record disk
    done
done

echo "== medians of $RUNS runs (deliveries per second)"
python3 - "$OUT" <<'EOF'
import json, statistics, sys
from collections import defaultdict
groups = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    groups[(r["subscribers"], r["scenario"], r["store"])].append(r["deliveries_per_second"])
for (subs, scenario, store), xs in sorted(groups.items()):
    print(f"{scenario:15} {store:7} subscribers={subs:<5} {statistics.median(xs):>10.0f}/s  runs {xs}")
EOF
