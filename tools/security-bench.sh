#!/usr/bin/env bash
# The cost of security (docs/BENCHMARKS.md, "TLS and auth"): the same fan-out and publish
# runs against a plain node, a node with the abuse limits applied to loopback (default
# rates, trusted_networks emptied), and a node with TLS and [auth] (Basic auth, grants on
# every topic), alternating, RUNS times each; prints every run as a JSON line, then the
# medians. Makes its own CA and certificate (openssl) and password hash (herald passwd).
#
# Usage (from the repository root):
#   cargo build --release && RUNS=3 tools/security-bench.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BIN=${BIN:-target/release/herald}
RUNS=${RUNS:-3}
SUBS=${SUBS:-1000}
MESSAGES=${MESSAGES:-2000}
WORK=$(mktemp -d /tmp/herald-security-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

cd "$WORK"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj '/CN=bench CA' -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj '/CN=herald' \
  -keyout key.pem -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > san.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
  -extfile san.ext -out cert.pem 2>/dev/null
cd - >/dev/null
HASH=$(printf 'bench-pw\n' | "$BIN" passwd)
cat > "$WORK/secure.toml" <<TOML
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"

[[auth.users]]
name = "bench"
password_hash = "$HASH"
grants = { publish = [">"], subscribe = [">"], admin = [">"] }
TOML

cat > "$WORK/limits.toml" <<TOML
[limits]
trusted_networks = []
connections_per_second_per_ip = 0   # the fan-out bench opens its 1000 sockets at once
TOML

# measure NAME URL [flags...]
measure() {
  local name=$1 url=$2
  shift 2
  local fanout publish
  fanout=$("$BIN" bench fanout --url "$url" "$@" --subscribers "$SUBS" --messages "$MESSAGES" --json)
  publish=$("$BIN" bench publish --url "$url" "$@" --publishers 16 --messages 20000 --json)
  jq -cn --arg name "$name" --argjson f "$fanout" --argjson p "$publish" \
    '{setup: $name, deliveries_per_second: $f.deliveries_per_second,
      publish_per_second: $p.per_second, publish_p50_us: $p.p50_us, publish_p99_us: $p.p99_us}' | tee -a "$WORK/results"
}

for _ in $(seq "$RUNS"); do
  "$BIN" serve --listen 127.0.0.1:17501 --store memory 2>>"$WORK/log" &
  wait_ready http://127.0.0.1:17501
  measure plain http://127.0.0.1:17501
  stop_nodes

  "$BIN" serve --listen 127.0.0.1:17503 --store memory --config "$WORK/limits.toml" 2>>"$WORK/log" &
  wait_ready http://127.0.0.1:17503
  measure limits http://127.0.0.1:17503
  stop_nodes

  "$BIN" serve --listen 127.0.0.1:17502 --store memory --config "$WORK/secure.toml" 2>>"$WORK/log" &
  wait_ready https://127.0.0.1:17502 --cacert "$WORK/ca.pem"
  measure tls+auth https://127.0.0.1:17502 --ca "$WORK/ca.pem" --user bench:bench-pw
  stop_nodes
done

echo "medians over $RUNS runs:"
jq -s -c 'group_by(.setup)[] | . as $runs
  | def median(f): ([$runs[] | f] | sort | .[(length - 1) / 2 | floor]);
  {setup: $runs[0].setup,
   deliveries_per_second: median(.deliveries_per_second),
   publish_per_second: median(.publish_per_second),
   publish_p50_us: median(.publish_p50_us), publish_p99_us: median(.publish_p99_us)}' "$WORK/results"
