//! Herald's broker engine. It owns topics, subscriptions, fan-out, history and limits,
//! and knows no socket, no HTTP and no JSON: front doors translate their protocol into
//! calls on one [`Broker`] handle and back.
//!
//! # Layout
//! - [`name`]: validated topic names.
//! - [`message`]: messages, their kinds, the encode-once cache, clocks.
//! - [`store`]: the [`Store`] trait with its guarantees; [`memory`] implements it.
//! - [`broker`]: the topic table, ordered fan-out, replay-then-live subscriptions.
//! - [`bus`]: the [`Bus`] a cluster node's fan-out is driven by, and node [`Role`]s.
//! - [`queue`]: work queues: leases, redelivery, dead letters, long poll.
//! - [`outbound`]: a connection's byte-bounded send queue and the slow-consumer policy.
//! - [`presence`]: who is on a topic (subscribers, publishers), join and leave events.
//! - [`writer`]: the one writer discipline that drains it into a socket, for every front door.
//! - [`config`] and [`metrics`]: typed limits with defaults, and counters.

pub mod broker;
pub mod bus;
pub mod config;
pub mod connections;
pub mod guards;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod name;
pub mod outbound;
pub mod presence;
pub mod queue;
pub mod store;
pub mod writer;

/// The `tracing` target of the spans Herald exports over OpenTelemetry (publish, store,
/// fan-out, queue calls); nothing listens to it unless export is on.
pub const TRACE_TARGET: &str = "herald::trace";

pub use broker::{
    Broker, BrokerError, BusEvents, Fetched, Published, Replay, StartFrom, Subscribed, SubscriptionId, TopicInfo,
    TopicSummary,
};
pub use bus::{Bus, Role};
pub use config::{BrokerConfig, OutboundConfig, QueueConfig, RetentionConfig};
pub use connections::{ConnectionHandle, ConnectionInfo, Connections};
pub use guards::{spawn_replay, ConnectionGuard, ReplayTask, SubscriptionGuard};
pub use memory::{Entry, MemoryStore, TopicSnapshot};
pub use message::{Clock, Kind, ManualClock, Message, NewMessage, Outgoing, SystemClock, WireForm};
pub use metrics::{Door, Metrics};
pub use name::{NameError, QueueName, TopicName};
pub use outbound::{outbound, CloseReason, Item, Outbound, OutboundRx, Subscriber};
pub use presence::{
    Member, MemberRole, Presence, PresenceEntry, PresenceEvent, PresenceKind, PresenceList, PresenceSink,
    MAX_INFO_BYTES,
};
pub use queue::{
    check_enqueue, fetch_acking, AckFetchFuture, BatchFuture, Delivery, ListedQueue, QueueCounters, QueueError,
    QueueFuture, QueueService, QueueStats, Queues, Visible,
};
pub use store::{
    Appended, Epoch, History, ListedTopic, LiveQueue, QueueRecord, QueueSnapshot, Store, StoreError, StoreFuture,
    TopicHead,
};
pub use writer::{run_writer, SocketWriter, WriterEnd};
