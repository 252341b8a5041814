//! `RedisStore`: topic histories and queue records in Redis, shared by every node of a
//! cluster, and [`RedisBus`], which delivers every node's appends to each node over
//! Redis pub/sub (docs/cluster.md).
//!
//! Per topic, every key shares the hash tag `{t:<topic>}`, so a topic lives in one
//! Redis Cluster slot:
//! - `<prefix>{t:<topic>}:meta`, a hash: `epoch`, `next` (the next offset), `last_ts`,
//!   and `front_ts` / `front_exp` (the oldest entry's, so that trimming reads the log only
//!   when it may be due). It has no TTL: a topic's epoch is never forgotten while Redis
//!   keeps its data.
//! - `<prefix>{t:<topic>}:log`, a Stream whose entry id is `<offset>-0`, with the fields
//!   `ts`, `kind`, `expires` ('' for none) and `payload`.
//! - `<prefix>{t:<topic>}:ch`, the channel each append publishes its whole batch to, and
//!   each delete its epochs (the events [`RedisBus`] reads; format in `bus.rs`).
//!
//! The connection (`con.rs`) goes to a standalone Redis or, if the first server says it
//! is part of one, to a Redis Cluster, where the scripts publish with SPUBLISH (sharded
//! pub/sub, the event stays on the topic's shard).
//!
//! One Lua script appends a whole batch atomically (offsets, timestamps, XADD, trimming,
//! meta, PUBLISH); `head` and `read` are one script each (trimming first, as the memory
//! store does), so each operation is one round trip. A missing meta is created with a
//! fresh random epoch by whichever script meets it first (`head` of a never-published
//! topic included, so the first append keeps the epoch `head` named), and a log found
//! without its meta (evicted) is deleted: an epoch is never reused over old offsets.
//!
//! Queue records (the `Store` half of one node's queue engine): `<prefix>{q:<queue>}:records`
//! (id -> encoded record), `:attempts` (id -> deliveries) and `:next` (the next id).
//! `queue_append` is awaited; `queue_remove` and `queue_delivered` are lazy. All queue
//! writes go through one task, in the order they were issued, so a removal never
//! overtakes the append it removes. `queue_load` is synchronous and served from the
//! queues read by [`RedisStore::connect`] and kept up to date by this store's own
//! writes: exact for one node. A cluster does not use them: its nodes share queues
//! through [`RedisQueues`] (`queues.rs`), whose state lives in Redis alone.
//!
//! `list` reads the topic registry (`<prefix>topics`, a sorted set every append adds its
//! topic to, once per node, and nothing removes from) and each candidate's head.

mod bus;
mod con;
mod queues;
mod scripts;

pub use bus::RedisBus;
pub use queues::RedisQueues;

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use con::{Con, Target};
use herald_core::{
    Appended, Clock, Epoch, History, Kind, ListedTopic, LiveQueue, Message, NewMessage, QueueName, QueueRecord,
    QueueSnapshot, RetentionConfig, Store, StoreError, StoreFuture, TopicHead, TopicName,
};
use redis::{AsyncCommands, RedisError};
use tokio::sync::{mpsc, oneshot};

use scripts::Scripts;

/// Largest number passed to a script (Lua numbers are exact up to 2^53).
const LUA_MAX: u64 = 1 << 53;

/// Registry entries a list call (topics, queues) reads per round trip.
const LIST_PAGE: usize = 200;

/// Where a walk of a name registry (a sorted set of names at score 0, read BYLEX)
/// starts: just past `after` when it sorts within `prefix`'s range, else at `prefix`.
fn registry_start(prefix: &str, after: Option<&str>) -> String {
    match after {
        Some(a) if a >= prefix => format!("({a}"),
        _ => format!("[{prefix}"),
    }
}

