#!/usr/bin/env bash
# graphile-worker peer benchmark; see README.md. Prints one JSON line per measurement.
set -euo pipefail
cd "$(dirname "$0")"
[ -d node_modules ] || npm ci --no-audit --no-fund >&2
export PGURL="${PGURL:-postgres://postgres@127.0.0.1:5432/test}"
export JOBS="${JOBS:-20000}"                   # round-trip jobs per run (JOBS/10 for 1 worker)
export SECONDS_PER_RUN="${SECONDS_PER_RUN:-5}" # timed seconds per enqueue run
export WORKERS="${WORKERS-1 8 64}"
export PRODUCERS="${PRODUCERS-1 16 256}"
export MODES="${MODES-default batched}"
RUNS="${RUNS:-1}"
for ((i = 1; i <= RUNS; i++)); do node bench.mjs; done
