//! `Broker`: the handle every front door talks to. It owns the topic table (sharded by
//! name), the live subscriptions and fan-out, and calls the [`Store`] for history.
//!
//! Fan-out order: a message is fanned out once its append resolved (it is durable), in
//! offset order per topic. Appends that resolve out of order wait in a small per-topic
//! reorder buffer. A subscriber registers at a watermark `W` (the last offset fanned
//! out): every message after `W` reaches it live, and [`Replay`] reads the history up to
//! `W` from the store, while live messages are held back, so replay-then-live has no
//! gap and no duplicate. When the store's head answers later (a networked store), the
//! topic first waits for it, buffering every resolved append, and the first head to
//! arrive sets where fan-out starts (ARCHITECTURE.md, "Subscribe: replay, then live").
//!
//! In a cluster ([`Broker::clustered`]) fan-out is driven by the [`Bus`] instead: every
//! node's appends, this node's included, arrive in the store's order, and a gap in the
//! offsets (or a bus that lost its connection) is repaired from the store's history
//! (see `Broker::repair`).
//!
//! Locks are `std::sync::Mutex`, held for in-memory work only, never across an await.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::bus::{Bus, Role};
use crate::config::BrokerConfig;
use crate::connections::{ConnectionInfo, Connections};
use crate::message::{Clock, Message, NewMessage, Outgoing, SystemClock};
use crate::metrics::{Door, Metrics};
use crate::name::{QueueName, TopicName};
use crate::outbound::Subscriber;
use crate::presence::Presence;
use crate::queue::{QueueCounters, QueueError, QueueService, QueueStats, Queues};
use crate::store::{Appended, Epoch, History, ListedTopic, Store, StoreError, TopicHead};

/// Errors of broker operations; each maps to one client-facing code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The payload is over `max_message_bytes`.
    #[error("payload of {size} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The payload size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The store failed; the operation did not happen.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This node's role does not serve the operation (a cluster split into ingest and
    /// fan-out nodes).
    #[error("this node's role is {role}: it does not {action}; send it to a node whose role is all or {serves}", role = .role.as_str(), serves = .serves.as_str())]
    Role {
        /// This node's role.
        role: Role,
        /// What was refused ("publish", "serve subscriptions").
        action: &'static str,
        /// The role that serves it.
        serves: Role,
    },
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// Only messages published from now on.
    Latest,
    /// Everything retained, then live.
    Earliest,
    /// Messages with offset >= N, then live (0 means earliest).
    Offset(u64),
}

/// A publish's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The offset assigned.
    pub offset: u64,
    /// The acceptance timestamp.
    pub ts: u64,
}

/// A subscription's identity, for unsubscribing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

/// The outcome of a subscribe.
pub struct Subscribed {
    /// The identity to unsubscribe with.
    pub id: SubscriptionId,
    /// The topic's epoch.
    pub epoch: Epoch,
    /// The offset the next new message will get.
    pub next: u64,
    /// False when the requested position could not be resumed (nothing is replayed).
    pub recovered: bool,
    /// The history to deliver before live messages; `None` when there is none.
    pub replay: Option<Replay>,
}

/// One page of a topic's history, for fetch.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The topic's epoch.
    pub epoch: Epoch,
    /// The messages, in offset order.
    pub messages: Vec<Arc<Message>>,
    /// Where the next page starts.
    pub next: u64,
}

/// A topic's state, for the info endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// History head from the store.
    pub head: TopicHead,
    /// Live subscriptions on this node.
    pub subscribers: u64,
    /// Connections publishing to it on this node ([`crate::presence`]).
    pub publishers: u64,
}

/// A topic as listed by [`Broker::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSummary {
    /// The topic.
    pub topic: TopicName,
    /// Newest retained offset (0 if none).
    pub last: u64,
    /// Live subscriptions on this node.
    pub subscribers: u64,
    /// Connections publishing to it on this node ([`crate::presence`]).
    pub publishers: u64,
}

/// The broker handle; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    /// Drives fan-out in a cluster; `None` on a single node.
    bus: Option<Arc<dyn Bus>>,
    /// This node's queue engine (a single node's queues).
    queues: Queues,
    /// The queues every node shares (a cluster's); client calls go here when set.
    shared_queues: Option<Arc<dyn QueueService>>,
    config: BrokerConfig,
    shards: Box<[Mutex<TopicTable>]>,
    hasher: RandomState,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    /// The long-lived connections served, for the admin API.
    connections: Connections,
    /// Who is on each topic.
    presence: Presence,
}

/// One shard of the topic table: topics with live subscriptions on this node.
type TopicTable = HashMap<TopicName, Arc<Topic>>;

struct Topic {
    state: Mutex<TopicState>,
}

struct TopicState {
    /// Meaningless while `early` is `Some`.
    epoch: Epoch,
    /// The next offset to fan out; everything below it has been delivered live.
    /// Meaningless while `early` is `Some`.
    next_fanout: u64,
    /// Appends that resolved ahead of an earlier offset, waiting for it.
    reorder: BTreeMap<u64, Arc<Message>>,
    /// `Some` while the topic awaits its first head (a store whose head answers later):
    /// where live delivery starts is unknown, so every append that resolves meanwhile
    /// waits here, with its epoch, until a head sets `epoch` and `next_fanout`.
    early: Option<Vec<Appended>>,
    subs: Vec<Sub>,
    /// A repair task runs for this topic (cluster only).
    repairing: bool,
    /// Another gap was seen while it ran: it goes round once more.
    repair_again: bool,
}

