// Credentials: Basic and Bearer as the Authorization header (HTTP, and the WebSocket
// upgrade through `ws`), a bearer token in the first `auth` frame (the browser path),
// refusals as `unauthorized` and `forbidden`.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { WebSocket as WS } from 'ws';
import { Herald } from '../src/herald.js';
import { startServer, runHerald, tempDir, removeDir, collect } from '../test-support/server.js';

const SECRET = 'a-test-secret-of-at-least-32-bytes-long!';
let server;
let dir;
const clients = [];
function client(options) {
  const h = new Herald(server.url, { reconnect: { minDelayMs: 50, maxDelayMs: 1000 }, ...options });
  clients.push(h);
  return h;
}

function jwt(claims, secret = SECRET) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

const carol = () =>
  jwt({
    sub: 'carol',
    exp: Math.floor(Date.now() / 1000) + 3600,
    herald: { publish: ['chat.>'], subscribe: ['chat.>'] },
  });

before(async () => {
  dir = tempDir();
  const hash = runHerald(['passwd'], 'pw\n').trim();
  const config = join(dir, 'herald.toml');
  writeFileSync(
    config,
    `[auth.jwt]
algorithm = "HS256"
secret = { env = "HERALD_JWT_SECRET" }

[[auth.users]]
name = "alice"
password_hash = "${hash}"
grants = { publish = ["chat.>"], subscribe = ["chat.>"], enqueue = ["jobs.>"], consume = ["jobs.>"] }
`,
  );
  server = await startServer({ args: ['--config', config], env: { HERALD_JWT_SECRET: SECRET } });
});
after(async () => {
  for (const h of clients) h.close();
  await server.stop();
  removeDir(dir);
});

test('no credentials: 401 unauthorized over HTTP', async () => {
  await assert.rejects(client().topic('chat.x'), { code: 'unauthorized', status: 401 });
});

test('Basic credentials over HTTP and the WebSocket; forbidden keeps the connection', async () => {
  const h = client({ user: 'alice', password: 'pw' });
  const r = await h.publishHttp('chat.basic', 'over http', { text: true });
  assert.equal(r.offset, 1);
  await h.enqueue('jobs.x', 1);
  await h.connect();
  const sub = h.subscribe('chat.basic', { from: 'earliest' });
  const got = collect(sub);
  await h.publish('chat.basic', 'over ws');
  await got.until(2);
  assert.deepEqual(
    got.messages.map((m) => m.data),
    ['over http', 'over ws'],
  );
  await assert.rejects(h.publish('other.topic', 1), { code: 'forbidden' });
  await assert.rejects(h.publishHttp('other.topic', 1), { code: 'forbidden', status: 403 });
  assert.equal(h.state, 'open');
  assert.equal((await h.publish('chat.basic', 'still here')).offset, 3);

  await assert.rejects(client({ user: 'alice', password: 'wrong' }).topic('chat.basic'), {
    code: 'unauthorized',
    status: 401,
  });
});

test('a bearer token as a header (Node, ws) and as the first auth frame (browser path)', async () => {
  for (const options of [{}, { WebSocket: WS }]) {
    const states = [];
    const h = client({ token: carol, ...options });
    h.on('state', (s) => states.push(s));
    await h.connect();
    assert.deepEqual(states, ['connecting', 'open'], 'open only once authenticated');
    const sub = h.subscribe('chat.bearer');
    const got = collect(sub);
    await sub.ready;
    const r = await h.publish('chat.bearer', { via: options.WebSocket ? 'frame' : 'header' });
    await got.until(1);
    assert.equal(got.messages[0].offset, r.offset);
    assert.equal((await h.topic('chat.bearer')).topic, 'chat.bearer', 'HTTP takes the token too');
    h.close();
  }
});

test('a refused token rejects connect() with unauthorized, on both paths', async () => {
  const bad = jwt({ sub: 'carol', exp: Math.floor(Date.now() / 1000) + 3600 }, 'another-secret-that-is-also-32-bytes-long');
  for (const options of [{}, { WebSocket: WS }]) {
    const h = client({ token: bad, ...options });
    const errors = [];
    h.on('error', (e) => errors.push(e));
    await assert.rejects(h.connect(), { name: 'HeraldError', code: 'unauthorized' });
    assert.equal(h.state, 'closed', 'no retry with refused credentials');
    assert.equal(errors.length, 1);
  }
  // Basic credentials cannot travel in an auth frame.
  const basicInFrame = client({ user: 'alice', password: 'pw', WebSocket: WS });
  await assert.rejects(basicInFrame.connect(), { code: 'unauthorized', message: /bearer token/ });
});
