//! The write-ahead log on disk: segment files, the writer thread with group commit,
//! checkpoints, and recovery.
//!
//! Files in the data directory: `LOCK` (held with an exclusive file lock while a store
//! is open), `store.id` (the identity in every epoch), and segments `NNNNNNNNNNNNNNNNNNNN.log`.
//! A checkpoint segment starts with `CheckpointBegin` and holds the whole live state up
//! to `CheckpointEnd`; older segments are deleted only after it is fsynced.

use std::fs::{File, OpenOptions};
use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use herald_core::{Appended, Epoch, NewMessage, QueueName, QueueRecord, StoreError, TopicName};
use tokio::sync::oneshot;

use crate::record::{Names, Record};
use crate::{DiskConfig, FsyncPolicy, OpenError, Shared};

/// Largest batch the writer gathers into one write.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// A change to mirror in memory once committed.
pub(crate) enum Apply {
    Topic {
        topic: TopicName,
        generation: u64,
        first: u64,
        entries: Vec<(u64, NewMessage)>,
    },
    Delete {
        topic: TopicName,
        generation: u64,
    },
    Head {
        topic: TopicName,
        generation: u64,
        next: u64,
        last_ts: u64,
    },
    Enqueue {
        queue: QueueName,
        records: Vec<QueueRecord>,
    },
    Remove {
        queue: QueueName,
        ids: Vec<u64>,
    },
    QueueHead {
        queue: QueueName,
        next_id: u64,
    },
    Attempts {
        queue: QueueName,
        attempts: Vec<(u64, u32)>,
    },
    /// A checkpoint begins: queue state is rebuilt from what follows.
    Reset,
    Nothing,
}

/// The result of applying a committed change.
pub(crate) enum Applied {
    Appended(Appended),
    Deleted(Epoch),
    Done,
}

pub(crate) enum Request {
    /// Write `bytes` (one framed record), then apply and answer.
    Write { bytes: Vec<u8>, apply: Apply, done: Option<oneshot::Sender<Result<Applied, StoreError>>> },
    /// fsync what is written, then answer.
    Flush(oneshot::Sender<Result<(), StoreError>>),
}

impl Apply {
    fn from_record(record: Record) -> Self {
        match record {
            Record::TopicAppend { topic, generation, first, entries } => {
                Apply::Topic { topic, generation, first, entries }
            }
            Record::TopicDelete { topic, generation } => Apply::Delete { topic, generation },
            Record::TopicHead { topic, generation, next, last_ts } => Apply::Head { topic, generation, next, last_ts },
            Record::QueueEnqueue { queue, records } => Apply::Enqueue { queue, records },
            Record::QueueRemove { queue, ids } => Apply::Remove { queue, ids },
            Record::QueueHead { queue, next_id } => Apply::QueueHead { queue, next_id },
            Record::QueueAttempts { queue, attempts } => Apply::Attempts { queue, attempts },
            Record::CheckpointBegin => Apply::Reset,
            Record::CheckpointEnd => Apply::Nothing,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io { path: path.to_owned(), source }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.log"))
}

fn segments(dir: &Path) -> Result<Vec<u64>, OpenError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(seq) = name.strip_suffix(".log").and_then(|n| n.parse::<u64>().ok()) {
            out.push(seq);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Creates the directory, takes its lock, and reads (or creates) the store identity.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(String, File), OpenError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(OpenError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
    }
    let id_path = dir.join("store.id");
    let identity = match std::fs::read_to_string(&id_path) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
        _ => {
            let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let id = format!(
                "{:012x}",
                std::collections::hash_map::RandomState::new().hash_one((seed, std::process::id())) & 0xffff_ffff_ffff
            );
            let mut f = File::create(&id_path).map_err(io(&id_path))?;
            f.write_all(id.as_bytes()).and_then(|_| f.sync_all()).map_err(io(&id_path))?;
            sync_dir(dir).map_err(io(dir))?;
            id
        }
    };
    Ok((identity, lock))
}

/// The decoded records of one segment and where valid data ends.
struct Scan {
    valid_len: u64,
    /// Damage found at `valid_len`, if any: (torn tail?, reason).
    damage: Option<(bool, String)>,
}

/// Reads a segment, handing each valid record to `each` in order, up to the end or the
/// first damage.
fn scan(path: &Path, mut each: impl FnMut(Record)) -> Result<Scan, OpenError> {
    // Read what the file's size says: a device (or a file still growing) is not data.
    let mut data = Vec::new();
    File::open(path)
        .and_then(|f| {
            let len = f.metadata()?.len();
            f.take(len).read_to_end(&mut data)
        })
        .map_err(io(path))?;
    let mut names = Names::default();
    let mut pos = 0usize;
    while pos < data.len() {
        match Record::decode_with(&data[pos..], &mut names) {
            Ok((record, len)) => {
                each(record);
                pos += len;
            }
            Err(e) => {
                // A torn write leaves a bad record with nothing valid after it. If any
                // valid record starts later, the damage is in the middle. (A random
                // match needs a plausible length and a matching CRC-32.)
                let valid_after = (pos + 1..data.len()).any(|q| Record::decode(&data[q..]).is_ok());
                let torn = !valid_after;
                return Ok(Scan { valid_len: pos as u64, damage: Some((torn, e.to_string())) });
            }
        }
    }
    Ok(Scan { valid_len: pos as u64, damage: None })
}

/// The handle to the writer thread.
pub(crate) struct Writer {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub(crate) fn send(&self, request: Request) {
        if let Some(tx) = &self.tx {
            // If the thread is gone the request is dropped, and its waiter sees Closed.
            let _ = tx.send(request);
        }
    }

