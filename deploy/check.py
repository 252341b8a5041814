"""Offline checks of deploy/, run by deploy/check.sh (which installs what this needs).

    python3 deploy/check.py k8s KUBE_VERSION...   manifests vs the Kubernetes schemas
    python3 deploy/check.py compose [SCHEMA]      compose files: the Compose spec's JSON
                                                  schema when given, and Herald's rules
    python3 deploy/check.py dashboard METRICS     dashboard JSON vs a /metrics scrape
    python3 deploy/check.py args HERALD           every herald command line here, parsed
                                                  and validated by `serve --print-config`
    python3 deploy/check.py dockerfile            Dockerfile vs the workspace

Each prints one line per finding and exits non-zero if any check failed.
"""

import json
import os
import re
import subprocess
import sys
import tomllib

import yaml

DEPLOY = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DEPLOY)
K8S_CORE = ["statefulset.yaml", "service.yaml", "service-headless.yaml", "pdb.yaml"]
K8S_OPTIONAL = ["optional/cluster.yaml", "optional/hpa.yaml", "optional/servicemonitor.yaml"]
COMPOSE = ["compose.yaml", "compose.monitoring.yaml", "compose.cluster.yaml"]
DASHBOARD = "grafana/dashboards/herald.json"
# Prometheus adds these to every target; the dashboard may use them beside Herald's.
PROMETHEUS_SERIES = {"up"}
PROMETHEUS_TARGET_LABELS = {"instance", "job"}

failures = 0


def ok(msg):
    print(f"  ok    {msg}")


def fail(msg):
    global failures
    failures += 1
    print(f"  FAIL  {msg}")


def rel(path):
    return os.path.relpath(path, ROOT)


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def duration_s(text):
    """Herald's duration syntax (docs/configuration.md): 500ms, 30s, 5m, 24h, 7d."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    n, unit = int(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def flag(args, name):
    """The value of --name in an argument list (`--name value` or `--name=value`)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


# ---------------------------------------------------------------- Kubernetes