/// One page of the name registry `key` from `cursor` (a ZRANGE BYLEX bound); the next
/// page starts just past its last name.
async fn registry_page(con: &mut Con, key: &str, cursor: &str) -> redis::RedisResult<Vec<String>> {
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(cursor)
        .arg("+")
        .arg("BYLEX")
        .arg("LIMIT")
        .arg(0)
        .arg(LIST_PAGE)
        .query_async(con)
        .await
}

/// How often the connection is probed for [`Store::is_ready`].
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Settings of the Redis store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The server, as `redis://[user:password@]host[:port][/db]` (default
    /// `redis://127.0.0.1:6379/`), or seed nodes of a Redis Cluster separated by commas
    /// (the first one is asked whether it is part of a cluster); Redis 6.2 or later (the
    /// read script uses exclusive XRANGE bounds), 7 on a cluster (sharded pub/sub).
    pub url: String,
    /// Prepended to every key and channel (default `herald:`), so that several
    /// deployments or tests share one Redis. It must not contain `{` or `}`: the keys'
    /// own hash tags must stay the first braces in each key.
    pub prefix: String,
    /// Topic retention, applied by the scripts at append, head and read.
    pub retention: RetentionConfig,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".to_owned(),
            prefix: "herald:".to_owned(),
            retention: RetentionConfig::default(),
        }
    }
}

/// Why [`RedisStore::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// The prefix holds a brace.
    #[error("the Redis key prefix {0:?} must not contain '{{' or '}}'")]
    Prefix(String),
    /// Redis refused the URL, the connection or a command.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// A stored queue record could not be decoded.
    #[error("damaged queue record {id} in {key}")]
    Damaged {
        /// The records hash.
        key: String,
        /// The record's id.
        id: u64,
    },
}

/// A [`Store`] on Redis. Cheap to clone; the last clone dropped ends its tasks.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
    /// Queue writes, applied in order by one task.
    queue_ops: mpsc::UnboundedSender<QueueOp>,
}

struct Inner {
    con: Con,
    /// Where the bus opens its own pub/sub connection.
    target: Target,
    prefix: String,
    clock: Arc<dyn Clock>,
    retention: RetentionConfig,
    scripts: Scripts,
    ready: AtomicBool,
    hasher: RandomState,
    epochs: AtomicU64,
    /// Topics this store added to the registry (which nothing removes from).
    registered: Mutex<HashSet<TopicName>>,
    /// Appends waiting for their topic's group commit.
    groups: Mutex<HashMap<TopicName, Group>>,
    /// The queues' live records, for `queue_load`.
    queues: Mutex<BTreeMap<QueueName, LiveQueue>>,
}

/// A topic's appends waiting for one script call.
#[derive(Default)]
struct Group {
    /// A task is committing this topic's groups.
    committing: bool,
    waiting: Vec<Waiting>,
}

/// One caller's batch and where its result goes.
type Waiting = (Vec<NewMessage>, oneshot::Sender<Result<Appended, StoreError>>);

/// Most messages one append script takes (more wait for the next call).
const GROUP_MAX_MESSAGES: usize = 1024;

enum QueueOp {
    Append { queue: QueueName, records: Vec<QueueRecord>, done: oneshot::Sender<Result<(), StoreError>> },
    Remove { queue: QueueName, ids: Vec<u64> },
    Delivered { queue: QueueName, attempts: Vec<(u64, u32)> },
    Flush(oneshot::Sender<()>),
}

