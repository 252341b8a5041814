//! Model-based restart test of the disk store (issue 9): random sequences of topic
//! publishes and deletes, queue enqueues, fetches, acks, requeues, lease expiries,
//! checkpoint-forcing bursts, clean stops and crashes (a torn log tail) run in-process
//! through a real `Broker` over a `DiskStore` on a `ManualClock`. A plain model follows
//! every operation exactly; after every restart the store's recovered state is checked
//! against what the model says must have survived, then adopted where a crash leaves a
//! choice (unacknowledged writes, lazily written acks and attempt counts).
//!
//! Segments are tiny (4 KiB), so segment switches and checkpoints happen all the time.

use std::collections::{BTreeMap, VecDeque};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use herald_core::{
    Broker, BrokerConfig, Kind, ManualClock, NewMessage, QueueConfig, QueueError, QueueName, QueueRecord,
    QueueSnapshot, QueueStats, RetentionConfig, Store, TopicHead, TopicName,
};
use herald_store_disk::{DiskConfig, DiskStore, FsyncPolicy};
use proptest::prelude::*;

/// Ordinary topics; one more, `BURST`, takes the checkpoint-forcing bursts.
const TOPICS: usize = 3;
const BURST: usize = TOPICS;
const QUEUES: usize = 2;
/// Retention by count: small, so trimming (and trimmed data at checkpoints) is common.
const RETAIN: usize = 20;
const MAX_ATTEMPTS: u32 = 3;
/// Small, so a full queue (and a restart with a full queue) is common.
const MAX_QUEUE: usize = 10;
const VISIBILITY: u64 = 1000;
/// The smallest segment size: a few operations fill one.
const SEGMENT_BYTES: u64 = 4096;
const START_MS: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------
// Operations

#[derive(Debug, Clone)]
enum Op {
    /// `publish_batch` of one payload per size.
    Publish {
        topic: usize,
        sizes: Vec<usize>,
    },
    Delete {
        topic: usize,
    },
    /// One enqueue per size, all with `delay`.
    Enqueue {
        queue: usize,
        sizes: Vec<usize>,
        delay: u64,
    },
    Fetch {
        queue: usize,
        dlq: bool,
        max: usize,
    },
    /// Ack a current delivery, or (`stale`) any delivery id seen so far.
    Ack {
        pick: usize,
        stale: bool,
    },
    Requeue {
        pick: usize,
        stale: bool,
        delay: u64,
    },
    Advance(u64),
    /// Many small publishes to `BURST`: several segment switches and checkpoints.
    Burst,
    /// Flush, drop everything, reopen.
    Stop,
    /// Unacknowledged writes, drop everything, tear the newest segment, reopen.
    Crash {
        unacked: Vec<Unacked>,
        cut: u64,
    },
}

/// A write done during a crash: it completes, but the crash may take it back.
#[derive(Debug, Clone)]
enum Unacked {
    Publish { topic: usize, sizes: Vec<usize> },
    Enqueue { queue: usize, size: usize },
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 1..64usize, 1 => 1024..4096usize]
}

fn op() -> impl Strategy<Value = Op> {
    let unacked = prop_oneof![
        (0..TOPICS, prop::collection::vec(size(), 1..4)).prop_map(|(topic, sizes)| Unacked::Publish { topic, sizes }),
        (0..QUEUES, size()).prop_map(|(queue, size)| Unacked::Enqueue { queue, size }),
    ];
    prop_oneof![
        4 => (0..TOPICS, prop::collection::vec(size(), 1..=5)).prop_map(|(topic, sizes)| Op::Publish { topic, sizes }),
        1 => (0..TOPICS).prop_map(|topic| Op::Delete { topic }),
        3 => (0..QUEUES, prop::collection::vec(size(), 1..=2), prop_oneof![3 => Just(0u64), 1 => 1..1500u64])
            .prop_map(|(queue, sizes, delay)| Op::Enqueue { queue, sizes, delay }),
        5 => (0..QUEUES, prop::bool::weighted(0.25), 1..=3usize)
            .prop_map(|(queue, dlq, max)| Op::Fetch { queue, dlq, max }),
        3 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(pick, stale)| Op::Ack { pick, stale }),
        2 => (any::<usize>(), prop::bool::weighted(0.2), prop_oneof![Just(0u64), 1..1500u64])
            .prop_map(|(pick, stale, delay)| Op::Requeue { pick, stale, delay }),
        3 => prop_oneof![Just(VISIBILITY + 1), 1..500u64, Just(2500u64)].prop_map(Op::Advance),
        1 => Just(Op::Burst),
        1 => Just(Op::Stop),
        1 => (prop::collection::vec(unacked, 1..=4), any::<u64>()).prop_map(|(unacked, cut)| Op::Crash { unacked, cut }),
    ]
}

// ---------------------------------------------------------------------------------------
// The model

#[derive(Debug, Clone, PartialEq)]
enum State {
    Ready { since: u64 },
    Delayed { until: u64 },
    Leased { deadline: u64, delivery: String },
}

