#!/usr/bin/env bash
# End-to-end fan-out over WebSocket, Herald beside nats-server and rumqttd, in one run:
# T topics x S subscribers per topic on WebSockets, P publishers, 128-byte messages
# (default: one topic, one publisher, 100 and then 1000 subscribers), deliveries per
# second to the last delivery, and each server's CPU time per delivery over the run. Herald,
# NATS and rumqttd runs alternate, RUNS times each; every result is a JSON line in $OUT
# and the medians are printed at the end.
#
# Shapes (SHAPES, each topics:subscribers-per-topic:publishers; MESSAGES per topic) and
# Herald's subscriber protocols (PROTOCOLS) are chosen by the environment; issue 12's
# 100 topics x 10 subscribers x 10 publishers:
#   SHAPES=100:10:10 PROTOCOLS="raw json packed" MESSAGES=2000 RUNS=5 tools/bench-fanout.sh
#
# Usage (from the repository root):
#   cargo build --release
#   (cd tools/peer-bench && cargo build --release)
#   cargo install rumqttd --version 0.20.0 --locked --root /work/.peers   # optional; skipped if absent
#     (on a newer Rust its locked `metrics` 0.22.1 fails to build: unpack the crate, run
#     `cargo update -p metrics` in it, then `cargo install --path . --locked --root ...`)
#   RUNS=3 tools/bench-fanout.sh
#
# Starts its own servers: Herald on the memory store and on the disk store (fsync
# always, the default), a nats-server with a WebSocket listener (the machine's own
# nats-server has none), and rumqttd ($RUMQTTD) with only a WebSocket listener, measured
# with MQTT 3.1.1 at QoS 0 (`peer-bench mqtt-ws-fanout`: subscribers and publisher all
# on WebSockets; the NATS publisher uses the client port).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RUNS=${RUNS:-3}
MESSAGES=${MESSAGES:-5000}
# Shapes as topics:subscribers-per-topic:publishers; Herald's subscriber protocols
# (`herald bench fanout --protocol`: raw, json, packed).
SHAPES=${SHAPES:-1:100:1 1:1000:1}
PROTOCOLS=${PROTOCOLS:-raw}
OUT=${OUT:-/tmp/herald-bench-fanout.jsonl}
HERALD=${HERALD:-target/release/herald}
PEER=${PEER:-tools/peer-bench/target/release/peer-bench}
NATS_SERVER=${NATS_SERVER:-nats-server}
RUMQTTD=${RUMQTTD:-/work/.peers/bin/rumqttd}
WORK=$(mktemp -d /tmp/herald-fanout.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; rm -rf "$WORK"' EXIT
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

# rumqttd, configured by lib.sh's rumqttd_config: its own default config (`rumqttd
# generate-config`, and the [ws.1] section of its example rumqttd.toml) with only a
# WebSocket listener, no console or prometheus.
# Checked against 1000 subscribers and a publisher at full speed (rumqttd 0.20.0 source):
# - router max_connections 20010 (default 10010, raised for idle-bench.sh): above 1000
#   subscribers + 1 publisher;
# - max_outgoing_packet_count 200 (default): QoS 0 messages read from the topic's log per
#   connection per sweep; a subscriber behind is served in more sweeps, never dropped;
# - max_segment_size 100 MiB x max_segment_count 10 (default): the log a slow QoS 0
#   subscriber reads from; a run publishes at most a few MB, far from wrapping it;
# - max_payload_size 20480 (default): above a 128-byte message;
# - max_inflight_count 500 (the ws default): QoS 1/2 window; for QoS 0 only the most
#   packets read from one connection in a batch (the publisher is back-pressured, not
#   dropped); the router's per-connection outgoing queue (200) is a constant.
# Changed: next_connection_delay_ms 0 instead of 1 (a 1 ms sleep after each accept; the
# subscribers connect one after another, so it would only add ~1 s per 1000 to set-up).
rumqttd_pid=
if [ -x "$RUMQTTD" ]; then
    RUMQTTD_WS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    rumqttd_config "$WORK/rumqttd.toml" "$RUMQTTD_WS_PORT"
    "$RUMQTTD" -q -c "$WORK/rumqttd.toml" >"$WORK/rumqttd.log" 2>&1 &
    rumqttd_pid=$!
    until (exec 3<>"/dev/tcp/127.0.0.1/$RUMQTTD_WS_PORT") 2>/dev/null; do
        kill -0 "$rumqttd_pid" 2>/dev/null || { echo "rumqttd did not start:" >&2; cat "$WORK/rumqttd.log" >&2; exit 1; }
        sleep 0.05
    done
else
    echo "skipping rumqttd: no $RUMQTTD (see Usage)" >&2
fi

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
    for shape in $SHAPES; do
        IFS=: read -r topics subscribers publishers <<<"$shape"
        args=(--topics "$topics" --subscribers "$subscribers" --publishers "$publishers" --messages "$MESSAGES" --json)
        for protocol in $PROTOCOLS; do
            measure memory "$memory_pid" "$HERALD" bench fanout --url http://127.0.0.1:7181 --protocol "$protocol" "${args[@]}"
        done
        measure nats "$nats_pid" "$PEER" nats-ws-fanout "${args[@]}"
        if [ -n "$rumqttd_pid" ]; then
            measure rumqttd "$rumqttd_pid" "$PEER" mqtt-ws-fanout --url "ws://127.0.0.1:$RUMQTTD_WS_PORT/mqtt" "${args[@]}"
        fi
        for protocol in $PROTOCOLS; do
            measure disk "$disk_pid" "$HERALD" bench fanout --url http://127.0.0.1:7182 --protocol "$protocol" "${args[@]}"
        done
    done
done

echo "== medians of $RUNS runs (deliveries per second; server CPU per delivery)"
python3 - "$OUT" <<'EOF'
import json, statistics, sys
from collections import defaultdict
groups = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    shape = (r.get("topics", 1), r["subscribers"], r.get("publishers", 1))
    groups[(shape, r["scenario"], r.get("protocol", ""), r["store"])].append(r)
for ((topics, subs, pubs), scenario, protocol, store), rs in sorted(groups.items()):
    xs = [r["deliveries_per_second"] for r in rs]
    cpu = [r["server_cpu_ns_per_delivery"] for r in rs]
    print(f"{topics}x{subs}x{pubs} {scenario:15} {protocol:6} {store:7} {statistics.median(xs):>10.0f}/s  "
          f"{statistics.median(cpu):>5.0f} ns CPU/delivery  runs {xs} {cpu}")
EOF
