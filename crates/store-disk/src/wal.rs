//! The write-ahead log on disk: segment files, the writer thread with group commit,
//! checkpoints, and recovery.
//!
//! Files in the data directory: `LOCK` (held with an exclusive file lock while a store
//! is open), `store.id` (the identity in every epoch), segments `NNNNNNNNNNNNNNNNNNNN.log`
//! and their sidecars `NNNNNNNNNNNNNNNNNNNN.idx` (see `sidecar.rs`). A checkpoint segment
//! starts with `CheckpointBegin` and holds every topic's head and every queue's state up
//! to `CheckpointEnd`. It is written by a thread of its own into the number just before
//! the writer's next segment, so commits go on meanwhile. Once it is complete and
//! fsynced, the segments before it are needed only for the retained messages in them:
//! each is deleted when none is left. Recovery starts at the newest complete checkpoint,
//! takes the runs of the older segments from their sidecars, and replays what follows.

use std::collections::BTreeSet;
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
use crate::sidecar;
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
        /// Each record's framed length and message count, in order.
        parts: Vec<(u32, u32)>,
    },
    Delete {
        topic: TopicName,
        generation: u64,
    },
    Head {
        topic: TopicName,
        generation: u64,
        first: u64,
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
    /// The change a record of `len` framed bytes makes.
    fn from_record(record: Record, len: usize) -> Self {
        match record {
            Record::TopicAppend { topic, generation, first, entries } => {
                let parts = vec![(len as u32, entries.len() as u32)];
                Apply::Topic { topic, generation, first, entries, parts }
            }
            Record::TopicDelete { topic, generation } => Apply::Delete { topic, generation },
            Record::TopicHead { topic, generation, first, next, last_ts } => {
                Apply::Head { topic, generation, first, next, last_ts }
            }
            Record::QueueEnqueue { queue, records } => Apply::Enqueue { queue, records },
            Record::QueueRemove { queue, ids } => Apply::Remove { queue, ids },
            Record::QueueHead { queue, next_id } => Apply::QueueHead { queue, next_id },
            Record::QueueAttempts { queue, attempts } => Apply::Attempts { queue, attempts },
            Record::CheckpointBegin { .. } => Apply::Reset,
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

pub(crate) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
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
///
/// The identity is in every epoch, so it is never silently replaced: a `store.id` that
/// exists but does not read back (empty, not UTF-8, not an identity), or one missing
/// beside existing segments, stops the start unless `repair` is set. A new identity is
/// written to a temporary file, fsynced, renamed into place, and the directory fsynced.
pub(crate) fn prepare_dir(dir: &Path, repair: bool) -> Result<(String, File), OpenError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(OpenError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
    }
    let id_path = dir.join("store.id");
    let problem = match std::fs::read(&id_path) {
        Ok(bytes) => match std::str::from_utf8(&bytes).map(str::trim) {
            Ok(id) if is_identity(id) => return Ok((id.to_owned(), lock)),
            Ok("") => "the file is empty".to_owned(),
            _ => "the file does not hold a store identity".to_owned(),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let data = segments(dir)?.iter().try_fold(0u64, |sum, &seq| {
                let path = segment_path(dir, seq);
                std::fs::metadata(&path).map(|m| sum + m.len()).map_err(io(&path))
            })?;
            if data == 0 {
                return Ok((write_identity(dir, &id_path)?, lock));
            }
            "the file is missing beside log segments that hold data".to_owned()
        }
        Err(e) => return Err(io(&id_path)(e)),
    };
    if !repair {
        return Err(OpenError::Identity { path: id_path, reason: problem });
    }
    tracing::warn!(file = %id_path.display(), %problem, "repair: writing a new store identity; every epoch changes");
    Ok((write_identity(dir, &id_path)?, lock))
}

/// Whether `id` can be a store identity (the prefix of every epoch).
fn is_identity(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Writes a fresh identity to `store.id` atomically and durably.
fn write_identity(dir: &Path, id_path: &Path) -> Result<String, OpenError> {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let id = format!(
        "{:012x}",
        std::collections::hash_map::RandomState::new().hash_one((seed, std::process::id())) & 0xffff_ffff_ffff
    );
    let tmp = dir.join("store.id.tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(id.as_bytes()).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, id_path).map_err(io(id_path))?;
    sync_dir(dir).map_err(io(dir))?;
    Ok(id)
}

/// The decoded records of one segment and where valid data ends.
struct Scan {
    valid_len: u64,
    /// Damage found at `valid_len`, if any: (torn tail?, reason).
    damage: Option<(bool, String)>,
}

/// Reads a segment, handing each valid record to `each` in order with its position and
/// framed length, up to the end or the first damage.
fn scan(path: &Path, mut each: impl FnMut(Record, u64, usize)) -> Result<Scan, OpenError> {
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
                each(record, pos as u64, len);
                pos += len;
            }
            Err(e) => {
                // A torn write leaves a bad record that nothing valid follows. Damage in
                // the middle leaves the records after it, which follow one another to the
                // end of the file. So the damage is a torn tail unless a chain of valid
                // records runs from somewhere after it to exactly the end: a payload
                // that merely holds a record frame does not make one, and a damaged
                // length (which makes a record seem to run past the end) does not hide
                // the records that follow it.
                let torn = !chain_to_end(&data, pos + 1);
                return Ok(Scan { valid_len: pos as u64, damage: Some((torn, e.to_string())) });
            }
        }
    }
    Ok(Scan { valid_len: pos as u64, damage: None })
}

/// Whether valid records follow one another from some position at or after `from` up
/// to exactly the end of `data`. Each position that decodes is followed at most once.
fn chain_to_end(data: &[u8], from: usize) -> bool {
    // reaches[q]: whether the chain starting at q (a decodable position) reaches the end.
    let mut reaches: std::collections::HashMap<usize, bool> = std::collections::HashMap::new();
    for start in from..data.len() {
        let mut path = Vec::new();
        let mut q = start;
        let result = loop {
            if q == data.len() {
                break true;
            }
            if let Some(&known) = reaches.get(&q) {
                break known;
            }
            match Record::decode(&data[q..]) {
                Ok((_, len)) => {
                    path.push(q);
                    q += len;
                }
                Err(_) => break false,
            }
        };
        for p in path {
            reaches.insert(p, result);
        }
        if result && reaches.contains_key(&start) {
            return true;
        }
    }
    false
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

    /// Recovers the store's state into `shared` and starts the writer on the last segment.
    pub(crate) fn recover(config: &DiskConfig, shared: Arc<Shared>, lock: File) -> Result<Self, OpenError> {
        let dir = &config.dir;
        let started = Instant::now();
        let mut seqs = segments(dir)?;
        // Start from the newest complete checkpoint. A checkpoint is written beside the
        // log, and what it replaces is deleted only once it is complete and fsynced: an
        // incomplete one is a crash's leftover when the log it was to replace is still
        // there, and is removed; otherwise it is damage: replay starts there and meets it.
        let mut start = None;
        while let Some(&seq) = seqs.iter().rev().find(|&&s| checkpoint_kind(&segment_path(dir, s)).is_some()) {
            let path = segment_path(dir, seq);
            let mut complete = false;
            scan(&path, |r, _, _| complete |= matches!(r, Record::CheckpointEnd))?;
            // A crash's leftover has what it was to replace beside it: an older
            // checkpoint, or (before the first one completed) every segment from the
            // first. Without either it was complete once, and is damaged now.
            let older_checkpoint = seqs.iter().any(|&s| s < seq && checkpoint_kind(&segment_path(dir, s)).is_some());
            let nothing_deleted = seqs.iter().take_while(|&&s| s < seq).copied().eq(1..seq);
            if complete || !(older_checkpoint || nothing_deleted) {
                start = Some(seq);
                break;
            }
            tracing::warn!(file = %path.display(), "removing an incomplete checkpoint");
            std::fs::remove_file(&path).map_err(io(&path))?;
            seqs.retain(|&s| s != seq);
        }
        let heads_only = start.is_some_and(|c| checkpoint_kind(&segment_path(dir, c)) == Some(true));
        let start_seq = start.unwrap_or(0);
        if !heads_only {
            // A checkpoint of the old format holds every retained message: the segments
            // before it are what a crash kept from deletion.
            for &seq in seqs.iter().filter(|&&s| s < start_seq) {
                remove_segment(dir, seq).map_err(io(&segment_path(dir, seq)))?;
            }
            seqs.retain(|&s| s >= start_seq);
        }
        let (older, tail): (Vec<u64>, Vec<u64>) = seqs.iter().partition(|&&s| s < start_seq);

        let mut wal_bytes = 0u64;
        let mut recovered = 0u64;
        let mut replay_one = |i: usize, seq: u64, tail: &[u64]| -> Result<Option<usize>, OpenError> {
            let path = segment_path(dir, seq);
            let last = i + 1 == tail.len();
            let mut replay = Replay::default();
            let s = scan(&path, |record, pos, len| {
                recovered += 1;
                replay.push(&shared, record, seq, pos, len);
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
                for &later in &tail[i + 1..] {
                    remove_segment(dir, later).map_err(io(&segment_path(dir, later)))?;
                }
                return Ok(Some(i + 1));
            }
            Ok(None)
        };
        let mut tail = tail;
        // The checkpoint first (heads and queues), then the runs of the segments before
        // it, then the segments after it.
        let replay_from = if heads_only && !tail.is_empty() {
            if let Some(keep) = replay_one(0, tail[0], &tail)? {
                tail.truncate(keep);
            }
            1
        } else {
            0
        };
        let mut kept_runs = 0;
        for &seq in &older {
            kept_runs += restore_sealed(config, &shared, seq)?;
        }
        let mut i = replay_from;
        while i < tail.len() {
            if let Some(keep) = replay_one(i, tail[i], &tail)? {
                tail.truncate(keep);
                break;
            }
            i += 1;
        }
        #[cfg(test)]
        shared.replayed.store(recovered, Ordering::Relaxed);
        // Every replayed segment but the active one is sealed: its positions go to its sidecar.
        for &seq in tail.iter().rev().skip(1) {
            seal(dir, &shared, seq);
        }
        tracing::info!(
            records = recovered,
            bytes = wal_bytes,
            sealed_segments = older.len(),
            runs = kept_runs,
            elapsed = ?started.elapsed(),
            "disk store recovered"
        );

        let seq = tail.last().copied().unwrap_or(1);
        let path = segment_path(dir, seq);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        let size = file.metadata().map_err(io(&path))?.len();
        sync_dir(dir).map_err(io(dir))?;
        let live_bytes = match (heads_only, start) {
            (true, Some(c)) => std::fs::metadata(segment_path(dir, c)).map_or(0, |m| m.len()),
            _ => wal_bytes,
        };
        let mut thread = WriterThread {
            dir: dir.to_owned(),
            config: config.clone(),
            shared,
            file,
            seq,
            size,
            wal_bytes,
            live_bytes,
            dirty: false,
            last_sync: Instant::now(),
            checkpoint: None,
            checkpointed: None,
            _lock: lock,
        };
        // What recovery found is what is on disk: its live set decides.
        if let Some(seq) = start {
            thread.checkpointed = Some(Pending { seq, live: thread.shared.index.live_segments(), writing: () });
            thread.reclaim();
        }
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("herald-disk-writer".into())
            .spawn(move || thread.run(rx))
            .map_err(io(dir))?;
        Ok(Self { tx: Some(tx), thread: Some(handle) })
    }
}

/// Deletes segment `seq` and its sidecar.
fn remove_segment(dir: &Path, seq: u64) -> std::io::Result<()> {
    match std::fs::remove_file(sidecar::sidecar_path(dir, seq)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::remove_file(segment_path(dir, seq))
}

/// Adds the runs of sealed segment `seq` (older than the checkpoint) to the index, from
/// its sidecar, or by reading the segment when the sidecar is missing or damaged (and
/// then writing it). Returns how many runs were kept.
fn restore_sealed(config: &DiskConfig, shared: &Shared, seq: u64) -> Result<usize, OpenError> {
    let dir = &config.dir;
    let path = segment_path(dir, seq);
    if let Some(runs) = sidecar::load(dir, seq) {
        return Ok(shared.index.restore_runs(runs));
    }
    if checkpoint_kind(&path) == Some(true) {
        return Ok(0); // heads and queues only, superseded by a newer checkpoint
    }
    tracing::info!(file = %path.display(), "no usable sidecar: reading the segment to rebuild it");
    let (mut runs, valid_len, damage) = sidecar::scan_runs(&path, seq).map_err(io(&path))?;
    if let Some(reason) = damage {
        if !config.repair {
            return Err(OpenError::Damaged { file: path, offset: valid_len, reason });
        }
        tracing::warn!(file = %path.display(), offset = valid_len, %reason, "cutting the log");
        let f = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
        f.set_len(valid_len).and_then(|_| f.sync_all()).map_err(io(&path))?;
    }
    match sidecar::write(dir, seq, &runs) {
        Ok(blocks) => {
            for (r, (_, _, _, locs)) in runs.iter_mut().zip(blocks) {
                r.run.locs = locs;
            }
        }
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "could not write a sidecar"),
    }
    Ok(shared.index.restore_runs(runs))
}

/// Moves the positions of sealed segment `seq`'s runs from memory to its sidecar. A
/// failure only leaves them in memory.
fn seal(dir: &Path, shared: &Shared, seq: u64) {
    let runs = shared.index.unsealed(seq);
    match sidecar::write(dir, seq, &runs) {
        Ok(blocks) => shared.index.sealed(seq, &blocks),
        Err(e) => tracing::warn!(segment = seq, error = %e, "could not write a sidecar; its positions stay in memory"),
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

/// Replays records into memory, merging consecutive appends to one topic (one record
/// per group commit, often of one message each) into one index update: a start-up with
/// a million small records pays for one topic lookup per run, not per record.
#[derive(Default)]
struct Replay {
    run: Option<Run>,
}

/// Consecutive appends to one topic's generation, from offset `first`, written in
/// segment `seg` one after another from byte `pos`.
struct Run {
    topic: TopicName,
    generation: u64,
    first: u64,
    entries: Vec<(u64, NewMessage)>,
    seg: u64,
    pos: u64,
    parts: Vec<(u32, u32)>,
}

impl Replay {
    /// Largest run merged into one update.
    const MAX_RUN: usize = 4096;

    fn push(&mut self, shared: &Shared, record: Record, seg: u64, pos: u64, len: usize) {
        match record {
            Record::TopicAppend { topic, generation, first, entries } => {
                let part = (len as u32, entries.len() as u32);
                if let Some(run) = &mut self.run {
                    let follows = run.topic == topic
                        && run.generation == generation
                        && run.first + run.entries.len() as u64 == first;
                    if follows && run.entries.len() < Self::MAX_RUN {
                        run.entries.extend(entries);
                        run.parts.push(part);
                        return;
                    }
                }
                self.flush(shared);
                self.run = Some(Run { topic, generation, first, entries, seg, pos, parts: vec![part] });
            }
            other => {
                self.flush(shared);
                shared.apply(Apply::from_record(other, len), seg, pos, false);
            }
        }
    }

    fn flush(&mut self, shared: &Shared) {
        if let Some(Run { topic, generation, first, entries, seg, pos, parts }) = self.run.take() {
            shared.apply(Apply::Topic { topic, generation, first, entries, parts }, seg, pos, false);
        }
    }
}

/// Whether the segment starts with `CheckpointBegin`, and if so whether it is a
/// checkpoint of heads only (`Some(true)`) or of the old format (`Some(false)`).
pub(crate) fn checkpoint_kind(path: &Path) -> Option<bool> {
    let mut head = Vec::new();
    Record::CheckpointBegin { heads_only: true }.encode(&mut head);
    let mut found = vec![0u8; head.len()];
    File::open(path).and_then(|mut f| f.read_exact(&mut found)).ok()?;
    [true, false].into_iter().find(|&heads_only| {
        let mut marker = Vec::new();
        Record::CheckpointBegin { heads_only }.encode(&mut marker);
        marker == found
    })
}

/// Whether the segment starts with `CheckpointBegin`.
#[cfg(test)]
pub(crate) fn starts_checkpoint(path: &Path) -> bool {
    checkpoint_kind(path).is_some()
}

/// A checkpoint: its segment, the segments some retained message was in when its heads
/// were taken, and (while it is written) the thread writing it.
struct Pending<T = JoinHandle<std::io::Result<u64>>> {
    seq: u64,
    live: BTreeSet<u64>,
    writing: T,
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
    /// The checkpoint being written, if one is.
    checkpoint: Option<Pending>,
    /// The newest complete checkpoint: the segments before it not in its live set are
    /// deleted.
    checkpointed: Option<Pending<()>>,
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
        self.reap_checkpoint(true);
        // A clean stop leaves a checkpoint at the end of the log, so the next start
        // replays nothing but it.
        if self.shared.no_stop_checkpoint.load(Ordering::Relaxed) {
            return;
        }
        if self.wal_bytes > self.live_bytes && !self.poisoned() {
            let sealed = self.seq;
            match self.start_checkpoint() {
                Ok(()) => {
                    seal(&self.dir, &self.shared, sealed);
                    self.reap_checkpoint(true);
                }
                Err(e) => tracing::warn!(error = %e, "could not write a checkpoint at shutdown"),
            }
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
        let started = Instant::now();
        self.shared.commits.writes.observe(batch.len() as f64);
        let mut buf = Vec::new();
        let mut writes = Vec::new();
        let mut flushes = Vec::new();
        let base = self.size;
        for r in batch {
            match r {
                Request::Write { bytes, apply, done } => {
                    writes.push((apply, base + buf.len() as u64, done));
                    buf.extend_from_slice(&bytes);
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
        self.shared.commits.seconds.observe(started.elapsed().as_secs_f64());
        if self.poisoned() {
            // Nothing in this batch may be acknowledged.
            let err = || StoreError::Unavailable("disk store write failed; it is read-only now".into());
            for (_, _, done) in writes {
                if let Some(done) = done {
                    let _ = done.send(Err(err()));
                }
            }
            for done in flushes {
                let _ = done.send(Err(err()));
            }
            return;
        }
        for (apply, pos, done) in writes {
            let applied = self.shared.apply(apply, self.seq, pos, true);
            if let Some(done) = done {
                let _ = done.send(Ok(applied));
            }
        }
        for done in flushes {
            let _ = done.send(Ok(()));
        }
        self.reap_checkpoint(false);
        if self.size >= self.config.segment_bytes {
            // A checkpoint costs the heads and the queues, not the history: one per
            // segment or so keeps the replay at start-up short.
            let threshold = self.config.segment_bytes.max(2 * self.live_bytes);
            let sealed = self.seq;
            let result = if self.checkpoint.is_none() && self.wal_bytes >= threshold {
                self.start_checkpoint()
            } else {
                self.roll(self.seq + 1)
            };
            match result {
                Ok(()) => seal(&self.dir, &self.shared, sealed),
                Err(e) => self.poison("segment switch", &e),
            }
        }
    }

    /// Deletes the segments before the newest complete checkpoint that no retained
    /// message was in when it took its heads. What decides is that durable state, not
    /// the index as of now: a trim made by a commit not yet synced (fsync `never` or an
    /// interval) must not delete what a crash would need. A failure only leaves them
    /// (the next checkpoint tries again).
    fn reclaim(&mut self) {
        let Some(Pending { seq: checkpoint, live, .. }) = &self.checkpointed else { return };
        let Ok(seqs) = segments(&self.dir) else { return };
        let mut removed = 0;
        for seq in seqs.into_iter().filter(|&s| s < *checkpoint && !live.contains(&s)) {
            match remove_segment(&self.dir, seq) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(segment = seq, error = %e, "could not delete a segment no longer needed");
                    return;
                }
            }
        }
        if removed > 0 {
            if let Err(e) = sync_dir(&self.dir) {
                tracing::warn!(error = %e, "fsync of the data directory failed");
            }
        }
    }

    /// Makes a new, empty segment `seq` the active one (the current one fsynced first).
    fn roll(&mut self, seq: u64) -> std::io::Result<()> {
        self.file.sync_data()?;
        let path = segment_path(&self.dir, seq);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.seq = seq;
        self.size = 0;
        self.dirty = false;
        Ok(())
    }

    /// Starts a checkpoint of the state as of now in segment `seq + 1`, written by a
    /// thread of its own while this writer goes on in segment `seq + 2`: commits do not
    /// wait for it, and it streams the state instead of building it in memory.
    fn start_checkpoint(&mut self) -> std::io::Result<()> {
        // The live set before the heads: a trim between the two only makes the heads
        // keep less, so every segment a head still needs is in the set.
        let live = self.shared.index.live_segments();
        let state = self.shared.checkpoint_state();
        let seq = self.seq + 1;
        self.roll(seq + 1)?;
        self.wal_bytes = 0;
        let dir = self.dir.clone();
        #[cfg(test)]
        let gate = self.shared.checkpoint_gate.lock().ok().and_then(|mut g| g.take());
        let handle = std::thread::Builder::new().name("herald-checkpoint".into()).spawn(move || {
            let started = Instant::now();
            let path = segment_path(&dir, seq);
            let file = OpenOptions::new().create_new(true).write(true).open(&path)?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let mut written = state.write_body(&mut out)?;
            drop(state); // release the messages it held before the slow part
            #[cfg(test)]
            if let Some(gate) = gate {
                out.flush()?;
                gate.recv().map_err(|_| std::io::Error::other("checkpoint abandoned by the test"))?;
            }
            let mut end = Vec::new();
            Record::CheckpointEnd.encode(&mut end);
            out.write_all(&end)?;
            written += end.len() as u64;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_data()?;
            sync_dir(&dir)?;
            tracing::debug!(bytes = written, elapsed = ?started.elapsed(), "disk store checkpoint");
            Ok(written)
        })?;
        self.checkpoint = Some(Pending { seq, live, writing: handle });
        Ok(())
    }

    /// Collects a finished checkpoint (or waits for it when `wait`). A failed one only
    /// means the older segments stay: the log is whole without it.
    fn reap_checkpoint(&mut self, wait: bool) {
        if !self.checkpoint.as_ref().is_some_and(|p| wait || p.writing.is_finished()) {
            return;
        }
        let Some(Pending { seq, live, writing }) = self.checkpoint.take() else { return };
        match writing.join() {
            Ok(Ok(written)) => {
                self.live_bytes = written;
                self.wal_bytes += written;
                self.checkpointed = Some(Pending { seq, live, writing: () });
                self.reclaim();
            }
            Ok(Err(e)) => tracing::error!(error = %e, "disk store checkpoint failed; the log keeps its older segments"),
            Err(_) => tracing::error!("disk store checkpoint thread panicked; the log keeps its older segments"),
        }
    }
}