def k8s_workloads():
    """(file, kind, name, pod spec) of every workload in k8s/."""
    for f in K8S_CORE + K8S_OPTIONAL:
        for doc in load_yaml_docs(os.path.join(DEPLOY, "k8s", f)):
            if doc.get("kind") in ("StatefulSet", "Deployment"):
                yield f, doc["kind"], doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def check_k8s(versions):
    import kubernetes_validate

    files = K8S_CORE + [f for f in K8S_OPTIONAL if not f.endswith("servicemonitor.yaml")]
    for version in versions:
        for f in files:
            path = os.path.join(DEPLOY, "k8s", f)
            for doc in load_yaml_docs(path):
                what = f"k8s/{f}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')} (Kubernetes {version})"
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                    ok(what)
                except kubernetes_validate.ValidationError as e:
                    fail(f"{what}: {e.message} at {'.'.join(str(p) for p in e.path)}")
                except Exception as e:  # a missing schema, a bad document
                    fail(f"{what}: {e}")

    # Not in the core schemas (a CRD of the Prometheus Operator): its shape by hand.
    f = "optional/servicemonitor.yaml"
    (sm,) = load_yaml_docs(os.path.join(DEPLOY, "k8s", f))
    eps = sm.get("spec", {}).get("endpoints", [])
    if sm.get("apiVersion") == "monitoring.coreos.com/v1" and sm.get("kind") == "ServiceMonitor" and eps \
            and all(e.get("port") == "http" and e.get("path") == "/metrics" for e in eps) \
            and sm["spec"].get("selector"):
        ok(f"k8s/{f}: ServiceMonitor (CRD, no schema here: checked as YAML: apiVersion, selector, endpoints port http path /metrics)")
    else:
        fail(f"k8s/{f}: not a ServiceMonitor scraping port http at /metrics")

    # The kustomization lists exactly the core files, which exist.
    kust = load_yaml_docs(os.path.join(DEPLOY, "k8s", "kustomization.yaml"))[0]
    if sorted(kust.get("resources", [])) == sorted(K8S_CORE):
        ok("k8s/kustomization.yaml: resources are " + ", ".join(K8S_CORE))
    else:
        fail(f"k8s/kustomization.yaml: resources {kust.get('resources')} != {K8S_CORE}")

    # Services select pods that exist, on a port the pods name.
    pods = []
    for f in K8S_CORE + K8S_OPTIONAL:
        for doc in load_yaml_docs(os.path.join(DEPLOY, "k8s", f)):
            if doc.get("kind") in ("StatefulSet", "Deployment"):
                t = doc["spec"]["template"]
                ports = {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])}
                pods.append((f, t["metadata"]["labels"], ports))
                sel = doc["spec"]["selector"]["matchLabels"]
                if not all(t["metadata"]["labels"].get(k) == v for k, v in sel.items()):
                    fail(f"k8s/{f}: {doc['metadata']['name']}: selector does not match its template's labels")
    for f in K8S_CORE + K8S_OPTIONAL:
        for doc in load_yaml_docs(os.path.join(DEPLOY, "k8s", f)):
            if doc.get("kind") in ("Service", "PodDisruptionBudget"):
                sel = doc["spec"]["selector"]
                sel = sel.get("matchLabels", sel) if doc["kind"] == "PodDisruptionBudget" else sel
                hits = [p for p in pods if all(p[1].get(k) == v for k, v in sel.items())]
                name = f"k8s/{f}: {doc['kind']}/{doc['metadata']['name']}"
                if not hits:
                    fail(f"{name} selects no pod")
                elif doc["kind"] == "Service" and any(
                        str(sp.get("targetPort")) not in hits[0][2] for sp in doc["spec"]["ports"]):
                    fail(f"{name}: a targetPort is not a port the pods name")
                else:
                    ok(f"{name} selects the pods of {hits[0][0]}")

    # Shutdown timing (docs/operations.md, "Graceful shutdown") and hardening.
    for f, kind, name, spec in k8s_workloads():
        what = f"k8s/{f}: {kind}/{name}"
        c = spec["containers"][0]
        args = c.get("args", [])
        drain = duration_s(flag(args, "--drain-delay") or "0s")
        stop = duration_s(flag(args, "--shutdown-timeout") or "10s")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        rp = c.get("readinessProbe", {})
        probe_window = rp.get("periodSeconds", 10) * rp.get("failureThreshold", 3)
        if not grace > drain + stop:
            fail(f"{what}: terminationGracePeriodSeconds {grace} <= drain delay {drain} + shutdown timeout {stop}")
        elif drain < probe_window:
            fail(f"{what}: drain delay {drain}s < readiness period x failureThreshold ({probe_window}s)")
        elif rp.get("httpGet", {}).get("path") != "/readyz" or c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
            fail(f"{what}: readiness must probe /readyz and liveness /healthz")
        elif "preStop" in c.get("lifecycle", {}):
            fail(f"{what}: a preStop hook; the drain delay does its work (docs/operations.md)")
        else:
            ok(f"{what}: grace {grace}s > drain {drain:g}s + shutdown {stop:g}s; drain >= readiness window {probe_window}s")
        sc, psc = c.get("securityContext", {}), spec.get("securityContext", {})
        hardened = (sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
                    and sc.get("capabilities", {}).get("drop") == ["ALL"]
                    and (sc.get("runAsNonRoot") or psc.get("runAsNonRoot"))
                    and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
                    and "resources" in c)
        if hardened:
            ok(f"{what}: non-root, read-only root, no privilege escalation, capabilities dropped, RuntimeDefault seccomp, resources")
        else:
            fail(f"{what}: securityContext or resources incomplete")


# ---------------------------------------------------------------- compose


def compose_services(path):
    """The services of a compose file with `extends` resolved (one level of merge:
    enough for these files) and YAML anchors already merged by the loader."""
    doc = load_yaml_docs(path)[0]
    out = {}
    for name, svc in doc.get("services", {}).items():
        svc = dict(svc)
        ext = svc.pop("extends", None)
        if ext:
            base_path = os.path.join(os.path.dirname(path), ext.get("file", os.path.basename(path)))
            base = compose_services(base_path)[ext["service"]]
            svc = {**base, **svc}
        out[name] = svc
    return out


