// Herald client for JavaScript: one ES module, no build step, the same file in browsers
// and in Node >= 20.
//
// Layout: HeraldError (every failure, with the server's code word) · Emitter (a tiny
// event emitter) · Subscription (one topic's stream: resume point, duplicate guard,
// presence events) · Herald (one `/v1/ws` connection with reconnect and resume, and the
// HTTP topic and queue calls through fetch). It imports nothing at load time; in Node
// without a global WebSocket it loads the `ws` package the first time it connects.

// Defaults of the options of the same names (herald.d.ts documents them).
const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;
const DEFAULT_HEARTBEAT_MS = 30_000;
const DEFAULT_CONNECT_TIMEOUT_MS = 15_000;
const DEFAULT_RECONNECT = { minDelayMs: 100, maxDelayMs: 10_000 };

/**
 * Every failure of this client. `code` is the server's code word (`bad_request`,
 * `invalid_name`, `too_large`, `unauthorized`, `forbidden`, `rate_limited`,
 * `unavailable`, `not_found`, ...) or one of the client's own: `disconnected` (the
 * connection failed or dropped before an answer: the outcome is unknown), `timeout` (no
 * answer in time: the outcome is unknown), `closed` (the client was closed).
 */
export class HeraldError extends Error {
  constructor(code, message, { status, retryAfterMs, cause } = {}) {
    super(message || code, cause === undefined ? undefined : { cause });
    this.name = 'HeraldError';
    this.code = code;
    if (status !== undefined) this.status = status;
    if (retryAfterMs !== undefined) this.retryAfterMs = retryAfterMs;
  }
}

/** Listeners by event name. A listener that throws is reported asynchronously, so one
 *  bad handler never breaks the delivery loop. */
export class Emitter {
  #listeners = new Map();

  /** Adds `fn` for `event`; returns a function that removes it. */
  on(event, fn) {
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.#listeners.get(event)?.delete(fn);
  }

  /** With `fn`, calls it on the next `event` only. Without, a promise of the next one. */
  once(event, fn) {
    if (fn) {
      const off = this.on(event, (...args) => {
        off();
        fn(...args);
      });
      return off;
    }
    return new Promise((resolve) => this.once(event, resolve));
  }

  emit(event, ...args) {
    const set = this.#listeners.get(event);
    if (!set) return false;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (err) {
        queueMicrotask(() => {
          throw err;
        });
      }
    }
    return set.size > 0;
  }
}

/**
 * One topic followed over the connection. It keeps its resume point (the last offset
 * delivered and the epoch it belongs to), so after a reconnect it asks for exactly what
 * follows; a message at or below that point is a duplicate and is dropped.
 *
 * Events: `message`, `subscribed`, `join`, `leave`, `presence_lost`, `reset`, `error`.
 */
export class Subscription extends Emitter {
  /** The last offset delivered (or the one before the resume point), `null` before any. */
  lastOffset = null;
  /** The epoch of the topic's history the offsets belong to, `null` until known. */
  epoch = null;
  /** False once unsubscribed, or failed for good. */
  active = true;

  #herald;
  #options;
  #settle;
  // Whether this subscription's `subscribed` reply came on the current connection:
  // frames for the topic before it (an earlier subscription's) are not ours.
  #live = false;
  // Whether its subscribe frame went out on the current connection (answered or not).
  #sent = false;
  #seenSinceSubscribed = false;

  constructor(herald, topic, options) {
    super();
    this.#herald = herald;
    this.topic = topic;
    this.#options = options;
    this.ready = new Promise((resolve, reject) => {
      this.#settle = { resolve, reject };
    });
    // An app that never awaits `ready` must not get an unhandled rejection.
    this.ready.catch(() => {});
  }

  /** Stops the stream; resolves once the server confirmed (or at once when offline). */
  async unsubscribe() {
    if (!this.active) return;
    this.#end(new HeraldError('closed', 'unsubscribed'));
    const sent = this.#sent;
    this.#live = this.#sent = false;
    this.#herald._forget(this);
    if (!sent) return; // the server has no subscription to end
    try {
      await this.#herald._request({ op: 'unsubscribe', topic: this.topic }, { queue: false });
    } catch (err) {
      // Gone with the connection, or the server dropped it already: unsubscribed either way.
      if (!['disconnected', 'closed', 'not_subscribed'].includes(err.code)) throw err;
    }
  }

