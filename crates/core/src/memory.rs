//! `MemoryStore`: topic histories in process memory. The reference implementation of
//! [`Store`] and the test double for everything above it.
//!
//! Histories are sharded by topic so unrelated topics never contend; each shard is a
//! `std::sync::Mutex` held only for in-memory work, never across an await. Nothing
//! survives a restart: every start has a new boot id, so every epoch changes. Queue
//! messages live in the queue engine's own state; this store only acknowledges them.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::config::RetentionConfig;
use crate::message::{Clock, Kind, Message, NewMessage, SystemClock};
use crate::name::{QueueName, TopicName};
use crate::store::{Appended, Epoch, History, ListedTopic, QueueRecord, Store, StoreError, StoreFuture, TopicHead};

const SHARDS: usize = 32;

/// An in-memory [`Store`].
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<HashMap<TopicName, Log>>]>,
    hasher: RandomState,
    boot: String,
    fresh_epoch: Epoch,
    epochs: AtomicU64,
    clock: Arc<dyn Clock>,
    retention: RetentionConfig,
}

/// One topic's history. Kept (possibly empty) for the life of the store so that offsets
/// are never reused and a deleted topic's new epoch is remembered.
struct Log {
    epoch: Epoch,
    /// The generation the epoch names (0 until the topic is first deleted).
    generation: u64,
    next: u64,
    last_ts: u64,
    /// Offset of `entries[0]`: the retained messages have consecutive offsets.
    first: u64,
    entries: VecDeque<Entry>,
    /// Payload bytes of `entries`, for `retention.max_bytes`.
    bytes: u64,
}

/// A retained message, compact: its offset is its place in the log and its topic the
/// log's, so it holds no more than its time, kind and payload (about 56 bytes beside
/// the payload). Reads build full [`Message`]s from it. The disk store's cache keeps
/// its newest messages the same way.
pub struct Entry {
    ts: u64,
    /// Milliseconds since the Unix epoch after which it is skipped; `None` for never.
    expires_at: Option<NonZeroU64>,
    kind: Kind,
    /// Its own allocation of exactly the payload: a payload sliced from a larger buffer
    /// (a WebSocket frame, a gRPC batch) would otherwise keep all of it alive.
    payload: Bytes,
}

impl Entry {
    /// The entry of `msg`, with a copy of its payload.
    pub fn of(msg: &Message) -> Self {
        Self {
            ts: msg.ts,
            // An expiry at 0 and one at 1 are both long past.
            expires_at: msg.expires_at.map(|at| NonZeroU64::new(at).unwrap_or(NonZeroU64::MIN)),
            kind: msg.kind,
            payload: Bytes::copy_from_slice(&msg.payload),
        }
    }

    /// Whether its TTL has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at.is_some_and(|at| now_ms >= at.get())
    }

    /// Its acceptance time.
    pub fn ts(&self) -> u64 {
        self.ts
    }

    /// Its payload's length in bytes.
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }

    /// The full message, at `offset` of `topic` (the payload shared, not copied).
    pub fn message(&self, topic: &TopicName, offset: u64) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.clone(),
            offset,
            ts: self.ts,
            kind: self.kind,
            payload: self.payload.clone(),
            expires_at: self.expires_at.map(NonZeroU64::get),
        })
    }
}

impl Log {
    fn new(epoch: Epoch, generation: u64) -> Self {
        Self { epoch, generation, next: 1, last_ts: 0, first: 1, entries: VecDeque::new(), bytes: 0 }
    }

    /// Retains `msg`, whose offset must be the one after the newest retained (or, in an
    /// empty log, any offset: the log then starts there).
    fn push(&mut self, msg: &Message) {
        if self.entries.is_empty() {
            self.first = msg.offset;
        }
        debug_assert_eq!(msg.offset, self.first + self.entries.len() as u64);
        self.bytes += msg.payload.len() as u64;
        self.entries.push_back(Entry::of(msg));
    }

    /// Forgets every retained message (offsets go on from `next`).
    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Offset of the newest retained message, if any.
    fn newest(&self) -> Option<u64> {
        (!self.entries.is_empty()).then(|| self.first + self.entries.len() as u64 - 1)
    }

