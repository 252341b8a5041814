//! The `Store` trait: where topic histories live, and what every backend guarantees.
//!
//! The broker calls a store; a store never calls the broker. The trait is shaped for
//! batches and for durability that completes later: `append` takes many messages and
//! returns a future that resolves only once they are as durable as the backend promises
//! (immediately for memory, at the group commit's fsync for disk, at the batched insert's
//! commit for PostgreSQL). Likewise `head` returns a future: memory and disk keep heads
//! in memory and resolve at once, a networked store (Redis, PostgreSQL) may answer later.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::message::{Kind, Message, NewMessage};
use crate::name::{QueueName, TopicName};

/// A boxed, `'static` future returned by store operations.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// A topic's history identity: changes whenever its offsets start again.
pub type Epoch = Arc<str>;

/// What went wrong in a store; every variant reaches clients as `unavailable`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot take writes now (disk full, read-only, poisoned after a failed fsync).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The broker is shutting down.
    #[error("store is closed")]
    Closed,
}

/// The state of one topic's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicHead {
    /// The current epoch (also for a topic never published: the epoch its first message will have).
    pub epoch: Epoch,
    /// Offset of the oldest retained message, 0 when none is retained.
    pub first: u64,
    /// Offset of the newest retained message, 0 when none is retained.
    pub last: u64,
    /// The offset the next appended message will get (1 for a topic never published).
    pub next: u64,
    /// How many messages are retained.
    pub retained: u64,
}

/// The result of an append: the stored messages with their offsets, in order.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The epoch the offsets belong to.
    pub epoch: Epoch,
    /// The stored messages, consecutive offsets, in the order given.
    pub messages: Vec<Arc<Message>>,
}

/// Messages read from a topic's history, with the epoch they belong to (read in the
/// same step, so a concurrent delete can never label old messages with a new epoch).
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The epoch of `messages`.
    pub epoch: Epoch,
    /// The messages, in offset order.
    pub messages: Vec<Arc<Message>>,
}

/// A topic and its newest offset, as listed by [`Store::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedTopic {
    /// The topic.
    pub topic: TopicName,
    /// Offset of its newest retained message.
    pub last: u64,
}

/// A queue message as a store persists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRecord {
    /// The message id within its queue.
    pub id: u64,
    /// The payload kind.
    pub kind: Kind,
    /// The payload.
    pub payload: Bytes,
    /// Enqueue time (dead-letter time in a dead-letter queue), ms since the Unix epoch.
    pub ts: u64,
    /// When it becomes ready (after `delay_ms`).
    pub ready_at: u64,
    /// When its TTL passes, if it has one.
    pub expires_at: Option<u64>,
}

/// A queue's messages as a durable store recovered them at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// The queue.
    pub queue: QueueName,
    /// The next message id (above every id ever given out in this queue).
    pub next_id: u64,
    /// The messages not yet removed, by id.
    pub records: Vec<QueueRecord>,
    /// Deliveries counted so far, by message id (absent: none).
    pub attempts: BTreeMap<u64, u32>,
}

/// A queue's live records as a durable store mirrors them in memory (to answer
/// [`Store::queue_load`] and to checkpoint): the same bookkeeping for every backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveQueue {
    /// The next message id (above every id ever stored in this queue).
    pub next_id: u64,
    /// The messages not yet removed, by id.
    pub records: BTreeMap<u64, QueueRecord>,
    /// Deliveries so far of records in `records` that had any.
    pub attempts: BTreeMap<u64, u32>,
}

impl LiveQueue {
    /// Records stored.
    pub fn enqueued(&mut self, records: impl IntoIterator<Item = QueueRecord>) {
        for r in records {
            self.next_id = self.next_id.max(r.id + 1);
            self.records.insert(r.id, r);
        }
    }

