//! Broker-wide counters, gauges and latency histograms. Counters and gauges are plain
//! atomics, so the hot path pays one relaxed add per event; histograms are the
//! `prometheus` crate's (lock-free observations), kept in a registry of this broker's
//! own that the store and the process collector add theirs to. The HTTP front door
//! renders both in Prometheus text format.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, Registry};

use crate::message::WireForm;

/// The front door a connection or a publish came through: the `door` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// WebSocket with the JSON protocol (`/v1/ws`).
    Ws,
    /// Raw WebSocket (`/v1/topics/{topic}/ws`).
    Raw,
    /// Server-sent events (subscribe only).
    Sse,
    /// HTTP requests (publish, queue calls).
    Http,
    /// gRPC.
    Grpc,
}

/// Number of [`Door`]s.
pub const DOORS: usize = 5;

impl Door {
    /// Every door, in label order.
    pub const ALL: [Door; DOORS] = [Door::Ws, Door::Raw, Door::Sse, Door::Http, Door::Grpc];

    /// The `door` label's value.
    pub fn label(self) -> &'static str {
        match self {
            Door::Ws => "ws",
            Door::Raw => "raw",
            Door::Sse => "sse",
            Door::Http => "http",
            Door::Grpc => "grpc",
        }
    }
}

/// Bucket bounds (seconds) of the latency histograms: 50 µs to 5 s.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Bucket bounds (seconds) of the queue fetch wait: long polls last up to 30 s.
const WAIT_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Makes a histogram named `herald_{name}` and registers it in `registry`.
pub fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = new_histogram(name, help, buckets, None);
    register(registry, &h);
    h
}

/// Makes a histogram named `herald_{name}` with an optional constant label, not yet
/// registered (a store makes its own before it knows the broker's registry).
pub fn new_histogram(name: &str, help: &str, buckets: &[f64], label: Option<(&str, &str)>) -> Histogram {
    let mut opts = HistogramOpts::new(format!("herald_{name}"), help).buckets(buckets.to_vec());
    if let Some((key, value)) = label {
        opts = opts.const_label(key, value);
    }
    // Only bad options (a wiring bug, not input) make this fail.
    Histogram::with_opts(opts).unwrap_or_else(|e| unreachable_metric(name, &e))
}

/// Registers `h` in `registry`; a name registered twice is logged, not fatal (the
/// histogram still counts, it is just not exported twice).
pub fn register(registry: &Registry, h: &Histogram) {
    if let Err(e) = registry.register(Box::new(h.clone())) {
        tracing::error!(error = %e, "metric not registered");
    }
}

#[cold]
fn unreachable_metric(name: &str, e: &prometheus::Error) -> ! {
    panic!("metric {name} has invalid options: {e}")
}

/// Bucket bounds of store write sizes (messages per commit).
pub const BATCH_BUCKETS: [f64; 12] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

/// The latency histograms, each observed off the per-delivery path (once per publish
/// call, per writer batch, per fetch).
#[derive(Debug)]
pub struct Latencies {
    /// Publish calls, from the request decoded to the store's answer, by door.
    publish: [Histogram; DOORS],
    /// From a message's fan-out (once stored) until a subscriber's socket write that
    /// carried it completed: observed once per writer batch, for its oldest message.
    pub fanout: Histogram,
    /// How long queue fetches waited for a message (0 when one was ready).
    pub fetch_wait: Histogram,
}

impl Latencies {
    /// Records a publish call through `door` that took `took`.
    pub fn publish(&self, door: Door, took: Duration) {
        self.publish[door as usize].observe(took.as_secs_f64());
    }
}

/// Counters (monotonic) and gauges (may go down) of one broker.
#[derive(Debug)]
pub struct Metrics {
    /// Messages accepted by publish.
    pub published: AtomicU64,
    /// Messages handed to subscriber buffers (live fan-out and replay).
    pub deliveries: AtomicU64,
    /// Appends this node fanned out or would have (one per store write, not per
    /// message): replays watch it to tell whether live traffic is flowing.
    pub live_appends: AtomicU64,
    /// Connections closed because they could not keep up.
    pub slow_consumers: AtomicU64,
    /// Live subscriptions on this node.
    pub subscriptions: AtomicI64,
    /// Open client connections (WebSocket and SSE).
    pub connections: AtomicI64,
    /// The same by door, indexed by `Door as usize`.
    pub connections_by_door: [AtomicI64; DOORS],
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
    /// Latency histograms.
    pub latency: Latencies,
    /// Where the histograms live (the store's and the process's too).
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let publish = Door::ALL.map(|door| {
            let h = new_histogram(
                "publish_seconds",
                "Publish calls, from the decoded request to the store's answer, by door.",
                &LATENCY_BUCKETS,
                Some(("door", door.label())),
            );
            if door != Door::Sse {
                register(&registry, &h); // SSE only subscribes
            }
            h
        });
        let latency = Latencies {
            publish,
            fanout: histogram(
                &registry,
                "fanout_seconds",
                "From a message's fan-out (once stored) to the socket write that carried it, per write batch.",
                &LATENCY_BUCKETS,
            ),
            fetch_wait: histogram(
                &registry,
                "queue_fetch_wait_seconds",
                "How long queue fetches waited for a message.",
                &WAIT_BUCKETS,
            ),
        };
        Self {
            published: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            live_appends: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            subscriptions: AtomicI64::new(0),
            connections: AtomicI64::new(0),
            connections_by_door: Default::default(),
            encodes: Default::default(),
            cluster_repairs: AtomicU64::new(0),
            cluster_filled: AtomicU64::new(0),
            cluster_lost_subscriptions: AtomicU64::new(0),
            auth_refused: AtomicU64::new(0),
            forbidden: AtomicU64::new(0),
            latency,
            registry,
        }
    }
}

impl Metrics {
    /// The registry of this broker's histograms, for the store's and the process's
    /// collectors and for rendering.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

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