  /** The subscribe frame that resumes this stream, about to be sent. @internal */
  _frame() {
    this.#sent = true;
    const frame = { op: 'subscribe', topic: this.topic };
    if (this.lastOffset !== null) {
      frame.from = this.lastOffset + 1;
      if (this.epoch !== null) frame.epoch = this.epoch;
    } else {
      frame.from = this.#options.from ?? 'latest';
      if (this.#options.epoch !== undefined) frame.epoch = this.#options.epoch;
    }
    if (this.#options.presence) frame.presence = true;
    if (this.#options.info !== undefined) frame.info = this.#options.info;
    return frame;
  }

  /** The server's `subscribed` reply to `frame`. @internal */
  _subscribed(frame, reply) {
    const resumed = this.#settle === null;
    if (!reply.recovered) {
      // Nothing is replayed; live messages follow from `next`.
      this.lastOffset = reply.next - 1;
    } else if (this.lastOffset === null) {
      if (frame.from === 'latest') this.lastOffset = reply.next - 1;
      else if (typeof frame.from === 'number' && frame.from >= 1) this.lastOffset = frame.from - 1;
    }
    this.epoch = reply.epoch;
    this.#live = true;
    this.#seenSinceSubscribed = false;
    const event = { topic: this.topic, epoch: reply.epoch, next: reply.next, recovered: reply.recovered, resumed };
    if (this.#settle) {
      this.#settle.resolve(event);
      this.#settle = null;
    }
    this.emit('subscribed', event);
  }

  /** A `message` frame of this topic. @internal */
  _message(frame) {
    if (!this.#live) return;
    const offset = frame.offset;
    if (this.lastOffset !== null && offset <= this.lastOffset) {
      // Offsets go back to 1 on a live stream only when the topic was deleted (a new
      // history); anything else at or below the resume point is a duplicate.
      if (offset !== 1 || !(this.#seenSinceSubscribed || this.lastOffset > 1)) return;
      this.epoch = null;
      this.emit('reset', { topic: this.topic });
    }
    this.lastOffset = offset;
    this.#seenSinceSubscribed = true;
    this.emit('message', toMessage(frame, this.topic));
  }

  /** A presence frame (`join`, `leave`, `presence_lost`) of this topic. @internal */
  _presence(frame) {
    if (!this.#live) return;
    const { type, ...event } = frame;
    this.emit(type, event);
  }

  /** The connection dropped: frames for the topic are not ours until the next reply. @internal */
  _offline() {
    this.#live = this.#sent = false;
  }

  /** The server refused this subscription for good. @internal */
  _failed(err) {
    this.#live = this.#sent = false;
    this.#end(err);
    this.emit('error', err);
  }

  #end(err) {
    this.active = false;
    if (this.#settle) {
      this.#settle.reject(err);
      this.#settle = null;
    }
  }
}

/**
 * A Herald client: one WebSocket connection (`/v1/ws`, packed frames by default) for
 * publish, subscribe and presence, reconnected with exponential backoff and jitter, plus
 * the HTTP API (topics, history, queues) through `fetch`.
 *
 * Events: `state` ('connecting' | 'open' | 'reconnecting' | 'closed'), `close`
 * ({code, reason} of each socket that ended), `error` (a HeraldError not tied to a call).
 */
export class Herald extends Emitter {
  #baseUrl;
  #wsUrl;
  #options;
  #reconnect;
  #state = 'closed';
  #socket = null;
  #session = 0; // bumped per socket: events of an older socket are ignored
  #attempt = 0;
  #everOpened = false;
  #retryTimer = null;
  #heartbeat = null;
  #lastFrameAt = 0;
  #nextId = 1;
  #pending = new Map(); // id -> request sent on the current socket
  #outbox = []; // requests made while not open; sent (for the first time) on open
  #waiters = []; // connect() promises
  #subs = new Map(); // topic -> Subscription

  /**
   * @param {string} url the server's base URL, `http(s)://host:port` (or `ws(s)://`)
   * @param {object} [options] see herald.d.ts (HeraldOptions)
   */
  constructor(url, options = {}) {
    super();
    const base = new URL(url);
    if (base.protocol === 'ws:') base.protocol = 'http:';
    if (base.protocol === 'wss:') base.protocol = 'https:';
    this.#baseUrl = base.origin + base.pathname.replace(/\/+$/, '');
    const ws = new URL(this.#baseUrl + '/v1/ws');
    ws.protocol = base.protocol === 'https:' ? 'wss:' : 'ws:';
    if (options.pack !== false) ws.search = '?pack=lines';
    this.#wsUrl = ws.toString();
    this.#options = options;
    this.#reconnect = options.reconnect === false ? null : { ...DEFAULT_RECONNECT, ...options.reconnect };
  }

  /** The server's base URL. */
  get url() {
    return this.#baseUrl;
  }

  /** 'connecting' | 'open' | 'reconnecting' | 'closed'. */
  get state() {
    return this.#state;
  }

  /** The subscriptions by topic. */
  get subscriptions() {
    return new Map(this.#subs);
  }

  // ---------------------------------------------------------------- WebSocket calls

  /**
   * Opens the connection (if it is not open or opening) and resolves once it is open and,
   * with a token sent in an `auth` frame, authenticated. Failed attempts are retried with
   * backoff; it rejects only when the server refuses the credentials or `close()` is called.
   */
  connect() {
    if (this.#state === 'open') return Promise.resolve();
    const opened = new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
    if (this.#state === 'closed') this.#dial();
    return opened;
  }

  /** Closes the connection for good: pending calls reject with `closed`, subscriptions end. */
  close() {
    this.#session++;
    clearTimeout(this.#retryTimer);
    this.#stopHeartbeat();
    const socket = this.#socket;
    this.#socket = null;
    if (socket) detach(socket, 1000);
    const err = new HeraldError('closed', 'the client was closed');
    this.#failRequests(err);
    for (const sub of this.#subs.values()) sub._failed(err);
    this.#subs.clear();
    this.#everOpened = false;
    this.#setState('closed');
  }

  /**
   * Publishes `data` (any JSON value; a Uint8Array or ArrayBuffer as binary) over the
   * WebSocket; resolves with `{topic, offset, ts}` once stored. Never resent by the
   * client: `disconnected` or `timeout` mean the outcome is unknown.
   */
  async publish(topic, data, options = {}) {
    const frame = { op: 'publish', topic };
    const bytes = asBytes(data, options.binary);
    if (bytes) frame.data_b64 = toBase64(bytes);
    else frame.data = data === undefined ? null : data;
    if (options.ttlMs !== undefined) frame.ttl_ms = options.ttlMs;
    const reply = await this._request(frame, { timeoutMs: options.timeoutMs });
    return { topic: reply.topic, offset: reply.offset, ts: reply.ts };
  }

  /**
   * Follows `topic` from `options.from` ('latest' (default), 'earliest' or an offset,
   * with `options.epoch` to check it). With `presence: true` it also gets `join`, `leave`
   * and `presence_lost` events; `info` is shown in its member entry.
   */
  subscribe(topic, options = {}) {
    if (this.#subs.has(topic)) {
      throw new HeraldError('already_subscribed', `already subscribed to ${topic} on this client`);
    }
    const sub = new Subscription(this, topic, options);
    this.#subs.set(topic, sub);
    if (this.#state === 'open') this.#sendSubscribe(sub);
    else if (this.#state === 'closed') this.connect().catch(() => {});
    return sub;
  }

  /** Who is on `topic` on this node: `{topic, subscribers, publishers, members, more}`. */
  async presence(topic, options = {}) {
    const { type, id, ...reply } = await this._request({ op: 'presence', topic }, options);
    return reply;
  }

  /** A round trip over the WebSocket. */
  async ping(options = {}) {
    await this._request({ op: 'ping' }, options);
  }

  /**
   * Replaces the bearer token: used for every later request and connection, and sent at
   * once in an `auth` frame when the open socket authenticated with one.
   */
  async setToken(token) {
    this.#options = { ...this.#options, token };
    if (this.#state === 'open' && this.#socketAuth?.frame) {
      await this._request({ op: 'auth', token: await this.#token() }, { queue: false });
    }
  }

  // ---------------------------------------------------------------- HTTP: topics

  /** Publishes over HTTP: bytes as binary, a string with `{text: true}` as text, else JSON. */
  async publishHttp(topic, data, options = {}) {
    const body = encodeBody(data, options);
    const r = await this.#http('POST', `/v1/topics/${enc(topic)}/messages`, {
      ...body,
      query: { ttl_ms: options.ttlMs },
      timeoutMs: options.timeoutMs,
    });
    return { topic: r.topic, offset: r.offset, ts: r.ts };
  }

  /** The retained messages from `from` (default 0: the earliest), at most `limit`. */
  async history(topic, options = {}) {
    const r = await this.#http('GET', `/v1/topics/${enc(topic)}/messages`, {
      query: { from: options.from, limit: options.limit },
      timeoutMs: options.timeoutMs,
    });
    return { topic: r.topic, epoch: r.epoch, next: r.next, messages: r.messages.map((m) => toMessage(m, r.topic)) };
  }

  /** `{topic, epoch, first, last, retained, subscribers, publishers}`. */
  topic(name, options = {}) {
    return this.#http('GET', `/v1/topics/${enc(name)}`, options);
  }

  /** Topics by name, `[{topic, last, subscribers, ...}]`. */
  async topics(options = {}) {
    const r = await this.#http('GET', '/v1/topics', {
      query: { prefix: options.prefix, after: options.after, limit: options.limit },
      timeoutMs: options.timeoutMs,
    });
    return r.topics;
  }

  /** Deletes a topic's history (its epoch changes). */
  async deleteTopic(name, options = {}) {
    await this.#http('DELETE', `/v1/topics/${enc(name)}`, options);
  }

  /** The members over HTTP, paged: `{topic, subscribers, publishers, members, next}`. */
  presenceList(topic, options = {}) {
    return this.#http('GET', `/v1/topics/${enc(topic)}/presence`, {
      query: { after: options.after, limit: options.limit },
      timeoutMs: options.timeoutMs,
    });
  }

  // ---------------------------------------------------------------- HTTP: queues

  /** Enqueues a job (bytes: binary, `{text: true}`: text, else JSON): `{queue, messageId}`. */
  async enqueue(queue, data, options = {}) {
    const body = encodeBody(data, options);
    const r = await this.#http('POST', `/v1/queues/${enc(queue)}/messages`, {
      ...body,
      query: { delay_ms: options.delayMs, ttl_ms: options.ttlMs },
      timeoutMs: options.timeoutMs,
    });
    return { queue: r.queue, messageId: r.message_id };
  }

  /** Leases up to `max` jobs: `[{queue, id, messageId, attempt, ts, data | bytes}]`. */
  async fetchJobs(queue, options = {}) {
    return (await this.#fetch(queue, [], options)).jobs;
  }

  /**
   * Acks `done` (jobs of `queue` this worker finished, or their delivery ids) and leases
   * up to `max` more, in one request: `{jobs, acked, ackErrors}`, `ackErrors` naming by
   * `index` in `done` those not acked (`code` `not_found`: the lease had ended). A
   * worker taking one job at a time makes one request per job this way.
   */
  async ackAndFetch(queue, done, options = {}) {
    return this.#fetch(queue, done.map(jobId), options);
  }

  async #fetch(queue, ack, options) {
    const waitMs = options.waitMs ?? 0;
    const r = await this.#http('POST', `/v1/queues/${enc(queue)}/fetch`, {
      query: { max: options.max, wait_ms: options.waitMs, visibility_ms: options.visibilityMs },
      timeoutMs: options.timeoutMs ?? this.#requestTimeout() + waitMs,
      ...(ack.length > 0 ? { body: JSON.stringify({ ack }), contentType: 'application/json' } : {}),
    });
    const jobs = r.messages.map((m) => {
      const job = { queue, id: m.id, messageId: m.message_id, attempt: m.attempt, ts: m.ts };
      if (m.data_b64 !== undefined) job.bytes = fromBase64(m.data_b64);
      else job.data = m.data;
      return job;
    });
    return { jobs, acked: r.acked ?? 0, ackErrors: r.ack_errors ?? [] };
  }

  /** Acks a delivery (its id, or the job fetchJobs returned). */
  async ack(queue, id, options = {}) {
    await this.#http('POST', `/v1/queues/${enc(queue)}/ack/${enc(jobId(id))}`, options);
  }

  /** Gives a delivery back, ready again after `delayMs`. */
  async requeue(queue, id, options = {}) {
    await this.#http('POST', `/v1/queues/${enc(queue)}/requeue/${enc(jobId(id))}`, {
      query: { delay_ms: options.delayMs },
      timeoutMs: options.timeoutMs,
    });
  }

  /** The lease of a delivery now ends `visibilityMs` from now. */
  async extend(queue, id, visibilityMs, options = {}) {
    await this.#http('POST', `/v1/queues/${enc(queue)}/extend/${enc(jobId(id))}`, {
      query: { visibility_ms: visibilityMs },
      timeoutMs: options.timeoutMs,
    });
  }

