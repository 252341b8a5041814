// Publish and subscribe over the WebSocket (packed and unpacked), every message kind,
// subscriptions from earliest and from an offset, history over HTTP, state events.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Herald } from '../src/herald.js';
import { startServer, collect, nextEvent, within } from '../test-support/server.js';

let server;
const clients = [];
function client(options = {}) {
  const h = new Herald(server.url, { reconnect: { minDelayMs: 50, maxDelayMs: 1000 }, ...options });
  clients.push(h);
  return h;
}

before(async () => {
  server = await startServer();
});
after(async () => {
  for (const h of clients) h.close();
  await server.stop();
});

test('json over the WebSocket: publish returns the offset, the subscriber gets the message', async () => {
  const h = client();
  const states = [];
  h.on('state', (s) => states.push(s));
  await h.connect();
  assert.equal(h.state, 'open');
  const sub = h.subscribe('rt.json');
  const got = collect(sub);
  const ready = await sub.ready;
  assert.equal(ready.recovered, true);
  assert.equal(ready.next, 1);
  assert.equal(typeof ready.epoch, 'string');

  const value = { price: 12.5, tags: ['a', 'b'], nested: { n: null, ok: true } };
  const r = await h.publish('rt.json', value);
  assert.equal(r.topic, 'rt.json');
  assert.equal(r.offset, 1);
  assert.equal(typeof r.ts, 'number');
  const r2 = await h.publish('rt.json', 'a string');
  assert.equal(r2.offset, 2);
  await got.until(2);
  assert.deepEqual(got.messages, [
    { topic: 'rt.json', offset: 1, ts: r.ts, data: value },
    { topic: 'rt.json', offset: 2, ts: r2.ts, data: 'a string' },
  ]);
  h.close();
  assert.deepEqual(states, ['connecting', 'open', 'closed']);
});

test('text published over HTTP arrives as a string; binary (WS and HTTP) as bytes', async () => {
  const pub = client();
  const subscriber = client();
  const sub = subscriber.subscribe('rt.kinds'); // connects by itself
  const got = collect(sub);
  await sub.ready;

  const text = await pub.publishHttp('rt.kinds', 'héllo\nworld', { text: true });
  assert.equal(text.offset, 1);
  const bytes = new Uint8Array([0, 1, 2, 250, 255]);
  const wsBinary = await pub.publish('rt.kinds', bytes);
  assert.equal(wsBinary.offset, 2);
  const httpBinary = await pub.publishHttp('rt.kinds', bytes.buffer.slice(1));
  assert.equal(httpBinary.offset, 3);
  const httpJson = await pub.publishHttp('rt.kinds', { a: [1, 2] });
  assert.equal(httpJson.offset, 4);
  const empty = await pub.publish('rt.kinds', new Uint8Array(0));
  assert.equal(empty.offset, 5);

  const messages = await got.until(5);
  assert.equal(messages[0].data, 'héllo\nworld');
  assert.deepEqual(messages[1].bytes, bytes);
  assert.equal(messages[1].data, undefined);
  assert.deepEqual(messages[2].bytes, new Uint8Array([1, 2, 250, 255]));
  assert.deepEqual(messages[3].data, { a: [1, 2] });
  assert.deepEqual(messages[4].bytes, new Uint8Array(0));

  const history = await pub.history('rt.kinds');
  assert.equal(history.next, 6);
  assert.equal(history.epoch, (await sub.ready).epoch);
  assert.deepEqual(
    history.messages.map((m) => m.offset),
    [1, 2, 3, 4, 5],
  );
  assert.equal(history.messages[0].data, 'héllo\nworld');
  assert.deepEqual(history.messages[1].bytes, bytes);
});