#[derive(Debug, Clone)]
struct Job {
    payload: Bytes,
    ts: u64,
    ready_at: u64,
    attempts: u32,
    state: State,
    /// In a dead-letter queue: the id the job had in its parent queue.
    origin: u64,
}

impl Job {
    /// A job as stored, never delivered (its state is set when inserted).
    fn new(payload: Bytes, ts: u64, ready_at: u64) -> Self {
        Self { payload, ts, ready_at, attempts: 0, state: State::Ready { since: ts }, origin: 0 }
    }
}

#[derive(Debug, Default)]
struct ModelQueue {
    next_id: u64,
    jobs: BTreeMap<u64, Job>,
    /// Removed (acked, dead-lettered) since the last restart: removals are written
    /// lazily, so after a crash these may be back. Before an earlier restart they were
    /// either back then (and adopted) or their removal was in the recovered log.
    removed: BTreeMap<u64, Job>,
}

impl ModelQueue {
    fn new() -> Self {
        Self { next_id: 1, ..Self::default() }
    }

    fn stats(&self) -> (u64, u64, u64) {
        let count = |f: fn(&State) -> bool| self.jobs.values().filter(|j| f(&j.state)).count() as u64;
        (
            count(|s| matches!(s, State::Ready { .. })),
            count(|s| matches!(s, State::Leased { .. })),
            count(|s| matches!(s, State::Delayed { .. })),
        )
    }

    fn find(&self, delivery: &str) -> Option<u64> {
        self.jobs
            .iter()
            .find(|(_, j)| matches!(&j.state, State::Leased { delivery: d, .. } if d == delivery))
            .map(|(id, _)| *id)
    }

    /// A record as the engine inserts it: delayed until `ready_at`, else ready since `ts`.
    fn insert(&mut self, id: u64, job: Job, now: u64) {
        let state =
            if job.ready_at > now { State::Delayed { until: job.ready_at } } else { State::Ready { since: job.ts } };
        self.jobs.insert(id, Job { state, ..job });
        self.next_id = self.next_id.max(id + 1);
    }

    fn fetch(&mut self, max: usize, now: u64) -> Vec<(u64, u32, Bytes)> {
        let mut ready: Vec<(u64, u64)> = self
            .jobs
            .iter()
            .filter_map(|(id, j)| match j.state {
                State::Ready { since } => Some((since, *id)),
                _ => None,
            })
            .collect();
        ready.sort_unstable();
        ready
            .into_iter()
            .take(max)
            .filter_map(|(_, id)| {
                let j = self.jobs.get_mut(&id)?;
                j.attempts += 1;
                j.state = State::Leased { deadline: now + VISIBILITY, delivery: String::new() };
                Some((id, j.attempts, j.payload.clone()))
            })
            .collect()
    }
}

/// A delivery ended without an ack at `at`: dead-lettered (a parent out of attempts),
/// delayed, or ready again.
fn release(q: &mut ModelQueue, dlq: Option<&mut ModelQueue>, id: u64, at: u64, delay: u64) {
    let attempts = q.jobs.get(&id).map_or(0, |j| j.attempts);
    match dlq {
        Some(dlq) if attempts >= MAX_ATTEMPTS => {
            if let Some(job) = q.jobs.remove(&id) {
                dead_letter(dlq, id, &job, at);
                q.removed.insert(id, job);
            }
        }
        _ => {
            if let Some(j) = q.jobs.get_mut(&id) {
                j.state = if delay > 0 { State::Delayed { until: at + delay } } else { State::Ready { since: at } };
            }
        }
    }
}

fn dead_letter(dlq: &mut ModelQueue, origin: u64, job: &Job, at: u64) {
    let id = dlq.next_id;
    dlq.insert(id, Job { origin, ..Job::new(job.payload.clone(), at, at) }, at);
}

/// Applies the delay ends and lease ends due at `now`, in time order (ties: delay end
/// first, then by id), as the engine does.
fn settle(q: &mut ModelQueue, mut dlq: Option<&mut ModelQueue>, now: u64) {
    loop {
        let next = q
            .jobs
            .iter()
            .filter_map(|(id, j)| match j.state {
                State::Delayed { until } => Some((until, 0, *id)),
                State::Leased { deadline, .. } => Some((deadline, 1, *id)),
                State::Ready { .. } => None,
            })
            .filter(|e| e.0 <= now)
            .min();
        let Some((at, kind, id)) = next else { return };
        if kind == 0 {
            if let Some(j) = q.jobs.get_mut(&id) {
                j.state = State::Ready { since: at };
            }
        } else {
            release(q, dlq.as_deref_mut(), id, at, 0);
        }
    }
}

struct Pair {
    name: QueueName,
    dlq_name: QueueName,
    parent: ModelQueue,
    dlq: ModelQueue,
}

