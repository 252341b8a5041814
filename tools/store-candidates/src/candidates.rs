//! The candidates behind one small interface: a durable append of one message, the bulk
//! load for the start-up scenario, and a reopened store that serves range reads.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::io::Write;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use herald_core::{Kind, NewMessage, RetentionConfig, Store, TopicName};
use herald_store_disk::{DiskConfig, DiskStore, FsyncPolicy};
use redb::{ReadableDatabase, ReadableTable};

use crate::{payload, PAYLOAD};

/// The topic every scenario writes (its id in the key-value candidates' keys).
const TOPIC: &str = "bench";
const TOPIC_ID: u64 = 1;
/// Messages per transaction / batch / append call when loading for the start-up scenario.
const LOAD_BATCH: u64 = 1000;
/// At most this many appends in one hand-made group commit.
const MAX_GROUP: usize = 4096;

const TABLE: redb::TableDefinition<(u64, u64), &[u8]> = redb::TableDefinition::new("messages");
const KEYSPACE: &str = "messages";

/// What the append scenario measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// No engine: a shared file, each append a `write` of the payload plus `fdatasync`
    /// under one mutex. The disk's floor for a design without group commit.
    RawFsync,
    /// herald-store-disk's `Store::append`, called from OS threads.
    Herald,
    /// herald-store-disk's `Store::append`, called from tokio tasks (as the broker does).
    HeraldTasks,
    /// redb, one write transaction with `Durability::Immediate` per append.
    Redb,
    /// redb, one committer thread putting all waiting appends in one transaction.
    RedbBatched,
    /// fjall, insert then `persist(SyncAll)` per append.
    Fjall,
    /// fjall, one committer thread putting all waiting appends in one batch and persist.
    FjallBatched,
}

impl Variant {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "raw-fsync" => Self::RawFsync,
            "herald" => Self::Herald,
            "herald-tasks" => Self::HeraldTasks,
            "redb" => Self::Redb,
            "redb-batched" => Self::RedbBatched,
            "fjall" => Self::Fjall,
            "fjall-batched" => Self::FjallBatched,
            _ => bail!("unknown variant {s:?}"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::RawFsync => "raw-fsync",
            Self::Herald => "herald",
            Self::HeraldTasks => "herald-tasks",
            Self::Redb => "redb",
            Self::RedbBatched => "redb-batched",
            Self::Fjall => "fjall",
            Self::FjallBatched => "fjall-batched",
        }
    }
}

/// What the start-up and read scenarios measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Herald,
    Redb,
    Fjall,
}

impl Engine {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "herald" => Self::Herald,
            "redb" => Self::Redb,
            "fjall" => Self::Fjall,
            _ => bail!("unknown engine {s:?}"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Herald => "herald",
            Self::Redb => "redb",
            Self::Fjall => "fjall",
        }
    }
}

/// Appends one message and returns once it is durable (fsync'd).
pub trait Appender: Send + Sync {
    fn append(&self, payload: &[u8]) -> Result<()>;
}

/// A reopened store serving range reads.
pub trait Reader {
    /// Reads offsets `from..=to` (copying out what the engine does not hand out shared);
    /// returns how many messages it got.
    fn read_range(&self, from: u64, to: u64) -> Result<usize>;
}

// ---------------------------------------------------------------------------------------
// The disk's floor

struct RawFsync {
    file: Mutex<std::fs::File>,
}

