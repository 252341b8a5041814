// Presence (issue 14): join/leave events between two clients, the member list and
// counts over the WebSocket and HTTP, publishers as members, the event rate limit.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Herald, HeraldError } from '../src/herald.js';
import { startServer, nextEvent, within } from '../test-support/server.js';

let server;
const clients = [];
function client() {
  const h = new Herald(server.url, { reconnect: { minDelayMs: 50, maxDelayMs: 1000 } });
  clients.push(h);
  return h;
}

before(async () => {
  server = await startServer();
  // A clear failure when the binary predates presence (instead of awaited events timing out).
  try {
    await new Herald(server.url).presenceList('presence.probe');
  } catch (err) {
    if (err instanceof HeraldError && err.code === 'not_found') {
      throw new Error('this herald binary has no presence (GET /v1/topics/{topic}/presence is 404)');
    }
    throw err;
  }
});
after(async () => {
  for (const h of clients) h.close();
  await server.stop();
});

const byInfo = (members) => members.map((m) => m.info?.name ?? null).sort();

test('join and leave between two clients, with info, counts and the member list', async () => {
  const ann = client();
  const bob = client();
  const annSub = ann.subscribe('room.1', { presence: true, info: { name: 'ann' } });
  const annJoins = [];
  annSub.on('join', (ev) => annJoins.push(ev));
  await annSub.ready;

  const bobJoined = nextEvent(annSub, 'join', (ev) => ev.member.info?.name === 'bob', 'bob joins');
  const bobSub = bob.subscribe('room.1', { presence: true, info: { name: 'bob' } });
  const bobJoins = [];
  bobSub.on('join', (ev) => bobJoins.push(ev));
  await bobSub.ready;
  const join = await bobJoined;
  assert.equal(join.topic, 'room.1');
  assert.equal(join.member.role, 'subscriber');
  assert.equal(join.member.door, 'ws');
  assert.equal(join.member.user, null);
  assert.equal(typeof join.member.conn, 'number');
  assert.equal(join.type, undefined, 'the event is the frame without its type');

  // Over the WebSocket: both subscribers, by conn.
  const list = await ann.presence('room.1');
  assert.equal(list.topic, 'room.1');
  assert.equal(list.subscribers, 2);
  assert.equal(list.publishers, 0);
  assert.equal(list.more, false);
  assert.deepEqual(byInfo(list.members), ['ann', 'bob']);
  const conns = list.members.map((m) => m.conn);
  assert.deepEqual(conns, [...conns].sort((a, b) => a - b), 'members by conn');

  // Over HTTP, paged.
  const page = await bob.presenceList('room.1', { limit: 1 });
  assert.equal(page.subscribers, 2);
  assert.equal(page.members.length, 1);
  assert.equal(page.next, page.members[0].conn);
  const rest = await bob.presenceList('room.1', { after: page.next });
  assert.deepEqual(
    [...page.members, ...rest.members].map((m) => m.conn),
    conns,
  );
  assert.equal(rest.next, null);

  // Bob publishes: his connection becomes a publisher member.
  const bobPublishes = nextEvent(annSub, 'join', (ev) => ev.member.role === 'publisher', 'bob as publisher');
  await bob.publish('room.1', 'hi');
  const asPublisher = await bobPublishes;
  assert.equal(asPublisher.member.conn, join.member.conn);
  assert.equal(asPublisher.member.door, 'ws');
  const info = await ann.topic('room.1');
  assert.equal(info.subscribers, 2);
  assert.equal(info.publishers, 1);
  assert.equal((await ann.presence('room.1')).publishers, 1);

  // Bob goes: a leave for each of his memberships.
  const leaves = [];
  const bothLeft = new Promise((resolve) =>
    annSub.on('leave', (ev) => {
      leaves.push(ev);
      if (leaves.length === 2) resolve();
    }),
  );
  bob.close();
  await within(bothLeft, 'bob leaves twice');
  assert.deepEqual(leaves.map((ev) => ev.member.role).sort(), ['publisher', 'subscriber']);
  for (const ev of leaves) assert.equal(ev.member.conn, join.member.conn);
  const after = await ann.presence('room.1');
  assert.equal(after.subscribers, 1);
  assert.equal(after.publishers, 0);
  assert.deepEqual(byInfo(after.members), ['ann']);

  // No one is told of their own subscription's join.
  assert.ok(annJoins.every((ev) => ev.member.info?.name !== 'ann'));
  assert.ok(bobJoins.every((ev) => ev.member.info?.name !== 'bob'));
});