def check_compose(schema_path):
    schema = None
    if schema_path:
        import jsonschema
        with open(schema_path) as f:
            schema = json.load(f)
        validator = jsonschema.Draft7Validator(schema)
    for f in COMPOSE:
        path = os.path.join(DEPLOY, f)
        try:
            doc = load_yaml_docs(path)[0]
        except Exception as e:
            fail(f"{f}: YAML: {e}")
            continue
        if schema is not None:
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
            for e in errors:
                fail(f"{f}: Compose spec: {'.'.join(str(p) for p in e.path)}: {e.message}")
            if not errors:
                ok(f"{f}: valid against the Compose specification's JSON schema")
        try:
            services = compose_services(path)
        except (OSError, KeyError, TypeError) as e:
            fail(f"{f}: extends: cannot resolve {e}")
            continue
        for name, svc in services.items():
            what = f"{f}: service {name}"
            if "image" not in svc and "build" not in svc:
                fail(f"{what}: neither image nor build")
            b = svc.get("build")
            if b:
                ctx = os.path.normpath(os.path.join(DEPLOY, b["context"]))
                if not os.path.isfile(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))):
                    fail(f"{what}: build: no {b.get('dockerfile')} in {rel(ctx)}")
            for v in svc.get("volumes", []):
                src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
                if src.startswith((".", "/")):
                    if not os.path.exists(os.path.normpath(os.path.join(DEPLOY, src))):
                        fail(f"{what}: bind-mount source {src} does not exist")
                elif src and src not in (load_yaml_docs(path)[0].get("volumes") or {}):
                    fail(f"{what}: named volume {src} is not declared")
            for dep in svc.get("depends_on", []):
                if dep not in services:
                    fail(f"{what}: depends on unknown service {dep}")
            if "herald" not in str(svc.get("image", "")):
                continue
            # Herald's own rules: listening outside the container, read-only root,
            # enough time for the graceful shutdown.
            cmd = svc.get("command", [])
            env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
            listen = flag(cmd, "--listen") or env.get("HERALD_LISTEN")
            drain = duration_s(flag(cmd, "--drain-delay") or env.get("HERALD_DRAIN_DELAY", "0s"))
            stop = duration_s(flag(cmd, "--shutdown-timeout") or env.get("HERALD_SHUTDOWN_TIMEOUT", "10s"))
            grace = duration_s(svc.get("stop_grace_period", "10s"))
            problems = []
            if not listen or not listen.startswith("0.0.0.0:"):
                problems.append(f"listens on {listen or 'the default 127.0.0.1:7070'}, unreachable from outside the container")
            if svc.get("read_only") is not True:
                problems.append("root filesystem not read_only")
            if not grace > drain + stop:
                problems.append(f"stop_grace_period {grace:g}s <= drain {drain:g}s + shutdown {stop:g}s")
            if problems:
                fail(f"{what}: " + "; ".join(problems))
            else:
                ok(f"{what}: listens on {listen}, read-only root, stop_grace_period {grace:g}s > {drain + stop:g}s")
    # Prometheus scrapes the service compose.monitoring.yaml names.
    with open(os.path.join(DEPLOY, "prometheus.yml")) as fh:
        prom = yaml.safe_load(fh)
    targets = [t for sc in prom["scrape_configs"] if sc["job_name"] == "herald"
               for s in sc["static_configs"] for t in s["targets"]]
    try:
        mon = compose_services(os.path.join(DEPLOY, "compose.monitoring.yaml"))
    except (OSError, KeyError, TypeError):
        mon = {}
    if targets == ["herald:7070"] and "herald" in mon:
        ok("prometheus.yml: scrapes herald:7070/metrics, the service of compose.monitoring.yaml")
    else:
        fail(f"prometheus.yml: herald targets {targets}")
    for f in ["grafana/provisioning/datasources/prometheus.yaml", "grafana/provisioning/dashboards/herald.yaml"]:
        try:
            load_yaml_docs(os.path.join(DEPLOY, f))
            ok(f"{f}: YAML")
        except Exception as e:
            fail(f"{f}: {e}")


# ---------------------------------------------------------------- dashboard

PROMQL_WORDS = {
    # aggregations, modifiers, operators
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "and", "or", "unless", "offset",
    # functions used or likely
    "rate", "irate", "increase", "delta", "idelta", "deriv", "resets", "changes", "abs",
    "clamp_min", "clamp_max", "histogram_quantile", "label_values", "label_replace",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "last_over_time",
    "time", "vector", "scalar", "absent", "round", "ceil", "floor", "sort", "sort_desc",
}


