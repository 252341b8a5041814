//! `DiskStore`: Herald's embedded durable store. Every change (topic appends and
//! deletes, queue enqueues and removals) is a checksummed record in a write-ahead log of
//! numbered segment files; one writer thread batches concurrent requests into one write
//! and one fsync (group commit) and completes each request only after the commit that
//! holds it. What is committed is mirrored in memory (a [`MemoryStore`] used as the
//! index, and the live queue records), which serves reads. When the log grows well past
//! the live data, a checkpoint rewrites the live state into a fresh segment and deletes
//! the older ones, reclaiming the space of trimmed, expired and acked messages.
//!
//! Recovery replays the log from the newest complete checkpoint. A torn record at the
//! very end (a crash mid-write) is cut; damage anywhere else stops the start with the
//! file and byte offset, unless `repair` is set. A failed write or fsync poisons the
//! store: it answers every later write with `Unavailable` and acknowledges nothing more.

mod record;
mod wal;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use herald_core::{
    Appended, Clock, Epoch, ListedTopic, MemoryStore, Message, NewMessage, QueueName, QueueRecord, QueueSnapshot,
    RetentionConfig, Store, StoreError, StoreFuture, SystemClock, TopicHead, TopicName,
};
use tokio::sync::oneshot;

pub use record::{DecodeError, Record};
use wal::{Applied, Apply, Request};

/// When the writer calls fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before acknowledging each group commit (default): an acknowledged message
    /// survives power loss.
    Always,
    /// At most this long after a write: an acknowledged message survives a process
    /// crash; power loss may lose the last interval.
    Interval(Duration),
    /// Never explicitly: the OS writes back when it likes; survives a process crash only.
    Never,
}

/// Settings of the disk store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Directory holding the log (created if missing).
    pub dir: PathBuf,
    /// fsync policy.
    pub fsync: FsyncPolicy,
    /// A segment file is closed and a new one started past this size (default 64 MiB).
    pub segment_bytes: u64,
    /// Cut damaged data instead of refusing to start (losing what follows the damage).
    pub repair: bool,
    /// Topic retention, applied in memory and at checkpoints.
    pub retention: RetentionConfig,
}

impl DiskConfig {
    /// Defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 << 20,
            repair: false,
            retention: RetentionConfig::default(),
        }
    }
}

