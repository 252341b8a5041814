//! Typed configuration of the core with its shipped defaults, in one place.
//!
//! The binary fills these from flags, env and TOML; the core only reads them.

use std::time::Duration;

use crate::bus::Role;

/// Shipped default for [`BrokerConfig::max_message_bytes`]: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// How long a topic keeps its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionConfig {
    /// At most this many messages per topic; older ones are trimmed (default 100 000).
    pub max_messages: u64,
    /// Messages older than this are trimmed (default 24 h).
    pub max_age: Duration,
    /// At most this many payload bytes per topic; the oldest messages are trimmed past
    /// it, though the newest is always kept (default 0: no limit by bytes).
    pub max_bytes: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self { max_messages: 100_000, max_age: Duration::from_secs(24 * 3600), max_bytes: 0 }
    }
}

/// Bounds of one connection's outbound buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboundConfig {
    /// Bytes queued for a connection before it counts as full (default 8 MiB). A connection
    /// that reaches twice this is closed at once, so memory stays bounded.
    pub max_pending_bytes: usize,
    /// A connection full for longer than this is closed as a slow consumer (default 5 s).
    pub slow_consumer_timeout: Duration,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self { max_pending_bytes: 8 << 20, slow_consumer_timeout: Duration::from_secs(5) }
    }
}

/// Work-queue limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Deliveries after which an unacked message moves to the dead-letter queue (default 5).
    pub max_attempts: u32,
    /// Messages one queue may hold, in any state (default 1 000 000); then enqueue is refused.
    pub max_queue_messages: usize,
    /// Long polls that may wait on one queue at once (default 1000).
    pub max_waiters_per_queue: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { max_attempts: 5, max_queue_messages: 1_000_000, max_waiters_per_queue: 1000 }
    }
}

/// Limits enforced by the broker itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Largest payload accepted, in bytes (default 1 MiB).
    pub max_message_bytes: usize,
    /// Outbound buffer bounds per connection.
    pub outbound: OutboundConfig,
    /// Number of topic-table shards; more means less contention between unrelated topics.
    pub shards: usize,
    /// Work-queue limits.
    pub queues: QueueConfig,
    /// What this node serves in a cluster (default all).
    pub role: Role,
    /// Presence join and leave events sent per topic and second, at most (default 100);
    /// past it they are dropped and counted ([`crate::presence`]).
    pub presence_events_per_second: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            outbound: OutboundConfig::default(),
            shards: 64,
            queues: QueueConfig::default(),
            role: Role::All,
            presence_events_per_second: 100,
        }
    }
}