impl RedisStore {
    /// Connects to Redis, reads the topic registry and the queues, and starts the task
    /// that applies queue writes and the one that probes the connection.
    pub async fn connect(config: RedisConfig, clock: Arc<dyn Clock>) -> Result<Self, RedisStoreError> {
        if config.prefix.contains(['{', '}']) {
            return Err(RedisStoreError::Prefix(config.prefix));
        }
        let target = Target::discover(&config.url).await?;
        let mut con = target.connect().await?;
        let prefix = config.prefix;
        let queues = load_queues(&mut con, &prefix).await?;
        // On Redis Cluster, sharded pub/sub keeps each event on its topic's shard.
        let scripts = Scripts::new(if target.cluster { "SPUBLISH" } else { "PUBLISH" });
        let inner = Arc::new(Inner {
            con,
            target,
            prefix,
            clock,
            retention: config.retention,
            scripts,
            ready: AtomicBool::new(true),
            hasher: RandomState::new(),
            epochs: AtomicU64::new(0),
            registered: Mutex::new(HashSet::new()),
            groups: Mutex::new(HashMap::new()),
            queues: Mutex::new(queues),
        });
        let (queue_ops, rx) = mpsc::unbounded_channel();
        tokio::spawn(apply_queue_ops(inner.clone(), rx));
        tokio::spawn(probe(Arc::downgrade(&inner)));
        Ok(Self { inner, queue_ops })
    }
}

/// Every queue's records, attempts and next id.
async fn load_queues(con: &mut Con, prefix: &str) -> Result<BTreeMap<QueueName, LiveQueue>, RedisStoreError> {
    let names: Vec<String> = con.zrange(format!("{prefix}queues"), 0, -1).await?;
    let mut out = BTreeMap::new();
    for name in names {
        let Ok(q) = QueueName::parse(&name) else { continue };
        let key = queue_key(prefix, &q, "records");
        type Stored = (Vec<(u64, Vec<u8>)>, Vec<(u64, u32)>, Option<u64>);
        let (records, attempts, next): Stored = redis::pipe()
            .hgetall(&key)
            .hgetall(queue_key(prefix, &q, "attempts"))
            .get(queue_key(prefix, &q, "next"))
            .query_async(con)
            .await?;
        let mut mirror = LiveQueue { next_id: next.unwrap_or(1), ..LiveQueue::default() };
        let records = records
            .into_iter()
            .map(|(id, raw)| decode_record(id, &raw).ok_or_else(|| RedisStoreError::Damaged { key: key.clone(), id }))
            .collect::<Result<Vec<_>, _>>()?;
        mirror.enqueued(records);
        mirror.delivered(attempts);
        out.insert(q, mirror);
    }
    Ok(out)
}

fn topic_key(prefix: &str, topic: &TopicName, what: &str) -> String {
    format!("{prefix}{{t:{}}}:{what}", topic.as_str())
}

/// A key (or the channel) of a shared queue family: the queue and its dead-letter
/// queue share the hash tag `{sq:<queue>}` (`queues.rs`).
fn family_key(prefix: &str, family: &QueueName, what: &str) -> String {
    format!("{prefix}{{sq:{}}}:{what}", family.as_str())
}

fn queue_key(prefix: &str, queue: &QueueName, what: &str) -> String {
    format!("{prefix}{{q:{}}}:{what}", queue.as_str())
}

fn kind_of(s: &str) -> Option<Kind> {
    match s {
        "json" => Some(Kind::Json),
        "text" => Some(Kind::Text),
        "binary" => Some(Kind::Binary),
        _ => None,
    }
}

/// `<kind> <ts> <ready_at> <expires_at or -> \n <payload>`.
fn encode_record(r: &QueueRecord) -> Vec<u8> {
    let expires = r.expires_at.map_or_else(|| "-".to_owned(), |e| e.to_string());
    let mut out = format!("{} {} {} {expires}\n", r.kind.as_str(), r.ts, r.ready_at).into_bytes();
    out.extend_from_slice(&r.payload);
    out
}

fn decode_record(id: u64, raw: &[u8]) -> Option<QueueRecord> {
    let nl = raw.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&raw[..nl]).ok()?;
    let mut fields = head.split(' ');
    let kind = kind_of(fields.next()?)?;
    let ts = fields.next()?.parse().ok()?;
    let ready_at = fields.next()?.parse().ok()?;
    let expires_at = match fields.next()? {
        "-" => None,
        e => Some(e.parse().ok()?),
    };
    Some(QueueRecord { id, kind, payload: Bytes::copy_from_slice(&raw[nl + 1..]), ts, ready_at, expires_at })
}

