//! Work queues with at-least-once delivery: enqueue (with delay and TTL), fetch with a
//! visibility timeout and long poll, ack, requeue, lease extension, redelivery,
//! `max_attempts` and the dead-letter queue `{queue}.dlq`.
//!
//! Each queue's state sits behind one `std::sync::Mutex` (never held across an await).
//! Time-driven changes (a delay ending, a lease ending, a TTL passing) are kept in three
//! deadline heaps per queue and applied lazily, in time order, at the start of every
//! operation: no task or timer per message, and what any caller observes is exact for
//! the current time. An operation on a dead-letter queue settles its parent queue first,
//! so a dead letter is there from the moment the last lease ended. Long-poll waiters
//! sleep until the next deadline (on a dead-letter queue, also the parent's next lease
//! end) or a wake-up.

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::broker::futures_now;
use crate::config::QueueConfig;
use crate::message::{Clock, Kind, NewMessage};
use crate::name::QueueName;
use crate::store::{QueueRecord, Store, StoreError};

/// Errors of queue operations; each maps to one client-facing code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// Enqueue into a dead-letter queue.
    #[error("{0} is a dead-letter queue: Herald fills it, clients cannot enqueue into it")]
    DeadLetterQueue(QueueName),
    /// The payload is over `max_message_bytes`.
    #[error("payload of {size} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The payload size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The queue holds `max_queue_messages` already.
    #[error("queue {queue} is full ({max} messages); retry after consumers catch up")]
    Full {
        /// The queue.
        queue: QueueName,
        /// The limit.
        max: usize,
    },
    /// `max_waiters_per_queue` long polls are already waiting on this queue.
    #[error("too many fetches are waiting on queue {0}")]
    TooManyWaiters(QueueName),
    /// The delivery id is not the message's current delivery.
    #[error("delivery {0} is not current (unknown, acked, or its lease ended)")]
    NotFound(String),
    /// Redrive of a dead-letter queue (it has none).
    #[error("{0}")]
    Unsupported(String),
    /// The store failed; the operation did not happen.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One delivery of a queue message to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The delivery id: ack, requeue and extend name it; it is current until the lease ends.
    pub id: String,
    /// The message id within its queue.
    pub message_id: u64,
    /// Deliveries of this message so far, this one included.
    pub attempt: u32,
    /// Enqueue time (dead-letter time in a dead-letter queue).
    pub ts: u64,
    /// The payload kind.
    pub kind: Kind,
    /// The payload.
    pub payload: Bytes,
}

/// A queue's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Ready to be fetched.
    pub ready: u64,
    /// Fetched and not yet acked, requeued or expired.
    pub in_flight: u64,
    /// Waiting for their delay to pass.
    pub delayed: u64,
    /// Messages in the queue's dead-letter queue, whatever their state there.
    pub dead: u64,
}

/// A queue [`QueueService::list`] names, with its counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedQueue {
    /// The queue (never a dead-letter queue: those are counted in `stats.dead`).
    pub queue: QueueName,
    /// Its counts, as [`QueueService::stats`] gives them.
    pub stats: QueueStats,
}

/// What every [`QueueService`] refuses before it stores an enqueue: a dead-letter queue
/// (only Herald fills those) and a payload over `max_message_bytes`.
pub fn check_enqueue(name: &QueueName, msg: &NewMessage, max_message_bytes: usize) -> Result<(), QueueError> {
    if name.is_dlq() {
        return Err(QueueError::DeadLetterQueue(name.clone()));
    }
    if msg.payload.len() > max_message_bytes {
        return Err(QueueError::TooLarge { size: msg.payload.len(), max: max_message_bytes });
    }
    Ok(())
}

/// Which queue names a [`QueueService::list`] call may return (the front door's rights
/// check); the others are skipped before their counts are read.
pub type Visible<'a> = &'a (dyn Fn(&QueueName) -> bool + Send + Sync);

/// A boxed future of a queue operation.
pub type QueueFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, QueueError>> + Send + 'a>>;

/// A fetch as the front doors serve it: `acks` (a worker's finished jobs, possibly
/// none) and a first try together ([`QueueService::ack_and_fetch`]); if that took
/// nothing, a long poll of up to `wait`, which `stop` (the server shutting down) ends
/// with nothing taken. Resolves with the acks' outcomes, in order, and the fetch's.
pub async fn fetch_acking(
    queues: &dyn QueueService,
    name: &QueueName,
    acks: &[String],
    (max, visibility_ms, wait): (usize, u64, Duration),
    stop: impl Future<Output = ()>,
) -> (Vec<Result<(), QueueError>>, Result<Vec<Delivery>, QueueError>) {
    let (acked, first) = match acks.is_empty() {
        true => (Vec::new(), None),
        false => {
            let (acked, first) = queues.ack_and_fetch(name, acks, max, visibility_ms).await;
            (acked, Some(first))
        }
    };
    let fetched = match first {
        Some(Ok(got)) if !got.is_empty() || wait.is_zero() => Ok(got),
        Some(Err(e)) => Err(e),
        _ => tokio::select! {
            got = queues.fetch_wait(name, max, visibility_ms, wait) => got,
            // A pending long poll is answered with what it has: nothing was taken.
            () = stop => Ok(Vec::new()),
        },
    };
    (acked, fetched)
}

