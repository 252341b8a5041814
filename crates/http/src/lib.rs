//! Herald's HTTP front doors on one axum router: REST topics, Server-Sent Events, the
//! WebSocket JSON protocol, raw WebSockets, `/healthz`, `/readyz`, `/metrics`, and the
//! web console's static files at `/` (`console`).
//!
//! Each handler translates its protocol into calls on the core's [`Broker`] and back;
//! no handler talks to a store. Long-lived connections are tracked so shutdown can close
//! them with 1001 and wait for them.

mod admin;
mod auth;
mod console;
mod error;
mod extract;
mod limits;
pub mod metrics;
mod queues;
mod rest;
mod sse;
mod tap;
mod upgrade;
mod ws;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use herald_auth::limits::Limits;
use herald_auth::LiveAuth;
use herald_core::Broker;
use herald_protocol::ErrorCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::ApiError;

/// Limits and timers of the HTTP and WebSocket front doors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Open WebSocket and SSE connections allowed; past it, 503 `unavailable` (default 100 000).
    pub max_connections: usize,
    /// Subscriptions one WebSocket may hold (default 1000).
    pub max_subscriptions_per_connection: usize,
    /// Interval between server Pings on a WebSocket (default 25 s).
    pub ping_interval: Duration,
    /// A WebSocket silent this long after a Ping is dropped (default 10 s).
    pub pong_timeout: Duration,
    /// Topics `/metrics` has per-topic series for: names, `prefix.>` (every topic
    /// under it) or `>` (every topic); at most [`metrics::TOP_TOPICS`] topics in all.
    /// Empty by default: no series per topic.
    pub metrics_topics: Vec<String>,
    /// Serve the web console at `/` and `/console/*` (default on); off, they are 404.
    pub console: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_subscriptions_per_connection: 1000,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            metrics_topics: Vec::new(),
            console: true,
        }
    }
}

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

#[derive(Clone)]
struct StateInner {
    broker: Broker,
    config: HttpConfig,
    shutdown: CancellationToken,
    /// Cancelled when a graceful shutdown begins, before `shutdown` (the drain delay):
    /// `/readyz` then answers 503 while everything else is served as before.
    draining: CancellationToken,
    tracker: TaskTracker,
    /// Checks credentials; `None`: every caller may do everything.
    auth: Option<Arc<LiveAuth>>,
    /// The abuse limits, for `/metrics` (each connection carries its own buckets).
    limits: Arc<Limits>,
}

impl AppState {
    /// State over `broker`; cancelling `shutdown` closes every long-lived connection.
    pub fn new(broker: Broker, config: HttpConfig, shutdown: CancellationToken) -> Self {
        Self::with_auth(broker, config, shutdown, None)
    }

    /// As [`AppState::new`], authenticating every `/v1` request with `auth`.
    pub fn with_auth(
        broker: Broker,
        config: HttpConfig,
        shutdown: CancellationToken,
        auth: Option<Arc<LiveAuth>>,
    ) -> Self {
        let limits = Arc::default();
        let draining = shutdown.clone();
        let tracker = TaskTracker::new();
        Self { inner: Arc::new(StateInner { broker, config, shutdown, draining, tracker, auth, limits }) }
    }

    /// The state whose `/readyz` turns 503 once `draining` is cancelled (by default, once
    /// `shutdown` is).
    pub fn with_draining(self, draining: CancellationToken) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.draining = draining;
        Self { inner: Arc::new(inner) }
    }

    /// The state with `limits`, the ones the server's listener gives each connection.
    pub fn with_limits(self, limits: Arc<Limits>) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.limits = limits;
        Self { inner: Arc::new(inner) }
    }

    fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    fn auth(&self) -> Option<&Arc<LiveAuth>> {
        self.inner.auth.as_ref()
    }

    fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    fn config(&self) -> &HttpConfig {
        &self.inner.config
    }

    /// Tasks that serve upgraded WebSockets; shutdown waits on them.
    pub fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }
}

