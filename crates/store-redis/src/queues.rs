//! `RedisQueues`: work queues every node of a cluster shares, with the semantics of the
//! single-node engine (visibility timeouts, extend, requeue with delay, attempts, the
//! dead-letter queue, TTL, long poll), kept in Redis sorted sets and hashes in the style
//! of BullMQ and Sidekiq and changed only by one Lua script (`queues.lua`, where the key
//! layout is described), one call per operation. A queue and its dead-letter queue are
//! one family under one hash tag `{sq:<queue>}`, so a dead letter moves atomically,
//! also on Redis Cluster.
//!
//! Time is the calling node's clock, passed to the script: nodes' clocks should agree
//! (NTP); a skew shifts a lease's or a delay's end by that much, never loses a message.
//! Timed changes are applied lazily by whichever operation comes next, as on one node.
//!
//! Long polls: a node with a fetch waiting on a queue subscribes to the family's wake
//! channel through its [`RedisBus`] (before its first try, so no wake-up falls between
//! a try and the wait), and sleeps until a wake-up, the next delay or lease end the
//! script reported, or the wait's end. A lost pub/sub connection wakes every waiter to
//! try again.
//!
//! `list` reads the queue registry (`<prefix>squeues`, a sorted set every enqueue adds
//! its queue to, once per node, and nothing removes from; a key of its own outside the
//! families' hash tags, so written by its own ZADD before the enqueue script) and each
//! listed queue's counts.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use herald_core::{
    check_enqueue, BatchFuture, Clock, Delivery, ListedQueue, NewMessage, QueueConfig, QueueCounters, QueueError,
    QueueFuture, QueueName, QueueService, QueueStats, StoreError, Visible,
};
use tokio::sync::Notify;

use crate::bus::Channel;
use crate::{
    family_key, kind_of, lock, registry_page, registry_start, Inner, RedisBus, RedisStore, LIST_PAGE, LUA_MAX,
};

/// The queue script, with the publish command filled in at start.
const SCRIPT: &str = include_str!("queues.lua");

/// Work queues shared through Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisQueues {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<Inner>,
    bus: RedisBus,
    clock: Arc<dyn Clock>,
    config: QueueConfig,
    max_message_bytes: usize,
    script: redis::Script,
    /// Families with long polls waiting on this node, by family.
    families: Mutex<HashMap<QueueName, Family>>,
    counters: QueueCounters,
    hasher: RandomState,
    nonces: AtomicU64,
    /// Queues this node has added to the registry (`<prefix>squeues`): one ZADD per
    /// queue and node, not one per enqueue.
    registered: Mutex<HashSet<QueueName>>,
}

/// The long polls of one queue family waiting on this node.
#[derive(Default)]
struct Family {
    /// Waiting fetches on either queue: the wake channel is watched while above zero.
    users: usize,
    main: Arc<Waiters>,
    dlq: Arc<Waiters>,
}

#[derive(Default)]
struct Waiters {
    count: AtomicUsize,
    ready: Notify,
}

/// Where a queue lives: its family and which queue of it.
struct Place {
    family: QueueName,
    dlq: bool,
}

impl Place {
    fn of(name: &QueueName) -> Self {
        match name.parent() {
            Some(parent) => Place { family: parent, dlq: true },
            // A queue, or a `x.dlq.dlq` (no parent, never fed): a family of its own.
            None => Place { family: name.clone(), dlq: false },
        }
    }
}

impl RedisQueues {
    /// The queues of `store`'s Redis, woken through `bus`, on `clock`.
    pub fn new(
        store: &RedisStore,
        bus: &RedisBus,
        clock: Arc<dyn Clock>,
        config: QueueConfig,
        max_message_bytes: usize,
    ) -> Self {
        let publish = if store.inner.target.cluster { "SPUBLISH" } else { "PUBLISH" };
        let shared = Arc::new(Shared {
            store: store.inner.clone(),
            bus: bus.clone(),
            clock,
            config,
            max_message_bytes,
            script: redis::Script::new(&SCRIPT.replace("__PUBLISH__", publish)),
            families: Mutex::new(HashMap::new()),
            counters: QueueCounters::default(),
            hasher: RandomState::new(),
            nonces: AtomicU64::new(0),
            registered: Mutex::new(HashSet::new()),
        });
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        bus.on_queue_wake(Box::new(move |event| {
            if let Some(shared) = weak.upgrade() {
                shared.woken(event);
            }
        }));
        Self { shared }
    }
}

