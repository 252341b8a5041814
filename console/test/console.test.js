// The web console in headless Chromium against the real herald binary (HERALD_BIN):
// page A subscribes to a topic and shows what page B publishes (JSON, text, binary);
// a queue's counts follow jobs enqueued, fetched, acked and dead-lettered over HTTP, and
// its dead letter is redriven with the page's button; the history pages;
// the header's counters fill in; and neither page logs an error. With
// HERALD_CONSOLE_SCREENSHOT set, page A is saved to docs/console.png. Then, on a server
// with [auth], the page asks for a token, refuses a bad one and works with a good one.
//
// Chromium is the system's (HERALD_CHROMIUM, default /usr/bin/chromium), never a
// downloaded one: playwright-core drives it over CDP.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const TIMEOUT = 15_000;

const heralds = [];
let base;
let context;
let profile;

/** Starts `herald serve` on a free port with `args` and `env`; resolves to its base URL
 * once it listens. */
function startHerald(args = [], env = {}) {
  const bin = process.env.HERALD_BIN;
  assert.ok(bin, 'HERALD_BIN must name the herald binary');
  const herald = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--store', 'memory', ...args], {
    env: { ...process.env, HERALD_LOG: 'info', ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  heralds.push(herald);
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: herald.stderr });
    const timer = setTimeout(() => reject(new Error('herald did not start')), TIMEOUT);
    herald.on('exit', (code) => reject(new Error(`herald exited with ${code}`)));
    lines.on('line', (line) => {
      const addr = /addr=(\S+)/.exec(line);
      if (addr) {
        clearTimeout(timer);
        resolve(`http://${addr[1]}`);
      }
    });
  });
}

/**
 * A page of the console at `url` whose console errors and uncaught exceptions land in
 * `errors`, except failed loads of `expected` (URL patterns) that the page expects.
 */
