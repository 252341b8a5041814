// The console's entry point: finds out whether the server wants credentials (asking for
// them if so), opens one Herald client (herald.js: a WebSocket for subscriptions and
// publishes, HTTP for the rest) and starts the panels. Credentials stay in this page's
// memory only; a reload asks again. A browser's WebSocket cannot carry a password (its
// `auth` frame takes a bearer token), so with a user and password the page works over
// HTTP only: lists, history, publishes and queues, but no live messages or presence.

import { Herald } from './herald.js';
import { startCounters } from './metrics.js';
import { startTopics } from './topics.js';
import { startQueues } from './queues.js';
import { describeError, fill } from './util.js';

const status = document.getElementById('status');

function setStatus(text, state) {
  fill(status, text);
  status.classList.toggle('ok', state === 'ok');
  status.classList.toggle('bad', state === 'bad');
}

/** The `Authorization` header value for `credentials` (none without them). */
function authorization(credentials) {
  if (credentials?.token) return `Bearer ${credentials.token}`;
  if (credentials?.user) {
    const bytes = new TextEncoder().encode(`${credentials.user}:${credentials.password ?? ''}`);
    return `Basic ${btoa(String.fromCharCode(...bytes))}`;
  }
  return null;
}

/** Whether the server answers a `/v1` call without credentials (auth off). */
async function authRequired() {
  // `omit`: the 401's Basic challenge must not make the browser ask for a password itself.
  const response = await fetch('/v1/topics?limit=1', { cache: 'no-store', credentials: 'omit' });
  return response.status === 401;
}

/** Shows the sign-in dialog until the credentials typed are accepted; resolves to them. */
function askCredentials(check) {
  const dialog = document.getElementById('signin');
  const form = document.getElementById('signin-form');
  const error = document.getElementById('signin-error');
  return new Promise((resolve) => {
    form.addEventListener('submit', async function onSubmit(e) {
      e.preventDefault();
      const token = form.elements.token.value.trim();
      const user = form.elements.user.value.trim();
      const credentials = token ? { token } : { user, password: form.elements.password.value };
      if (!token && !user) {
        fill(error, 'Give a token, or a user and password.');
        return;
      }
      fill(error, 'Checking…');
      const problem = await check(credentials);
      if (problem) {
        fill(error, problem);
        return;
      }
      form.removeEventListener('submit', onSubmit);
      form.reset();
      dialog.close();
      resolve(credentials);
    });
    dialog.showModal();
  });
}

/** Whether `credentials` open a `/v1` call: null if so, else why not. */
async function checkCredentials(credentials) {
  const response = await fetch('/v1/topics?limit=1', {
    cache: 'no-store',
    credentials: 'omit',
    headers: { Authorization: authorization(credentials) },
  });
  if (response.status === 401) return 'Those credentials were refused.';
  return null;
}

async function main() {
  startCounters(document.getElementById('counters'));
  let credentials = null;
  try {
    if (await authRequired()) {
      setStatus('Sign in to continue', 'bad');
      credentials = await askCredentials(checkCredentials);
      const signout = document.getElementById('signout');
      signout.hidden = false;
      signout.addEventListener('click', () => location.reload());
    }
  } catch (err) {
    setStatus(`Server unreachable: ${describeError(err)}`, 'bad');
    return;
  }

  const h = new Herald(location.origin, { ...(credentials ?? {}) });
  const who = credentials?.user ? ` as ${credentials.user}` : credentials ? ' with a token' : '';
  const live = !credentials?.user;
  if (live) {
    h.on('state', (state) => {
      if (state === 'open') setStatus(`Connected to ${location.host}${who}`, 'ok');
      else if (state === 'reconnecting') setStatus('Connection lost; reconnecting…', 'bad');
      else if (state === 'closed') setStatus('Disconnected', 'bad');
    });
    h.on('error', (err) => setStatus(`Connection: ${describeError(err)}`, 'bad'));
    setStatus('Connecting…');
    try {
      await h.connect();
    } catch (err) {
      setStatus(`Cannot connect: ${describeError(err)}`, 'bad');
      return;
    }
    setStatus(`Connected to ${location.host}${who}`, 'ok');
  } else {
    setStatus(`Connected to ${location.host}${who} over HTTP (live messages need a token)`, 'ok');
  }
  startTopics(h, live);
  startQueues(h);
}

main();
