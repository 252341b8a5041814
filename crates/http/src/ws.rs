//! WebSocket front doors: the JSON protocol on `/v1/ws` and raw per-topic sockets on
//! `/v1/topics/{topic}/ws`.
//!
//! Each connection runs a reader and one writer. The reader handles client frames and
//! never waits on the socket's write side; everything to send (replies, messages) goes
//! through the connection's byte-bounded [`Outbound`] queue, which the writer drains in
//! batches (feed all, flush once) under the core's one writer discipline
//! ([`herald_core::writer`]), as SSE and gRPC do. The writer also sends keepalive Pings;
//! every wait on the socket, a Ping's too, races shutdown (close 1001) and the
//! slow-consumer policy (close 1013). The socket comes from Herald's own upgrade
//! ([`crate::upgrade`]), whose byte stream holds no buffer while the connection is idle;
//! every wait of the reader but the idle one is boxed for the same reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use herald_auth::limits::Peer;
use herald_auth::Action;
use herald_core::{
    outbound, run_writer, spawn_replay, BrokerError, ConnectionGuard, ConnectionInfo, Door, Item, Kind, Member,
    MemberRole, Metrics, NewMessage, Outbound, OutboundRx, Outgoing, PresenceEntry, PresenceEvent, PresenceSink,
    Replay, ReplayTask, SocketWriter, StartFrom, SubscriptionGuard, SubscriptionId, TopicName, WireForm, WriterEnd,
};
use herald_protocol::decode::parse_from_query;
use herald_protocol::{close, encode, parse_client_frame, ClientFrame, ErrorCode, FrameError, Op};
use tokio::time::Instant;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message as WsMessage, Utf8Bytes};

use crate::auth::{close_for, credentials_of, forbidden, watch, Caller, Presented};
use crate::extract::TopicPath;
use crate::limits::{self, PeerOf};
use crate::rest::Query;
use crate::tap::Tap;
use crate::upgrade::{DataFrame, NotAnUpgrade, ReadHalf, SharedSocket, Socket as WebSocket, WsUpgrade};
use crate::{ApiError, AppState};
use herald_auth::Watch;

/// Frames a reader asks the writer to send, besides topic messages.
pub(crate) enum Control {
    /// A text frame (a reply, an error, a presence event).
    Text(Utf8Bytes),
    /// Close the connection with this code and reason after what is queued.
    Close(u16, &'static str),
}

/// Items the writer takes per batch.
const WRITE_BATCH: usize = 512;

/// How a connection's frames are sent.
#[derive(Clone, Copy)]
enum Framing {
    /// The JSON protocol, one server frame per WebSocket frame.
    Json,
    /// The JSON protocol with `?pack=lines`: the server frames of a batch go out as few
    /// text frames, each holding one or more of them separated by `\n` ([`Packer`]).
    Packed,
    /// Raw sockets: each message a bare frame.
    Raw,
}

/// A packed frame grows to at most this many bytes; a larger server frame goes alone.
const PACK_LIMIT: usize = 64 << 10;

/// Gathers server frames of the JSON protocol into packed text frames (`?pack=lines`):
/// frames separated by `\n`. A frame's own line breaks can only be JSON whitespace (a
/// JSON string holds them escaped), so they must have become spaces before (a message's
/// in its shared packed form, [`encode_packed`]; Herald's replies have none). A lone
/// frame goes out as the shared encoding itself, copied nowhere.
#[derive(Default)]
struct Packer {
    /// A frame waiting for company, sent as it is if none comes.
    single: Option<Utf8Bytes>,
    /// Frames joined so far (empty when `single` or nothing waits).
    joined: String,
}

impl Packer {
    /// Adds `frame`; returns the packed frame that had to go out first to keep each
    /// under [`PACK_LIMIT`]. `expected` is about how many bytes the batch still holds,
    /// to size the joined frame once.
    fn push(&mut self, frame: Utf8Bytes, expected: usize) -> Option<Utf8Bytes> {
        let waiting = self.single.as_ref().map_or(self.joined.len(), |s| s.len());
        let full = waiting > 0 && waiting + 1 + frame.len() > PACK_LIMIT;
        let out = if full { self.take() } else { None };
        debug_assert!(!frame.contains('\n'), "a packed frame's parts hold no line break");
        if self.single.is_none() && self.joined.is_empty() {
            self.single = Some(frame);
            return out;
        }
        if let Some(single) = self.single.take() {
            self.joined.reserve((single.len() + 1 + frame.len() + expected).min(PACK_LIMIT));
            self.joined.push_str(&single);
        }
        if !self.joined.is_empty() {
            self.joined.push('\n');
        }
        self.joined.push_str(&frame);
        out
    }

