//! The abuse limits at the HTTP doors (`herald_auth::limits`): requests that publish or
//! enqueue take their messages and bytes from the connection's and the user's buckets
//! or are answered `429 rate_limited` with `Retry-After`; error answers spend the
//! connection's error budget, and an HTTP/1 connection past it is closed after the
//! answer. WebSockets pause reading instead (ws.rs).
//!
//! The connection's [`Peer`] comes from the server's listener as a request extension;
//! a router served some other way has none, and nothing is limited.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, HeaderValue, Version};
use axum::middleware::Next;
use axum::response::Response;
use axum::Extension;
use herald_auth::limits::Peer;

use crate::auth::Caller;
use crate::ApiError;

/// The connection's limits, if the listener set them.
pub(crate) type PeerOf = Option<Extension<Arc<Peer>>>;

/// The name a caller's user bucket is keyed by (`None`: by the client's address).
pub(crate) fn user_of(caller: &Caller) -> Option<&Arc<str>> {
    match caller {
        Caller::User(p) => Some(&p.name),
        Caller::Anyone | Caller::Pending => None,
    }
}

/// Takes `messages` messages of `bytes` bytes for a request, or the 429 that refuses it.
pub(crate) fn admit(peer: &PeerOf, caller: &Caller, messages: usize, bytes: usize) -> Result<(), ApiError> {
    match peer {
        Some(Extension(peer)) => peer.admit_request(user_of(caller), messages, bytes).map_err(ApiError::rate_limited),
        None => Ok(()),
    }
}

/// Middleware of the `/v1` routes: every 4xx answer spends one error of the
/// connection's budget; once it is spent, an HTTP/1 connection is closed after the
/// answer (`Connection: close`). HTTP/2 connections (gRPC) are not closed this way.
pub(crate) async fn error_budget(req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Arc<Peer>>().cloned();
    let http1 = matches!(req.version(), Version::HTTP_10 | Version::HTTP_11);
    let mut response = next.run(req).await;
    if let Some(peer) = peer {
        if response.status().is_client_error() && peer.error() && http1 {
            tracing::debug!(addr = %peer.addr(), "error budget spent: closing the connection");
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    response
}