impl Topic {
    /// A topic whose fan-out starts after `head`.
    fn from_head(head: &TopicHead) -> Arc<Self> {
        Arc::new(Topic {
            state: Mutex::new(TopicState {
                epoch: head.epoch.clone(),
                next_fanout: head.next,
                reorder: BTreeMap::new(),
                early: None,
                subs: Vec::new(),
                repairing: false,
                repair_again: false,
            }),
        })
    }

    /// A topic whose head is not known yet: it buffers every append until it is.
    fn awaiting_head() -> Arc<Self> {
        Arc::new(Topic {
            state: Mutex::new(TopicState {
                epoch: Epoch::from(""),
                next_fanout: 0,
                reorder: BTreeMap::new(),
                early: Some(Vec::new()),
                subs: Vec::new(),
                repairing: false,
                repair_again: false,
            }),
        })
    }
}

struct Sub {
    id: u64,
    sink: Arc<dyn Subscriber>,
    /// Live messages held back while this subscription replays history.
    held: Option<Held>,
}

#[derive(Default)]
struct Held {
    messages: Vec<Outgoing>,
    bytes: usize,
    /// The subscription still awaits its head: it keeps nothing, since its watermark
    /// will be at least the last offset fanned out when the head arrives, so all that
    /// is fanned out before then is replayed from the store instead.
    awaiting_head: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning means a panic elsewhere mid-update of plain data; the state between
    // statements is consistent, so keep serving rather than cascade the panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TopicState {
    /// Delivers `msg` to every subscriber, dropping those that are gone.
    fn deliver(&mut self, msg: &Arc<Message>, metrics: &Metrics, hold_limit: usize) {
        if self.subs.is_empty() {
            return;
        }
        // One set of encoded forms for this fan-out, freed with the last queue holding it.
        let msg = Outgoing::live(msg.clone());
        let before = self.subs.len();
        let mut held_back = 0;
        self.subs.retain_mut(|sub| match &mut sub.held {
            Some(held) => {
                held_back += 1;
                if held.awaiting_head {
                    return true;
                }
                held.bytes += msg.size_hint();
                held.messages.push(msg.clone());
                if held.bytes > hold_limit {
                    sub.sink.overflow();
                    return false;
                }
                true
            }
            None => sub.sink.deliver(&msg),
        });
        let kept = self.subs.len();
        // Held messages are counted when `Replay::finish` hands them over.
        Metrics::add(&metrics.deliveries, kept.saturating_sub(held_back) as u64);
        metrics.subscriptions.fetch_sub((before - kept) as i64, Ordering::Relaxed);
    }

    /// Fans out an append in offset order: the next offset goes out at once, later ones
    /// wait in the reorder buffer, earlier ones (replayed instead) and those of another
    /// epoch (history deleted since) are dropped.
    fn accept(&mut self, appended: &Appended, metrics: &Metrics, hold_limit: usize) {
        if self.epoch != appended.epoch {
            return; // appended before a delete: that history is gone
        }
        for msg in &appended.messages {
            if msg.offset == self.next_fanout {
                self.deliver(msg, metrics, hold_limit);
                self.next_fanout += 1;
            } else if msg.offset > self.next_fanout {
                self.reorder.insert(msg.offset, msg.clone());
            }
        }
        self.drain_reorder(metrics, hold_limit);
    }

    /// Sets where fan-out starts, if no head did yet, and fans out what arrived meanwhile.
    /// `head` must have been requested while this topic was in the table: then every
    /// append it does not count resolved later and found the topic, so it is in `early`.
    fn initialize(&mut self, head: &TopicHead, metrics: &Metrics, hold_limit: usize) {
        let Some(early) = self.early.take() else {
            return;
        };
        self.epoch = head.epoch.clone();
        self.next_fanout = head.next;
        for appended in &early {
            self.accept(appended, metrics, hold_limit);
        }
    }

    /// The history was deleted: `epoch` starts at offset 1. Tells every subscriber, under
    /// this lock, so fan-out sends nothing of the old history after it (messages a
    /// replaying subscription holds back are handed over as they are). A topic still
    /// awaiting its head learns it here, and fans out what of the new epoch arrived.
    fn reset(&mut self, epoch: Epoch, metrics: &Metrics, hold_limit: usize) {
        let early = self.early.take();
        self.epoch = epoch;
        self.next_fanout = 1;
        self.reorder.clear();
        for sub in &self.subs {
            sub.sink.history_deleted();
        }
        for appended in early.iter().flatten() {
            self.accept(appended, metrics, hold_limit);
        }
    }

    /// Messages up to `offset` (exclusive) can no longer be delivered: every subscriber
    /// is told it lost them and leaves, and fan-out goes on from `offset`.
    fn skip_lost(&mut self, offset: u64, metrics: &Metrics) {
        tracing::warn!(from = self.next_fanout, to = offset, "cluster: messages lost for live subscribers");
        for sub in self.subs.drain(..) {
            sub.sink.messages_lost();
            metrics.subscriptions.fetch_sub(1, Ordering::Relaxed);
            Metrics::add(&metrics.cluster_lost_subscriptions, 1);
        }
        self.next_fanout = offset;
        let stale: Vec<u64> = self.reorder.range(..offset).map(|(&o, _)| o).collect();
        for o in stale {
            self.reorder.remove(&o);
        }
    }

