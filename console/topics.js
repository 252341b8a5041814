// The topics side of the console: the topic list (filtered by prefix, refreshed every
// few seconds), and one open topic: its live messages over a WebSocket subscription,
// a publish form, the history paged over HTTP, and presence (members and live joins and
// leaves, when the server has presence; without it the panel says so).

import { el, fill, syncRows, describePayload, formatTime, describeError, isMissingRoute, fromHex, fromBase64 } from './util.js';

/** Live messages kept on the page; older ones are dropped from the top. */
const MAX_LIVE = 500;
const REFRESH_MS = 3000;

/** Wires the topics panels to the client `h`; `hasSocket`: whether it has a WebSocket (else
 * everything goes over HTTP, and subscribing is not offered). */
export function startTopics(h, hasSocket) {
  const listBody = document.querySelector('#topics-table tbody');
  const listNote = document.getElementById('topics-note');
  const filterForm = document.getElementById('topics-filter');
  const openForm = document.getElementById('topic-open');
  const info = document.getElementById('topic-info');
  const live = document.getElementById('live');
  const unsubscribeButton = document.getElementById('unsubscribe');
  const publishForm = document.getElementById('publish');
  const publishResult = document.getElementById('publish-result');
  const historyForm = document.getElementById('history');
  const historyBody = document.querySelector('#history-table tbody');
  const historyNote = document.getElementById('history-note');
  const prev = document.getElementById('history-prev');
  const next = document.getElementById('history-next');
  const presenceCounts = document.getElementById('presence-counts');
  const presenceMembers = document.getElementById('presence-members');
  const presenceEvents = document.getElementById('presence-events');

  let current = null; // { topic, sub }
  let showsPublishers = false;
  const historyPages = []; // the `from` of each page shown before this one
  let historyFrom = 0;
  let historyNext = null;

  // --- the topic list -------------------------------------------------------------

  async function refreshList() {
    const prefix = filterForm.elements.prefix.value.trim();
    let topics;
    try {
      topics = await h.topics(prefix ? { prefix } : {});
    } catch (err) {
      fill(listNote, `Topics unavailable: ${describeError(err)}`);
      return;
    }
    showsPublishers ||= topics.some((t) => typeof t.publishers === 'number');
    syncRows(listBody, topics, (t) => t.topic, topicRow, (row, t) => {
      if (current?.topic === t.topic) row.setAttribute('aria-current', 'true');
      else row.removeAttribute('aria-current');
      const [, last, subscribers, publishers] = row.cells;
      last.textContent = t.last ?? '';
      subscribers.textContent = t.subscribers ?? '';
      publishers.textContent = typeof t.publishers === 'number' ? t.publishers : '–';
    });
    const note = topics.length ? `${topics.length} topic${topics.length === 1 ? '' : 's'}` : 'No topics yet.';
    fill(listNote, showsPublishers ? note : `${note} (this server does not report publishers)`);
  }

  /** A row of the topic list; a click (or Enter on its link) opens the topic. */
  function topicRow(t) {
    const link = el('a', { href: `#${encodeURIComponent(t.topic)}`, text: t.topic, onclick: (e) => e.preventDefault() });
    return el(
      'tr',
      { 'data-topic': t.topic, onclick: () => openTopic(t.topic) },
      el('td', {}, link),
      el('td', { class: 'num' }),
      el('td', { class: 'num' }),
      el('td', { class: 'num' }),
    );
  }

  filterForm.addEventListener('submit', (e) => {
    e.preventDefault();
    refreshList();
  });

  // --- one open topic ------------------------------------------------------------

  async function openTopic(topic, from = 'latest') {
    if (current?.topic === topic) return;
    await closeTopic();
    if (!hasSocket) {
      openForm.elements.topic.value = topic;
      publishForm.elements.topic.value = topic;
      fill(info, 'Live messages need a bearer token (sign in with a token); the history is below.');
      historyPages.length = 0;
      loadHistory(topic, 0);
      return;
    }
    openForm.elements.topic.value = topic;
    openForm.elements.from.value = from;
    publishForm.elements.topic.value = topic;
    fill(live);
    fill(presenceMembers);
    fill(presenceEvents);
    fill(info, `Subscribing to ${topic}…`);
    let sub;
    try {
      sub = h.subscribe(topic, { from, presence: true });
    } catch (err) {
      fill(info, `Cannot subscribe: ${describeError(err)}`);
      return;
    }
    current = { topic, sub };
    unsubscribeButton.disabled = false;
    sub.on('subscribed', (reply) => {
      if (current?.sub !== sub) return;
      const epoch = reply?.epoch ? `, epoch ${reply.epoch}` : '';
      fill(info, `Subscribed to ${topic} from ${from}: next offset ${reply?.next ?? '?'}${epoch}.`);
      loadPresence(topic);
    });
    sub.on('message', (message) => {
      if (current?.sub === sub) showLive(message);
    });
    sub.on('join', (event) => presenceEvent(sub, 'joined', event));
    sub.on('leave', (event) => presenceEvent(sub, 'left', event));
    sub.on('presence_lost', (event) => {
      if (current?.sub !== sub) return;
      logPresence(`${event?.dropped ?? 'some'} presence events dropped; reloading the list`);
      loadPresence(topic);
    });
    sub.on('error', (err) => {
      if (current?.sub === sub) fill(info, `Subscription to ${topic}: ${describeError(err)}`);
    });
    historyPages.length = 0;
    loadHistory(topic, 0);
    refreshList();
  }

  async function closeTopic() {
    const was = current;
    current = null;
    unsubscribeButton.disabled = true;
    if (!was) return;
    try {
      await was.sub.unsubscribe();
    } catch {
      // Already gone with its connection; nothing to undo.
    }
    fill(info, `Unsubscribed from ${was.topic}.`);
    fill(presenceCounts, 'Subscribe to a topic to see who is on it.');
  }

  function showLive(message) {
    const { kind, text } = describePayload(message);
    const item = el(
      'li',
      { 'data-offset': message.offset },
      el('div', { class: 'meta' }, `#${message.offset} · ${formatTime(message.ts)} · `, el('span', { class: 'kind', text: kind })),
      el('pre', { text }),
    );
    const atBottom = live.scrollTop + live.clientHeight >= live.scrollHeight - 4;
    live.append(item);
    while (live.children.length > MAX_LIVE) live.firstElementChild.remove();
    if (atBottom) live.scrollTop = live.scrollHeight;
  }

  openForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const topic = openForm.elements.topic.value.trim();
    const from = openForm.elements.from.value;
    if (topic) {
      if (current?.topic === topic) closeTopic().then(() => openTopic(topic, from));
      else openTopic(topic, from);
    }
  });
  unsubscribeButton.addEventListener('click', () => closeTopic());
  document.getElementById('clear').addEventListener('click', () => fill(live));

  // --- publish ------------------------------------------------------------------

  publishForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const topic = publishForm.elements.topic.value.trim() || current?.topic;
    const format = publishForm.elements.format.value;
    const payload = publishForm.elements.payload.value;
    if (!topic) {
      fill(publishResult, 'Name a topic first.');
      return;
    }
    fill(publishResult, 'Publishing…');
    try {
      let reply;
      if (format === 'json') {
        let value;
        try {
          value = JSON.parse(payload);
        } catch (err) {
          throw new Error(`not JSON: ${err.message}`);
        }
        reply = hasSocket ? await h.publish(topic, value) : await h.publishHttp(topic, value);
      } else if (format === 'text') {
        // Over HTTP: a JSON frame's string would be a JSON message, not a text one.
        reply = await h.publishHttp(topic, payload, { text: true });
      } else {
        const bytes = format === 'hex' ? fromHex(payload) : fromBase64(payload);
        reply = hasSocket ? await h.publish(topic, bytes) : await h.publishHttp(topic, bytes);
      }
      fill(publishResult, reply?.offset ? `Published at offset ${reply.offset}.` : 'Published.');
    } catch (err) {
      fill(publishResult, el('span', { class: 'error', text: describeError(err) }));
    }
  });

  // --- history ------------------------------------------------------------------

  async function loadHistory(topic, from) {
    const limit = Math.min(1000, Math.max(1, Number(historyForm.elements.limit.value) || 20));
    historyForm.elements.from.value = from;
    let page;
    try {
      page = await h.history(topic, { from, limit });
    } catch (err) {
      fill(historyNote, `History unavailable: ${describeError(err)}`);
      return;
    }
    const messages = page?.messages ?? [];
    historyFrom = from;
    historyNext = page?.next ?? null;
    fill(
      historyBody,
      ...messages.map((m) => {
        const { kind, text } = describePayload(m);
        return el(
          'tr',
          {},
          el('td', { class: 'num', text: m.offset }),
          el('td', { text: formatTime(m.ts) }),
          el('td', { text: kind }),
          el('td', {}, el('pre', { text })),
        );
      }),
    );
    prev.disabled = historyPages.length === 0;
    next.disabled = messages.length < limit || historyNext === null;
    const range = messages.length ? `offsets ${messages[0].offset}–${messages[messages.length - 1].offset}` : 'no messages';
    fill(historyNote, `${topic}: ${range} from ${from}${page?.epoch ? ` (epoch ${page.epoch})` : ''}.`);
  }

  function historyTopic() {
    return current?.topic || openForm.elements.topic.value.trim();
  }

  historyForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const topic = historyTopic();
    if (!topic) return;
    historyPages.length = 0;
    loadHistory(topic, Math.max(0, Number(historyForm.elements.from.value) || 0));
  });
  next.addEventListener('click', () => {
    const topic = historyTopic();
    if (!topic || historyNext === null) return;
    historyPages.push(historyFrom);
    loadHistory(topic, historyNext);
  });
  prev.addEventListener('click', () => {
    const topic = historyTopic();
    if (!topic || historyPages.length === 0) return;
    loadHistory(topic, historyPages.pop());
  });

  // --- presence -----------------------------------------------------------------

  function memberLabel(member) {
    if (!member) return '?';
    const who = member.user ? ` ${member.user}` : '';
    const info = member.info !== null && member.info !== undefined ? ` ${JSON.stringify(member.info)}` : '';
    return `#${member.conn} ${member.door ?? ''} ${member.role ?? ''}${who}${info}`.replace(/\s+/g, ' ').trim();
  }

  // The counts shown: from the last list, kept current by join and leave events.
  let presenceCount = null;

  function showPresenceCounts() {
    if (!presenceCount) return;
    const count = (n, what) => `${n ?? 0} ${what}${n === 1 ? '' : 's'}`;
    const { subscribers, publishers, more } = presenceCount;
    fill(presenceCounts, `${count(subscribers, 'subscriber')}, ${count(publishers, 'publisher')}${more}`);
  }

  async function loadPresence(topic) {
    let answer;
    try {
      answer = await h.presence(topic);
    } catch (err) {
      if (current?.topic !== topic) return;
      const absent = isMissingRoute(err) || err?.code === 'bad_request';
      fill(presenceCounts, absent ? 'This server does not report presence.' : `Presence unavailable: ${describeError(err)}`);
      return;
    }
    if (current?.topic !== topic) return;
    const members = answer?.members ?? [];
    const more = answer?.more || answer?.next ? ' (first 1000 shown)' : '';
    presenceCount = { subscribers: answer?.subscribers ?? 0, publishers: answer?.publishers ?? 0, more };
    showPresenceCounts();
    fill(presenceMembers, ...members.map((m) => el('li', { 'data-conn': m.conn, text: memberLabel(m) })));
  }

  function presenceEvent(sub, verb, event) {
    if (current?.sub !== sub) return;
    const member = event?.member ?? event;
    logPresence(`${formatTime(Date.now())} ${memberLabel(member)} ${verb}`);
    if (presenceCount) {
      const role = member?.role === 'publisher' ? 'publishers' : 'subscribers';
      presenceCount[role] = Math.max(0, presenceCount[role] + (verb === 'joined' ? 1 : -1));
      showPresenceCounts();
    }
    if (verb === 'joined') {
      presenceMembers.append(el('li', { 'data-conn': member?.conn, text: memberLabel(member) }));
    } else {
      const label = memberLabel(member);
      const gone = [...presenceMembers.children].find((li) => li.textContent === label);
      gone?.remove();
    }
  }

  function logPresence(text) {
    presenceEvents.prepend(el('li', { text }));
    while (presenceEvents.children.length > 100) presenceEvents.lastElementChild.remove();
  }

  // --- start --------------------------------------------------------------------

  refreshList();
  setInterval(() => {
    if (!document.hidden) refreshList();
  }, REFRESH_MS);
  const fromHash = decodeURIComponent(location.hash.slice(1));
  if (fromHash) openTopic(fromHash);
  return { openTopic };
}
