#!/usr/bin/env bash
# Instructions per delivery of Herald's fan-out, counted by callgrind: a repeatable
# profile (instruction counts do not depend on the machine's load, unlike timings).
#
# The server (memory store) runs under `valgrind --tool=callgrind` twice with the same
# subscribers, once for FEW and once for MANY messages published by `herald bench
# fanout` (running natively); everything but the extra messages (start-up, connections,
# subscriptions, shutdown) is the same in both, so
#   instructions per delivery = (I(MANY) - I(FEW)) / (subscribers x (MANY - FEW)).
# Then the functions with the most instructions of the MANY run (self cost, callgrind's
# inclusive view is in the kept output file).
#
# Usage (from the repository root):
#   cargo build --release
#   tools/callgrind-fanout.sh                       # 1 topic x 1000 raw subscribers
#   SUBSCRIBERS=100 PROTOCOL=packed tools/callgrind-fanout.sh
#   TOPICS=100 SUBSCRIBERS=10 PUBLISHERS=10 PROTOCOL=packed tools/callgrind-fanout.sh
#
# Variables: TOPICS (1), SUBSCRIBERS per topic (1000), PUBLISHERS (1), PROTOCOL (raw,
# json or packed), FEW (200) and MANY (1200) messages per topic, SIZE (128), TOP (25
# functions shown), HERALD (target/release/herald), PORT (7199), KEEP=1 keeps the
# callgrind output files (their directory is printed).
set -euo pipefail

TOPICS=${TOPICS:-1}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
PUBLISHERS=${PUBLISHERS:-1}
PROTOCOL=${PROTOCOL:-raw}
FEW=${FEW:-200}
MANY=${MANY:-1200}
SIZE=${SIZE:-128}
TOP=${TOP:-25}
HERALD=${HERALD:-target/release/herald}
PORT=${PORT:-7199}
WORK=$(mktemp -d /tmp/herald-callgrind.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; [ "${KEEP:-}" = 1 ] || rm -rf "$WORK"' EXIT

command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

# count MESSAGES: runs one server under callgrind through one bench run; prints the
# instructions it executed in all.
count() {
    local messages=$1 out="$WORK/callgrind.$1" pid
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$HERALD" serve --listen "127.0.0.1:$PORT" --store memory >"$WORK/server.$messages.log" 2>&1 &
    pid=$!
    until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do
        kill -0 "$pid" 2>/dev/null || { cat "$WORK/server.$messages.log" >&2; exit 1; }
        sleep 0.2
    done
    "$HERALD" bench fanout --url "http://127.0.0.1:$PORT" --topics "$TOPICS" --subscribers "$SUBSCRIBERS" \
        --publishers "$PUBLISHERS" --messages "$messages" --size "$SIZE" --protocol "$PROTOCOL" --timeout 1200 >&2
    kill -TERM "$pid"
    wait "$pid" || true
    awk '/^(summary|totals):/ { print $2; exit }' "$out"
}

few=$(count "$FEW")
many=$(count "$MANY")
deliveries=$(( TOPICS * SUBSCRIBERS * (MANY - FEW) ))
echo "topics=$TOPICS subscribers=$SUBSCRIBERS publishers=$PUBLISHERS protocol=$PROTOCOL size=$SIZE:" \
    "$few instructions with $FEW messages per topic, $many with $MANY:" \
    "$(( (many - few) / deliveries )) instructions per delivery"
callgrind_annotate --inclusive=no "$WORK/callgrind.$MANY" 2>/dev/null | sed -n "1,$(( TOP + 25 ))p" | grep -E '^\s*[0-9,]+ ' | head -n "$TOP"
if [ "${KEEP:-}" = 1 ]; then echo "callgrind output kept in $WORK"; fi
