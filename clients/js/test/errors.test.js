// Typed errors: the server's code words over the WebSocket and HTTP, with statuses;
// the client's own `disconnected` and `timeout`; a refused subscription.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Herald, HeraldError } from '../src/herald.js';
import { startServer, nextEvent } from '../test-support/server.js';

let server;
const clients = [];
function client(url = server.url, options = {}) {
  const h = new Herald(url, { reconnect: { minDelayMs: 50, maxDelayMs: 1000 }, ...options });
  clients.push(h);
  return h;
}

before(async () => {
  server = await startServer({ args: ['--max-message-bytes', '1024'] });
});
after(async () => {
  for (const h of clients) h.close();
  await server.stop();
});

test('invalid_name over the WebSocket and HTTP; the connection stays', async () => {
  const h = client();
  const err = await h.publish('bad..name', 1).catch((e) => e);
  assert.ok(err instanceof HeraldError);
  assert.ok(err instanceof Error);
  assert.equal(err.name, 'HeraldError');
  assert.equal(err.code, 'invalid_name');
  assert.equal(err.status, undefined, 'no HTTP status over the WebSocket');
  assert.match(err.message, /segment|dot/);
  assert.equal(h.state, 'open');
  assert.equal((await h.publish('good.name', 1)).offset, 1);

  await assert.rejects(h.publishHttp('bad..name', 1), { name: 'HeraldError', code: 'invalid_name', status: 400 });
  await assert.rejects(h.enqueue('.q', 1), { code: 'invalid_name', status: 400 });
  await assert.rejects(h.history('a b'), { code: 'invalid_name', status: 400 });

  const sub = h.subscribe('bad..name');
  const failed = nextEvent(sub, 'error');
  await assert.rejects(sub.ready, { code: 'invalid_name' });
  assert.equal((await failed).code, 'invalid_name');
  assert.equal(h.subscriptions.has('bad..name'), false);
});

test('too_large over the WebSocket and HTTP', async () => {
  const h = client();
  const big = 'x'.repeat(2000);
  await assert.rejects(h.publish('big', big), { code: 'too_large' });
  await assert.rejects(h.publish('big', new Uint8Array(1025)), { code: 'too_large' });
  await assert.rejects(h.publishHttp('big', big, { text: true }), { code: 'too_large', status: 413 });
  await assert.rejects(h.enqueue('bigq', new Uint8Array(2048)), { code: 'too_large', status: 413 });
  assert.equal((await h.publish('big', new Uint8Array(1024))).offset, 1, 'the limit itself is allowed');
});

test('404 not_found and bad_request over HTTP', async () => {
  const h = client();
  await assert.rejects(h.ack('q', 'no-such-delivery'), { code: 'not_found', status: 404 });
  await assert.rejects(h.extend('q', 'no-such-delivery', 1000), { code: 'not_found', status: 404 });
  await assert.rejects(h.history('t', { limit: 0 }), { code: 'bad_request', status: 400 });
  await assert.rejects(h.fetchJobs('q', { max: 1000 }), { code: 'bad_request', status: 400 });
});

test('a server that cannot be reached: disconnected over HTTP', async () => {
  const stopped = await startServer();
  const url = stopped.url;
  await stopped.stop('SIGKILL');
  const h = client(url, { reconnect: false });
  await assert.rejects(h.topic('t'), { name: 'HeraldError', code: 'disconnected' });
});

test('a publish without an answer: timeout, then disconnected when the socket drops', async () => {
  const frozen = await startServer();
  try {
    const h = client(frozen.url, { reconnect: false, heartbeatMs: 0 });
    await h.connect();
    await frozen.pause(); // the socket stays open, nothing is answered
    await assert.rejects(h.publish('t', 1, { timeoutMs: 300 }), { code: 'timeout' });
    // The socket drops before an answer: rejected, never resent by the client.
    const pending = assert.rejects(h.publish('t', 2, { timeoutMs: 60_000 }), { code: 'disconnected' });
    const closed = nextEvent(h, 'state', (s) => s === 'closed');
    await frozen.stop('SIGKILL'); // still frozen: the publish was never answered
    await pending;
    await closed;
    await assert.rejects(h.publish('t', 3, { timeoutMs: 200 }), (err) => ['timeout', 'disconnected'].includes(err.code));
  } finally {
    await frozen.stop('SIGKILL');
  }
});

test('close() rejects what is pending with closed and ends the subscriptions', async () => {
  const h = client();
  const sub = h.subscribe('closing');
  await sub.ready;
  const ended = nextEvent(sub, 'error');
  h.close();
  assert.equal((await ended).code, 'closed');
  assert.equal(sub.active, false);
  assert.equal(h.state, 'closed');
});

test('a frozen server is noticed by the heartbeat; the client reconnects once it is back', async () => {
  const frozen = await startServer();
  try {
    const h = client(frozen.url, { heartbeatMs: 300, connectTimeoutMs: 500, reconnect: { minDelayMs: 50, maxDelayMs: 200 } });
    const sub = h.subscribe('hb');
    await sub.ready;
    const reconnecting = nextEvent(h, 'state', (s) => s === 'reconnecting');
    await frozen.pause();
    await reconnecting; // no answer to a ping within heartbeatMs: dropped without a close frame
    const resubscribed = nextEvent(sub, 'subscribed');
    frozen.resume();
    const again = await resubscribed;
    assert.equal(again.recovered, true);
    assert.equal(h.state, 'open');
    assert.equal((await h.publish('hb', 1)).offset, 1);
  } finally {
    await frozen.stop('SIGKILL');
  }
});