    /// Drops messages from the head past the count, age or bytes limit (the newest is
    /// kept whatever its size), or whose TTL passed.
    fn trim(&mut self, now: u64, retention: &RetentionConfig) {
        let max_age = retention.max_age.as_millis() as u64;
        while let Some(front) = self.entries.front() {
            let over_count = self.entries.len() as u64 > retention.max_messages;
            let over_bytes = retention.max_bytes > 0 && self.bytes > retention.max_bytes && self.entries.len() > 1;
            let too_old = now.saturating_sub(front.ts) >= max_age;
            if over_count || over_bytes || too_old || front.is_expired(now) {
                self.bytes -= front.payload.len() as u64;
                self.entries.pop_front();
                self.first += 1;
            } else {
                break;
            }
        }
    }

    /// The retained entries from offset `from` on, with their offsets.
    fn entries_from(&self, from: u64) -> impl Iterator<Item = (u64, &Entry)> + '_ {
        let skip = from.saturating_sub(self.first) as usize;
        self.entries.iter().enumerate().skip(skip).map(|(i, e)| (self.first + i as u64, e))
    }

    fn head(&self) -> TopicHead {
        let (first, last) = match self.newest() {
            Some(last) => (self.first, last),
            None => (0, 0),
        };
        TopicHead { epoch: self.epoch.clone(), first, last, next: self.next, retained: self.entries.len() as u64 }
    }
}

impl MemoryStore {
    /// A store with the given retention, on the system clock.
    pub fn new(retention: RetentionConfig) -> Self {
        Self::with_clock(retention, Arc::new(SystemClock))
    }

    /// A store reading time from `clock` (tests use a [`crate::ManualClock`]).
    pub fn with_clock(retention: RetentionConfig, clock: Arc<dyn Clock>) -> Self {
        // A boot id that differs between starts: wall time mixed with a random hash seed.
        let boot = format!("{:x}", RandomState::new().hash_one(clock.now_ms()) & 0xffff_ffff_ffff);
        Self::with_identity(retention, clock, boot)
    }

    /// A store whose epochs are `{identity}-{generation}`: a durable store that keeps
    /// its identity across restarts uses this as its in-memory index, so epochs survive.
    pub fn with_identity(retention: RetentionConfig, clock: Arc<dyn Clock>, identity: String) -> Self {
        let hasher = RandomState::new();
        let boot = identity;
        let fresh_epoch: Epoch = Arc::from(format!("{boot}-0"));
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                hasher,
                boot,
                fresh_epoch,
                epochs: AtomicU64::new(0),
                clock,
                retention,
            }),
        }
    }
}

/// One topic's history as a durable store checkpoints it.
#[derive(Debug, Clone)]
pub struct TopicSnapshot {
    /// The topic.
    pub topic: TopicName,
    /// Its epoch's generation.
    pub generation: u64,
    /// The next offset.
    pub next: u64,
    /// The newest timestamp given out.
    pub last_ts: u64,
    /// The retained messages, in offset order.
    pub messages: Vec<Arc<Message>>,
}

/// The index API: how a durable store drives a `MemoryStore` that mirrors what it has
/// committed (appends with offsets and times already assigned, deletes with their
/// generation), and reads it back for a checkpoint.
impl MemoryStore {
    fn epoch_of(&self, generation: u64) -> Epoch {
        if generation == 0 {
            self.inner.fresh_epoch.clone()
        } else {
            Arc::from(format!("{}-{generation}", self.inner.boot))
        }
    }