    /// Fans out `msg` if it is the next offset (a repair filling a gap from the store);
    /// false if it comes after a gap the store cannot fill.
    fn fill(&mut self, msg: &Arc<Message>, metrics: &Metrics, hold_limit: usize) -> bool {
        if msg.offset < self.next_fanout {
            return true;
        }
        if msg.offset > self.next_fanout {
            return false;
        }
        if self.reorder.remove(&msg.offset).is_none() {
            Metrics::add(&metrics.cluster_filled, 1);
        }
        self.deliver(msg, metrics, hold_limit);
        self.next_fanout += 1;
        self.drain_reorder(metrics, hold_limit);
        true
    }

    fn drain_reorder(&mut self, metrics: &Metrics, hold_limit: usize) {
        while let Some(entry) = self.reorder.first_entry() {
            if *entry.key() != self.next_fanout {
                break;
            }
            let msg = entry.remove();
            self.deliver(&msg, metrics, hold_limit);
            self.next_fanout += 1;
        }
    }
}

/// Shared queues `/metrics` reads at most per scrape ([`Broker::queue_top`]).
pub const MAX_QUEUES_SCRAPED: usize = 10_000;

impl Broker {
    /// A broker over `store`, on the system clock.
    pub fn new(store: Arc<dyn Store>, config: BrokerConfig) -> Self {
        Self::with_clock(store, config, Arc::new(SystemClock))
    }

    /// A broker whose queues read time from `clock` (tests drive it by hand).
    pub fn with_clock(store: Arc<dyn Store>, config: BrokerConfig, clock: Arc<dyn Clock>) -> Self {
        Self::build(store, None, None, config, clock)
    }

    /// A single node whose queue calls go to `queues` (kept by the store's database
    /// itself, as PostgreSQL does) rather than to the engine over `store`.
    pub fn with_queues(store: Arc<dyn Store>, queues: Arc<dyn QueueService>, config: BrokerConfig) -> Self {
        Self::build(store, None, Some(queues), config, Arc::new(SystemClock))
    }

    /// A node of a cluster: `store` is shared by every node, fan-out is driven by `bus`,
    /// which delivers every node's appends (see the module docs), and queue calls go to
    /// `queues`, which every node shares.
    pub fn clustered(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        queues: Arc<dyn QueueService>,
        config: BrokerConfig,
    ) -> Self {
        let broker = Self::build(store, Some(bus.clone()), Some(queues), config, Arc::new(SystemClock));
        bus.attach(BusEvents { inner: Arc::downgrade(&broker.inner) });
        broker
    }

    fn build(
        store: Arc<dyn Store>,
        bus: Option<Arc<dyn Bus>>,
        shared_queues: Option<Arc<dyn QueueService>>,
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let shards = config.shards.max(1);
        let queues = Queues::new(store.clone(), clock, config.queues, config.max_message_bytes);
        let metrics = Arc::new(Metrics::default());
        store.register_metrics(metrics.registry());
        Self {
            inner: Arc::new(Inner {
                store,
                bus,
                queues,
                shared_queues,
                shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
                hasher: RandomState::new(),
                next_id: AtomicU64::new(1),
                metrics,
                connections: Connections::default(),
                presence: Presence::new(config.presence_events_per_second, shards),
                config,
            }),
        }
    }

    /// The broker's configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// This node's own queue engine (tests drive it directly; a cluster node's client
    /// calls go to [`Broker::queue_service`]).
    pub fn queues(&self) -> &Queues {
        &self.inner.queues
    }

    /// The work queues, for a client's queue call: this node's engine, or on a cluster
    /// node the queues every node shares. Refused on a fan-out node.
    pub fn queue_service(&self) -> Result<&dyn QueueService, BrokerError> {
        let role = self.inner.config.role;
        if !role.ingests() {
            return Err(BrokerError::Role { role, action: "serve queue calls", serves: Role::Ingest });
        }
        Ok(self.queue_backend())
    }

