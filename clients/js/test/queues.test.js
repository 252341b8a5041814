// Work queues over HTTP: enqueue every kind, fetch with a lease, ack, requeue (with a
// delay), extend, stats, purge, dead letters and redrive, the queue list.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Herald } from '../src/herald.js';
import { startServer, eventually } from '../test-support/server.js';

let server;
let h;
before(async () => {
  server = await startServer({ args: ['--queue-max-attempts', '2'] });
  h = new Herald(server.url);
});
after(async () => {
  h.close();
  await server.stop();
});

test('enqueue, fetch, ack, requeue and stats', async () => {
  const a = await h.enqueue('jobs.email', { to: 'a@example.com' });
  assert.equal(a.queue, 'jobs.email');
  assert.equal(typeof a.messageId, 'number');
  await h.enqueue('jobs.email', 'plain text', { text: true });
  await h.enqueue('jobs.email', new Uint8Array([9, 8, 7]));
  assert.deepEqual(await h.queueStats('jobs.email'), { queue: 'jobs.email', ready: 3, inFlight: 0, delayed: 0, dead: 0 });

  const jobs = await h.fetchJobs('jobs.email', { max: 10, visibilityMs: 60_000 });
  assert.equal(jobs.length, 3);
  assert.deepEqual(jobs[0].data, { to: 'a@example.com' });
  assert.equal(jobs[0].messageId, a.messageId);
  assert.equal(jobs[0].attempt, 1);
  assert.equal(jobs[0].queue, 'jobs.email');
  assert.equal(typeof jobs[0].id, 'string');
  assert.equal(typeof jobs[0].ts, 'number');
  assert.equal(jobs[1].data, 'plain text');
  assert.deepEqual(jobs[2].bytes, new Uint8Array([9, 8, 7]));
  assert.equal((await h.queueStats('jobs.email')).inFlight, 3);

  await h.ack('jobs.email', jobs[0]); // the job itself
  await h.ack('jobs.email', jobs[2].id); // or its delivery id
  await h.extend('jobs.email', jobs[1], 120_000);
  await h.requeue('jobs.email', jobs[1]);
  assert.deepEqual(await h.queueStats('jobs.email'), { queue: 'jobs.email', ready: 1, inFlight: 0, delayed: 0, dead: 0 });
  await assert.rejects(h.ack('jobs.email', jobs[0]), { code: 'not_found', status: 404 });

  const again = await h.fetchJobs('jobs.email');
  assert.equal(again.length, 1);
  assert.equal(again[0].data, 'plain text');
  assert.equal(again[0].attempt, 2);
  await h.ack('jobs.email', again[0]);
  assert.deepEqual(await h.fetchJobs('jobs.email'), []);
});

test('a fetch acks the jobs it is given', async () => {
  for (const n of [1, 2, 3]) await h.enqueue('jobs.chain', { n });
  const [first] = await h.fetchJobs('jobs.chain');
  const second = await h.ackAndFetch('jobs.chain', [first]);
  assert.equal(second.acked, 1);
  assert.deepEqual(second.ackErrors, []);
  assert.deepEqual(second.jobs.map((j) => j.data), [{ n: 2 }]);
  // The first job's delivery is no longer current: named by its index, the other acked.
  const third = await h.ackAndFetch('jobs.chain', [first.id, second.jobs[0]], { max: 5 });
  assert.equal(third.acked, 1);
  assert.deepEqual(third.ackErrors.map((e) => [e.index, e.code]), [[0, 'not_found']]);
  assert.deepEqual(third.jobs.map((j) => j.data), [{ n: 3 }]);
  const last = await h.ackAndFetch('jobs.chain', third.jobs);
  assert.deepEqual([last.acked, last.jobs], [1, []]);
  assert.deepEqual(await h.queueStats('jobs.chain'), { queue: 'jobs.chain', ready: 0, inFlight: 0, delayed: 0, dead: 0 });
});

test('a long poll is answered by an enqueue; delays hold a job back', async () => {
  // Whichever reaches the server first, the fetch gets the job (at once, or when it comes).
  const waiting = h.fetchJobs('jobs.poll', { waitMs: 20_000 });
  await h.enqueue('jobs.poll', { n: 1 });
  const [job] = await waiting;
  assert.deepEqual(job.data, { n: 1 });
  await h.requeue('jobs.poll', job, { delayMs: 60_000 });
  assert.deepEqual(await h.queueStats('jobs.poll'), { queue: 'jobs.poll', ready: 0, inFlight: 0, delayed: 1, dead: 0 });
  await h.enqueue('jobs.poll', 'later', { text: true, delayMs: 60_000 });
  assert.equal((await h.queueStats('jobs.poll')).delayed, 2);
  assert.deepEqual(await h.purge('jobs.poll'), { queue: 'jobs.poll', purged: 2 });
  assert.equal((await h.queueStats('jobs.poll')).delayed, 0);
});

test('dead letters after max attempts, and redrive', async () => {
  await h.enqueue('jobs.fail', { n: 1 });
  for (let attempt = 1; attempt <= 2; attempt++) {
    const [job] = await h.fetchJobs('jobs.fail', { waitMs: 10_000 });
    assert.equal(job.attempt, attempt);
    await h.requeue('jobs.fail', job);
  }
  assert.equal((await h.queueStats('jobs.fail')).dead, 1);
  const [dead] = await h.fetchJobs('jobs.fail.dlq', { visibilityMs: 1 });
  assert.deepEqual(dead.data, { n: 1 });
  await eventually(async () => (await h.queueStats('jobs.fail.dlq')).ready === 1, 'the dead letter ready again');
  assert.deepEqual(await h.redrive('jobs.fail', { max: 10 }), { queue: 'jobs.fail', moved: 1 });
  const [back] = await h.fetchJobs('jobs.fail');
  assert.deepEqual(back.data, { n: 1 });
  assert.equal(back.attempt, 1);
  await h.ack('jobs.fail', back);
});

// GET /v1/queues is being added to the server at the time of writing (shape as in the
// server's own test: {"queues":[{"queue","ready","in_flight","delayed","dead"}]}).
test('the queue list: counts, prefix and paging', async () => {
  await h.enqueue('list.a', 1);
  await h.enqueue('list.b', 2);
  await h.enqueue('list.b', 3);
  await h.enqueue('list.c', 4, { delayMs: 60_000 });
  await h.fetchJobs('list.b');
  assert.deepEqual(await h.queues({ prefix: 'list.', limit: 2 }), [
    { queue: 'list.a', ready: 1, inFlight: 0, delayed: 0, dead: 0 },
    { queue: 'list.b', ready: 1, inFlight: 1, delayed: 0, dead: 0 },
  ]);
  assert.deepEqual(await h.queues({ prefix: 'list.', after: 'list.b' }), [
    { queue: 'list.c', ready: 0, inFlight: 0, delayed: 1, dead: 0 },
  ]);
  const all = (await h.queues()).map((q) => q.queue);
  assert.ok(['list.a', 'list.b', 'list.c'].every((q) => all.includes(q)));
  assert.ok(!all.some((q) => q.endsWith('.dlq')), 'no dead-letter queue listed');
});