/// A script reply: the answer's fields (the dead-letter count already taken off).
type Reply = Vec<Vec<u8>>;

fn text(field: &[u8]) -> &str {
    std::str::from_utf8(field).unwrap_or("")
}

fn number(field: &[u8]) -> Result<u64, StoreError> {
    text(field).parse().map_err(|_| StoreError::Unavailable(format!("redis: a bad number {:?}", text(field))))
}

/// The message member (16 hex digits) a delivery id names, if it is well-formed.
fn member_of(delivery: &str) -> Option<String> {
    let hex = delivery.split('-').next()?;
    u64::from_str_radix(hex, 16).ok().map(|id| format!("{id:016x}"))
}

impl Shared {
    fn woken(&self, event: Option<(&QueueName, bool)>) {
        let families = lock(&self.families);
        match event {
            Some((family, dlq)) => {
                if let Some(f) = families.get(family) {
                    if dlq { &f.dlq } else { &f.main }.ready.notify_waiters();
                }
            }
            None => {
                for f in families.values() {
                    f.main.ready.notify_waiters();
                    f.dlq.ready.notify_waiters();
                }
            }
        }
    }

    /// Runs the script for `op` on `name`'s family with `args` after the common ones.
    async fn call(&self, name: &QueueName, op: &str, args: &[&[u8]]) -> Result<Reply, QueueError> {
        let place = Place::of(name);
        let prefix = &self.store.prefix;
        let mut call = self.script.prepare_invoke();
        for q in ["m", "d"] {
            for what in ["h", "r", "w", "l", "x"] {
                call.key(family_key(prefix, &place.family, &format!("{q}:{what}")));
            }
        }
        call.arg(op)
            .arg(if place.dlq { "d" } else { "m" })
            .arg(self.clock.now_ms())
            .arg(self.config.max_attempts)
            .arg(family_key(prefix, &place.family, "wake"));
        for a in args {
            call.arg(*a);
        }
        let mut con = self.store.con.clone();
        let mut reply: Reply = self.store.answered(call.invoke_async(&mut con).await)?;
        if reply.is_empty() {
            return Err(StoreError::Unavailable("redis: an empty queue script reply".into()).into());
        }
        let dead = number(&reply.remove(0))?;
        self.counters.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        Ok(reply)
    }

    /// Enqueues `batch` with one script call (after the checks every enqueue passes);
    /// one outcome per entry, in order.
    async fn enqueue_many(&self, name: &QueueName, batch: Vec<(NewMessage, u64)>) -> Vec<Result<u64, QueueError>> {
        let checked: Vec<_> = batch
            .into_iter()
            .map(|(msg, delay_ms)| check_enqueue(name, &msg, self.max_message_bytes).map(|()| (msg, delay_ms)))
            .collect();
        let fields: Vec<[Vec<u8>; 3]> = checked
            .iter()
            .flatten()
            .map(|(msg, delay_ms)| {
                let delay = delay_ms.min(&LUA_MAX).to_string().into_bytes();
                let ttl = msg.ttl_ms.map_or_else(Vec::new, |t| t.min(LUA_MAX).to_string().into_bytes());
                [msg.kind.as_str().as_bytes().to_vec(), delay, ttl]
            })
            .collect();
        let mut stored = if fields.is_empty() {
            Ok(Vec::new())
        } else {
            let max = (self.config.max_queue_messages as u64).min(LUA_MAX).to_string();
            let mut args: Vec<&[u8]> = vec![max.as_bytes()];
            for ((msg, _), [kind, delay, ttl]) in checked.iter().flatten().zip(&fields) {
                args.extend([&kind[..], delay, ttl, &msg.payload]);
            }
            match self.register(name).await {
                Ok(()) => self.call(name, "enqueue", &args).await,
                Err(e) => Err(e),
            }
        }
        .map(Vec::into_iter);
        let full = || QueueError::Full { queue: name.clone(), max: self.config.max_queue_messages };
        checked
            .into_iter()
            .map(|entry| {
                entry?;
                let reply = stored.as_mut().map_err(|e| e.clone())?;
                match reply.next().as_deref().map(text) {
                    Some("full") => Err(full()),
                    Some(id) => {
                        let id = number(id.as_bytes())?;
                        self.counters.enqueued.fetch_add(1, Ordering::Relaxed);
                        Ok(id)
                    }
                    None => Err(StoreError::Unavailable("redis: an enqueue reply too short".into()).into()),
                }
            })
            .collect()
    }