    /// The frame gathered so far, if any.
    fn take(&mut self) -> Option<Utf8Bytes> {
        match self.single.take() {
            Some(single) => Some(single),
            None if self.joined.is_empty() => None,
            None => Some(std::mem::take(&mut self.joined).into()),
        }
    }
}

fn encode_json(metrics: &Metrics, msg: &Outgoing) -> Utf8Bytes {
    msg.encoded(WireForm::WsJson, |m| {
        metrics.encoded(WireForm::WsJson);
        Utf8Bytes::from(encode::message_frame(m))
    })
}

/// The `message` frame for packed connections: the JSON frame itself, or (once per
/// message, if its payload has line breaks) a copy with them as spaces.
fn encode_packed(metrics: &Metrics, msg: &Outgoing) -> Utf8Bytes {
    msg.encoded(WireForm::WsPacked, |_| {
        let frame = encode_json(metrics, msg);
        if !frame.as_bytes().contains(&b'\n') {
            return frame;
        }
        metrics.encoded(WireForm::WsPacked);
        Utf8Bytes::from(frame.replace('\n', " "))
    })
}

/// A raw socket's frame of `msg`: its kind and the payload itself (shared, not copied).
fn encode_raw(metrics: &Metrics, msg: &Outgoing) -> (DataFrame, Bytes) {
    msg.encoded(WireForm::WsRaw, |m| {
        metrics.encoded(WireForm::WsRaw);
        let kind = match m.kind {
            // Text and JSON payloads were checked to be UTF-8 when published.
            Kind::Json | Kind::Text if std::str::from_utf8(&m.payload).is_ok() => DataFrame::Text,
            _ => DataFrame::Binary,
        };
        (kind, m.payload.clone())
    })
}

/// Milliseconds since the connection started; the reader stamps each frame's arrival.
struct LastSeen {
    start: Instant,
    ms: AtomicU64,
}

impl LastSeen {
    fn new() -> Self {
        Self { start: Instant::now(), ms: AtomicU64::new(0) }
    }
    fn touch(&self) {
        self.ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn since(&self, at: Instant) -> bool {
        self.ms.load(Ordering::Relaxed) >= at.duration_since(self.start).as_millis() as u64
    }
}

/// Why the WebSocket side ends a connection: the close frame to send, if any.
type WsStop = Option<(u16, &'static str)>;

/// The WebSocket side of the writer discipline ([`herald_core::run_writer`]): frames
/// a batch (feed all, flush once), sends keepalive Pings and drops a peer that answered
/// nothing within `pong_timeout` of one.
struct WsWriter<'a> {
    socket: &'a SharedSocket,
    framing: Framing,
    metrics: &'a Metrics,
    last_seen: &'a LastSeen,
    ping_interval: Duration,
    pong_timeout: Duration,
    next_ping: Instant,
    /// When to check that something arrived since the last Ping.
    pong_check: Option<Instant>,
}

impl WsWriter<'_> {
    /// [`SocketWriter::write_batch`] for packed connections: the batch's server frames
    /// as few text frames as [`PACK_LIMIT`] allows, then one flush.
    async fn write_packed(&mut self, batch: &mut Vec<Item<Control>>) -> Result<(), WsStop> {
        let mut expected: usize = batch.iter().map(Item::size).sum();
        let mut packer = Packer::default();
        let mut close = None;
        for item in batch.drain(..) {
            expected = expected.saturating_sub(item.size());
            let frame = match item {
                Item::Message(m) => encode_packed(self.metrics, &m),
                Item::Control(Control::Text(t), _) => t,
                Item::Control(Control::Close(code, reason), _) => {
                    close = Some((code, reason));
                    break;
                }
            };
            if let Some(full) = packer.push(frame, expected) {
                self.socket.write_data(DataFrame::Text, full.as_bytes()).await.map_err(|_| None)?;
            }
        }
        if let Some(last) = packer.take() {
            self.socket.write_data(DataFrame::Text, last.as_bytes()).await.map_err(|_| None)?;
        }
        self.socket.flush().await.map_err(|_| None)?;
        close.map_or(Ok(()), |close| Err(Some(close)))
    }
}

impl SocketWriter<Control> for WsWriter<'_> {
    type Stop = WsStop;

    async fn write_batch(&mut self, batch: &mut Vec<Item<Control>>) -> Result<(), WsStop> {
        if let Framing::Packed = self.framing {
            return self.write_packed(batch).await;
        }
        let mut close = None;
        for item in batch.drain(..) {
            let socket = self.socket;
            let written = match item {
                Item::Message(m) => match self.framing {
                    Framing::Raw => {
                        let (kind, payload) = encode_raw(self.metrics, &m);
                        socket.write_data(kind, &payload).await
                    }
                    Framing::Json | Framing::Packed => {
                        socket.write_data(DataFrame::Text, encode_json(self.metrics, &m).as_bytes()).await
                    }
                },
                Item::Control(Control::Text(t), _) => socket.write_data(DataFrame::Text, t.as_bytes()).await,
                // What was queued before the close goes out first; nothing after it.
                Item::Control(Control::Close(code, reason), _) => {
                    close = Some((code, reason));
                    break;
                }
            };
            written.map_err(|_| None)?;
        }
        self.socket.flush().await.map_err(|_| None)?;
        close.map_or(Ok(()), |close| Err(Some(close)))
    }

    fn next_timer(&self) -> Instant {
        self.pong_check.map_or(self.next_ping, |check| check.min(self.next_ping))
    }

    async fn on_timer(&mut self) -> Result<(), WsStop> {
        let now = Instant::now();
        if let Some(check) = self.pong_check.filter(|check| now >= *check) {
            if !self.last_seen.since(check - self.pong_timeout) {
                tracing::debug!("no frame within pong_timeout after a ping; dropping connection");
                return Err(None);
            }
            self.pong_check = None;
        }
        if now >= self.next_ping {
            self.next_ping = now + self.ping_interval;
            if self.pong_check.is_none() {
                self.pong_check = Some(now + self.pong_timeout);
            }
            self.socket.send(WsMessage::Ping(Bytes::new())).await.map_err(|_| None)?;
        }
        Ok(())
    }
}

/// Fills a connection's admin entry: its address, user and queue (to count and close).
fn register(guard: &ConnectionGuard, out: &Arc<Outbound<Control>>, peer: Option<&Peer>, caller: &Caller) {
    let info = guard.info();
    if let Some(peer) = peer {
        info.set_peer(peer.addr());
    }
    if let Some(user) = limits::user_of(caller) {
        info.set_user(user.clone());
    }
    info.attach(out.clone());
}

