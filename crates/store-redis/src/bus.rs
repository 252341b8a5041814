//! `RedisBus`: a cluster node's [`Bus`], one Redis pub/sub connection that subscribes
//! to a topic's channel while the node has a subscriber of it, and hands every event
//! to the broker in the order Redis published it.
//!
//! Events on `<prefix>{t:<topic>}:ch` (written by the scripts, in `scripts.rs`):
//! - `a <epoch> <first> <ts> <count>\n` then, per message, `<kind> <expires or -> <len>\n`
//!   and `len` payload bytes: a whole appended batch, offsets from `first`.
//! - `d <previous epoch or -> <epoch>`: the history was deleted.
//! - `h <token>`: a barrier ([`Bus::barrier`]); the node whose token it is resolves its
//!   wait, every other node ignores it.
//!
//! It also carries the wake-ups of shared queues (`queues.rs`): while a node has a long
//! poll waiting on a queue, it subscribes to the queue family's channel
//! `<prefix>{sq:<queue>}:wake`, where the queue script publishes `m` (the queue) or `d`
//! (its dead-letter queue) whenever messages became ready there.
//!
//! One task owns the connection. It batches SUBSCRIBE calls (every watch that arrived
//! since the last call goes in one), unsubscribes a topic [`LINGER`] after its last
//! subscriber left, pings every [`PING_EVERY`] and drops a connection whose ping does not
//! come back within [`PING_TIMEOUT`]. After a lost connection it connects again,
//! subscribes to every watched channel, and tells the broker events may have been missed
//! ([`BusEvents::lost`]), which repairs each topic from the history.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use herald_core::{
    Appended, Bus, BusEvents, Epoch, Kind, Message, NewMessage, QueueName, StoreError, StoreFuture, TopicHead,
    TopicName,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ProtocolVersion, PushInfo, PushKind};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::con::Target;
use crate::{family_key, kind_of, lock, topic_key, Inner, RedisStore, RedisStoreError};

/// How long a topic stays subscribed after its last local subscriber left.
const LINGER: Duration = Duration::from_secs(2);
/// How often the connection is pinged (and lingering topics are unsubscribed).
const PING_EVERY: Duration = Duration::from_secs(1);
/// A ping not answered within this ends the connection.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// A watch or barrier not confirmed within this fails (Redis unreachable).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Channels per SUBSCRIBE call.
const SUBSCRIBE_BATCH: usize = 512;
/// Pause between connection attempts.
const RECONNECT_EVERY: Duration = Duration::from_millis(200);

/// The pub/sub bus of a cluster node. Cheap to clone; the task ends with the last clone.
#[derive(Clone)]
pub struct RedisBus {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<Inner>,
    /// This node's barrier tokens start with it.
    node: String,
    tokens: AtomicU64,
    state: Mutex<State>,
    /// Wakes the task: watches to subscribe.
    wake: Notify,
    events: OnceLock<BusEvents>,
    /// Where queue wake-ups go (the node's shared queues, once they exist).
    queue_wake: OnceLock<QueueWake>,
    connected: AtomicBool,
}

/// Told that messages became ready in a queue family (`Some((queue family, in its
/// dead-letter queue))`), or that wake-ups may have been missed (`None`).
pub(crate) type QueueWake = Box<dyn Fn(Option<(&QueueName, bool)>) + Send + Sync>;

/// A channel the bus subscribes to.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) enum Channel {
    /// A topic's events.
    Topic(TopicName),
    /// A queue family's wake-ups (named by the queue whose dead-letter queue is in it).
    Queue(QueueName),
}

impl Channel {
    fn name(&self, prefix: &str) -> String {
        match self {
            Channel::Topic(t) => topic_key(prefix, t, "ch"),
            Channel::Queue(q) => family_key(prefix, q, "wake"),
        }
    }
}

#[derive(Default)]
struct State {
    topics: HashMap<Channel, Watch>,
    /// Barriers waiting for their event, by token.
    barriers: HashMap<String, oneshot::Sender<()>>,
}

enum Watch {
    /// Not subscribed yet: the waiters resolve at the confirmation.
    Pending { waiters: Vec<oneshot::Sender<()>>, wanted: bool },
    /// Subscribed, with local subscribers.
    Active,
    /// Subscribed, no local subscriber since this instant.
    Lingering(Instant),
}