    /// How many queues there are and the `n` largest with their counts, for `/metrics`:
    /// this node's engine's, or, with queues kept outside the node (a cluster's Redis,
    /// PostgreSQL), the shared ones, listed by name in pages (at most
    /// [`MAX_QUEUES_SCRAPED`]; a queue past that is not counted).
    pub async fn queue_top(&self, n: usize) -> Result<(usize, Vec<(QueueName, QueueStats)>), QueueError> {
        let Some(shared) = &self.inner.shared_queues else { return Ok(self.inner.queues.top(n)) };
        let size = |s: &QueueStats| s.ready + s.in_flight + s.delayed + s.dead;
        let (mut total, mut top, mut after) = (0, Vec::<(QueueName, QueueStats)>::new(), None::<QueueName>);
        while total < MAX_QUEUES_SCRAPED {
            let page = shared.list("", after.as_ref().map(|q| q.as_str()), 200, &|_| true).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.queue.clone());
            total += page.len();
            top.extend(page.into_iter().map(|l| (l.queue, l.stats)));
            top.sort_unstable_by(|a, b| size(&b.1).cmp(&size(&a.1)).then_with(|| a.0.as_str().cmp(b.0.as_str())));
            top.truncate(n);
        }
        Ok((total, top))
    }

    fn queue_backend(&self) -> &dyn QueueService {
        match &self.inner.shared_queues {
            Some(shared) => &**shared,
            None => &self.inner.queues,
        }
    }

    /// Queue counters and gauges of the queues client calls go to.
    pub fn queue_counters(&self) -> &QueueCounters {
        self.queue_backend().counters()
    }

    /// The broker's counters and gauges.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The connections this node serves (admin API).
    pub fn connections(&self) -> &Connections {
        &self.inner.connections
    }

    /// Up to `limit` of this node's connections with an id above `after`, by id, each
    /// with the topics it subscribes to (sorted): the admin API's list.
    pub fn connection_page(&self, after: u64, limit: usize) -> Vec<(Arc<ConnectionInfo>, Vec<TopicName>)> {
        let page = self.inner.connections.list(after, limit);
        let ids: Vec<u64> = page.iter().map(|c| c.id).collect();
        page.into_iter().zip(self.inner.presence.subscriptions(&ids)).collect()
    }

    /// Who is on each topic on this node: members, counts, join and leave events.
    pub fn presence(&self) -> &Presence {
        &self.inner.presence
    }

    /// Whether the store (and the bus, in a cluster) answers.
    pub fn is_ready(&self) -> bool {
        self.inner.store.is_ready() && self.inner.bus.as_ref().is_none_or(|b| b.is_ready())
    }

    /// This node's role (always [`Role::All`] on a single node).
    pub fn role(&self) -> Role {
        self.inner.config.role
    }

    /// Whether this node is part of a cluster.
    pub fn is_clustered(&self) -> bool {
        self.inner.bus.is_some()
    }

    /// Makes everything written so far durable (shutdown calls it last): first waits
    /// for dead letters still finishing their writes (the removal of the original is
    /// issued only once the dead letter is stored), then flushes the store.
    pub async fn flush(&self) -> Result<(), BrokerError> {
        self.inner.queues.dead_letters_persisted().await;
        Ok(self.inner.store.flush().await?)
    }

    /// Applies retention everywhere; the server calls this periodically.
    pub fn sweep(&self) {
        self.inner.store.sweep();
    }

    fn shard(&self, topic: &TopicName) -> &Mutex<TopicTable> {
        let i = self.inner.hasher.hash_one(topic) as usize % self.inner.shards.len();
        &self.inner.shards[i]
    }

    /// Publishes one message; resolves once it is stored as durably as the store promises.
    pub async fn publish(&self, topic: &TopicName, msg: NewMessage) -> Result<Published, BrokerError> {
        let published = self.publish_batch(topic, vec![msg]).await?;
        published.into_iter().next().ok_or(BrokerError::Store(StoreError::Closed))
    }

    /// [`Broker::publish`] for a client of `door`, timed into its publish latency.
    pub async fn publish_via(&self, door: Door, topic: &TopicName, msg: NewMessage) -> Result<Published, BrokerError> {
        let started = Instant::now();
        let published = self.publish(topic, msg).await;
        self.inner.metrics.latency.publish(door, started.elapsed());
        published
    }

    /// [`Broker::publish_batch`] for a client of `door`, timed into its publish latency.
    pub async fn publish_batch_via(
        &self,
        door: Door,
        topic: &TopicName,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Published>, BrokerError> {
        let started = Instant::now();
        let published = self.publish_batch(topic, batch).await;
        self.inner.metrics.latency.publish(door, started.elapsed());
        published
    }

    /// Publishes a batch atomically (consecutive offsets) with one store write.
    pub async fn publish_batch(
        &self,
        topic: &TopicName,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Published>, BrokerError> {
        let role = self.inner.config.role;
        if !role.ingests() {
            return Err(BrokerError::Role { role, action: "accept publishes", serves: Role::Ingest });
        }
        let max = self.inner.config.max_message_bytes;
        if let Some(big) = batch.iter().find(|m| m.payload.len() > max) {
            return Err(BrokerError::TooLarge { size: big.payload.len(), max });
        }
        // Traced only under a request's span (HTTP, gRPC) and only with export on.
        let span = if tracing::Span::current().is_disabled() {
            tracing::Span::none()
        } else {
            tracing::info_span!(target: crate::TRACE_TARGET, "store.append", topic = topic.as_str(), messages = batch.len())
        };
        let mut append = self.inner.store.append(topic, batch);
        if self.inner.bus.is_some() {
            // In a cluster the bus fans out every node's appends, this one's included.
            let appended = append.await?;
            Metrics::add(&self.inner.metrics.published, appended.messages.len() as u64);
            return Ok(appended.messages.iter().map(|m| Published { offset: m.offset, ts: m.ts }).collect());
        }
        // The memory store resolves at once: fan out inline. A durable store resolves
        // later; finish on a task of its own so that a caller that goes away (an HTTP
        // client hanging up) cannot leave a stored message un-fanned-out, which would
        // stall the topic's ordered fan-out behind it.
        let appended = match span.in_scope(|| futures_now(&mut append)) {
            Some(result) => {
                let appended = result?;
                span.in_scope(|| self.fan_out(topic, &appended));
                appended
            }
            None => {
                let broker = self.clone();
                let topic = topic.clone();
                tokio::spawn(
                    async move {
                        let appended = append.await?;
                        broker.fan_out(&topic, &appended);
                        Ok::<_, StoreError>(appended)
                    }
                    .instrument(span),
                )
                .await
                .map_err(|_| StoreError::Closed)??
            }
        };
        Metrics::add(&self.inner.metrics.published, appended.messages.len() as u64);
        Ok(appended.messages.iter().map(|m| Published { offset: m.offset, ts: m.ts }).collect())
    }

    /// Held messages count against the same hard bound as a full outbound queue.
    fn hold_limit(&self) -> usize {
        self.inner.config.outbound.max_pending_bytes.saturating_mul(2)
    }

    fn fan_out(&self, topic: &TopicName, appended: &Appended) {
        Metrics::add(&self.inner.metrics.live_appends, 1);
        let Some(t) = lock(self.shard(topic)).get(topic).cloned() else {
            return; // nobody subscribed on this node
        };
        let _span = (!tracing::Span::current().is_disabled()).then(|| {
            tracing::info_span!(target: crate::TRACE_TARGET, "fan_out", topic = topic.as_str(), subscribers = lock(&t.state).subs.len())
                .entered()
        });
        let mut st = lock(&t.state);
        if let Some(early) = &mut st.early {
            // No head known yet: where live delivery starts is decided when one arrives.
            early.push(appended.clone());
            return;
        }
        st.accept(appended, &self.inner.metrics, self.hold_limit());
    }

    /// Subscribes `sink` to `topic` from `from`. `epoch` is the epoch the client saw,
    /// checked only when `from` is an offset of 1 or more.
    ///
    /// With a head that is ready at once (memory, disk) this completes without waiting.
    /// With one that answers later, the subscription is registered first, on a topic
    /// that buffers live messages until a head is known.
    pub async fn subscribe(
        &self,
        topic: &TopicName,
        from: StartFrom,
        epoch: Option<&str>,
        sink: Arc<dyn Subscriber>,
    ) -> Result<Subscribed, BrokerError> {
        let role = self.inner.config.role;
        if !role.fans_out() {
            return Err(BrokerError::Role { role, action: "serve subscriptions", serves: Role::Fanout });
        }
        let metrics = &self.inner.metrics;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (t, head) = {
            let mut shard = lock(self.shard(topic));
            // The head is requested under the shard lock: a publisher looks the topic up
            // (under the same lock) only after its append resolved, so a message is
            // either counted by this head (replayed, up to the watermark) or finds the
            // topic in the table and is fanned out to us (live, after it). In a cluster
            // the head is read once the bus watches the topic: an append is either
            // counted by it or delivered by the bus after the watch began.
            let mut head = match &self.inner.bus {
                None => self.inner.store.head(topic),
                Some(bus) => {
                    let watched = bus.watch(topic);
                    let store = self.inner.store.clone();
                    let topic = topic.clone();
                    Box::pin(async move {
                        watched.await?;
                        store.head(&topic).await
                    })
                }
            };
            if let Some(head) = futures_now(&mut head) {
                let head = head?;
                let t = shard.entry(topic.clone()).or_insert_with(|| Topic::from_head(&head)).clone();
                let mut st = lock(&t.state);
                drop(shard);
                // Another subscriber may still await its head; this one, read with the
                // topic in the table, serves as well.
                st.initialize(&head, metrics, self.hold_limit());
                return Ok(self.attach(topic, &t, &mut st, &head, from, epoch, id, sink));
            }
            // The head answers later. Register now, so that every append resolving from
            // here on finds the topic (and waits in `early` until a head is known).
            let t = shard.entry(topic.clone()).or_insert_with(Topic::awaiting_head).clone();
            let mut st = lock(&t.state);
            let held = Held { awaiting_head: true, ..Held::default() };
            st.subs.push(Sub { id, sink: sink.clone(), held: Some(held) });
            metrics.subscriptions.fetch_add(1, Ordering::Relaxed);
            (t.clone(), head)
        };
        // Ends the registration if the head fails or the caller gives up waiting.
        let mut pending = PendingSub { broker: self, topic, id: Some(SubscriptionId(id)) };
        let head = head.await?;
        let mut st = lock(&t.state);
        // The first head to arrive sets where fan-out starts; later ones leave it.
        st.initialize(&head, metrics, self.hold_limit());
        pending.id = None;
        Ok(self.attach(topic, &t, &mut st, &head, from, epoch, id, sink))
    }

    /// Computes the watermark and replay of subscription `id` on an initialized topic
    /// and makes it live (or held while it replays), adding it if not registered yet.
    #[allow(clippy::too_many_arguments)]
    fn attach(
        &self,
        topic: &TopicName,
        t: &Arc<Topic>,
        st: &mut TopicState,
        head: &TopicHead,
        from: StartFrom,
        epoch: Option<&str>,
        id: u64,
        sink: Arc<dyn Subscriber>,
    ) -> Subscribed {
        let watermark = st.next_fanout - 1;
        let (start, recovered) = match from {
            StartFrom::Latest => (None, true),
            StartFrom::Earliest | StartFrom::Offset(0) => (Some(0), true),
            StartFrom::Offset(n) => {
                let epoch_differs = epoch.is_some_and(|e| *e != *st.epoch);
                let beyond = n > watermark + 1;
                let trimmed = n < head.first || (head.retained == 0 && n < head.next);
                if epoch_differs || beyond || trimmed {
                    (None, false)
                } else {
                    (Some(n), true)
                }
            }
        };
        let replay = start.filter(|&s| s <= watermark && watermark > 0);
        let held = replay.map(|_| Held::default());
        match st.subs.iter_mut().find(|s| s.id == id) {
            // Registered while its head was pending: nothing was kept for it, all that
            // was fanned out meanwhile is at or below the watermark.
            Some(sub) => sub.held = held,
            None => {
                st.subs.push(Sub { id, sink, held });
                self.inner.metrics.subscriptions.fetch_add(1, Ordering::Relaxed);
            }
        }
        let epoch = st.epoch.clone();
        Subscribed {
            id: SubscriptionId(id),
            epoch: epoch.clone(),
            next: watermark + 1,
            recovered,
            replay: replay.map(|cursor| Replay {
                broker: self.clone(),
                topic_name: topic.clone(),
                topic: t.clone(),
                id,
                cursor,
                end: watermark,
                epoch,
            }),
        }
    }

    /// Ends a subscription; false if it was not there (already gone).
    pub fn unsubscribe(&self, topic: &TopicName, id: SubscriptionId) -> bool {
        let mut shard = lock(self.shard(topic));
        let Some(t) = shard.get(topic).cloned() else {
            return false;
        };
        let mut st = lock(&t.state);
        let before = st.subs.len();
        st.subs.retain(|s| s.id != id.0);
        let removed = st.subs.len() < before;
        if removed {
            self.inner.metrics.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        if st.subs.is_empty() && st.reorder.is_empty() && !st.repairing {
            drop(st);
            shard.remove(topic);
            if let Some(bus) = &self.inner.bus {
                bus.unwatch(topic);
            }
        }
        removed
    }

    /// Up to `limit` messages from offset `from` (0: first retained).
    pub async fn fetch(&self, topic: &TopicName, from: u64, limit: usize) -> Result<Fetched, BrokerError> {
        let History { epoch, messages } = self.inner.store.read(topic, from, u64::MAX, limit).await?;
        let next = match messages.last() {
            Some(m) => m.offset + 1,
            None => {
                let head = self.inner.store.head(topic).await?;
                // Deleted since the read: the old epoch's offsets are not the new one's.
                let next = if head.epoch == epoch { head.next } else { 1 };
                from.max(1).min(next)
            }
        };
        Ok(Fetched { epoch, messages, next })
    }

    /// Deletes a topic's history: a new epoch, offsets from 1; live subscriptions stay.
    pub async fn delete(&self, topic: &TopicName) -> Result<(), BrokerError> {
        let role = self.inner.config.role;
        if !role.ingests() {
            return Err(BrokerError::Role { role, action: "delete topics", serves: Role::Ingest });
        }
        let epoch = self.inner.store.delete(topic).await?;
        if self.inner.bus.is_some() {
            return Ok(()); // the bus tells every node, this one included
        }
        if let Some(t) = lock(self.shard(topic)).get(topic).cloned() {
            lock(&t.state).reset(epoch, &self.inner.metrics, self.hold_limit());
        }
        Ok(())
    }

    /// The topic's head and live subscriber count.
    pub async fn info(&self, topic: &TopicName) -> Result<TopicInfo, BrokerError> {
        let head = self.inner.store.head(topic).await?;
        let (_, publishers) = self.inner.presence.counts(topic);
        Ok(TopicInfo { head, subscribers: self.subscriber_count(topic), publishers })
    }

    /// Subscriptions attached (not those still waiting for their head: they have not
    /// been answered yet, and messages published now may count as before them).
    fn subscriber_count(&self, topic: &TopicName) -> u64 {
        let t = lock(self.shard(topic)).get(topic).cloned();
        t.map_or(0, |t| {
            lock(&t.state).subs.iter().filter(|s| !s.held.as_ref().is_some_and(|h| h.awaiting_head)).count() as u64
        })
    }

    /// [`Broker::list`] of the topics `visible` lets through (a caller's rights): pages
    /// the filter emptied are read past, so only the end of the list gives a short page.
    pub async fn list_visible(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        visible: impl Fn(&TopicName) -> bool,
    ) -> Result<Vec<TopicSummary>, BrokerError> {
        let mut topics = Vec::new();
        let mut after = after.map(str::to_owned);
        loop {
            let page = self.list(prefix, after.as_deref(), limit).await?;
            let full = page.len() >= limit;
            after = page.last().map(|t| t.topic.as_str().to_owned());
            topics.extend(page.into_iter().filter(|t| visible(&t.topic)));
            if !full || topics.len() >= limit {
                break;
            }
        }
        topics.truncate(limit);
        Ok(topics)
    }

    /// Topics with retained messages or live subscribers, by name, after `after`.
    pub async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TopicSummary>, BrokerError> {
        let mut merged: BTreeMap<TopicName, TopicSummary> = BTreeMap::new();
        for ListedTopic { topic, last } in self.inner.store.list(prefix, after, limit).await? {
            merged.insert(topic.clone(), TopicSummary { topic, last, subscribers: 0, publishers: 0 });
        }
        for shard in self.inner.shards.iter() {
            let topics: Vec<(TopicName, Arc<Topic>)> =
                lock(shard).iter().map(|(n, t)| (n.clone(), t.clone())).collect();
            for (name, t) in topics {
                let s = name.as_str();
                if !s.starts_with(prefix) || after.is_some_and(|a| s <= a) {
                    continue;
                }
                let subscribers = lock(&t.state).subs.len() as u64;
                if subscribers == 0 {
                    continue;
                }
                merged
                    .entry(name.clone())
                    .or_insert_with(|| TopicSummary { topic: name, last: 0, subscribers: 0, publishers: 0 })
                    .subscribers = subscribers;
            }
        }
        let mut out: Vec<TopicSummary> = merged.into_values().take(limit).collect();
        for summary in out.iter_mut() {
            summary.publishers = self.inner.presence.counts(&summary.topic).1;
            if summary.last == 0 {
                summary.last = self.inner.store.head(&summary.topic).await?.last;
            }
        }
        Ok(out)
    }
}

/// How long a repair waits after a failed store call before it tries again (doubling).
const REPAIR_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between a repair's attempts.
const REPAIR_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Messages a repair reads from the store per call.
const REPAIR_CHUNK: usize = 1000;

/// The broker's entry points for its [`Bus`]: each topic's events in the store's order.
/// Holds the broker weakly (the broker owns the bus).
#[derive(Clone)]
pub struct BusEvents {
    inner: Weak<Inner>,
}

impl BusEvents {
    fn broker(&self) -> Option<Broker> {
        self.inner.upgrade().map(|inner| Broker { inner })
    }

    /// An append on any node, as the store applied it.
    pub fn appended(&self, topic: &TopicName, appended: Appended) {
        if let Some(broker) = self.broker() {
            broker.bus_appended(topic, appended);
        }
    }

    /// A delete on any node: the history of epoch `previous` is gone, `epoch` starts at 1.
    pub fn deleted(&self, topic: &TopicName, previous: &str, epoch: Epoch) {
        if let Some(broker) = self.broker() {
            broker.bus_deleted(topic, previous, epoch);
        }
    }

    /// Events may have been missed (the bus lost its connection and watches again):
    /// every topic with local subscribers is checked against the store.
    pub fn lost(&self) {
        let Some(broker) = self.broker() else { return };
        for shard in broker.inner.shards.iter() {
            let topics: Vec<(TopicName, Arc<Topic>)> =
                lock(shard).iter().map(|(n, t)| (n.clone(), t.clone())).collect();
            for (name, t) in topics {
                broker.repair(&name, t);
            }
        }
    }
}

impl Broker {
    fn topic(&self, topic: &TopicName) -> Option<Arc<Topic>> {
        lock(self.shard(topic)).get(topic).cloned()
    }

    fn bus_appended(&self, topic: &TopicName, appended: Appended) {
        Metrics::add(&self.inner.metrics.live_appends, 1);
        let Some(t) = self.topic(topic) else {
            return; // nobody subscribed on this node
        };
        let mut st = lock(&t.state);
        if let Some(early) = &mut st.early {
            early.push(appended);
            return;
        }
        if st.epoch != appended.epoch {
            // A delete this node did not see, or an event older than the head the
            // topic was set from: the repair tells which.
            drop(st);
            return self.repair(topic, t);
        }
        st.accept(&appended, &self.inner.metrics, self.hold_limit());
        // The bus delivers in order: a later offset waiting means earlier ones were lost.
        let gap = !st.reorder.is_empty();
        drop(st);
        if gap {
            self.repair(topic, t);
        }
    }

    fn bus_deleted(&self, topic: &TopicName, previous: &str, epoch: Epoch) {
        let Some(t) = self.topic(topic) else { return };
        let mut st = lock(&t.state);
        if st.early.is_some() || *st.epoch == *previous {
            return st.reset(epoch, &self.inner.metrics, self.hold_limit());
        }
        if st.epoch == epoch {
            return; // older than the head the topic was set from
        }
        drop(st);
        self.repair(topic, t);
    }

    /// Brings `t` in line with the store, on a task of its own: reads the head in the
    /// order of the topic's events ([`Bus::barrier`]), adopts its epoch if a delete was
    /// missed, and fans out from the history whatever the bus did not deliver. Offsets
    /// the history no longer holds are lost: their subscribers are told so and leave
    /// (they resume by offset and learn `recovered: false`). One repair per topic at a
    /// time; a gap seen meanwhile makes it go round again.
    fn repair(&self, topic: &TopicName, t: Arc<Topic>) {
        {
            let mut st = lock(&t.state);
            if st.repairing {
                st.repair_again = true;
                return;
            }
            st.repairing = true;
            st.repair_again = false;
        }
        Metrics::add(&self.inner.metrics.cluster_repairs, 1);
        let broker = self.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut backoff = REPAIR_BACKOFF;
            loop {
                let result = broker.repair_once(&topic, &t).await;
                let failed = {
                    let mut st = lock(&t.state);
                    if st.subs.is_empty() {
                        // Nobody left to deliver to: the next subscriber starts from a head.
                        st.repairing = false;
                        st.reorder.clear();
                        drop(st);
                        return broker.forget_if_idle(&topic, &t);
                    }
                    match result {
                        Ok(()) if !st.repair_again && st.reorder.is_empty() => {
                            st.repairing = false;
                            return;
                        }
                        Ok(()) => {
                            st.repair_again = false;
                            backoff = REPAIR_BACKOFF;
                            None
                        }
                        Err(e) => Some(e),
                    }
                };
                if let Some(e) = failed {
                    tracing::warn!(topic = %topic, error = %e, "cluster: repair failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(REPAIR_BACKOFF_MAX);
                }
            }
        });
    }

    async fn repair_once(&self, topic: &TopicName, t: &Arc<Topic>) -> Result<(), StoreError> {
        let Some(bus) = &self.inner.bus else { return Ok(()) };
        let metrics = &self.inner.metrics;
        let head = bus.barrier(topic).await?;
        // Every event before `head` has been delivered: what it counts and was not fanned
        // out is what the bus lost.
        let (mut cursor, epoch) = {
            let mut st = lock(&t.state);
            st.initialize(&head, metrics, self.hold_limit());
            if st.epoch != head.epoch {
                st.reset(head.epoch.clone(), metrics, self.hold_limit());
            }
            (st.next_fanout, st.epoch.clone())
        };
        let until = head.next.saturating_sub(1);
        while cursor <= until {
            let History { epoch: read, messages } = self.inner.store.read(topic, cursor, until, REPAIR_CHUNK).await?;
            let mut st = lock(&t.state);
            if read != epoch || st.epoch != epoch {
                return Ok(()); // deleted since: the bus brings the new epoch
            }
            for msg in &messages {
                if !st.fill(msg, metrics, self.hold_limit()) {
                    st.skip_lost(msg.offset, metrics);
                    st.fill(msg, metrics, self.hold_limit());
                }
            }
            match messages.last() {
                Some(last) => cursor = last.offset + 1,
                None => {
                    if st.next_fanout <= until {
                        st.skip_lost(until + 1, metrics);
                        st.drain_reorder(metrics, self.hold_limit());
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Drops `t` from the table if it has no subscriber left (a repair kept it there).
    fn forget_if_idle(&self, topic: &TopicName, t: &Arc<Topic>) {
        let mut shard = lock(self.shard(topic));
        let Some(current) = shard.get(topic) else { return };
        if !Arc::ptr_eq(current, t) {
            return;
        }
        let st = lock(&t.state);
        if st.subs.is_empty() && st.reorder.is_empty() && !st.repairing {
            drop(st);
            shard.remove(topic);
            if let Some(bus) = &self.inner.bus {
                bus.unwatch(topic);
            }
        }
    }
}

/// Ends a subscription registered while its head was pending, unless `id` was taken
/// (the subscription was attached): on a failed head or a caller that stopped waiting.
struct PendingSub<'a> {
    broker: &'a Broker,
    topic: &'a TopicName,
    id: Option<SubscriptionId>,
}

impl Drop for PendingSub<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.broker.unsubscribe(self.topic, id);
        }
    }
}

/// Polls a future once without a runtime context of its own (a no-op waker): the memory
/// store's futures are ready at once, so the hot path needs no task.
pub(crate) fn futures_now<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match std::pin::Pin::new(f).poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// The history a new subscription must receive before its live messages, read in
/// chunks so a long replay is paced by how fast the client drains.
pub struct Replay {
    broker: Broker,
    topic_name: TopicName,
    topic: Arc<Topic>,
    id: u64,
    cursor: u64,
    end: u64,
    /// The epoch replayed: a chunk of another one (a delete meanwhile) ends the replay.
    epoch: Epoch,
}

impl Replay {
    /// The next chunk of at most `limit` messages, or `None` when the history up to the
    /// watermark is done (then call [`Replay::finish`]).
    pub async fn next_chunk(&mut self, limit: usize) -> Result<Option<Vec<Arc<Message>>>, BrokerError> {
        if self.cursor > self.end {
            return Ok(None);
        }
        let History { epoch, messages: chunk } =
            self.broker.inner.store.read(&self.topic_name, self.cursor, self.end, limit).await?;
        if epoch != self.epoch {
            // The history was deleted during the replay: what is left of it is gone.
            return Ok(None);
        }
        match chunk.last() {
            Some(last) => self.cursor = last.offset + 1,
            None => return Ok(None),
        }
        Metrics::add(&self.broker.inner.metrics.deliveries, chunk.len() as u64);
        Ok(Some(chunk))
    }

    /// Live appends on this node so far (fanned out or not): a replay that sees it
    /// move knows live traffic is flowing and gives way to it.
    pub fn live_appends(&self) -> u64 {
        self.broker.inner.metrics.live_appends.load(Ordering::Relaxed)
    }

    /// Switches the subscription to live: hands over the messages held back meanwhile.
    pub fn finish(self) {
        let mut st = lock(&self.topic.state);
        let metrics = &self.broker.inner.metrics;
        let Some(pos) = st.subs.iter().position(|s| s.id == self.id) else {
            return;
        };
        let Some(held) = st.subs[pos].held.take() else {
            return;
        };
        let sink = st.subs[pos].sink.clone();
        for msg in &held.messages {
            if !sink.deliver(msg) {
                st.subs.remove(pos);
                metrics.subscriptions.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        }
        Metrics::add(&metrics.deliveries, held.messages.len() as u64);
    }
}

#[cfg(test)]
mod tests;