  /** `{queue, ready, inFlight, delayed, dead}`. */
  async queueStats(queue, options = {}) {
    return camelKeys(await this.#http('GET', `/v1/queues/${enc(queue)}`, options));
  }

  /** Queues by name with their counts (`GET /v1/queues`), `[{queue, ready, inFlight, delayed, dead}]`. */
  async queues(options = {}) {
    const r = await this.#http('GET', '/v1/queues', {
      query: { prefix: options.prefix, after: options.after, limit: options.limit },
      timeoutMs: options.timeoutMs,
    });
    const list = Array.isArray(r) ? r : r.queues;
    return list.map((q) => (q && typeof q === 'object' ? camelKeys(q) : q));
  }

  /** Removes the ready and delayed jobs (admin): `{queue, purged}`. */
  purge(queue, options = {}) {
    return this.#http('POST', `/v1/queues/${enc(queue)}/purge`, options);
  }

  /** Moves up to `max` dead letters back from `{queue}.dlq` (admin): `{queue, moved}`. */
  redrive(queue, options = {}) {
    return this.#http('POST', `/v1/queues/${enc(queue)}/redrive`, {
      query: { max: options.max },
      timeoutMs: options.timeoutMs,
    });
  }

  // ---------------------------------------------------------------- HTTP internals

  /**
   * One HTTP call: resolves with the JSON answer (undefined for 204), rejects with a
   * HeraldError carrying the answer's code and status, `disconnected` when the server
   * could not be reached, `timeout` after `timeoutMs`.
   */
  async #http(method, path, { query, body, contentType, timeoutMs } = {}) {
    const url = new URL(this.#baseUrl + path);
    for (const [key, value] of Object.entries(query ?? {})) {
      if (value !== undefined && value !== null) url.searchParams.set(key, String(value));
    }
    const headers = {};
    const authorization = await this.#authorization();
    if (authorization) headers.Authorization = authorization;
    if (contentType) headers['Content-Type'] = contentType;
    const limit = timeoutMs ?? this.#requestTimeout();
    const controller = new AbortController();
    const timer = limit > 0 ? setTimeout(() => controller.abort(), limit) : null;
    const fetchFn = this.#options.fetch ?? globalThis.fetch;
    try {
      let response;
      try {
        response = await fetchFn(url, { method, headers, body, signal: controller.signal });
      } catch (cause) {
        if (controller.signal.aborted) throw new HeraldError('timeout', `${method} ${path}: no answer within ${limit} ms`);
        throw new HeraldError('disconnected', `${method} ${path}: ${cause?.cause?.code ?? cause?.message ?? cause}`, { cause });
      }
      const text = await response.text();
      if (!response.ok) throw httpError(method, path, response, text);
      return text ? JSON.parse(text) : undefined;
    } catch (err) {
      if (err instanceof HeraldError) throw err;
      if (controller.signal.aborted) throw new HeraldError('timeout', `${method} ${path}: no answer within ${limit} ms`);
      throw new HeraldError('disconnected', `${method} ${path}: ${err?.message ?? err}`, { cause: err });
    } finally {
      clearTimeout(timer);
    }
  }

  // ---------------------------------------------------------------- connection internals

  #socketAuth = null; // {frame: boolean} of the current socket

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.emit('state', state);
  }

  #requestTimeout() {
    return this.#options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
  }

  async #token() {
    const token = this.#options.token;
    return typeof token === 'function' ? await token() : token;
  }

  async #authorization() {
    const { user, password } = this.#options;
    if (user !== undefined && user !== null) return 'Basic ' + toBase64(utf8(`${user}:${password ?? ''}`));
    const token = await this.#token();
    return token ? `Bearer ${token}` : null;
  }

  /** The WebSocket constructor, and whether it takes `{headers}` (as `ws` does). */
  async #webSocketClass() {
    const { WebSocket: given, wsHeaders, user } = this.#options;
    if (given) return { Ctor: given, headers: wsHeaders === true };
    // A header is the only way to send Basic credentials: Node prefers `ws` for them.
    const basic = user !== undefined && user !== null;
    const node = typeof globalThis.process?.versions?.node === 'string';
    if (globalThis.WebSocket && !(basic && node)) return { Ctor: globalThis.WebSocket, headers: false };
    try {
      const ws = await import(/* webpackIgnore: true */ /* @vite-ignore */ 'ws');
      return { Ctor: ws.WebSocket ?? ws.default, headers: true };
    } catch (cause) {
      if (globalThis.WebSocket) return { Ctor: globalThis.WebSocket, headers: false };
      throw new HeraldError('unavailable', 'no WebSocket: install the `ws` package (npm install ws)', { cause });
    }
  }

  async #dial() {
    const session = ++this.#session;
    clearTimeout(this.#retryTimer);
    this.#setState(this.#everOpened ? 'reconnecting' : 'connecting');
    let socket;
    let auth;
    try {
      const { Ctor, headers } = await this.#webSocketClass();
      const authorization = await this.#authorization();
      if (session !== this.#session) return;
      if (authorization && !headers && authorization.startsWith('Basic ')) {
        throw new HeraldError(
          'unauthorized',
          'this WebSocket cannot send headers, and an auth frame carries only a bearer token: use `token`',
        );
      }
      auth = { frame: Boolean(authorization) && !headers };
      socket = headers && authorization ? new Ctor(this.#wsUrl, { headers: { Authorization: authorization } }) : new Ctor(this.#wsUrl);
    } catch (err) {
      if (session !== this.#session) return;
      if (err instanceof HeraldError) return this.#fatal(err);
      this.emit('close', { code: 1006, reason: String(err?.message ?? err) });
      return this.#retry();
    }
    this.#socket = socket;
    this.#socketAuth = auth;
    socket.binaryType = 'arraybuffer';
    // An upgrade nobody answers (a frozen or black-holed server) is given up and retried.
    const connectLimit = this.#options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const connectTimer =
      connectLimit > 0
        ? setTimeout(() => {
            if (session === this.#session) this.#drop(`not open within ${connectLimit} ms`);
          }, connectLimit)
        : null;
    let refused = null; // an HTTP status the upgrade was refused with, when `ws` says
    socket.onerror = (event) => {
      const status = /server response: (\d{3})/.exec(String(event?.message ?? event?.error?.message ?? ''));
      if (status) refused = Number(status[1]);
    };
    socket.onopen = () => {
      clearTimeout(connectTimer);
      if (session !== this.#session) return;
      if (auth.frame) this.#authenticate(session);
      else this.#opened();
    };
    socket.onmessage = (event) => {
      if (session !== this.#session) return;
      this.#lastFrameAt = Date.now();
      if (typeof event.data !== 'string') return; // /v1/ws sends text frames only
      let frames;
      try {
        const parts = this.#options.pack === false ? [event.data] : event.data.split('\n');
        frames = parts.map((part) => JSON.parse(part));
      } catch {
        // Packed frames carry no raw line breaks; parse whole what is not packed after all.
        try {
          frames = [JSON.parse(event.data)];
        } catch {
          this.emit('error', new HeraldError('bad_request', `unreadable frame from the server: ${event.data.slice(0, 100)}`));
          return;
        }
      }
      for (const frame of frames) this.#dispatch(frame);
    };
    socket.onclose = (event) => {
      clearTimeout(connectTimer);
      if (session !== this.#session) return;
      this.#dropped(event.code, event.reason ?? '', refused);
    };
  }

  async #authenticate(session) {
    try {
      const token = await this.#token();
      if (session !== this.#session) return;
      await this._request({ op: 'auth', token }, { queue: false, force: true });
      if (session === this.#session) this.#opened();
    } catch (err) {
      if (session !== this.#session) return;
      // A refused token closes the socket with 4401: #dropped decides then.
      if (err.code === 'timeout') this.#drop('no answer to the auth frame');
    }
  }

  #opened() {
    this.#attempt = 0;
    this.#everOpened = true;
    this.#lastFrameAt = Date.now();
    this.#setState('open');
    for (const waiter of this.#waiters.splice(0)) waiter.resolve();
    for (const sub of this.#subs.values()) this.#sendSubscribe(sub);
    for (const request of this.#outbox.splice(0)) this.#send(request);
    this.#startHeartbeat();
  }

  /** The socket ended (`code`, `reason`; `refused`: the upgrade's HTTP status, if known). */
  #dropped(code, reason, refused) {
    this.#session++;
    this.#socket = null;
    this.#stopHeartbeat();
    this.emit('close', { code, reason });
    const lost = new HeraldError('disconnected', `connection closed (${code}${reason ? ' ' + reason : ''})`);
    for (const request of [...this.#pending.values()]) this.#settle(request, lost);
    for (const sub of this.#subs.values()) sub._offline();
    // Refused credentials end the client, unless a token function can supply a fresh one.
    const renewable = typeof this.#options.token === 'function';
    if (refused === 401 || (code === 4401 && !renewable)) {
      return this.#fatal(new HeraldError('unauthorized', reason || 'credentials refused', { status: refused ?? undefined }));
    }
    if (refused === 403) return this.#fatal(new HeraldError('forbidden', 'WebSocket upgrade refused', { status: 403 }));
    this.#retry();
  }

  #retry() {
    if (!this.#reconnect) {
      this.#failRequests(new HeraldError('disconnected', 'the connection dropped and reconnect is off'));
      return this.#setState('closed');
    }
    const { minDelayMs, maxDelayMs } = this.#reconnect;
    const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(this.#attempt, 30));
    const delay = ceiling / 2 + (Math.random() * ceiling) / 2; // "equal jitter"
    this.#attempt++;
    this.#setState(this.#everOpened ? 'reconnecting' : 'connecting');
    const session = this.#session;
    this.#retryTimer = setTimeout(() => {
      if (session === this.#session) this.#dial();
    }, delay);
  }

  #fatal(err) {
    this.#session++;
    clearTimeout(this.#retryTimer);
    this.#failRequests(err);
    this.#setState('closed');
    this.emit('error', err);
  }

  /** Drops the current socket as if it had closed (a dead peer never sends a close). */
  #drop(reason) {
    const socket = this.#socket;
    if (!socket) return;
    const onclose = socket.onclose;
    detach(socket, 4000, reason);
    onclose?.({ code: 1006, reason }); // as if it had closed: clears its timer, then #dropped
  }

  #failRequests(err) {
    for (const request of [...this.#pending.values()]) this.#settle(request, err);
    for (const request of this.#outbox.splice(0)) this.#settle(request, err);
    for (const waiter of this.#waiters.splice(0)) waiter.reject(err);
  }

  #startHeartbeat() {
    const every = this.#options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
    if (!every) return;
    this.#heartbeat = setInterval(() => {
      if (Date.now() - this.#lastFrameAt < every) return;
      this._request({ op: 'ping' }, { timeoutMs: every, queue: false }).catch((err) => {
        if (err.code === 'timeout') this.#drop('no answer to a ping');
      });
    }, every);
  }

  #stopHeartbeat() {
    clearInterval(this.#heartbeat);
    this.#heartbeat = null;
  }

  #sendSubscribe(sub) {
    const frame = sub._frame();
    // Handled synchronously: the replay may follow the reply in the same packed frame.
    this.#call(frame, { queue: false, timeoutMs: 0 }, {
      resolve: (reply) => {
        if (sub.active && this.#subs.get(sub.topic) === sub) sub._subscribed(frame, reply);
      },
      reject: (err) => {
        // A dropped connection resubscribes on the next one; a refusal ends it.
        if (['disconnected', 'closed', 'timeout'].includes(err.code)) return;
        if (this.#subs.get(sub.topic) === sub) this.#subs.delete(sub.topic);
        sub._failed(err);
      },
    });
  }

  /** @internal */
  _forget(sub) {
    if (this.#subs.get(sub.topic) === sub) this.#subs.delete(sub.topic);
  }

  /**
   * Sends `frame` with a fresh id and resolves with the reply. `queue: false` fails at
   * once with `disconnected` when the socket is not open; otherwise a request made while
   * not open waits (until its timeout) for the connection and is sent then, its first
   * send. `timeoutMs: 0` waits forever. @internal
   */
  _request(frame, options = {}) {
    return new Promise((resolve, reject) => this.#call(frame, options, { resolve, reject }));
  }

  /** `_request` with callbacks, called synchronously with the reply frame or the error. */
  #call(frame, { timeoutMs, queue = true, force = false }, { resolve, reject }) {
    const request = { frame: { ...frame, id: this.#nextId++ }, resolve, reject, timer: null };
    const limit = timeoutMs ?? this.#requestTimeout();
    if (limit > 0) {
      request.timer = setTimeout(
        () => this.#settle(request, new HeraldError('timeout', `no answer within ${limit} ms`)),
        limit,
      );
    }
    if (this.#state === 'open' || (force && this.#socket)) this.#send(request);
    else if (!queue) this.#settle(request, new HeraldError('disconnected', 'not connected'));
    else {
      this.#outbox.push(request);
      if (this.#state === 'closed') this.connect().catch(() => {});
    }
  }

  #send(request) {
    this.#pending.set(request.frame.id, request);
    try {
      this.#socket.send(JSON.stringify(request.frame));
    } catch (cause) {
      this.#settle(request, new HeraldError('disconnected', 'the socket refused the frame', { cause }));
    }
  }

  #settle(request, err, reply) {
    clearTimeout(request.timer);
    this.#pending.delete(request.frame.id);
    const queued = this.#outbox.indexOf(request);
    if (queued >= 0) this.#outbox.splice(queued, 1);
    if (err) request.reject(err);
    else request.resolve(reply);
  }

  #dispatch(frame) {
    switch (frame.type) {
      case 'message':
        this.#subs.get(frame.topic)?._message(frame);
        return;
      case 'join':
      case 'leave':
      case 'presence_lost':
        this.#subs.get(frame.topic)?._presence(frame);
        return;
    }
    const request = frame.id === undefined ? undefined : this.#pending.get(frame.id);
    if (frame.type === 'error') {
      const err = new HeraldError(frame.code, frame.message);
      if (request) return this.#settle(request, err);
      // Not about a call: e.g. a subscription a refreshed token no longer allows.
      const sub = frame.topic === undefined ? undefined : this.#subs.get(frame.topic);
      if (sub && frame.code === 'forbidden') {
        this.#subs.delete(frame.topic);
        sub._failed(err);
      }
      this.emit('error', err);
      return;
    }
    if (request) this.#settle(request, null, frame);
  }
}

// ---------------------------------------------------------------- helpers

/** The HeraldError of an HTTP error answer (`{"error":{"code","message"}}`). */
function httpError(method, path, response, text) {
  let code = statusCode(response.status);
  let message = `${method} ${path}: ${response.status}`;
  try {
    const body = JSON.parse(text);
    if (body?.error?.code) code = body.error.code;
    if (body?.error?.message) message = body.error.message;
  } catch {
    if (text) message += ` ${text.slice(0, 200)}`;
  }
  const retryAfter = Number(response.headers.get('retry-after'));
  const retryAfterMs = Number.isFinite(retryAfter) && retryAfter >= 0 && response.headers.has('retry-after') ? retryAfter * 1000 : undefined;
  return new HeraldError(code, message, { status: response.status, retryAfterMs });
}

/** The code word of a status whose body carried none (a proxy's answer, say). */
function statusCode(status) {
  const codes = { 400: 'bad_request', 401: 'unauthorized', 403: 'forbidden', 404: 'not_found', 413: 'too_large', 429: 'rate_limited', 503: 'unavailable' };
  return codes[status] ?? (status >= 500 ? 'unavailable' : 'bad_request');
}

function detach(socket, code, reason) {
  socket.onopen = socket.onmessage = socket.onclose = null;
  socket.onerror = () => {};
  try {
    if (typeof socket.terminate === 'function' && code !== 1000) socket.terminate();
    else socket.close(code, reason);
  } catch {
    // Closing a socket that never opened may throw; it is gone either way.
  }
}

function enc(name) {
  return encodeURIComponent(name);
}

function jobId(id) {
  return typeof id === 'object' && id !== null ? id.id : id;
}

function camelKeys(object) {
  const out = {};
  for (const [key, value] of Object.entries(object)) out[key.replace(/_([a-z])/g, (_, c) => c.toUpperCase())] = value;
  return out;
}

/** A message frame (or HTTP history entry) as the app sees it. */
function toMessage(frame, topic) {
  const message = { topic: frame.topic ?? topic, offset: frame.offset, ts: frame.ts };
  if (frame.data_b64 !== undefined) message.bytes = fromBase64(frame.data_b64);
  else message.data = frame.data;
  return message;
}

/** `data` as bytes when it is binary (or `binary` asks for it), else null. */
function asBytes(data, binary) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (binary) {
    if (typeof data === 'string') return utf8(data);
    throw new TypeError('binary: data must be a Uint8Array, an ArrayBuffer or a string');
  }
  return null;
}

/** An HTTP body and its Content-Type, which decides the message's kind. */
function encodeBody(data, options) {
  const bytes = asBytes(data, options.binary);
  if (bytes) return { body: bytes, contentType: options.contentType ?? 'application/octet-stream' };
  if (options.text) {
    if (typeof data !== 'string') throw new TypeError('text: data must be a string');
    return { body: data, contentType: options.contentType ?? 'text/plain; charset=utf-8' };
  }
  // A string with an explicit type goes as it is (JSON text already serialised, say).
  if (options.contentType && typeof data === 'string') return { body: data, contentType: options.contentType };
  return { body: JSON.stringify(data === undefined ? null : data), contentType: 'application/json' };
}

function utf8(text) {
  return new TextEncoder().encode(text);
}

function toBase64(bytes) {
  if (typeof Buffer === 'function') return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function fromBase64(text) {
  if (typeof Buffer === 'function') {
    return new Uint8Array(Buffer.from(text, 'base64')); // a copy: not a view into Buffer's pool
  }
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
