#!/usr/bin/env bash
# Server memory per idle WebSocket subscriber: Herald beside nats-server (its WebSocket
# listener), mosquitto (a websockets listener) and rumqttd (its ws listener), in one run
# on one machine. Each measurement starts a fresh server, reads its VmRSS, opens
# CONNECTIONS WebSockets that each subscribe to one topic (`peer-bench idle`, confirmed
# by the server), waits SETTLE seconds, reads VmRSS again, then closes the connections
# and stops the server (a fresh one per measurement: memory a server freed is not always
# returned to the OS, so a reused server would measure less). Servers alternate within a
# run, RUNS times; every measurement is a JSON line in $OUT, the medians are printed at
# the end:
#   per_connection_bytes = (rss_after_kib - rss_before_kib) * 1024 / subscribed connections
#
# Usage (from the repository root):
#   cargo build --release
#   (cd tools/peer-bench && cargo build --release)
#   cargo install rumqttd --version 0.20.0 --locked --root /work/.peers   # optional; skipped if absent
#   RUNS=3 CONNECTIONS=10000 tools/idle-bench.sh
#   SERVERS="herald nats" RUNS=1 CONNECTIONS=1000 tools/idle-bench.sh      # a subset, quickly
#
# Limits: every process here may open at most `ulimit -Hn` files (20,000 on the
# benchmark machine, not raisable), the servers as much as the client, so CONNECTIONS
# stays under about 19,900. SOURCE_IPS (e.g. 127.0.0.1,127.0.0.2) spreads the client's
# connections over several local addresses, each good for about 28,000 ephemeral ports.
#
# mosquitto 2.0.11 (Debian 12) refuses to start with only a websockets listener ("Unable
# to start any listening sockets"), so it gets a plain MQTT listener too, left unused;
# its websockets listener (libwebsockets) binds every interface whatever address is given.
# MQTT clients connect with keep-alive 65535 s, not 0: rumqttd refuses 0.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-10000}
SETTLE=${SETTLE:-2}
SERVERS=${SERVERS:-herald nats mosquitto rumqttd}
SOURCE_IPS=${SOURCE_IPS:-}
OUT=${OUT:-/tmp/herald-idle-bench.jsonl}
HERALD=${HERALD:-target/release/herald}
PEER=${PEER:-tools/peer-bench/target/release/peer-bench}
NATS_SERVER=${NATS_SERVER:-nats-server}
MOSQUITTO=${MOSQUITTO:-mosquitto}
RUMQTTD=${RUMQTTD:-/work/.peers/bin/rumqttd}
HERALD_WAIT=${HERALD_WAIT:-3600}   # seconds to wait for $HERALD to appear (a build in progress)

ulimit -n 20000
if (( CONNECTIONS > $(ulimit -n) - 100 )); then
    echo "CONNECTIONS=$CONNECTIONS is more than one process may open here (ulimit -n $(ulimit -n))" >&2
    exit 1
fi
[ -x "$PEER" ] || { echo "no $PEER: run (cd tools/peer-bench && cargo build --release)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/herald-idle-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
: >"$OUT"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_port PORT: waits (10 s at most) until something accepts on 127.0.0.1:PORT.
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    return 1
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# Which servers can run here; the others are skipped with a message.
selected=()
for server in $SERVERS; do
    case $server in
    herald)
        if [ ! -x "$HERALD" ]; then
            echo "waiting up to ${HERALD_WAIT}s for $HERALD (a release build may be in progress)" >&2
            for _ in $(seq "$HERALD_WAIT"); do [ -x "$HERALD" ] && break; sleep 1; done
        fi
        [ -x "$HERALD" ] && selected+=(herald) || echo "skipping herald: no $HERALD" >&2
        ;;
    nats)
        command -v "$NATS_SERVER" >/dev/null && selected+=(nats) || echo "skipping nats: no $NATS_SERVER" >&2
        ;;
    mosquitto)
        if ! command -v "$MOSQUITTO" >/dev/null; then
            echo "skipping mosquitto: no $MOSQUITTO" >&2
        elif ! grep -qa lws_create_context "$(command -v "$MOSQUITTO")"; then
            echo "skipping mosquitto: built without websockets (libwebsockets)" >&2
        else
            selected+=(mosquitto)
        fi
        ;;
    rumqttd)
        [ -x "$RUMQTTD" ] && selected+=(rumqttd) || echo "skipping rumqttd: no $RUMQTTD (see Usage)" >&2
        ;;
    *) echo "unknown server $server (herald, nats, mosquitto, rumqttd)" >&2; exit 1 ;;
    esac