struct ModelTopic {
    name: TopicName,
    /// Learned at the first start; then it changes only at a delete.
    epoch: String,
    earlier: Vec<String>,
    next: u64,
    /// The retained messages: (offset, ts, payload).
    retained: VecDeque<(u64, u64, Bytes)>,
}

impl ModelTopic {
    fn push(&mut self, offset: u64, ts: u64, payload: Bytes) {
        self.retained.push_back((offset, ts, payload));
        self.next = offset + 1;
        while self.retained.len() > RETAIN {
            self.retained.pop_front();
        }
    }
}

struct Model {
    now: u64,
    topics: Vec<ModelTopic>,
    queues: Vec<Pair>,
    /// Every delivery id handed out: (queue, in its dlq, id). Acks may name stale ones.
    seen: Vec<(usize, bool, String)>,
    payloads: u64,
}

impl Model {
    fn new() -> Self {
        let topics = (0..=BURST)
            .map(|i| ModelTopic {
                name: TopicName::parse(&format!("model.t{i}")).expect("a valid topic name"),
                epoch: String::new(),
                earlier: Vec::new(),
                next: 1,
                retained: VecDeque::new(),
            })
            .collect();
        let queues = (0..QUEUES)
            .map(|i| {
                let name = QueueName::parse(&format!("jobs{i}")).expect("a valid queue name");
                let dlq_name = name.dlq().expect("a queue has a dead-letter queue");
                Pair { name, dlq_name, parent: ModelQueue::new(), dlq: ModelQueue::new() }
            })
            .collect();
        Self { now: START_MS, topics, queues, seen: Vec::new(), payloads: 0 }
    }

    /// A payload no other write has: a serial number padded to `size`.
    fn payload(&mut self, size: usize) -> Bytes {
        self.payloads += 1;
        let mut p = format!("p{}:", self.payloads).into_bytes();
        let fill = b'a' + (self.payloads % 26) as u8;
        p.resize(size.max(p.len()), fill);
        Bytes::from(p)
    }

    /// A delivery id to ack or requeue: one of the current leases, or (`stale`) any id
    /// handed out so far, which may have been acked, requeued, or have expired.
    fn pick(&mut self, pick: usize, stale: bool) -> Option<(usize, bool, String)> {
        self.settle();
        let mut ids = Vec::new();
        if stale {
            ids.clone_from(&self.seen);
        } else {
            for (i, pair) in self.queues.iter().enumerate() {
                for (dlq, q) in [(false, &pair.parent), (true, &pair.dlq)] {
                    for job in q.jobs.values() {
                        if let State::Leased { delivery, .. } = &job.state {
                            ids.push((i, dlq, delivery.clone()));
                        }
                    }
                }
            }
        }
        (!ids.is_empty()).then(|| ids.swap_remove(pick % ids.len()))
    }

