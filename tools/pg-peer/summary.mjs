// Median, min and max of per_second per measurement, from run.sh's JSON lines on stdin.
import { readFileSync } from "node:fs";
const groups = new Map();
for (const line of readFileSync(0, "utf8").split("\n")) {
  if (!line.startsWith("{")) continue;
  const r = JSON.parse(line);
  const key = r.scenario === "enqueue"
    ? `enqueue producers=${r.producers}`
    : `roundtrip ${r.mode} workers=${r.workers}`;
  if (!groups.has(key)) groups.set(key, { version: r.version, values: [] });
  groups.get(key).values.push(r.per_second);
}
for (const [key, { version, values }] of groups) {
  const v = [...values].sort((a, b) => a - b);
  const m = v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
  console.log(JSON.stringify({ peer: "graphile-worker", version, key, runs: v.length, median: m, min: v[0], max: v.at(-1) }));
}
