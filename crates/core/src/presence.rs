//! Presence: who is on a topic on this node. Every live subscription (any door) and
//! every long-lived connection publishing to a topic is a [`Member`] of it while it
//! lives, held by a [`PresenceEntry`] whose drop is the member's leave. Subscriptions
//! that asked for it are *watchers*: they get a [`PresenceEvent`] for each join and
//! leave after their own, through their [`PresenceSink`].
//!
//! Costs are bounded: a join or leave is a map insert or removal (O(log n) in the
//! topic's members, whatever their number) plus one push per watcher, and events go out
//! at most `presence_events_per_second` per topic. Past that rate they are dropped and
//! counted; when the second is over, watchers get one [`PresenceKind::Lost`] event with
//! the number dropped and the current counts, so they know to ask for the list again.
//! Events of a topic reach every watcher in one order (pushed under the topic's lock,
//! without waiting); they are not ordered with the topic's messages.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use std::any::Any;

use tokio::time::Instant;

use crate::connections::ConnectionInfo;
use crate::name::TopicName;

/// What a member is to its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberRole {
    /// A live subscription.
    Subscriber,
    /// A connection that publishes to the topic.
    Publisher,
}

impl MemberRole {
    /// Its name on the wire.
    pub fn label(self) -> &'static str {
        match self {
            MemberRole::Subscriber => "subscriber",
            MemberRole::Publisher => "publisher",
        }
    }
}

/// One member of a topic: a connection in one role, with what its client said of itself,
/// as lists and events give it (the topic's map keeps it packed, see [`Key`]).
#[derive(Clone)]
pub struct Member {
    /// The connection (its id, door and user are the member's).
    pub conn: Arc<ConnectionInfo>,
    /// Subscriber or publisher.
    pub role: MemberRole,
    /// Client-supplied information, as JSON text (at most [`MAX_INFO_BYTES`]).
    pub info: Option<Arc<str>>,
}

/// The most bytes of JSON text a client may attach to its member entry.
pub const MAX_INFO_BYTES: usize = 1024;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceKind {
    /// The member joined.
    Join,
    /// The member left.
    Leave,
    /// `dropped` events were not sent (over the rate); the counts are the topic's now.
    Lost {
        /// Events dropped since the last one sent.
        dropped: u64,
        /// Subscribers now.
        subscribers: u64,
        /// Publishers now.
        publishers: u64,
    },
}

/// How many of each form a [`PresenceEvent`] caches (one per door that sends events).
pub const PRESENCE_FORMS: usize = 3;

/// One event, shared by every watcher it goes to; each door encodes it once, into the
/// slot of its form.
pub struct PresenceEvent {
    /// The topic.
    pub topic: TopicName,
    /// Join, leave or lost.
    pub kind: PresenceKind,
    /// Who joined or left (`None` for [`PresenceKind::Lost`]).
    pub member: Option<Member>,
    forms: [OnceLock<Box<dyn Any + Send + Sync>>; PRESENCE_FORMS],
}

impl PresenceEvent {
    /// The event in form `form` (a door's constant below [`PRESENCE_FORMS`]), encoded
    /// by `encode` the first time it is asked for and shared by every watcher after. `T`
    /// is the door's frame type (cheap to clone), as for [`crate::Outgoing::encoded`].
    pub fn encoded<T>(&self, form: usize, encode: impl FnOnce(&PresenceEvent) -> T) -> T
    where
        T: Clone + Send + Sync + 'static,
    {
        let cached = self.forms[form].get_or_init(|| Box::new(encode(self)));
        match cached.downcast_ref::<T>() {
            Some(frame) => frame.clone(),
            // Two doors share a slot with different frame types: a wiring bug.
            None => panic!("presence form {form} cached with a different frame type"),
        }
    }
}

/// Where a watcher's events go (its connection's outbound queue).
pub trait PresenceSink: Send + Sync + 'static {
    /// Queues the event; false when the watcher is gone.
    fn presence(&self, event: &Arc<PresenceEvent>) -> bool;
}