impl Appender for RawFsync {
    fn append(&self, p: &[u8]) -> Result<()> {
        let mut file = self.file.lock().map_err(|_| anyhow!("poisoned lock"))?;
        file.write_all(p)?;
        file.sync_data()?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// herald-store-disk

pub fn herald_topic() -> Result<TopicName> {
    TopicName::parse(TOPIC).map_err(|e| anyhow!("topic name: {e}"))
}

pub fn herald_message(p: &[u8]) -> NewMessage {
    NewMessage::new(Kind::Binary, Bytes::copy_from_slice(p))
}

/// Opens the disk store with fsync before every acknowledgement and no count-based
/// trimming (the other candidates keep everything too).
pub fn herald_open(dir: &Path) -> Result<DiskStore> {
    let config = DiskConfig {
        fsync: FsyncPolicy::Always,
        retention: RetentionConfig { max_messages: u64::MAX, ..RetentionConfig::default() },
        ..DiskConfig::new(dir)
    };
    DiskStore::open(config).with_context(|| format!("opening herald-store-disk in {}", dir.display()))
}

fn herald_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?)
}

struct HeraldAppender {
    // Field order: the store (and its writer thread) goes before the runtime.
    store: DiskStore,
    topic: TopicName,
    rt: tokio::runtime::Runtime,
}

impl Appender for HeraldAppender {
    fn append(&self, p: &[u8]) -> Result<()> {
        self.rt.handle().block_on(self.store.append(&self.topic, vec![herald_message(p)]))?;
        Ok(())
    }
}

struct HeraldReader {
    store: DiskStore,
    topic: TopicName,
    rt: tokio::runtime::Runtime,
}

impl Reader for HeraldReader {
    fn read_range(&self, from: u64, to: u64) -> Result<usize> {
        let limit = usize::try_from(to - from + 1)?;
        let msgs = self.rt.handle().block_on(self.store.read(&self.topic, from, to, limit))?.messages;
        Ok(msgs.len())
    }
}

// ---------------------------------------------------------------------------------------
// redb

fn redb_create(dir: &Path) -> Result<redb::Database> {
    let db = redb::Database::create(dir.join("messages.redb")).context("creating the redb database")?;
    let txn = db.begin_write()?;
    txn.open_table(TABLE)?;
    txn.commit()?;
    Ok(db)
}

/// Inserts `payloads` at consecutive offsets from `first` in one durable transaction.
fn redb_commit(db: &redb::Database, first: u64, payloads: &[&[u8]]) -> Result<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)?;
    {
        let mut table = txn.open_table(TABLE)?;
        for (i, p) in payloads.iter().enumerate() {
            table.insert((TOPIC_ID, first + i as u64), *p)?;
        }
    }
    txn.commit()?;
    Ok(())
}

struct RedbAppender {
    db: redb::Database,
    next: AtomicU64,
}

impl Appender for RedbAppender {
    fn append(&self, p: &[u8]) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        {
            let mut table = txn.open_table(TABLE)?;
            // Taken inside the write transaction, which redb runs one at a time.
            let offset = self.next.fetch_add(1, Ordering::Relaxed);
            table.insert((TOPIC_ID, offset), p)?;
        }
        txn.commit()?;
        Ok(())
    }
}

struct RedbReader {
    db: redb::Database,
}

impl Reader for RedbReader {
    fn read_range(&self, from: u64, to: u64) -> Result<usize> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TABLE)?;
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(usize::try_from(to - from + 1)?);
        for item in table.range((TOPIC_ID, from)..=(TOPIC_ID, to))? {
            let (_, v) = item?;
            out.push(v.value().to_vec());
        }
        Ok(out.len())
    }
}

// ---------------------------------------------------------------------------------------
// fjall

