// The client against a scripted fake WebSocket (no server): the frames it sends on
// subscribe and resubscribe, packed-frame splitting, the duplicate guard, pending calls
// on a drop, the auth frame, HTTP error mapping.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Herald, HeraldError } from '../src/herald.js';
import { nextEvent } from '../test-support/server.js';

/** A WebSocket double: records what the client sends; the test plays the server. */
function fakeServer() {
  const sockets = [];
  const opened = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      sockets.push(this);
      queueMicrotask(() => {
        this.onopen?.({});
        for (const resolve of opened.splice(0)) resolve(this);
      });
    }
    send(text) {
      this.sent.push(JSON.parse(text));
      this.onsent?.(JSON.parse(text));
    }
    close(code = 1000, reason = '') {
      queueMicrotask(() => this.onclose?.({ code, reason }));
    }
    /** Server side: frames packed into one text frame. */
    push(...frames) {
      this.onmessage?.({ data: frames.map((f) => JSON.stringify(f)).join('\n') });
    }
    /** Server side: the next frame the client sends with `op`. */
    next(op) {
      const found = this.sent.find((f) => f.op === op && !f.seen);
      if (found) {
        found.seen = true;
        return Promise.resolve(found);
      }
      return new Promise((resolve) => {
        const previous = this.onsent;
        this.onsent = (frame) => {
          previous?.(frame);
          if (frame.op === op && !frame.seen) {
            this.onsent = previous;
            this.sent.find((f) => f.id === frame.id).seen = true;
            resolve(frame);
          }
        };
      });
    }
  }
  return {
    FakeSocket,
    sockets,
    nextSocket: () => new Promise((resolve) => opened.push(resolve)),
  };
}

const quick = { minDelayMs: 1, maxDelayMs: 5 };

test('packed frames are split; the URL asks for them; subscribe sends from and presence', async () => {
  const fake = fakeServer();
  const h = new Herald('http://example.test:7070/', { WebSocket: fake.FakeSocket, reconnect: quick, heartbeatMs: 0 });
  const socket = fake.nextSocket();
  await h.connect();
  const ws = await socket;
  assert.equal(ws.url, 'ws://example.test:7070/v1/ws?pack=lines');
  const sub = h.subscribe('news', { from: 'earliest', presence: true, info: { n: 1 } });
  const frame = await ws.next('subscribe');
  assert.deepEqual(
    { ...frame, seen: undefined },
    { op: 'subscribe', id: frame.id, topic: 'news', from: 'earliest', presence: true, info: { n: 1 }, seen: undefined },
  );
  const messages = [];
  sub.on('message', (m) => messages.push(m));
  const joins = [];
  sub.on('join', (j) => joins.push(j));
  ws.push(
    { type: 'subscribed', id: frame.id, topic: 'news', epoch: 'e1', next: 3, recovered: true },
    { type: 'message', topic: 'news', offset: 1, ts: 10, data: { a: 1 } },
    { type: 'message', topic: 'news', offset: 2, ts: 11, data_b64: 'AAEC' },
    { type: 'join', topic: 'news', member: { conn: 7, door: 'ws', role: 'subscriber', user: null, info: null } },
    { type: 'message', topic: 'other', offset: 1, ts: 12, data: 'not ours' },
  );
  assert.deepEqual(await sub.ready, { topic: 'news', epoch: 'e1', next: 3, recovered: true, resumed: false });
  assert.deepEqual(messages, [
    { topic: 'news', offset: 1, ts: 10, data: { a: 1 } },
    { topic: 'news', offset: 2, ts: 11, bytes: new Uint8Array([0, 1, 2]) },
  ]);
  assert.deepEqual(joins, [{ topic: 'news', member: { conn: 7, door: 'ws', role: 'subscriber', user: null, info: null } }]);
  h.close();
});

test('a drop rejects pending publishes with disconnected; the resubscribe resumes by offset and epoch', async () => {
  const fake = fakeServer();
  const h = new Herald('https://example.test', { WebSocket: fake.FakeSocket, reconnect: quick, heartbeatMs: 0, pack: false });
  let socket = fake.nextSocket();
  const sub = h.subscribe('t', { from: 'latest' });
  let ws = await socket;
  assert.equal(ws.url, 'wss://example.test/v1/ws');
  const first = await ws.next('subscribe');
  assert.equal(first.from, 'latest');
  ws.push({ type: 'subscribed', id: first.id, topic: 't', epoch: 'E', next: 5, recovered: true });
  await sub.ready;
  assert.equal(sub.lastOffset, 4);
  const got = [];
  sub.on('message', (m) => got.push(m.offset));
  ws.push({ type: 'message', topic: 't', offset: 5, ts: 1, data: 5 });
  ws.push({ type: 'message', topic: 't', offset: 6, ts: 1, data: 6 });

  const publish = h.publish('t', 'x');
  await ws.next('publish');
  socket = fake.nextSocket();
  const states = [];
  h.on('state', (s) => states.push(s));
  ws.close(1001, 'server shutting down');
  await assert.rejects(publish, (err) => err instanceof HeraldError && err.code === 'disconnected');

  ws = await socket;
  const again = await ws.next('subscribe');
  assert.equal(again.from, 7);
  assert.equal(again.epoch, 'E');
  assert.equal(ws.sent.filter((f) => f.op === 'publish').length, 0, 'never resent');
  const resubscribed = nextEvent(sub, 'subscribed');
  // A defensive duplicate before the resumed stream: dropped.
  ws.push({ type: 'subscribed', id: again.id, topic: 't', epoch: 'E', next: 9, recovered: true });
  ws.push({ type: 'message', topic: 't', offset: 6, ts: 1, data: 6 });
  ws.push({ type: 'message', topic: 't', offset: 7, ts: 1, data: 7 });
  ws.push({ type: 'message', topic: 't', offset: 8, ts: 1, data: 8 });
  assert.equal((await resubscribed).resumed, true);
  assert.deepEqual(got, [5, 6, 7, 8]);
  assert.deepEqual(states, ['reconnecting', 'open']);
  h.close();
});

