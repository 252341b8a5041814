#!/usr/bin/env bash
# A real Prometheus scrapes a running Herald and answers every query of the Grafana
# dashboard (deploy/grafana/dashboards/herald.json) with data.
#
#   HERALD=target/debug/herald bash deploy/prometheus-check.sh
#
# Starts Herald (disk store, a scratch data directory, a free loopback port) and
# Prometheus (PROMETHEUS, default `prometheus` from the PATH: Debian's `prometheus`
# package; scrape interval 1 s, a scratch TSDB, another free port), runs a small
# workload (a subscriber, 20 publishes, a queue round trip), waits until Prometheus has
# scraped the result twice, then runs deploy/prometheus_query.py. Exits non-zero if a
# query fails or returns no series. Without a Prometheus binary it says so and fails,
# unless SKIP_WITHOUT_PROMETHEUS=1.
set -euo pipefail
cd "$(dirname "$0")/.."

HERALD=${HERALD:-target/debug/herald}
PROMETHEUS=${PROMETHEUS:-prometheus}
if ! command -v "$PROMETHEUS" >/dev/null 2>&1; then
  echo "  no Prometheus binary ($PROMETHEUS): apt-get install prometheus"
  [ "${SKIP_WITHOUT_PROMETHEUS:-}" = 1 ] && exit 0
  exit 1
fi
work=$(mktemp -d /tmp/herald-prometheus.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

port=$(free_port)
url="http://127.0.0.1:$port"
# No HERALD_* from the caller's environment (a config file, a cluster) in this node.
env $(env | sed -n 's/^\(HERALD_[A-Za-z0-9_]*\)=.*/-u \1/p') \
  "$HERALD" serve --data-dir "$work/data" --listen "127.0.0.1:$port" --metrics-topics check >"$work/herald.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fsS "$url/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "$url/readyz" >/dev/null || { echo "  FAIL  herald did not start:"; cat "$work/herald.log"; exit 1; }

pport=$(free_port)
cat >"$work/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: herald
    static_configs:
      - targets: ["127.0.0.1:$port"]
YAML
"$PROMETHEUS" --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$pport" --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)
prom="http://127.0.0.1:$pport"
echo "  ..    $("$PROMETHEUS" --version 2>&1 | head -1) on $prom scraping herald on $url every 1 s"

q() { curl -fsS "$prom/api/v1/query" --data-urlencode "query=$1" | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'; }
# The first scrape before the workload, so that rates see it happen.
for _ in $(seq 150); do
  [ "$(q 'up{job="herald"}' 2>/dev/null)" = 1 ] && break
  sleep 0.2
done

# The workload: a subscriber of `check`, 20 publishes, a queue round trip.
"$HERALD" sub --url "$url" -n 20 check >"$work/sub.out" &
sub=$!
pids+=($sub)
for _ in $(seq 100); do
  [ "$(curl -fsS "$url/v1/topics/check" | python3 -c 'import json,sys; print(json.load(sys.stdin)["subscribers"])')" = 1 ] && break
  sleep 0.1
done
for i in $(seq 20); do
  curl -fsS -o /dev/null -H 'content-type: application/json' -d "\"message $i\"" "$url/v1/topics/check/messages"
done
wait "$sub"
for job in 1 2 3; do
  curl -fsS -o /dev/null -H 'content-type: application/json' -d "\"job $job\"" "$url/v1/queues/jobs/messages"
done
id=$(curl -fsS -X POST "$url/v1/queues/jobs/fetch" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"][0]["id"])')
curl -fsS -o /dev/null -X POST "$url/v1/queues/jobs/ack/$id"
echo "  ..    workload done: $(wc -l <"$work/sub.out") messages received by herald sub, a queue round trip"

# Two scrapes after the workload: the counters' last values are in, rates have points.
for _ in $(seq 150); do
  [ "$(q 'herald_queue_acked_total' 2>/dev/null)" = 1 ] && break
  sleep 0.2
done
sleep 2.2 # two more scrape intervals (1 s each): nothing to await in Prometheus for them
echo "  ..    up = $(q 'up{job="herald"}'), herald_messages_published_total = $(q herald_messages_published_total)"
python3 deploy/prometheus_query.py "$prom"