test('subscribe from earliest, from an offset, and with the epoch checked', async () => {
  const h = client();
  for (let i = 1; i <= 10; i++) await h.publish('rt.from', { i });

  const earliest = h.subscribe('rt.from', { from: 'earliest' });
  const all = collect(earliest);
  await all.until(10);
  assert.deepEqual(
    all.messages.map((m) => m.data.i),
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
  );
  const { epoch } = await earliest.ready;
  await earliest.unsubscribe();

  const other = client();
  const fromSeven = other.subscribe('rt.from', { from: 7, epoch });
  const tail = collect(fromSeven);
  const ready = await fromSeven.ready;
  assert.equal(ready.recovered, true);
  assert.equal(ready.next, 11);
  await h.publish('rt.from', { i: 11 });
  await tail.until(5);
  assert.deepEqual(
    tail.messages.map((m) => m.offset),
    [7, 8, 9, 10, 11],
  );

  // A wrong epoch: nothing replayed, recovered false, live messages follow.
  const third = client();
  const wrong = third.subscribe('rt.from', { from: 3, epoch: 'not-the-epoch' });
  const live = collect(wrong);
  const refused = await wrong.ready;
  assert.equal(refused.recovered, false);
  await h.publish('rt.from', { i: 12 });
  await live.until(1);
  assert.deepEqual(
    live.messages.map((m) => m.offset),
    [12],
  );
});

test('a burst arrives complete and in order, packed and unpacked', async () => {
  for (const pack of [true, false]) {
    const topic = `rt.burst.${pack ? 'packed' : 'plain'}`;
    const h = client({ pack });
    const sub = h.subscribe(topic);
    const got = collect(sub);
    await sub.ready;
    // Pipelined: 500 publishes in flight at once, JSON with line breaks inside.
    const replies = await Promise.all(
      Array.from({ length: 500 }, (_, i) => h.publish(topic, { i, text: `line\nbreak ${i}` })),
    );
    assert.deepEqual(
      replies.map((r) => r.offset),
      Array.from({ length: 500 }, (_, i) => i + 1),
    );
    await got.until(500);
    assert.deepEqual(
      got.messages.map((m) => m.data.i),
      Array.from({ length: 500 }, (_, i) => i),
    );
    assert.equal(got.messages[42].data.text, 'line\nbreak 42');
    assert.equal(sub.lastOffset, 500);
  }
});

test('JSON with raw line breaks reaches a packed subscriber as the same value', async () => {
  const h = client();
  const sub = h.subscribe('rt.lines');
  const got = collect(sub);
  await sub.ready;
  await h.publishHttp('rt.lines', '{"a":\n  [1,\n 2],\r\n "b": "x\\ny"}', { contentType: 'application/json' });
  await h.publishHttp('rt.lines', '[\n1.50\n]', { contentType: 'application/json' });
  await got.until(2);
  assert.deepEqual(got.messages[0].data, { a: [1, 2], b: 'x\ny' });
  assert.deepEqual(got.messages[1].data, [1.5]);
});

test('unsubscribe stops the stream; topics and topic info over HTTP', async () => {
  const h = client();
  const sub = h.subscribe('rt.unsub');
  const got = collect(sub);
  await sub.ready;
  await h.publish('rt.unsub', 1);
  await got.until(1);
  const info = await h.topic('rt.unsub');
  assert.equal(info.topic, 'rt.unsub');
  assert.equal(info.last, 1);
  assert.equal(info.subscribers, 1);
  await sub.unsubscribe();
  assert.equal(sub.active, false);
  await h.publish('rt.unsub', 2);
  await h.ping(); // a round trip after the publish: a message would have come before the pong
  assert.equal(got.messages.length, 1);
  assert.equal((await h.topic('rt.unsub')).subscribers, 0);

  const listed = await h.topics({ prefix: 'rt.unsub' });
  assert.deepEqual(
    listed.map((t) => t.topic),
    ['rt.unsub'],
  );
  await h.deleteTopic('rt.unsub');
  assert.equal((await h.topic('rt.unsub')).last, 0);

  // The same topic can be followed again after an unsubscribe.
  const again = h.subscribe('rt.unsub');
  await within(again.ready, 'resubscribe');
  assert.throws(() => h.subscribe('rt.unsub'), { name: 'HeraldError', code: 'already_subscribed' });
});

test('a subscription sees a deleted topic start again at offset 1 (reset event)', async () => {
  const h = client();
  const sub = h.subscribe('rt.reset');
  const got = collect(sub);
  await sub.ready;
  await h.publish('rt.reset', 'a');
  await h.publish('rt.reset', 'b');
  await got.until(2);
  const reset = nextEvent(sub, 'reset');
  await h.deleteTopic('rt.reset');
  await h.publish('rt.reset', 'c');
  await reset;
  await got.until(3);
  assert.deepEqual(
    got.messages.map((m) => [m.offset, m.data]),
    [
      [1, 'a'],
      [2, 'b'],
      [1, 'c'],
    ],
  );
});