/// The router with every route of docs/protocol.md's HTTP and WebSocket sections.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/ws", get(ws::json_upgrade))
        .route("/v1/topics", get(rest::list_topics))
        .route("/v1/topics/{topic}", get(rest::topic_info).delete(rest::delete_topic))
        .route("/v1/topics/{topic}/messages", post(rest::publish).get(rest::fetch))
        .route("/v1/topics/{topic}/sse", get(sse::stream))
        .route("/v1/topics/{topic}/presence", get(rest::presence))
        .route("/v1/topics/{topic}/ws", get(ws::raw_upgrade))
        .route("/v1/queues", get(queues::list))
        .route("/v1/queues/{queue}", get(queues::stats))
        .route("/v1/queues/{queue}/messages", post(queues::enqueue))
        .route("/v1/queues/{queue}/fetch", post(queues::fetch))
        .route("/v1/queues/{queue}/batch", post(queues::enqueue_batch))
        .route("/v1/queues/{queue}/ack", post(queues::ack_batch))
        .route("/v1/queues/{queue}/ack/{id}", post(queues::ack))
        .route("/v1/queues/{queue}/requeue/{id}", post(queues::requeue))
        .route("/v1/queues/{queue}/extend/{id}", post(queues::extend))
        .route("/v1/queues/{queue}/purge", post(queues::purge))
        .route("/v1/admin/connections", get(admin::connections))
        .route("/v1/admin/connections/{id}", axum::routing::delete(admin::close_connection))
        .route("/v1/queues/{queue}/redrive", post(queues::redrive))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authenticate))
        .layer(axum::middleware::from_fn(limits::error_budget))
        .layer(axum::middleware::from_fn_with_state(state.clone(), connection_limit));
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics::render))
        .merge(v1);
    if state.config().console {
        // Static files: no credentials and outside the connection limit, like the ops
        // endpoints.
        router = router.merge(console::routes());
    }
    router
        // Applies to the routes registered so far (gRPC's, merged later, have no methods
        // to refuse); answered like the 404 fallback, outside the connection limit.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .with_state(state)
}

/// A known path with a method it does not take: 405 with the JSON error body
/// (axum adds the `Allow` header). No code word means 405, so it is `bad_request`.
async fn method_not_allowed(method: Method) -> Response {
    let mut response =
        ApiError::bad_request(format!("this path does not take {method}; see the Allow header")).into_response();
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

async fn ready(State(state): State<AppState>) -> Response {
    if state.inner.draining.is_cancelled() {
        ApiError::new(ErrorCode::Unavailable, "server is shutting down").into_response()
    } else if state.broker().is_ready() {
        "ready\n".into_response()
    } else {
        ApiError::new(ErrorCode::Unavailable, "store is not ready").into_response()
    }
}

/// Refuses new requests and upgrades while `max_connections` long-lived ones are open,
/// and once shutdown began.
async fn connection_limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let open = state.broker().metrics().connections.load(Ordering::Relaxed);
    if open >= state.config().max_connections as i64 {
        return ApiError::new(ErrorCode::Unavailable, "connection limit reached").into_response();
    }
    if state.inner.shutdown.is_cancelled() {
        return ApiError::new(ErrorCode::Unavailable, "server is shutting down").into_response();
    }
    next.run(req).await
}

/// Middleware of every route (HTTP and gRPC): with OpenTelemetry export on, the request
/// runs in a span named by its route (`POST /v1/topics/{topic}/messages`) or gRPC method
/// (`/herald.v1.Topics/Publish`), under the caller's `traceparent`; the broker's
/// `store.append` and `fan_out` spans nest under it. With export off it only checks
/// that it is off.
pub async fn trace_request(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use tracing::Instrument;
    if !herald_protocol::trace::enabled() {
        return next.run(req).await;
    }
    let grpc = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let name = match (grpc, req.extensions().get::<axum::extract::MatchedPath>()) {
        (true, _) => req.uri().path().to_owned(),
        (false, Some(route)) => format!("{} {}", req.method(), route.as_str()),
        (false, None) => req.method().to_string(),
    };
    let headers = req.headers();
    let span = herald_protocol::trace::request_span(&name, if grpc { "grpc" } else { "http" }, |key| {
        headers.get(key).and_then(|v| v.to_str().ok()).map(str::to_owned)
    });
    next.run(req).instrument(span).await
}
