//! Broker-wide counters and gauges, kept as plain atomics so the hot path pays one
//! relaxed add per event. The HTTP front door renders them in Prometheus text format.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::message::WireForm;

/// Counters (monotonic) and gauges (may go down) of one broker.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages accepted by publish.
    pub published: AtomicU64,
    /// Messages handed to subscriber buffers (live fan-out and replay).
    pub deliveries: AtomicU64,
    /// Connections closed because they could not keep up.
    pub slow_consumers: AtomicU64,
    /// Live subscriptions on this node.
    pub subscriptions: AtomicI64,
    /// Open client connections (WebSocket and SSE).
    pub connections: AtomicI64,
    /// Encodings performed per wire form, indexed by `WireForm as usize`.
    pub encodes: [AtomicU64; crate::message::FORMS],
    /// Cluster: topic repairs started (a gap, an unknown epoch, a reconnected bus).
    pub cluster_repairs: AtomicU64,
    /// Cluster: messages a repair fanned out from the history (the bus had lost them).
    pub cluster_filled: AtomicU64,
    /// Cluster: subscriptions ended because messages meant for them were gone.
    pub cluster_lost_subscriptions: AtomicU64,
    /// Requests, upgrades, calls and `auth` frames refused for missing or bad
    /// credentials (401 / 4401 / UNAUTHENTICATED).
    pub auth_refused: AtomicU64,
    /// Actions refused because the caller's grants do not allow them (403 / forbidden
    /// frames / PERMISSION_DENIED).
    pub forbidden: AtomicU64,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one encoding of a message into `form`.
    pub fn encoded(&self, form: WireForm) {
        self.encodes[form as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Encodings performed so far into `form`.
    pub fn encodes_of(&self, form: WireForm) -> u64 {
        self.encodes[form as usize].load(Ordering::Relaxed)
    }
}