    fn registry(&self) -> String {
        format!("{}squeues", self.store.prefix)
    }

    /// Adds `name` to the queue registry, unless this node did already. Before the
    /// enqueue: a queue may be listed (empty) whose first enqueue failed, but never be
    /// missing from the list while it holds messages.
    async fn register(&self, name: &QueueName) -> Result<(), QueueError> {
        if lock(&self.registered).contains(name) {
            return Ok(());
        }
        let mut con = self.store.con.clone();
        let added = redis::cmd("ZADD").arg(self.registry()).arg(0).arg(name.as_str()).query_async::<()>(&mut con).await;
        self.store.answered(added)?;
        lock(&self.registered).insert(name.clone());
        Ok(())
    }

    /// One page of the registry from `cursor` (a ZRANGE BYLEX bound).
    async fn registry_page(&self, cursor: &str) -> Result<Vec<String>, QueueError> {
        let mut con = self.store.con.clone();
        Ok(self.store.answered(registry_page(&mut con, &self.registry(), cursor).await)?)
    }

    /// One ack, requeue or extend: `not_found` unless `delivery` is the current lease.
    async fn settle_delivery(
        &self,
        name: &QueueName,
        op: &str,
        delivery: &str,
        arg: Option<u64>,
    ) -> Result<(), QueueError> {
        let not_found = || QueueError::NotFound(delivery.to_owned());
        let member = member_of(delivery).ok_or_else(not_found)?;
        let arg = arg.map(|a| a.min(LUA_MAX).to_string());
        let mut args: Vec<&[u8]> = vec![member.as_bytes(), delivery.as_bytes()];
        if let Some(a) = &arg {
            args.push(a.as_bytes());
        }
        let reply = self.call(name, op, &args).await?;
        match reply.first().map(|f| text(f)) {
            Some("ok") => Ok(()),
            _ => Err(not_found()),
        }
    }

    /// One try: the deliveries, or (none ready) when the next delay or lease ends.
    async fn try_fetch(
        &self,
        name: &QueueName,
        max: usize,
        visibility_ms: u64,
    ) -> Result<(Vec<Delivery>, Option<u64>), QueueError> {
        let visibility = visibility_ms.min(LUA_MAX).to_string();
        let nonces: Vec<String> = (0..max.max(1))
            .map(|_| {
                let n = self.nonces.fetch_add(1, Ordering::Relaxed);
                format!("{:x}", self.hasher.hash_one(n) & 0xffff_ffff_ffff)
            })
            .collect();
        let mut args: Vec<&[u8]> = vec![visibility.as_bytes()];
        args.extend(nonces.iter().map(|n| n.as_bytes()));
        let reply = self.call(name, "fetch", &args).await?;
        if reply.len() == 1 {
            let next = match text(&reply[0]) {
                "" => None,
                at => Some(number(at.as_bytes())?),
            };
            return Ok((Vec::new(), next));
        }
        let damaged = || StoreError::Unavailable(format!("redis: a damaged queue message in {name}"));
        let mut out = Vec::with_capacity(reply.len() / 5);
        let mut fields = reply.into_iter();
        while let (Some(member), Some(id), Some(attempt), Some(meta), Some(payload)) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        {
            let message_id = u64::from_str_radix(text(&member), 16).map_err(|_| damaged())?;
            let (kind, ts) = text(&meta).split_once(' ').ok_or_else(damaged)?;
            out.push(Delivery {
                id: String::from_utf8(id).map_err(|_| damaged())?,
                message_id,
                attempt: number(&attempt)? as u32,
                ts: number(ts.as_bytes())?,
                kind: kind_of(kind).ok_or_else(damaged)?,
                payload: Bytes::from(payload),
            });
        }
        self.counters.delivered.fetch_add(out.len() as u64, Ordering::Relaxed);
        let again = out.iter().filter(|d| d.attempt > 1).count() as u64;
        self.counters.redelivered.fetch_add(again, Ordering::Relaxed);
        Ok((out, None))
    }

