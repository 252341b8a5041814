// Reconnect and resume: a server restart mid-stream (disk store, same port and data
// dir) loses and duplicates nothing; a history that changed during an outage (topic
// deleted, memory store restarted) is reported as recovered: false.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { Herald, HeraldError } from '../src/herald.js';
import {
  startServer,
  restartServer,
  tempDir,
  removeDir,
  collect,
  nextEvent,
  within,
  sleep,
} from '../test-support/server.js';

const cleanup = [];
after(async () => {
  for (const fn of cleanup.reverse()) await fn();
});

const fastReconnect = { minDelayMs: 50, maxDelayMs: 500 };

/** Publishes over HTTP until acknowledged, retrying while the server is away. */
async function publishWithRetry(h, topic, data, onFailure) {
  for (;;) {
    try {
      return await h.publishHttp(topic, data, { timeoutMs: 5000 });
    } catch (err) {
      if (!(err instanceof HeraldError) || !['disconnected', 'unavailable', 'timeout'].includes(err.code)) throw err;
      onFailure(err);
      await sleep(20); // a retry pace while the server restarts, not a synchronisation
    }
  }
}

test('a server restart mid-stream: every acknowledged message arrives once, in order', async () => {
  const dataDir = tempDir();
  cleanup.push(() => removeDir(dataDir));
  let server = await startServer({ store: 'disk', dataDir });
  cleanup.push(() => server.stop('SIGKILL'));
  const port = server.port;

  const subscriber = new Herald(server.url, { reconnect: fastReconnect });
  const publisher = new Herald(server.url);
  cleanup.push(() => subscriber.close());
  const sub = subscriber.subscribe('resume.stream', { from: 'earliest' });
  const subscribed = [];
  sub.on('subscribed', (s) => subscribed.push(s));
  const got = collect(sub);
  await sub.ready;

  const total = 400;
  const killAt = 150;
  const acked = [];
  const failures = [];
  let restart = null; // set while the server is down: the first failed publish starts it
  let restarted;
  const onFailure = (err) => {
    failures.push(err.code);
    if (restart) {
      restarted = restart();
      restarted.catch(() => {}); // awaited (and reported) after the publishing loop
    }
    restart = null;
  };
  const publishing = (async () => {
    for (let i = 0; i < total; i++) {
      acked.push((await publishWithRetry(publisher, 'resume.stream', { i }, onFailure)).offset);
      if (i === killAt) {
        // Wait until the subscriber has seen some of the stream, then crash the server.
        await got.untilOffset(acked[acked.length - 1] - 50);
        const reconnecting = nextEvent(subscriber, 'state', (s) => s === 'reconnecting');
        await server.stop('SIGKILL');
        await reconnecting;
        // The publisher goes on; once one of its publishes has failed, the server comes back.
        restart = async () => {
          server = await restartServer({ port, store: 'disk', dataDir });
        };
      }
    }
  })();
  await within(publishing, 'publishing through the restart', 120_000);
  await restarted;
  const last = acked[acked.length - 1];
  await got.untilOffset(last);

  const offsets = got.messages.map((m) => m.offset);
  // Contiguous from 1: nothing lost, nothing twice, in order.
  assert.deepEqual(
    offsets,
    Array.from({ length: offsets.length }, (_, i) => i + 1),
  );
  const received = new Set(offsets);
  for (const offset of acked) assert.ok(received.has(offset), `acknowledged offset ${offset} received`);
  // Retried publishes may be stored twice (the server stored one before it died), but
  // each acknowledged payload is in the stream.
  const payloads = new Set(got.messages.map((m) => m.data.i));
  for (let i = 0; i < total; i++) assert.ok(payloads.has(i), `payload ${i} received`);

  assert.ok(failures.length > 0, 'the publisher kept trying while the server was down');
  assert.ok(subscribed.length >= 2, 'subscribed again after the restart');
  const resumed = subscribed.slice(1);
  for (const s of resumed) {
    assert.equal(s.recovered, true, 'the disk store keeps the epoch: resumed by offset');
    assert.equal(s.resumed, true);
    assert.equal(s.epoch, subscribed[0].epoch);
  }
  subscriber.close();
});