impl RedisBus {
    /// Starts the bus of `store`'s Redis: connects its pub/sub connection (the first
    /// attempt is awaited, so a wrong URL fails the start) and spawns its task.
    pub async fn start(store: &RedisStore) -> Result<Self, RedisStoreError> {
        let inner = store.inner.clone();
        let first = connect(&inner.target).await?;
        let node = inner.fresh_epoch();
        let shared = Arc::new(Shared {
            store: inner,
            node,
            tokens: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            events: OnceLock::new(),
            queue_wake: OnceLock::new(),
            connected: AtomicBool::new(true),
        });
        tokio::spawn(run(Arc::downgrade(&shared), Some(first)));
        Ok(Self { shared })
    }

    /// Where queue wake-ups go (set once, by the node's shared queues).
    pub(crate) fn on_queue_wake(&self, wake: QueueWake) {
        let _ = self.shared.queue_wake.set(wake);
    }

    /// Subscribes to `channel`; resolves once Redis confirmed it (see [`Bus::watch`]).
    pub(crate) fn watch_channel(&self, channel: Channel) -> StoreFuture<()> {
        let mut st = lock(&self.shared.state);
        let waiter = match st.topics.get_mut(&channel) {
            Some(w @ (Watch::Active | Watch::Lingering(_))) => {
                *w = Watch::Active;
                None
            }
            Some(Watch::Pending { waiters, wanted }) => {
                *wanted = true;
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                Some(rx)
            }
            None => {
                let (tx, rx) = oneshot::channel();
                st.topics.insert(channel, Watch::Pending { waiters: vec![tx], wanted: true });
                self.shared.wake.notify_one();
                Some(rx)
            }
        };
        drop(st);
        Box::pin(async move {
            let Some(rx) = waiter else { return Ok(()) };
            match tokio::time::timeout(CONFIRM_TIMEOUT, rx).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(StoreError::Unavailable("redis: a pub/sub channel could not be subscribed".into())),
            }
        })
    }

    /// The node no longer needs `channel`: unsubscribed [`LINGER`] later unless watched again.
    pub(crate) fn unwatch_channel(&self, channel: &Channel) {
        let mut st = lock(&self.shared.state);
        match st.topics.get_mut(channel) {
            Some(w @ Watch::Active) => *w = Watch::Lingering(Instant::now()),
            Some(Watch::Pending { wanted, .. }) => *wanted = false,
            _ => {}
        }
    }

    fn lost(shared: &Shared) {
        if let Some(events) = shared.events.get() {
            events.lost();
        }
        if let Some(wake) = shared.queue_wake.get() {
            wake(None);
        }
    }
}

/// The subscribing half of the bus's connection: a RESP2 pub/sub connection to one
/// server, or a RESP3 cluster connection whose sharded subscriptions (SSUBSCRIBE) go to
/// each channel's shard and are renewed by the client after a reconnect.
enum Sink {
    Single(redis::aio::PubSubSink),
    Cluster(ClusterConnection),
}

/// What the connection delivers.
enum Stream {
    Single(redis::aio::PubSubStream),
    Cluster(mpsc::UnboundedReceiver<PushInfo>),
}

enum Incoming {
    /// An event on a channel.
    Event(String, Vec<u8>),
    /// A shard's connection dropped (cluster): events may have been missed.
    Lost,
    /// Nothing for us (a subscription confirmation, say).
    Other,
}

async fn connect(target: &Target) -> redis::RedisResult<(Sink, Stream)> {
    if target.cluster {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = ClusterClientBuilder::new(target.urls.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()?;
        return Ok((Sink::Cluster(client.get_async_connection().await?), Stream::Cluster(rx)));
    }
    let (sink, stream) = redis::Client::open(target.urls[0].as_str())?.get_async_pubsub().await?.split();
    Ok((Sink::Single(sink), Stream::Single(stream)))
}

impl Sink {
    async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            Sink::Single(s) => s.subscribe(channels).await,
            Sink::Cluster(c) => c.ssubscribe(channels).await,
        }
    }

    async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            Sink::Single(s) => s.unsubscribe(channels).await,
            Sink::Cluster(c) => c.sunsubscribe(channels).await,
        }
    }

    async fn ping(&mut self) -> redis::RedisResult<()> {
        match self {
            Sink::Single(s) => s.ping::<redis::Value>().await.map(drop),
            Sink::Cluster(c) => redis::cmd("PING").query_async::<redis::Value>(c).await.map(drop),
        }
    }

    fn clone_for_probe(&self) -> Self {
        match self {
            Sink::Single(s) => Sink::Single(s.clone()),
            Sink::Cluster(c) => Sink::Cluster(c.clone()),
        }
    }
}

