//! Herald's gRPC front door: the `herald.v1` services `Topics` and `Queues` (tonic),
//! plus server reflection, as an axum router that the server merges with the HTTP one
//! so gRPC (HTTP/2 cleartext), HTTP/1 and WebSocket share one port.
//!
//! Like every front door it translates its protocol into calls on the core's [`Broker`]
//! and back; it never talks to a store or to another front door. The proto file is
//! `proto/herald/v1/herald.proto`, compiled by `build.rs` with protox (no `protoc`).
//!
//! # Layout
//! - [`encoded`]: the pre-encoded stream item that makes fan-out encode once.
//! - [`error`]: Herald's error codes as gRPC statuses.
//! - `topics`, `subscribe`: the `Topics` service and its subscription streams.
//! - `queues`: the `Queues` service.

mod admin;
pub mod encoded;
pub mod error;
mod queues;
mod subscribe;
mod topics;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use herald_auth::limits::Peer;
use herald_auth::{Action, ClientCert, Credentials, LiveAuth, Principal};
use herald_core::{Broker, Kind};
use herald_protocol::ErrorCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic::Status;

/// The generated protobuf types and service traits of `herald.v1` (server side).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("herald.v1");
}

/// The encoded `FileDescriptorSet` of `herald.v1`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/herald_v1_descriptor.bin"));

/// Limits of the gRPC front door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcConfig {
    /// Long-lived connections (WebSocket, SSE, gRPC Subscribe streams) allowed; past it,
    /// every gRPC call gets `unavailable` (the server passes the HTTP front door's value).
    pub max_connections: usize,
    /// Largest request message decoded, in bytes (default 16 MiB, so a batch of large
    /// messages fits; never less than `max_message_bytes` plus 64 KiB in effect). A
    /// larger request is refused by tonic with OUT_OF_RANGE before Herald sees it.
    pub max_request_bytes: usize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self { max_connections: 100_000, max_request_bytes: 16 << 20 }
    }
}

/// Everything the services need; cheap to clone.
#[derive(Clone)]
pub struct GrpcState {
    inner: Arc<StateInner>,
}

#[derive(Clone)]
struct StateInner {
    broker: Broker,
    config: GrpcConfig,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Checks credentials; `None`: every caller may do everything.
    auth: Option<Arc<LiveAuth>>,
}

/// Who is calling: `None` when the server does not authenticate.
pub(crate) type Caller = Option<Arc<Principal>>;

impl GrpcState {
    /// `Ok` if `caller` may do `action` on `name`, else PERMISSION_DENIED (`forbidden`).
    pub(crate) fn permit(&self, caller: &Caller, action: Action, name: &str) -> Result<(), Status> {
        match caller {
            Some(p) if !p.allows(action, name) => {
                herald_core::Metrics::add(&self.broker().metrics().forbidden, 1);
                Err(error::status(ErrorCode::Forbidden, format!("{} may not {action} on {name}", p.name)))
            }
            _ => Ok(()),
        }
    }
}

impl GrpcState {
    /// State over `broker`. Cancelling `shutdown` ends every Subscribe stream with
    /// UNAVAILABLE and refuses new calls; stream tasks run on `tracker`, which shutdown
    /// waits on.
    pub fn new(broker: Broker, config: GrpcConfig, shutdown: CancellationToken, tracker: TaskTracker) -> Self {
        Self { inner: Arc::new(StateInner { broker, config, shutdown, tracker, auth: None }) }
    }

    /// This state, authenticating every call with `auth` (the `authorization` metadata,
    /// Basic or Bearer, as the HTTP header).
    pub fn with_auth(self, auth: Option<Arc<LiveAuth>>) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.auth = auth;
        Self { inner: Arc::new(inner) }
    }

    fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    fn auth(&self) -> Option<&Arc<LiveAuth>> {
        self.inner.auth.as_ref()
    }

    /// Admits a call ([`GrpcState::admit_load`]) and authenticates its caller:
    /// UNAUTHENTICATED (`unauthorized`) without valid credentials when auth is on.
    async fn admit<T>(&self, request: &tonic::Request<T>) -> Result<Caller, Status> {
        self.admit_load()?;
        let Some(auth) = self.inner.auth.as_ref().map(|live| live.get()) else { return Ok(None) };
        let refused = |message: String| {
            herald_core::Metrics::add(&self.broker().metrics().auth_refused, 1);
            error::status(ErrorCode::Unauthorized, message)
        };
        let credentials = credentials_of(request)
            .ok_or_else(|| refused("credentials required: send authorization metadata, Basic or Bearer".to_owned()))?;
        match auth.check(&credentials).await {
            Ok(p) => Ok(Some(Arc::new(p))),
            Err(e) => Err(refused(e.to_string())),
        }
    }

    /// Takes `messages` messages of `bytes` bytes of a call from its connection's and
    /// its user's buckets (`peer`: [`peer_of`] the request, taken before the request is
    /// consumed), or the `rate_limited` status that refuses it.
    pub(crate) fn pace(
        &self,
        peer: Option<&Peer>,
        caller: &Caller,
        messages: usize,
        bytes: usize,
    ) -> Result<(), Status> {
        let Some(peer) = peer else { return Ok(()) };
        peer.admit_request(caller.as_deref().map(|p| &p.name), messages, bytes).map_err(error::rate_limited)
    }

    /// Refuses a call once shutdown began or while `max_connections` long-lived
    /// connections are open, as the HTTP front door does for every `/v1` request.
    fn admit_load(&self) -> Result<(), Status> {
        if self.inner.shutdown.is_cancelled() {
            return Err(error::status(ErrorCode::Unavailable, "server is shutting down"));
        }
        let open = self.broker().metrics().connections.load(Ordering::Relaxed);
        if open >= self.inner.config.max_connections as i64 {
            return Err(error::status(ErrorCode::Unavailable, "connection limit reached"));
        }
        Ok(())
    }

    fn max_request_bytes(&self) -> usize {
        let floor = self.broker().config().max_message_bytes.saturating_add(64 << 10);
        self.inner.config.max_request_bytes.max(floor)
    }
}

