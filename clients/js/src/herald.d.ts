// Types of the Herald JavaScript client (src/herald.js). Hand-written; keep in step.

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** Binary payloads: published as kind `binary`, delivered as `bytes`. */
export type Bytes = Uint8Array | ArrayBuffer | ArrayBufferView;

/** The server's code words, and the client's own `disconnected`, `timeout`, `closed`. */
export type ErrorCode =
  | 'bad_request'
  | 'invalid_name'
  | 'too_large'
  | 'already_subscribed'
  | 'not_subscribed'
  | 'too_many_subscriptions'
  | 'unavailable'
  | 'not_found'
  | 'unauthorized'
  | 'forbidden'
  | 'rate_limited'
  | 'internal'
  | 'disconnected'
  | 'timeout'
  | 'closed'
  | (string & {});

export class HeraldError extends Error {
  constructor(code: ErrorCode, message?: string, options?: { status?: number; retryAfterMs?: number; cause?: unknown });
  readonly name: 'HeraldError';
  /** The server's code word, or `disconnected` / `timeout` (outcome unknown) / `closed`. */
  readonly code: ErrorCode;
  /** The HTTP status, for errors of HTTP calls. */
  readonly status?: number;
  /** From `Retry-After` (429 `rate_limited`), in milliseconds. */
  readonly retryAfterMs?: number;
}

/** A tiny event emitter. */
export class Emitter<Events extends Record<string, unknown>> {
  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof Events & string>(event: K, fn: (value: Events[K]) => void): () => void;
  off<K extends keyof Events & string>(event: K, fn: (value: Events[K]) => void): void;
  /** Calls `fn` on the next event only; returns a function that removes it. */
  once<K extends keyof Events & string>(event: K, fn: (value: Events[K]) => void): () => void;
  /** The next event. */
  once<K extends keyof Events & string>(event: K): Promise<Events[K]>;
}

export type State = 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface ReconnectOptions {
  /** First delay before a reconnect, ms (default 100); doubles per failed attempt. */
  minDelayMs?: number;
  /** Largest delay, ms (default 10000). Each delay is drawn in [d/2, d] (jitter). */
  maxDelayMs?: number;
}

/** A WebSocket class: the browser's, `ws`'s, or any with the same API. */
export interface WebSocketConstructor {
  new (url: string, protocolsOrOptions?: unknown): any;
}

export interface HeraldOptions {
  /** Bearer token (JWT), or a function returning one (called per connection and request). */
  token?: string | (() => string | Promise<string>);
  /** Basic credentials (HTTP and, in Node, the WebSocket upgrade). */
  user?: string;
  password?: string;
  /** Ask for packed frames (`/v1/ws?pack=lines`). Default true. */
  pack?: boolean;
  /** Reconnect with backoff (default `{minDelayMs: 100, maxDelayMs: 10000}`), or false. */
  reconnect?: ReconnectOptions | false;
  /** The WebSocket class; default `globalThis.WebSocket`, else the `ws` package. */
  WebSocket?: WebSocketConstructor;
  /** With `WebSocket`: it takes `{headers}` as its second argument (as `ws` does), so
   *  credentials go in the upgrade's Authorization header instead of an `auth` frame. */
  wsHeaders?: boolean;
  /** The fetch function for HTTP calls; default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** Default time a WebSocket request or HTTP call waits for its answer, ms (default 30000). */
  requestTimeoutMs?: number;
  /** Silence after which the client pings, and drops the connection if the ping goes
   *  unanswered as long again, ms (default 30000; 0: off). */
  heartbeatMs?: number;
  /** How long a connection attempt may take before it is given up and retried, ms
   *  (default 15000; 0: no limit). */
  connectTimeoutMs?: number;
}

export interface CallOptions {
  /** Overrides `requestTimeoutMs`; 0 waits forever. */
  timeoutMs?: number;
}

export interface Published {
  topic: string;
  offset: number;
  ts: number;
}

/** A message: `data` for json and text, `bytes` for binary. */
export interface Message {
  topic: string;
  offset: number;
  /** When the broker accepted it, ms since the Unix epoch. */
  ts: number;
  data?: Json;
  bytes?: Uint8Array;
}

export type From = 'latest' | 'earliest' | number;

export interface SubscribeOptions {
  /** Where to start (default 'latest'); an offset N replays from N (0: earliest). */
  from?: From;
  /** The epoch `from` belongs to; checked by the server when `from` >= 1. */
  epoch?: string;
  /** Receive `join`, `leave` and `presence_lost` events. */
  presence?: boolean;
  /** Shown in this subscription's member entry (JSON, at most 1 KiB as text). */
  info?: Json;
}

export interface Subscribed {
  topic: string;
  epoch: string;
  /** The offset the next new message will get. */
  next: number;
  /** False: the requested point could not be resumed (epoch changed, trimmed, beyond
   *  `next`); nothing was replayed, live messages follow. Reload state (e.g. history). */
  recovered: boolean;
  /** True for a resubscribe after a reconnect. */
  resumed: boolean;
}

export interface Member {
  /** The connection id (as in /v1/admin/connections). */
  conn: number;
  door: 'ws' | 'raw' | 'sse' | 'grpc';
  role: 'subscriber' | 'publisher';
  user: string | null;
  info: Json | null;
}

export interface PresenceEvent {
  topic: string;
  member: Member;
}

export interface PresenceLost {
  topic: string;
  dropped: number;
  subscribers: number;
  publishers: number;
}