    fn settle(&mut self) {
        let now = self.now;
        for pair in &mut self.queues {
            settle(&mut pair.parent, Some(&mut pair.dlq), now);
            settle(&mut pair.dlq, None, now);
        }
    }
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

// ---------------------------------------------------------------------------------------
// Operations against the broker, checked against the model

async fn publish(broker: &Broker, model: &mut Model, topic: usize, sizes: &[usize]) -> Result<(), TestCaseError> {
    let payloads: Vec<Bytes> = sizes.iter().map(|&s| model.payload(s)).collect();
    let batch = payloads.iter().map(|p| NewMessage::new(Kind::Text, p.clone())).collect();
    let t = &mut model.topics[topic];
    let published = broker.publish_batch(&t.name, batch).await.map_err(fail)?;
    let offsets: Vec<u64> = published.iter().map(|p| p.offset).collect();
    let want: Vec<u64> = (t.next..t.next + sizes.len() as u64).collect();
    prop_assert_eq!(offsets, want, "offsets of a publish to {}", t.name);
    for (p, payload) in published.iter().zip(payloads) {
        t.push(p.offset, p.ts, payload);
    }
    Ok(())
}

async fn enqueue(
    broker: &Broker,
    model: &mut Model,
    queue: usize,
    size: usize,
    delay: u64,
) -> Result<(), TestCaseError> {
    model.settle();
    let payload = model.payload(size);
    let now = model.now;
    let pair = &mut model.queues[queue];
    let got = broker.queues().enqueue(&pair.name, NewMessage::new(Kind::Text, payload.clone()), delay).await;
    if pair.parent.jobs.len() >= MAX_QUEUE {
        prop_assert!(matches!(got, Err(QueueError::Full { .. })), "enqueue into a full {}: {:?}", pair.name, got);
    } else {
        // A queue with room takes the job, also right after a restart (no reservation
        // or record left over holds its room).
        let id = got.map_err(fail)?;
        prop_assert_eq!(id, pair.parent.next_id, "id of an enqueue into {}", pair.name);
        pair.parent.insert(id, Job::new(payload, now, now + delay), now);
    }
    Ok(())
}

async fn apply(broker: &Broker, clock: &ManualClock, model: &mut Model, op: Op) -> Result<(), TestCaseError> {
    match op {
        Op::Publish { topic, sizes } => publish(broker, model, topic, &sizes).await?,
        Op::Burst => {
            // 10 commits of 20 messages of 150 bytes: about 35 KiB of log, a segment
            // switch at nearly every commit and, with the rest of the log, checkpoints.
            for _ in 0..10 {
                publish(broker, model, BURST, &[150; 20]).await?;
            }
        }
        Op::Delete { topic } => {
            let t = &mut model.topics[topic];
            broker.delete(&t.name).await.map_err(fail)?;
            let head = broker.info(&t.name).await.map_err(fail)?.head;
            let epoch = head.epoch.to_string();
            prop_assert!(epoch != t.epoch && !t.earlier.contains(&epoch), "{} reused epoch {}", t.name, epoch);
            prop_assert_eq!((head.next, head.retained), (1, 0), "{} after its delete", t.name);
            t.earlier.push(std::mem::replace(&mut t.epoch, epoch));
            t.next = 1;
            t.retained.clear();
        }
        Op::Enqueue { queue, sizes, delay } => {
            for size in sizes {
                enqueue(broker, model, queue, size, delay).await?;
            }
        }
        Op::Fetch { queue, dlq, max } => {
            model.settle();
            let now = model.now;
            let pair = &mut model.queues[queue];
            let (name, q) = if dlq { (&pair.dlq_name, &mut pair.dlq) } else { (&pair.name, &mut pair.parent) };
            let want = q.fetch(max, now);
            let got = broker.queues().fetch(name, max, VISIBILITY);
            let got_jobs: Vec<(u64, u32, Bytes)> =
                got.iter().map(|d| (d.message_id, d.attempt, d.payload.clone())).collect();
            prop_assert_eq!(got_jobs, want, "fetch from {}", name);
            for d in got {
                if let Some(Job { state: State::Leased { delivery, .. }, .. }) = q.jobs.get_mut(&d.message_id) {
                    delivery.clone_from(&d.id);
                }
                model.seen.push((queue, dlq, d.id));
            }
        }
        Op::Ack { pick, stale } => {
            let Some((queue, dlq, delivery)) = model.pick(pick, stale) else { return Ok(()) };
            let pair = &mut model.queues[queue];
            let (name, q) = if dlq { (&pair.dlq_name, &mut pair.dlq) } else { (&pair.name, &mut pair.parent) };
            let want = q.find(&delivery);
            let got = broker.queues().ack(name, &delivery);
            match want {
                Some(id) => {
                    got.map_err(fail)?;
                    if let Some(job) = q.jobs.remove(&id) {
                        q.removed.insert(id, job);
                    }
                }
                None => prop_assert!(matches!(got, Err(QueueError::NotFound(_))), "ack of stale {delivery}: {got:?}"),
            }
        }
        Op::Requeue { pick, stale, delay } => {
            let Some((queue, dlq, delivery)) = model.pick(pick, stale) else { return Ok(()) };
            let now = model.now;
            let pair = &mut model.queues[queue];
            let name = if dlq { &pair.dlq_name } else { &pair.name };
            let got = broker.queues().requeue(name, &delivery, delay);
            let want = if dlq { pair.dlq.find(&delivery) } else { pair.parent.find(&delivery) };
            match want {
                Some(id) if dlq => release(&mut pair.dlq, None, id, now, delay),
                Some(id) => release(&mut pair.parent, Some(&mut pair.dlq), id, now, delay),
                None => {}
            }
            prop_assert_eq!(got.is_ok(), want.is_some(), "requeue of {}: {:?}", delivery, got);
        }
        Op::Advance(ms) => {
            clock.advance(ms);
            model.now += ms;
        }
        Op::Stop | Op::Crash { .. } => return Err(fail("restarts are the life loop's to handle")),
    }
    Ok(())
}

/// Every queue's counts against the model. The dead-letter queue first: its stats must
/// already hold what lease ends on the parent dead-lettered, the parent untouched.
fn check_stats(broker: &Broker, model: &mut Model) -> Result<(), TestCaseError> {
    model.settle();
    for pair in &model.queues {
        let (ready, in_flight, delayed) = pair.dlq.stats();
        prop_assert_eq!(broker.queues().stats(&pair.dlq_name), QueueStats { ready, in_flight, delayed, dead: 0 });
        let (ready, in_flight, delayed) = pair.parent.stats();
        let dead = pair.dlq.jobs.len() as u64;
        prop_assert_eq!(broker.queues().stats(&pair.name), QueueStats { ready, in_flight, delayed, dead });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Restarts

/// A write done during a crash, with what it returned.
#[derive(Debug)]
enum Pending {
    Message { topic: usize, offset: u64, ts: u64, payload: Bytes },
    Job { queue: usize, id: u64, payload: Bytes, ts: u64 },
}

enum Restart {
    First,
    Clean,
    Crash(Vec<Pending>),
}

enum End {
    /// No operations left; the last start was checked.
    Done,
    Stopped,
    /// `recorded`: the newest segment and its length after the last acknowledged write.
    Crashed {
        recorded: (u64, u64),
        cut: u64,
        pending: Vec<Pending>,
    },
}

/// The newest segment: (number, path, length).
fn newest_segment(dir: &Path) -> Result<(u64, PathBuf, u64), TestCaseError> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).map_err(fail)? {
        let path = entry.map_err(fail)?.path();
        let seq = path.file_name().and_then(|n| n.to_str()?.strip_suffix(".log")?.parse::<u64>().ok());
        if let Some(seq) = seq.filter(|&s| newest.as_ref().is_none_or(|(n, _)| s > *n)) {
            newest = Some((seq, path));
        }
    }
    let (seq, path) = newest.ok_or_else(|| fail("no segment in the data directory"))?;
    let len = std::fs::metadata(&path).map_err(fail)?.len();
    Ok((seq, path, len))
}

/// Cuts the newest segment where a crash during the unacknowledged writes could have:
/// at or after the length it had after the last acknowledged write (anywhere, if the
/// writer moved on to a newer segment since).
fn tear(dir: &Path, recorded: (u64, u64), cut: u64) -> Result<(), TestCaseError> {
    let (seq, path, len) = newest_segment(dir)?;
    let from = if seq == recorded.0 { recorded.1 } else { 0 };
    prop_assert!(len >= from, "segment {} shrank from {} to {}", seq, from, len);
    let at = from + cut % (len - from + 1);
    OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(at)).map_err(fail)?;
    Ok(())
}

