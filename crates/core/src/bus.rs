//! The `Bus` trait: how a node in a cluster learns what every node appended to a topic,
//! and the node's [`Role`] in it.
//!
//! On one node, fan-out starts where the append resolves. In a cluster, appends happen
//! on other nodes too, so a clustered broker fans out only what its bus delivers (its
//! own appends included): one path, one order per topic. A bus delivers each topic's
//! events in the order the store applied them, while the topic is watched. The broker
//! checks offset continuity on every event and repairs a gap (or a lost connection,
//! [`BusEvents::lost`]) from the store's history; what the history no longer holds is
//! reported to the subscribers it was lost for ([`crate::Subscriber::messages_lost`]).

use crate::name::TopicName;
use crate::store::{StoreFuture, TopicHead};

/// What a node serves in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Everything (the default, and the only role of a single node).
    #[default]
    All,
    /// Publishes and queue calls; no subscription.
    Ingest,
    /// Subscriptions and history; no publish, no queue call.
    Fanout,
}

impl Role {
    /// The role's name, as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Ingest => "ingest",
            Role::Fanout => "fanout",
        }
    }

    /// Whether this node accepts publishes (and queue calls).
    pub fn ingests(self) -> bool {
        self != Role::Fanout
    }

    /// Whether this node serves subscriptions.
    pub fn fans_out(self) -> bool {
        self != Role::Ingest
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Role::All),
            "ingest" => Ok(Role::Ingest),
            "fanout" => Ok(Role::Fanout),
            other => Err(format!("role must be all, ingest or fanout, not {other:?}")),
        }
    }
}

/// Delivers every node's topic events to this node's broker.
///
/// Guarantees the broker relies on:
/// - Once the future from `watch` resolved, every append and delete the store applies
///   to the topic afterwards is delivered, in the store's order, until `unwatch` (or
///   [`BusEvents::lost`] says some may have been missed).
/// - Events of one topic are delivered one at a time, in order.
pub trait Bus: Send + Sync + 'static {
    /// Hands the bus the broker's event entry points (called once, by
    /// [`crate::Broker::clustered`]).
    fn attach(&self, events: crate::broker::BusEvents);

    /// Starts (or keeps) delivering `topic`'s events; resolves once the delivery is in
    /// place. Called for every subscription; cheap when the topic is watched already.
    fn watch(&self, topic: &TopicName) -> StoreFuture<()>;

    /// The last local subscription of `topic` ended; the bus may stop delivering it
    /// (lazily, so that a quick resubscribe costs nothing).
    fn unwatch(&self, topic: &TopicName);

    /// The topic's head, in the order of its events: resolves only once every event the
    /// store applied before reading this head has been delivered (a watched topic), so the
    /// broker can compare the head with what it has fanned out and fill the difference.
    fn barrier(&self, topic: &TopicName) -> StoreFuture<TopicHead>;

    /// Whether the bus is connected (for `/readyz`).
    fn is_ready(&self) -> bool;
}
