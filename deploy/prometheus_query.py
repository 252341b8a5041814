"""Queries a running Prometheus with every expression of the Grafana dashboard and
checks each answers (no error) with at least one series, and every latency percentile
with a number (the workload observed something in the last 30 s). Run by
deploy/prometheus-check.sh once Prometheus has scraped Herald a few times; standard
library only.

    python3 deploy/prometheus_query.py http://127.0.0.1:PORT

Grafana's variables are given values first: `$instance` matches every target,
`$__rate_interval` is 30s (four scrape intervals of the check's 1 s, with room), and
ranges such as `[1h]` are kept.
"""

import json
import os
import sys
import urllib.parse
import urllib.request

DASHBOARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grafana", "dashboards", "herald.json")


def expressions(dashboard):
    for panel in dashboard.get("panels", []):
        for sub in [panel] + panel.get("panels", []):
            for target in sub.get("targets", []):
                if target.get("expr"):
                    yield sub.get("title"), target["expr"]


def grafana_to_promql(expr):
    return expr.replace("$__rate_interval", "30s").replace('"$instance"', '".*"').replace("$instance", ".*")


def query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def main():
    base = sys.argv[1].rstrip("/")
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    failed = 0
    checked = 0
    nonzero = 0
    for title, expr in expressions(dashboard):
        promql = grafana_to_promql(expr)
        answer = query(base, promql)
        checked += 1
        if answer.get("status") != "success":
            failed += 1
            print(f"  FAIL  {title!r}: {promql}: {answer.get('errorType')}: {answer.get('error')}")
            continue
        result = answer["data"]["result"]
        if not result:
            failed += 1
            print(f"  FAIL  {title!r}: {promql}: no series")
            continue
        values = [r["value"][1] for r in result]
        if "histogram_quantile" in promql and not any(v not in ("NaN", "0") for v in values):
            failed += 1
            print(f"  FAIL  {title!r}: {promql}: no observation in the last 30 s ({values})")
            continue
        if any(v not in ("NaN", "0") for v in values):
            nonzero += 1
        sample = ", ".join(
            f"{json.dumps(r['metric'], separators=(',', ':')) if r['metric'] else '{}'} = {r['value'][1]}" for r in result[:3]
        )
        more = f" (+{len(result) - 3} more)" if len(result) > 3 else ""
        print(f"  ok    {title!r}: {promql}\n          -> {sample}{more}")
    print(f"  {'FAIL' if failed else 'ok'}    {checked - failed} of {checked} dashboard queries answered by Prometheus, "
          f"{nonzero} with a value other than 0 (the rest count refusals, cluster repairs and the like: none here)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