fn disk_config(dir: &Path) -> DiskConfig {
    DiskConfig {
        dir: dir.to_owned(),
        // An acknowledged write is fully in its segment: a torn tail never holds one.
        fsync: FsyncPolicy::Always,
        segment_bytes: SEGMENT_BYTES,
        repair: false,
        retention: RetentionConfig {
            max_messages: RETAIN as u64,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 0,
        },
        // Small: most reads of history go to the log, not the cache.
        cache_bytes: 2048,
    }
}

fn broker_config() -> BrokerConfig {
    let queues = QueueConfig { max_attempts: MAX_ATTEMPTS, max_queue_messages: MAX_QUEUE, max_waiters_per_queue: 8 };
    BrokerConfig { queues, ..BrokerConfig::default() }
}

type Loaded<'a> = BTreeMap<u64, (&'a QueueRecord, u32)>;

fn loaded_records(snapshot: Option<&QueueSnapshot>) -> Loaded<'_> {
    snapshot
        .map(|s| s.records.iter().map(|r| (r.id, (r, s.attempts.get(&r.id).copied().unwrap_or(0)))).collect())
        .unwrap_or_default()
}

/// Checks one queue and its dead-letter queue as recovered against the model (from
/// before the restart, present unacknowledged enqueues adopted).
fn check_pair(
    pair: &Pair,
    s: Option<&QueueSnapshot>,
    sd: Option<&QueueSnapshot>,
    crash: bool,
) -> Result<(), TestCaseError> {
    let (got, got_dlq) = (loaded_records(s), loaded_records(sd));
    let name = &pair.name;
    // Nothing enqueued and acknowledged is lost; its delivery count is kept (a crash
    // may lose the newest counts: they are written lazily, never ahead of the truth).
    for (id, job) in &pair.parent.jobs {
        let Some((r, attempts)) = got.get(id) else {
            return Err(fail(format!("job {id} of {name} was lost (crash: {crash})")));
        };
        prop_assert_eq!((&r.payload, r.ts, r.ready_at), (&job.payload, job.ts, job.ready_at), "job {} of {}", id, name);
        if crash {
            prop_assert!(
                *attempts <= job.attempts,
                "job {} of {}: {} attempts, {} made",
                id,
                name,
                attempts,
                job.attempts
            );
        } else {
            prop_assert_eq!(*attempts, job.attempts, "attempts of job {} of {}", id, name);
        }
    }
    // Nothing else is there, except (after a crash) jobs whose lazy removal was lost.
    for (id, (r, _)) in &got {
        if !pair.parent.jobs.contains_key(id) {
            let back = crash && pair.parent.removed.get(id).is_some_and(|j| j.payload == r.payload);
            prop_assert!(
                back,
                "job {} of {} is back after a {} restart",
                id,
                name,
                if crash { "crash" } else { "clean" }
            );
        }
    }
    // No dead letter is lost: it is in the dead-letter queue or, after a crash, still in
    // its parent (the parent's copy is removed only after the dead letter is durable).
    for (id, job) in &pair.dlq.jobs {
        match got_dlq.get(id) {
            Some((r, attempts)) => {
                prop_assert_eq!((&r.payload, r.ts), (&job.payload, job.ts), "dead letter {} of {}", id, name);
                prop_assert!(
                    if crash { *attempts <= job.attempts } else { *attempts == job.attempts },
                    "dead letter {} of {}: {} attempts, {} made",
                    id,
                    name,
                    attempts,
                    job.attempts
                );
            }
            None => {
                let kept = crash && got.get(&job.origin).is_some_and(|(r, _)| r.payload == job.payload);
                prop_assert!(kept, "dead letter {} (job {}) of {} was lost (crash: {})", id, job.origin, name, crash);
            }
        }
    }
    for (id, (r, _)) in &got_dlq {
        if !pair.dlq.jobs.contains_key(id) {
            let back = crash && pair.dlq.removed.get(id).is_some_and(|j| j.payload == r.payload);
            prop_assert!(back, "dead letter {} of {} is back (crash: {})", id, name, crash);
        }
    }
    // Ids: an acknowledged enqueue's id is never given out again.
    let next = s.map_or(1, |s| s.next_id);
    if crash {
        prop_assert!(next >= pair.parent.next_id, "{} next id {} < {}", name, next, pair.parent.next_id);
    } else {
        prop_assert_eq!(next, pair.parent.next_id, "next id of {}", name);
        prop_assert_eq!(sd.map_or(1, |s| s.next_id), pair.dlq.next_id, "next id of {}", pair.dlq_name);
    }
    Ok(())
}

