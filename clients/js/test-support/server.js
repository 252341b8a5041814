// Test support: runs the real `herald` binary (HERALD_BIN, default
// ../../target/debug/herald from clients/js) on 127.0.0.1 with a temporary data dir, and
// small helpers to await conditions. Not a test file itself (it lives outside test/ so
// `node --test test/` does not run it).

import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { once } from 'node:events';

const packageDir = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** The binary under test. */
export const HERALD_BIN = process.env.HERALD_BIN ? resolve(process.env.HERALD_BIN) : resolve(packageDir, '../../target/debug/herald');

/** Generous limit for one awaited step on a loaded 2-core machine. */
export const STEP_MS = 30_000;

const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/** A fresh temporary directory, removed by `removeDir`. */
export function tempDir(prefix = 'herald-js-') {
  return mkdtempSync(join(tmpdir(), prefix));
}

export function removeDir(dir) {
  rmSync(dir, { recursive: true, force: true });
}

/**
 * Starts `herald serve` on 127.0.0.1:`port` (0: a free one) and resolves once it logs
 * the address it listens on. `store`: 'memory' (default) or 'disk' (with `dataDir`).
 */
export async function startServer({ port = 0, store = 'memory', dataDir, args = [], env = {} } = {}) {
  if (!existsSync(HERALD_BIN)) throw new Error(`no herald binary at ${HERALD_BIN} (set HERALD_BIN)`);
  const argv = ['serve', '--listen', `127.0.0.1:${port}`, '--store', store];
  if (dataDir) argv.push('--data-dir', dataDir);
  argv.push(...args);
  const child = spawn(HERALD_BIN, argv, {
    env: { ...process.env, HERALD_LOG: 'info', HERALD_LOG_FORMAT: 'text', NO_COLOR: '1', ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  running.add(child);
  const exited = once(child, 'exit').then(([code, signal]) => {
    running.delete(child);
    return { code, signal };
  });
  let log = '';
  const addr = await new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error(`herald did not start within ${STEP_MS} ms:\n${log}`)), STEP_MS);
    let found = false;
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      log = (log + chunk).slice(-20_000);
      if (found) return;
      // Colours off (NO_COLOR), but strip escapes anyway before reading `addr=`.
      const match = /addr=(\d+\.\d+\.\d+\.\d+:\d+)/.exec(log.replace(/\x1b\[[0-9;]*m/g, ''));
      if (match) {
        found = true;
        clearTimeout(timer);
        resolvePromise(match[1]);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      if (!found) reject(new Error(`herald exited (${code ?? signal}) before listening:\n${log}`));
    });
  });
  return {
    url: `http://${addr}`,
    port: Number(addr.split(':')[1]),
    pid: child.pid,
    exited,
    log: () => log,
    /** Sends `signal` and waits for the exit. */
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
    /** Freezes the process (SIGSTOP; resolves once it is stopped): its sockets stay
     *  open and silent. Linux only (reads /proc). */
    async pause() {
      child.kill('SIGSTOP');
      await eventually(() => /^\d+ \(.*\) T/.test(readFileSync(`/proc/${child.pid}/stat`, 'utf8')), 'the server stopped');
    },
    resume: () => child.kill('SIGCONT'),
  };
}

/** Starts a server on `port` again, retrying while the port is still taken. */
export async function restartServer(options) {
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    try {
      return await startServer(options);
    } catch (err) {
      if (Date.now() > deadline || !/in use|AddrInUse/i.test(String(err.message))) throw err;
      await sleep(100);
    }
  }
}

/** Runs the binary with `args` and `input` on stdin; its stdout. */
export function runHerald(args, input) {
  const out = spawnSync(HERALD_BIN, args, { input, encoding: 'utf8' });
  if (out.status !== 0) throw new Error(`herald ${args.join(' ')} failed: ${out.stderr}`);
  return out.stdout;
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Rejects if `promise` does not settle within `ms`, naming `what`. */
export async function within(promise, what, ms = STEP_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `check` until it returns a truthy value (which is returned), for conditions with no event. */
export async function eventually(check, what, ms = STEP_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for: ${what}`);
    await sleep(20);
  }
}

/** Resolves with the next `event` of `emitter` for which `accept(value)` holds. */
export function nextEvent(emitter, event, accept = () => true, what = event) {
  let off;
  const promise = new Promise((resolvePromise) => {
    off = emitter.on(event, (value) => {
      if (accept(value)) {
        off();
        resolvePromise(value);
      }
    });
  });
  return within(promise, what).finally(() => off());
}

/** Collects a subscription's messages; `until(n)` resolves once `n` have arrived. */
export function collect(sub) {
  const messages = [];
  const waiters = [];
  sub.on('message', (m) => {
    messages.push(m);
    for (const w of [...waiters]) {
      if (w.test()) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(messages);
      }
    }
  });
  const wait = (test, what) => {
    if (test()) return Promise.resolve(messages);
    return within(new Promise((resolvePromise) => waiters.push({ test, resolve: resolvePromise })), what);
  };
  return {
    messages,
    until: (n) => wait(() => messages.length >= n, `${n} messages on ${sub.topic} (have ${messages.length})`),
    untilOffset: (offset) =>
      wait(() => messages.some((m) => m.offset >= offset), `offset ${offset} on ${sub.topic}`),
  };
}