    /// Adds committed messages at offsets `first..` with their timestamps, in epoch
    /// `generation`. Offsets before `first` that the index lacks were trimmed.
    pub fn restore_append(
        &self,
        topic: &TopicName,
        generation: u64,
        first: u64,
        entries: Vec<(u64, NewMessage)>,
    ) -> Appended {
        let now = self.inner.clock.now_ms();
        let mut shard = self.inner.shard(topic);
        let log = shard.entry(topic.clone()).or_insert_with(|| Log::new(self.epoch_of(generation), generation));
        if log.generation != generation {
            *log = Log::new(self.epoch_of(generation), generation);
        }
        if first > log.next {
            log.clear();
            log.next = first;
        }
        // A checkpoint records a topic's head before its messages, so `next` may already
        // be past them: what decides whether an entry is new is the newest offset held.
        let mut newest = log.newest().unwrap_or(0);
        let mut messages = Vec::with_capacity(entries.len());
        for (ts, new) in entries {
            let offset = first + messages.len() as u64;
            let msg = Arc::new(Message::new(topic.clone(), offset, ts, new));
            if offset > newest {
                if offset != newest + 1 {
                    // Offsets between were trimmed: the log restarts here, consecutive.
                    log.clear();
                }
                newest = offset;
                log.next = log.next.max(offset + 1);
                log.last_ts = log.last_ts.max(ts);
                log.push(&msg);
            }
            messages.push(msg);
        }
        log.trim(now, &self.inner.retention);
        Appended { epoch: log.epoch.clone(), messages }
    }

    /// Starts epoch `generation` for `topic`: its history is gone, offsets restart at 1.
    pub fn restore_delete(&self, topic: &TopicName, generation: u64) -> Epoch {
        self.inner.epochs.fetch_max(generation, Ordering::Relaxed);
        let epoch = self.epoch_of(generation);
        self.inner.shard(topic).insert(topic.clone(), Log::new(epoch.clone(), generation));
        epoch
    }

    /// Sets a topic's head as a checkpoint recorded it (its messages follow separately).
    pub fn restore_head(&self, topic: &TopicName, generation: u64, next: u64, last_ts: u64) {
        self.inner.epochs.fetch_max(generation, Ordering::Relaxed);
        let mut log = Log::new(self.epoch_of(generation), generation);
        log.next = next;
        log.last_ts = last_ts;
        self.inner.shard(topic).insert(topic.clone(), log);
    }

    /// The highest generation given out so far.
    pub fn generation(&self) -> u64 {
        self.inner.epochs.load(Ordering::Relaxed)
    }

    /// The generation, next offset and newest timestamp of a topic.
    pub fn assignment(&self, topic: &TopicName) -> (u64, u64, u64) {
        let shard = self.inner.shard(topic);
        shard.get(topic).map_or((0, 1, 0), |log| (log.generation, log.next, log.last_ts))
    }

    /// Every topic's head and retained messages, for a checkpoint.
    pub fn snapshot(&self) -> Vec<TopicSnapshot> {
        let now = self.inner.clock.now_ms();
        let mut out = Vec::new();
        for shard in self.inner.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (topic, log) in shard.iter_mut() {
                log.trim(now, &self.inner.retention);
                out.push(TopicSnapshot {
                    topic: topic.clone(),
                    generation: log.generation,
                    next: log.next,
                    last_ts: log.last_ts,
                    messages: log.entries_from(0).map(|(offset, e)| e.message(topic, offset)).collect(),
                });
            }
        }
        out
    }
}

impl Inner {
    fn shard(&self, topic: &TopicName) -> MutexGuard<'_, HashMap<TopicName, Log>> {
        let i = self.hasher.hash_one(topic) as usize % self.shards.len();
        // A poisoned shard only means another thread panicked mid-update of plain data
        // whose invariants hold between statements; keep serving.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn ready<T: Send + 'static>(value: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(value))
}

impl Store for MemoryStore {
    fn append(&self, topic: &TopicName, batch: Vec<NewMessage>) -> StoreFuture<Appended> {
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        let mut shard = inner.shard(topic);
        let log = shard.entry(topic.clone()).or_insert_with(|| Log::new(inner.fresh_epoch.clone(), 0));
        let mut messages = Vec::with_capacity(batch.len());
        for new in batch {
            let ts = now.max(log.last_ts);
            let msg = Arc::new(Message::new(topic.clone(), log.next, ts, new));
            log.next += 1;
            log.last_ts = ts;
            log.push(&msg);
            messages.push(msg);
        }
        log.trim(now, &inner.retention);
        ready(Ok(Appended { epoch: log.epoch.clone(), messages }))
    }

