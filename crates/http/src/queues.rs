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

/// Entries of an enqueue or ack batch, at most (as gRPC's `PublishBatch`).
const MAX_BATCH: usize = 1000;
/// Largest body of a batch: room for 1000 entries of 12 KiB base64, or a few large ones
/// (each still at most `max_message_bytes`).
const MAX_BATCH_BODY: usize = 16 << 20;

/// A batch's outcome: all entries done (`ok` status, `fields` as given), all failed
/// (the first failure as the error), or some of each: `207` with `fields` and an
/// `errors` array naming each failed entry's index, code and words.
fn batch_reply<T>(
    ok: StatusCode,
    outcomes: Vec<Result<T, QueueError>>,
    fields: impl FnOnce(&mut String, &[Result<T, QueueError>]),
) -> Result<Response, ApiError> {
    let failed = outcomes.iter().filter(|o| o.is_err()).count();
    if failed > 0 && failed == outcomes.len() {
        let first = outcomes.into_iter().find_map(Result::err);
        return Err(first.map_or_else(|| ApiError::bad_request("an empty batch"), ApiError::from));
    }
    let mut body = String::from("{");
    fields(&mut body, &outcomes);
    push_entry_errors(&mut body, "errors", &outcomes);
    body.push('}');
    Ok(json(if failed > 0 { StatusCode::MULTI_STATUS } else { ok }, body))
}

/// `,"<key>":[{"index","code","message"}, ...]` naming each failed entry of a batch,
/// nothing when none failed.
fn push_entry_errors<T>(body: &mut String, key: &str, outcomes: &[Result<T, QueueError>]) {
    let mut failed = outcomes.iter().enumerate().filter_map(|(i, o)| o.as_ref().err().map(|e| (i, e))).peekable();
    if failed.peek().is_none() {
        return;
    }
    let _ = write!(body, ",\"{key}\":[");
    for (n, (i, e)) in failed.enumerate() {
        if n > 0 {
            body.push(',');
        }
        if let QueueError::Store(store) = e {
            tracing::warn!(error = %store, "store error");
        }
        let _ = write!(body, "{{\"index\":{i},\"code\":\"{}\",\"message\":", ErrorCode::from(e).as_str());
        push_json_str(body, &e.to_string());
        body.push('}');
    }
    body.push(']');
}

/// A batch body as text: at most [`MAX_BATCH_BODY`] bytes of UTF-8.
async fn batch_body(body: Body) -> Result<String, ApiError> {
    let bytes =
        axum::body::to_bytes(body, MAX_BATCH_BODY).await.map_err(|e| crate::rest::body_error(e, MAX_BATCH_BODY))?;
    String::from_utf8(bytes.into()).map_err(|_| ApiError::bad_request("the batch is not UTF-8"))
}

/// `POST /v1/queues/{queue}/batch`: up to [`MAX_BATCH`] jobs in one request, handed to
/// the queue service together (one group commit on the disk store and on PostgreSQL).
/// Every entry is checked before any is stored.
pub(crate) async fn enqueue_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    peer: PeerOf,
    QueuePath(queue): QueuePath,
    body: Body,
) -> Result<Response, ApiError> {
    caller.permit(Action::Enqueue, queue.as_str())?;
    let entries =
        herald_protocol::parse_enqueue_batch(&batch_body(body).await?, MAX_BATCH).map_err(ApiError::bad_request)?;
    let max = state.broker().config().max_message_bytes;
    if let Some((i, e)) = entries.iter().enumerate().find(|(_, e)| e.message.payload.len() > max) {
        let message =
            format!("messages[{i}]: the payload is {} bytes, over the limit of {max}", e.message.payload.len());
        return Err(ApiError::new(ErrorCode::TooLarge, message));
    }
    limits::admit(&peer, &caller, entries.len(), entries.iter().map(|e| e.message.payload.len()).sum())?;
    let batch = entries.into_iter().map(|e| (e.message, e.delay_ms)).collect();
    let outcomes = state.broker().queue_service()?.enqueue_batch(&queue, batch).await;
    batch_reply(StatusCode::CREATED, outcomes, |body, outcomes| {
        body.push_str("\"queue\":");
        push_json_str(body, queue.as_str());
        body.push_str(",\"message_ids\":[");
        for (i, o) in outcomes.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            match o {
                Ok(id) => {
                    let _ = write!(body, "{id}");
                }
                Err(_) => body.push_str("null"),
            }
        }
        body.push(']');
    })
}

/// `POST /v1/queues/{queue}/ack`: acknowledges up to [`MAX_BATCH`] deliveries at once.
pub(crate) async fn ack_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    QueuePath(queue): QueuePath,
    body: Body,
) -> Result<Response, ApiError> {
    caller.permit(Action::Consume, queue.as_str())?;
    let ids = herald_protocol::parse_ack_batch(&batch_body(body).await?, MAX_BATCH).map_err(ApiError::bad_request)?;
    let outcomes = state.broker().queue_service()?.ack_batch(&queue, &ids).await;
    batch_reply(StatusCode::OK, outcomes, |body, outcomes| {
        let _ = write!(body, "\"acked\":{}", outcomes.iter().filter(|o| o.is_ok()).count());
    })
}

/// `POST /v1/queues/{queue}/fetch`: up to `max` ready jobs, long-polling up to
/// `wait_ms`. A body `{"ack":[...]}` acks the deliveries named there in the same request
/// (the worker's finished jobs) together with the fetch's first try, and the answer
/// adds `acked` and, for those not acked, `ack_errors`.
pub(crate) async fn fetch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    QueuePath(queue): QueuePath,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    caller.permit(Action::Consume, queue.as_str())?;
    let query = Query::parse(query.as_deref())?;
    let max = query.number("max", 1, 100, 1)? as usize;
    let visibility_ms = query.number("visibility_ms", 1, MAX_VISIBILITY_MS, 30_000)?;
    let wait = Duration::from_millis(query.number("wait_ms", 0, MAX_WAIT_MS, 0)?);
    let text = batch_body(body).await?;
    let acks = herald_protocol::parse_fetch_acks(&text, MAX_BATCH).map_err(ApiError::bad_request)?;
    let queues = state.broker().queue_service()?;
    let started = std::time::Instant::now();
    let limits = (max, visibility_ms, wait);
    let stop = state.inner.shutdown.cancelled();
    let (acked, fetched) = herald_core::fetch_acking(queues, &queue, &acks, limits, stop).await;
    let deliveries = fetched?;
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
    body.push(']');
    if !acks.is_empty() {
        let _ = write!(body, ",\"acked\":{}", acked.iter().filter(|o| o.is_ok()).count());
        push_entry_errors(&mut body, "ack_errors", &acked);
    }
    body.push('}');
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
