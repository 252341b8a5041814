#!/usr/bin/env bash
# Offline checks of deploy/ (no cluster, no container engine, no registry needed once
# the tools are installed). Exits non-zero if any check fails.
#
#   deploy/check.sh                      # herald: target/release/herald
#   HERALD=/path/to/herald deploy/check.sh
#
# 1. k8s/: every manifest against the Kubernetes JSON schemas (kubernetes-validate,
#    strict: unknown fields are errors) for the oldest and newest versions checked;
#    the ServiceMonitor (a CRD) by hand; selectors, probes, shutdown timing, hardening.
# 2. compose*.yaml: `docker compose config -q` if Docker Compose v2 works here, else
#    the Compose specification's JSON schema (as shipped by the dclint npm package);
#    then Herald's rules (listen 0.0.0.0, read-only root, stop_grace_period above
#    drain delay + shutdown timeout, files and volumes referenced exist).
# 3. The Dockerfile against the workspace (Rust version, COPY sources, ignore file, user).
# 4. With a herald binary: every herald command line of deploy/ (Dockerfile CMD,
#    compose commands and environment, k8s args and env) parsed and validated by
#    `herald serve ... --print-config`; and the Grafana dashboard's queries against the
#    metric names a herald started here (disk store, a free loopback port, a publish and a
#    queue round trip) exports.
#    Skipped, with a message, if there is no binary.
#
# Tools go to ${HERALD_DEPLOY_TOOLS:-~/.cache/herald-deploy-check}: a Python venv with
# kubernetes-validate and PyYAML (PyPI), and dclint (npm) for its Compose schema.
set -uo pipefail
cd "$(dirname "$0")/.."
DEPLOY=deploy
TOOLS="${HERALD_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/herald-deploy-check}"
K8S_VERSIONS=(1.27 1.37)
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
DCLINT=dclint@3.1.0
failed=()
herald_pid=""

section() { printf '\n== %s\n' "$*"; }
run() { # run NAME CMD...: record a failure, go on
  local name=$1; shift
  if ! "$@"; then failed+=("$name"); fi
}
cleanup() {
  if [ -n "$herald_pid" ] && kill -0 "$herald_pid" 2>/dev/null; then
    kill -TERM "$herald_pid" 2>/dev/null
    wait "$herald_pid" 2>/dev/null
  fi
  [ -n "${work:-}" ] && rm -rf "$work"
}
trap cleanup EXIT
work=$(mktemp -d)

section "tools"
# Python 3.11+ (tomllib) with kubernetes-validate, PyYAML and jsonschema: the system's
# if it has them, else a venv of our own.
PY=python3
if ! "$PY" -c 'import sys, kubernetes_validate, yaml, jsonschema; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  PY="$TOOLS/venv/bin/python"
  if ! "$PY" -c 'import kubernetes_validate, yaml, jsonschema' 2>/dev/null; then
    echo "installing $KUBERNETES_VALIDATE and PyYAML into $TOOLS/venv"
    python3 -m venv "$TOOLS/venv" && "$PY" -m pip install --quiet "$KUBERNETES_VALIDATE" PyYAML jsonschema \
      || { echo "FAIL: could not install $KUBERNETES_VALIDATE"; exit 1; }
  fi
fi
echo "python: $PY ($("$PY" -c 'import kubernetes_validate.version as v; print("kubernetes-validate", v.__version__)' 2>/dev/null || echo '?'))"

compose_mode=""
if docker compose version >/dev/null 2>&1; then
  compose_mode=docker
  echo "compose: $(docker compose version)"
else
  schema="$TOOLS/node_modules/dclint/schemas/compose.schema.json"
  if [ ! -f "$schema" ] && command -v npm >/dev/null 2>&1; then
    echo "installing $DCLINT (for its Compose specification schema) into $TOOLS"
    npm install --silent --no-audit --no-fund --prefix "$TOOLS" "$DCLINT" >/dev/null 2>&1 || true
  fi
  if [ -f "$schema" ]; then
    compose_mode=schema
    echo "compose: no working 'docker compose'; the Compose spec's JSON schema from $DCLINT"
  else
    compose_mode=yaml
    echo "compose: no 'docker compose' and no npm: YAML and Herald's rules only (WARNING: no schema check)"
  fi
