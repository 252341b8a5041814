//! Server-Sent Events: `GET /v1/topics/{topic}/sse`, one event per message with the
//! offset as its `id`, resumable with `Last-Event-ID`.
//!
//! The stream reads from the same byte-bounded outbound queue as a WebSocket; events are
//! encoded once per message and shared. A client that stops reading is ended by the
//! slow-consumer policy.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use herald_core::{
    outbound, spawn_replay, CloseReason, ConnectionGuard, Item, Message, Metrics, StartFrom, SubscriptionGuard,
    WireForm,
};
use herald_protocol::decode::parse_from_query;
use herald_protocol::encode;
use tokio::time::{sleep_until, Instant};

use crate::extract::TopicPath;
use crate::rest::Query;
use crate::{ApiError, AppState};

/// A comment line sent when the stream is idle, so proxies keep it open.
const KEEPALIVE: Bytes = Bytes::from_static(b": keepalive\n\n");
const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

fn encode_sse(metrics: &Metrics, msg: &Message) -> Bytes {
    msg.encoded(WireForm::Sse, |m| {
        metrics.encoded(WireForm::Sse);
        Bytes::from(encode::sse_event(m))
    })
}

pub(crate) async fn stream(
    State(state): State<AppState>,
    TopicPath(topic): TopicPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let query = Query::parse(query.as_deref())?;
    let from = match headers.get("last-event-id") {
        // Resume after the last event seen.
        Some(id) => {
            let id = id.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok());
            let id = id.ok_or_else(|| ApiError::bad_request("Last-Event-ID must be a message offset"))?;
            StartFrom::Offset(id.saturating_add(1))
        }
        None => match query.get("from") {
            None => StartFrom::Latest,
            Some(s) => parse_from_query(s)
                .ok_or_else(|| ApiError::bad_request("from must be latest, earliest or a non-negative integer"))?,
        },
    };
    let (out, mut rx) = outbound::<Bytes>(state.broker().config().outbound);
    let broker = state.broker().clone();
    let sub = broker.subscribe(&topic, from, None, out.clone())?;
    let unsubscribe = SubscriptionGuard::new(broker.clone(), topic, sub.id);
    let replay = sub.replay.map(|r| spawn_replay(r, out.clone()));
    let guard = ConnectionGuard::new(&broker);
    let shutdown = state.inner.shutdown.clone();
    let metrics = broker.metrics().clone();

    let events = async_stream(move |tx| async move {
        // Everything the stream owns lives here and ends with it.
        let _owned = (guard, unsubscribe, replay, out);
        let mut batch: Vec<Item<Bytes>> = Vec::with_capacity(256);
        let mut ready: VecDeque<Bytes> = VecDeque::from([Bytes::from_static(b": subscribed\n\n")]);
        let mut idle_until = Instant::now() + KEEPALIVE_EVERY;
        loop {
            while let Some(chunk) = ready.pop_front() {
                // A client that stops reading blocks this send: the slow-consumer policy
                // (closing the queue) or shutdown ends the stream.
                tokio::select! {
                    biased;
                    r = tx.send(chunk) => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                    reason = rx.until_closed_or_slow() => {
                        if reason == CloseReason::SlowConsumer {
                            Metrics::add(&metrics.slow_consumers, 1);
                        }
                        return;
                    }
                }
            }
            let slow = rx.slow_deadline();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                n = rx.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        if rx.close_reason() == Some(CloseReason::SlowConsumer) {
                            Metrics::add(&metrics.slow_consumers, 1);
                        }
                        return;
                    }
                    let bytes: usize = batch.iter().map(Item::size).sum();
                    ready.extend(batch.drain(..).map(|item| match item {
                        Item::Message(m) => encode_sse(&metrics, &m),
                        Item::Control(b, _) => b,
                    }));
                    rx.written(bytes);
                    idle_until = Instant::now() + KEEPALIVE_EVERY;
                }
                _ = sleep_until(idle_until) => {
                    ready.push_back(KEEPALIVE);
                    idle_until = Instant::now() + KEEPALIVE_EVERY;
                }
                _ = sleep_until(slow.unwrap_or(idle_until)), if slow.is_some() => {
                    if rx.check_slow() {
                        Metrics::add(&metrics.slow_consumers, 1);
                        return;
                    }
                }
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(events),
    )
        .into_response())
}

/// A body stream fed by a producer task through a one-slot channel: the producer runs
/// only as fast as hyper takes chunks, so the outbound queue (not this channel) is
/// where a slow client's backlog is bounded and detected.
fn async_stream<F, Fut>(producer: F) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(producer(tx)));
    futures_util::stream::unfold((rx, task), |(mut rx, task)| async move {
        rx.recv().await.map(|chunk| (Ok(chunk), (rx, task)))
    })
}