/// Runs one connection: `reader` and the writer, until either ends it. The reader gets
/// the stream, the arrival stamp to touch on every frame, and the outbound queue, which
/// is closed once the writer stopped (or as it stops: a slow consumer, a failed replay).
/// What lives as long as the connection (its registration) stays with the caller: an
/// argument moved in here would be kept twice in the task.
async fn run_connection<R>(
    socket: WebSocket,
    state: &AppState,
    framing: Framing,
    out: Arc<Outbound<Control>>,
    rx: OutboundRx<Control>,
    reader: R,
) where
    R: for<'s> AsyncFnOnce(ReadHalf<'s>, &LastSeen, &Outbound<Control>),
{
    let shared = SharedSocket::new(socket);
    let stream = shared.reader();
    let last_seen = LastSeen::new();
    let shutdown = &state.inner.shutdown;
    let config = state.config();
    let writer = async {
        let mut socket = WsWriter {
            socket: &shared,
            framing,
            metrics: state.broker().metrics(),
            last_seen: &last_seen,
            ping_interval: config.ping_interval,
            pong_timeout: config.pong_timeout,
            next_ping: Instant::now() + config.ping_interval,
            pong_check: None,
        };
        // It closes the queue as it returns, which stops the reader.
        let cancelled = std::pin::pin!(shutdown.cancelled());
        let end = run_writer(rx, &mut socket, cancelled, state.broker().metrics(), WRITE_BATCH).await;
        match end {
            WriterEnd::Shutdown => Some((close::GOING_AWAY, "server shutting down")),
            WriterEnd::SlowConsumer => Some((close::TRY_AGAIN_LATER, "slow consumer")),
            WriterEnd::Closed => None,
            WriterEnd::Admin => Some((close::POLICY_VIOLATION, "closed by an administrator")),
            WriterEnd::Socket(close) => close,
        }
    };
    let reader = async {
        // The reader ends its subscriptions before it returns.
        reader(stream, &last_seen, &out).await;
        // Let the writer drain what is queued (replies, a close frame), then close.
        if out.close_reason().is_none() {
            out.push_control(Control::Close(close::NORMAL, ""), 0);
        }
    };
    let ((), close) = tokio::join!(reader, writer);
    if let Some((code, reason)) = close {
        let frame = WsMessage::Close(Some(CloseFrame { code: code.into(), reason: Utf8Bytes::from_static(reason) }));
        // The peer may not be reading at all (a slow consumer): bounded wait. Shutdown
        // cuts short any close but its own, which gets the same bound.
        let send = Box::pin(tokio::time::timeout(config.pong_timeout, shared.send(frame)));
        if code == close::GOING_AWAY {
            let _ = send.await;
        } else {
            tokio::select! {
                _ = send => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}

/// What a read error means for the connection.
fn read_error_close(e: tungstenite::Error) -> Option<Control> {
    let too_big = matches!(e, tungstenite::Error::Capacity(_));
    too_big.then_some(Control::Close(close::TOO_BIG, "frame too large"))
}

fn text_size(t: &str) -> usize {
    t.len() + 16
}

// ---------------------------------------------------------------------------------------
// JSON protocol

/// A request to a WebSocket route that is not a valid upgrade.
pub(crate) fn not_an_upgrade(e: NotAnUpgrade) -> ApiError {
    ApiError::bad_request(format!("expected a WebSocket upgrade: {e}"))
}

pub(crate) async fn json_upgrade(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    peer: PeerOf,
    presented: Option<axum::Extension<Presented>>,
    RawQuery(query): RawQuery,
    upgrade: Result<WsUpgrade, NotAnUpgrade>,
) -> Result<Response, ApiError> {
    let framing = match Query::parse(query.as_deref())?.get("pack") {
        None => Framing::Json,
        Some("lines") => Framing::Packed,
        Some(other) => return Err(ApiError::bad_request(format!("pack must be `lines`, not `{other}`"))),
    };
    // Kept to check the caller again when the configuration is reloaded; reloads are
    // watched from now on, so one before the connection's task starts is not missed.
    let credentials = credentials_of(presented);
    let reloads = state.auth().map(|live| live.changes());
    let upgrade = upgrade.map_err(not_an_upgrade)?;
    let frame_limit = state.broker().config().max_message_bytes.saturating_mul(2);
    let tracker = state.tracker().clone();
    Ok(upgrade.max_message_size(frame_limit).on_upgrade(move |socket| {
        let peer = peer.map(|axum::Extension(p)| p);
        tracker.track_future(json_connection(socket, state, caller, credentials, reloads, peer, framing))
    }))
}

struct JsonSub {
    id: SubscriptionId,
    /// The subscription's sink: how far it delivered, for this connection's publishes.
    tap: Arc<Tap<Control>>,
    _replay: Option<ReplayTask>,
    /// Its member entry in the topic's presence (dropped with it: its leave).
    _presence: PresenceEntry,
}

/// The slot of [`PresenceEvent`]'s cache that holds its JSON protocol frame.
const PRESENCE_FORM_WS: usize = 0;

/// Where a watching subscription's presence events go: its connection's queue, as
/// text frames encoded once per event for every JSON WebSocket.
struct PresenceTap(Arc<Outbound<Control>>);

impl PresenceSink for PresenceTap {
    fn presence(&self, event: &Arc<PresenceEvent>) -> bool {
        let text = event.encoded(PRESENCE_FORM_WS, |e| Utf8Bytes::from(encode::presence_frame(e)));
        let size = text_size(&text);
        self.0.push_control(Control::Text(text), size)
    }
}

/// Topics one JSON connection is listed as a publisher of, at most (then its further
/// topics are not listed).
const MAX_PUBLISHER_TOPICS: usize = 1000;

/// A JSON connection's subscriptions by topic: a vector sorted by name, grown one slot
/// at a time while small (most connections hold one or a few, and a hash map's
/// smallest table is four slots), looked up by binary search.
#[derive(Default)]
struct Subs(Vec<(TopicName, JsonSub)>);

impl Subs {
    fn find(&self, topic: &TopicName) -> Result<usize, usize> {
        self.0.binary_search_by(|(t, _)| t.cmp(topic))
    }

    fn get(&self, topic: &TopicName) -> Option<&JsonSub> {
        self.find(topic).ok().map(|i| &self.0[i].1)
    }

    fn contains_key(&self, topic: &TopicName) -> bool {
        self.find(topic).is_ok()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn keys(&self) -> impl Iterator<Item = &TopicName> {
        self.0.iter().map(|(t, _)| t)
    }

    /// Adds `sub` for `topic`, which must not be there yet.
    fn insert(&mut self, topic: TopicName, sub: JsonSub) {
        let Err(at) = self.find(&topic) else { return };
        if self.0.len() == self.0.capacity() && self.0.len() < 4 {
            self.0.reserve_exact(1);
        }
        self.0.insert(at, (topic, sub));
    }

    fn remove(&mut self, topic: &TopicName) -> Option<JsonSub> {
        self.find(topic).ok().map(|i| self.0.remove(i).1)
    }

    fn drain(&mut self) -> impl Iterator<Item = (TopicName, JsonSub)> + '_ {
        self.0.drain(..)
    }
}

/// What a socket's reader gets from the stream: a frame, or `None` when it ended.
type Frame = Option<Result<WsMessage, tungstenite::Error>>;

/// A socket's incoming frames with a look-ahead of one, so a reader can take the frames
/// that have already arrived as one batch and keep the first one that does not belong.
struct Incoming<'a, S> {
    stream: &'a mut S,
    pending: Option<Frame>,
}

impl<'a, S: Stream<Item = Result<WsMessage, tungstenite::Error>> + Unpin> Incoming<'a, S> {
    fn new(stream: &'a mut S) -> Self {
        Self { stream, pending: None }
    }

    /// The next frame; `None` once `stop` (the connection's queue) is closed.
    async fn next(&mut self, stop: &Outbound<Control>) -> Option<Frame> {
        if let Some(frame) = self.pending.take() {
            return Some(frame);
        }
        tokio::select! {
            () = stop.closed() => None,
            frame = self.stream.next() => Some(frame),
        }
    }

    /// Up to `max` more frames that have already arrived, without waiting, as `take`
    /// maps them (`Ok(None)` skips one). The first frame `take` gives back, or an error
    /// or the end, stops the batch and is what [`Incoming::next`] returns next.
    fn ready<T>(&mut self, max: usize, mut take: impl FnMut(WsMessage) -> Result<Option<T>, WsMessage>) -> Vec<T> {
        let mut out = Vec::new();
        while out.len() < max && self.pending.is_none() {
            match self.stream.next().now_or_never() {
                Some(Some(Ok(msg))) => match take(msg) {
                    Ok(Some(item)) => out.push(item),
                    Ok(None) => {}
                    Err(msg) => self.pending = Some(Some(Ok(msg))),
                },
                Some(other) => self.pending = Some(other),
                None => break,
            }
        }
        out
    }
}

async fn json_connection(
    socket: WebSocket,
    state: AppState,
    caller: Caller,
    credentials: Option<herald_auth::Credentials>,
    reloads: Option<tokio::sync::watch::Receiver<u64>>,
    peer: Option<Arc<Peer>>,
    framing: Framing,
) {
    let (out, rx) = outbound::<Control>(state.broker().config().outbound);
    let guard = ConnectionGuard::new(state.broker(), Door::Ws);
    // Arguments are moved into the session before they are used, not borrowed first:
    // a borrowed argument is kept twice in the connection's task.
    let mut session = JsonSession {
        conn: guard.info().clone(),
        state: state.clone(),
        out: out.clone(),
        subs: Subs::default(),
        caller,
        decisions: HashMap::new(),
        deadline: None,
        closed: false,
        credentials,
        peer,
        reloads,
        publishing: HashMap::new(),
    };
    register(&guard, &out, session.peer.as_deref(), &session.caller);
    session.deadline = deadline_of(&session.caller);
    run_connection(socket, &state, framing, out, rx, async |mut stream, last_seen, stop| {
        let mut reloads = session.reloads.take();
        let mut incoming = Incoming::new(&mut stream);
        loop {
            if session.closed {
                break;
            }
            let deadline = session.deadline;
            // Boxed when there is something to wait for, as every wait but the idle one:
            // most connections have neither a deadline nor a configuration to watch.
            let expired = async {
                match deadline {
                    Some((at, _)) => Box::pin(tokio::time::sleep_until(at)).await,
                    None => std::future::pending().await,
                }
            };
            let reloaded = async {
                match &mut reloads {
                    Some(r) => Box::pin(r.changed()).await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let frame = tokio::select! {
                frame = incoming.next(stop) => frame,
                () = expired => {
                    session.close_unauthorized(deadline.map_or("token expired", |(_, why)| why));
                    break;
                }
                true = reloaded => {
                    Box::pin(session.recheck()).await;
                    continue;
                }
            };
            let Some(frame) = frame else { break };
            last_seen.touch();
            match frame {
                Some(Ok(WsMessage::Text(text))) => {
                    // Text frames that have already arrived are handled together, so that
                    // consecutive publishes to one topic share one store write.
                    let mut texts = vec![text];
                    texts.extend(incoming.ready(FRAME_BATCH - 1, |m| match m {
                        WsMessage::Text(text) => Ok(Some(text)),
                        other => Err(other),
                    }));
                    // Boxed, as every wait but the idle one: see `run_connection`.
                    Box::pin(session.handle_all(texts, last_seen)).await;
                }
                Some(Ok(WsMessage::Binary(_))) => session.error(&FrameError {
                    id: None,
                    code: ErrorCode::BadRequest,
                    message: "binary frames are not part of the JSON protocol; use data_b64".into(),
                }),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
                Some(Ok(WsMessage::Close(_))) | None => break,
                Some(Err(e)) => {
                    if let Some(close) = read_error_close(e) {
                        session.out.push_control(close, 0);
                    }
                    break;
                }
            }
        }
    })
    .await;
    session.unsubscribe_all();
    // Listed (admin API) until its close was sent.
    drop(guard);
}

/// Most text frames of a JSON socket handled in one go.
const FRAME_BATCH: usize = 256;

/// Consecutive publishes of one connection to one topic, with their request ids.
struct PublishRun {
    topic: TopicName,
    frames: Vec<(Option<u64>, NewMessage)>,
}

struct JsonSession {
    state: AppState,
    out: Arc<Outbound<Control>>,
    subs: Subs,
    /// Who is connected, and the decisions taken for it on this connection.
    caller: Caller,
    decisions: HashMap<(Action, TopicName), bool>,
    /// When the connection is closed with 4401 unless it (re)authenticates: the end of
    /// the time allowed for the `auth` frame, or its token's expiry.
    deadline: Option<(tokio::time::Instant, &'static str)>,
    /// A close was queued: read nothing more.
    closed: bool,
    /// The credentials the caller authenticated with, to check again after a reload.
    credentials: Option<herald_auth::Credentials>,
    /// The connection's buckets and error budget.
    peer: Option<Arc<Peer>>,
    /// Configuration reloads to check the caller again after (taken by the read loop).
    reloads: Option<tokio::sync::watch::Receiver<u64>>,
    /// Its entry in the admin API's list.
    conn: Arc<ConnectionInfo>,
    /// Its member entries as a publisher, by topic (left when the connection ends).
    publishing: HashMap<TopicName, PresenceEntry>,
}

/// Members a `presence` reply lists at most (HTTP pages through them all).
pub(crate) const MAX_PRESENCE_LISTED: usize = 1000;

/// How long a JSON WebSocket opened without credentials has to send its `auth` frame.
pub(crate) const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// When a connection of `caller` must (re)authenticate by.
fn deadline_of(caller: &Caller) -> Option<(tokio::time::Instant, &'static str)> {
    match caller {
        Caller::Anyone => None,
        Caller::Pending => Some((tokio::time::Instant::now() + AUTH_TIMEOUT, "authentication required")),
        Caller::User(p) => p.expiry().map(|at| (at, "token expired")),
    }
}

/// Decisions one connection remembers at most (then it starts over).
const MAX_DECISIONS: usize = 4096;

impl JsonSession {
    /// `None` if the caller may do `action` on `topic`, else the `forbidden` error frame
    /// (the connection stays). Decisions are cached per connection.
    fn refused(&mut self, id: Option<u64>, action: Action, topic: &TopicName) -> Option<FrameError> {
        let principal = match &self.caller {
            Caller::Anyone => return None,
            Caller::Pending => {
                return Some(FrameError { id, code: ErrorCode::Unauthorized, message: "authenticate first".into() })
            }
            Caller::User(p) => p.clone(),
        };
        let key = (action, topic.clone());
        let allowed = match self.decisions.get(&key) {
            Some(allowed) => *allowed,
            None => {
                let allowed = principal.allows(action, topic.as_str());
                if self.decisions.len() >= MAX_DECISIONS {
                    self.decisions.clear();
                }
                self.decisions.insert(key, allowed);
                allowed
            }
        };
        (!allowed).then(|| {
            herald_core::Metrics::add(&self.state.broker().metrics().forbidden, 1);
            let e = forbidden(&principal, action, topic.as_str());
            FrameError { id, code: e.code, message: e.message }
        })
    }

    /// Queues a 4401 close; nothing more is read.
    fn close_unauthorized(&mut self, why: &'static str) {
        herald_core::Metrics::add(&self.state.broker().metrics().auth_refused, 1);
        self.out.push_control(Control::Close(close::UNAUTHORIZED, why), 0);
        self.closed = true;
    }

    /// An `auth` frame: authenticates a pending connection, or refreshes the token of an
    /// authenticated one (same user). Subscriptions the new grants no longer allow end
    /// with a `forbidden` error frame naming the topic.
    async fn authenticate(&mut self, id: Option<u64>, token: String) {
        let Some(auth) = self.state.auth().map(|live| live.get()) else {
            return self.error(&FrameError {
                id,
                code: ErrorCode::BadRequest,
                message: "this server does not authenticate; no auth frame is needed".into(),
            });
        };
        let pending = matches!(self.caller, Caller::Pending);
        let credentials = herald_auth::Credentials::Bearer(token);
        let principal = match auth.check(&credentials).await {
            Ok(p) => Arc::new(p),
            Err(e) => {
                self.error(&FrameError { id, code: ErrorCode::Unauthorized, message: e.to_string() });
                if pending {
                    self.close_unauthorized("authentication failed");
                }
                return;
            }
        };
        if let Caller::User(old) = &self.caller {
            if old.name != principal.name {
                return self.error(&FrameError {
                    id,
                    code: ErrorCode::BadRequest,
                    message: format!("a refresh must be for {}, not {}", old.name, principal.name),
                });
            }
        }
        self.credentials = Some(credentials);
        self.adopt(principal.clone());
        self.reply(encode::authenticated(id, &principal.name, principal.expires_at));
    }

    /// Makes `principal` the connection's caller: its decisions start over, its
    /// deadline is its token's expiry, and subscriptions it may no longer hold end with
    /// a `forbidden` error frame naming the topic (the others go on).
    fn adopt(&mut self, principal: Arc<herald_auth::Principal>) {
        self.conn.set_user(principal.name.clone());
        self.caller = Caller::User(principal.clone());
        self.decisions.clear();
        self.deadline = deadline_of(&self.caller);
        let lost: Vec<TopicName> =
            self.subs.keys().filter(|t| !principal.allows(Action::Subscribe, t.as_str())).cloned().collect();
        for topic in lost {
            if let Some(sub) = self.subs.remove(&topic) {
                drop(sub._replay);
                self.state.broker().unsubscribe(&topic, sub.id);
            }
            let e = forbidden(&principal, Action::Subscribe, topic.as_str());
            self.error(&FrameError { id: None, code: e.code, message: format!("subscription ended: {}", e.message) });
        }
    }

    /// The configuration was reloaded: the caller's credentials are checked again
    /// against it. Refused now: closed with 4401; accepted: its grants are the new ones.
    async fn recheck(&mut self) {
        let Some(auth) = self.state.auth().map(|live| live.get()) else { return };
        let Some(credentials) = &self.credentials else { return };
        match auth.check(credentials).await {
            Ok(principal) => self.adopt(Arc::new(principal)),
            Err(_) => self.close_unauthorized("credentials no longer accepted"),
        }
    }

    fn reply(&self, text: String) {
        let size = text_size(&text);
        self.out.push_control(Control::Text(text.into()), size);
    }

    /// Answers an error frame, spending one error of the connection's budget; once it
    /// is spent the connection is closed with 1008 and nothing more is read.
    fn error(&mut self, e: &FrameError) {
        self.reply(encode::error(e.id, e.code, &e.message));
        if !self.closed && self.peer.as_ref().is_some_and(|p| p.error()) {
            self.out.push_control(Control::Close(close::POLICY_VIOLATION, "too many errors"), 0);
            self.closed = true;
        }
    }

    /// Waits until a publish of `bytes` fits the connection's and the user's buckets;
    /// meanwhile nothing is read from the socket, which slows the sender through TCP.
    async fn pace(&self, bytes: usize) {
        if let Some(peer) = &self.peer {
            peer.admit_stream(limits::user_of(&self.caller), bytes).await;
        }
    }

    /// Handles frames in order; runs of publishes to one topic are published as one
    /// batch (consecutive offsets, one store write), each still answered on its own.
    /// Publishes to a topic this connection subscribes to are not batched: each waits
    /// for its own message (see [`JsonSession::handle`]), so that the frames sent are
    /// the same whether the client's frames arrived together or one by one.
    async fn handle_all(&mut self, texts: Vec<Utf8Bytes>, last_seen: &LastSeen) {
        let max = self.state.broker().config().max_message_bytes;
        let mut run: Option<PublishRun> = None;
        for text in texts {
            let frame = match parse_client_frame(&text) {
                Ok(frame) => frame,
                Err(e) => {
                    self.publish_run(run.take()).await;
                    self.error(&e);
                    continue;
                }
            };
            if self.closed {
                break;
            }
            if matches!(self.caller, Caller::Pending) && !matches!(frame.op, Op::Auth { .. }) {
                self.publish_run(run.take()).await;
                self.error(&FrameError {
                    id: frame.id,
                    code: ErrorCode::Unauthorized,
                    message: "send {\"op\":\"auth\",\"token\":...} first".into(),
                });
                self.close_unauthorized("authentication required");
                break;
            }
            if let Some(e) = match &frame.op {
                Op::Publish { topic, .. } => self.refused(frame.id, Action::Publish, topic),
                Op::Subscribe { topic, .. } | Op::Presence { topic } => {
                    self.refused(frame.id, Action::Subscribe, topic)
                }
                Op::Unsubscribe { .. } | Op::Ping | Op::Auth { .. } => None,
            } {
                self.publish_run(run.take()).await;
                self.error(&e);
                continue;
            }
            // Only publishes that may go ahead take from the rate.
            if let Op::Publish { payload, .. } = &frame.op {
                self.pace(payload.len()).await;
            }
            match frame.op {
                // Too large ones are refused on their own, below.
                Op::Publish { topic, payload, ttl_ms } if payload.len() <= max && !self.subs.contains_key(&topic) => {
                    let msg = payload.into_message(ttl_ms);
                    match &mut run {
                        Some(r) if r.topic == topic => r.frames.push((frame.id, msg)),
                        _ => {
                            self.publish_run(run.take()).await;
                            run = Some(PublishRun { topic, frames: vec![(frame.id, msg)] });
                        }
                    }
                }
                op => {
                    self.publish_run(run.take()).await;
                    self.handle(ClientFrame { id: frame.id, op }, last_seen).await;
                }
            }
        }
        self.publish_run(run).await;
    }

    async fn publish_run(&mut self, run: Option<PublishRun>) {
        let Some(PublishRun { topic, frames }) = run else { return };
        let (ids, batch): (Vec<Option<u64>>, Vec<NewMessage>) = frames.into_iter().unzip();
        match self.state.broker().publish_batch_via(Door::Ws, &topic, batch).await {
            Ok(published) => {
                self.published_to(&topic);
                for (id, p) in ids.into_iter().zip(published) {
                    if id.is_some() {
                        self.reply(encode::published(id, topic.as_str(), p.offset, p.ts));
                    }
                }
            }
            Err(e) => {
                // Nothing of the batch was stored: every frame of it gets the error.
                let api = ApiError::from(e);
                for id in ids {
                    self.error(&FrameError { id, code: api.code, message: api.message.clone() });
                }
            }
        }
    }

    async fn handle(&mut self, frame: ClientFrame, last_seen: &LastSeen) {
        let id = frame.id;
        let fail = |code, message: String| FrameError { id, code, message };
        match frame.op {
            Op::Ping => self.reply(encode::pong(id)),
            Op::Auth { token } => self.authenticate(id, token).await,
            Op::Publish { topic, payload, ttl_ms } => {
                let own = self.subs.get(&topic).map(|sub| (sub.tap.clone(), sub.tap.mark()));
                match self.state.broker().publish_via(Door::Ws, &topic, payload.into_message(ttl_ms)).await {
                    Ok(p) => {
                        self.published_to(&topic);
                        // This connection's subscription gets the message first, then the
                        // reply (and whatever the next frames bring): held back behind a
                        // replay or an earlier offset, the message is waited for.
                        if let Some((tap, mark)) = own {
                            tap.until_delivered(p.offset, mark, || last_seen.touch()).await;
                        }
                        if id.is_some() {
                            self.reply(encode::published(id, topic.as_str(), p.offset, p.ts));
                        }
                    }
                    Err(e) => {
                        let api = ApiError::from(e);
                        self.error(&fail(api.code, api.message));
                    }
                }
            }
            Op::Presence { topic } => {
                let list = self.state.broker().presence().list(&topic, 0, MAX_PRESENCE_LISTED);
                self.reply(encode::presence_reply(id, topic.as_str(), &list));
            }
            Op::Subscribe { topic, from, epoch, presence, info } => {
                if self.subs.contains_key(&topic) {
                    return self.error(&fail(ErrorCode::AlreadySubscribed, format!("already subscribed to {topic}")));
                }
                let max = self.state.config().max_subscriptions_per_connection;
                if self.subs.len() >= max {
                    return self.error(&fail(
                        ErrorCode::TooManySubscriptions,
                        format!("at most {max} subscriptions per connection"),
                    ));
                }
                let tap = Arc::new(Tap::new(self.out.clone()));
                match self.state.broker().subscribe(&topic, from, epoch.as_deref(), tap.clone()).await {
                    Ok(sub) => {
                        self.reply(encode::subscribed(id, topic.as_str(), &sub.epoch, sub.next, sub.recovered));
                        let replay = sub.replay.map(|r| spawn_replay(r, self.out.clone()));
                        // Joins after the reply: its events follow it.
                        let member =
                            Member { conn: self.conn.clone(), role: MemberRole::Subscriber, info: info.map(Arc::from) };
                        let watcher: Option<Arc<dyn PresenceSink>> =
                            presence.then(|| Arc::new(PresenceTap(self.out.clone())) as Arc<dyn PresenceSink>);
                        let entry = self.state.broker().presence().join(&topic, member, watcher);
                        self.subs.insert(topic, JsonSub { id: sub.id, tap, _replay: replay, _presence: entry });
                    }
                    Err(e) => {
                        let api = ApiError::from(e);
                        self.error(&fail(api.code, api.message));
                    }
                }
            }
            Op::Unsubscribe { topic } => match self.subs.remove(&topic) {
                Some(sub) => {
                    drop(sub._replay);
                    self.state.broker().unsubscribe(&topic, sub.id);
                    self.reply(encode::unsubscribed(id, topic.as_str()));
                }
                None => self.error(&fail(ErrorCode::NotSubscribed, format!("not subscribed to {topic}"))),
            },
        }
    }

    /// Lists the connection as a publisher of `topic` after a publish there succeeded.
    fn published_to(&mut self, topic: &TopicName) {
        if self.publishing.contains_key(topic) || self.publishing.len() >= MAX_PUBLISHER_TOPICS {
            return;
        }
        let member = Member { conn: self.conn.clone(), role: MemberRole::Publisher, info: None };
        let entry = self.state.broker().presence().join(topic, member, None);
        self.publishing.insert(topic.clone(), entry);
    }

    fn unsubscribe_all(&mut self) {
        for (topic, sub) in self.subs.drain() {
            drop(sub._replay);
            self.state.broker().unsubscribe(&topic, sub.id);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Raw sockets

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Both,
    Pub,
    Sub,
}

pub(crate) async fn raw_upgrade(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    peer: PeerOf,
    presented: Option<axum::Extension<Presented>>,
    TopicPath(topic): TopicPath,
    RawQuery(query): RawQuery,
    upgrade: Result<WsUpgrade, NotAnUpgrade>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(not_an_upgrade)?;
    let query = Query::parse(query.as_deref())?;
    let mode = match query.get("mode") {
        None | Some("both") => Mode::Both,
        Some("pub") => Mode::Pub,
        Some("sub") => Mode::Sub,
        Some(other) => return Err(ApiError::bad_request(format!("mode must be both, pub or sub, not {other:?}"))),
    };
    // The socket does what its mode says for its whole life: every action is checked now.
    if mode != Mode::Sub {
        caller.permit(Action::Publish, topic.as_str())?;
    }
    if mode != Mode::Pub {
        caller.permit(Action::Subscribe, topic.as_str())?;
    }
    let actions = match mode {
        Mode::Both => vec![Action::Publish, Action::Subscribe],
        Mode::Pub => vec![Action::Publish],
        Mode::Sub => vec![Action::Subscribe],
    };
    let watch = watch(&state, &caller, credentials_of(presented), actions, topic.as_str());
    let from = match query.get("from") {
        None => StartFrom::Latest,
        Some(s) => parse_from_query(s)
            .ok_or_else(|| ApiError::bad_request("from must be latest, earliest or a non-negative integer"))?,
    };
    // Subscribe before the 101 goes out, so a message published after the client saw
    // the handshake complete is delivered.
    let (out, rx) = outbound::<Control>(state.broker().config().outbound);
    let sub =
        if mode == Mode::Pub { None } else { Some(state.broker().subscribe(&topic, from, None, out.clone()).await?) };
    let max = state.broker().config().max_message_bytes;
    let tracker = state.tracker().clone();
    let broker = state.broker().clone();
    let unsubscribe = sub.as_ref().map(|s| SubscriptionGuard::new(broker, topic.clone(), s.id)).unwrap_or_default();
    Ok(upgrade
        .max_message_size(max)
        .on_upgrade(move |socket| {
            let replay = sub.and_then(|s| s.replay);
            let peer = peer.map(|axum::Extension(p)| p);
            let pacer = Pacer { mode, peer, user: limits::user_of(&caller).cloned() };
            let guards = (unsubscribe, watch, pacer);
            tracker.track_future(raw_connection(socket, state, topic, replay, (out, rx), guards))
        })
        .into_response())
}

async fn raw_connection(
    socket: WebSocket,
    state: AppState,
    topic: TopicName,
    replay: Option<Replay>,
    (out, rx): (Arc<Outbound<Control>>, OutboundRx<Control>),
    (unsubscribe, watch, pacer): (SubscriptionGuard, Watch, Pacer),
) {
    let replay = replay.map(|r| spawn_replay(r, out.clone()));
    let guard = ConnectionGuard::new(state.broker(), Door::Raw);
    let info = guard.info();
    if let Some(peer) = &pacer.peer {
        info.set_peer(peer.addr());
    }
    if let Some(user) = &pacer.user {
        info.set_user(user.clone());
    }
    info.attach(out.clone());
    // Members of the topic for the socket's life, in the roles its mode gives.
    let presence = state.broker().presence();
    let roles = [(pacer.mode != Mode::Pub, MemberRole::Subscriber), (pacer.mode != Mode::Sub, MemberRole::Publisher)];
    let members: Vec<PresenceEntry> = roles
        .into_iter()
        .filter(|(is, _)| *is)
        .map(|(_, role)| presence.join(&topic, Member { conn: info.clone(), role, info: None }, None))
        .collect();
    let queue = out.clone();
    run_connection(socket, &state, Framing::Raw, queue, rx, async |mut stream, last_seen, stop| {
        let ended = watch.ended();
        tokio::pin!(ended);
        tokio::select! {
            () = raw_reader(&state, &topic, &pacer, &out, &mut stream, last_seen, stop) => {}
            why = &mut ended => {
                let (code, reason) = close_for(why);
                out.push_control(Control::Close(code, reason), 0);
            }
        }
        drop(replay);
        drop(unsubscribe);
    })
    .await;
    drop(members);
    // Listed (admin API) until its close was sent.
    drop(guard);
}

/// What a raw socket may send: its mode, and who its publishes are paced as (its
/// connection's buckets and its user).
struct Pacer {
    mode: Mode,
    peer: Option<Arc<Peer>>,
    user: Option<Arc<str>>,
}

/// Most data frames of a raw socket published as one batch.
const RAW_BATCH: usize = 256;

/// Publishes the data frames of a raw socket until it ends. Frames that have already
/// arrived are published together, in order, as one batch (one store write and, on the
/// disk store, one fsync), so a client streaming frames is not held to one commit per
/// frame.
async fn raw_reader(
    state: &AppState,
    topic: &TopicName,
    pacer: &Pacer,
    out: &Outbound<Control>,
    stream: &mut ReadHalf<'_>,
    last_seen: &LastSeen,
    stop: &Outbound<Control>,
) {
    let mut incoming = Incoming::new(stream);
    loop {
        let Some(frame) = incoming.next(stop).await else { return };
        last_seen.touch();
        let first = match frame {
            Some(Ok(WsMessage::Text(t))) => NewMessage::new(Kind::Text, Bytes::from(t)),
            Some(Ok(WsMessage::Binary(b))) => NewMessage::new(Kind::Binary, b),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => continue,
            Some(Ok(WsMessage::Close(_))) | None => return,
            Some(Err(e)) => {
                if let Some(close) = read_error_close(e) {
                    out.push_control(close, 0);
                }
                return;
            }
        };
        if pacer.mode == Mode::Sub {
            out.push_control(Control::Close(close::UNSUPPORTED_DATA, "mode=sub takes no data frames"), 0);
            return;
        }
        let mut batch = vec![first];
        batch.extend(incoming.ready(RAW_BATCH - 1, |m| match m {
            WsMessage::Text(t) => Ok(Some(NewMessage::new(Kind::Text, Bytes::from(t)))),
            WsMessage::Binary(b) => Ok(Some(NewMessage::new(Kind::Binary, b))),
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => Ok(None),
            other => Err(other),
        }));
        if let Some(peer) = &pacer.peer {
            for msg in &batch {
                peer.admit_stream(pacer.user.as_ref(), msg.payload.len()).await;
            }
        }
        if let Err(e) = state.broker().publish_batch_via(Door::Raw, topic, batch).await {
            let refused = matches!(e, BrokerError::Role { .. });
            let api = ApiError::from(e);
            tracing::debug!(code = %api.code, "raw publish failed: {}", api.message);
            let (code, reason) = match api.code {
                ErrorCode::TooLarge => (close::TOO_BIG, "publish failed"),
                _ if refused => (close::UNSUPPORTED_DATA, "this node does not accept publishes (role fanout)"),
                _ => (close::TRY_AGAIN_LATER, "publish failed"),
            };
            out.push_control(Control::Close(code, reason), 0);
            return;
        }
    }
}