fn fjall_key(offset: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&TOPIC_ID.to_be_bytes());
    k[8..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn fjall_open(dir: &Path) -> Result<(fjall::Database, fjall::Keyspace)> {
    let db = fjall::Database::builder(dir).open().context("opening the fjall database")?;
    let ks = db.keyspace(KEYSPACE, fjall::KeyspaceCreateOptions::default)?;
    Ok((db, ks))
}

/// Inserts `payloads` at consecutive offsets from `first` in one batch, then fsyncs.
fn fjall_commit(db: &fjall::Database, ks: &fjall::Keyspace, first: u64, payloads: &[&[u8]]) -> Result<()> {
    let mut batch = db.batch();
    for (i, p) in payloads.iter().enumerate() {
        batch.insert(ks, fjall_key(first + i as u64), *p);
    }
    batch.commit()?;
    db.persist(fjall::PersistMode::SyncAll)?;
    Ok(())
}

struct FjallAppender {
    // Field order: the keyspace handle goes before the database.
    ks: fjall::Keyspace,
    db: fjall::Database,
    next: AtomicU64,
}

impl Appender for FjallAppender {
    fn append(&self, p: &[u8]) -> Result<()> {
        let offset = self.next.fetch_add(1, Ordering::Relaxed);
        self.ks.insert(fjall_key(offset), p)?;
        self.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }
}

struct FjallReader {
    ks: fjall::Keyspace,
    _db: fjall::Database,
}

impl Reader for FjallReader {
    fn read_range(&self, from: u64, to: u64) -> Result<usize> {
        let mut out = Vec::with_capacity(usize::try_from(to - from + 1)?);
        for guard in self.ks.range(fjall_key(from)..=fjall_key(to)) {
            let (_, v) = guard.into_inner()?;
            out.push(v);
        }
        Ok(out.len())
    }
}

// ---------------------------------------------------------------------------------------
// Group commit by hand: writers hand their payload to one committer thread, which puts
// everything waiting into one transaction and answers each writer after the commit.

type Done = mpsc::SyncSender<Result<(), String>>;

struct Batched {
    tx: Option<mpsc::Sender<(Vec<u8>, Done)>>,
    thread: Option<JoinHandle<()>>,
}

impl Batched {
    /// `commit(first_offset, payloads)` must make the payloads durable.
    fn start<F>(mut commit: F) -> Result<Self>
    where
        F: FnMut(u64, &[&[u8]]) -> Result<()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<(Vec<u8>, Done)>();
        let thread = std::thread::Builder::new().name("committer".into()).spawn(move || {
            let mut next = 1u64;
            while let Ok(first) = rx.recv() {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(r) => group.push(r),
                        Err(_) => break,
                    }
                }
                let payloads: Vec<&[u8]> = group.iter().map(|(p, _)| p.as_slice()).collect();
                let result = commit(next, &payloads).map_err(|e| format!("{e:#}"));
                if result.is_ok() {
                    next += group.len() as u64;
                }
                for (_, done) in group {
                    let _ = done.send(result.clone());
                }
            }
        })?;
        Ok(Self { tx: Some(tx), thread: Some(thread) })
    }
}

impl Appender for Batched {
    fn append(&self, p: &[u8]) -> Result<()> {
        let (done, wait) = mpsc::sync_channel(1);
        let tx = self.tx.as_ref().ok_or_else(|| anyhow!("committer stopped"))?;
        tx.send((p.to_vec(), done)).map_err(|_| anyhow!("committer stopped"))?;
        wait.recv().map_err(|_| anyhow!("committer stopped"))?.map_err(|e| anyhow!(e))
    }
}