/// Why the store could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// An I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another process holds the data directory.
    #[error("{0} is in use by another herald process")]
    Locked(PathBuf),
    /// Damage in the middle of the log.
    #[error(
        "damaged log: {file} at byte {offset}: {reason}; start with repair to cut the log there (losing what follows)"
    )]
    Damaged {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the damaged record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// A queue's live records as committed.
#[derive(Default)]
struct LiveQueue {
    next_id: u64,
    records: BTreeMap<u64, QueueRecord>,
    /// Deliveries so far of records in `records` that had any.
    attempts: BTreeMap<u64, u32>,
}

/// State the writer thread applies commits to, shared with readers.
pub(crate) struct Shared {
    index: MemoryStore,
    queues: Mutex<HashMap<QueueName, LiveQueue>>,
    poisoned: AtomicBool,
}

/// The per-topic assignment of offsets and times, ahead of what is committed.
#[derive(Default)]
struct Assign {
    topics: HashMap<TopicName, (u64, u64, u64)>,
    generation: u64,
}

/// The embedded disk store.
pub struct DiskStore {
    shared: Arc<Shared>,
    assign: Mutex<Assign>,
    writer: wal::Writer,
    clock: Arc<dyn Clock>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unavailable() -> StoreError {
    StoreError::Unavailable("the disk store is read-only after a failed write; see the server log".into())
}

impl Shared {
    /// Applies one committed change to the in-memory mirror.
    pub(crate) fn apply(&self, apply: Apply) -> Applied {
        match apply {
            Apply::Topic { topic, generation, first, entries } => {
                Applied::Appended(self.index.restore_append(&topic, generation, first, entries))
            }
            Apply::Delete { topic, generation } => Applied::Deleted(self.index.restore_delete(&topic, generation)),
            Apply::Head { topic, generation, next, last_ts } => {
                self.index.restore_head(&topic, generation, next, last_ts);
                Applied::Done
            }
            Apply::Enqueue { queue, records } => {
                let mut queues = lock(&self.queues);
                let q = queues.entry(queue).or_default();
                for r in records {
                    q.next_id = q.next_id.max(r.id + 1);
                    q.records.insert(r.id, r);
                }
                Applied::Done
            }
            Apply::Remove { queue, ids } => {
                if let Some(q) = lock(&self.queues).get_mut(&queue) {
                    for id in ids {
                        q.records.remove(&id);
                        q.attempts.remove(&id);
                    }
                }
                Applied::Done
            }
            Apply::Attempts { queue, attempts } => {
                if let Some(q) = lock(&self.queues).get_mut(&queue) {
                    for (id, n) in attempts {
                        // Only for live records: a removal may have been applied first.
                        if q.records.contains_key(&id) {
                            q.attempts.insert(id, n);
                        }
                    }
                }
                Applied::Done
            }
            Apply::QueueHead { queue, next_id } => {
                let mut queues = lock(&self.queues);
                let q = queues.entry(queue).or_default();
                q.next_id = q.next_id.max(next_id);
                Applied::Done
            }
            Apply::Reset => {
                lock(&self.queues).clear();
                Applied::Done
            }
            Apply::Nothing => Applied::Done,
        }
    }

    /// The live state as records, for a checkpoint.
    pub(crate) fn checkpoint_records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        for t in self.index.snapshot() {
            out.push(Record::TopicHead {
                topic: t.topic.clone(),
                generation: t.generation,
                next: t.next,
                last_ts: t.last_ts,
            });
            for chunk in t.messages.chunk_by(|a, b| a.offset + 1 == b.offset) {
                for part in chunk.chunks(1024) {
                    out.push(Record::TopicAppend {
                        topic: t.topic.clone(),
                        generation: t.generation,
                        first: part[0].offset,
                        entries: part.iter().map(|m| (m.ts, to_new(m))).collect(),
                    });
                }
            }
        }
        for (queue, q) in lock(&self.queues).iter() {
            out.push(Record::QueueHead { queue: queue.clone(), next_id: q.next_id });
            let records: Vec<QueueRecord> = q.records.values().cloned().collect();
            for part in records.chunks(1024) {
                out.push(Record::QueueEnqueue { queue: queue.clone(), records: part.to_vec() });
            }
            let attempts: Vec<(u64, u32)> = q.attempts.iter().map(|(&id, &n)| (id, n)).collect();
            for part in attempts.chunks(4096) {
                out.push(Record::QueueAttempts { queue: queue.clone(), attempts: part.to_vec() });
            }
        }
        out
    }
}

fn to_new(m: &Message) -> NewMessage {
    NewMessage { kind: m.kind, payload: m.payload.clone(), ttl_ms: m.expires_at.map(|at| at.saturating_sub(m.ts)) }
}

impl DiskStore {
    /// Opens (or creates) the store in `config.dir`, recovering what it holds.
    pub fn open(config: DiskConfig) -> Result<Self, OpenError> {
        Self::open_with_clock(config, Arc::new(SystemClock))
    }

    /// [`DiskStore::open`] with an injected clock.
    pub fn open_with_clock(config: DiskConfig, clock: Arc<dyn Clock>) -> Result<Self, OpenError> {
        let (identity, dir_lock) = wal::prepare_dir(&config.dir)?;
        let index = MemoryStore::with_identity(config.retention, clock.clone(), identity);
        let shared = Arc::new(Shared { index, queues: Mutex::new(HashMap::new()), poisoned: AtomicBool::new(false) });
        let writer = wal::Writer::recover(&config, shared.clone(), dir_lock)?;
        let assign = Assign { topics: HashMap::new(), generation: shared.index.generation() };
        Ok(Self { shared, assign: Mutex::new(assign), writer, clock })
    }

    fn send(&self, bytes: Vec<u8>, apply: Apply) -> oneshot::Receiver<Result<Applied, StoreError>> {
        let (done, rx) = oneshot::channel();
        self.writer.send(Request::Write { bytes, apply, done: Some(done) });
        rx
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            Err(unavailable())
        } else {
            Ok(())
        }
    }
}

async fn completed(rx: oneshot::Receiver<Result<Applied, StoreError>>) -> Result<Applied, StoreError> {
    rx.await.map_err(|_| StoreError::Closed)?
}

fn ready<T: Send + 'static>(value: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(value))
}