done
(( ${#selected[@]} )) || { echo "no server to measure" >&2; exit 1; }

HERALD_PORT=$(free_port)
NATS_PORT=$(free_port)
NATS_WS_PORT=$(free_port)
MQ_PORT=$(free_port)
MQ_WS_PORT=$(free_port)
RUMQTTD_WS_PORT=$(free_port)

cat >"$WORK/nats.conf" <<EOF
listen: 127.0.0.1:$NATS_PORT
max_connections: 100000
websocket {
  host: 127.0.0.1
  port: $NATS_WS_PORT
  no_tls: true
}
EOF

cat >"$WORK/mosquitto.conf" <<EOF
allow_anonymous true
persistence false
connection_messages false
log_dest stderr
log_type error
log_type warning
listener $MQ_PORT 127.0.0.1
max_connections -1
listener $MQ_WS_PORT 127.0.0.1
protocol websockets
max_connections -1
EOF

rumqttd_config "$WORK/rumqttd.toml" "$RUMQTTD_WS_PORT"

# start SERVER: starts a fresh server in the background, waits until it listens and
# sets PID, TARGET, URL and PORT (the port the subscribers connect to).
start() {
    case $1 in
    herald)
        "$HERALD" serve --store memory --listen "127.0.0.1:$HERALD_PORT" >>"$WORK/herald.log" 2>&1 &
        PID=$!
        wait_ready "http://127.0.0.1:$HERALD_PORT"
        TARGET=herald URL="ws://127.0.0.1:$HERALD_PORT/v1/ws" PORT=$HERALD_PORT
        ;;
    nats)
        "$NATS_SERVER" -c "$WORK/nats.conf" >>"$WORK/nats.log" 2>&1 &
        PID=$!
        wait_port "$NATS_WS_PORT"
        TARGET=nats URL="ws://127.0.0.1:$NATS_WS_PORT" PORT=$NATS_WS_PORT
        ;;
    mosquitto)
        "$MOSQUITTO" -c "$WORK/mosquitto.conf" >>"$WORK/mosquitto.log" 2>&1 &
        PID=$!
        wait_port "$MQ_WS_PORT"
        TARGET=mqtt URL="ws://127.0.0.1:$MQ_WS_PORT/mqtt" PORT=$MQ_WS_PORT
        ;;
    rumqttd)
        "$RUMQTTD" -q -c "$WORK/rumqttd.toml" >>"$WORK/rumqttd.log" 2>&1 &
        PID=$!
        wait_port "$RUMQTTD_WS_PORT"
        TARGET=mqtt URL="ws://127.0.0.1:$RUMQTTD_WS_PORT/mqtt" PORT=$RUMQTTD_WS_PORT
        ;;
    esac
    # The readiness probe's own connection is gone before the first reading.
    sleep 0.5
}

# measure SERVER: one measurement on a fresh server, one JSON line in $OUT.
measure() {
    local server=$1 before after ready established gen fifo=$WORK/ctl
    start "$server"
    before=$(rss_kib "$PID")
    rm -f "$fifo" "$WORK/idle.out"
    mkfifo "$fifo"
    "$PEER" idle --target "$TARGET" --url "$URL" --connections "$CONNECTIONS" \
        ${SOURCE_IPS:+--source-ips "$SOURCE_IPS"} --json \
        <"$fifo" >"$WORK/idle.out" 2>>"$WORK/idle-$server.err" &
    gen=$!
    exec 3>"$fifo" # the generator's stdin: it holds its connections until this closes
    until grep -q '}' "$WORK/idle.out" 2>/dev/null; do
        if ! kill -0 "$gen" 2>/dev/null; then
            echo "peer-bench idle against $server ended before reporting:" >&2
            tail -5 "$WORK/idle-$server.err" >&2
            exit 1
        fi
        sleep 0.1
    done
    ready=$(head -1 "$WORK/idle.out")
    sleep "$SETTLE"
    after=$(rss_kib "$PID")
    established=$(ss -Htn state established "( sport = :$PORT )" | wc -l)
    exec 3>&- # stdin EOF: the generator closes its connections and exits
    wait "$gen"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    jq -cn --arg server "$server" --argjson r "$ready" --argjson before "$before" --argjson after "$after" \
        --argjson established "$established" \
        '{server: $server, connections: $r.connections, subscribed: $r.subscribed, failed: $r.failed,
          established: $established, connect_ms: $r.connect_ms,
          rss_before_kib: $before, rss_after_kib: $after,
          per_connection_bytes: (if $r.subscribed > 0
              then (($after - $before) * 1024 / $r.subscribed | round) else null end)}' | tee -a "$OUT"
}

echo "== versions"
for server in "${selected[@]}"; do
    case $server in
    herald) echo "herald: $("$HERALD" --version 2>&1 | head -1), $HERALD built $(date -r "$HERALD" '+%F %T'), sha256 $(sha256sum "$HERALD" | cut -c1-12)" ;;
    nats) echo "nats: $("$NATS_SERVER" --version 2>&1 | head -1)" ;;
    mosquitto) echo "mosquitto: $("$MOSQUITTO" -h 2>&1 | head -1)" ;;
    rumqttd) echo "rumqttd: $("$RUMQTTD" --version 2>&1 | head -1)" ;;
    esac
done
echo "== $CONNECTIONS idle WebSocket subscribers, $RUNS run(s), servers: ${selected[*]}"
for run in $(seq 1 "$RUNS"); do
    for server in "${selected[@]}"; do
        measure "$server"
    done
done

echo "== medians of $RUNS run(s): server memory per idle WebSocket subscriber"
python3 - "$OUT" <<'EOF'
import json, statistics, sys
from collections import defaultdict
groups = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    groups[r["server"]].append(r)
print(f"{'server':10} {'connections':>11} {'failed':>6} {'rss before':>11} {'rss after':>11} {'per connection':>15}  runs (bytes)")
for server, rs in groups.items():
    med = lambda k: statistics.median(r[k] for r in rs)
    per = [r["per_connection_bytes"] for r in rs if r["per_connection_bytes"] is not None]
    print(f"{server:10} {rs[0]['connections']:>11} {sum(r['failed'] for r in rs):>6} "
          f"{med('rss_before_kib') / 1024:>8.1f} MiB {med('rss_after_kib') / 1024:>7.1f} MiB "
          f"{statistics.median(per) if per else float('nan'):>9.0f} bytes  {per}")
EOF