impl Drop for Batched {
    fn drop(&mut self) {
        self.tx = None; // the committer drains and exits, dropping its database
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------

/// Opens `variant` on a fresh directory for the append scenario.
pub fn open_appender(variant: Variant, dir: &Path) -> Result<Arc<dyn Appender>> {
    Ok(match variant {
        Variant::RawFsync => {
            let path = dir.join("raw.log");
            let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            Arc::new(RawFsync { file: Mutex::new(file) })
        }
        Variant::Herald | Variant::HeraldTasks => {
            Arc::new(HeraldAppender { store: herald_open(dir)?, topic: herald_topic()?, rt: herald_runtime()? })
        }
        Variant::Redb => Arc::new(RedbAppender { db: redb_create(dir)?, next: AtomicU64::new(1) }),
        Variant::RedbBatched => {
            let db = redb_create(dir)?;
            Arc::new(Batched::start(move |first, payloads| redb_commit(&db, first, payloads))?)
        }
        Variant::Fjall => {
            let (db, ks) = fjall_open(dir)?;
            Arc::new(FjallAppender { ks, db, next: AtomicU64::new(1) })
        }
        Variant::FjallBatched => {
            let (db, ks) = fjall_open(dir)?;
            Arc::new(Batched::start(move |first, payloads| fjall_commit(&db, &ks, first, payloads))?)
        }
    })
}

/// Writes `n` messages fast (batched, durable at the end), then closes the store.
pub fn load(engine: Engine, dir: &Path, n: u64) -> Result<()> {
    let batches = n.div_ceil(LOAD_BATCH);
    let batch_range = |b: u64| (b * LOAD_BATCH + 1)..=((b + 1) * LOAD_BATCH).min(n);
    match engine {
        Engine::Herald => {
            let rt = herald_runtime()?;
            let store = herald_open(dir)?;
            let topic = herald_topic()?;
            // Keep up to 64 appends in flight: they share group commits.
            let mut b = 0;
            while b < batches {
                let window: Vec<_> = (b..(b + 64).min(batches))
                    .map(|b| store.append(&topic, batch_range(b).map(|i| herald_message(&payload(i))).collect()))
                    .collect();
                b += window.len() as u64;
                for f in window {
                    rt.block_on(f)?;
                }
            }
            rt.block_on(store.flush())?;
        }
        Engine::Redb => {
            let db = redb_create(dir)?;
            for b in 0..batches {
                let owned: Vec<Vec<u8>> = batch_range(b).map(payload).collect();
                let payloads: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
                redb_commit(&db, b * LOAD_BATCH + 1, &payloads)?;
            }
        }
        Engine::Fjall => {
            let (db, ks) = fjall_open(dir)?;
            for b in 0..batches {
                let owned: Vec<Vec<u8>> = batch_range(b).map(payload).collect();
                let payloads: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
                fjall_commit(&db, &ks, b * LOAD_BATCH + 1, &payloads)?;
            }
        }
    }
    Ok(())
}

fn check_last(engine: Engine, last: u64, len: usize, n: u64) -> Result<()> {
    if last != n || len != PAYLOAD {
        bail!("{}: last offset {last} ({len} bytes) after reopening, expected {n} ({PAYLOAD} bytes)", engine.name());
    }
    Ok(())
}

/// Reopens a loaded store up to the point where its last offset is known and that
/// message has been read (the part the start-up scenario times).
pub fn reopen(engine: Engine, dir: &Path, n: u64) -> Result<Box<dyn Reader>> {
    Ok(match engine {
        Engine::Herald => {
            let rt = herald_runtime()?;
            let store = herald_open(dir)?;
            let topic = herald_topic()?;
            let last = rt.block_on(store.head(&topic))?.last;
            let msgs = rt.block_on(store.read(&topic, last, last, 1))?.messages;
            let len = msgs.first().map_or(0, |m| m.payload.len());
            check_last(engine, last, len, n)?;
            Box::new(HeraldReader { store, topic, rt })
        }
        Engine::Redb => {
            let db = redb::Database::open(dir.join("messages.redb")).context("opening the redb database")?;
            {
                let txn = db.begin_read()?;
                let table = txn.open_table(TABLE)?;
                let (k, v) = table.last()?.ok_or_else(|| anyhow!("redb: empty after reopening"))?;
                let (_, last) = k.value();
                check_last(engine, last, v.value().len(), n)?;
            }
            Box::new(RedbReader { db })
        }
        Engine::Fjall => {
            let (db, ks) = fjall_open(dir)?;
            let (k, v) = ks.last_key_value().ok_or_else(|| anyhow!("fjall: empty after reopening"))?.into_inner()?;
            let bytes: [u8; 8] = k.get(8..16).and_then(|s| s.try_into().ok()).ok_or_else(|| anyhow!("fjall: bad key"))?;
            check_last(engine, u64::from_be_bytes(bytes), v.len(), n)?;
            Box::new(FjallReader { ks, _db: db })
        }
    })
}
