//! WebSocket half of the client: [`WsConnection`] speaks the JSON protocol frame by
//! frame; [`Subscription`] is a self-healing subscription built on it.

use std::collections::VecDeque;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::task::AbortOnDropHandle;

use crate::{ws_base, Client, ClientError, StartFrom, TlsConfig};

/// A payload as delivered in the JSON views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// `data`: JSON text exactly as published (a JSON string for text messages).
    Json(String),
    /// `data_b64`: the decoded bytes.
    Binary(Vec<u8>),
}

impl Payload {
    pub(crate) fn from_fields(data: Option<Box<RawValue>>, data_b64: Option<String>) -> Result<Self, ClientError> {
        match (data, data_b64) {
            (Some(json), None) => Ok(Payload::Json(json.get().to_owned())),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(Payload::Binary)
                .map_err(|e| ClientError::Protocol(format!("bad data_b64: {e}"))),
            _ => Err(ClientError::Protocol("a message needs exactly one of data and data_b64".into())),
        }
    }

    /// The payload's bytes as a program reads them: a text message's UTF-8 (unquoted),
    /// a JSON message's text as received, a binary message's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Payload::Json(text) => match serde_json::from_str::<String>(text) {
                Ok(s) => s.into_bytes(),
                Err(_) => text.clone().into_bytes(),
            },
            Payload::Binary(bytes) => bytes.clone(),
        }
    }

    /// The payload as a line of text: a JSON string's contents, other JSON as received,
    /// binary as base64.
    pub fn to_line(&self) -> String {
        match self {
            Payload::Json(text) => match serde_json::from_str::<String>(text) {
                Ok(s) => s,
                Err(_) => text.clone(),
            },
            Payload::Binary(bytes) => base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }
}

/// One message received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The topic.
    pub topic: String,
    /// Its offset.
    pub offset: u64,
    /// Acceptance time, ms since the Unix epoch.
    pub ts: u64,
    /// The payload.
    pub payload: Payload,
}

#[derive(Deserialize)]
struct MessageFrame {
    topic: String,
    offset: u64,
    ts: u64,
    data: Option<Box<RawValue>>,
    data_b64: Option<String>,
}