    /// Registers a waiting fetch on `name` (refused past `max_waiters_per_queue` on this
    /// node); the first of its family makes the bus watch the family's channel.
    fn wait_on(self: &Arc<Self>, name: &QueueName) -> Result<Waiting, QueueError> {
        let place = Place::of(name);
        let mut families = lock(&self.families);
        let family = families.entry(place.family.clone()).or_default();
        let waiters = if place.dlq { family.dlq.clone() } else { family.main.clone() };
        if waiters.count.load(Ordering::Acquire) >= self.config.max_waiters_per_queue {
            return Err(QueueError::TooManyWaiters(name.clone()));
        }
        waiters.count.fetch_add(1, Ordering::AcqRel);
        family.users += 1;
        self.counters.waiting.fetch_add(1, Ordering::AcqRel);
        Ok(Waiting { shared: self.clone(), family: place.family, waiters })
    }
}

/// A waiting fetch; dropped, it leaves its family (the last one unwatches the channel).
struct Waiting {
    shared: Arc<Shared>,
    family: QueueName,
    waiters: Arc<Waiters>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.waiters.count.fetch_sub(1, Ordering::AcqRel);
        self.shared.counters.waiting.fetch_sub(1, Ordering::AcqRel);
        let mut families = lock(&self.shared.families);
        if let Some(f) = families.get_mut(&self.family) {
            f.users -= 1;
            if f.users == 0 {
                families.remove(&self.family);
                self.shared.bus.unwatch_channel(&Channel::Queue(self.family.clone()));
            }
        }
    }
}

