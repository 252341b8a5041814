//! The store conformance suite: one set of checks that every [`Store`] backend passes.
//!
//! Each case is a plain `async fn(&dyn Backend)`; [`store_conformance!`] turns the list
//! into one `#[tokio::test]` per case for a backend, so a failure names its case. Cases
//! drive time with a [`ManualClock`] and, for a durable backend, close and reopen the
//! store after their steps ([`Fixture::restart`]) and check that nothing acknowledged
//! was lost: offsets, epochs, timestamps, payloads, retention, queue records and
//! attempt counts. The invariants are listed in docs/storage.md.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_core::{
    Epoch, Kind, ListedTopic, ManualClock, Message, NewMessage, QueueConfig, QueueName, QueueRecord, QueueSnapshot,
    Queues, RetentionConfig, Store, TopicName,
};

/// A test failure.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// A case's result.
pub type Result<T = ()> = std::result::Result<T, Error>;

/// A store under test.
pub trait Backend: Send + Sync {
    /// Opens the store. A durable backend opened again, once every handle of the
    /// previous store is dropped, holds what that store acknowledged.
    fn open(&self, retention: RetentionConfig, clock: Arc<ManualClock>) -> Result<Arc<dyn Store>>;

    /// Whether what is stored survives a reopen (restart checks run only then).
    fn durable(&self) -> bool;
}

/// The time every case starts at (ms since the Unix epoch).
const START_MS: u64 = 1_700_000_000_000;

/// One case's store, clock and retention, with a restart that keeps them.
pub struct Fixture<'a> {
    backend: &'a dyn Backend,
    retention: RetentionConfig,
    /// The clock the store reads.
    pub clock: Arc<ManualClock>,
    /// The store.
    pub store: Arc<dyn Store>,
}

impl<'a> Fixture<'a> {
    /// Opens `backend` with `retention` on a fresh manual clock.
    pub fn new(backend: &'a dyn Backend, retention: RetentionConfig) -> Result<Self> {
        let clock = Arc::new(ManualClock::new(START_MS));
        let store = backend.open(retention, clock.clone())?;
        Ok(Self { backend, retention, clock, store })
    }

    /// Whether restarts keep data.
    pub fn durable(&self) -> bool {
        self.backend.durable()
    }

    /// Flushes, closes and reopens the store (a clean stop and start). The caller must
    /// hold no other handle to the store.
    pub async fn restart(&mut self) -> Result {
        self.store.flush().await?;
        let placeholder: Arc<dyn Store> = Arc::new(herald_core::MemoryStore::new(self.retention));
        drop(std::mem::replace(&mut self.store, placeholder));
        self.store = self.backend.open(self.retention, self.clock.clone())?;
        Ok(())
    }
}

fn topic(name: &str) -> Result<TopicName> {
    Ok(TopicName::parse(name)?)
}

fn queue(name: &str) -> Result<QueueName> {
    Ok(QueueName::parse(name)?)
}

fn text(s: &str) -> NewMessage {
    NewMessage::new(Kind::Text, Bytes::copy_from_slice(s.as_bytes()))
}

/// What a reader sees of a message: offset, time, kind, TTL end and bytes.
type Seen = (u64, u64, Kind, Option<u64>, Bytes);

fn seen(messages: &[Arc<Message>]) -> Vec<Seen> {
    messages.iter().map(|m| (m.offset, m.ts, m.kind, m.expires_at, m.payload.clone())).collect()
}