    /// Records removed (acked, expired, dead-lettered), with their attempt counts.
    pub fn removed(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            self.records.remove(&id);
            self.attempts.remove(&id);
        }
    }

    /// Attempt counts, kept only for live records (a removal may have come first).
    pub fn delivered(&mut self, attempts: impl IntoIterator<Item = (u64, u32)>) {
        for (id, n) in attempts {
            if self.records.contains_key(&id) {
                self.attempts.insert(id, n);
            }
        }
    }

    /// The queue as [`Store::queue_load`] hands it to the engine.
    pub fn snapshot(&self, queue: &QueueName) -> QueueSnapshot {
        QueueSnapshot {
            queue: queue.clone(),
            next_id: self.next_id,
            records: self.records.values().cloned().collect(),
            attempts: self.attempts.clone(),
        }
    }
}

/// A backend for topic histories and queue messages.
///
/// Guarantees every implementation must keep (the conformance tests check them):
/// - Per topic, `append` assigns consecutive offsets starting at `head().next`, and
///   timestamps that never decrease; the batch is assigned atomically (no interleaving).
/// - Offsets are never reused within an epoch; a new epoch starts at 1.
/// - `head` and `read` give one consistent view: once an append's offsets are visible in
///   `head().next`, `read` returns those messages (unless trimmed or expired).
/// - `head` is linearizable with `append`: a head requested (`head` called) after an
///   append's future resolved counts that append in `next`, however late the head's own
///   future resolves (the broker's subscribe watermark relies on it).
/// - The future from `append` resolves only when the batch is durable as promised.
/// - `read` skips messages trimmed by retention or whose TTL passed, and names the epoch
///   of what it returns.
pub trait Store: Send + Sync + 'static {
    /// Appends `batch` to `topic`; resolves with the stored messages once durable.
    fn append(&self, topic: &TopicName, batch: Vec<NewMessage>) -> StoreFuture<Appended>;

    /// Up to `limit` live messages with offset >= `from` (0 means the first retained) and
    /// <= `until`, in offset order, with the epoch they belong to.
    fn read(&self, topic: &TopicName, from: u64, until: u64, limit: usize) -> StoreFuture<History>;

    /// The topic's current head, as of no earlier than this call. Memory and disk keep it
    /// in memory and return a future that is ready at once (the broker polls it inline
    /// and takes no extra step); a networked backend (Redis, PostgreSQL) may resolve later,
    /// and the broker then subscribes through a slower path that buffers live messages
    /// until the head is known.
    fn head(&self, topic: &TopicName) -> StoreFuture<TopicHead>;

    /// Drops the topic's history and starts a new epoch; resolves with the new epoch.
    fn delete(&self, topic: &TopicName) -> StoreFuture<Epoch>;

    /// Topics with retained messages whose name starts with `prefix` and sorts after
    /// `after`, by name, at most `limit`.
    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> StoreFuture<Vec<ListedTopic>>;

    /// Persists newly enqueued messages; resolves once they are durable (the 201 to the
    /// producer waits for it).
    fn queue_append(&self, queue: &QueueName, records: Vec<QueueRecord>) -> StoreFuture<()>;

    /// Records that messages left a queue (acked, expired, dead-lettered). May be
    /// persisted lazily: a lost removal only means a redelivery after a crash.
    fn queue_remove(&self, queue: &QueueName, ids: Vec<u64>);

    /// Records how many deliveries messages have had, so that `max_attempts` counts
    /// across restarts. May be persisted lazily: a lost record only means a message
    /// gets the attempts it had already used once more. Stores that keep nothing ignore it.
    fn queue_delivered(&self, _queue: &QueueName, _attempts: Vec<(u64, u32)>) {}

    /// Queue messages that survived a restart (none for a store that keeps nothing).
    fn queue_load(&self) -> Vec<QueueSnapshot> {
        Vec::new()
    }

    /// Resolves once everything written so far is durable (shutdown calls it last).
    fn flush(&self) -> StoreFuture<()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Applies retention by age and TTL everywhere, reclaiming space; called periodically.
    fn sweep(&self);

    /// Adds the store's own metrics (commit latency, batch sizes) to the broker's
    /// registry; called once when the broker is built.
    fn register_metrics(&self, _registry: &prometheus::Registry) {}

    /// Whether the store can serve requests (for `/readyz`).
    fn is_ready(&self) -> bool;
}
