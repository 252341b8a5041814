//! REST endpoints for work queues: enqueue, fetch (with long poll), ack, requeue,
//! extend, stats, list, purge and redrive. Thin: every rule lives in the core's queue service.

use std::fmt::Write;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use herald_auth::Action;
use herald_core::QueueError;
use herald_protocol::encode::{push_json_str, push_kind_payload};
use herald_protocol::ErrorCode;

use crate::auth::Caller;
use crate::extract::{DeliveryPath, QueuePath};
use crate::limits::{self, PeerOf};
use crate::rest::{read_message, Query};
use crate::{ApiError, AppState};

/// Longest a fetch may wait, per docs/protocol.md.
const MAX_WAIT_MS: u64 = 20_000;
/// Longest lease: 12 hours.
const MAX_VISIBILITY_MS: u64 = 43_200_000;

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        if let QueueError::Store(store) = &e {
            tracing::warn!(error = %store, "store error");
        }
        ApiError::new(ErrorCode::from(&e), e.to_string())
    }
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(crate) async fn enqueue(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    peer: PeerOf,
    QueuePath(queue): QueuePath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    caller.permit(Action::Enqueue, queue.as_str())?;
    let query = Query::parse(query.as_deref())?;
    let delay_ms = query.number("delay_ms", 0, u64::MAX / 2, 0)?;
    let ttl_ms = query.get("ttl_ms").is_some().then(|| query.number("ttl_ms", 0, u64::MAX / 2, 0)).transpose()?;
    let msg = read_message(&state, &headers, body, ttl_ms).await?;
    limits::admit(&peer, &caller, 1, msg.payload.len())?;
    let id = state.broker().queue_service()?.enqueue(&queue, msg, delay_ms).await?;
    let mut body = String::from("{\"queue\":");
    push_json_str(&mut body, queue.as_str());
    let _ = write!(body, ",\"message_id\":{id}}}");
    Ok(json(StatusCode::CREATED, body))
}

pub(crate) async fn fetch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    QueuePath(queue): QueuePath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    caller.permit(Action::Consume, queue.as_str())?;
    let query = Query::parse(query.as_deref())?;
    let max = query.number("max", 1, 100, 1)? as usize;
    let visibility_ms = query.number("visibility_ms", 1, MAX_VISIBILITY_MS, 30_000)?;
    let wait = Duration::from_millis(query.number("wait_ms", 0, MAX_WAIT_MS, 0)?);
    let queues = state.broker().queue_service()?;
    let started = std::time::Instant::now();
    let deliveries = tokio::select! {
        got = queues.fetch_wait(&queue, max, visibility_ms, wait) => got?,
        // Shutdown answers a pending long poll with what it has: nothing was taken.
        _ = state.inner.shutdown.cancelled() => Vec::new(),
    };
    state.broker().metrics().latency.fetch_wait.observe(started.elapsed().as_secs_f64());
    let mut body = String::with_capacity(32 + deliveries.iter().map(|d| d.payload.len() * 4 / 3 + 96).sum::<usize>());
    body.push_str("{\"messages\":[");
    for (i, d) in deliveries.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str("{\"id\":");
        push_json_str(&mut body, &d.id);
        let _ = write!(body, ",\"message_id\":{},\"attempt\":{},\"ts\":{},", d.message_id, d.attempt, d.ts);
        push_kind_payload(&mut body, d.kind, &d.payload);
        body.push('}');
    }
    body.push_str("]}");
    Ok(json(StatusCode::OK, body))
}

