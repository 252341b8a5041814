// The header's live counters: /metrics (Prometheus text format, no credentials needed)
// read every 2 s; gauges shown as they are, counters as a rate per second over the last
// interval. Names from docs/operations.md.

import { fill } from './util.js';

const EVERY_MS = 2000;

/** What each headline shows: a gauge's value or a counter's rate. */
const HEADLINES = {
  connections: { metric: 'herald_connections', rate: false },
  subscriptions: { metric: 'herald_subscriptions', rate: false },
  published: { metric: 'herald_messages_published_total', rate: true },
  deliveries: { metric: 'herald_deliveries_total', rate: true },
  enqueued: { metric: 'herald_queue_enqueued_total', rate: true },
  acked: { metric: 'herald_queue_acked_total', rate: true },
};

/**
 * The samples of a Prometheus text exposition, summed per metric name over their
 * labels: `Map<name, number>`. Comments, and lines that do not parse, are skipped.
 */
export function parsePrometheus(text) {
  const sums = new Map();
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    // name{labels} value [timestamp]; label values may hold spaces, so skip past '}'.
    const brace = line.indexOf('{');
    const space = line.indexOf(' ');
    let name;
    let rest;
    if (brace !== -1 && (space === -1 || brace < space)) {
      const close = line.lastIndexOf('}');
      if (close === -1) continue;
      name = line.slice(0, brace);
      rest = line.slice(close + 1).trim();
    } else if (space !== -1) {
      name = line.slice(0, space);
      rest = line.slice(space + 1).trim();
    } else {
      continue;
    }
    const value = Number(rest.split(/\s+/)[0]);
    if (!Number.isFinite(value)) continue;
    sums.set(name, (sums.get(name) ?? 0) + value);
  }
  return sums;
}

/** Formats a number for the header: integers as they are, rates with one decimal. */
function format(value, rate) {
  if (value === undefined) return '–';
  if (!rate) return Math.round(value).toLocaleString('en');
  return value >= 100 ? Math.round(value).toLocaleString('en') : value.toFixed(1);
}

/** Polls /metrics into the `<dd data-metric>` cells under `root` until the page closes. */
export function startCounters(root) {
  let previous = null;
  const cells = new Map([...root.querySelectorAll('[data-metric]')].map((dd) => [dd.dataset.metric, dd]));

  async function tick() {
    let sums;
    try {
      const response = await fetch('/metrics', { cache: 'no-store' });
      if (!response.ok) throw new Error(`/metrics answered ${response.status}`);
      sums = parsePrometheus(await response.text());
    } catch (err) {
      root.title = `metrics unavailable: ${err.message}`;
      return;
    }
    root.title = '';
    const now = performance.now();
    for (const [key, { metric, rate }] of Object.entries(HEADLINES)) {
      const cell = cells.get(key);
      if (!cell) continue;
      const value = sums.get(metric);
      if (!rate) {
        fill(cell, format(value, false));
      } else if (previous && value !== undefined && previous.sums.has(metric)) {
        const seconds = (now - previous.at) / 1000;
        // A counter that went down is a restarted server: show 0 rather than a negative rate.
        fill(cell, format(Math.max(0, value - previous.sums.get(metric)) / seconds, true));
      }
    }
    previous = { at: now, sums };
  }

  tick();
  setInterval(tick, EVERY_MS);
}
