#!/usr/bin/env bash
# The PostgreSQL store beside the disk store and beside a PostgreSQL job-queue peer
# (graphile-worker, tools/pg-peer), on one machine in one run (docs/BENCHMARKS.md,
# "PostgreSQL store"):
#   publish: `herald bench publish` with PUBLISHERS WebSocket publishers (each waits
#            for its ack), 128-byte messages, on the disk store (fsync always) and on
#            PostgreSQL (synchronous_commit on, the server's default)
#   queue:   `herald bench queue` with WORKERS workers (each enqueues, fetches, acks)
#   queue-fetch1: `--producers 1 --batch BATCH --fetch 1`: one producer enqueues BATCH
#            jobs per request while WORKERS workers each fetch one job and ack it (the
#            shape of graphile-worker's default mode: one producer adding 1000 jobs per
#            call, workers taking one job at a time); FETCH1_MESSAGES jobs per run
#   queue-fetch1-ack: the same with `--ack-with-fetch`: each worker acks its job with
#            its next fetch (one request per job instead of two)
#   queue-batch: `--producers 1 --batch BATCH` (the workers fetch up to 100 jobs at a
#            time and ack each fetch's in one request; the shape of graphile-worker's
#            batched mode); BATCH_MESSAGES jobs per run
#   queue-batch-ack: the same with `--ack-with-fetch`: each worker acks a fetch's jobs
#            with its next fetch
#            CASES picks some of these (default all); BATCH=1 leaves the last four out
#   peer:    tools/pg-peer/run.sh (graphile-worker 0.17: enqueue jobs/s with PRODUCERS
#            producers, job round trips/s with WORKERS workers, out of the box and in
#            its batched mode) on the same database
# Each Herald case runs RUNS times on a fresh server (a fresh data directory or schema),
# and the peer once after each round; every run is a JSON line in $OUT; the medians
# are printed at the end.
#
# Usage (from the repository root, PostgreSQL on 127.0.0.1:5432, database test):
#   cargo build --release && RUNS=3 tools/pg-bench.sh
#   RUNS=3 STORES=postgres CASES="queue-batch queue-batch-ack" PEER_MODES=batched PUBLISHERS= tools/pg-bench.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BIN=${BIN:-target/release/herald}
RUNS=${RUNS:-3}
PUBLISHERS=${PUBLISHERS-1 16 256}
WORKERS=${WORKERS-1 8 64}
MESSAGES=${MESSAGES:-10000}
BATCH=${BATCH:-1000}
FETCH1_MESSAGES=${FETCH1_MESSAGES:-20000}
BATCH_MESSAGES=${BATCH_MESSAGES:-100000}
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432/test}
PEER=${PEER:-1}
PEER_MODES=${PEER_MODES-default batched}
STORES=${STORES:-disk postgres}
CASES=${CASES:-publish queue queue-fetch1 queue-fetch1-ack queue-batch queue-batch-ack}
OUT=${OUT:-/tmp/herald-pg-bench.jsonl}
SCHEMA="herald_bench_$$"
WORK=$(mktemp -d /tmp/herald-pg-bench.XXXXXX)
drop_schema() { PGOPTIONS="-c client_min_messages=warning" psql -q -X -d "$PGURL" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE"; }
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; drop_schema; rm -rf "$WORK"' EXIT
: >"$OUT"

port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start STORE: a fresh server on a free port; sets PID and URL.
start() {
  local p
  p=$(port)
  case "$1" in
    disk) rm -rf "$WORK/data"; "$BIN" serve --listen "127.0.0.1:$p" --data-dir "$WORK/data" 2>>"$WORK/log" & ;;
    postgres)
      drop_schema
      "$BIN" serve --listen "127.0.0.1:$p" --store postgres --postgres-url "$PGURL" --postgres-schema "$SCHEMA" \
        --postgres-pool-size 32 2>>"$WORK/log" &
      ;;
  esac
  PID=$!
  URL="http://127.0.0.1:$p"
  wait_ready "$URL"
}

stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }

# bench SCENARIO STORE N RUN: `herald bench SCENARIO` with N clients on a fresh server,
# a JSON line in $OUT.
bench() {
  local args=(--publishers "$3" --messages "$MESSAGES")
  case $1 in
    queue) args=(--workers "$3" --messages "$MESSAGES") ;;
    queue-fetch1) args=(--workers "$3" --producers 1 --messages "$FETCH1_MESSAGES" --batch "$BATCH" --fetch 1) ;;
    queue-fetch1-ack) args=(--workers "$3" --producers 1 --messages "$FETCH1_MESSAGES" --batch "$BATCH" --fetch 1 --ack-with-fetch) ;;
    queue-batch) args=(--workers "$3" --producers 1 --messages "$BATCH_MESSAGES" --batch "$BATCH" --fetch 100) ;;
    queue-batch-ack) args=(--workers "$3" --producers 1 --messages "$BATCH_MESSAGES" --batch "$BATCH" --fetch 100 --ack-with-fetch) ;;
  esac
  start "$2"
  "$BIN" bench "${1%%-*}" --url "$URL" "${args[@]}" --json |
    jq -c --arg scenario "$1" --arg store "$2" --argjson n "$3" --argjson run "$4" \
      '{scenario: $scenario, store: $store, clients: $n, run: $run, per_second: .per_second, p50_us: .p50_us, p99_us: .p99_us}' >>"$OUT"
  stop
}

for run in $(seq "$RUNS"); do
  before=$(wc -l <"$OUT")
  for store in $STORES; do
    for scenario in $CASES; do
      case $scenario in
        publish) clients=$PUBLISHERS ;;
        queue) clients=$WORKERS ;;
        *) [ "$BATCH" -gt 1 ] && clients=$WORKERS || clients= ;;
      esac
      for n in $clients; do bench "$scenario" "$store" "$n" "$run"; done
    done
  done
  tail -n "$(( $(wc -l <"$OUT") - before ))" "$OUT" >&2
  if [ "$PEER" = 1 ]; then
    # The peer within the same run, so that both meet the machine in the same state.
    RUNS=1 PGURL=$PGURL WORKERS=$WORKERS PRODUCERS=$PUBLISHERS MODES=$PEER_MODES tools/pg-peer/run.sh >>"$WORK/peer.jsonl"
  fi
done

echo "== medians of $RUNS run(s), per second"
jq -rs 'group_by([.scenario, .store, .clients]) | .[] |
  (map(.per_second) | sort) as $v | "\(.[0].scenario) \(.[0].store) \(.[0].clients): \($v[($v | length) / 2 | floor] | floor) \($v | map(floor))"' "$OUT"

if [ "$PEER" = 1 ]; then
  echo "== graphile-worker on the same database, medians of $RUNS run(s)"
  cat "$WORK/peer.jsonl" >>"$OUT"
  node tools/pg-peer/summary.mjs <"$WORK/peer.jsonl"
fi
