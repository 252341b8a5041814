// graphile-worker peer benchmark: job round trips/s and enqueue (publish) jobs/s.
// One JSON line per measurement on stdout; see README.md. Configured by env only.
import { readFileSync } from "node:fs";
import pg from "pg";
import { run, makeWorkerUtils, Logger } from "graphile-worker";

const env = process.env;
const PGURL = env.PGURL || "postgres://postgres@127.0.0.1:5432/test";
const SCHEMA = env.SCHEMA || "graphile_worker_bench";
const JOBS = Number(env.JOBS || 20000);
// Batched mode runs ~10x faster; 5x the jobs keeps each run at a few seconds.
const JOBS_BATCHED = Number(env.JOBS_BATCHED || 5 * JOBS);
const SECONDS = Number(env.SECONDS_PER_RUN || 5);
const WARMUP_SECONDS = Number(env.WARMUP_SECONDS || 1);
const WORKERS = (env.WORKERS ?? "1 8 64").split(/\s+/).filter(Boolean).map(Number);
const PRODUCERS = (env.PRODUCERS ?? "1 16 256").split(/\s+/).filter(Boolean).map(Number);
const MODES = (env.MODES ?? "default batched").split(/\s+/).filter(Boolean);
// Jobs per addJobs call of the round-trip producer: large enough that the producer
// (~30k jobs/s here) outruns the workers, so the workers are what is measured.
const BATCH = Number(env.BATCH || 1000);
const POOL_MAX = Number(env.POOL_MAX || 80); // PostgreSQL's max_connections is 100 here
const VERSION = JSON.parse(
  readFileSync(new URL("./node_modules/graphile-worker/package.json", import.meta.url)),
).version;

const SIZE = 128;
const PAYLOAD = { d: "x".repeat(SIZE - JSON.stringify({ d: "" }).length) }; // 128 bytes as JSON
const TASKS = { noop: async () => {} };

// Only warnings and errors: graphile-worker logs every job at info level otherwise.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`[${level}] ${message}`);
});

// Per-mode worker settings. "default" is graphile-worker out of the box: each worker
// fetches one job (get_job) and completes it (complete_job) by itself. "batched" is the
// throughput setup of graphile-worker's own perfTest/graphile.config.js: a local queue
// that locks up to 500 jobs per fetch, and completions batched (completeJobBatchDelay 0).
const MODE_SETTINGS = {
  default: {},
  batched: {
    localQueue: { size: 500, refetchDelay: { durationMs: 10 } },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  },
};

const now = () => performance.now();
const print = (o) => console.log(JSON.stringify({ peer: "graphile-worker", version: VERSION, ...o }));

async function sql(text) {
  const client = new pg.Client({ connectionString: PGURL });
  await client.connect();
  try {
    return await client.query(text);
  } finally {
    await client.end();
  }
}

const dropSchema = () => sql(`drop schema if exists ${SCHEMA} cascade`);

function shared(maxPoolSize) {
  return {
    connectionString: PGURL,
    schema: SCHEMA,
    maxPoolSize,
    preparedStatements: true, // the default; i.e. noPreparedStatements: false
    logger,
  };
}

// Producer enqueues `jobs` jobs in addJobs batches while `workers` workers run them.
// Timed from the first enqueue until every job is completed *in the database*
// (completed jobs are deleted from _private_jobs; batched completions land late).
async function roundtrip(mode, workers, jobs) {
  await dropSchema();
  const pool = workers + 4;
  const runner = await run({
    taskList: TASKS,
    noHandleSignals: true,
    preset: { worker: { ...shared(pool), concurrentJobs: workers, ...MODE_SETTINGS[mode] } },
  });
  const utils = await makeWorkerUtils({ preset: { worker: shared(2) } });
  const check = new pg.Client({ connectionString: PGURL });
  await check.connect();

  let done = 0;
  let allDone;
  const finished = new Promise((resolve) => (allDone = resolve));
  runner.events.on("job:success", () => {
    if (++done === jobs) allDone();
  });
  runner.events.on("job:error", ({ error }) => console.error("job error", error));

  const t0 = now();
  for (let sent = 0; sent < jobs; sent += BATCH) {
    const n = Math.min(BATCH, jobs - sent);
    await utils.addJobs(Array.from({ length: n }, () => ({ identifier: "noop", payload: PAYLOAD })));
  }
  const enqueued = now();
  await finished;
  while ((await check.query(`select 1 from ${SCHEMA}._private_jobs limit 1`)).rowCount > 0) {
    await new Promise((r) => setTimeout(r, 1));
  }
  const seconds = (now() - t0) / 1000;

  await check.end();
  await utils.release();
  await runner.stop();
  print({
    scenario: "roundtrip", mode, workers, jobs, size: SIZE, pool, batch: BATCH,
    enqueue_seconds: +((enqueued - t0) / 1000).toFixed(3),
    seconds: +seconds.toFixed(3), per_second: Math.round(jobs / seconds),
  });
}

// `producers` concurrent loops, each awaiting one addJob at a time; no workers run.
// A WARMUP_SECONDS untimed lead-in, then jobs counted over SECONDS.
async function enqueue(producers) {
  await dropSchema();
  const pool = Math.min(producers + 4, POOL_MAX);
  const utils = await makeWorkerUtils({ preset: { worker: shared(pool) } });
  await utils.migrate();

  let count = 0;
  let stop = false;
  const loop = async () => {
    while (!stop) {
      await utils.addJob("noop", PAYLOAD);
      count++;
    }
  };
  const loops = Array.from({ length: producers }, loop);
  await new Promise((r) => setTimeout(r, WARMUP_SECONDS * 1000));
  const c0 = count;
  const t0 = now();
  await new Promise((r) => setTimeout(r, SECONDS * 1000));
  const jobs = count - c0;
  const seconds = (now() - t0) / 1000;
  stop = true;
  await Promise.all(loops);
  await utils.release();
  print({
    scenario: "enqueue", producers, jobs, size: SIZE, pool,
    seconds: +seconds.toFixed(3), per_second: Math.round(jobs / seconds),
  });
}

for (const mode of MODES) {
  if (!MODE_SETTINGS[mode]) throw new Error(`unknown mode ${mode}`);
  const jobs = mode === "batched" ? JOBS_BATCHED : JOBS;
  for (const w of WORKERS) await roundtrip(mode, w, w === 1 ? Math.max(1, Math.round(jobs / 10)) : jobs);
}
for (const p of PRODUCERS) await enqueue(p);
await dropSchema();
