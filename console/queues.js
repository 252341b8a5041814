// The queues panel: every queue's ready / in-flight / delayed / dead counts, refreshed
// every 2 s, with purge and the dead-letter queue's redrive and purge. The list comes
// from GET /v1/queues; on a server without it, the queues typed into the form are
// watched one by one (GET /v1/queues/{queue}).

import { el, fill, syncRows, describeError, isMissingRoute } from './util.js';

const REFRESH_MS = 2000;
/** The columns: the client's (camelCase) field and the column's name in the page. */
const COLUMNS = [
  ['ready', 'ready'],
  ['inFlight', 'in_flight'],
  ['delayed', 'delayed'],
  ['dead', 'dead'],
];

/** Wires the queues panel to the client `h`. */
export function startQueues(h) {
  const body = document.querySelector('#queues-table tbody');
  const note = document.getElementById('queues-note');
  const result = document.getElementById('queues-result');
  const form = document.getElementById('queues-add');
  const actions = document.getElementById('queue-actions');
  const watched = new Set();
  let listed = true; // whether GET /v1/queues exists; found out at the first refresh
  let busy = false;

  async function listQueues(prefix) {
    if (listed) {
      try {
        return await h.queues(prefix ? { prefix } : {});
      } catch (err) {
        if (!isMissingRoute(err)) throw err;
        listed = false;
      }
    }
    return [];
  }

  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const prefix = form.elements.prefix.value.trim();
      const stats = new Map();
      for (const q of await listQueues(prefix)) stats.set(q.queue, q);
      for (const name of watched) {
        if (stats.has(name) || (prefix && !name.startsWith(prefix))) continue;
        try {
          stats.set(name, await h.queueStats(name));
        } catch (err) {
          stats.set(name, { queue: name, error: describeError(err) });
        }
      }
      const names = [...stats.keys()].filter((n) => !n.endsWith('.dlq')).sort();
      syncRows(body, names.map((name) => stats.get(name)), (q) => q.queue, row, update);
      const how = listed ? '' : ' Type a queue name to watch it (this server does not list its queues).';
      fill(note, `${names.length ? `${names.length} queue${names.length === 1 ? '' : 's'}.` : 'No queues.'}${how}`);
    } catch (err) {
      fill(note, `Queues unavailable: ${describeError(err)}`);
    } finally {
      busy = false;
    }
  }

  /** A queue's row: its name, the four counts, the action buttons. */
  function row(q) {
    const buttons = actions.content.cloneNode(true);
    for (const button of buttons.querySelectorAll('button')) {
      button.setAttribute('aria-label', `${button.textContent} ${q.queue}`);
      button.addEventListener('click', () => act(button.dataset.action, q.queue));
    }
    return el(
      'tr',
      { 'data-queue': q.queue },
      el('th', { scope: 'row', text: q.queue }, el('span', { class: 'error' })),
      ...COLUMNS.map(([, column]) => el('td', { class: 'num', 'data-col': column })),
      el('td', {}, buttons),
    );
  }

  function update(tr, q) {
    fill(tr.querySelector('th .error'), q.error ? ` ${q.error}` : '');
    for (const [field, column] of COLUMNS) {
      tr.querySelector(`td[data-col="${column}"]`).textContent = q.error ? '–' : (q[field] ?? 0);
    }
    // Nothing to redrive or purge in an empty dead-letter queue.
    for (const button of tr.querySelectorAll('button[data-action$="dlq"], button[data-action="redrive"]')) {
      button.disabled = !q.error && !q.dead;
    }
  }

  async function act(action, queue) {
    const dlq = `${queue}.dlq`;
    const ask = {
      purge: `Remove the ready and delayed jobs of ${queue}? Jobs in flight stay.`,
      redrive: `Move the dead letters of ${dlq} back into ${queue}?`,
      'purge-dlq': `Remove the dead letters of ${dlq}?`,
    }[action];
    if (!window.confirm(ask)) return;
    try {
      let text;
      if (action === 'redrive') {
        const answer = await h.redrive(queue);
        text = `Moved ${answer?.moved ?? '?'} from ${dlq} to ${queue}.`;
      } else {
        const target = action === 'purge' ? queue : dlq;
        const answer = await h.purge(target);
        text = `Purged ${answer?.purged ?? '?'} from ${target}.`;
      }
      fill(result, text);
    } catch (err) {
      fill(result, el('span', { class: 'error', text: `${action} ${queue}: ${describeError(err)}` }));
    }
    refresh();
  }

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const name = form.elements.queue.value.trim();
    if (name) watched.add(name.replace(/\.dlq$/, ''));
    form.elements.queue.value = '';
    refresh();
  });
  form.elements.prefix.addEventListener('input', () => refresh());

  refresh();
  setInterval(() => {
    if (!document.hidden) refresh();
  }, REFRESH_MS);
  return { watch: (name) => (watched.add(name), refresh()) };
}
