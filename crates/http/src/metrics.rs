//! `/metrics`: the broker's counters, gauges and histograms (and the process's) in
//! Prometheus text format, names prefixed `herald_` (`process_` for the process).
//! Label sets are bounded: doors, wire forms, limits, and the [`TOP_QUEUES`] largest
//! queues; never one series per topic or connection.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use herald_core::{Door, TopicInfo, TopicName, WireForm};
use prometheus::{Encoder, TextEncoder};

use crate::AppState;

/// Queues exported one by one (the largest by messages held); the rest only count in
/// `herald_queues`.
pub const TOP_QUEUES: usize = 20;

/// Most topics exported one by one (those `metrics_topics` names, in its order).
pub const TOP_TOPICS: usize = 100;

/// Checks one `metrics_topics` entry: a topic name, `prefix.>` or `>`.
pub fn check_topic_entry(entry: &str) -> Result<(), String> {
    let name = match entry {
        ">" => return Ok(()),
        e => e.strip_suffix(".>").unwrap_or(e),
    };
    TopicName::parse(name).map(drop).map_err(|e| format!("{entry:?} is not a topic name, `prefix.>` or `>`: {e}"))
}

/// The topics `entries` names that exist (retained messages or subscribers), at most
/// [`TOP_TOPICS`], each once.
async fn allowed_topics(state: &AppState, entries: &[String]) -> Vec<TopicName> {
    let mut topics: Vec<TopicName> = Vec::new();
    for entry in entries {
        let left = TOP_TOPICS.saturating_sub(topics.len());
        if left == 0 {
            break;
        }
        let found: Result<Vec<TopicName>, _> = match entry.as_str() {
            ">" => state.broker().list("", None, left).await.map(|l| l.into_iter().map(|t| t.topic).collect()),
            e => match e.strip_suffix(".>") {
                Some(prefix) => state
                    .broker()
                    .list(&format!("{prefix}."), None, left)
                    .await
                    .map(|l| l.into_iter().map(|t| t.topic).collect()),
                None => Ok(TopicName::parse(e).into_iter().collect()),
            },
        };
        match found {
            Ok(found) => {
                for t in found {
                    if !topics.contains(&t) && topics.len() < TOP_TOPICS {
                        topics.push(t);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, entry, "metrics: topics not listed"),
        }
    }
    topics
}

pub(crate) async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let m = state.broker().metrics();
    let mut out = String::with_capacity(2048);
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = write!(out, "# HELP herald_{name} {help}\n# TYPE herald_{name} {kind}\nherald_{name} {value}\n");
    };
    metric(
        "messages_published_total",
        "counter",
        "Messages accepted by publish.",
        m.published.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "deliveries_total",
        "counter",
        "Messages handed to subscriber buffers.",
        m.deliveries.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "slow_consumers_total",
        "counter",
        "Connections closed as slow consumers.",
        m.slow_consumers.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "subscriptions",
        "gauge",
        "Live subscriptions on this node.",
        m.subscriptions.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "connections",
        "gauge",
        "Open WebSocket and SSE connections and gRPC Subscribe streams.",
        m.connections.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "cluster_repairs_total",
        "counter",
        "Cluster: topic repairs started (offset gap, unknown epoch, reconnected bus).",
        m.cluster_repairs.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "cluster_filled_total",
        "counter",
        "Cluster: messages the bus lost, fanned out from the history by a repair.",
        m.cluster_filled.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "cluster_lost_subscriptions_total",
        "counter",
        "Cluster: subscriptions ended because messages meant for them were no longer in the history.",
        m.cluster_lost_subscriptions.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "auth_refused_total",
        "counter",
        "Requests, upgrades, calls and auth frames refused for missing or bad credentials.",
        m.auth_refused.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "forbidden_total",
        "counter",
        "Actions refused because the caller's grants do not allow them.",
        m.forbidden.load(Ordering::Relaxed).to_string(),
    );
    let q = state.broker().queue_counters();
    metric(
        "queue_enqueued_total",
        "counter",
        "Queue messages enqueued.",
        q.enqueued.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "queue_delivered_total",
        "counter",
        "Queue deliveries handed to consumers.",
        q.delivered.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "queue_acked_total",
        "counter",
        "Queue deliveries acknowledged.",
        q.acked.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "queue_dead_lettered_total",
        "counter",
        "Queue messages moved to a dead-letter queue.",
        q.dead_lettered.load(Ordering::Relaxed).to_string(),
    );
    metric("queue_waiters", "gauge", "Long-poll fetches waiting now.", q.waiting.load(Ordering::Relaxed).to_string());
    metric(
        "queue_redelivered_total",
        "counter",
        "Queue deliveries after a message's first (lease ended or requeued).",
        q.redelivered.load(Ordering::Relaxed).to_string(),
    );
    let queued: usize = state.broker().connections().list(0, usize::MAX).iter().map(|c| c.queued_bytes()).sum();
    metric(
        "outbound_queued_bytes",
        "gauge",
        "Bytes queued for connections and not yet written, all connections together.",
        queued.to_string(),
    );
    let _ = write!(
        out,
        "# HELP herald_encodes_total Message encodings per wire form (one per message and form when fan-out shares them).\n# TYPE herald_encodes_total counter\n"
    );
    for (form, label) in [
        (WireForm::WsJson, "ws_json"),
        (WireForm::WsRaw, "ws_raw"),
        (WireForm::Sse, "sse"),
        (WireForm::Grpc, "grpc"),
        (WireForm::WsPacked, "ws_packed"),
    ] {
        let _ = writeln!(out, "herald_encodes_total{{form=\"{label}\"}} {}", m.encodes_of(form));
    }
    let l = state.limits().counters();
    let _ = write!(
        out,
        "# HELP herald_limited_total Clients refused, slowed or closed by an abuse limit, by limit.\n# TYPE herald_limited_total counter\n"
    );
    for (limit, counter) in [
        ("connection_rate", &l.connections_refused),
        ("paused", &l.paused),
        ("rate", &l.refused),
        ("error_budget", &l.error_closes),
        ("header_timeout", &l.header_timeouts),
        ("handshake_timeout", &l.handshake_timeouts),
    ] {
        let _ = writeln!(out, "herald_limited_total{{limit=\"{limit}\"}} {}", counter.load(Ordering::Relaxed));
    }
    let _ = write!(
        out,
        "# HELP herald_connections_by_door Open connections by door (ws, raw, sse, grpc).\n# TYPE herald_connections_by_door gauge\n"
    );
    for door in Door::ALL {
        if door == Door::Http {
            continue; // requests, not connections
        }
        let open = m.connections_by_door[door as usize].load(Ordering::Relaxed);
        let _ = writeln!(out, "herald_connections_by_door{{door=\"{}\"}} {open}", door.label());
    }
    let _ = write!(
        out,
        "# HELP herald_build_info Herald's version.\n# TYPE herald_build_info gauge\nherald_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    // Queues shared outside the node (PostgreSQL, a cluster's Redis) are read from there:
    // an error leaves them out of this scrape rather than failing it.
    let (count, top) = match state.broker().queue_top(TOP_QUEUES).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "queue counts left out of /metrics");
            (0, Vec::new())
        }
    };
    let _ = write!(
        out,
        "# HELP herald_queues Work queues (this node's, or all the shared ones; dead-letter queues not counted).\n# TYPE herald_queues gauge\nherald_queues {count}\n"
    );
    let _ = write!(
        out,
        "# HELP herald_queue_messages Messages of the largest queues by state (ready, in_flight, delayed, dead).\n# TYPE herald_queue_messages gauge\n"
    );
    for (queue, stats) in &top {
        for (st, n) in
            [("ready", stats.ready), ("in_flight", stats.in_flight), ("delayed", stats.delayed), ("dead", stats.dead)]
        {
            let _ = writeln!(out, "herald_queue_messages{{queue=\"{}\",state=\"{st}\"}} {n}", queue.as_str());
        }
    }
    // Per-topic series, only for the topics `metrics_topics` allows.
    let topics = allowed_topics(&state, &state.config().metrics_topics).await;
    if !topics.is_empty() {
        let mut rows = Vec::with_capacity(topics.len());
        for topic in &topics {
            match state.broker().info(topic).await {
                Ok(info) => rows.push((topic, info)),
                Err(e) => tracing::warn!(error = %e, %topic, "metrics: topic head not read"),
            }
        }
        for (name, help, value) in [
            (
                "topic_last_offset",
                "Offset of the newest message of an allow-listed topic (metrics_topics); its rate is the topic's publish rate.",
                (|i: &TopicInfo| i.head.last) as fn(&TopicInfo) -> u64,
            ),
            ("topic_retained_messages", "Messages an allow-listed topic retains.", |i: &TopicInfo| i.head.retained),
            ("topic_subscribers", "Live subscribers of an allow-listed topic on this node.", |i: &TopicInfo| {
                i.subscribers
            }),
        ] {
            let _ = write!(out, "# HELP herald_{name} {help}\n# TYPE herald_{name} gauge\n");
            for (topic, info) in &rows {
                let _ = writeln!(out, "herald_{name}{{topic=\"{}\"}} {}", topic.as_str(), value(info));
            }
        }
    }
    // Histograms, the store's and the process's metrics.
    let mut encoded = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&m.registry().gather(), &mut encoded) {
        tracing::warn!(error = %e, "metrics registry could not be encoded");
    }
    out.push_str(&String::from_utf8_lossy(&encoded));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