/** A TCP proxy the test can cut: `cut()` drops its connections and refuses new ones. */
async function proxy(targetPort) {
  let open = true;
  const sockets = new Set();
  const listener = net.createServer((inbound) => {
    if (!open) return inbound.destroy();
    const outbound = net.connect(targetPort, '127.0.0.1');
    sockets.add(inbound).add(outbound);
    inbound.pipe(outbound).pipe(inbound);
    const end = () => {
      inbound.destroy();
      outbound.destroy();
      sockets.delete(inbound);
      sockets.delete(outbound);
    };
    inbound.on('error', end).on('close', end);
    outbound.on('error', end).on('close', end);
  });
  await new Promise((r) => listener.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${listener.address().port}`,
    cut() {
      open = false;
      for (const s of sockets) s.destroy();
    },
    restore() {
      open = true;
    },
    close: () => new Promise((r) => listener.close(r)),
  };
}

test('a topic deleted during an outage: resubscribed with recovered false, then live', async () => {
  const server = await startServer();
  cleanup.push(() => server.stop('SIGKILL'));
  const link = await proxy(server.port);
  cleanup.push(() => link.close());
  const direct = new Herald(server.url);
  const subscriber = new Herald(link.url, { reconnect: fastReconnect });
  cleanup.push(() => subscriber.close());

  const sub = subscriber.subscribe('resume.deleted', { from: 'earliest' });
  const events = [];
  sub.on('subscribed', (s) => events.push(s));
  const got = collect(sub);
  const first = await sub.ready;
  for (let i = 1; i <= 5; i++) await direct.publishHttp('resume.deleted', { i });
  await got.until(5);

  const reconnecting = nextEvent(subscriber, 'state', (s) => s === 'reconnecting');
  link.cut();
  await reconnecting;
  await direct.deleteTopic('resume.deleted');
  await direct.publishHttp('resume.deleted', { i: 'new-1' });
  await direct.publishHttp('resume.deleted', { i: 'new-2' });
  const resubscribed = nextEvent(sub, 'subscribed');
  link.restore();
  const again = await resubscribed;
  assert.equal(again.recovered, false, 'the epoch changed while away');
  assert.equal(again.resumed, true);
  assert.notEqual(again.epoch, first.epoch);
  assert.equal(again.next, 3);
  assert.equal(sub.lastOffset, 2, 'resume point moved to the new history');

  // Nothing of the new history is replayed (reload it over HTTP); live messages follow.
  const history = await subscriber.history('resume.deleted');
  assert.deepEqual(
    history.messages.map((m) => m.data.i),
    ['new-1', 'new-2'],
  );
  await direct.publishHttp('resume.deleted', { i: 'new-3' });
  await got.until(6);
  assert.deepEqual(
    got.messages.map((m) => [m.offset, m.data.i]),
    [
      [1, 1],
      [2, 2],
      [3, 3],
      [4, 4],
      [5, 5],
      [3, 'new-3'],
    ],
  );
  assert.deepEqual(
    events.map((e) => e.recovered),
    [true, false],
  );
  subscriber.close();
});

test('an outage without changes resumes by offset: recovered true, no gap', async () => {
  const server = await startServer();
  cleanup.push(() => server.stop('SIGKILL'));
  const link = await proxy(server.port);
  cleanup.push(() => link.close());
  const direct = new Herald(server.url);
  const subscriber = new Herald(link.url, { reconnect: fastReconnect });
  cleanup.push(() => subscriber.close());

  const sub = subscriber.subscribe('resume.gap'); // from latest
  const got = collect(sub);
  await sub.ready;
  await direct.publishHttp('resume.gap', 1);
  await got.until(1);
  const reconnecting = nextEvent(subscriber, 'state', (s) => s === 'reconnecting');
  link.cut();
  await reconnecting;
  // Published while the subscriber is away: replayed on resume.
  for (let i = 2; i <= 20; i++) await direct.publishHttp('resume.gap', i);
  const resubscribed = nextEvent(sub, 'subscribed');
  link.restore();
  const again = await resubscribed;
  assert.equal(again.recovered, true);
  await direct.publishHttp('resume.gap', 21);
  await got.until(21);
  assert.deepEqual(
    got.messages.map((m) => m.data),
    Array.from({ length: 21 }, (_, i) => i + 1),
  );
  subscriber.close();
});

test('a memory-store restart changes the epoch: recovered false is reported', async () => {
  let server = await startServer();
  cleanup.push(() => server.stop('SIGKILL'));
  const port = server.port;
  const subscriber = new Herald(server.url, { reconnect: fastReconnect });
  cleanup.push(() => subscriber.close());
  const sub = subscriber.subscribe('resume.memory');
  const got = collect(sub);
  const first = await sub.ready;
  await subscriber.publish('resume.memory', 'before');
  await got.until(1);

  const resubscribed = nextEvent(sub, 'subscribed');
  await server.stop('SIGKILL');
  server = await restartServer({ port });
  const again = await resubscribed;
  assert.equal(again.recovered, false);
  assert.notEqual(again.epoch, first.epoch);
  const r = await subscriber.publish('resume.memory', 'after');
  assert.equal(r.offset, 1);
  await got.until(2);
  assert.deepEqual(
    got.messages.map((m) => [m.offset, m.data]),
    [
      [1, 'before'],
      [1, 'after'],
    ],
  );
  subscriber.close();
});