def promql_names(expr):
    """(metric names, label names) an expression uses."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)      # strings
    e = re.sub(r"\$\{?\w+\}?", "", e)                 # Grafana variables
    e = re.sub(r"\[[^\]]*\]", "", e)                  # range selectors
    labels = set()
    for m in re.finditer(r"\{([^}]*)\}", e):          # label matchers
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m.group(1)))
    e = re.sub(r"\{[^}]*\}", " ", e)
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", e):
        labels |= set(re.findall(r"[a-zA-Z_]\w*", m.group(1)))
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    m = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", expr)
    if m:
        return {m.group(1)}, {m.group(2)}
    words = set(re.findall(r"[a-zA-Z_:][\w:]*", e))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+\w*", w)}, labels


def parse_metrics(text):
    """{metric name: set of label names} of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s", line)
        if m:
            out.setdefault(m.group(1), set()).update(re.findall(r"(\w+)=", m.group(3) or ""))
    return out


def check_dashboard(metrics_file):
    path = os.path.join(DEPLOY, DASHBOARD)
    try:
        with open(path) as f:
            dash = json.load(f)
        ok(f"{DASHBOARD}: JSON parses ({len(dash.get('panels', []))} panels, uid {dash.get('uid')})")
    except Exception as e:
        fail(f"{DASHBOARD}: {e}")
        return
    with open(metrics_file) as f:
        exported = parse_metrics(f.read())
    print(f"  ..    herald exports {len(exported)} metrics: {', '.join(sorted(exported))}")
    exprs = []
    for p in dash.get("panels", []):
        for sub in [p] + p.get("panels", []):
            for t in sub.get("targets", []):
                exprs.append((sub.get("title"), t.get("expr", "")))
            ds = sub.get("datasource")
            if sub.get("type") != "row" and ds != {"type": "prometheus", "uid": "${datasource}"}:
                fail(f"{DASHBOARD}: panel {sub.get('title')!r} does not use the $datasource variable")
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if v.get("type") == "query":
            exprs.append((f"variable {v['name']}", q.get("query") if isinstance(q, dict) else q))
    ids = [p["id"] for p in dash["panels"]]
    if len(ids) != len(set(ids)):
        fail(f"{DASHBOARD}: duplicate panel ids")
    used, bad = set(), 0
    all_labels = set().union(*exported.values()) | PROMETHEUS_TARGET_LABELS
    for title, expr in exprs:
        names, labels = promql_names(expr)
        used |= names
        unknown = names - set(exported) - PROMETHEUS_SERIES
        unknown_labels = labels - all_labels
        if unknown or unknown_labels:
            bad += 1
            fail(f"{DASHBOARD}: {title!r}: {expr}: not exported by herald: "
                 f"{', '.join(sorted(unknown | {'label ' + l for l in unknown_labels}))}")
    if not bad:
        ok(f"{DASHBOARD}: all {len(exprs)} queries use only metrics herald exports (+ Prometheus's `up`): "
           f"{len(used - PROMETHEUS_SERIES)} of {len(exported)} used")
    unused = set(exported) - used
    if unused:
        print(f"  ..    exported but not on the dashboard: {', '.join(sorted(unused))}")
    if not any(n.startswith("process_") for n in exported):
        print("  ..    no process_* metrics (CPU, memory, open fds) in herald's /metrics: not on the dashboard")


# ---------------------------------------------------------------- herald args


