#!/usr/bin/env bash
# Server memory per retained message on the memory store: a fresh Herald keeps
# MESSAGES messages of SIZE bytes on one topic (retention set to keep them all), and the
# growth of its VmRSS is divided by the messages retained. Two scenarios, RUNS times
# each, a fresh server per measurement:
#   retained   published with nobody subscribed
#   fanned     the same while two subscribers take every message live over two wire
#              forms (WebSocket JSON frames and gRPC stream messages); measured after
#              both received the last one, so any encoded form a message keeps shows
# Every measurement is a JSON line in $OUT; the medians are printed at the end:
#   bytes_per_message = (rss_after_kib - rss_before_kib) * 1024 / messages retained
#
# Usage (from the repository root):
#   cargo build --release
#   RUNS=3 tools/memory-bench.sh                         # 1,000,000 x 128 bytes
#   HERALD=/other/herald LABEL=before RUNS=3 tools/memory-bench.sh   # another server build, same $OUT
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RUNS=${RUNS:-3}
MESSAGES=${MESSAGES:-1000000}
SIZE=${SIZE:-128}
SCENARIOS=${SCENARIOS:-retained fanned}
OUT=${OUT:-/tmp/herald-memory-bench.jsonl}
HERALD=${HERALD:-target/release/herald}   # the server measured
CLIENT=${CLIENT:-target/release/herald}   # the subscribers and the publisher
LABEL=${LABEL:-herald}
PORT=${PORT:-7195}
URL=http://127.0.0.1:$PORT
WORK=$(mktemp -d /tmp/herald-memory.XXXXXX)
trap 'stop_nodes; rm -rf "$WORK"' EXIT

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# `herald bench grpc-publish` sends 1000 untimed warm-up messages before MESSAGES.
total=$((MESSAGES + 1000))

measure() {
    local scenario=$1
    "$HERALD" serve --store memory --listen "127.0.0.1:$PORT" \
        --retention-max-messages $((total * 2)) --retention-max-age 24h >"$WORK/herald.log" 2>&1 &
    local pid=$!
    wait_ready "$URL"
    local subs=()
    if [ "$scenario" = fanned ]; then
        # Each exits after the last message; a subscriber closed as slow fails the run.
        "$CLIENT" sub --url "$URL" -n "$total" bench >/dev/null &
        subs+=($!)
        "$CLIENT" sub --url "$URL" --grpc -n "$total" bench >/dev/null &
        subs+=($!)
        # Both subscribed once the topic counts two subscribers.
        until curl -sf "$URL/metrics" | grep -q '^herald_subscriptions 2$'; do sleep 0.05; done
    fi
    local before
    before=$(rss_kib "$pid")
    "$CLIENT" bench grpc-publish --url "$URL" --publishers 2 --batch 1000 --size "$SIZE" \
        --messages "$MESSAGES" --topics 1 --topic bench >"$WORK/publish.txt"
    for sub in "${subs[@]}"; do
        wait "$sub"
    done
    local after
    after=$(rss_kib "$pid")
    local retained
    retained=$(curl -sf "$URL/v1/topics/bench" | python3 -c 'import json,sys; print(json.load(sys.stdin)["retained"])')
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    python3 - "$LABEL" "$scenario" "$retained" "$SIZE" "$before" "$after" <<'EOF' | tee -a "$OUT"
import json, sys
label, scenario, retained, size, before, after = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
per = (after - before) * 1024 / retained
print(json.dumps({"server": label, "scenario": scenario, "messages": retained, "size": size,
                  "rss_before_kib": before, "rss_after_kib": after,
                  "bytes_per_message": round(per, 1), "ratio_to_payload": round(per / size, 2)}))
EOF
}

for run in $(seq 1 "$RUNS"); do
    for scenario in $SCENARIOS; do
        measure "$scenario"
    done
done

echo "== medians (bytes per retained message, ratio to the payload) from $OUT"
python3 - "$OUT" <<'EOF'
import json, statistics, sys
from collections import defaultdict
groups = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    groups[(r["server"], r["scenario"], r["size"])].append(r)
for (server, scenario, size), rs in sorted(groups.items()):
    per = statistics.median(r["bytes_per_message"] for r in rs)
    print(f"{server:10} {scenario:9} {size:5} B  {per:8.1f} B/message  {per / size:5.2f}x payload  ({len(rs)} runs)")
EOF
