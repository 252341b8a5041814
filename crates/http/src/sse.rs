//! Server-Sent Events: `GET /v1/topics/{topic}/sse`, one event per message with the
//! offset as its `id`, resumable with `Last-Event-ID`.
//!
//! The stream reads from the same byte-bounded outbound queue as a WebSocket, under the
//! same writer discipline ([`herald_core::writer`]): a batch's bytes are released only
//! once all of it was handed to the response body. Events are encoded once per message
//! and shared. A client that stops reading is ended by the slow-consumer policy.
//!
//! A request from a page of one of `auth.allowed_origins` is answered with CORS headers
//! for that origin (with credentials), so a browser's `EventSource` may read the stream.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::sync::Arc;

use herald_core::{
    outbound, run_writer, spawn_replay, ConnectionGuard, Door, Item, Member, MemberRole, Metrics, Outbound, Outgoing,
    PresenceEvent, PresenceSink, SocketWriter, StartFrom, SubscriptionGuard, WireForm,
};
use herald_protocol::decode::parse_from_query;
use herald_protocol::encode;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::extract::TopicPath;
use crate::rest::Query;
use crate::{ApiError, AppState};

/// A comment line sent when the stream is idle, so proxies keep it open.
const KEEPALIVE: Bytes = Bytes::from_static(b": keepalive\n\n");
const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

fn encode_sse(metrics: &Metrics, msg: &Outgoing) -> Bytes {
    msg.encoded(WireForm::Sse, |m| {
        metrics.encoded(WireForm::Sse);
        Bytes::from(encode::sse_event(m))
    })
}

/// The slot of [`PresenceEvent`]'s cache that holds its SSE form.
const PRESENCE_FORM_SSE: usize = 1;

/// Where a stream's presence events go (`?presence=true`): named events (`event: join`,
/// `leave`, `presence_lost`), so `EventSource.onmessage` still gets only messages.
struct PresenceTap(Arc<Outbound<Bytes>>);

impl PresenceSink for PresenceTap {
    fn presence(&self, event: &Arc<PresenceEvent>) -> bool {
        let chunk = event.encoded(PRESENCE_FORM_SSE, |e| Bytes::from(encode::presence_sse_event(e)));
        let size = chunk.len();
        self.0.push_control(chunk, size)
    }
}

/// Items the writer takes per batch.
const WRITE_BATCH: usize = 256;

/// The SSE side of the writer discipline ([`herald_core::run_writer`]): hands each
/// event to the response body one chunk at a time (the body's one-slot channel is the
/// socket as far as the writer can tell), and a keepalive comment when idle.
struct SseWriter<'a> {
    tx: mpsc::Sender<Bytes>,
    metrics: &'a Metrics,
    idle_until: Instant,
}

impl SocketWriter<Bytes> for SseWriter<'_> {
    /// The body is gone: the client went away.
    type Stop = ();

    async fn start(&mut self) -> Result<(), ()> {
        // Sent at once so the headers and a first chunk go out together.
        self.tx.send(Bytes::from_static(b": subscribed\n\n")).await.map_err(drop)
    }

    async fn write_batch(&mut self, batch: &mut Vec<Item<Bytes>>) -> Result<(), ()> {
        for item in batch.drain(..) {
            let chunk = match item {
                Item::Message(m) => encode_sse(self.metrics, &m),
                Item::Control(chunk, _) => chunk,
            };
            self.tx.send(chunk).await.map_err(drop)?;
        }
        self.idle_until = Instant::now() + KEEPALIVE_EVERY;
        Ok(())
    }

    fn next_timer(&self) -> Instant {
        self.idle_until
    }

    async fn on_timer(&mut self) -> Result<(), ()> {
        self.idle_until = Instant::now() + KEEPALIVE_EVERY;
        self.tx.send(KEEPALIVE).await.map_err(drop)
    }
}