def herald_command_lines():
    """(where, args, env) of every `herald` command line in deploy/."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        m = re.search(r"^CMD\s+(\[.*\])\s*$", f.read(), re.M)
    yield "Dockerfile CMD", json.loads(m.group(1)), {}
    for f in COMPOSE:
        try:
            services = compose_services(os.path.join(DEPLOY, f))
        except (OSError, KeyError, TypeError):
            continue  # reported by the compose check
        for name, svc in services.items():
            if "herald" in str(svc.get("image", "")):
                env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
                yield f"{f}: {name}", svc.get("command", []), env
    for f, kind, name, spec in k8s_workloads():
        c = spec["containers"][0]
        env = {}
        for e in c.get("env", []):
            # A Secret's value is not here: a stand-in of the right form.
            env[e["name"]] = e.get("value", "redis://127.0.0.1:6379/" if e["name"] == "HERALD_CLUSTER" else "x")
        yield f"k8s/{f}: {kind}/{name}", c.get("args", []), env


def check_args(herald):
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    for where, args, env in herald_command_lines():
        cmd = [herald] + list(args) + ["--print-config"]
        r = subprocess.run(cmd, env={**base_env, **env}, capture_output=True, text=True, timeout=20)
        shown = " ".join(args) + "".join(f" [{k}={v}]" for k, v in env.items() if k != "HERALD_LOG")
        if r.returncode == 0:
            cfg = tomllib.loads(r.stdout)
            ok(f"{where}: herald {shown}  (listen {cfg['listen']}, store {cfg['store']})")
        else:
            err = (r.stderr.strip().splitlines() or ["?"])[0]
            if "unexpected argument" in err:
                err += f" (is {herald} older than the sources? rebuild it: cargo build --release -p herald)"
            fail(f"{where}: herald {shown}: exit {r.returncode}: {err}")


# ---------------------------------------------------------------- Dockerfile


def check_dockerfile():
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = f.read()
    with open(os.path.join(ROOT, "Cargo.toml"), "rb") as f:
        need = tomllib.load(f)["workspace"]["package"]["rust-version"]
    m = re.search(r"^ARG RUST_IMAGE=\S+/rust:(\d+\.\d+)(?:\.\d+)?-slim-(\w+)", text, re.M)
    need_t = tuple(int(x) for x in need.split("."))
    if m and tuple(int(x) for x in m.group(1).split(".")) >= need_t:
        ok(f"Dockerfile: builder rust:{m.group(1)} (on {m.group(2)}) >= the workspace's rust-version {need}")
    else:
        fail(f"Dockerfile: builder image's Rust version is not >= rust-version {need}")
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M)
    sources = [s for line in copied for s in line.split()]
    missing = [s for s in sources if not os.path.exists(os.path.join(ROOT, s))]
    with open(os.path.join(DEPLOY, "Dockerfile.dockerignore")) as f:
        allowed = {l[1:].rstrip("/") for l in f.read().split() if l.startswith("!")}
    not_allowed = [s for s in sources if s.rstrip("/") not in allowed]
    if missing or not_allowed:
        fail(f"Dockerfile: COPY sources missing {missing} or not let in by Dockerfile.dockerignore {not_allowed}")
    else:
        ok(f"Dockerfile: COPY sources {', '.join(sources)} exist and Dockerfile.dockerignore lets them in")
    # What the build reads outside crates/: build scripts and include_str!/include_bytes!
    # naming a path that climbs out of crates/ (proto/, the console's files).
    outside = set()
    for d, _, files in os.walk(os.path.join(ROOT, "crates")):
        for fn in files:
            if fn == "build.rs" or (fn.endswith(".rs") and "/src" in d):
                with open(os.path.join(d, fn)) as fh:
                    for hit in re.findall(r'"((?:\.\./)+[\w./-]+)"', fh.read()):
                        # Relative to the crate (build.rs, CARGO_MANIFEST_DIR) or the file.
                        for base in (os.path.dirname(d) if d.endswith("/src") else d, d):
                            path = os.path.relpath(os.path.normpath(os.path.join(base, hit)), ROOT)
                            if not path.startswith(("crates", "..")) and os.path.exists(os.path.join(ROOT, path)):
                                outside.add(path)
                                break
    # docs/ is read by a unit test (cfg(test)), not by the build.
    outside = {p for p in outside if not p.startswith("docs")}
    copied_paths = [s.rstrip("/") for s in sources]
    uncopied = sorted(p for p in outside if not any(p == c or p.startswith(c + "/") for c in copied_paths))
    if not uncopied:
        ok(f"Dockerfile: what the crates read outside crates/ ({', '.join(sorted(outside)) or 'nothing'}) is copied")
    else:
        fail(f"Dockerfile: the crates read {uncopied} outside crates/, not copied")
    user = re.findall(r"^USER (\S+)", text, re.M)
    if user and re.fullmatch(r"\d+(:\d+)?", user[-1]) and not user[-1].startswith("0"):
        ok(f"Dockerfile: runs as numeric non-root user {user[-1]}")
    else:
        fail(f"Dockerfile: final USER {user[-1:] or 'unset'} is not a numeric non-root user")
    for needle in ['ENTRYPOINT ["herald"]', "EXPOSE 7070", 'VOLUME ["/data"]']:
        if needle in text:
            ok(f"Dockerfile: {needle}")
        else:
            fail(f"Dockerfile: no {needle}")


def main():
    what = sys.argv[1]
    if what == "k8s":
        check_k8s(sys.argv[2:])
    elif what == "compose":
        check_compose(sys.argv[2] if len(sys.argv) > 2 else None)
    elif what == "dashboard":
        check_dashboard(sys.argv[2])
    elif what == "args":
        check_args(sys.argv[2])
    elif what == "dockerfile":
        check_dockerfile()
    else:
        sys.exit(f"unknown check {what}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