    fn read(&self, topic: &TopicName, from: u64, until: u64, limit: usize) -> StoreFuture<History> {
        let now = self.inner.clock.now_ms();
        let mut shard = self.inner.shard(topic);
        let Some(log) = shard.get_mut(topic) else {
            return ready(Ok(History { epoch: self.inner.fresh_epoch.clone(), messages: Vec::new() }));
        };
        log.trim(now, &self.inner.retention);
        // A message is built only for what is returned, not for what is skipped.
        let out = log
            .entries_from(from)
            .take_while(|(offset, _)| *offset <= until)
            .filter(|(_, e)| !e.is_expired(now))
            .take(limit)
            .map(|(offset, e)| e.message(topic, offset))
            .collect();
        ready(Ok(History { epoch: log.epoch.clone(), messages: out }))
    }

    fn head(&self, topic: &TopicName) -> StoreFuture<TopicHead> {
        let now = self.inner.clock.now_ms();
        let mut shard = self.inner.shard(topic);
        ready(Ok(match shard.get_mut(topic) {
            Some(log) => {
                log.trim(now, &self.inner.retention);
                log.head()
            }
            None => Log::new(self.inner.fresh_epoch.clone(), 0).head(),
        }))
    }

    fn delete(&self, topic: &TopicName) -> StoreFuture<Epoch> {
        let n = self.inner.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        ready(Ok(self.restore_delete(topic, n)))
    }

    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> StoreFuture<Vec<ListedTopic>> {
        let now = self.inner.clock.now_ms();
        let mut out = Vec::new();
        for shard in self.inner.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (name, log) in shard.iter_mut() {
                let s = name.as_str();
                if !s.starts_with(prefix) || after.is_some_and(|a| s <= a) {
                    continue;
                }
                log.trim(now, &self.inner.retention);
                if let Some(last) = log.newest() {
                    out.push(ListedTopic { topic: name.clone(), last });
                }
            }
        }
        out.sort_unstable_by(|a, b| a.topic.cmp(&b.topic));
        out.truncate(limit);
        ready(Ok(out))
    }

    /// Queue messages live in the queue engine itself; there is nothing more to keep.
    fn queue_append(&self, _queue: &QueueName, _records: Vec<QueueRecord>) -> StoreFuture<()> {
        ready(Ok(()))
    }

    fn queue_remove(&self, _queue: &QueueName, _ids: Vec<u64>) {}

    fn sweep(&self) {
        let now = self.inner.clock.now_ms();
        for shard in self.inner.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for log in shard.values_mut() {
                log.trim(now, &self.inner.retention);
            }
        }
    }

    fn is_ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ManualClock;
    use std::time::Duration;

    fn msg(s: &str) -> NewMessage {
        NewMessage::new(Kind::Text, s.to_owned())
    }

    async fn append(store: &MemoryStore, t: &TopicName, s: &str) -> Arc<Message> {
        let mut a = store.append(t, vec![msg(s)]).await.expect("append");
        a.messages.remove(0)
    }

    #[tokio::test]
    async fn offsets_start_at_one_and_count_up() -> Result<(), StoreError> {
        let store = MemoryStore::new(RetentionConfig::default());
        let t = TopicName::parse("a").expect("name");
        assert_eq!(store.head(&t).await?.next, 1);
        let batch = store.append(&t, vec![msg("x"), msg("y")]).await?;
        assert_eq!(batch.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(append(&store, &t, "z").await.offset, 3);
        let head = store.head(&t).await?;
        assert_eq!((head.first, head.last, head.next, head.retained), (1, 3, 4, 3));
        Ok(())
    }

    #[tokio::test]
    async fn retention_by_count_and_age_and_ttl() -> Result<(), StoreError> {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let retention = RetentionConfig { max_messages: 3, max_age: Duration::from_secs(10), max_bytes: 0 };
        let store = MemoryStore::with_clock(retention, clock.clone());
        let t = TopicName::parse("a").expect("name");
        for i in 0..5 {
            append(&store, &t, &i.to_string()).await;
        }
        assert_eq!(store.head(&t).await?.first, 3);
        let mut ttl = msg("short");
        ttl.ttl_ms = Some(100);
        store.append(&t, vec![ttl]).await?; // offset 6; trims 3
        assert_eq!(store.read(&t, 0, u64::MAX, 10).await?.messages.len(), 3);
        clock.advance(100);
        let offsets: Vec<u64> = store.read(&t, 0, u64::MAX, 10).await?.messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, [4, 5], "expired message skipped");
        clock.advance(10_000);
        let head = store.head(&t).await?;
        assert_eq!((head.retained, head.next), (0, 7), "aged out, offsets kept");
        Ok(())
    }

    #[tokio::test]
    async fn delete_changes_epoch_and_restarts_offsets() -> Result<(), StoreError> {
        let store = MemoryStore::new(RetentionConfig::default());
        let t = TopicName::parse("a").expect("name");
        let fresh = store.head(&t).await?.epoch;
        let first = store.append(&t, vec![msg("x")]).await?;
        assert_eq!(first.epoch, fresh, "a fresh topic reports its first message's epoch");
        let epoch = store.delete(&t).await?;
        assert_ne!(epoch, fresh);
        let again = store.append(&t, vec![msg("y")]).await?;
        assert_eq!((again.epoch.clone(), again.messages[0].offset), (epoch, 1));
        Ok(())
    }

    #[tokio::test]
    async fn read_ranges_and_list() -> Result<(), StoreError> {
        let store = MemoryStore::new(RetentionConfig::default());
        let a = TopicName::parse("x.a").expect("name");
        let b = TopicName::parse("x.b").expect("name");
        for i in 0..10 {
            append(&store, &a, &i.to_string()).await;
        }
        append(&store, &b, "b").await;
        let got: Vec<u64> = store.read(&a, 4, 7, 100).await?.messages.iter().map(|m| m.offset).collect();
        assert_eq!(got, [4, 5, 6, 7]);
        let got: Vec<u64> = store.read(&a, 4, 100, 2).await?.messages.iter().map(|m| m.offset).collect();
        assert_eq!(got, [4, 5]);
        let listed = store.list("x.", Some("x.a"), 10).await?;
        assert_eq!(listed, vec![ListedTopic { topic: b, last: 1 }]);
        Ok(())
    }

    /// A buffer that counts the owners alive.
    struct Buffer(Vec<u8>, #[allow(dead_code, reason = "held for its count")] Arc<()>);

    impl AsRef<[u8]> for Buffer {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    #[tokio::test]
    async fn a_retained_payload_does_not_keep_the_buffer_it_was_sliced_from() -> Result<(), StoreError> {
        let store = MemoryStore::new(RetentionConfig::default());
        let t = TopicName::parse("a").expect("name");
        let alive = Arc::new(());
        // A 64 KiB read buffer (a WebSocket frame, a gRPC batch) holding a 5-byte payload.
        let buffer = Bytes::from_owner(Buffer(vec![b'x'; 64 * 1024], alive.clone()));
        let appended = store.append(&t, vec![NewMessage::new(Kind::Text, buffer.slice(100..105))]).await?;
        drop((buffer, appended));
        assert_eq!(Arc::strong_count(&alive), 1, "the buffer is freed once fan-out is done");
        let read = store.read(&t, 1, 1, 1).await?;
        assert_eq!(read.messages[0].payload, "xxxxx");
        assert_eq!((read.messages[0].offset, &read.messages[0].topic), (1, &t));
        Ok(())
    }

    #[tokio::test]
    async fn retention_by_bytes_trims_the_oldest_and_keeps_the_newest() -> Result<(), StoreError> {
        let retention = RetentionConfig { max_bytes: 10, ..RetentionConfig::default() };
        let store = MemoryStore::new(retention);
        let t = TopicName::parse("a").expect("name");
        append(&store, &t, "aaaa").await;
        append(&store, &t, "bbbb").await;
        assert_eq!(store.head(&t).await?.retained, 2, "8 bytes fit in 10");
        append(&store, &t, "cccc").await;
        let head = store.head(&t).await?;
        assert_eq!((head.first, head.retained), (2, 2), "12 bytes: the oldest goes");
        append(&store, &t, &"d".repeat(25)).await;
        let head = store.head(&t).await?;
        assert_eq!((head.first, head.last, head.retained), (4, 4, 1), "alone over the limit, the newest stays");
        append(&store, &t, "ee").await;
        let read = store.read(&t, 0, u64::MAX, 10).await?;
        let offsets: Vec<u64> = read.messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, [5], "27 bytes: the big one goes once it is not the newest");
        Ok(())
    }
}
