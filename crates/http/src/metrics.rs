//! `/metrics`: the broker's counters in Prometheus text format, names prefixed `herald_`.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use herald_core::WireForm;

use crate::AppState;

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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