export interface SubscriptionEvents {
  message: Message;
  subscribed: Subscribed;
  join: PresenceEvent;
  leave: PresenceEvent;
  presence_lost: PresenceLost;
  /** The topic was deleted while followed: offsets start again at 1. */
  reset: { topic: string };
  /** The subscription ended: refused by the server, or the client closed. */
  error: HeraldError;
  [event: string]: unknown;
}

export class Subscription extends Emitter<SubscriptionEvents> {
  readonly topic: string;
  /** Resolves with the first `subscribed`; rejects if the server refuses it. */
  readonly ready: Promise<Subscribed>;
  /** The last offset delivered (the resume point is the next one), null before any. */
  readonly lastOffset: number | null;
  /** The epoch `lastOffset` belongs to, null until known. */
  readonly epoch: string | null;
  /** False once unsubscribed or ended. */
  readonly active: boolean;
  unsubscribe(): Promise<void>;
}

export interface Presence {
  topic: string;
  subscribers: number;
  publishers: number;
  /** At most 1000, by conn. */
  members: Member[];
  more: boolean;
}

export interface PresencePage {
  topic: string;
  subscribers: number;
  publishers: number;
  members: Member[];
  /** The `after` of the next page; null on the last. */
  next: number | null;
}

export interface PayloadOptions {
  /** Send a string as text (`text/plain`) instead of JSON. */
  text?: boolean;
  /** Send `data` as binary (a string as its UTF-8 bytes); bytes are binary anyway. */
  binary?: boolean;
  /** The Content-Type (it decides the kind); a string `data` with it is sent as it is
   *  (e.g. JSON text already serialised, with `application/json`). */
  contentType?: string;
}

export interface History {
  topic: string;
  epoch: string;
  messages: Message[];
  /** Pass as the next `from` to page. */
  next: number;
}

export interface TopicInfo {
  topic: string;
  epoch: string;
  first: number;
  last: number;
  retained: number;
  subscribers: number;
  publishers?: number;
}

export interface TopicEntry {
  topic: string;
  last: number;
  subscribers: number;
  publishers?: number;
}

export interface Job {
  queue: string;
  /** This delivery's id: for ack, requeue, extend. */
  id: string;
  messageId: number;
  /** Deliveries so far, 1 on the first. */
  attempt: number;
  ts: number;
  data?: Json;
  bytes?: Uint8Array;
}

export interface QueueStats {
  queue: string;
  ready: number;
  inFlight: number;
  delayed: number;
  dead: number;
}

export interface ListOptions extends CallOptions {
  prefix?: string;
  after?: string;
  limit?: number;
}

export interface HeraldEvents {
  state: State;
  /** Each socket that ended (1006: dropped without a close frame). */
  close: { code: number; reason: string };
  /** An error not tied to a call (refused credentials, a server error frame without id). */
  error: HeraldError;
  [event: string]: unknown;
}

export class Herald extends Emitter<HeraldEvents> {
  constructor(url: string, options?: HeraldOptions);
  readonly url: string;
  readonly state: State;
  readonly subscriptions: Map<string, Subscription>;

  connect(): Promise<void>;
  close(): void;

  publish(topic: string, data: Json | Bytes, options?: CallOptions & { ttlMs?: number; binary?: boolean }): Promise<Published>;
  subscribe(topic: string, options?: SubscribeOptions): Subscription;
  presence(topic: string, options?: CallOptions): Promise<Presence>;
  ping(options?: CallOptions): Promise<void>;
  setToken(token: string | (() => string | Promise<string>)): Promise<void>;

  publishHttp(topic: string, data: Json | Bytes, options?: CallOptions & PayloadOptions & { ttlMs?: number }): Promise<Published>;
  history(topic: string, options?: CallOptions & { from?: number; limit?: number }): Promise<History>;
  topic(name: string, options?: CallOptions): Promise<TopicInfo>;
  topics(options?: ListOptions): Promise<TopicEntry[]>;
  deleteTopic(name: string, options?: CallOptions): Promise<void>;
  presenceList(topic: string, options?: CallOptions & { after?: number; limit?: number }): Promise<PresencePage>;

  enqueue(
    queue: string,
    data: Json | Bytes,
    options?: CallOptions & PayloadOptions & { delayMs?: number; ttlMs?: number },
  ): Promise<{ queue: string; messageId: number }>;
  fetchJobs(queue: string, options?: CallOptions & { max?: number; waitMs?: number; visibilityMs?: number }): Promise<Job[]>;
  /** Acks `done` and leases up to `max` more jobs in one request. */
  ackAndFetch(
    queue: string,
    done: Array<Job | string>,
    options?: CallOptions & { max?: number; waitMs?: number; visibilityMs?: number },
  ): Promise<{ jobs: Job[]; acked: number; ackErrors: Array<{ index: number; code: string; message: string }> }>;
  ack(queue: string, job: Job | string, options?: CallOptions): Promise<void>;
  requeue(queue: string, job: Job | string, options?: CallOptions & { delayMs?: number }): Promise<void>;
  extend(queue: string, job: Job | string, visibilityMs: number, options?: CallOptions): Promise<void>;
  queueStats(queue: string, options?: CallOptions): Promise<QueueStats>;
  queues(options?: ListOptions): Promise<QueueStats[]>;
  purge(queue: string, options?: CallOptions): Promise<{ queue: string; purged: number }>;
  redrive(queue: string, options?: CallOptions & { max?: number }): Promise<{ queue: string; moved: number }>;
}