async function openConsole(name, errors, { url = base, connected = true, expected = [] } = {}) {
  const page = await context.newPage();
  page.on('pageerror', (err) => errors.push(`${name}: uncaught ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    // The queue list (GET /v1/queues) may not exist in this server yet: the page then
    // watches queues by name, and Chromium logs the 404 it got on the way.
    const at = msg.location()?.url ?? '';
    const known = [/\/v1\/queues(\?|$)/, ...expected];
    if (msg.text().startsWith('Failed to load resource') && known.some((re) => re.test(at))) return;
    errors.push(`${name}: ${msg.text()} (${at})`);
  });
  await page.goto(`${url}/`);
  if (connected) await page.locator('#status', { hasText: 'Connected' }).waitFor({ timeout: TIMEOUT });
  return page;
}

/** An HS256 JWT for `sub` with `grants`, valid for an hour. */
function jwt(secret, sub, grants) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const unsigned = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ sub, exp: Math.floor(Date.now() / 1000) + 3600, herald: grants })}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

async function http(method, path, body, contentType) {
  const headers = contentType ? { 'Content-Type': contentType } : {};
  const response = await fetch(`${base}${path}`, { method, headers, body });
  const text = await response.text();
  assert.ok(response.ok, `${method} ${path}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** Waits until the queue's row shows `counts` ({ready, in_flight, delayed, dead}). */
async function expectCounts(page, queue, counts) {
  const row = page.locator(`#queues-table tr[data-queue="${queue}"]`);
  for (const [column, value] of Object.entries(counts)) {
    await row.locator(`td[data-col="${column}"]`, { hasText: new RegExp(`^${value}$`) }).waitFor({ timeout: TIMEOUT });
  }
}

before(async () => {
  // One delivery per job: a lease that ends dead-letters it (the DLQ part below).
  base = await startHerald(['--queue-max-attempts', '1']);
  profile = mkdtempSync(join(tmpdir(), 'herald-console-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.HERALD_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1440, height: 1000 },
    colorScheme: 'light',
  });
});

after(async () => {
  await context?.close();
  for (const herald of heralds) herald.kill();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

test('live messages, queue counts and history, without console errors', async () => {
  const errors = [];
  const a = await openConsole('A', errors);
  const b = await openConsole('B', errors);

  // A subscribes; B publishes JSON (over the WebSocket), text and binary (over HTTP).
  await a.getByLabel('Name').fill('demo.chat');
  await a.getByRole('button', { name: 'Subscribe', exact: true }).click();
  await a.locator('#topic-info', { hasText: 'Subscribed to demo.chat' }).waitFor({ timeout: TIMEOUT });

  // Presence: A is a member; B's subscription joins and leaves live, and the counts
  // follow the events.
  await a.locator('#presence-counts', { hasText: /^1 subscriber, 0 publishers/ }).waitFor({ timeout: TIMEOUT });
  await a.locator('#presence-members li').first().waitFor({ timeout: TIMEOUT });
  await b.getByLabel('Name').fill('demo.chat');
  await b.getByRole('button', { name: 'Subscribe', exact: true }).click();
  await a.locator('#presence-events li', { hasText: /subscriber.* joined$/ }).waitFor({ timeout: TIMEOUT });
  await a.locator('#presence-counts', { hasText: /^2 subscribers, 0 publishers/ }).waitFor({ timeout: TIMEOUT });
  await b.getByRole('button', { name: 'Unsubscribe', exact: true }).click();
  await a.locator('#presence-events li', { hasText: /subscriber.* left$/ }).waitFor({ timeout: TIMEOUT });
  await a.locator('#presence-counts', { hasText: /^1 subscriber, 0 publishers/ }).waitFor({ timeout: TIMEOUT });

  const publish = async (format, payload, offset) => {
    await b.locator('#publish select[name=format]').selectOption(format);
    await b.locator('#publish input[name=topic]').fill('demo.chat');
    await b.getByLabel('Payload').fill(payload);
    await b.getByRole('button', { name: 'Publish', exact: true }).click();
    await b.locator('#publish-result', { hasText: `offset ${offset}` }).waitFor({ timeout: TIMEOUT });
  };
  await publish('json', '{"user":"bob","text":"hello from B","n":1}', 1);
  await publish('text', 'plain words, as is', 2);
  await publish('hex', 'de ad be ef', 3);
  await publish('base64', 'AAEC', 4);

  const live = a.locator('#live li');
  await live.nth(3).waitFor({ timeout: TIMEOUT });
  assert.equal(await live.count(), 4);
  assert.equal(await live.nth(0).locator('pre').textContent(), '{\n  "user": "bob",\n  "text": "hello from B",\n  "n": 1\n}');
  assert.equal(await live.nth(1).locator('pre').textContent(), 'plain words, as is');
  assert.equal(await live.nth(2).locator('pre').textContent(), 'de ad be ef');
  assert.equal(await live.nth(3).locator('pre').textContent(), '00 01 02');
  assert.match(await live.nth(2).locator('.kind').textContent(), /binary/);

  // The topic list shows it, with its last offset.
  const listed = a.locator('#topics-table tr[data-topic="demo.chat"]');
  await listed.locator('td', { hasText: /^4$/ }).waitFor({ timeout: TIMEOUT });

  // History, paged: two at a time.
  await a.locator('#history input[name=limit]').fill('2');
  await a.locator('#history input[name=from]').fill('0');
  await a.getByRole('button', { name: 'Load', exact: true }).click();
  await a.locator('#history-table tbody tr').nth(1).waitFor({ timeout: TIMEOUT });
  assert.equal(await a.locator('#history-table tbody td.num').first().textContent(), '1');
  await a.getByRole('button', { name: 'Next', exact: true }).click();
  await a.locator('#history-table tbody td.num', { hasText: /^3$/ }).waitFor({ timeout: TIMEOUT });
  await a.getByRole('button', { name: 'Previous', exact: true }).click();
  await a.locator('#history-table tbody td.num', { hasText: /^1$/ }).waitFor({ timeout: TIMEOUT });

  // A queue's counts follow its jobs.
  await a.getByLabel('Queue', { exact: true }).fill('jobs');
  await a.getByRole('button', { name: 'Watch', exact: true }).click();
  for (let i = 0; i < 3; i++) await http('POST', '/v1/queues/jobs/messages', `{"job":${i}}`, 'application/json');
  await expectCounts(a, 'jobs', { ready: 3, in_flight: 0, delayed: 0, dead: 0 });
  const fetched = await http('POST', '/v1/queues/jobs/fetch?max=2&visibility_ms=60000');
  assert.equal(fetched.messages.length, 2);
  await expectCounts(a, 'jobs', { ready: 1, in_flight: 2 });
  for (const job of fetched.messages) await http('POST', `/v1/queues/jobs/ack/${job.id}`);
  await expectCounts(a, 'jobs', { ready: 1, in_flight: 0 });

  // A lease that ends dead-letters the last job; the page's button redrives it.
  assert.equal((await http('POST', '/v1/queues/jobs/fetch?visibility_ms=1')).messages.length, 1);
  await expectCounts(a, 'jobs', { ready: 0, in_flight: 0, dead: 1 });
  a.once('dialog', (dialog) => dialog.accept());
  await a.getByRole('button', { name: 'Redrive DLQ jobs' }).click();
  await a.locator('#queues-result', { hasText: 'Moved 1 from jobs.dlq to jobs.' }).waitFor({ timeout: TIMEOUT });
  await expectCounts(a, 'jobs', { ready: 1, dead: 0 });
  assert.equal(await a.getByRole('button', { name: 'Purge DLQ jobs' }).isDisabled(), true, 'nothing to purge');

  // The header's counters, from /metrics: two pages, two WebSockets at least.
  await a.locator('[data-metric=connections]', { hasText: /^[1-9]/ }).waitFor({ timeout: TIMEOUT });
  await a.locator('[data-metric=published]', { hasText: /^\d/ }).waitFor({ timeout: TIMEOUT });

  if (process.env.HERALD_CONSOLE_SCREENSHOT) {
    // A few more messages so the picture shows a live stream.
    await publish('json', '{"user":"ann","text":"the console shows live messages"}', 5);
    await publish('json', '{"order":1042,"total":{"amount":"12.50","currency":"EUR"},"items":3}', 6);
    await live.nth(5).waitFor({ timeout: TIMEOUT });
    await listed.locator('td', { hasText: /^6$/ }).waitFor({ timeout: TIMEOUT });
    await a.screenshot({ path: join(here, '../../docs/console.png'), fullPage: true });
  }

  assert.deepEqual(errors, [], 'no console errors');
});

test('with [auth], the page asks for a token and works with it', async () => {
  const secret = 'a test secret of the console, 32 bytes or more';
  const config = join(profile, 'herald-auth.toml');
  writeFileSync(config, '[auth.jwt]\nalgorithm = "HS256"\nsecret = { env = "HERALD_CONSOLE_TEST_SECRET" }\n');
  const url = await startHerald(['--config', config], { HERALD_CONSOLE_TEST_SECRET: secret });
  const errors = [];
  // The page's first call finds out that credentials are needed (401), and so does
  // the bad token typed below.
  const page = await openConsole('auth', errors, { url, connected: false, expected: [/\/v1\/topics\?limit=1$/] });
  const dialog = page.getByRole('dialog', { name: 'Sign in' });
  await dialog.waitFor({ timeout: TIMEOUT });

  await dialog.getByLabel('Token').fill(jwt('not the secret, but just as long as it', 'ops', {}));
  await dialog.getByRole('button', { name: 'Sign in' }).click();
  await dialog.getByText('Those credentials were refused.').waitFor({ timeout: TIMEOUT });

  const all = ['>'];
  const token = jwt(secret, 'ops', { publish: all, subscribe: all, enqueue: all, consume: all, admin: all });
  await dialog.getByLabel('Token').fill(token);
  await dialog.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('#status', { hasText: 'Connected' }).waitFor({ timeout: TIMEOUT });
  assert.equal(await dialog.isVisible(), false);

  await page.getByLabel('Name').fill('secured');
  await page.getByRole('button', { name: 'Subscribe', exact: true }).click();
  await page.locator('#topic-info', { hasText: 'Subscribed to secured' }).waitFor({ timeout: TIMEOUT });
  await page.getByLabel('Payload').fill('{"behind":"auth"}');
  await page.getByRole('button', { name: 'Publish', exact: true }).click();
  await page.locator('#live li pre', { hasText: '"behind": "auth"' }).waitFor({ timeout: TIMEOUT });
  await page.locator('#topics-table tr[data-topic="secured"]').waitFor({ timeout: TIMEOUT });

  assert.deepEqual(errors, [], 'no console errors');
});