fi

HERALD="${HERALD:-target/release/herald}"
if [ -x "$HERALD" ]; then
  echo "herald: $HERALD ($("$HERALD" --version))"
  newer=$(find crates -name '*.rs' -newer "$HERALD" -print -quit 2>/dev/null)
  [ -n "$newer" ] && echo "herald: WARNING: $HERALD is older than $newer (and maybe more): rebuild it or set HERALD"
else
  echo "herald: none at $HERALD (set HERALD=...): the command-line and dashboard metric checks are SKIPPED"
  HERALD=""
fi

section "k8s manifests (kubernetes-validate --strict, Kubernetes ${K8S_VERSIONS[*]})"
run k8s "$PY" "$DEPLOY/check.py" k8s "${K8S_VERSIONS[@]}"

section "compose files ($compose_mode)"
if [ "$compose_mode" = docker ]; then
  for f in compose.yaml compose.monitoring.yaml compose.cluster.yaml; do
    if docker compose -f "$DEPLOY/$f" config -q; then echo "  ok    $f: docker compose config -q"
    else echo "  FAIL  $f: docker compose config -q"; failed+=("compose $f"); fi
  done
  run compose "$PY" "$DEPLOY/check.py" compose
elif [ "$compose_mode" = schema ]; then
  run compose "$PY" "$DEPLOY/check.py" compose "$schema"
else
  run compose "$PY" "$DEPLOY/check.py" compose
fi

section "Dockerfile"
run dockerfile "$PY" "$DEPLOY/check.py" dockerfile

section "herald command lines (herald serve ... --print-config)"
if [ -n "$HERALD" ]; then
  run args "$PY" "$DEPLOY/check.py" args "$HERALD"
else
  echo "  SKIP  no herald binary"
fi

section "Grafana dashboard vs herald's /metrics"
if [ -n "$HERALD" ]; then
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # No HERALD_* from the caller's environment (a config file, a cluster) in this node.
  env $(env | sed -n 's/^\(HERALD_[A-Za-z0-9_]*\)=.*/-u \1/p') \
    "$HERALD" serve --data-dir "$work/data" --listen "127.0.0.1:$port" --metrics-topics check >"$work/herald.log" 2>&1 &
  herald_pid=$!
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    kill -0 "$herald_pid" 2>/dev/null || break
    sleep 0.1
  done
  # A little of everything (a publish, a queue round trip) so that every series the
  # dashboard queries exists: the disk store's commit histograms, the queue gauges.
  curl -fsS -o /dev/null -H 'content-type: application/json' -d '"hello"' "http://127.0.0.1:$port/v1/topics/check/messages" || true
  curl -fsS -o /dev/null -H 'content-type: application/json' -d '"job"' "http://127.0.0.1:$port/v1/queues/check/messages" || true
  curl -fsS -o /dev/null -X POST "http://127.0.0.1:$port/v1/queues/check/fetch" || true
  if curl -fsS "http://127.0.0.1:$port/metrics" >"$work/metrics.txt"; then
    echo "  ..    scraped http://127.0.0.1:$port/metrics of $HERALD (pid $herald_pid)"
    run dashboard "$PY" "$DEPLOY/check.py" dashboard "$work/metrics.txt"
  else
    echo "  FAIL  herald did not serve /metrics on 127.0.0.1:$port:"; sed 's/^/        /' "$work/herald.log"
    failed+=(metrics)
  fi
  kill -TERM "$herald_pid" 2>/dev/null
  if wait "$herald_pid"; then echo "  ok    herald stopped on SIGTERM, exit 0"
  else echo "  FAIL  herald exited $? on SIGTERM"; failed+=(sigterm); fi
  herald_pid=""
else
  "$PY" -c 'import json, sys; n = len(json.load(open(sys.argv[1]))["panels"]); print(f"  ok    dashboard JSON parses ({n} panels)")' \
    "$DEPLOY/grafana/dashboards/herald.json" || failed+=(dashboard)
  echo "  SKIP  metric names: no herald binary"
fi

section "result"
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all checks passed"