impl Delivery {
    /// Parses a server `message` frame.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let f: MessageFrame = serde_json::from_str(text).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Delivery { topic: f.topic, offset: f.offset, ts: f.ts, payload: Payload::from_fields(f.data, f.data_b64)? })
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `url` (`ws://` or `wss://`, the latter trusting `tls`), sending
/// `authorization` with the upgrade when given.
pub async fn connect_socket(
    url: &str,
    config: WebSocketConfig,
    tls: &TlsConfig,
    authorization: Option<&str>,
) -> Result<(Socket, tokio_tungstenite::tungstenite::handshake::client::Response), ClientError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request()?;
    if let Some(auth) = authorization {
        let value =
            auth.parse().map_err(|_| ClientError::Protocol("the Authorization value is not a valid header".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let connector = tokio_tungstenite::Connector::Rustls(tls.http1());
    Ok(tokio_tungstenite::connect_async_tls_with_config(request, Some(config), false, Some(connector)).await?)
}

/// One WebSocket connection speaking the JSON protocol.
pub struct WsConnection {
    socket: Socket,
    next_id: u64,
    /// Frames that arrived while waiting for a reply, in order.
    backlog: VecDeque<String>,
    /// Whether the server packs frames (`?pack=lines`): several per WebSocket frame.
    packed: bool,
    /// The rest of the last packed WebSocket frame, one server frame each.
    unpacked: VecDeque<String>,
}

impl WsConnection {
    /// Connects to `{base}/v1/ws` (`base` as given to [`Client::new`]; an `https://`
    /// base connects with `wss://`, checked against the system's certificate store).
    pub async fn connect(base: &str) -> Result<Self, ClientError> {
        Self::connect_with(base, &TlsConfig::system()).await
    }

    /// As [`WsConnection::connect`], trusting `tls` for `wss://`.
    pub async fn connect_with(base: &str, tls: &TlsConfig) -> Result<Self, ClientError> {
        Self::connect_as(base, tls, None).await
    }

    /// As [`WsConnection::connect_with`], sending `authorization` with the upgrade.
    pub async fn connect_as(base: &str, tls: &TlsConfig, authorization: Option<&str>) -> Result<Self, ClientError> {
        Self::open(base, tls, authorization, false).await
    }

    /// As [`WsConnection::connect_as`], asking the server to pack its frames
    /// (`/v1/ws?pack=lines`: the frames of a burst share WebSocket frames, which saves
    /// both sides work per message). Frames are handed out one at a time all the same;
    /// a JSON payload's line breaks arrive as spaces (the same JSON value).
    pub async fn connect_packed(base: &str, tls: &TlsConfig, authorization: Option<&str>) -> Result<Self, ClientError> {
        Self::open(base, tls, authorization, true).await
    }

    async fn open(base: &str, tls: &TlsConfig, authorization: Option<&str>, packed: bool) -> Result<Self, ClientError> {
        let query = if packed { "?pack=lines" } else { "" };
        let url = format!("{}/v1/ws{query}", ws_base(base.trim_end_matches('/')));
        // tungstenite zeroes its whole read chunk before every read: keep it small (its
        // default, 128 KiB, made each small frame cost a 128 KiB memset).
        let config = WebSocketConfig::default().read_buffer_size(8 << 10);
        let (socket, _) = connect_socket(&url, config, tls, authorization).await?;
        Ok(Self { socket, next_id: 1, backlog: VecDeque::new(), packed, unpacked: VecDeque::new() })
    }

    /// Sends a text frame as is.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), ClientError> {
        self.socket.send(WsMessage::text(text.into())).await?;
        Ok(())
    }

    /// Sends one raw WebSocket message (binary frames, pings, close).
    pub async fn send_raw(&mut self, msg: WsMessage) -> Result<(), ClientError> {
        self.socket.send(msg).await?;
        Ok(())
    }

    /// The next text frame from the server. A close frame ends with
    /// [`ClientError::Closed`] carrying its code and reason.
    pub async fn recv_text(&mut self) -> Result<String, ClientError> {
        if let Some(text) = self.backlog.pop_front() {
            return Ok(text);
        }
        self.recv_socket().await
    }

    async fn recv_socket(&mut self) -> Result<String, ClientError> {
        if let Some(frame) = self.unpacked.pop_front() {
            return Ok(frame);
        }
        loop {
            match self.socket.next().await {
                Some(Ok(WsMessage::Text(t))) if self.packed => {
                    let mut frames = t.as_str().split('\n').map(str::to_owned);
                    let first = frames.next().unwrap_or_default();
                    self.unpacked.extend(frames);
                    return Ok(first);
                }
                Some(Ok(WsMessage::Text(t))) => return Ok(t.as_str().to_owned()),
                Some(Ok(WsMessage::Close(frame))) => {
                    return Err(ClientError::Closed(frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))))
                }
                Some(Ok(WsMessage::Binary(_))) => return Err(ClientError::Protocol("binary frame".into())),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ClientError::Closed(None)),
            }
        }
    }

    /// The next frame from the server, parsed as JSON.
    pub async fn recv(&mut self) -> Result<Value, ClientError> {
        let text = self.recv_text().await?;
        serde_json::from_str(&text).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Sends `frame` with a fresh `id` and waits for the reply carrying it; frames that
    /// arrive meanwhile stay queued for [`WsConnection::recv`].
    pub async fn request(&mut self, mut frame: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        frame["id"] = id.into();
        self.send_text(frame.to_string()).await?;
        loop {
            let text = self.recv_socket().await?;
            let value: Value = serde_json::from_str(&text).map_err(|e| ClientError::Protocol(e.to_string()))?;
            if value.get("id").and_then(Value::as_u64) == Some(id) {
                return Ok(value);
            }
            self.backlog.push_back(text);
        }
    }

    /// Subscribes and returns the `subscribed` reply (or the error frame).
    pub async fn subscribe(&mut self, topic: &str, from: StartFrom, epoch: Option<&str>) -> Result<Value, ClientError> {
        let mut frame = json!({"op": "subscribe", "topic": topic, "from": from.to_json()});
        if let Some(epoch) = epoch {
            frame["epoch"] = epoch.into();
        }
        self.request(frame).await
    }

    /// Publishes a JSON value and returns the `published` reply (or the error frame).
    pub async fn publish(&mut self, topic: &str, data: Value) -> Result<Value, ClientError> {
        self.request(json!({"op": "publish", "topic": topic, "data": data})).await
    }

    /// Closes the connection normally.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.socket.close(None).await?;
        Ok(())
    }
}