pub(crate) async fn stream(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    presented: Option<axum::Extension<crate::auth::Presented>>,
    TopicPath(topic): TopicPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    peer: crate::limits::PeerOf,
) -> Result<Response, ApiError> {
    caller.permit(herald_auth::Action::Subscribe, topic.as_str())?;
    // Ends the stream when the token expires or a reload takes the grant away.
    let watch = crate::auth::watch(
        &state,
        &caller,
        crate::auth::credentials_of(presented),
        vec![herald_auth::Action::Subscribe],
        topic.as_str(),
    );
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
    let presence = match query.get("presence") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(ApiError::bad_request(format!("presence must be true or false, not {other:?}"))),
    };
    let member_info =
        herald_protocol::decode::member_info(query.get("info").unwrap_or_default()).map_err(ApiError::bad_request)?;
    let (out, rx) = outbound::<Bytes>(state.broker().config().outbound);
    let broker = state.broker().clone();
    let sub = broker.subscribe(&topic, from, None, out.clone()).await?;
    let guard = ConnectionGuard::new(&broker, Door::Sse);
    let info = guard.info();
    if let Some(axum::Extension(peer)) = &peer {
        info.set_peer(peer.addr());
    }
    if let Some(user) = crate::limits::user_of(&caller) {
        info.set_user(user.clone());
    }
    info.attach(out.clone());
    let watcher: Option<Arc<dyn PresenceSink>> =
        presence.then(|| Arc::new(PresenceTap(out.clone())) as Arc<dyn PresenceSink>);
    let member = Member { conn: info.clone(), role: MemberRole::Subscriber, info: member_info };
    let presence = broker.presence().join(&topic, member, watcher);
    let unsubscribe = SubscriptionGuard::new(broker.clone(), topic, sub.id);
    let replay = sub.replay.map(|r| spawn_replay(r, out.clone()));
    let shutdown = state.inner.shutdown.clone();
    let metrics = broker.metrics().clone();

    let events = async_stream(move |tx| async move {
        // Everything the stream owns lives here and ends with it.
        let _owned = (guard, unsubscribe, replay, presence, out);
        let mut socket = SseWriter { tx, metrics: &metrics, idle_until: Instant::now() + KEEPALIVE_EVERY };
        // However it ends (shutdown, slow consumer, client gone, credentials expired or
        // refused by a reload), the stream just ends.
        let stop = async {
            tokio::select! {
                () = shutdown.cancelled() => {}
                _ = watch.ended() => {}
            }
        };
        let _ = run_writer(rx, &mut socket, std::pin::pin!(stop), &metrics, WRITE_BATCH).await;
    });
    let mut response = (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(events),
    )
        .into_response();
    allow_origin(&state, &headers, response.headers_mut());
    Ok(response)
}

/// CORS for a browser's `EventSource` (`withCredentials`) on a page of an allowed origin
/// (`auth.allowed_origins`): that origin, with credentials. Nothing for other requests.
fn allow_origin(state: &AppState, request: &HeaderMap, response: &mut HeaderMap) {
    let Some(origin) = request.get(header::ORIGIN) else { return };
    let allowed = state.auth().is_some_and(|live| origin.to_str().is_ok_and(|o| live.get().allows_origin(o)));
    if allowed {
        response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        response.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, header::HeaderValue::from_static("true"));
        response.append(header::VARY, header::HeaderValue::from_static("Origin"));
    }
}

/// A body stream fed by a producer task through a one-slot channel: the producer runs
/// only as fast as hyper takes chunks, so the outbound queue (not this channel) is
/// where a slow client's backlog is bounded and detected.
fn async_stream<F, Fut>(producer: F) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>>
where
    F: FnOnce(mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(1);
    let task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(producer(tx)));
    futures_util::stream::unfold((rx, task), |(mut rx, task)| async move {
        rx.recv().await.map(|chunk| (Ok(chunk), (rx, task)))
    })
}
