#!/usr/bin/env bash
# Herald beside its peers, in one run on this machine: queue round trips against
# RabbitMQ, acknowledged publishes against NATS JetStream. Herald and peer runs
# alternate, RUNS times each, so that a noisy moment hurts both alike; every result
# is one JSON line in $OUT, and a summary of medians is printed at the end.
#
# Usage (from the repository root, RabbitMQ on 5672 and NATS on 4222 running):
#   cargo build --release
#   (cd tools/peer-bench && cargo build --release)
#   RUNS=3 tools/bench-peers.sh            # results in /tmp/herald-bench-peers.jsonl
set -euo pipefail

RUNS=${RUNS:-3}
OUT=${OUT:-/tmp/herald-bench-peers.jsonl}
HERALD=${HERALD:-target/release/herald}
PEER=${PEER:-tools/peer-bench/target/release/peer-bench}
WORK=$(mktemp -d /tmp/herald-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
: >"$OUT"

# Three servers: memory store; disk store with fsync=always (the default); disk store
# with fsync=never, which promises what JetStream's default file storage does (a
# process crash loses nothing; power loss may lose what the OS had not written).
"$HERALD" serve --listen 127.0.0.1:7171 --store memory >"$WORK/memory.log" 2>&1 &
"$HERALD" serve --listen 127.0.0.1:7172 --data-dir "$WORK/always" >"$WORK/always.log" 2>&1 &
"$HERALD" serve --listen 127.0.0.1:7173 --data-dir "$WORK/never" --fsync never >"$WORK/never.log" 2>&1 &
for port in 7171 7172 7173; do
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.05; done
done

# tag JSON: adds "store" to a result line and appends it to $OUT.
record() { sed "s/^{/{\"store\":\"$1\",/" | tee -a "$OUT"; }

for run in $(seq 1 "$RUNS"); do
    for workers in 1 8 64; do
        n=$((workers == 1 ? 5000 : 20000))
        "$HERALD" bench queue --url http://127.0.0.1:7171 --workers $workers --messages $n --json | record memory
        "$PEER" rabbitmq-queue --workers $workers --messages $n --json | record transient
        "$HERALD" bench queue --url http://127.0.0.1:7172 --workers $workers --messages $n --json | record disk-always
        "$PEER" rabbitmq-queue --durable --workers $workers --messages $n --json | record durable
    done
    for publishers in 1 16 256; do
        n=$((publishers == 1 ? 5000 : 20000))
        "$HERALD" bench publish --url http://127.0.0.1:7172 --publishers $publishers --messages $n --json | record disk-always
        "$HERALD" bench publish --url http://127.0.0.1:7173 --publishers $publishers --messages $n --json | record disk-never
        "$PEER" jetstream-publish --publishers $publishers --messages $n --json | record jetstream-file
    done
done

echo "== medians of $RUNS runs (per_second, p50_us, p99_us)"
python3 - "$OUT" <<'EOF'
import json, statistics, sys
from collections import defaultdict
groups = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    conc = r.get("workers", r.get("publishers"))
    groups[(r["scenario"].split("-", 1)[1], conc, r["scenario"], r["store"])].append(r)
for (_, conc, scenario, store), rs in sorted(groups.items()):
    med = lambda k: statistics.median(x[k] for x in rs)
    print(f"{scenario:18} {store:15} x{conc:<4} {med('per_second'):>8.0f}/s  p50 {med('p50_us'):>6.0f} us  p99 {med('p99_us'):>7.0f} us")
EOF