/// The offset of a stream id `N-0` ('0' when there is none).
fn offset_of(id: &str) -> Result<u64, StoreError> {
    id.split('-').next().and_then(|n| n.parse().ok()).ok_or_else(|| damaged(format!("stream id {id:?}")))
}

fn damaged(what: String) -> StoreError {
    StoreError::Unavailable(format!("redis: damaged data: {what}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// A new epoch: 12 hex digits of a randomly keyed hash of time, process and counter.
    fn fresh_epoch(&self) -> String {
        let n = self.epochs.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let h = self.hasher.hash_one((nanos, n, std::process::id()));
        format!("{:012x}", h & 0xffff_ffff_ffff)
    }

    /// Maps a Redis error to the store's, noting a lost connection for `is_ready`.
    fn failed(&self, e: RedisError) -> StoreError {
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
            self.ready.store(false, Ordering::Relaxed);
        }
        StoreError::Unavailable(format!("redis: {e}"))
    }

    fn answered<T>(&self, r: Result<T, RedisError>) -> Result<T, StoreError> {
        match r {
            Ok(v) => {
                self.ready.store(true, Ordering::Relaxed);
                Ok(v)
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    /// A topic script's invocation with the shared keys and arguments.
    fn topic_call<'a>(&self, script: &'a redis::Script, topic: &TopicName, now: u64) -> redis::ScriptInvocation<'a> {
        let mut call = script.prepare_invoke();
        call.key(topic_key(&self.prefix, topic, "meta"))
            .key(topic_key(&self.prefix, topic, "log"))
            .arg(self.fresh_epoch())
            .arg(now)
            .arg(self.retention.max_messages.min(LUA_MAX))
            .arg((self.retention.max_age.as_millis() as u64).min(LUA_MAX));
        call
    }

    async fn apply(&self, op: QueueOp) {
        let mut con = self.con.clone();
        let prefix = &self.prefix;
        match op {
            QueueOp::Append { queue, records, done } => {
                let mut call = self.scripts.queue_append.prepare_invoke();
                call.key(queue_key(prefix, &queue, "records")).key(queue_key(prefix, &queue, "next"));
                for r in &records {
                    call.arg(r.id).arg(encode_record(r));
                }
                // The registry (for `queue_load` at the next connect) needs one ZADD per
                // queue, not one per enqueue.
                let known = lock(&self.queues).contains_key(&queue);
                let registered: Result<(), RedisError> =
                    if known { Ok(()) } else { con.zadd(format!("{prefix}queues"), queue.as_str(), 0).await };
                let result = match registered {
                    Ok(()) => call.invoke_async::<()>(&mut con).await,
                    Err(e) => Err(e),
                };
                let result = self.answered(result);
                if result.is_ok() {
                    lock(&self.queues)
                        .entry(queue)
                        .or_insert_with(|| LiveQueue { next_id: 1, ..Default::default() })
                        .enqueued(records);
                }
                let _ = done.send(result);
            }
            QueueOp::Remove { queue, ids } => {
                // Not a transaction (Redis Cluster pipelines have none): a removal lost
                // halfway only leaves an attempt count behind, ignored at load.
                let result = redis::pipe()
                    .hdel(queue_key(prefix, &queue, "records"), &ids)
                    .hdel(queue_key(prefix, &queue, "attempts"), &ids)
                    .query_async::<()>(&mut con)
                    .await;
                if let Err(e) = self.answered(result) {
                    tracing::warn!(queue = queue.as_str(), error = %e, "queue removal not persisted");
                }
                if let Some(mirror) = lock(&self.queues).get_mut(&queue) {
                    mirror.removed(ids);
                }
            }
            QueueOp::Delivered { queue, attempts } => {
                let result = con.hset_multiple::<_, _, _, ()>(queue_key(prefix, &queue, "attempts"), &attempts).await;
                if let Err(e) = self.answered(result) {
                    tracing::warn!(queue = queue.as_str(), error = %e, "queue attempts not persisted");
                }
                if let Some(mirror) = lock(&self.queues).get_mut(&queue) {
                    mirror.delivered(attempts);
                }
            }
            QueueOp::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Runs one topic's group commits until no append waits: each round takes every batch
/// that arrived meanwhile (up to [`GROUP_MAX_MESSAGES`]) into one append script.
async fn commit_groups(inner: Arc<Inner>, topic: TopicName) {
    loop {
        let group: Vec<Waiting> = {
            let mut groups = lock(&inner.groups);
            let Some(pending) = groups.get_mut(&topic) else { return };
            // Whole batches, at least one, until the next would pass the cap.
            let (mut take, mut count) = (0, 0);
            for (batch, _) in &pending.waiting {
                if take > 0 && count + batch.len() > GROUP_MAX_MESSAGES {
                    break;
                }
                count += batch.len();
                take += 1;
            }
            let group: Vec<_> = pending.waiting.drain(..take).collect();
            if group.is_empty() {
                groups.remove(&topic);
                return;
            }
            group
        };
        let sizes: Vec<usize> = group.iter().map(|(b, _)| b.len()).collect();
        let (batches, answers): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        match inner.append_batch(&topic, batches.into_iter().flatten().collect()).await {
            Ok(appended) => {
                let mut messages = appended.messages.into_iter();
                for (size, answer) in sizes.into_iter().zip(answers) {
                    let mine: Vec<Arc<Message>> = messages.by_ref().take(size).collect();
                    let _ = answer.send(Ok(Appended { epoch: appended.epoch.clone(), messages: mine }));
                }
            }
            Err(e) => {
                for answer in answers {
                    let _ = answer.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Applies queue writes one at a time, in the order issued; ends with the last store handle.
async fn apply_queue_ops(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<QueueOp>) {
    while let Some(op) = rx.recv().await {
        inner.apply(op).await;
    }
}

/// Probes the connection so that `is_ready` follows an outage even when idle.
async fn probe(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut con = inner.con.clone();
        let result = redis::cmd("PING").query_async::<()>(&mut con).await;
        let _ = inner.answered(result);
    }
}

impl Store for RedisStore {
    /// Concurrent appends to one topic from this node share one script call (a group
    /// commit): while a call is in flight, later batches wait, then go together, each
    /// caller getting its own consecutive offsets in the order it called.
    fn append(&self, topic: &TopicName, batch: Vec<NewMessage>) -> StoreFuture<Appended> {
        let inner = self.inner.clone();
        let topic = topic.clone();
        if batch.is_empty() {
            let now = inner.clock.now_ms();
            return Box::pin(async move {
                let head = inner.head(&topic, now).await?;
                Ok(Appended { epoch: head.epoch, messages: Vec::new() })
            });
        }
        let (done, answer) = oneshot::channel();
        let lead = {
            let mut groups = lock(&inner.groups);
            let group = groups.entry(topic.clone()).or_default();
            group.waiting.push((batch, done));
            !std::mem::replace(&mut group.committing, true)
        };
        if lead {
            tokio::spawn(commit_groups(inner, topic));
        }
        Box::pin(async move { answer.await.map_err(|_| StoreError::Closed)? })
    }

    fn read(&self, topic: &TopicName, from: u64, until: u64, limit: usize) -> StoreFuture<History> {
        let inner = self.inner.clone();
        let topic = topic.clone();
        let now = inner.clock.now_ms();
        Box::pin(async move {
            let start = if from == 0 { "-".to_owned() } else { format!("{from}-0") };
            let end = if until == u64::MAX { "+".to_owned() } else { format!("{until}-0") };
            let mut call = inner.topic_call(&inner.scripts.read, &topic, now);
            call.arg(start).arg(end).arg((limit as u64).min(LUA_MAX));
            let mut con = inner.con.clone();
            type Entry = (String, u64, String, String, Vec<u8>);
            let (epoch, entries): (String, Vec<Entry>) = inner.answered(call.invoke_async(&mut con).await)?;
            let mut messages = Vec::with_capacity(entries.len());
            for (id, ts, kind, expires, payload) in entries {
                let kind = kind_of(&kind).ok_or_else(|| damaged(format!("kind {kind:?} in {topic}")))?;
                let ttl_ms = match expires.as_str() {
                    "" => None,
                    e => Some(e.parse::<u64>().map_err(|_| damaged(format!("expires {e:?} in {topic}")))? - ts),
                };
                let new = NewMessage { kind, payload: Bytes::from(payload), ttl_ms };
                messages.push(Arc::new(Message::new(topic.clone(), offset_of(&id)?, ts, new)));
            }
            Ok(History { epoch: Arc::from(epoch), messages })
        })
    }

    fn head(&self, topic: &TopicName) -> StoreFuture<TopicHead> {
        let inner = self.inner.clone();
        let topic = topic.clone();
        let now = inner.clock.now_ms();
        Box::pin(async move { inner.head(&topic, now).await })
    }

    fn delete(&self, topic: &TopicName) -> StoreFuture<Epoch> {
        let inner = self.inner.clone();
        let topic = topic.clone();
        Box::pin(async move {
            let mut con = inner.con.clone();
            let mut call = inner.scripts.delete.prepare_invoke();
            call.key(topic_key(&inner.prefix, &topic, "meta"))
                .key(topic_key(&inner.prefix, &topic, "log"))
                .arg(inner.fresh_epoch())
                .arg(topic_key(&inner.prefix, &topic, "ch"));
            let epoch: String = inner.answered(call.invoke_async(&mut con).await)?;
            Ok(Arc::from(epoch))
        })
    }

    /// Reads the registry by name from `prefix`/`after`, a page at a time, and each
    /// candidate's head (one pipelined round trip per page): topics with retained
    /// messages, as of their heads.
    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> StoreFuture<Vec<ListedTopic>> {
        let inner = self.inner.clone();
        let prefix = prefix.to_owned();
        let mut cursor = registry_start(&prefix, after);
        let now = inner.clock.now_ms();
        Box::pin(async move {
            let mut con = inner.con.clone();
            let mut out = Vec::new();
            while out.len() < limit {
                let page = registry_page(&mut con, &format!("{}topics", inner.prefix), &cursor)
                    .await
                    .map_err(|e| inner.failed(e))?;
                let Some(last) = page.last() else { break };
                cursor = format!("({last}");
                let names: Vec<TopicName> = page
                    .iter()
                    .take_while(|n| n.starts_with(prefix.as_str()))
                    .filter_map(|n| TopicName::parse(n).ok())
                    .collect();
                let done = names.len() < page.len() || page.len() < LIST_PAGE;
                let heads = futures_util::future::try_join_all(names.iter().map(|t| inner.head(t, now))).await?;
                for (topic, head) in names.into_iter().zip(heads) {
                    if head.retained > 0 && out.len() < limit {
                        out.push(ListedTopic { topic, last: head.last });
                    }
                }
                if done {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn queue_append(&self, queue: &QueueName, records: Vec<QueueRecord>) -> StoreFuture<()> {
        let (done, answer) = oneshot::channel();
        let sent = self.queue_ops.send(QueueOp::Append { queue: queue.clone(), records, done });
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn queue_remove(&self, queue: &QueueName, ids: Vec<u64>) {
        let _ = self.queue_ops.send(QueueOp::Remove { queue: queue.clone(), ids });
    }

    fn queue_delivered(&self, queue: &QueueName, attempts: Vec<(u64, u32)>) {
        let _ = self.queue_ops.send(QueueOp::Delivered { queue: queue.clone(), attempts });
    }

    /// The queues read at connect, with this store's writes since applied.
    fn queue_load(&self) -> Vec<QueueSnapshot> {
        lock(&self.inner.queues).iter().map(|(q, m)| m.snapshot(q)).collect()
    }

    /// Resolves once every queue write issued before it has been answered by Redis
    /// (topic writes are answered before their own futures resolve).
    fn flush(&self) -> StoreFuture<()> {
        let (done, answer) = oneshot::channel();
        let sent = self.queue_ops.send(QueueOp::Flush(done));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| StoreError::Closed)
        })
    }

    /// A no-op: trimming by count, age and TTL is applied lazily at the front of a
    /// topic's log by every append, head and read script, so a topic nobody touches
    /// keeps its aged-out entries until it is touched again.
    fn sweep(&self) {}

    /// False from a failed command or probe (every second) until one succeeds.
    fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// One append script for `batch`: its messages get consecutive offsets.
    async fn append_batch(&self, topic: &TopicName, batch: Vec<NewMessage>) -> Result<Appended, StoreError> {
        let mut con = self.con.clone();
        if !lock(&self.registered).contains(topic) {
            let registered = con.zadd::<_, _, _, ()>(format!("{}topics", self.prefix), topic.as_str(), 0).await;
            self.answered(registered)?;
            lock(&self.registered).insert(topic.clone());
        }
        let mut call = self.topic_call(&self.scripts.append, topic, self.clock.now_ms());
        call.arg(topic_key(&self.prefix, topic, "ch"));
        for m in &batch {
            let ttl = m.ttl_ms.map_or_else(String::new, |t| t.min(LUA_MAX).to_string());
            call.arg(m.kind.as_str()).arg(ttl).arg(m.payload.as_ref());
        }
        let (epoch, first, ts): (String, u64, u64) = self.answered(call.invoke_async(&mut con).await)?;
        let messages = batch
            .into_iter()
            .enumerate()
            .map(|(i, new)| {
                let ttl_ms = new.ttl_ms.map(|t| t.min(LUA_MAX));
                Arc::new(Message::new(topic.clone(), first + i as u64, ts, NewMessage { ttl_ms, ..new }))
            })
            .collect();
        Ok(Appended { epoch: Arc::from(epoch), messages })
    }

    async fn head(&self, topic: &TopicName, now: u64) -> Result<TopicHead, StoreError> {
        self.head_script(self.topic_call(&self.scripts.head, topic, now)).await
    }

    /// The head, and a barrier event `h <token>` on the topic's channel in the same step.
    async fn barrier(&self, topic: &TopicName, token: &str) -> Result<TopicHead, StoreError> {
        let mut call = self.topic_call(&self.scripts.barrier, topic, self.clock.now_ms());
        call.arg(topic_key(&self.prefix, topic, "ch")).arg(token);
        self.head_script(call).await
    }

    /// Runs HEAD or BARRIER: {epoch, next, first id, last id, retained}.
    async fn head_script(&self, call: redis::ScriptInvocation<'_>) -> Result<TopicHead, StoreError> {
        let mut con = self.con.clone();
        let (epoch, next, first, last, retained): (String, u64, String, String, u64) =
            self.answered(call.invoke_async(&mut con).await)?;
        Ok(TopicHead { epoch: Arc::from(epoch), first: offset_of(&first)?, last: offset_of(&last)?, next, retained })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_records_round_trip() {
        let r = QueueRecord {
            id: 7,
            kind: Kind::Binary,
            payload: Bytes::from_static(b"a\nb \x00"),
            ts: 5,
            ready_at: 6,
            expires_at: Some(9),
        };
        assert_eq!(decode_record(7, &encode_record(&r)), Some(r.clone()));
        let r = QueueRecord { expires_at: None, kind: Kind::Json, ..r };
        assert_eq!(decode_record(7, &encode_record(&r)), Some(r));
    }

    #[test]
    fn keys_carry_the_topic_hash_tag() -> Result<(), Box<dyn std::error::Error>> {
        let t = TopicName::parse("a.b")?;
        assert_eq!(topic_key("p:", &t, "log"), "p:{t:a.b}:log");
        Ok(())
    }
}