impl Stream {
    /// The next delivery; `None` once the connection is gone for good.
    async fn next(&mut self) -> Option<Incoming> {
        match self {
            Stream::Single(s) => {
                let msg = s.next().await?;
                Some(Incoming::Event(msg.get_channel_name().to_owned(), msg.get_payload_bytes().to_vec()))
            }
            Stream::Cluster(rx) => {
                let push = rx.recv().await?;
                Some(match (push.kind, &push.data[..]) {
                    (PushKind::SMessage, [channel, payload]) => {
                        match (
                            redis::from_redis_value_ref::<String>(channel),
                            redis::from_redis_value_ref::<Vec<u8>>(payload),
                        ) {
                            (Ok(channel), Ok(payload)) => Incoming::Event(channel, payload),
                            _ => Incoming::Other,
                        }
                    }
                    (PushKind::Disconnection, _) => Incoming::Lost,
                    _ => Incoming::Other,
                })
            }
        }
    }
}

impl Bus for RedisBus {
    fn attach(&self, events: BusEvents) {
        let _ = self.shared.events.set(events);
    }

    fn watch(&self, topic: &TopicName) -> StoreFuture<()> {
        self.watch_channel(Channel::Topic(topic.clone()))
    }

    fn unwatch(&self, topic: &TopicName) {
        self.unwatch_channel(&Channel::Topic(topic.clone()));
    }

    fn barrier(&self, topic: &TopicName) -> StoreFuture<TopicHead> {
        let shared = self.shared.clone();
        let topic = topic.clone();
        Box::pin(async move {
            let n = shared.tokens.fetch_add(1, Ordering::Relaxed);
            let token = format!("{}:{n}", shared.node);
            let (tx, rx) = oneshot::channel();
            lock(&shared.state).barriers.insert(token.clone(), tx);
            let head = shared.store.barrier(&topic, &token).await;
            let arrived = match &head {
                Ok(_) => tokio::time::timeout(CONFIRM_TIMEOUT, rx).await,
                Err(_) => Ok(Ok(())),
            };
            lock(&shared.state).barriers.remove(&token);
            match arrived {
                Ok(Ok(())) => head,
                _ => Err(StoreError::Unavailable("redis: a barrier event did not come back".into())),
            }
        })
    }

    fn is_ready(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }
}

/// The bus task: connects, subscribes, reads events; ends when the bus is dropped.
async fn run(shared: std::sync::Weak<Shared>, mut first: Option<(Sink, Stream)>) {
    let mut reconnected = false;
    loop {
        let (sink, stream) = match first.take() {
            Some(c) => c,
            None => {
                let Some(s) = shared.upgrade() else { return };
                let target = s.store.target.clone();
                drop(s);
                match connect(&target).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "cluster bus: cannot connect to redis");
                        tokio::time::sleep(RECONNECT_EVERY).await;
                        continue;
                    }
                }
            }
        };
        match serve(&shared, sink, stream, reconnected).await {
            Ended::Dropped => return,
            Ended::Lost => {
                if let Some(s) = shared.upgrade() {
                    s.connected.store(false, Ordering::Relaxed);
                    // Subscribe everything again on the next connection; barriers in
                    // flight will not come back.
                    let mut st = lock(&s.state);
                    st.topics.retain(|_, w| !matches!(w, Watch::Lingering(_)));
                    for w in st.topics.values_mut() {
                        if matches!(w, Watch::Active) {
                            *w = Watch::Pending { waiters: Vec::new(), wanted: true };
                        }
                    }
                    st.barriers.clear();
                }
                tracing::warn!("cluster bus: lost the redis pub/sub connection; reconnecting");
                reconnected = true;
                tokio::time::sleep(RECONNECT_EVERY).await;
            }
        }
    }
}

enum Ended {
    /// The bus was dropped.
    Dropped,
    /// The connection failed.
    Lost,
}

