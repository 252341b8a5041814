//! `DiskStore`: Herald's embedded durable store. Every change (topic appends and
//! deletes, queue enqueues and removals) is a checksummed record in a write-ahead log of
//! numbered segment files; one writer thread batches concurrent requests into one write
//! and one fsync (group commit) and completes each request only after the commit that
//! holds it.
//!
//! Topic history is cold: the log is where retained messages live. The index (`index.rs`)
//! keeps each topic's head, where its messages lie in the log (positions of sealed
//! segments in sidecar files, `sidecar.rs`) and a bounded cache of the newest messages;
//! reads of older history go to the log on a blocking thread. Queues are mirrored in
//! memory. A checkpoint writes every topic's head and every queue's state into a segment
//! of its own; a segment older than the newest checkpoint is deleted once no retained
//! message is in it. So memory is bounded by the cache, disk by retention, and a start-up
//! reads the sidecars' run tables, the checkpoint and the segments after it.
//!
//! Recovery replays the log from the newest complete checkpoint. A torn record at the
//! very end (a crash mid-write) is cut; damage anywhere else stops the start with the
//! file and byte offset, unless `repair` is set. A failed write or fsync poisons the
//! store: it answers every later write with `Unavailable` and acknowledges nothing more.

mod index;
mod record;
mod sidecar;
mod wal;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use herald_core::metrics;
use herald_core::{
    Appended, Clock, Epoch, History, ListedTopic, LiveQueue, NewMessage, QueueName, QueueRecord, QueueSnapshot,
    RetentionConfig, Store, StoreError, StoreFuture, SystemClock, TopicHead, TopicName,
};
use prometheus::{Histogram, Registry};
use tokio::sync::oneshot;

use index::{HeadSnapshot, Index, Part, Step, Written};
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
    /// Topic retention.
    pub retention: RetentionConfig,
    /// Bytes of recent messages kept in memory to answer reads without the disk
    /// (default 128 MiB; each message counts 64 bytes beside its payload).
    pub cache_bytes: u64,
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
            cache_bytes: 128 << 20,
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
    index: Index,
    dir: PathBuf,
    /// Position blocks of sidecars read lately (cold reads).
    blocks: sidecar::BlockCache,
    queues: Mutex<HashMap<QueueName, LiveQueue>>,
    poisoned: AtomicBool,
    /// Tests hold a checkpoint open here: it waits for a message (or gives up when the
    /// sender is dropped, leaving an incomplete checkpoint as a crash would).
    #[cfg(test)]
    checkpoint_gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// Records the last recovery replayed.
    #[cfg(test)]
    replayed: std::sync::atomic::AtomicU64,
    /// Set when the store is to close as a crash would: no checkpoint at the stop.
    no_stop_checkpoint: AtomicBool,
    /// Group-commit histograms, exported through the broker's registry.
    commits: CommitMetrics,
}

/// What each group commit of the writer thread took and carried.
pub(crate) struct CommitMetrics {
    /// From the batch taken to every write of it on disk (and fsynced when the policy
    /// says so).
    pub(crate) seconds: Histogram,
    /// Store writes (appends, queue changes) per commit.
    pub(crate) writes: Histogram,
}