/// A boxed future of a batch operation: one outcome per entry, in the batch's order.
pub type BatchFuture<'a, T> = Pin<Box<dyn Future<Output = Vec<Result<T, QueueError>>> + Send + 'a>>;

/// A boxed future of [`QueueService::ack_and_fetch`]: the acks' outcomes, in order, and
/// the fetch's.
pub type AckFetchFuture<'a> =
    Pin<Box<dyn Future<Output = (Vec<Result<(), QueueError>>, Result<Vec<Delivery>, QueueError>)> + Send + 'a>>;

/// Work queues as the front doors call them: this node's own engine ([`Queues`]) on a
/// single node, or queues every node of a cluster shares (kept in the cluster's Redis).
/// Both keep the semantics of the module docs; the queue conformance suite in
/// `herald-testkit` checks every implementation against them.
pub trait QueueService: Send + Sync + 'static {
    /// Enqueues `msg`; resolves with its message id once it is durable.
    fn enqueue<'a>(&'a self, name: &'a QueueName, msg: NewMessage, delay_ms: u64) -> QueueFuture<'a, u64>;

    /// Enqueues a batch (each message with its delay); resolves with one outcome per
    /// entry, in the batch's order, and the entries' ids follow that order. The entries
    /// are handed on together, so a store that group-commits (disk, PostgreSQL) writes
    /// the batch in one commit. Not atomic: an entry refused (full, too large) or
    /// failed leaves the others stored.
    ///
    /// The default starts the entries' enqueues in order (`join_all` polls them first
    /// in order), which keeps the order for a service whose `enqueue` takes its id
    /// before its first await, as the engine's does; a service that awaits before
    /// (PostgreSQL's writer channel, Redis's script call) overrides it. The queue
    /// conformance suite checks the order of 1000 entries on every service.
    fn enqueue_batch<'a>(&'a self, name: &'a QueueName, batch: Vec<(NewMessage, u64)>) -> BatchFuture<'a, u64> {
        let entries: Vec<_> = batch.into_iter().map(|(msg, delay_ms)| self.enqueue(name, msg, delay_ms)).collect();
        Box::pin(futures_util::future::join_all(entries))
    }

    /// Acknowledges several deliveries of one queue at once; one outcome per delivery,
    /// in the order given (a store that batches acks, as PostgreSQL's does, writes them
    /// together).
    fn ack_batch<'a>(&'a self, name: &'a QueueName, deliveries: &'a [String]) -> BatchFuture<'a, ()> {
        let acks: Vec<_> = deliveries.iter().map(|d| self.ack(name, d)).collect();
        Box::pin(futures_util::future::join_all(acks))
    }

    /// Acknowledges `deliveries` (as [`Self::ack_batch`]) and takes up to `max` ready
    /// messages (as [`Self::fetch_wait`] without a wait), together: a worker's
    /// finished jobs go with its next fetch. Resolves with one ack outcome per
    /// delivery, in order, and the fetch's outcome. The default runs the two at once;
    /// a store that can serve both in one round trip overrides it.
    fn ack_and_fetch<'a>(
        &'a self,
        name: &'a QueueName,
        deliveries: &'a [String],
        max: usize,
        visibility_ms: u64,
    ) -> AckFetchFuture<'a> {
        Box::pin(async move {
            let acks = async {
                match deliveries.is_empty() {
                    true => Vec::new(),
                    false => self.ack_batch(name, deliveries).await,
                }
            };
            futures_util::future::join(acks, self.fetch_wait(name, max, visibility_ms, Duration::ZERO)).await
        })
    }

    /// Takes up to `max` ready messages, leasing each for `visibility_ms`; waits up to
    /// `wait` for one to become ready.
    fn fetch_wait<'a>(
        &'a self,
        name: &'a QueueName,
        max: usize,
        visibility_ms: u64,
        wait: Duration,
    ) -> QueueFuture<'a, Vec<Delivery>>;

    /// Acknowledges a delivery: the message is done.
    fn ack<'a>(&'a self, name: &'a QueueName, delivery: &'a str) -> QueueFuture<'a, ()>;

    /// Gives a delivery back: ready again (after `delay_ms`), or dead-lettered once the
    /// message had `max_attempts` deliveries.
    fn requeue<'a>(&'a self, name: &'a QueueName, delivery: &'a str, delay_ms: u64) -> QueueFuture<'a, ()>;

    /// Extends a delivery's lease: it now ends `visibility_ms` from now.
    fn extend<'a>(&'a self, name: &'a QueueName, delivery: &'a str, visibility_ms: u64) -> QueueFuture<'a, ()>;

    /// The queue's counts (all 0 for a queue never used).
    fn stats<'a>(&'a self, name: &'a QueueName) -> QueueFuture<'a, QueueStats>;

    /// Admin: removes every ready and delayed message of the queue (leased ones stay
    /// with their workers); resolves with how many. A dead-letter queue may be purged.
    fn purge<'a>(&'a self, name: &'a QueueName) -> QueueFuture<'a, u64>;

    /// Admin: moves up to `max` ready messages of the queue's dead-letter queue back to
    /// it, oldest first, as new messages (attempts from 0); resolves with how many once
    /// they are durable in the queue.
    /// Refused (`Unsupported`) for a dead-letter queue.
    fn redrive<'a>(&'a self, name: &'a QueueName, max: usize) -> QueueFuture<'a, u64>;

    /// Up to `limit` queues whose names start with `prefix`, sort after `after` (byte
    /// order) and are `visible`, in name order, with their counts. A queue is listed from
    /// its first enqueue on, also once it is empty again; dead-letter queues are not
    /// listed (their queue's `dead` counts them).
    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
        visible: Visible<'a>,
    ) -> QueueFuture<'a, Vec<ListedQueue>>;

    /// This node's queue counters and gauges.
    fn counters(&self) -> &QueueCounters;
}