impl QueueService for RedisQueues {
    fn enqueue<'a>(&'a self, name: &'a QueueName, msg: NewMessage, delay_ms: u64) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let mut outcomes = self.shared.enqueue_many(name, vec![(msg, delay_ms)]).await;
            outcomes.pop().unwrap_or_else(|| Err(StoreError::Unavailable("redis: no enqueue outcome".into()).into()))
        })
    }

    /// One script call for the whole batch: its messages get consecutive ids in its
    /// order, atomically, in one round trip.
    fn enqueue_batch<'a>(&'a self, name: &'a QueueName, batch: Vec<(NewMessage, u64)>) -> BatchFuture<'a, u64> {
        Box::pin(self.shared.enqueue_many(name, batch))
    }

    fn fetch_wait<'a>(
        &'a self,
        name: &'a QueueName,
        max: usize,
        visibility_ms: u64,
        wait: Duration,
    ) -> QueueFuture<'a, Vec<Delivery>> {
        Box::pin(async move {
            let shared = &self.shared;
            let (got, _) = shared.try_fetch(name, max, visibility_ms).await?;
            if !got.is_empty() || wait.is_zero() {
                return Ok(got);
            }
            let deadline = tokio::time::Instant::now() + wait;
            let waiting = shared.wait_on(name)?;
            // Subscribed before the next try: a wake-up published after it reaches us.
            shared.bus.watch_channel(Channel::Queue(waiting.family.clone())).await?;
            loop {
                let woken = waiting.waiters.ready.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let (got, next_due) = shared.try_fetch(name, max, visibility_ms).await?;
                let now = tokio::time::Instant::now();
                if !got.is_empty() || now >= deadline {
                    return Ok(got);
                }
                let until = match next_due {
                    Some(at) => {
                        let after = Duration::from_millis(at.saturating_sub(shared.clock.now_ms()));
                        deadline.min(now + after)
                    }
                    None => deadline,
                };
                tokio::select! {
                    _ = woken => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
        })
    }

    fn ack<'a>(&'a self, name: &'a QueueName, delivery: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            self.shared.settle_delivery(name, "ack", delivery, None).await?;
            self.shared.counters.acked.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    fn requeue<'a>(&'a self, name: &'a QueueName, delivery: &'a str, delay_ms: u64) -> QueueFuture<'a, ()> {
        Box::pin(self.shared.settle_delivery(name, "requeue", delivery, Some(delay_ms)))
    }

    fn extend<'a>(&'a self, name: &'a QueueName, delivery: &'a str, visibility_ms: u64) -> QueueFuture<'a, ()> {
        Box::pin(self.shared.settle_delivery(name, "extend", delivery, Some(visibility_ms)))
    }

    fn stats<'a>(&'a self, name: &'a QueueName) -> QueueFuture<'a, QueueStats> {
        Box::pin(async move {
            let reply = self.shared.call(name, "stats", &[]).await?;
            let [ready, in_flight, delayed, dead] = &reply[..] else {
                return Err(StoreError::Unavailable("redis: a bad stats reply".into()).into());
            };
            Ok(QueueStats {
                ready: number(ready)?,
                in_flight: number(in_flight)?,
                delayed: number(delayed)?,
                dead: number(dead)?,
            })
        })
    }

    fn purge<'a>(&'a self, name: &'a QueueName) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            // In script calls of at most ADMIN_BATCH messages, so Redis is never held
            // long; jobs enqueued meanwhile may be purged too.
            let mut purged = 0;
            loop {
                let reply = self.shared.call(name, "purge", &[ADMIN_BATCH.to_string().as_bytes()]).await?;
                let n = number(reply.first().ok_or_else(bad_reply)?)?;
                purged += n;
                if n < ADMIN_BATCH {
                    return Ok(purged);
                }
            }
        })
    }

    fn redrive<'a>(&'a self, name: &'a QueueName, max: usize) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            if name.is_dlq() {
                return Err(QueueError::Unsupported(format!("{name} is a dead-letter queue: it has none to redrive")));
            }
            // Each call moves its batch atomically: a dead letter is in one queue or
            // the other, never both, never neither.
            let limit = self.shared.config.max_queue_messages.to_string();
            let mut moved = 0;
            while moved < max as u64 {
                let batch = ADMIN_BATCH.min(max as u64 - moved).to_string();
                let reply = self.shared.call(name, "redrive", &[batch.as_bytes(), limit.as_bytes()]).await?;
                let n = number(reply.first().ok_or_else(bad_reply)?)?;
                moved += n;
                if n == 0 {
                    break;
                }
            }
            Ok(moved)
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
        visible: Visible<'a>,
    ) -> QueueFuture<'a, Vec<ListedQueue>> {
        Box::pin(async move {
            let mut cursor = registry_start(prefix, after);
            let mut out = Vec::new();
            while out.len() < limit {
                let page = self.shared.registry_page(&cursor).await?;
                let Some(last) = page.last() else { break };
                cursor = format!("({last}");
                let in_prefix = page.iter().take_while(|n| n.starts_with(prefix)).count();
                let done = in_prefix < page.len() || page.len() < LIST_PAGE;
                let names: Vec<QueueName> = page[..in_prefix]
                    .iter()
                    .filter_map(|n| QueueName::parse(n).ok())
                    .filter(|q| visible(q))
                    .take(limit - out.len())
                    .collect();
                // Each family is a script call of its own (its own slot on Redis Cluster).
                let stats = futures_util::future::try_join_all(names.iter().map(|q| self.stats(q))).await?;
                out.extend(names.into_iter().zip(stats).map(|(queue, stats)| ListedQueue { queue, stats }));
                if done {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn counters(&self) -> &QueueCounters {
        &self.shared.counters
    }
}

/// Most messages one purge or redrive script call moves.
const ADMIN_BATCH: u64 = 1000;

fn bad_reply() -> QueueError {
    StoreError::Unavailable("redis: a bad queue script reply".into()).into()
}