impl CommitMetrics {
    fn new() -> Self {
        Self {
            seconds: metrics::new_histogram(
                "store_commit_seconds",
                "Disk store group commits: write and fsync of one batch.",
                &metrics::LATENCY_BUCKETS,
                None,
            ),
            writes: metrics::new_histogram(
                "store_commit_writes",
                "Disk store group commits: store writes (appends, queue changes) per batch.",
                &metrics::BATCH_BUCKETS,
                None,
            ),
        }
    }
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
    /// Applies one committed change, written in segment `seg` from byte `pos`, to the
    /// index and the queues. An append's stored messages are built when `build` (the
    /// writer answers with them; a replay does not).
    pub(crate) fn apply(&self, apply: Apply, seg: u64, pos: u64, build: bool) -> Applied {
        match apply {
            Apply::Topic { topic, generation, first, entries, parts } => {
                let mut at = pos;
                let parts: Vec<Part> = parts
                    .iter()
                    .map(|&(len, count)| {
                        let part = Part { pos: at, len, count };
                        at += u64::from(len);
                        part
                    })
                    .collect();
                let at = Written { seg, parts: &parts };
                Applied::Appended(self.index.append(&topic, generation, first, entries, at, build))
            }
            Apply::Delete { topic, generation } => Applied::Deleted(self.index.delete(&topic, generation)),
            Apply::Head { topic, generation, first, next, last_ts } => {
                self.index.restore_head(HeadSnapshot { topic, generation, first, next, last_ts });
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

    /// The state as of the last applied commit, for a checkpoint: topic heads and queues.
    pub(crate) fn checkpoint_state(&self) -> CheckpointState {
        CheckpointState { heads: self.index.heads(), queues: self.queue_snapshots() }
    }

    /// Every queue's live records, next id and attempt counts.
    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        lock(&self.queues).iter().map(|(queue, q)| q.snapshot(queue)).collect()
    }
}

/// What a checkpoint writes: every topic's head (its messages stay where they are in
/// the log), every queue's head, records and attempt counts.
pub(crate) struct CheckpointState {
    heads: Vec<HeadSnapshot>,
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
        Record::CheckpointBegin { heads_only: true }.encode(&mut buf);
        for h in &self.heads {
            let head = Record::TopicHead {
                topic: h.topic.clone(),
                generation: h.generation,
                first: h.first,
                next: h.next,
                last_ts: h.last_ts,
            };
            head.encode(&mut buf);
            drain(&mut buf, out, false)?;
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

impl DiskStore {
    /// Opens (or creates) the store in `config.dir`, recovering what it holds.
    pub fn open(config: DiskConfig) -> Result<Self, OpenError> {
        Self::open_with_clock(config, Arc::new(SystemClock))
    }

    /// [`DiskStore::open`] with an injected clock.
    pub fn open_with_clock(config: DiskConfig, clock: Arc<dyn Clock>) -> Result<Self, OpenError> {
        let (identity, dir_lock) = wal::prepare_dir(&config.dir, config.repair)?;
        let index = Index::new(config.retention, clock.clone(), identity, config.cache_bytes);
        let shared = Arc::new(Shared {
            index,
            dir: config.dir.clone(),
            blocks: sidecar::BlockCache::default(),
            queues: Mutex::new(HashMap::new()),
            poisoned: AtomicBool::new(false),
            #[cfg(test)]
            checkpoint_gate: Mutex::new(None),
            #[cfg(test)]
            replayed: std::sync::atomic::AtomicU64::new(0),
            no_stop_checkpoint: AtomicBool::new(false),
            commits: CommitMetrics::new(),
        });
        let writer = wal::Writer::recover(&config, shared.clone(), dir_lock)?;
        let assign = Assign { topics: HashMap::new(), generation: shared.index.generation() };
        Ok(Self { shared, assign: Mutex::new(assign), writer, clock })
    }

    /// Makes the store close as a crash leaves it, without the checkpoint a clean stop
    /// writes at the end of the log: for tests that then damage the log's tail.
    #[doc(hidden)]
    pub fn close_as_crash(&self) {
        self.shared.no_stop_checkpoint.store(true, Ordering::Relaxed);
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

/// A read that reached history no longer cached: run by run from the log, then from the
/// cache if the read gets there, up to `limit` messages.
fn read_cold(
    shared: &Shared,
    topic: &TopicName,
    generation: u64,
    mut step: Step,
    until: u64,
    limit: usize,
) -> Result<Vec<Arc<herald_core::Message>>, StoreError> {
    let index = &shared.index;
    let reader = sidecar::ColdRead {
        dir: &shared.dir,
        blocks: &shared.blocks,
        topic,
        generation,
        now: index.now(),
        max_age_ms: index.retention.max_age.as_millis() as u64,
    };
    let mut out = Vec::new();
    loop {
        match step {
            Step::Done => break,
            Step::Hot(messages) => {
                out.extend(messages);
                break;
            }
            Step::Cold { seg, locs, from, end } => {
                reader.run(seg, locs, from, end, limit, &mut out)?;
                if out.len() >= limit || end > until {
                    break;
                }
                step = index.step(topic, generation, end, until, limit - out.len());
            }
        }
    }
    Ok(out)
}

async fn completed(rx: oneshot::Receiver<Result<Applied, StoreError>>) -> Result<Applied, StoreError> {
    rx.await.map_err(|_| StoreError::Closed)?
}

fn ready<T: Send + 'static>(value: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(value))
}

impl Store for DiskStore {
    fn register_metrics(&self, registry: &Registry) {
        metrics::register(registry, &self.shared.commits.seconds);
        metrics::register(registry, &self.shared.commits.writes);
    }

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
            let parts = record::encode_topic_appends(topic, generation, next, &entries, usize::MAX, &mut bytes);
            self.send(bytes, Apply::Topic { topic: topic.clone(), generation, first: next, entries, parts })
        };
        Box::pin(async move {
            match completed(rx).await? {
                Applied::Appended(a) => Ok(a),
                _ => Err(StoreError::Closed),
            }
        })
    }

    fn read(&self, topic: &TopicName, from: u64, until: u64, limit: usize) -> StoreFuture<History> {
        let (epoch, generation, step) = self.shared.index.begin(topic, from, until, limit);
        let cold @ Step::Cold { .. } = step else {
            // Cached (or nothing): answered at once.
            let messages = match step {
                Step::Hot(messages) => messages,
                _ => Vec::new(),
            };
            return ready(Ok(History { epoch, messages }));
        };
        let shared = self.shared.clone();
        let topic = topic.clone();
        let read = move || read_cold(&shared, &topic, generation, cold, until, limit);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let task = runtime.spawn_blocking(read);
                Box::pin(async move {
                    let messages = task.await.map_err(|e| StoreError::Unavailable(format!("cold read: {e}")))??;
                    Ok(History { epoch, messages })
                })
            }
            Err(_) => ready(read().map(|messages| History { epoch, messages })),
        }
    }

    fn head(&self, topic: &TopicName) -> StoreFuture<TopicHead> {
        // Heads are in memory: ready at once.
        ready(Ok(self.shared.index.head(topic)))
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
        ready(Ok(self.shared.index.list(prefix, after, limit)))
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