impl QueueService for Queues {
    fn enqueue<'a>(&'a self, name: &'a QueueName, msg: NewMessage, delay_ms: u64) -> QueueFuture<'a, u64> {
        Box::pin(Queues::enqueue(self, name, msg, delay_ms))
    }

    fn fetch_wait<'a>(
        &'a self,
        name: &'a QueueName,
        max: usize,
        visibility_ms: u64,
        wait: Duration,
    ) -> QueueFuture<'a, Vec<Delivery>> {
        Box::pin(Queues::fetch_wait(self, name, max, visibility_ms, wait))
    }

    fn ack<'a>(&'a self, name: &'a QueueName, delivery: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(std::future::ready(Queues::ack(self, name, delivery)))
    }

    fn requeue<'a>(&'a self, name: &'a QueueName, delivery: &'a str, delay_ms: u64) -> QueueFuture<'a, ()> {
        Box::pin(std::future::ready(Queues::requeue(self, name, delivery, delay_ms)))
    }

    fn extend<'a>(&'a self, name: &'a QueueName, delivery: &'a str, visibility_ms: u64) -> QueueFuture<'a, ()> {
        Box::pin(std::future::ready(Queues::extend(self, name, delivery, visibility_ms)))
    }

    fn stats<'a>(&'a self, name: &'a QueueName) -> QueueFuture<'a, QueueStats> {
        Box::pin(std::future::ready(Ok(Queues::stats(self, name))))
    }

    fn purge<'a>(&'a self, name: &'a QueueName) -> QueueFuture<'a, u64> {
        Box::pin(std::future::ready(Ok(Queues::purge(self, name))))
    }

    fn redrive<'a>(&'a self, name: &'a QueueName, max: usize) -> QueueFuture<'a, u64> {
        Box::pin(Queues::redrive(self, name, max))
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
        visible: Visible<'a>,
    ) -> QueueFuture<'a, Vec<ListedQueue>> {
        Box::pin(std::future::ready(Ok(Queues::list(self, prefix, after, limit, visible))))
    }

    fn counters(&self) -> &QueueCounters {
        Queues::counters(self)
    }
}

/// The queues of one broker.
pub struct Queues {
    shards: Box<[Mutex<QueueTable>]>,
    hasher: RandomState,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: QueueConfig,
    max_message_bytes: usize,
    deliveries: AtomicU64,
    /// Shared with the tasks that finish durable enqueues.
    counters: Arc<QueueCounters>,
    /// Dead letters whose store writes (append, then the original's removal) are still
    /// being finished by a task: [`Queues::dead_letters_persisted`] waits for them.
    persisting: Arc<Persisting>,
}

/// A count of tasks finishing dead letters, and a wake-up for when it reaches zero.
#[derive(Default)]
struct Persisting {
    tasks: AtomicUsize,
    idle: Notify,
}

/// Counts one dead letter's task from before it is spawned until it ends, however it
/// ends (finished, or dropped with its runtime).
struct PersistingTask(Arc<Persisting>);

impl PersistingTask {
    fn start(persisting: &Arc<Persisting>) -> Self {
        persisting.tasks.fetch_add(1, Ordering::AcqRel);
        Self(persisting.clone())
    }
}

impl Drop for PersistingTask {
    fn drop(&mut self) {
        if self.0.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Queue-wide counters and gauges, for metrics.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Messages enqueued (durably).
    pub enqueued: AtomicU64,
    /// Deliveries handed to consumers (first and later attempts).
    pub delivered: AtomicU64,
    /// Deliveries acknowledged.
    pub acked: AtomicU64,
    /// Messages moved to a dead-letter queue.
    pub dead_lettered: AtomicU64,
    /// Long-poll fetches waiting now.
    pub waiting: AtomicUsize,
    /// Deliveries after the first of a message (a lease ended or it was requeued).
    pub redelivered: AtomicU64,
}

/// One shard of the queue table.
type QueueTable = HashMap<QueueName, Arc<Queue>>;

struct Queue {
    name: QueueName,
    state: Mutex<QueueState>,
    /// Woken whenever messages become ready by enqueue or requeue.
    ready: Notify,
    waiters: AtomicUsize,
    /// The dead-letter queue (`None` for a dead-letter queue itself).
    dlq: Option<Arc<Queue>>,
    /// For a dead-letter queue, the queue it takes dead letters from: settled first by
    /// every operation here, since a lease ending there may owe this queue a message.
    parent: Option<QueueName>,
}

#[derive(Default)]
struct QueueState {
    next_id: u64,
    /// Ids handed out to enqueues still waiting for their durable write.
    reserved: usize,
    entries: HashMap<u64, Entry>,
    /// Ready messages by (time they became ready, id): fetch takes the smallest.
    ready: BTreeSet<(u64, u64)>,
    delayed: BinaryHeap<Reverse<(u64, u64)>>,
    /// (deadline, id, lease): stale entries (acked, extended) are skipped when popped.
    leases: BinaryHeap<Reverse<(u64, u64, u64)>>,
    expiries: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: u64,
    delayed_count: u64,
    next_lease: u64,
}

struct Entry {
    kind: Kind,
    payload: Bytes,
    ts: u64,
    attempt: u32,
    expires_at: Option<u64>,
    state: EntryState,
}

enum EntryState {
    Ready { since: u64 },
    Delayed { until: u64 },
    Leased { lease: u64, deadline: u64, delivery: Arc<str> },
}

/// The kinds of timed event, in the order they apply when they fall on the same instant.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    Expiry,
    DelayEnd,
    LeaseEnd,
}