/// The limits of a call's connection (set by the server's listener; none without it).
pub(crate) fn peer_of<T>(request: &tonic::Request<T>) -> Option<Arc<Peer>> {
    request.extensions().get::<Arc<Peer>>().cloned()
}

/// A call's credentials: its `authorization` metadata or, without it, the verified
/// TLS client certificate of its connection.
pub(crate) fn credentials_of<T>(request: &tonic::Request<T>) -> Option<Credentials> {
    match request.metadata().get("authorization") {
        Some(value) => value.to_str().ok().and_then(Credentials::from_header),
        None => request.extensions().get::<ClientCert>().map(|c| Credentials::Certificate(c.0.to_string())),
    }
}

/// Failure to build the reflection service from the embedded descriptor set.
pub type ReflectionError = tonic_reflection::server::Error;

/// The router serving `herald.v1.Topics`, `herald.v1.Queues` and reflection (v1 and
/// v1alpha, for older grpcurl). It has no fallback, so it merges with the HTTP router.
pub fn router(state: GrpcState) -> Result<axum::Router, ReflectionError> {
    let limit = state.max_request_bytes();
    let topics = pb::topics_server::TopicsServer::new(topics::TopicsService::new(state.clone()))
        .max_decoding_message_size(limit);
    let queues = pb::queues_server::QueuesServer::new(queues::QueuesService::new(state.clone()))
        .max_decoding_message_size(limit);
    let admin = pb::admin_server::AdminServer::new(admin::AdminService::new(state)).max_decoding_message_size(limit);
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let router = axum::Router::new();
    let router = route(router, topics);
    let router = route(router, queues);
    let router = route(router, admin);
    let router = route(router, reflection_v1);
    Ok(route(router, reflection_v1alpha))
}

/// Routes every method of service `S` (`/{package.Service}/{Method}`) to it.
fn route<S>(router: axum::Router, service: S) -> axum::Router
where
    S: NamedService
        + tonic::codegen::Service<
            axum::extract::Request,
            Response = axum::http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    router.route_service(&format!("/{}/{{*rest}}", S::NAME), service)
}

/// The kind a request selects: `kind` when given, else `content_type` with HTTP's rules
/// (media types case-insensitive, parameters ignored).
/// Entries of a batch call (`PublishBatch`, `EnqueueBatch`, `AckBatch`), at most.
const MAX_BATCH: usize = 1000;

/// Refuses a batch of `len` entries (`what`: "messages", "ids") unless it holds 1 to
/// [`MAX_BATCH`].
fn check_batch(len: usize, what: &str) -> Result<(), Status> {
    if (1..=MAX_BATCH).contains(&len) {
        Ok(())
    } else {
        Err(error::bad_request(format!("a batch holds 1 to {MAX_BATCH} {what}, not {len}")))
    }
}

fn kind_of(kind: i32, content_type: &str) -> Result<Kind, Status> {
    match pb::Kind::try_from(kind) {
        Ok(pb::Kind::Json) => Ok(Kind::Json),
        Ok(pb::Kind::Text) => Ok(Kind::Text),
        Ok(pb::Kind::Binary) => Ok(Kind::Binary),
        Ok(pb::Kind::Unspecified) => Ok(herald_protocol::kind_of_media_type(content_type)),
        Err(_) => Err(error::bad_request(format!("kind {kind} is not a known Kind"))),
    }
}

/// Checks a payload against the size limit and its kind (UTF-8 text, valid JSON), in
/// the HTTP front door's order: too large first, then the kind's rules.
fn new_message(
    broker: &Broker,
    kind: Kind,
    payload: bytes::Bytes,
    ttl_ms: Option<u64>,
) -> Result<herald_core::NewMessage, Status> {
    let max = broker.config().max_message_bytes;
    if payload.len() > max {
        return Err(error::status(
            ErrorCode::TooLarge,
            format!("payload of {} bytes is over the limit of {max} bytes", payload.len()),
        ));
    }
    herald_protocol::check_payload(kind, &payload).map_err(error::bad_request)?;
    Ok(herald_core::NewMessage { kind, payload, ttl_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_decides_when_kind_is_unspecified() -> Result<(), Status> {
        let unspecified = pb::Kind::Unspecified as i32;
        assert_eq!(kind_of(unspecified, "Text/Plain; charset=utf-8")?, Kind::Text);
        assert_eq!(kind_of(unspecified, "application/cloudevents+json")?, Kind::Json);
        assert_eq!(kind_of(unspecified, "")?, Kind::Binary);
        assert_eq!(kind_of(pb::Kind::Json as i32, "text/plain")?, Kind::Json, "kind wins");
        assert!(kind_of(42, "").is_err());
        Ok(())
    }
}