/// A topic's members, in the order of their connection ids.
#[derive(Default)]
pub struct PresenceList {
    /// Subscribers on this node.
    pub subscribers: u64,
    /// Publishers on this node.
    pub publishers: u64,
    /// The members asked for.
    pub members: Vec<Member>,
    /// More members follow the last one listed.
    pub more: bool,
}

/// A member's place in its topic's map: its connection id and role in one word
/// (`id << 1 | role`), so that a connection's two roles sort together, subscriber first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key(u64);

impl Key {
    fn new(conn: u64, role: MemberRole) -> Self {
        Key(conn << 1 | u64::from(role == MemberRole::Publisher))
    }

    fn conn(self) -> u64 {
        self.0 >> 1
    }

    fn role(self) -> MemberRole {
        if self.0 & 1 == 0 {
            MemberRole::Subscriber
        } else {
            MemberRole::Publisher
        }
    }
}

/// A member as its topic's map keeps it: the role is in the key. Three words.
struct Slot {
    conn: Arc<ConnectionInfo>,
    info: Option<Arc<str>>,
}

impl Slot {
    fn member(&self, key: Key) -> Member {
        Member { conn: self.conn.clone(), role: key.role(), info: self.info.clone() }
    }
}

struct TopicPresence {
    members: BTreeMap<Key, Slot>,
    watchers: BTreeMap<Key, Arc<dyn PresenceSink>>,
    subscribers: u64,
    publishers: u64,
    /// Start of the current one-second window, and events sent in it.
    window: Instant,
    sent: u32,
    /// Events dropped in this window; a task sends the `Lost` event when it ends.
    dropped: u64,
}

impl TopicPresence {
    fn new() -> Self {
        Self {
            members: BTreeMap::new(),
            watchers: BTreeMap::new(),
            subscribers: 0,
            publishers: 0,
            window: Instant::now(),
            sent: 0,
            dropped: 0,
        }
    }

    fn count(&mut self, role: MemberRole, up: bool) {
        let n = match role {
            MemberRole::Subscriber => &mut self.subscribers,
            MemberRole::Publisher => &mut self.publishers,
        };
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
    }

    fn send(&mut self, event: PresenceEvent) {
        let event = Arc::new(event);
        self.watchers.retain(|_, sink| sink.presence(&event));
    }
}

/// The presence of every topic on this node.
pub struct Presence {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<HashMap<TopicName, TopicPresence>>]>,
    hasher: RandomState,
    per_second: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const WINDOW: Duration = Duration::from_secs(1);

impl Presence {
    /// Presence with at most `per_second` join and leave events per topic (0: none).
    pub fn new(per_second: u32, shards: usize) -> Self {
        let shards = (0..shards.max(1)).map(|_| Mutex::new(HashMap::new())).collect();
        Self { inner: Arc::new(Inner { shards, hasher: RandomState::new(), per_second }) }
    }

    /// Adds `member` to `topic`, telling the topic's watchers; with `watcher`, it is a
    /// watcher from now on (its own join is not sent to it). The member leaves when the
    /// entry is dropped. A connection is a member of a topic once per role: a second
    /// join in the same role replaces the first without events.
    pub fn join(&self, topic: &TopicName, member: Member, watcher: Option<Arc<dyn PresenceSink>>) -> PresenceEntry {
        let key = Key::new(member.conn.id, member.role);
        let mut shard = lock(self.inner.shard(topic));
        let t = shard.entry(topic.clone()).or_insert_with(TopicPresence::new);
        let slot = Slot { conn: member.conn.clone(), info: member.info.clone() };
        if t.members.insert(key, slot).is_none() {
            t.count(member.role, true);
            self.inner.emit(topic, t, PresenceKind::Join, Some(member));
        }
        if let Some(watcher) = watcher {
            t.watchers.insert(key, watcher);
        }
        PresenceEntry { presence: Arc::downgrade(&self.inner), topic: topic.clone(), key }
    }

    /// The subscriber and publisher counts of `topic`.
    pub fn counts(&self, topic: &TopicName) -> (u64, u64) {
        lock(self.inner.shard(topic)).get(topic).map_or((0, 0), |t| (t.subscribers, t.publishers))
    }

