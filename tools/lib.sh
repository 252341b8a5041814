# Helpers the benchmark scripts share (sourced, never run): wait for a node to be
# ready, stop the nodes a script started in the background.

# wait_ready URL [curl options...]: waits (10 s at most) until URL/readyz answers 200.
wait_ready() {
  local url=$1
  shift
  for _ in $(seq 200); do
    curl -sf -o /dev/null "$@" "$url/readyz" && return 0
    sleep 0.05
  done
  echo "node at $url did not become ready" >&2
  return 1
}

# stop_nodes: kills the calling shell's background jobs (its nodes) and waits for them.
stop_nodes() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
}

# rumqttd_config FILE PORT: rumqttd's own default configuration (`rumqttd
# generate-config`) with only a WebSocket listener on 127.0.0.1:PORT, no console or
# prometheus, room for 20 000 connections and no delay between accepts (bench-fanout.sh
# says why each limit suits its runs).
rumqttd_config() {
  cat >"$1" <<EOF
id = 0

[router]
id = 0
max_connections = 20010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[ws.1]
name = "ws-1"
listen = "127.0.0.1:$2"
next_connection_delay_ms = 0
    [ws.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 500
    dynamic_filters = true
EOF
}