    /// Replays the log into `shared` and starts the writer on its last segment.
    pub(crate) fn recover(config: &DiskConfig, shared: Arc<Shared>, lock: File) -> Result<Self, OpenError> {
        let dir = &config.dir;
        let mut seqs = segments(dir)?;
        // Start from the newest complete checkpoint; drop an incomplete one (a crash
        // during a checkpoint leaves the segments before it intact).
        let mut start = 0;
        while let Some(&seq) = seqs.iter().rev().find(|&&s| s >= start && starts_checkpoint(&segment_path(dir, s))) {
            let path = segment_path(dir, seq);
            let mut complete = false;
            scan(&path, |r| complete |= matches!(r, Record::CheckpointEnd))?;
            if complete {
                start = seq;
                break;
            }
            tracing::warn!(file = %path.display(), "removing an incomplete checkpoint");
            std::fs::remove_file(&path).map_err(io(&path))?;
            seqs.retain(|&s| s != seq);
        }
        for &seq in seqs.iter().filter(|&&s| s < start) {
            let path = segment_path(dir, seq);
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        seqs.retain(|&s| s >= start);

        let mut wal_bytes = 0u64;
        let mut recovered = 0u64;
        let started = Instant::now();
        for (i, &seq) in seqs.iter().enumerate() {
            let path = segment_path(dir, seq);
            let last = i + 1 == seqs.len();
            let mut replay = Replay::default();
            let s = scan(&path, |record| {
                recovered += 1;
                replay.push(&shared, record);
            })?;
            replay.flush(&shared);
            wal_bytes += s.valid_len;
            if let Some((torn, reason)) = s.damage {
                let torn_tail = torn && last;
                if !torn_tail && !config.repair {
                    return Err(OpenError::Damaged { file: path, offset: s.valid_len, reason });
                }
                tracing::warn!(file = %path.display(), offset = s.valid_len, %reason, "cutting the log");
                let f = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
                f.set_len(s.valid_len).and_then(|_| f.sync_all()).map_err(io(&path))?;
                // Everything after damage is unreachable now.
                for &later in &seqs[i + 1..] {
                    let p = segment_path(dir, later);
                    std::fs::remove_file(&p).map_err(io(&p))?;
                }
                seqs.truncate(i + 1);
                break;
            }
        }
        tracing::info!(records = recovered, bytes = wal_bytes, elapsed = ?started.elapsed(), "disk store recovered");

        let seq = seqs.last().copied().unwrap_or(1);
        let path = segment_path(dir, seq);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        let size = file.metadata().map_err(io(&path))?.len();
        sync_dir(dir).map_err(io(dir))?;
        let mut thread = WriterThread {
            dir: dir.to_owned(),
            config: config.clone(),
            shared,
            file,
            seq,
            size,
            wal_bytes,
            live_bytes: wal_bytes,
            dirty: false,
            last_sync: Instant::now(),
            _lock: lock,
        };
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("herald-disk-writer".into())
            .spawn(move || thread.run(rx))
            .map_err(io(dir))?;
        Ok(Self { tx: Some(tx), thread: Some(handle) })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx = None; // the thread drains, syncs and exits
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Replays records into memory, merging runs of appends to one topic (one record per
/// group commit, often of one message each) into one index update: a start-up with a
/// million small records pays for one topic lookup per run, not per record.
#[derive(Default)]
struct Replay {
    run: Option<Run>,
}

/// Consecutive appends to one topic's generation, from offset `first`.
struct Run {
    topic: TopicName,
    generation: u64,
    first: u64,
    entries: Vec<(u64, NewMessage)>,
}

impl Replay {
    /// Largest run merged into one update.
    const MAX_RUN: usize = 4096;

    fn push(&mut self, shared: &Shared, record: Record) {
        match record {
            Record::TopicAppend { topic, generation, first, entries } => {
                if let Some(run) = &mut self.run {
                    let follows = run.topic == topic
                        && run.generation == generation
                        && run.first + run.entries.len() as u64 == first;
                    if follows && run.entries.len() < Self::MAX_RUN {
                        run.entries.extend(entries);
                        return;
                    }
                }
                self.flush(shared);
                self.run = Some(Run { topic, generation, first, entries });
            }
            other => {
                self.flush(shared);
                shared.apply(Apply::from_record(other));
            }
        }
    }

    fn flush(&mut self, shared: &Shared) {
        if let Some(Run { topic, generation, first, entries }) = self.run.take() {
            shared.apply(Apply::Topic { topic, generation, first, entries });
        }
    }
}

/// Whether the segment's first record is `CheckpointBegin`.
fn starts_checkpoint(path: &Path) -> bool {
    let mut marker = Vec::new();
    Record::CheckpointBegin.encode(&mut marker);
    let mut head = vec![0u8; marker.len()];
    File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && head == marker
}

struct WriterThread {
    dir: PathBuf,
    config: DiskConfig,
    shared: Arc<Shared>,
    file: File,
    seq: u64,
    size: u64,
    /// Log bytes since the last checkpoint.
    wal_bytes: u64,
    /// Size of the last checkpoint (an estimate of the live data).
    live_bytes: u64,
    dirty: bool,
    last_sync: Instant,
    _lock: File,
}

impl WriterThread {
    fn run(&mut self, rx: mpsc::Receiver<Request>) {
        loop {
            let first = match self.config.fsync {
                FsyncPolicy::Interval(every) if self.dirty => {
                    let wait = every.saturating_sub(self.last_sync.elapsed());
                    match rx.recv_timeout(wait) {
                        Ok(r) => r,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.sync();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(r) => r,
                    Err(_) => break,
                },
            };
            let mut batch = vec![first];
            let mut bytes = 0;
            while bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        if let Request::Write { bytes: b, .. } = &r {
                            bytes += b.len();
                        }
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
        if self.dirty {
            self.sync();
        }
    }

    fn poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    fn poison(&self, what: &str, e: &std::io::Error) {
        tracing::error!(error = %e, "disk store {what} failed; the store is read-only from now on");
        self.shared.poisoned.store(true, Ordering::Release);
    }

    fn sync(&mut self) {
        if let Err(e) = self.file.sync_data() {
            self.poison("fsync", &e);
        }
        self.dirty = false;
        self.last_sync = Instant::now();
    }

    fn commit(&mut self, batch: Vec<Request>) {
        let mut buf = Vec::new();
        let mut writes = Vec::new();
        let mut flushes = Vec::new();
        for r in batch {
            match r {
                Request::Write { bytes, apply, done } => {
                    buf.extend_from_slice(&bytes);
                    writes.push((apply, done));
                }
                Request::Flush(done) => flushes.push(done),
            }
        }
        if !buf.is_empty() && !self.poisoned() {
            match self.file.write_all(&buf) {
                Ok(()) => {
                    self.size += buf.len() as u64;
                    self.wal_bytes += buf.len() as u64;
                    self.dirty = true;
                }
                Err(e) => self.poison("write", &e),
            }
            if self.config.fsync == FsyncPolicy::Always && !self.poisoned() {
                self.sync();
            }
        }
        if !flushes.is_empty() && self.dirty && !self.poisoned() {
            self.sync();
        }
        if self.poisoned() {
            // Nothing in this batch may be acknowledged.
            let err = || StoreError::Unavailable("disk store write failed; it is read-only now".into());
            for (_, done) in writes {
                if let Some(done) = done {
                    let _ = done.send(Err(err()));
                }
            }
            for done in flushes {
                let _ = done.send(Err(err()));
            }
            return;
        }
        for (apply, done) in writes {
            let applied = self.shared.apply(apply);
            if let Some(done) = done {
                let _ = done.send(Ok(applied));
            }
        }
        for done in flushes {
            let _ = done.send(Ok(()));
        }
        if self.size >= self.config.segment_bytes {
            let threshold = (4 * self.config.segment_bytes).max(2 * self.live_bytes);
            let result = if self.wal_bytes >= threshold { self.checkpoint() } else { self.roll(Vec::new()) };
            if let Err(e) = result {
                self.poison("segment switch", &e);
            }
        }
    }

    /// Starts segment `seq + 1` holding `initial` (fsynced), and makes it the active one.
    fn roll(&mut self, initial: Vec<u8>) -> std::io::Result<()> {
        self.file.sync_data()?;
        let seq = self.seq + 1;
        let path = segment_path(&self.dir, seq);
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        file.write_all(&initial)?;
        file.sync_data()?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.seq = seq;
        self.size = initial.len() as u64;
        self.dirty = false;
        Ok(())
    }

    /// Rewrites the live state into a new segment, then deletes the older segments.
    fn checkpoint(&mut self) -> std::io::Result<()> {
        let started = Instant::now();
        let mut buf = Vec::new();
        Record::CheckpointBegin.encode(&mut buf);
        for record in self.shared.checkpoint_records() {
            record.encode(&mut buf);
        }
        Record::CheckpointEnd.encode(&mut buf);
        let before = self.seq;
        self.roll(buf)?;
        for seq in segments(&self.dir).map_err(|e| std::io::Error::other(e.to_string()))? {
            if seq <= before {
                std::fs::remove_file(segment_path(&self.dir, seq))?;
            }
        }
        sync_dir(&self.dir)?;
        tracing::info!(live_bytes = self.size, reclaimed = self.wal_bytes, elapsed = ?started.elapsed(), "disk store checkpoint");
        self.wal_bytes = self.size;
        self.live_bytes = self.size;
        Ok(())
    }
}