pub(crate) async fn ack(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    DeliveryPath(queue, id): DeliveryPath,
) -> Result<StatusCode, ApiError> {
    caller.permit(Action::Consume, queue.as_str())?;
    state.broker().queue_service()?.ack(&queue, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn requeue(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    DeliveryPath(queue, id): DeliveryPath,
    RawQuery(query): RawQuery,
) -> Result<StatusCode, ApiError> {
    caller.permit(Action::Consume, queue.as_str())?;
    let query = Query::parse(query.as_deref())?;
    let delay_ms = query.number("delay_ms", 0, u64::MAX / 2, 0)?;
    state.broker().queue_service()?.requeue(&queue, &id, delay_ms).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn extend(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    DeliveryPath(queue, id): DeliveryPath,
    RawQuery(query): RawQuery,
) -> Result<StatusCode, ApiError> {
    caller.permit(Action::Consume, queue.as_str())?;
    let query = Query::parse(query.as_deref())?;
    if query.get("visibility_ms").is_none() {
        return Err(ApiError::bad_request("visibility_ms is required"));
    }
    let visibility_ms = query.number("visibility_ms", 1, MAX_VISIBILITY_MS, 0)?;
    state.broker().queue_service()?.extend(&queue, &id, visibility_ms).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn stats(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    QueuePath(queue): QueuePath,
) -> Result<Response, ApiError> {
    caller.permit(Action::Admin, queue.as_str())?;
    let s = state.broker().queue_service()?.stats(&queue).await?;
    let mut body = String::from("{\"queue\":");
    push_json_str(&mut body, queue.as_str());
    let _ = write!(
        body,
        ",\"ready\":{},\"in_flight\":{},\"delayed\":{},\"dead\":{}}}",
        s.ready, s.in_flight, s.delayed, s.dead
    );
    Ok(json(StatusCode::OK, body))
}

/// `GET /v1/queues[?prefix=P&after=NAME&limit=L]`: the queues the caller may administer
/// (all of them without auth), in name order, with their counts.
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = Query::parse(query.as_deref())?;
    let limit = query.number("limit", 1, 1000, 100)? as usize;
    let prefix = query.get("prefix").unwrap_or_default();
    let visible = |q: &herald_core::QueueName| caller.allows(Action::Admin, q.as_str());
    let queues = state.broker().queue_service()?.list(prefix, query.get("after"), limit, &visible).await?;
    let mut body = String::with_capacity(16 + queues.len() * 96);
    body.push_str("{\"queues\":[");
    for (i, l) in queues.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str("{\"queue\":");
        push_json_str(&mut body, l.queue.as_str());
        let s = &l.stats;
        let _ = write!(
            body,
            ",\"ready\":{},\"in_flight\":{},\"delayed\":{},\"dead\":{}}}",
            s.ready, s.in_flight, s.delayed, s.dead
        );
    }
    body.push_str("]}");
    Ok(json(StatusCode::OK, body))
}

/// Most dead letters one redrive call moves (`max` defaults to it).
const MAX_REDRIVE: u64 = 100_000;

/// `POST /v1/queues/{queue}/purge` (admin): removes the queue's ready and delayed
/// messages.
pub(crate) async fn purge(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    QueuePath(queue): QueuePath,
) -> Result<Response, ApiError> {
    caller.permit(Action::Admin, queue.as_str())?;
    let purged = state.broker().queue_service()?.purge(&queue).await?;
    tracing::info!(%queue, purged, "queue purged");
    let mut body = String::from("{\"queue\":");
    push_json_str(&mut body, queue.as_str());
    let _ = write!(body, ",\"purged\":{purged}}}");
    Ok(json(StatusCode::OK, body))
}

/// `POST /v1/queues/{queue}/redrive?max=N` (admin): moves dead letters back.
pub(crate) async fn redrive(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    QueuePath(queue): QueuePath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    caller.permit(Action::Admin, queue.as_str())?;
    let query = Query::parse(query.as_deref())?;
    let max = query.number("max", 1, MAX_REDRIVE, MAX_REDRIVE)? as usize;
    let moved = state.broker().queue_service()?.redrive(&queue, max).await?;
    tracing::info!(%queue, moved, "dead letters redriven");
    let mut body = String::from("{\"queue\":");
    push_json_str(&mut body, queue.as_str());
    let _ = write!(body, ",\"moved\":{moved}}}");
    Ok(json(StatusCode::OK, body))
}