/// The model's queue after a start: every record recovered, ready again (or delayed to
/// its enqueue delay) with the attempts it had; no lease survives.
fn adopt(q: &mut ModelQueue, snapshot: Option<&QueueSnapshot>, now: u64) {
    let old = std::mem::take(&mut q.jobs);
    let removed = std::mem::take(&mut q.removed);
    q.next_id = snapshot.map_or(1, |s| s.next_id);
    for (id, (r, attempts)) in loaded_records(snapshot) {
        let origin = old.get(&id).or(removed.get(&id)).map_or(0, |j| j.origin);
        q.insert(id, Job { attempts, origin, ..Job::new(r.payload.clone(), r.ts, r.ready_at) }, now);
    }
}

/// Checks the recovered store against the model, then brings the model to the state the
/// restarted engine must have.
async fn recover(
    store: &DiskStore,
    broker: &Broker,
    loaded: Vec<QueueSnapshot>,
    model: &mut Model,
    restart: Restart,
) -> Result<(), TestCaseError> {
    let (crash, pending) = match restart {
        Restart::First => {
            prop_assert!(loaded.is_empty(), "a new store holds queues");
            (false, Vec::new())
        }
        Restart::Clean => (false, Vec::new()),
        Restart::Crash(pending) => (true, pending),
    };
    let count = loaded.len();
    let loaded: BTreeMap<String, QueueSnapshot> = loaded.into_iter().map(|s| (s.queue.to_string(), s)).collect();
    prop_assert_eq!(loaded.len(), count, "a queue loaded twice");
    for s in loaded.values() {
        // One record per id, no id at or past the next one.
        prop_assert!(s.records.windows(2).all(|w| w[0].id < w[1].id), "duplicate ids in {}", s.queue);
        prop_assert!(s.records.last().is_none_or(|r| r.id < s.next_id), "{} next id below a record", s.queue);
    }
    let mut heads: Vec<TopicHead> = Vec::with_capacity(model.topics.len());
    for t in &model.topics {
        heads.push(store.head(&t.name).await.map_err(fail)?);
    }

    // The unacknowledged writes that survived: a prefix, in the order they were made.
    let present: Vec<bool> = pending
        .iter()
        .map(|p| match p {
            Pending::Message { topic, offset, .. } => *offset < heads[*topic].next,
            Pending::Job { queue, id, .. } => {
                loaded.get(model.queues[*queue].name.as_str()).is_some_and(|s| s.records.iter().any(|r| r.id == *id))
            }
        })
        .collect();
    prop_assert!(
        present.windows(2).all(|w| w[0] || !w[1]),
        "surviving unacknowledged writes are no prefix: {:?}",
        present
    );
    for (p, _) in pending.into_iter().zip(present).filter(|(_, present)| *present) {
        match p {
            Pending::Message { topic, offset, ts, payload } => model.topics[topic].push(offset, ts, payload),
            Pending::Job { queue, id, payload, ts } => {
                let now = model.now;
                model.queues[queue].parent.insert(id, Job::new(payload, ts, ts), now);
            }
        }
    }

    // Topics: every retained acknowledged message (and the surviving unacknowledged
    // ones), nothing else, same offsets, timestamps, bytes and epoch.
    for (t, head) in model.topics.iter_mut().zip(heads) {
        if t.epoch.is_empty() {
            t.epoch = head.epoch.to_string();
        }
        prop_assert_eq!(&*head.epoch, t.epoch.as_str(), "epoch of {}", t.name);
        prop_assert_eq!(head.next, t.next, "next offset of {}", t.name);
        let fetched = broker.fetch(&t.name, 0, 1000).await.map_err(fail)?;
        prop_assert_eq!(&*fetched.epoch, t.epoch.as_str(), "epoch of what was read from {}", t.name);
        let got: Vec<(u64, u64, Bytes)> =
            fetched.messages.iter().map(|m| (m.offset, m.ts, m.payload.clone())).collect();
        let want: Vec<(u64, u64, Bytes)> = t.retained.iter().cloned().collect();
        prop_assert_eq!(got, want, "messages of {}", t.name);
    }

    // Queues.
    let now = model.now;
    for pair in &mut model.queues {
        let s = loaded.get(pair.name.as_str());
        let sd = loaded.get(pair.dlq_name.as_str());
        check_pair(pair, s, sd, crash)?;
        adopt(&mut pair.parent, s, now);
        adopt(&mut pair.dlq, sd, now);
        // A job whose last allowed delivery was cut off is dead-lettered at load, as at a
        // lease end.
        let spent: Vec<u64> =
            pair.parent.jobs.iter().filter(|(_, j)| j.attempts >= MAX_ATTEMPTS).map(|(id, _)| *id).collect();
        for id in spent {
            if let Some(job) = pair.parent.jobs.remove(&id) {
                dead_letter(&mut pair.dlq, id, &job, now);
                pair.parent.removed.insert(id, job);
            }
        }
    }
    check_stats(broker, model)?;
    // No queue is stuck full: one enqueue each, which must succeed if there is room.
    for queue in 0..QUEUES {
        enqueue(broker, model, queue, 8, 0).await?;
    }
    check_stats(broker, model)
}