async fn serve(weak: &std::sync::Weak<Shared>, mut sink: Sink, mut stream: Stream, reconnected: bool) -> Ended {
    let Some(shared) = weak.upgrade() else { return Ended::Dropped };
    let prefix = shared.store.prefix.clone();
    if subscribe_pending(&shared, &mut sink).await.is_err() {
        return Ended::Lost;
    }
    shared.connected.store(true, Ordering::Relaxed);
    if reconnected {
        RedisBus::lost(&shared);
    }
    drop(shared);
    let (dead_tx, mut dead) = oneshot::channel::<()>();
    let prober = tokio::spawn(probe(weak.clone(), sink.clone_for_probe(), dead_tx));
    let mut tick = tokio::time::interval(PING_EVERY);
    let ended = loop {
        let Some(shared) = weak.upgrade() else { break Ended::Dropped };
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Incoming::Event(channel, payload)) => dispatch(&shared, &prefix, &channel, payload),
                Some(Incoming::Lost) => {
                    // A Redis Cluster shard's connection dropped; the client reconnects
                    // and subscribes again by itself. Repair what may have been missed
                    // (a repair's barrier comes back once the subscription is renewed).
                    shared.connected.store(false, Ordering::Relaxed);
                    tracing::warn!("cluster bus: a Redis Cluster connection dropped; repairing");
                    RedisBus::lost(&shared);
                }
                Some(Incoming::Other) => {}
                None => break Ended::Lost,
            },
            () = shared.wake.notified() => {
                if subscribe_pending(&shared, &mut sink).await.is_err() {
                    break Ended::Lost;
                }
            }
            _ = tick.tick() => {
                if unsubscribe_idle(&shared, &mut sink).await.is_err() {
                    break Ended::Lost;
                }
            }
            _ = &mut dead => break Ended::Lost,
        }
    };
    prober.abort();
    ended
}

/// Pings on the pub/sub connection; a ping that fails or does not come back in time
/// ends the connection (a half-open TCP connection would otherwise look alive). A ping
/// that answers marks the bus connected (after a cluster shard's reconnect).
async fn probe(shared: std::sync::Weak<Shared>, mut sink: Sink, dead: oneshot::Sender<()>) {
    loop {
        tokio::time::sleep(PING_EVERY).await;
        match tokio::time::timeout(PING_TIMEOUT, sink.ping()).await {
            Ok(Ok(())) => match shared.upgrade() {
                Some(s) => s.connected.store(true, Ordering::Relaxed),
                None => return,
            },
            _ => {
                let _ = dead.send(());
                return;
            }
        }
    }
}

