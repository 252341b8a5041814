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