    /// Up to `limit` members of `topic` whose connection id is above `after` (a
    /// connection's two roles are listed together).
    pub fn list(&self, topic: &TopicName, after: u64, limit: usize) -> PresenceList {
        let shard = lock(self.inner.shard(topic));
        let Some(t) = shard.get(topic) else { return PresenceList::default() };
        let mut members: Vec<Member> = Vec::new();
        let mut more = false;
        let first = Key::new(after.saturating_add(1), MemberRole::Subscriber);
        for (key, slot) in t.members.range(first..) {
            if members.len() >= limit && members.last().is_none_or(|last| last.conn.id != key.conn()) {
                more = true;
                break;
            }
            members.push(slot.member(*key));
        }
        PresenceList { subscribers: t.subscribers, publishers: t.publishers, members, more }
    }

    /// The topics each of `conns` (connection ids, ascending) subscribes to on this
    /// node, each list sorted: the admin API's connection list reads them here rather
    /// than every connection keeping a second copy. It reads every topic's members in
    /// the ids' range, one shard lock at a time; no message path waits on it.
    pub fn subscriptions(&self, conns: &[u64]) -> Vec<Vec<TopicName>> {
        let mut found = vec![Vec::new(); conns.len()];
        let (Some(&lo), Some(&hi)) = (conns.first(), conns.last()) else { return found };
        let range = Key::new(lo, MemberRole::Subscriber)..=Key::new(hi, MemberRole::Subscriber);
        for shard in self.inner.shards.iter() {
            let shard = lock(shard);
            for (topic, t) in shard.iter() {
                for key in t.members.range(range.clone()).map(|(k, _)| *k) {
                    if key.role() == MemberRole::Subscriber {
                        if let Ok(i) = conns.binary_search(&key.conn()) {
                            found[i].push(topic.clone());
                        }
                    }
                }
            }
        }
        for topics in &mut found {
            topics.sort_unstable();
        }
        found
    }
}

impl Inner {
    fn shard(&self, topic: &TopicName) -> &Mutex<HashMap<TopicName, TopicPresence>> {
        let i = self.hasher.hash_one(topic) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Sends a join or leave to the topic's watchers, within the rate; past it, counts
    /// it as dropped and makes sure a `Lost` event follows when the window ends.
    fn emit(self: &Arc<Self>, topic: &TopicName, t: &mut TopicPresence, kind: PresenceKind, member: Option<Member>) {
        if t.watchers.is_empty() {
            return;
        }
        let now = Instant::now();
        if now.duration_since(t.window) >= WINDOW && t.dropped == 0 {
            t.window = now;
            t.sent = 0;
        }
        if t.sent < self.per_second && t.dropped == 0 {
            t.sent += 1;
            t.send(PresenceEvent { topic: topic.clone(), kind, member, forms: Default::default() });
            return;
        }
        t.dropped += 1;
        if t.dropped == 1 {
            let inner = Arc::downgrade(self);
            let topic = topic.clone();
            let at = t.window + WINDOW;
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                if let Some(inner) = inner.upgrade() {
                    inner.flush_lost(&topic);
                }
            });
        }
    }

    /// The window in which events were dropped is over: watchers learn how many, and
    /// a new window starts with this event counted in it.
    fn flush_lost(&self, topic: &TopicName) {
        let mut shard = lock(self.shard(topic));
        let Some(t) = shard.get_mut(topic) else { return };
        let dropped = std::mem::take(&mut t.dropped);
        t.window = Instant::now();
        t.sent = 1;
        let kind = PresenceKind::Lost { dropped, subscribers: t.subscribers, publishers: t.publishers };
        t.send(PresenceEvent { topic: topic.clone(), kind, member: None, forms: Default::default() });
        if t.members.is_empty() {
            shard.remove(topic);
        }
    }

    fn leave(self: &Arc<Self>, topic: &TopicName, key: Key) {
        let mut shard = lock(self.shard(topic));
        let Some(t) = shard.get_mut(topic) else { return };
        t.watchers.remove(&key);
        if let Some(slot) = t.members.remove(&key) {
            t.count(key.role(), false);
            self.emit(topic, t, PresenceKind::Leave, Some(slot.member(key)));
        }
        // A topic whose `Lost` event is pending stays until it is sent.
        if t.members.is_empty() && t.dropped == 0 {
            shard.remove(topic);
        }
    }
}