async fn read_all(store: &dyn Store, t: &TopicName) -> Result<(Epoch, Vec<Seen>)> {
    let history = store.read(t, 0, u64::MAX, 1_000_000).await?;
    Ok((history.epoch, seen(&history.messages)))
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result {
    if ok {
        Ok(())
    } else {
        Err(what().into())
    }
}

/// Asserts equality with a message naming the case step.
fn same<T: PartialEq + std::fmt::Debug>(got: T, want: T, step: &str) -> Result {
    ensure(got == want, || format!("{step}: got {got:?}, want {want:?}"))
}

/// Per topic, `append` assigns consecutive offsets from 1 (a batch atomically) and
/// timestamps that never decrease; `head` follows; all of it survives a restart.
pub async fn offsets_are_consecutive_from_one(backend: &dyn Backend) -> Result {
    let mut f = Fixture::new(backend, RetentionConfig::default())?;
    let t = topic("conf.offsets")?;
    let fresh = f.store.head(&t).await?;
    same((fresh.first, fresh.last, fresh.next, fresh.retained), (0, 0, 1, 0), "head of a new topic")?;
    let a = f.store.append(&t, vec![text("a"), text("b"), text("c")]).await?;
    same(a.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![1, 2, 3], "first batch")?;
    same(a.epoch.clone(), fresh.epoch.clone(), "a new topic's first epoch is the one head named")?;
    f.clock.advance(5);
    let b = f.store.append(&t, vec![text("d")]).await?;
    same(b.messages[0].offset, 4, "next append")?;
    ensure(b.messages[0].ts >= a.messages[2].ts, || "timestamps decreased".into())?;
    let head = f.store.head(&t).await?;
    same((head.first, head.last, head.next, head.retained), (1, 4, 5, 4), "head after appends")?;
    let before = read_all(&*f.store, &t).await?;
    same(before.1.len(), 4, "read back")?;
    if f.durable() {
        f.restart().await?;
        same(read_all(&*f.store, &t).await?, before.clone(), "history after a restart")?;
        same(f.store.head(&t).await?, head, "head after a restart")?;
        let c = f.store.append(&t, vec![text("e")]).await?;
        same((c.epoch.clone(), c.messages[0].offset), (before.0, 5), "offsets continue in the same epoch")?;
        ensure(c.messages[0].ts >= b.messages[0].ts, || "timestamps decreased across a restart".into())?;
    }
    Ok(())
}

/// Appends issued together and completing in any order: every batch has consecutive
/// offsets, the topic holds exactly 1..=N, and each offset holds its own payload.
pub async fn concurrent_appends_complete_in_any_order(backend: &dyn Backend) -> Result {
    let mut f = Fixture::new(backend, RetentionConfig::default())?;
    let topics = [topic("conf.many.a")?, topic("conf.many.b")?, topic("conf.many.c")?];
    let mut pending = Vec::new();
    for i in 0..120usize {
        let t = &topics[i % topics.len()];
        let batch: Vec<NewMessage> = (0..1 + i % 4).map(|j| text(&format!("{i}-{j}"))).collect();
        pending.push((t.clone(), i, batch.len(), f.store.append(t, batch)));
    }
    let mut by_offset: BTreeMap<(TopicName, u64), String> = BTreeMap::new();
    // Await the last issued first: a store may complete them in any order.
    for (t, i, n, append) in pending.into_iter().rev() {
        let appended = append.await?;
        same(appended.messages.len(), n, "batch length")?;
        let first = appended.messages[0].offset;
        for (j, m) in appended.messages.iter().enumerate() {
            same(m.offset, first + j as u64, "offsets within a batch")?;
            same(m.payload.clone(), Bytes::from(format!("{i}-{j}")), "payload of an appended message")?;
            ensure(by_offset.insert((t.clone(), m.offset), format!("{i}-{j}")).is_none(), || {
                format!("offset {} of {t} given twice", m.offset)
            })?;
        }
    }
    for _ in 0..2 {
        for t in &topics {
            let (_, got) = read_all(&*f.store, t).await?;
            let want: Vec<(u64, Bytes)> = by_offset
                .iter()
                .filter(|((name, _), _)| name == t)
                .map(|((_, o), p)| (*o, Bytes::from(p.clone())))
                .collect();
            same(want.first().map(|w| w.0), Some(1), "offsets start at 1")?;
            same(want.last().map(|w| w.0), Some(want.len() as u64), "no gap")?;
            same(got.into_iter().map(|s| (s.0, s.4)).collect::<Vec<_>>(), want, "read in offset order")?;
        }
        if !f.durable() {
            break;
        }
        f.restart().await?;
    }
    Ok(())
}

/// `read` honours `from` (0: first retained), `until` and `limit`, names its epoch, and
/// answers an unknown topic with nothing; `list` filters by prefix, `after` and `limit`.
pub async fn read_ranges_and_list(backend: &dyn Backend) -> Result {
    let f = Fixture::new(backend, RetentionConfig::default())?;
    let a = topic("conf.read.a")?;
    let b = topic("conf.read.b")?;
    for i in 1..=10 {
        f.store.append(&a, vec![text(&i.to_string())]).await?;
    }
    f.store.append(&b, vec![text("b")]).await?;
    let offsets = |h: &herald_core::History| h.messages.iter().map(|m| m.offset).collect::<Vec<_>>();
    let r = f.store.read(&a, 4, 7, 100).await?;
    same(offsets(&r), vec![4, 5, 6, 7], "from 4 until 7")?;
    same(r.epoch.clone(), f.store.head(&a).await?.epoch, "read names the head's epoch")?;
    same(offsets(&f.store.read(&a, 4, u64::MAX, 2).await?), vec![4, 5], "limit")?;
    same(offsets(&f.store.read(&a, 0, 3, 100).await?), vec![1, 2, 3], "from 0 is the first retained")?;
    same(offsets(&f.store.read(&a, 11, u64::MAX, 100).await?), vec![], "past the end")?;
    let unknown = topic("conf.read.none")?;
    let r = f.store.read(&unknown, 0, u64::MAX, 100).await?;
    same((r.messages.len(), r.epoch), (0, f.store.head(&unknown).await?.epoch), "unknown topic")?;
    same(
        f.store.list("conf.read.", None, 10).await?,
        vec![ListedTopic { topic: a.clone(), last: 10 }, ListedTopic { topic: b.clone(), last: 1 }],
        "list by prefix",
    )?;
    same(f.store.list("conf.read.", Some("conf.read.a"), 10).await?, vec![ListedTopic { topic: b, last: 1 }], "after")?;
    same(f.store.list("conf.read.", None, 1).await?.len(), 1, "list limit")?;
    same(f.store.list("nothing.", None, 10).await?, vec![], "other prefix")?;
    Ok(())
}

/// Retention by count and by age, and per-message TTL: `read` and `head` skip what
/// they removed, offsets are kept, and a restart keeps exactly the same history.
pub async fn retention_by_count_age_and_ttl(backend: &dyn Backend) -> Result {
    let retention = RetentionConfig { max_messages: 3, max_age: Duration::from_secs(10), max_bytes: 0 };
    let mut f = Fixture::new(backend, retention)?;
    let t = topic("conf.retention")?;
    for i in 1..=5 {
        f.store.append(&t, vec![text(&i.to_string())]).await?;
    }
    same(f.store.head(&t).await?.first, 3, "count retention keeps the newest 3")?;
    let mut short = text("short");
    short.ttl_ms = Some(100);
    f.store.append(&t, vec![short]).await?; // offset 6
    same(read_all(&*f.store, &t).await?.1.len(), 3, "4, 5 and the TTL message")?;
    let before_expiry = read_all(&*f.store, &t).await?;
    if f.durable() {
        f.restart().await?;
        same(read_all(&*f.store, &t).await?, before_expiry, "retained set after a restart")?;
    }
    f.clock.advance(100);
    let offsets: Vec<u64> = read_all(&*f.store, &t).await?.1.iter().map(|s| s.0).collect();
    same(offsets, vec![4, 5], "the expired message is skipped")?;
    if f.durable() {
        f.restart().await?;
        let offsets: Vec<u64> = read_all(&*f.store, &t).await?.1.iter().map(|s| s.0).collect();
        same(offsets, vec![4, 5], "still skipped after a restart")?;
    }
    f.clock.advance(10_000);
    f.store.sweep();
    let head = f.store.head(&t).await?;
    same((head.retained, head.first, head.last, head.next), (0, 0, 0, 7), "aged out, offsets kept")?;
    if f.durable() {
        f.restart().await?;
        same(f.store.head(&t).await?.next, 7, "offsets kept across a restart with nothing retained")?;
    }
    same(f.store.append(&t, vec![text("7")]).await?.messages[0].offset, 7, "no offset reused")?;
    Ok(())
}

/// A delete drops the history and starts a new epoch at offset 1; epochs are never
/// reused, before or after a restart.
pub async fn delete_starts_a_new_epoch(backend: &dyn Backend) -> Result {
    let mut f = Fixture::new(backend, RetentionConfig::default())?;
    let t = topic("conf.delete")?;
    let mut epochs = BTreeSet::new();
    let first = f.store.append(&t, vec![text("a"), text("b")]).await?;
    epochs.insert(first.epoch.clone());
    let e1 = f.store.delete(&t).await?;
    ensure(epochs.insert(e1.clone()), || "delete reused an epoch".into())?;
    let head = f.store.head(&t).await?;
    same((head.epoch.clone(), head.next, head.retained), (e1.clone(), 1, 0), "head after a delete")?;
    let again = f.store.append(&t, vec![text("c")]).await?;
    same((again.epoch.clone(), again.messages[0].offset), (e1.clone(), 1), "offsets restart at 1")?;
    same(read_all(&*f.store, &t).await?.1.len(), 1, "only the new epoch's message")?;
    let e2 = f.store.delete(&t).await?;
    ensure(epochs.insert(e2.clone()), || "a second delete reused an epoch".into())?;
    f.store.append(&t, vec![text("d"), text("e")]).await?;
    let before = (f.store.head(&t).await?, read_all(&*f.store, &t).await?);
    if f.durable() {
        f.restart().await?;
        same((f.store.head(&t).await?, read_all(&*f.store, &t).await?), before.clone(), "after a restart")?;
        let e3 = f.store.delete(&t).await?;
        ensure(epochs.insert(e3), || "a delete after a restart reused an epoch".into())?;
    }
    Ok(())
}

/// A topic left alone while another takes much traffic (a durable store compacts its
/// log meanwhile) keeps its whole retained history, head and epoch across a restart.
pub async fn quiet_topics_survive_compaction(backend: &dyn Backend) -> Result {
    let retention = RetentionConfig { max_messages: 100, ..RetentionConfig::default() };
    let mut f = Fixture::new(backend, retention)?;
    let quiet = topic("conf.quiet")?;
    let busy = topic("conf.busy")?;
    for i in 0..50 {
        f.store.append(&quiet, vec![text(&format!("quiet-{i}"))]).await?;
    }
    let filler = "x".repeat(100);
    for _ in 0..300 {
        f.store.append(&busy, (0..10).map(|_| text(&filler)).collect()).await?;
    }
    let want = (f.store.head(&quiet).await?, read_all(&*f.store, &quiet).await?, f.store.head(&busy).await?);
    same(want.1 .1.len(), 50, "retained before the restart")?;
    if f.durable() {
        f.restart().await?;
        let got = (f.store.head(&quiet).await?, read_all(&*f.store, &quiet).await?, f.store.head(&busy).await?);
        same(got, want, "after a restart")?;
        let next = f.store.append(&quiet, vec![text("again")]).await?;
        same(next.messages[0].offset, 51, "offsets continue")?;
    }
    Ok(())
}

fn record(id: u64, payload: &str, ts: u64) -> QueueRecord {
    QueueRecord {
        id,
        kind: Kind::Text,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ts,
        ready_at: ts,
        expires_at: None,
    }
}

/// The store half of queues: appended records, removals and attempt counts; a durable
/// store gives back exactly the live ones at a restart.
pub async fn queue_records_removals_and_attempts(backend: &dyn Backend) -> Result {
    let mut f = Fixture::new(backend, RetentionConfig::default())?;
    let q = queue("conf.records")?;
    let mut delayed = record(3, "three", START_MS);
    delayed.ready_at = START_MS + 60_000;
    delayed.expires_at = Some(START_MS + 120_000);
    f.store.queue_append(&q, vec![record(1, "one", START_MS), record(2, "two", START_MS)]).await?;
    f.store.queue_append(&q, vec![delayed.clone()]).await?;
    f.store.queue_delivered(&q, vec![(2, 2), (3, 1)]);
    f.store.queue_remove(&q, vec![1]);
    if !f.durable() {
        same(f.store.queue_load(), vec![], "a store that keeps nothing loads nothing")?;
        return Ok(());
    }
    f.restart().await?;
    let want = QueueSnapshot {
        queue: q.clone(),
        next_id: 4,
        records: vec![record(2, "two", START_MS), delayed],
        attempts: BTreeMap::from([(2, 2), (3, 1)]),
    };
    same(f.store.queue_load(), vec![want], "live records, next id and attempts after a restart")?;
    Ok(())
}

/// Waits (yielding, bounded) until `done` holds: for effects a store applies on a task.
async fn until(what: &str, mut done: impl FnMut() -> bool) -> Result {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// The queue engine over the store: enqueue, lease, ack, requeue with delay, extend,
/// redelivery at lease end, attempts, dead letters; after a restart every unacked
/// job is back (ready, with its attempts; dead-lettered if the delivery the stop cut
/// off was its last allowed), acked ones are gone, dead letters kept, ids not reused.
pub async fn queue_engine_over_the_store(backend: &dyn Backend) -> Result {
    let mut f = Fixture::new(backend, RetentionConfig::default())?;
    let config = QueueConfig { max_attempts: 2, ..QueueConfig::default() };
    let q = queue("conf.jobs")?;
    let dlq = queue("conf.jobs.dlq")?;
    let engine = |f: &Fixture| Queues::new(f.store.clone(), f.clock.clone(), config, 1 << 20);
    let queues = engine(&f);
    for job in ["a", "b", "c"] {
        queues.enqueue(&q, text(job), 0).await?;
    }
    let payload = |d: &herald_core::Delivery| String::from_utf8_lossy(&d.payload).into_owned();
    let first = queues.fetch(&q, 1, 1000);
    same(first.iter().map(payload).collect::<Vec<_>>(), vec!["a".to_owned()], "fetch takes the oldest")?;
    queues.ack(&q, &first[0].id)?;
    let b = queues.fetch(&q, 1, 1000);
    same((payload(&b[0]), b[0].attempt), ("b".to_owned(), 1), "second job, first attempt")?;
    queues.requeue(&q, &b[0].id, 500)?;
    same(queues.stats(&q).delayed, 1, "requeued with a delay")?;
    let c = queues.fetch(&q, 1, 1000);
    same(payload(&c[0]), "c".to_owned(), "third job")?;
    queues.extend(&q, &c[0].id, 3000)?;
    f.clock.advance(1000);
    same(queues.stats(&q).in_flight, 1, "an extended lease holds")?;
    let b2 = queues.fetch(&q, 1, 1000);
    same((payload(&b2[0]), b2[0].attempt), ("b".to_owned(), 2), "b is ready again after its delay")?;
    f.clock.advance(3000); // c's extended lease and b's second one end
    let c2 = queues.fetch(&q, 1, 1000);
    same((payload(&c2[0]), c2[0].attempt), ("c".to_owned(), 2), "c redelivered at its lease end")?;
    let stats = queues.stats(&q);
    same((stats.ready, stats.in_flight, stats.dead), (0, 1, 1), "b dead-lettered after max_attempts")?;
    let dead = queues.fetch(&dlq, 10, 1000);
    same(dead.iter().map(payload).collect::<Vec<_>>(), vec!["b".to_owned()], "the dead letter")?;
    queues.requeue(&dlq, &dead[0].id, 0)?;
    queues.enqueue(&q, text("d"), 0).await?;
    same(payload(&queues.fetch(&q, 1, 1000)[0]), "d".to_owned(), "a fourth job, leased at the stop")?;
    if !f.durable() {
        return Ok(());
    }
    // The parent drops a dead letter only once the DLQ holds it (on a task for a
    // durable store): wait for that before the clean stop.
    let store = f.store.clone();
    until("the dead letter to leave its queue", || {
        store.queue_load().iter().any(|s| s.queue == q && s.records.iter().all(|r| r.payload != "b"))
    })
    .await?;
    drop(store);
    drop(queues);
    f.restart().await?;
    let queues = engine(&f);
    // c's second delivery, its last allowed, was cut off by the stop: dead-lettered at
    // start, as at a lease end. d's first one was cut off: ready again, attempts kept.
    let stats = queues.stats(&q);
    same((stats.ready, stats.in_flight, stats.dead), (1, 0, 2), "after a restart: d ready, b and c dead")?;
    let d2 = queues.fetch(&q, 1, 1000);
    same((payload(&d2[0]), d2[0].attempt), ("d".to_owned(), 2), "d's attempts survive")?;
    let dead = queues.fetch(&dlq, 10, 1000);
    let mut dead: Vec<String> = dead.iter().map(payload).collect();
    dead.sort();
    same(dead, vec!["b".to_owned(), "c".to_owned()], "the dead letters survive")?;
    let id = queues.enqueue(&q, text("e"), 0).await?;
    ensure(id > 4, || format!("a new job reused id {id}"))?;
    Ok(())
}

/// One `#[tokio::test]` per conformance case for the backend that `$make` builds
/// (evaluated once per test, so each case gets a fresh backend, e.g. a new directory).
#[macro_export]
macro_rules! store_conformance {
    ($make:expr) => {
        $crate::store_conformance!(@cases $make;
            offsets_are_consecutive_from_one,
            concurrent_appends_complete_in_any_order,
            read_ranges_and_list,
            retention_by_count_age_and_ttl,
            delete_starts_a_new_epoch,
            quiet_topics_survive_compaction,
            queue_records_removals_and_attempts,
            queue_engine_over_the_store
        );
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() -> $crate::conformance::Result {
                let backend = $make;
                $crate::conformance::$case(&backend).await
            }
        )*
    };
}