impl Store for DiskStore {
    fn append(&self, topic: &TopicName, batch: Vec<NewMessage>) -> StoreFuture<Appended> {
        if let Err(e) = self.check() {
            return ready(Err(e));
        }
        let now = self.clock.now_ms();
        let rx = {
            // Offsets are assigned and the write queued under one lock, so the log
            // holds each topic's records in offset order.
            let mut assign = lock(&self.assign);
            let (generation, next, last_ts) =
                *assign.topics.entry(topic.clone()).or_insert_with(|| self.shared.index.assignment(topic));
            let ts = now.max(last_ts);
            let n = batch.len() as u64;
            assign.topics.insert(topic.clone(), (generation, next + n, ts));
            let entries: Vec<(u64, NewMessage)> = batch.into_iter().map(|m| (ts, m)).collect();
            let record = Record::TopicAppend { topic: topic.clone(), generation, first: next, entries };
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            let Record::TopicAppend { topic, generation, first, entries } = record else {
                return ready(Err(StoreError::Closed));
            };
            self.send(bytes, Apply::Topic { topic, generation, first, entries })
        };
        Box::pin(async move {
            match completed(rx).await? {
                Applied::Appended(a) => Ok(a),
                _ => Err(StoreError::Closed),
            }
        })
    }

    fn read(
        &self,
        topic: &TopicName,
        from: u64,
        until: u64,
        limit: usize,
    ) -> StoreFuture<Vec<std::sync::Arc<Message>>> {
        self.shared.index.read(topic, from, until, limit)
    }

    fn head(&self, topic: &TopicName) -> Result<TopicHead, StoreError> {
        self.shared.index.head(topic)
    }

    fn delete(&self, topic: &TopicName) -> StoreFuture<Epoch> {
        if let Err(e) = self.check() {
            return ready(Err(e));
        }
        let rx = {
            let mut assign = lock(&self.assign);
            assign.generation += 1;
            let generation = assign.generation;
            assign.topics.insert(topic.clone(), (generation, 1, 0));
            let mut bytes = Vec::new();
            Record::TopicDelete { topic: topic.clone(), generation }.encode(&mut bytes);
            self.send(bytes, Apply::Delete { topic: topic.clone(), generation })
        };
        Box::pin(async move {
            match completed(rx).await? {
                Applied::Deleted(epoch) => Ok(epoch),
                _ => Err(StoreError::Closed),
            }
        })
    }

    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<ListedTopic>, StoreError> {
        self.shared.index.list(prefix, after, limit)
    }

    fn queue_append(&self, queue: &QueueName, records: Vec<QueueRecord>) -> StoreFuture<()> {
        if let Err(e) = self.check() {
            return ready(Err(e));
        }
        let record = Record::QueueEnqueue { queue: queue.clone(), records };
        let mut bytes = Vec::new();
        record.encode(&mut bytes);
        let Record::QueueEnqueue { queue, records } = record else {
            return ready(Err(StoreError::Closed));
        };
        let rx = self.send(bytes, Apply::Enqueue { queue, records });
        Box::pin(async move { completed(rx).await.map(|_| ()) })
    }

    fn queue_remove(&self, queue: &QueueName, ids: Vec<u64>) {
        if self.check().is_err() {
            return;
        }
        let mut bytes = Vec::new();
        Record::QueueRemove { queue: queue.clone(), ids: ids.clone() }.encode(&mut bytes);
        // Lazy: nobody waits for it; a lost removal only means a redelivery after a crash.
        self.writer.send(Request::Write { bytes, apply: Apply::Remove { queue: queue.clone(), ids }, done: None });
    }

    fn queue_load(&self) -> Vec<QueueSnapshot> {
        lock(&self.shared.queues)
            .iter()
            .map(|(queue, q)| QueueSnapshot {
                queue: queue.clone(),
                next_id: q.next_id,
                records: q.records.values().cloned().collect(),
                attempts: q.attempts.clone(),
            })
            .collect()
    }

    fn queue_delivered(&self, queue: &QueueName, attempts: Vec<(u64, u32)>) {
        if self.check().is_err() {
            return;
        }
        let mut bytes = Vec::new();
        let record = Record::QueueAttempts { queue: queue.clone(), attempts };
        record.encode(&mut bytes);
        let Record::QueueAttempts { queue, attempts } = record else { return };
        // Lazy, like removals: a lost count only gives a message its used attempts again.
        self.writer.send(Request::Write { bytes, apply: Apply::Attempts { queue, attempts }, done: None });
    }

    fn sweep(&self) {
        self.shared.index.sweep();
    }

    fn is_ready(&self) -> bool {
        !self.shared.poisoned.load(Ordering::Acquire)
    }

    fn flush(&self) -> StoreFuture<()> {
        let (done, rx) = oneshot::channel();
        self.writer.send(Request::Flush(done));
        Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? })
    }
}

#[cfg(test)]
mod tests;