/// Subscribes every pending topic, a batch per call, and resolves their watches.
async fn subscribe_pending(shared: &Shared, sink: &mut Sink) -> redis::RedisResult<()> {
    loop {
        let batch: Vec<Channel> = {
            let st = lock(&shared.state);
            st.topics
                .iter()
                .filter(|(_, w)| matches!(w, Watch::Pending { .. }))
                .map(|(t, _)| t.clone())
                .take(SUBSCRIBE_BATCH)
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        let channels: Vec<String> = batch.iter().map(|c| c.name(&shared.store.prefix)).collect();
        sink.subscribe(&channels).await?;
        let mut st = lock(&shared.state);
        for t in batch {
            if let Some(w) = st.topics.get_mut(&t) {
                if let Watch::Pending { waiters, wanted } = w {
                    for waiter in waiters.drain(..) {
                        let _ = waiter.send(());
                    }
                    *w = if *wanted { Watch::Active } else { Watch::Lingering(Instant::now()) };
                }
            }
        }
    }
}

/// Unsubscribes the topics that have lingered past [`LINGER`], in one call.
async fn unsubscribe_idle(shared: &Shared, sink: &mut Sink) -> redis::RedisResult<()> {
    let idle: Vec<Channel> = {
        let mut st = lock(&shared.state);
        let idle: Vec<Channel> = st
            .topics
            .iter()
            .filter(|(_, w)| matches!(w, Watch::Lingering(since) if since.elapsed() >= LINGER))
            .map(|(t, _)| t.clone())
            .collect();
        for t in &idle {
            st.topics.remove(t);
        }
        idle
    };
    if idle.is_empty() {
        return Ok(());
    }
    let channels: Vec<String> = idle.iter().map(|c| c.name(&shared.store.prefix)).collect();
    sink.unsubscribe(&channels).await
}

/// Hands one event to the broker (or resolves a barrier, or wakes a queue's long polls).
fn dispatch(shared: &Shared, prefix: &str, channel: &str, payload: Vec<u8>) {
    if let Some(family) = family_of(prefix, channel) {
        if let Some(wake) = shared.queue_wake.get() {
            wake(Some((&family, payload.first() == Some(&b'd'))));
        }
        return;
    }
    let Some(topic) = topic_of(prefix, channel) else {
        tracing::warn!(channel, "cluster bus: event on an unknown channel");
        return;
    };
    let Some(events) = shared.events.get() else { return };
    match payload.first() {
        Some(b'a') => match decode_append(&topic, Bytes::from(payload)) {
            Some(appended) => events.appended(&topic, appended),
            None => tracing::warn!(topic = %topic, "cluster bus: damaged append event"),
        },
        Some(b'd') => {
            let text = std::str::from_utf8(&payload).unwrap_or("");
            let mut words = text.split(' ').skip(1);
            match (words.next(), words.next()) {
                (Some(previous), Some(epoch)) => events.deleted(&topic, previous, Epoch::from(epoch)),
                _ => tracing::warn!(topic = %topic, "cluster bus: damaged delete event"),
            }
        }
        Some(b'h') => {
            let token = std::str::from_utf8(&payload[payload.len().min(2)..]).unwrap_or("");
            if let Some(tx) = lock(&shared.state).barriers.remove(token) {
                let _ = tx.send(());
            }
        }
        _ => tracing::warn!(topic = %topic, "cluster bus: unknown event"),
    }
}

/// The topic of a channel `<prefix>{t:<topic>}:ch`.
fn topic_of(prefix: &str, channel: &str) -> Option<TopicName> {
    let name = channel.strip_prefix(prefix)?.strip_prefix("{t:")?.strip_suffix("}:ch")?;
    TopicName::parse(name).ok()
}

/// The queue family of a channel `<prefix>{sq:<queue>}:wake`.
fn family_of(prefix: &str, channel: &str) -> Option<QueueName> {
    let name = channel.strip_prefix(prefix)?.strip_prefix("{sq:")?.strip_suffix("}:wake")?;
    QueueName::parse(name).ok()
}

/// Decodes an `a` event (payloads are slices of it).
fn decode_append(topic: &TopicName, event: Bytes) -> Option<Appended> {
    let (header, mut rest) = line(&event, 0)?;
    let mut words = header.split(' ');
    let (_, epoch, first, ts, count) = (words.next()?, words.next()?, words.next()?, words.next()?, words.next()?);
    let (first, ts, count): (u64, u64, usize) = (first.parse().ok()?, ts.parse().ok()?, count.parse().ok()?);
    let mut messages = Vec::with_capacity(count.min(4096));
    for i in 0..count as u64 {
        let (head, at) = line(&event, rest)?;
        let mut words = head.split(' ');
        let kind: Kind = kind_of(words.next()?)?;
        let ttl_ms = match words.next()? {
            "-" => None,
            e => Some(e.parse::<u64>().ok()?.saturating_sub(ts)),
        };
        let len: usize = words.next()?.parse().ok()?;
        let end = at.checked_add(len).filter(|&e| e <= event.len())?;
        let new = NewMessage { kind, payload: event.slice(at..end), ttl_ms };
        messages.push(Arc::new(Message::new(topic.clone(), first + i, ts, new)));
        rest = end;
    }
    (rest == event.len()).then(|| Appended { epoch: Epoch::from(epoch), messages })
}

/// The text from `at` to the next newline, and the index after it.
fn line(event: &Bytes, at: usize) -> Option<(&str, usize)> {
    let nl = event.get(at..)?.iter().position(|&b| b == b'\n')? + at;
    Some((std::str::from_utf8(&event[at..nl]).ok()?, nl + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_events_decode() -> Result<(), Box<dyn std::error::Error>> {
        let t = TopicName::parse("a.b")?;
        let event = b"a e1 7 100 2\njson - 2\n{}binary 150 3\nx\ny";
        let appended = decode_append(&t, Bytes::from_static(event)).ok_or("decode")?;
        assert_eq!(&*appended.epoch, "e1");
        let m = &appended.messages;
        assert_eq!((m[0].offset, m[0].ts, m[0].kind, &m[0].payload[..]), (7, 100, Kind::Json, &b"{}"[..]));
        assert_eq!(
            (m[1].offset, m[1].kind, &m[1].payload[..], m[1].expires_at),
            (8, Kind::Binary, &b"x\ny"[..], Some(150))
        );
        assert!(decode_append(&t, Bytes::from_static(b"a e1 7 100 2\njson - 2\n{}")).is_none(), "a missing message");
        assert!(decode_append(&t, Bytes::from_static(b"a e1 7 100 1\njson - 9\n{}")).is_none(), "a short payload");
        Ok(())
    }

    #[test]
    fn channels_name_their_topic() {
        assert_eq!(topic_of("h:", "h:{t:a.b}:ch").map(|t| t.as_str().to_owned()), Some("a.b".to_owned()));
        assert!(topic_of("h:", "x:{t:a.b}:ch").is_none());
        assert_eq!(family_of("h:", "h:{sq:jobs}:wake").map(|q| q.as_str().to_owned()), Some("jobs".to_owned()));
        assert!(topic_of("h:", "h:{sq:jobs}:wake").is_none());
    }
}
