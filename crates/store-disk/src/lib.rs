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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use herald_core::{
    Appended, Clock, Epoch, History, ListedTopic, LiveQueue, MemoryStore, Message, NewMessage, QueueName, QueueRecord,
    QueueSnapshot, RetentionConfig, Store, StoreError, StoreFuture, SystemClock, TopicHead, TopicName, TopicSnapshot,
};
use tokio::sync::oneshot;

pub use record::{DecodeError, Record, MAX_MESSAGE_BYTES};
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
    /// `store.id` (the prefix of every epoch) exists but cannot be read back.
    #[error(
        "{path}: {reason}; it names every epoch of this store: restore it from a backup, or start with repair to make a new one (every epoch then changes)"
    )]
    Identity {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
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

/// State the writer thread applies commits to, shared with readers.
pub(crate) struct Shared {
    index: MemoryStore,
    queues: Mutex<HashMap<QueueName, LiveQueue>>,
    poisoned: AtomicBool,
    /// Tests hold a checkpoint open here: it waits for a message (or gives up when the
    /// sender is dropped, leaving an incomplete checkpoint as a crash would).
    #[cfg(test)]
    checkpoint_gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
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

/// A message no record can hold; the server's limits keep clients below it.
fn too_large(size: usize) -> StoreError {
    StoreError::Unavailable(format!(
        "a message of {size} bytes is over the disk store's limit of {MAX_MESSAGE_BYTES} bytes"
    ))
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
                lock(&self.queues).entry(queue).or_default().enqueued(records);
                Applied::Done
            }
            Apply::Remove { queue, ids } => {
                if let Some(q) = lock(&self.queues).get_mut(&queue) {
                    q.removed(ids);
                }
                Applied::Done
            }
            Apply::Attempts { queue, attempts } => {
                if let Some(q) = lock(&self.queues).get_mut(&queue) {
                    q.delivered(attempts);
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

    /// The live state as of the last applied commit, for a checkpoint: shared pointers
    /// to messages and payloads, nothing copied.
    pub(crate) fn checkpoint_state(&self) -> CheckpointState {
        CheckpointState { topics: self.index.snapshot(), queues: self.queue_snapshots() }
    }

    /// Every queue's live records, next id and attempt counts.
    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        lock(&self.queues).iter().map(|(queue, q)| q.snapshot(queue)).collect()
    }
}

/// What a checkpoint writes: every topic's head and retained messages, every queue's
/// head, records and attempt counts.
pub(crate) struct CheckpointState {
    topics: Vec<TopicSnapshot>,
    queues: Vec<QueueSnapshot>,
}

impl CheckpointState {
    /// Messages per checkpoint record at most (records are also split by bytes).
    const RECORD_MESSAGES: usize = 1024;

    /// Writes `CheckpointBegin` and the state's records to `out`, a few at a time: the
    /// memory used does not grow with the data. Returns the bytes written.
    pub(crate) fn write_body(&self, out: &mut impl std::io::Write) -> std::io::Result<u64> {
        let mut buf = Vec::new();
        let mut written = 0u64;
        let mut drain = |buf: &mut Vec<u8>, out: &mut dyn std::io::Write, force: bool| {
            if force || buf.len() >= 1 << 20 {
                out.write_all(buf)?;
                written += buf.len() as u64;
                buf.clear();
            }
            Ok::<_, std::io::Error>(())
        };
        Record::CheckpointBegin.encode(&mut buf);
        for t in &self.topics {
            let head = Record::TopicHead {
                topic: t.topic.clone(),
                generation: t.generation,
                next: t.next,
                last_ts: t.last_ts,
            };
            head.encode(&mut buf);
            for run in t.messages.chunk_by(|a, b| a.offset + 1 == b.offset) {
                for part in run.chunks(Self::RECORD_MESSAGES) {
                    let entries: Vec<(u64, NewMessage)> = part.iter().map(|m| (m.ts, to_new(m))).collect();
                    let (topic, generation) = (&t.topic, t.generation);
                    record::encode_topic_appends(topic, generation, part[0].offset, &entries, usize::MAX, &mut buf);
                    drain(&mut buf, out, false)?;
                }
            }
        }
        for q in &self.queues {
            Record::QueueHead { queue: q.queue.clone(), next_id: q.next_id }.encode(&mut buf);
            for part in record::split_entries(&q.records, record::queue_record_bytes, Self::RECORD_MESSAGES) {
                Record::QueueEnqueue { queue: q.queue.clone(), records: part.to_vec() }.encode(&mut buf);
                drain(&mut buf, out, false)?;
            }
            let attempts: Vec<(u64, u32)> = q.attempts.iter().map(|(&id, &n)| (id, n)).collect();
            for part in attempts.chunks(4096) {
                Record::QueueAttempts { queue: q.queue.clone(), attempts: part.to_vec() }.encode(&mut buf);
            }
            drain(&mut buf, out, false)?;
        }
        drain(&mut buf, out, true)?;
        Ok(written)
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
        let (identity, dir_lock) = wal::prepare_dir(&config.dir, config.repair)?;
        let index = MemoryStore::with_identity(config.retention, clock.clone(), identity);
        let shared = Arc::new(Shared {
            index,
            queues: Mutex::new(HashMap::new()),
            poisoned: AtomicBool::new(false),
            #[cfg(test)]
            checkpoint_gate: Mutex::new(None),
        });
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
        if let Some(big) = batch.iter().find(|m| m.payload.len() > MAX_MESSAGE_BYTES) {
            return ready(Err(too_large(big.payload.len())));
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
            // A large batch becomes several records, each readable; a crash can keep a
            // prefix of an unacknowledged batch, never part of an acknowledged one.
            let mut bytes = Vec::new();
            record::encode_topic_appends(topic, generation, next, &entries, usize::MAX, &mut bytes);
            self.send(bytes, Apply::Topic { topic: topic.clone(), generation, first: next, entries })
        };
        Box::pin(async move {
            match completed(rx).await? {
                Applied::Appended(a) => Ok(a),
                _ => Err(StoreError::Closed),
            }
        })
    }

    fn read(&self, topic: &TopicName, from: u64, until: u64, limit: usize) -> StoreFuture<History> {
        self.shared.index.read(topic, from, until, limit)
    }

    fn head(&self, topic: &TopicName) -> StoreFuture<TopicHead> {
        // The index is a memory store: its head is ready at once.
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

    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> StoreFuture<Vec<ListedTopic>> {
        self.shared.index.list(prefix, after, limit)
    }

    fn queue_append(&self, queue: &QueueName, records: Vec<QueueRecord>) -> StoreFuture<()> {
        if let Err(e) = self.check() {
            return ready(Err(e));
        }
        if let Some(big) = records.iter().find(|r| r.payload.len() > MAX_MESSAGE_BYTES) {
            return ready(Err(too_large(big.payload.len())));
        }
        let mut bytes = Vec::new();
        for part in record::split_entries(&records, record::queue_record_bytes, usize::MAX) {
            Record::QueueEnqueue { queue: queue.clone(), records: part.to_vec() }.encode(&mut bytes);
        }
        let queue = queue.clone();
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
        self.shared.queue_snapshots()
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
