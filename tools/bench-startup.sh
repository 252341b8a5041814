#!/usr/bin/env bash
# Start-up time with N stored messages: Herald's disk store beside NATS JetStream
# (file storage), in the same run, on this machine. Prints one line per restart.
#
# Usage (from the repository root, after building both tools in release):
#   cargo build --release
#   (cd tools/peer-bench && cargo build --release)
#   N=1000000 RUNS=3 tools/bench-startup.sh
#
# Each store is filled once with N messages of 128 bytes (plus 500 warm-up ones) by
# 16 concurrent publishers, the server is stopped, and then started RUNS times; a start
# counts as done when the server answers with all N messages visible:
#   Herald: GET /v1/topics/startup shows the last offset;
#   NATS:   the monitoring endpoint /jsz reports the stream's message count.
# Polling every 5 ms bounds the error of each figure by about 5 ms.
set -euo pipefail

N=${N:-1000000}
RUNS=${RUNS:-3}
HERALD=${HERALD:-target/release/herald}
PEER=${PEER:-tools/peer-bench/target/release/peer-bench}
NATS_SERVER=${NATS_SERVER:-nats-server}
WORK=$(mktemp -d /tmp/herald-startup.XXXXXX)
HERALD_URL=http://127.0.0.1:7171
EXPECTED=$((N + 500))
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# wait_until CMD...: runs CMD every 5 ms until it succeeds (60 s at most).
wait_until() {
    local deadline=$(($(now_ms) + 60000))
    until "$@" >/dev/null 2>&1; do
        if (($(now_ms) > deadline)); then echo "timed out waiting for: $*" >&2; return 1; fi
        sleep 0.005
    done
}

herald_holds_all() { curl -sf "$HERALD_URL/v1/topics/startup" | grep -q "\"last\":$EXPECTED\b"; }
herald_up() { curl -sf "$HERALD_URL/healthz"; }
nats_holds_all() { curl -sf "http://127.0.0.1:8223/jsz" | grep -q "\"messages\": $EXPECTED\b"; }
nats_up() { curl -sf "http://127.0.0.1:8223/healthz"; }

start_herald() {
    "$HERALD" serve --listen 127.0.0.1:7171 --data-dir "$WORK/herald" --retention-max-messages "$EXPECTED" \
        "$@" >>"$WORK/herald.log" 2>&1 &
    pid=$!
}
start_nats() {
    "$NATS_SERVER" -js -sd "$WORK/nats" -p 4223 -m 8223 >>"$WORK/nats.log" 2>&1 &
    pid=$!
}
# start_* set $pid to the server's process id; stop waits until it has exited.
stop() { kill -TERM "$1" && wait "$1" || true; }

echo "== filling: $N messages of 128 bytes each"
start_herald --fsync never
wait_until herald_up
"$HERALD" bench publish --url "$HERALD_URL" --publishers 16 --messages "$N" --topic startup --keep
stop "$pid"
start_nats
wait_until nats_up
"$PEER" jetstream-publish --url nats://127.0.0.1:4223 --publishers 16 --messages "$N" --stream STARTUP --keep
stop "$pid"
echo "on disk: herald $(du -sh "$WORK/herald" | cut -f1), nats $(du -sh "$WORK/nats" | cut -f1)"

for run in $(seq 1 "$RUNS"); do
    t0=$(now_ms)
    start_herald
    wait_until herald_holds_all
    echo "herald start-up with $EXPECTED messages: $(($(now_ms) - t0)) ms (run $run)"
    stop "$pid"
    t0=$(now_ms)
    start_nats
    wait_until nats_holds_all
    echo "nats-jetstream start-up with $EXPECTED messages: $(($(now_ms) - t0)) ms (run $run)"
    stop "$pid"
done