/// An id handed to an enqueue whose durable write is pending. It counts against
/// `max_queue_messages` until the write resolved; dropped unresolved (the task finishing
/// the enqueue cancelled, say at shutdown), it gives the count back.
struct Reservation {
    q: Arc<Queue>,
    held: bool,
}

impl Reservation {
    /// The durable write resolved: the message becomes visible if it is stored.
    fn land(
        mut self,
        stored: Result<(), StoreError>,
        record: &QueueRecord,
        clock: &dyn Clock,
        counters: &QueueCounters,
    ) -> Result<u64, QueueError> {
        self.held = false;
        let mut st = lock(&self.q.state);
        st.reserved -= 1;
        stored?;
        // Visible only once durable: a consumer never sees what a crash could lose. Due
        // events are left to the next operation's settle, which applies them in time order.
        st.insert(record.id, record, 0, clock.now_ms());
        drop(st);
        counters.enqueued.fetch_add(1, Ordering::Relaxed);
        self.q.ready.notify_waiters();
        Ok(record.id)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held {
            lock(&self.q.state).reserved -= 1;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn top<T: Ord + Copy>(heap: &BinaryHeap<Reverse<T>>) -> Option<T> {
    heap.peek().map(|Reverse(t)| *t)
}

impl QueueState {
    fn make_ready(&mut self, id: u64, since: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.state = EntryState::Ready { since };
            self.ready.insert((since, id));
        }
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        match entry.state {
            EntryState::Ready { since } => {
                self.ready.remove(&(since, id));
            }
            EntryState::Delayed { .. } => self.delayed_count -= 1,
            EntryState::Leased { .. } => self.in_flight -= 1,
        }
        Some(entry)
    }

    /// The earliest pending timed event, stale heap entries included (they only cause
    /// an early, harmless re-check).
    fn next_due(&self) -> Option<u64> {
        [top(&self.delayed).map(|t| t.0), top(&self.leases).map(|t| t.0), top(&self.expiries).map(|t| t.0)]
            .into_iter()
            .flatten()
            .min()
    }

    fn insert(&mut self, id: u64, record: &QueueRecord, attempt: u32, now: u64) {
        let state = if record.ready_at > now {
            self.delayed.push(Reverse((record.ready_at, id)));
            self.delayed_count += 1;
            EntryState::Delayed { until: record.ready_at }
        } else {
            self.ready.insert((record.ts, id));
            EntryState::Ready { since: record.ts }
        };
        if let Some(at) = record.expires_at {
            self.expiries.push(Reverse((at, id)));
        }
        let entry = Entry {
            kind: record.kind,
            payload: record.payload.clone(),
            ts: record.ts,
            attempt,
            expires_at: record.expires_at,
            state,
        };
        self.entries.insert(id, entry);
    }
}

impl Queues {
    /// Queues over `store`, on `clock`, starting from what the store recovered.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: QueueConfig, max_message_bytes: usize) -> Self {
        let queues = Self {
            shards: (0..32).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            store,
            clock,
            config,
            max_message_bytes,
            deliveries: AtomicU64::new(0),
            counters: Arc::default(),
            persisting: Arc::default(),
        };
        let now = queues.clock.now_ms();
        // Every snapshot is in before anything is dead-lettered: the store lists queues
        // in no particular order, and a dead letter given an id before its dead-letter
        // queue's own snapshot (records and next id) is in would take an id in use.
        let mut loaded = Vec::new();
        for snapshot in queues.store.queue_load() {
            let q = queues.queue(&snapshot.queue);
            let mut st = lock(&q.state);
            st.next_id = st.next_id.max(snapshot.next_id);
            let mut spent = Vec::new();
            for record in &snapshot.records {
                st.next_id = st.next_id.max(record.id + 1);
                // In flight at the crash or not: ready again, with the attempts it had.
                let attempts = snapshot.attempts.get(&record.id).copied().unwrap_or(0);
                st.insert(record.id, record, attempts, now);
                if attempts >= queues.config.max_attempts {
                    spent.push(record.id);
                }
            }
            drop(st);
            loaded.push((q, spent));
        }
        for (q, spent) in loaded {
            let mut st = lock(&q.state);
            // A delivery cut off by the crash ended without an ack: if it was the last
            // one allowed, the message is dead-lettered as at a lease end.
            if let Some(dlq) = &q.dlq {
                for id in spent {
                    if let Some(entry) = st.remove(id) {
                        queues.dead_letter(&q.name, id, dlq, entry, now);
                    }
                }
            }
            queues.settle(&q, &mut st, now);
        }
        queues
    }

    /// Counters and gauges of all queues.
    pub fn counters(&self) -> &QueueCounters {
        &self.counters
    }

    /// The configuration.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    fn lookup(&self, name: &QueueName) -> Option<Arc<Queue>> {
        let i = self.hasher.hash_one(name) as usize % self.shards.len();
        lock(&self.shards[i]).get(name).cloned()
    }