test('a publish made while offline waits and is sent once the connection opens', async () => {
  const fake = fakeServer();
  const h = new Herald('http://x.test', { WebSocket: fake.FakeSocket, reconnect: quick, heartbeatMs: 0 });
  const socket = fake.nextSocket();
  const published = h.publish('t', { v: 1 }, { ttlMs: 500 });
  const ws = await socket;
  const frame = await ws.next('publish');
  assert.deepEqual(frame.data, { v: 1 });
  assert.equal(frame.ttl_ms, 500);
  ws.push({ type: 'published', id: frame.id, topic: 't', offset: 9, ts: 99 });
  assert.deepEqual(await published, { topic: 't', offset: 9, ts: 99 });
  h.close();
});

test('a token goes in an auth frame first when the WebSocket cannot send headers', async () => {
  const fake = fakeServer();
  const h = new Herald('http://x.test', { WebSocket: fake.FakeSocket, token: 'T0K', heartbeatMs: 0 });
  const socket = fake.nextSocket();
  const connected = h.connect();
  const ws = await socket;
  const auth = await ws.next('auth');
  assert.equal(auth.token, 'T0K');
  assert.equal(h.state, 'connecting', 'not open before authenticated');
  const published = h.publish('t', 1);
  ws.push({ type: 'authenticated', id: auth.id, user: 'carol', expires: 1 });
  await connected;
  assert.equal(h.state, 'open');
  const frame = await ws.next('publish');
  assert.ok(ws.sent.indexOf(ws.sent.find((f) => f.op === 'auth')) === 0, 'the auth frame is first');
  ws.push({ type: 'error', id: frame.id, code: 'forbidden', message: 'no publish on t' });
  await assert.rejects(published, { code: 'forbidden', message: 'no publish on t' });
  h.close();
});

test('HTTP errors carry code, status and Retry-After', async () => {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url: String(url), init });
    return new Response(JSON.stringify({ error: { code: 'rate_limited', message: 'slow down' } }), {
      status: 429,
      headers: { 'retry-after': '2', 'content-type': 'application/json' },
    });
  };
  const h = new Herald('http://x.test', { fetch, user: 'alice', password: 'pw' });
  const err = await h.enqueue('q', { a: 1 }, { delayMs: 5 }).catch((e) => e);
  assert.ok(err instanceof HeraldError);
  assert.equal(err.code, 'rate_limited');
  assert.equal(err.status, 429);
  assert.equal(err.retryAfterMs, 2000);
  assert.equal(err.message, 'slow down');
  assert.equal(calls[0].url, 'http://x.test/v1/queues/q/messages?delay_ms=5');
  assert.equal(calls[0].init.headers.Authorization, 'Basic ' + btoa('alice:pw'));
  assert.equal(calls[0].init.headers['Content-Type'], 'application/json');
  assert.equal(calls[0].init.body, '{"a":1}');

  const proxy = new Herald('http://x.test', { fetch: async () => new Response('<html>bad gateway</html>', { status: 502 }) });
  await assert.rejects(proxy.topic('t'), { code: 'unavailable', status: 502 });
});

test('unsubscribe before the reply still ends the server side; a refused resubscribe ends the subscription', async () => {
  const fake = fakeServer();
  const h = new Herald('http://x.test', { WebSocket: fake.FakeSocket, reconnect: quick, heartbeatMs: 0 });
  let socket = fake.nextSocket();
  await h.connect();
  let ws = await socket;
  const early = h.subscribe('a');
  const subscribe = await ws.next('subscribe');
  const gone = early.unsubscribe();
  const unsubscribe = await ws.next('unsubscribe');
  assert.equal(unsubscribe.topic, 'a');
  ws.push(
    { type: 'subscribed', id: subscribe.id, topic: 'a', epoch: 'E', next: 1, recovered: true },
    { type: 'message', topic: 'a', offset: 1, ts: 1, data: 'late' },
    { type: 'unsubscribed', id: unsubscribe.id, topic: 'a' },
  );
  await gone;
  await assert.rejects(early.ready, { code: 'closed' });

  const sub = h.subscribe('b');
  const first = await ws.next('subscribe');
  ws.push({ type: 'subscribed', id: first.id, topic: 'b', epoch: 'E', next: 1, recovered: true });
  await sub.ready;
  socket = fake.nextSocket();
  ws.close(1013, 'slow consumer');
  ws = await socket;
  const again = await ws.next('subscribe');
  assert.equal(again.topic, 'b', 'only the live subscription is resumed');
  assert.equal(again.from, 1);
  const failed = nextEvent(sub, 'error');
  ws.push({ type: 'error', id: again.id, code: 'forbidden', message: 'no subscribe on b' });
  assert.equal((await failed).code, 'forbidden');
  assert.equal(sub.active, false);
  assert.equal(h.subscriptions.size, 0);
  h.close();
});