test('a subscription without presence gets no events; the query needs no subscription', async () => {
  const quiet = client();
  const other = client();
  const sub = quiet.subscribe('room.2');
  let events = 0;
  for (const name of ['join', 'leave', 'presence_lost']) sub.on(name, () => events++);
  await sub.ready;
  const watcher = other.subscribe('room.2', { presence: true });
  await watcher.ready;
  const third = client();
  const joined = nextEvent(watcher, 'join');
  await third.subscribe('room.2').ready;
  await joined;
  await quiet.ping(); // a round trip: an event for `quiet` would have arrived before
  assert.equal(events, 0);

  const outsider = client();
  const list = await outsider.presence('room.2');
  assert.equal(list.subscribers, 3);
  assert.equal(list.members.length, 3);
});

test('a reconnect is a leave of the old connection and a join of the new one', async () => {
  const watcher = client();
  const watch = watcher.subscribe('room.3', { presence: true });
  await watch.ready;
  const mover = client();
  const joined = nextEvent(watch, 'join');
  const moverSub = mover.subscribe('room.3', { presence: true, info: { name: 'mover' } });
  await moverSub.ready;
  const first = await joined;

  // The admin API closes the mover's connection; the client reconnects and resubscribes.
  const left = nextEvent(watch, 'leave');
  const rejoined = nextEvent(watch, 'join', (ev) => ev.member.info?.name === 'mover', 'mover rejoins');
  const response = await fetch(`${server.url}/v1/admin/connections/${first.member.conn}`, { method: 'DELETE' });
  assert.equal(response.status, 204);
  assert.equal((await left).member.conn, first.member.conn);
  const second = await rejoined;
  assert.notEqual(second.member.conn, first.member.conn);
  assert.deepEqual(second.member.info, { name: 'mover' }, 'info is sent again on resubscribe');
});

test('info over 1 KiB is refused with bad_request', async () => {
  const h = client();
  const sub = h.subscribe('room.4', { presence: true, info: { blob: 'x'.repeat(2000) } });
  const failed = nextEvent(sub, 'error');
  await assert.rejects(sub.ready, { name: 'HeraldError', code: 'bad_request' });
  assert.equal((await failed).code, 'bad_request');
  assert.equal(sub.active, false);
  assert.equal(h.subscriptions.has('room.4'), false);
});

test('over the per-topic event rate, events are dropped and presence_lost says how many', async () => {
  const limited = await startServer({ args: ['--presence-events-per-second', '1'] });
  const local = [];
  try {
    const watcher = new Herald(limited.url);
    local.push(watcher);
    const watch = watcher.subscribe('room.busy', { presence: true });
    await watch.ready;
    const lost = nextEvent(watch, 'presence_lost');
    const joins = [];
    watch.on('join', (ev) => joins.push(ev));
    const crowd = Array.from({ length: 20 }, () => new Herald(limited.url));
    local.push(...crowd);
    await Promise.all(crowd.map((h) => h.subscribe('room.busy').ready));
    const event = await lost;
    assert.equal(event.topic, 'room.busy');
    assert.ok(event.dropped >= 1, `dropped ${event.dropped}`);
    assert.ok(event.dropped + joins.length <= 20);
    assert.ok(event.subscribers >= 2 && event.subscribers <= 21, `subscribers ${event.subscribers}`);
    assert.equal(event.publishers, 0);
    assert.equal((await watcher.presence('room.busy')).subscribers, 21, 'the list is complete');
  } finally {
    for (const h of local) h.close();
    await limited.stop();
  }
});