/// One process life: open the store, check it, run operations until a stop or a crash.
async fn life(
    dir: &Path,
    clock: &Arc<ManualClock>,
    model: &mut Model,
    ops: &mut impl Iterator<Item = Op>,
    restart: Restart,
) -> Result<(End, Weak<DiskStore>), TestCaseError> {
    let store = Arc::new(DiskStore::open_with_clock(disk_config(dir), clock.clone()).map_err(fail)?);
    let weak = Arc::downgrade(&store);
    // The queues as recovered, before the engine dead-letters anything at load.
    let loaded = store.queue_load();
    let broker = Broker::with_clock(store.clone(), broker_config(), clock.clone());
    recover(&store, &broker, loaded, model, restart).await?;
    for op in ops.by_ref() {
        match op {
            Op::Stop => {
                broker.flush().await.map_err(fail)?;
                return Ok((End::Stopped, weak));
            }
            Op::Crash { unacked, cut } => {
                // No checkpoint at the stop: the log's tail is left as a crash leaves it.
                store.close_as_crash();
                let (seq, _, len) = newest_segment(dir)?;
                let pending = unacknowledged(&broker, model, unacked).await?;
                return Ok((End::Crashed { recorded: (seq, len), cut, pending }, weak));
            }
            op => {
                apply(&broker, clock, model, op).await?;
                check_stats(&broker, model)?;
            }
        }
    }
    Ok((End::Done, weak))
}