    fn queue(&self, name: &QueueName) -> Arc<Queue> {
        if let Some(q) = self.lookup(name) {
            return q;
        }
        // A queue and its dead-letter queue are created together, dead-letter first.
        let dlq = name.dlq().map(|d| self.queue(&d));
        let i = self.hasher.hash_one(name) as usize % self.shards.len();
        lock(&self.shards[i])
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(Queue {
                    name: name.clone(),
                    state: Mutex::new(QueueState { next_id: 1, ..Default::default() }),
                    ready: Notify::new(),
                    waiters: AtomicUsize::new(0),
                    dlq,
                    parent: name.parent(),
                })
            })
            .clone()
    }

    /// A delivery id that cannot be guessed from another: message id, attempt, and 48
    /// bits from a randomly keyed hash of a counter.
    fn delivery_id(&self, id: u64, attempt: u32) -> Arc<str> {
        let n = self.deliveries.fetch_add(1, Ordering::Relaxed);
        let nonce = self.hasher.hash_one(n) & 0xffff_ffff_ffff;
        Arc::from(format!("{id:x}-{attempt}-{nonce:x}"))
    }

    /// For a dead-letter queue, applies the timed events due at `now` on its parent queue:
    /// settling is lazy and per queue, and a lease ending there moves its message here,
    /// so without this a dead letter would wait for the parent's next operation. Called
    /// without `q`'s lock: the lock order is queue, then its dead-letter queue.
    fn settle_parent(&self, q: &Queue, now: u64) {
        if let Some(parent) = q.parent.as_ref().and_then(|p| self.lookup(p)) {
            let mut st = lock(&parent.state);
            self.settle(&parent, &mut st, now);
        }
    }

    /// Applies every timed event due at `now`, in time order.
    fn settle(&self, q: &Queue, st: &mut QueueState, now: u64) {
        loop {
            let next = [
                top(&st.expiries).map(|(t, id)| (t, Due::Expiry, id, 0)),
                top(&st.delayed).map(|(t, id)| (t, Due::DelayEnd, id, 0)),
                top(&st.leases).map(|(t, id, lease)| (t, Due::LeaseEnd, id, lease)),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some((at, due, id, lease)) = next.filter(|n| n.0 <= now) else {
                return;
            };
            match due {
                Due::Expiry => {
                    st.expiries.pop();
                    if st.entries.get(&id).is_some_and(|e| e.expires_at == Some(at)) {
                        st.remove(id);
                        self.store.queue_remove(&q.name, vec![id]);
                    }
                }
                Due::DelayEnd => {
                    st.delayed.pop();
                    let current = st
                        .entries
                        .get(&id)
                        .is_some_and(|e| matches!(e.state, EntryState::Delayed { until } if until == at));
                    if current {
                        st.delayed_count -= 1;
                        st.make_ready(id, at);
                    }
                }
                Due::LeaseEnd => {
                    st.leases.pop();
                    let current = st.entries.get(&id).is_some_and(|e| {
                        matches!(e.state, EntryState::Leased { lease: l, deadline, .. } if l == lease && deadline == at)
                    });
                    if current {
                        st.in_flight -= 1;
                        self.release(q, st, id, at, 0);
                    }
                }
            }
        }
    }

    /// A delivery ended without an ack (lease ended, or requeue): ready again at `at`
    /// (after `delay`), or dead-lettered once it had `max_attempts` deliveries.
    /// The entry must be out of the in-flight count already.
    fn release(&self, q: &Queue, st: &mut QueueState, id: u64, at: u64, delay: u64) {
        let attempts = st.entries.get(&id).map_or(0, |e| e.attempt);
        match &q.dlq {
            Some(dlq) if attempts >= self.config.max_attempts => {
                // Out of every index already (its lease was counted off by the caller).
                if let Some(entry) = st.entries.remove(&id) {
                    self.dead_letter(&q.name, id, dlq, entry, at);
                }
            }
            _ if delay > 0 => {
                let until = at + delay;
                if let Some(e) = st.entries.get_mut(&id) {
                    e.state = EntryState::Delayed { until };
                    st.delayed.push(Reverse((until, id)));
                    st.delayed_count += 1;
                }
            }
            _ => st.make_ready(id, at),
        }
    }

    /// Moves message `id` of `queue`, already out of its state, to the dead-letter queue
    /// as a new message, visible there at once. Lock order is always queue, then its
    /// dead-letter queue (which never dead-letters), so this cannot deadlock.
    ///
    /// In the store, the dead letter is appended first and the message removed from
    /// `queue` only once that append resolved: a crash in between leaves it in both, and
    /// after the restart `queue`'s copy, out of attempts, is dead-lettered again (or, if
    /// its lazily written attempt count was lost too, delivered once more): a duplicate,
    /// never a loss. A failed append leaves it stored in `queue` likewise.
    fn dead_letter(&self, queue: &QueueName, id: u64, dlq: &Queue, entry: Entry, now: u64) {
        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&dlq.state);
        let dead_id = st.next_id;
        st.next_id += 1;
        let record = QueueRecord {
            id: dead_id,
            kind: entry.kind,
            payload: entry.payload,
            ts: now,
            ready_at: now,
            expires_at: None,
        };
        st.insert(dead_id, &record, 0, now);
        // Issued under the lock, so that an ack of the dead letter (which needs this
        // lock) cannot reach the store before its append.
        let mut append = self.store.queue_append(&dlq.name, vec![record]);
        drop(st);
        dlq.ready.notify_waiters();
        let store = self.store.clone();
        let queue = queue.clone();
        let done = move |appended: Result<(), StoreError>| match appended {
            Ok(()) => store.queue_remove(&queue, vec![id]),
            Err(e) => {
                tracing::warn!(error = %e, %queue, id, "persisting a dead letter failed; it stays stored in its queue")
            }
        };
        // The memory store resolves at once; a durable store's append is finished by a
        // task, the removal after it. With no runtime to run one, the removal is never
        // issued: the message stays stored in `queue` too, a duplicate after a restart.
        match futures_now(&mut append) {
            Some(appended) => done(appended),
            None => {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    let task = PersistingTask::start(&self.persisting);
                    handle.spawn(async move {
                        done(append.await);
                        drop(task);
                    });
                }
            }
        }
    }

    /// Enqueues `msg`; resolves with its message id once it is durable.
    pub async fn enqueue(&self, name: &QueueName, msg: NewMessage, delay_ms: u64) -> Result<u64, QueueError> {
        check_enqueue(name, &msg, self.max_message_bytes)?;
        let q = self.queue(name);
        let now = self.clock.now_ms();
        let (id, reservation) = {
            let mut st = lock(&q.state);
            self.settle(&q, &mut st, now);
            if st.entries.len() + st.reserved >= self.config.max_queue_messages {
                return Err(QueueError::Full { queue: name.clone(), max: self.config.max_queue_messages });
            }
            st.reserved += 1;
            st.next_id += 1;
            (st.next_id - 1, Reservation { q: q.clone(), held: true })
        };
        let record = QueueRecord {
            id,
            kind: msg.kind,
            payload: msg.payload,
            ts: now,
            ready_at: now + delay_ms,
            expires_at: msg.ttl_ms.map(|ttl| now.saturating_add(ttl)),
        };
        let mut stored = self.store.queue_append(name, vec![record.clone()]);
        // The memory store resolves at once: insert inline. A durable store resolves
        // later; finish on a task of its own, so that a caller that goes away (deadline,
        // reset, client gone) can leave neither a reservation counted against the limit
        // nor a durably stored message that no worker can see until a restart.
        let (clock, counters) = (self.clock.clone(), self.counters.clone());
        match futures_now(&mut stored) {
            Some(stored) => reservation.land(stored, &record, &*clock, &counters),
            None => match tokio::runtime::Handle::try_current() {
                Ok(handle) => handle
                    .spawn(async move { reservation.land(stored.await, &record, &*clock, &counters) })
                    .await
                    .map_err(|_| QueueError::Store(StoreError::Closed))?,
                // Polled outside a runtime: no task to hand over to. The reservation is
                // still released if this future is dropped.
                Err(_) => reservation.land(stored.await, &record, &*clock, &counters),
            },
        }
    }

    /// Takes up to `max` ready messages, leasing each for `visibility_ms`.
    pub fn fetch(&self, name: &QueueName, max: usize, visibility_ms: u64) -> Vec<Delivery> {
        let q = self.queue(name);
        self.fetch_from(&q, max, visibility_ms)
    }

    fn fetch_from(&self, q: &Queue, max: usize, visibility_ms: u64) -> Vec<Delivery> {
        let now = self.clock.now_ms();
        self.settle_parent(q, now);
        let mut st = lock(&q.state);
        self.settle(q, &mut st, now);
        let mut out = Vec::new();
        while out.len() < max {
            let Some((_, id)) = st.ready.pop_first() else { break };
            st.next_lease += 1;
            let lease = st.next_lease;
            let deadline = now + visibility_ms;
            let Some(e) = st.entries.get_mut(&id) else { continue };
            e.attempt += 1;
            let delivery = self.delivery_id(id, e.attempt);
            out.push(Delivery {
                id: delivery.to_string(),
                message_id: id,
                attempt: e.attempt,
                ts: e.ts,
                kind: e.kind,
                payload: e.payload.clone(),
            });
            e.state = EntryState::Leased { lease, deadline, delivery };
            st.leases.push(Reverse((deadline, id, lease)));
            st.in_flight += 1;
        }
        self.counters.delivered.fetch_add(out.len() as u64, Ordering::Relaxed);
        let again = out.iter().filter(|d| d.attempt > 1).count();
        if again > 0 {
            self.counters.redelivered.fetch_add(again as u64, Ordering::Relaxed);
        }
        if !out.is_empty() {
            self.store.queue_delivered(&q.name, out.iter().map(|d| (d.message_id, d.attempt)).collect());
        }
        out
    }

    /// Like [`Queues::fetch`], but waits up to `wait` for a message to become ready.
    pub async fn fetch_wait(
        &self,
        name: &QueueName,
        max: usize,
        visibility_ms: u64,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let q = self.queue(name);
        let got = self.fetch_from(&q, max, visibility_ms);
        if !got.is_empty() || wait.is_zero() {
            return Ok(got);
        }
        if q.waiters.fetch_add(1, Ordering::AcqRel) >= self.config.max_waiters_per_queue {
            q.waiters.fetch_sub(1, Ordering::AcqRel);
            return Err(QueueError::TooManyWaiters(name.clone()));
        }
        struct Waiting<'a>(&'a AtomicUsize, &'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
                self.1.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.counters.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&q.waiters, &self.counters.waiting);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let woken = q.ready.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let got = self.fetch_from(&q, max, visibility_ms);
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            // Sleep to the wait's end, or to the next delay or lease ending, whichever
            // is first; an enqueue or requeue wakes us at once. On a dead-letter queue, a
            // lease ending on the parent may bring a dead letter: wake then too (a
            // dead letter the parent's own operations move wakes us through `ready`).
            let mut next_due = lock(&q.state).next_due();
            if let Some(parent) = q.parent.as_ref().and_then(|p| self.lookup(p)) {
                let lease_end = top(&lock(&parent.state).leases).map(|(at, _, _)| at);
                next_due = next_due.into_iter().chain(lease_end).min();
            }
            let clock_now = self.clock.now_ms();
            let until = match next_due {
                Some(at) => deadline.min(now + Duration::from_millis(at.saturating_sub(clock_now))),
                None => deadline,
            };
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    fn with_delivery<T>(
        &self,
        name: &QueueName,
        delivery: &str,
        f: impl FnOnce(&Queue, &mut QueueState, u64, u64) -> T,
    ) -> Result<T, QueueError> {
        let not_found = || QueueError::NotFound(delivery.to_owned());
        let id = delivery.split('-').next().and_then(|hex| u64::from_str_radix(hex, 16).ok()).ok_or_else(not_found)?;
        let q = self.lookup(name).ok_or_else(not_found)?;
        let now = self.clock.now_ms();
        self.settle_parent(&q, now);
        let mut st = lock(&q.state);
        self.settle(&q, &mut st, now);
        let current = st
            .entries
            .get(&id)
            .is_some_and(|e| matches!(&e.state, EntryState::Leased { delivery: d, .. } if **d == *delivery));
        if !current {
            return Err(not_found());
        }
        Ok(f(&q, &mut st, id, now))
    }

    /// Removes every ready and delayed message of `name` (leased ones stay with their
    /// workers: their ack, requeue or lease end applies as usual). Returns how many.
    pub fn purge(&self, name: &QueueName) -> u64 {
        let Some(q) = self.lookup(name) else { return 0 };
        let now = self.clock.now_ms();
        self.settle_parent(&q, now);
        let mut st = lock(&q.state);
        self.settle(&q, &mut st, now);
        let ids: Vec<u64> = st
            .entries
            .iter()
            .filter(|(_, e)| !matches!(e.state, EntryState::Leased { .. }))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            st.remove(*id);
        }
        if !ids.is_empty() {
            // Issued under the lock, like every removal of this queue.
            self.store.queue_remove(&q.name, ids.clone());
        }
        ids.len() as u64
    }

    /// Moves up to `max` ready messages of `name`'s dead-letter queue back to `name`,
    /// oldest first, as new messages (new ids, attempts from 0, ready at once). Resolves
    /// with how many, once they are durable in `name`.
    ///
    /// As with dead-lettering, the copies are appended to `name` first and removed
    /// from the dead-letter queue only once that append resolved: a crash in between
    /// leaves a message in both (a duplicate after the restart, never a loss). They are
    /// visible to workers at once, the append issued under the queue's lock so that an
    /// ack cannot reach the store before it. Bounded by `max_queue_messages`: only what
    /// fits moves.
    pub async fn redrive(&self, name: &QueueName, max: usize) -> Result<u64, QueueError> {
        if name.is_dlq() {
            return Err(QueueError::Unsupported(format!("{name} is a dead-letter queue: it has none to redrive")));
        }
        let q = self.queue(name);
        let Some(dlq) = q.dlq.clone() else { return Ok(0) };
        let now = self.clock.now_ms();
        // Lock order: the queue, then its dead-letter queue. The locks are released
        // before the append is awaited.
        let (moved, dead_ids, append) = {
            let mut st = lock(&q.state);
            self.settle(&q, &mut st, now);
            let room = self.config.max_queue_messages.saturating_sub(st.entries.len() + st.reserved);
            let mut dst = lock(&dlq.state);
            self.settle(&dlq, &mut dst, now);
            let mut records = Vec::new();
            let mut dead_ids = Vec::new();
            while records.len() < max.min(room) {
                let Some(&(since, dead_id)) = dst.ready.first() else { break };
                let Some(entry) = dst.remove(dead_id) else {
                    dst.ready.remove(&(since, dead_id));
                    continue;
                };
                let id = st.next_id;
                st.next_id += 1;
                let record = QueueRecord {
                    id,
                    kind: entry.kind,
                    payload: entry.payload,
                    ts: now,
                    ready_at: now,
                    expires_at: entry.expires_at,
                };
                st.insert(id, &record, 0, now);
                records.push(record);
                dead_ids.push(dead_id);
            }
            if records.is_empty() {
                return Ok(0);
            }
            (records.len() as u64, dead_ids, self.store.queue_append(&q.name, records))
        };
        q.ready.notify_waiters();
        let store = self.store.clone();
        let dlq_name = dlq.name.clone();
        let finish = async move {
            let appended = append.await;
            if appended.is_ok() {
                store.queue_remove(&dlq_name, dead_ids);
            }
            appended
        };
        // Finished on a task of its own, so that a caller going away cannot leave the
        // dead letters' removal unissued.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let task = PersistingTask::start(&self.persisting);
                handle
                    .spawn(async move {
                        let appended = finish.await;
                        drop(task);
                        appended
                    })
                    .await
                    .map_err(|_| QueueError::Store(StoreError::Closed))??
            }
            Err(_) => finish.await?,
        }
        Ok(moved)
    }

    /// Acknowledges a delivery: the message is done.
    pub fn ack(&self, name: &QueueName, delivery: &str) -> Result<(), QueueError> {
        self.with_delivery(name, delivery, |q, st, id, _| {
            st.remove(id);
            self.store.queue_remove(&q.name, vec![id]);
        })?;
        self.counters.acked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Gives a delivery back: ready again (after `delay_ms`), or dead-lettered once the
    /// message had `max_attempts` deliveries.
    pub fn requeue(&self, name: &QueueName, delivery: &str, delay_ms: u64) -> Result<(), QueueError> {
        self.with_delivery(name, delivery, |q, st, id, now| {
            st.in_flight -= 1;
            self.release(q, st, id, now, delay_ms);
        })?;
        if let Some(q) = self.lookup(name) {
            q.ready.notify_waiters();
        }
        Ok(())
    }

    /// Extends a delivery's lease: it now ends `visibility_ms` from now.
    pub fn extend(&self, name: &QueueName, delivery: &str, visibility_ms: u64) -> Result<(), QueueError> {
        self.with_delivery(name, delivery, |_, st, id, now| {
            let deadline = now + visibility_ms;
            if let Some(e) = st.entries.get_mut(&id) {
                if let EntryState::Leased { lease, deadline: d, .. } = &mut e.state {
                    *d = deadline;
                    let lease = *lease;
                    st.leases.push(Reverse((deadline, id, lease)));
                }
            }
        })
    }

    /// The queue's counts (all 0 for a queue never used).
    pub fn stats(&self, name: &QueueName) -> QueueStats {
        let Some(q) = self.lookup(name) else {
            return QueueStats::default();
        };
        let now = self.clock.now_ms();
        self.settle_parent(&q, now);
        let mut stats = {
            let mut st = lock(&q.state);
            self.settle(&q, &mut st, now);
            QueueStats { ready: st.ready.len() as u64, in_flight: st.in_flight, delayed: st.delayed_count, dead: 0 }
        };
        if let Some(dlq) = &q.dlq {
            let mut st = lock(&dlq.state);
            self.settle(dlq, &mut st, now);
            stats.dead = st.entries.len() as u64;
        }
        stats
    }

    /// The `n` queues with the most messages (ready, in flight, delayed and dead
    /// together), largest first, with their counts: what `/metrics` exports per queue,
    /// so that 10 000 queues still make a bounded number of series. Dead-letter queues
    /// are counted in their queue's `dead`, not listed. Also returns how many queues
    /// there are.
    pub fn top(&self, n: usize) -> (usize, Vec<(QueueName, QueueStats)>) {
        let names: Vec<QueueName> = self
            .shards
            .iter()
            .flat_map(|shard| {
                lock(shard).values().filter(|q| q.dlq.is_some()).map(|q| q.name.clone()).collect::<Vec<_>>()
            })
            .collect();
        let total = names.len();
        let mut all: Vec<(QueueName, QueueStats)> = names
            .into_iter()
            .map(|name| {
                let stats = self.stats(&name);
                (name, stats)
            })
            .collect();
        let size = |s: &QueueStats| s.ready + s.in_flight + s.delayed + s.dead;
        all.sort_unstable_by(|a, b| size(&b.1).cmp(&size(&a.1)).then_with(|| a.0.as_str().cmp(b.0.as_str())));
        all.truncate(n);
        (total, all)
    }

    /// The queues [`QueueService::list`] names: those with a dead-letter queue (so not a
    /// dead-letter queue) that have had an enqueue (a fetch or stats call on a name never
    /// used creates nothing a list shows).
    pub fn list(&self, prefix: &str, after: Option<&str>, limit: usize, visible: Visible<'_>) -> Vec<ListedQueue> {
        let mut candidates: Vec<Arc<Queue>> = self
            .shards
            .iter()
            .flat_map(|shard| {
                lock(shard)
                    .values()
                    .filter(|q| {
                        let name = q.name.as_str();
                        q.dlq.is_some() && name.starts_with(prefix) && after.is_none_or(|a| name > a)
                    })
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        candidates.sort_unstable_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        candidates
            .into_iter()
            .filter(|q| lock(&q.state).next_id > 1 && visible(&q.name))
            .take(limit)
            .map(|q| ListedQueue { stats: self.stats(&q.name), queue: q.name.clone() })
            .collect()
    }

    /// Resolves once every dead letter made so far has finished its store writes: its
    /// append resolved and the original's removal was issued. A clean stop calls this
    /// (through [`crate::Broker::flush`]) before the store's flush, so that no removal is
    /// still waiting in a task when the process exits: otherwise the original would
    /// still be stored in its queue and be dead-lettered again at the next start.
    pub async fn dead_letters_persisted(&self) {
        loop {
            let idle = self.persisting.idle.notified();
            tokio::pin!(idle);
            // Registered before the count is read, so a task ending in between wakes us.
            idle.as_mut().enable();
            if self.persisting.tasks.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Wakes every long poll (shutdown answers them with what they have).
    pub fn wake_all(&self) {
        for shard in self.shards.iter() {
            for q in lock(shard).values() {
                q.ready.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests;