/// A member's place in its topic; dropping it is the member's leave.
pub struct PresenceEntry {
    presence: Weak<Inner>,
    topic: TopicName,
    key: Key,
}

impl Drop for PresenceEntry {
    fn drop(&mut self) {
        if let Some(inner) = self.presence.upgrade() {
            inner.leave(&self.topic, self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Door;
    use crate::Connections;

    #[derive(Default)]
    struct Seen(Mutex<Vec<(String, u64, Option<u64>)>>);

    impl PresenceSink for Seen {
        fn presence(&self, event: &Arc<PresenceEvent>) -> bool {
            let (kind, dropped) = match event.kind {
                PresenceKind::Join => ("join", None),
                PresenceKind::Leave => ("leave", None),
                PresenceKind::Lost { dropped, .. } => ("lost", Some(dropped)),
            };
            let conn = event.member.as_ref().map_or(0, |m| m.conn.id);
            lock(&self.0).push((kind.into(), conn, dropped));
            true
        }
    }

    fn member(conns: &Connections, role: MemberRole) -> Member {
        Member { conn: conns.register(Door::Ws), role, info: None }
    }

    #[tokio::test]
    async fn joins_and_leaves_reach_watchers_in_order_and_counts_follow() {
        let conns = Connections::default();
        let presence = Presence::new(100, 4);
        let topic = TopicName::parse("t").expect("a valid name");
        let seen = Arc::new(Seen::default());
        let watcher = presence.join(&topic, member(&conns, MemberRole::Subscriber), Some(seen.clone()));
        let a = presence.join(&topic, member(&conns, MemberRole::Subscriber), None);
        let p = presence.join(&topic, member(&conns, MemberRole::Publisher), None);
        assert_eq!(presence.counts(&topic), (2, 1));
        drop(a);
        drop(p);
        assert_eq!(presence.counts(&topic), (1, 0));
        let got: Vec<(String, u64)> = lock(&seen.0).iter().map(|(k, c, _)| (k.clone(), *c)).collect();
        assert_eq!(got, [("join".into(), 2), ("join".into(), 3), ("leave".into(), 2), ("leave".into(), 3)]);
        drop(watcher);
        assert_eq!(presence.counts(&topic), (0, 0));
        assert!(lock(presence.inner.shard(&topic)).is_empty(), "an empty topic is forgotten");
    }

    #[tokio::test]
    async fn list_pages_by_connection() {
        let conns = Connections::default();
        let presence = Presence::new(100, 4);
        let topic = TopicName::parse("t").expect("a valid name");
        let entries: Vec<PresenceEntry> =
            (0..10).map(|_| presence.join(&topic, member(&conns, MemberRole::Subscriber), None)).collect();
        let first = presence.list(&topic, 0, 4);
        assert_eq!(first.members.iter().map(|m| m.conn.id).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(first.more);
        let rest = presence.list(&topic, 4, 100);
        assert_eq!(rest.members.len(), 6);
        assert!(!rest.more);
        drop(entries);
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_rate_events_are_dropped_then_counted_once() {
        let conns = Connections::default();
        let presence = Presence::new(5, 1);
        let topic = TopicName::parse("t").expect("a valid name");
        let seen = Arc::new(Seen::default());
        let _watcher = presence.join(&topic, member(&conns, MemberRole::Subscriber), Some(seen.clone()));
        for _ in 0..20 {
            drop(presence.join(&topic, member(&conns, MemberRole::Subscriber), None));
        }
        assert_eq!(lock(&seen.0).len(), 5, "the rate holds");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let got = lock(&seen.0).clone();
        assert_eq!(got.len(), 6);
        assert_eq!(got[5], ("lost".into(), 0, Some(35)));
        assert_eq!(presence.counts(&topic), (1, 0));
    }
}