/// What a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// (Re)subscribed. `recovered: false` after a reconnect means messages were lost to
    /// retention or the topic's history restarted: reload state (e.g. by fetch).
    Subscribed {
        /// The topic's epoch.
        epoch: String,
        /// The next offset.
        next: u64,
        /// Whether the requested position was resumed without loss.
        recovered: bool,
    },
    /// A message, in offset order.
    Message(Delivery),
    /// The connection broke; the subscription reconnects and resumes by itself.
    Disconnected(String),
}

/// A subscription that reconnects with backoff and resumes from the last offset it
/// delivered, checking the epoch. Dropping it ends it.
pub struct Subscription {
    events: mpsc::Receiver<Event>,
    _task: AbortOnDropHandle<()>,
}

impl Subscription {
    /// The next event; `None` only if the background task ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl Client {
    /// Subscribes to `topic` over WebSocket from `from`, reconnecting as needed.
    pub fn subscribe(&self, topic: &str, from: StartFrom) -> Subscription {
        self.subscription(topic, Resume { from, epoch: None })
    }

    /// Resumes a subscription where an earlier one stopped (say, before a restart):
    /// from offset `next` of the history whose epoch was `epoch` (both from that
    /// subscription's events: the epoch of its last [`Event::Subscribed`], and the offset
    /// after its last message). If that position was lost (the history was deleted, or
    /// trimmed past `next`), the first [`Event::Subscribed`] says `recovered: false` and
    /// the subscription continues live.
    pub fn resume(&self, topic: &str, next: u64, epoch: impl Into<String>) -> Subscription {
        self.subscription(topic, Resume { from: StartFrom::Offset(next), epoch: Some(epoch.into()) })
    }

    fn subscription(&self, topic: &str, mut resume: Resume) -> Subscription {
        let (tx, events) = mpsc::channel(1024);
        let base = self.base().to_owned();
        let tls = self.tls().clone();
        let auth = self.authorization().map(str::to_owned);
        let topic = topic.to_owned();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let error = match session(&base, &tls, auth.as_deref(), &topic, &mut resume, &tx, &mut backoff).await {
                    Ok(()) => return, // the receiver is gone
                    Err(e) => e,
                };
                if tx.send(Event::Disconnected(error.to_string())).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        Subscription { events, _task: AbortOnDropHandle::new(task) }
    }
}

struct Resume {
    from: StartFrom,
    epoch: Option<String>,
}

/// One connection's life; `Ok` when the consumer went away, `Err` when it broke.
async fn session(
    base: &str,
    tls: &TlsConfig,
    auth: Option<&str>,
    topic: &str,
    resume: &mut Resume,
    tx: &mpsc::Sender<Event>,
    backoff: &mut Duration,
) -> Result<(), ClientError> {
    let mut conn = WsConnection::connect_packed(base, tls, auth).await?;
    let epoch = match resume.from {
        StartFrom::Offset(n) if n > 0 => resume.epoch.clone(),
        _ => None,
    };
    let reply = conn.subscribe(topic, resume.from, epoch.as_deref()).await?;
    if reply["type"] != "subscribed" {
        return Err(ClientError::Protocol(reply.to_string()));
    }
    let epoch = reply["epoch"].as_str().unwrap_or_default().to_owned();
    let next = reply["next"].as_u64().unwrap_or_default();
    let recovered = reply["recovered"].as_bool().unwrap_or(false);
    if !recovered {
        // The requested position is lost: continue live (the caller saw recovered: false).
        resume.from = StartFrom::Offset(next);
    }
    resume.epoch = Some(epoch.clone());
    *backoff = Duration::from_millis(100);
    if tx.send(Event::Subscribed { epoch, next, recovered }).await.is_err() {
        return Ok(());
    }
    loop {
        let text = conn.recv_text().await?;
        if !text.starts_with("{\"type\":\"message\"") {
            let value: Value = serde_json::from_str(&text).map_err(|e| ClientError::Protocol(e.to_string()))?;
            if value["type"] == "error" {
                return Err(ClientError::Protocol(value.to_string()));
            }
            continue;
        }
        let delivery = Delivery::parse(&text)?;
        resume.from = StartFrom::Offset(delivery.offset + 1);
        if tx.send(Event::Message(delivery)).await.is_err() {
            return Ok(());
        }
    }
}