/// Writes that complete before the crash but are not counted as acknowledged: the crash
/// may cut them. The model is left as it was; their results are returned.
async fn unacknowledged(
    broker: &Broker,
    model: &mut Model,
    unacked: Vec<Unacked>,
) -> Result<Vec<Pending>, TestCaseError> {
    let mut pending = Vec::new();
    let mut next: Vec<u64> = model.topics.iter().map(|t| t.next).collect();
    let mut ids: Vec<u64> = model.queues.iter().map(|p| p.parent.next_id).collect();
    let mut held: Vec<usize> = model.queues.iter().map(|p| p.parent.jobs.len()).collect();
    for u in unacked {
        match u {
            Unacked::Publish { topic, sizes } => {
                let payloads: Vec<Bytes> = sizes.iter().map(|&s| model.payload(s)).collect();
                let batch = payloads.iter().map(|p| NewMessage::new(Kind::Text, p.clone())).collect();
                let published = broker.publish_batch(&model.topics[topic].name, batch).await.map_err(fail)?;
                for (p, payload) in published.iter().zip(payloads) {
                    prop_assert_eq!(p.offset, next[topic], "offset of an unacknowledged publish");
                    next[topic] += 1;
                    pending.push(Pending::Message { topic, offset: p.offset, ts: p.ts, payload });
                }
            }
            Unacked::Enqueue { queue, size } => {
                let payload = model.payload(size);
                let name = &model.queues[queue].name;
                let got = broker.queues().enqueue(name, NewMessage::new(Kind::Text, payload.clone()), 0).await;
                if held[queue] >= MAX_QUEUE {
                    prop_assert!(matches!(got, Err(QueueError::Full { .. })), "enqueue into a full {}", name);
                    continue;
                }
                let id = got.map_err(fail)?;
                prop_assert_eq!(id, ids[queue], "id of an unacknowledged enqueue into {}", name);
                ids[queue] += 1;
                held[queue] += 1;
                pending.push(Pending::Job { queue, id, payload, ts: model.now });
            }
        }
    }
    Ok(pending)
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static CASE: AtomicU64 = AtomicU64::new(0);
        let n = CASE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("herald-model-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(mut ops: Vec<Op>) -> Result<(), TestCaseError> {
    // End with a clean stop, so the last operations are checked after a restart too.
    ops.push(Op::Stop);
    let dir = TempDir::new();
    let clock = Arc::new(ManualClock::new(START_MS));
    let mut model = Model::new();
    let mut ops = ops.into_iter();
    let mut restart = Restart::First;
    loop {
        // A runtime per life: dropping it cancels what is still running (a dead
        // letter's removal waiting for its append), as a process exit does.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(fail)?;
        let (end, store) = rt.block_on(life(&dir.0, &clock, &mut model, &mut ops, restart))?;
        drop(rt);
        // The writer thread joined and the LOCK is released, or the reopen would fail.
        prop_assert!(store.upgrade().is_none(), "the store outlived its broker and runtime");
        restart = match end {
            End::Done => return Ok(()),
            End::Stopped => Restart::Clean,
            End::Crashed { recorded, cut, pending } => {
                tear(&dir.0, recorded, cut)?;
                Restart::Crash(pending)
            }
        };
    }
}

/// 24 cases by default (under a second here, fsync being cheap; well under a minute on
/// a slow disk); `HERALD_MODEL_CASES=1000` searches longer.
fn cases() -> u32 {
    std::env::var("HERALD_MODEL_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn restarts_keep_what_the_model_says(ops in prop::collection::vec(op(), 30..60)) {
        run(ops)?;
    }
}

/// Found by the model once history went cold: a trim made by commits a crash then took
/// away (the model's unacknowledged publish) deleted the segment holding a message the
/// checkpoint still counted, and the restart lost it. Segments are now deleted by what
/// the newest complete checkpoint saw.
#[test]
fn a_trim_undone_by_a_crash_deletes_no_segment() {
    use Op::*;
    let ops = vec![
        Advance(226),
        Burst,
        Publish { topic: 2, sizes: vec![30] },
        Stop,
        Enqueue { queue: 1, sizes: vec![14], delay: 109 },
        Enqueue { queue: 1, sizes: vec![46], delay: 0 },
        Burst,
        Stop,
        Fetch { queue: 1, dlq: false, max: 2 },
        Publish { topic: 2, sizes: vec![25, 28, 41, 62, 57] },
        Publish { topic: 1, sizes: vec![2169, 52, 34, 59] },
        Requeue { pick: 17657784250970962043, stale: false, delay: 0 },
        Enqueue { queue: 1, sizes: vec![1785], delay: 0 },
        Burst,
        Fetch { queue: 1, dlq: false, max: 3 },
        Publish { topic: 0, sizes: vec![10, 32, 4, 9, 8] },
        Stop,
        Publish { topic: 2, sizes: vec![12, 11, 37, 2601] },
        Requeue { pick: 15199513676922836222, stale: false, delay: 0 },
        Requeue { pick: 2768790271530520079, stale: false, delay: 952 },
        Enqueue { queue: 1, sizes: vec![6, 29], delay: 0 },
        Publish { topic: 0, sizes: vec![5] },
        Ack { pick: 7231739479994297608, stale: false },
        Ack { pick: 416030454456470243, stale: false },
        Advance(367),
        Publish { topic: 2, sizes: vec![35, 62, 31, 2, 3] },
        Fetch { queue: 1, dlq: true, max: 3 },
        Publish { topic: 2, sizes: vec![35, 1338, 3367, 9, 51] },
        Enqueue { queue: 1, sizes: vec![55, 36], delay: 963 },
        Enqueue { queue: 0, sizes: vec![42, 45], delay: 0 },
        Publish { topic: 1, sizes: vec![8] },
        Fetch { queue: 1, dlq: false, max: 1 },
        Fetch { queue: 1, dlq: true, max: 3 },
        Fetch { queue: 0, dlq: false, max: 1 },
        Publish { topic: 0, sizes: vec![26, 3452, 5, 56] },
        Ack { pick: 3731520416222991952, stale: false },
        Fetch { queue: 0, dlq: true, max: 2 },
        Advance(1001),
        Crash {
            unacked: vec![
                Unacked::Enqueue { queue: 1, size: 29 },
                Unacked::Publish { topic: 0, sizes: vec![2, 45, 1] },
                Unacked::Enqueue { queue: 1, size: 22 },
                Unacked::Publish { topic: 2, sizes: vec![22, 7, 10] },
            ],
            cut: 7307947421710221026,
        },
        Delete { topic: 0 },
        Ack { pick: 14636993439868897947, stale: true },
        Advance(290),
        Requeue { pick: 10735744071008029891, stale: true, delay: 0 },
        Advance(2500),
        Enqueue { queue: 1, sizes: vec![31, 61], delay: 0 },
        Fetch { queue: 1, dlq: false, max: 1 },
    ];
    if let Err(e) = run(ops) {
        panic!("{e}");
    }
}
