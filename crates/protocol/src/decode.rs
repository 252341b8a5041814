//! Parsing of client frames of the JSON WebSocket protocol.
//!
//! Every field is first taken as raw JSON text, then checked on its own, so that an
//! error reply can carry the frame's `id` even when another field is wrong, the topic
//! name is checked before anything else, and `data` keeps the exact JSON text received
//! (numbers keep every digit).

use base64::Engine;
use bytes::Bytes;
use herald_core::{Kind, NewMessage, StartFrom, TopicName};
use serde::de::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::code::ErrorCode;

/// Largest `id` a client may send: 2^53 - 1, exact in every JSON implementation.
pub const MAX_ID: u64 = (1 << 53) - 1;

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame {
    /// The request id, echoed in the reply.
    pub id: Option<u64>,
    /// What the client asks for.
    pub op: Op,
}

/// A client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Subscribe to a topic.
    Subscribe {
        /// The topic.
        topic: TopicName,
        /// Where to start.
        from: StartFrom,
        /// The epoch the client saw, if any.
        epoch: Option<String>,
        /// Send this subscription the topic's join and leave events.
        presence: bool,
        /// What the client says of itself in its member entry: JSON text, at most
        /// [`herald_core::MAX_INFO_BYTES`].
        info: Option<String>,
    },
    /// The topic's members and counts.
    Presence {
        /// The topic.
        topic: TopicName,
    },
    /// Unsubscribe from a topic.
    Unsubscribe {
        /// The topic.
        topic: TopicName,
    },
    /// Publish to a topic.
    Publish {
        /// The topic.
        topic: TopicName,
        /// The payload.
        payload: Payload,
        /// Optional time to live, ms.
        ttl_ms: Option<u64>,
    },
    /// Liveness check.
    Ping,
    /// Authenticate the connection with a bearer token (first frame of a connection
    /// opened without credentials), or refresh its token.
    Auth {
        /// The token (a JWT).
        token: String,
    },
}

/// A payload from a JSON frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// `data`: the exact JSON text received.
    Json(String),
    /// `data_b64`: the decoded bytes.
    Binary(Vec<u8>),
}

impl Payload {
    /// The payload's size as `max_message_bytes` counts it: the JSON text, or the
    /// decoded bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(text) => text.len(),
            Payload::Binary(bytes) => bytes.len(),
        }
    }

    /// Whether the payload is empty (only a `data_b64` of no bytes can be).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message to store: `data` is json, `data_b64` binary.
    pub fn into_message(self, ttl_ms: Option<u64>) -> NewMessage {
        let (kind, payload) = match self {
            Payload::Json(text) => (Kind::Json, Bytes::from(text)),
            Payload::Binary(bytes) => (Kind::Binary, Bytes::from(bytes)),
        };
        NewMessage { kind, payload, ttl_ms }
    }
}

/// One message of an enqueue batch (`POST /v1/queues/{queue}/batch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    /// The message: `data` (json), `text` or `data_b64` (binary), with its `ttl_ms`.
    pub message: NewMessage,
    /// Not ready before this many ms (0: at once).
    pub delay_ms: u64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch<'a> {
    #[serde(borrow)]
    messages: Vec<RawEntry<'a>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default)]
    data_b64: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    ttl_ms: Option<u64>,
}

/// Parses the body of an enqueue batch, `{"messages":[{"data":...}, {"text":"..."} or
/// {"data_b64":"..."}, each with optional "delay_ms" and "ttl_ms"]}`, holding 1 to
/// `max` entries. The error is words for a `bad_request`, naming the entry.
pub fn parse_enqueue_batch(text: &str, max: usize) -> Result<Vec<BatchEntry>, String> {
    let raw: RawBatch<'_> = serde_json::from_str(text).map_err(|e| format!("malformed batch: {e}"))?;
    if raw.messages.is_empty() || raw.messages.len() > max {
        return Err(format!("a batch holds 1 to {max} messages, not {}", raw.messages.len()));
    }
    let limit = u64::MAX / 2;
    raw.messages
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let (kind, payload) = match (e.data, e.text, e.data_b64) {
                (Some(json), None, None) => (Kind::Json, Bytes::from(json.get().to_owned())),
                (None, Some(text), None) => (Kind::Text, Bytes::from(text)),
                (None, None, Some(b64)) => (
                    Kind::Binary,
                    Bytes::from(
                        base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .map_err(|e| format!("messages[{i}]: data_b64 is not valid base64: {e}"))?,
                    ),
                ),
                (None, None, None) => return Err(format!("messages[{i}]: missing field data, text or data_b64")),
                _ => return Err(format!("messages[{i}]: give one of data, text and data_b64")),
            };
            if e.delay_ms > limit || e.ttl_ms.is_some_and(|t| t > limit) {
                return Err(format!("messages[{i}]: delay_ms and ttl_ms must be at most {limit}"));
            }
            Ok(BatchEntry { message: NewMessage { kind, payload, ttl_ms: e.ttl_ms }, delay_ms: e.delay_ms })
        })
        .collect()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIds {
    ids: Vec<String>,
}

/// Parses the body of a batch ack, `{"ids":["<delivery id>", ...]}`, holding 1 to `max`
/// delivery ids of the right form. The error is words for a `bad_request`.
pub fn parse_ack_batch(text: &str, max: usize) -> Result<Vec<String>, String> {
    let raw: RawIds = serde_json::from_str(text).map_err(|e| format!("malformed ack batch: {e}"))?;
    if raw.ids.is_empty() || raw.ids.len() > max {
        return Err(format!("an ack batch holds 1 to {max} ids, not {}", raw.ids.len()));
    }
    if let Some((i, _)) = raw.ids.iter().enumerate().find(|(_, id)| !crate::is_delivery_id(id)) {
        return Err(format!("ids[{i}]: {}", crate::DELIVERY_ID_RULE));
    }
    Ok(raw.ids)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFetchAcks {
    #[serde(default)]
    ack: Vec<String>,
}

/// Parses the optional body of a queue fetch, `{"ack":["<delivery id>", ...]}`: up to
/// `max` deliveries the worker is done with, acked with the fetch. An empty body (or
/// one of whitespace) acks nothing. The error is words for a `bad_request`.
pub fn parse_fetch_acks(text: &str, max: usize) -> Result<Vec<String>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let raw: RawFetchAcks = serde_json::from_str(text).map_err(|e| format!("malformed fetch body: {e}"))?;
    if raw.ack.len() > max {
        return Err(format!("a fetch acks at most {max} ids, not {}", raw.ack.len()));
    }
    if let Some((i, _)) = raw.ack.iter().enumerate().find(|(_, id)| !crate::is_delivery_id(id)) {
        return Err(format!("ack[{i}]: {}", crate::DELIVERY_ID_RULE));
    }
    Ok(raw.ack)
}

/// A frame that could not be accepted, with the `id` when it was readable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    /// The frame's id, if it had a valid one.
    pub id: Option<u64>,
    /// The error code.
    pub code: ErrorCode,
    /// Human words for the client.
    pub message: String,
}

/// Fields of a client frame as raw JSON, each checked separately.
#[derive(serde::Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    op: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    from: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    epoch: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data_b64: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    ttl_ms: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    presence: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    info: Option<&'a RawValue>,
}

/// A field that is present is `Some`, even when its value is `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses one text frame of the JSON protocol.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let raw: RawFrame<'_> = serde_json::from_str(text).map_err(|e| FrameError {
        id: None,
        code: ErrorCode::BadRequest,
        message: format!("malformed frame: {e}"),
    })?;
    let id = match raw.id.map(|v| serde_json::from_str::<u64>(v.get())) {
        None => Ok(None),
        Some(Ok(n)) if n <= MAX_ID => Ok(Some(n)),
        Some(_) => Err(bad(None, "id must be an integer from 0 to 2^53-1")),
    };
    // The topic name is checked before anything else in a request.
    if let Some(name) = raw.topic.and_then(|v| serde_json::from_str::<String>(v.get()).ok()) {
        if let Err(e) = TopicName::parse(&name) {
            let id = id.as_ref().ok().copied().flatten();
            return Err(FrameError { id, code: ErrorCode::InvalidName, message: e.to_string() });
        }
    }
    let id = id?;
    let op: String = field(id, "op", raw.op)?.ok_or_else(|| bad(id, "missing field op"))?;
    let topic = |required: bool| -> Result<Option<TopicName>, FrameError> {
        let Some(name) = field::<String>(id, "topic", raw.topic)? else {
            return if required { Err(bad(id, "missing field topic")) } else { Ok(None) };
        };
        TopicName::parse(&name).map(Some).map_err(|e| FrameError {
            id,
            code: ErrorCode::InvalidName,
            message: e.to_string(),
        })
    };
    let op = match op.as_str() {
        "subscribe" => {
            let topic = topic(true)?.ok_or_else(|| bad(id, "missing field topic"))?;
            let from = match raw.from {
                None => StartFrom::Latest,
                Some(v) => parse_from(v.get())
                    .ok_or_else(|| bad(id, "from must be \"latest\", \"earliest\" or a non-negative integer offset"))?,
            };
            let epoch = field::<String>(id, "epoch", raw.epoch)?;
            let presence = field::<bool>(id, "presence", raw.presence)?.unwrap_or(false);
            let info = raw.info.map(|v| v.get()).filter(|v| *v != "null").map(str::to_owned);
            if info.as_ref().is_some_and(|i| i.len() > herald_core::MAX_INFO_BYTES) {
                return Err(bad(id, &format!("info is over {} bytes", herald_core::MAX_INFO_BYTES)));
            }
            Op::Subscribe { topic, from, epoch, presence, info }
        }
        "presence" => Op::Presence { topic: topic(true)?.ok_or_else(|| bad(id, "missing field topic"))? },
        "unsubscribe" => Op::Unsubscribe { topic: topic(true)?.ok_or_else(|| bad(id, "missing field topic"))? },
        "publish" => {
            let topic = topic(true)?.ok_or_else(|| bad(id, "missing field topic"))?;
            let payload = match (raw.data, raw.data_b64) {
                (Some(_), Some(_)) => return Err(bad(id, "give either data or data_b64, not both")),
                (None, None) => return Err(bad(id, "missing field data or data_b64")),
                (Some(json), None) => Payload::Json(json.get().to_owned()),
                (None, Some(b64)) => {
                    let s: String = field(id, "data_b64", Some(b64))?.unwrap_or_default();
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .map_err(|e| bad(id, &format!("data_b64 is not valid base64: {e}")))?;
                    Payload::Binary(bytes)
                }
            };
            let ttl_ms = field::<u64>(id, "ttl_ms", raw.ttl_ms)?;
            Op::Publish { topic, payload, ttl_ms }
        }
        "ping" => Op::Ping,
        "auth" => Op::Auth {
            token: field::<String>(id, "token", raw.token)?
                .filter(|t| !t.is_empty())
                .ok_or_else(|| bad(id, "missing field token"))?,
        },
        other => return Err(bad(id, &format!("unknown op {other:?}"))),
    };
    Ok(ClientFrame { id, op })
}

/// Checks the `info` a client attaches to its presence entry (a query parameter, a
/// gRPC field): empty is none; else JSON text of at most
/// [`herald_core::MAX_INFO_BYTES`]. The error is words for a `bad_request`.
pub fn member_info(text: &str) -> Result<Option<std::sync::Arc<str>>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > herald_core::MAX_INFO_BYTES {
        return Err(format!("info is over {} bytes", herald_core::MAX_INFO_BYTES));
    }
    match serde_json::from_str::<&RawValue>(text) {
        Ok(_) => Ok(Some(text.into())),
        Err(e) => Err(format!("info must be JSON: {e}")),
    }
}

/// Parses a `from` value as JSON (`"latest"`, `"earliest"` or an integer).
fn parse_from(json: &str) -> Option<StartFrom> {
    if let Ok(n) = serde_json::from_str::<u64>(json) {
        return Some(StartFrom::Offset(n));
    }
    match serde_json::from_str::<String>(json).ok()?.as_str() {
        "latest" => Some(StartFrom::Latest),
        "earliest" => Some(StartFrom::Earliest),
        _ => None,
    }
}

/// Parses a `from` query parameter (`latest`, `earliest` or an integer).
pub fn parse_from_query(s: &str) -> Option<StartFrom> {
    match s {
        "latest" => Some(StartFrom::Latest),
        "earliest" => Some(StartFrom::Earliest),
        n => n.parse().ok().map(StartFrom::Offset),
    }
}

fn field<T: serde::de::DeserializeOwned>(
    id: Option<u64>,
    name: &str,
    raw: Option<&RawValue>,
) -> Result<Option<T>, FrameError> {
    raw.map(|v| serde_json::from_str(v.get()))
        .transpose()
        .map_err(|_| bad(id, &format!("field {name} has the wrong type or value")))
}

fn bad(id: Option<u64>, message: &str) -> FrameError {
    FrameError { id, code: ErrorCode::BadRequest, message: message.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (Option<u64>, ErrorCode) {
        let e = parse_client_frame(text).expect_err(text);
        (e.id, e.code)
    }

    #[test]
    fn parses_each_op() -> Result<(), FrameError> {
        let f = parse_client_frame(r#"{"op":"subscribe","id":1,"topic":"news","from":"earliest"}"#)?;
        assert_eq!(f.id, Some(1));
        assert!(matches!(f.op, Op::Subscribe { from: StartFrom::Earliest, epoch: None, .. }));
        let f = parse_client_frame(r#"{"op":"subscribe","topic":"n","from":5,"epoch":"e"}"#)?;
        assert!(matches!(f.op, Op::Subscribe { from: StartFrom::Offset(5), epoch: Some(_), .. }));
        let f = parse_client_frame(r#"{"op":"publish","topic":"n","data":{"big":12345678901234567890123}}"#)?;
        assert_eq!(
            f.op,
            Op::Publish {
                topic: TopicName::parse("n").expect("name"),
                payload: Payload::Json(r#"{"big":12345678901234567890123}"#.into()),
                ttl_ms: None
            }
        );
        let f = parse_client_frame(r#"{"op":"publish","topic":"n","data":null}"#)?;
        assert!(matches!(f.op, Op::Publish { payload: Payload::Json(ref j), .. } if j == "null"));
        let f = parse_client_frame(r#"{"op":"publish","topic":"n","data_b64":"aGk=","ttl_ms":5}"#)?;
        assert!(matches!(f.op, Op::Publish { payload: Payload::Binary(ref b), ttl_ms: Some(5), .. } if b == b"hi"));
        assert_eq!(parse_client_frame(r#"{"op":"ping","id":4}"#)?.op, Op::Ping);
        assert_eq!(parse_client_frame(r#"{"op":"auth","token":"a.b.c"}"#)?.op, Op::Auth { token: "a.b.c".into() });
        assert!(parse_client_frame(r#"{"op":"auth"}"#).is_err());
        assert!(parse_client_frame(r#"{"op":"auth","token":7}"#).is_err());
        Ok(())
    }

    #[test]
    fn refuses_bad_frames_with_their_id() {
        assert_eq!(err("not json"), (None, ErrorCode::BadRequest));
        assert_eq!(err(r#"{"op":"dance","id":2}"#), (Some(2), ErrorCode::BadRequest));
        assert_eq!(err(r#"{"op":"subscribe","id":3,"topic":"n","from":"5"}"#), (Some(3), ErrorCode::BadRequest));
        assert_eq!(
            err(r#"{"op":"publish","id":3,"topic":"n","data":1,"ttl_ms":-1}"#),
            (Some(3), ErrorCode::BadRequest)
        );
        assert_eq!(err(r#"{"op":"publish","id":3,"topic":"n","data_b64":"!!"}"#), (Some(3), ErrorCode::BadRequest));
        assert_eq!(
            err(r#"{"op":"publish","id":3,"topic":"n","data":1,"data_b64":""}"#),
            (Some(3), ErrorCode::BadRequest)
        );
        assert_eq!(err(r#"{"op":"ping","id":9007199254740992}"#), (None, ErrorCode::BadRequest));
        assert_eq!(err(r#"{"op":"ping","id":1.5}"#), (None, ErrorCode::BadRequest));
        assert_eq!(err(r#"{"op":"publish","id":7,"topic":"a..b","data_b64":"!!"}"#), (Some(7), ErrorCode::InvalidName));
        assert_eq!(err(r#"{"op":"subscribe","id":8}"#), (Some(8), ErrorCode::BadRequest));
    }

    #[test]
    fn fetch_acks_are_optional_bounded_and_checked() {
        assert_eq!(parse_fetch_acks("", 2), Ok(Vec::new()));
        assert_eq!(parse_fetch_acks(" \n", 2), Ok(Vec::new()));
        assert_eq!(parse_fetch_acks("{}", 2), Ok(Vec::new()));
        assert_eq!(parse_fetch_acks(r#"{"ack":["1-1-a","2-1-b"]}"#, 2), Ok(vec!["1-1-a".into(), "2-1-b".into()]));
        assert!(parse_fetch_acks(r#"{"ack":["1","2","3"]}"#, 2).is_err_and(|e| e.contains("at most 2")));
        assert!(parse_fetch_acks(r#"{"ack":["ok","not valid"]}"#, 2).is_err_and(|e| e.starts_with("ack[1]")));
        assert!(parse_fetch_acks(r#"{"ids":["1-1-a"]}"#, 2).is_err_and(|e| e.contains("unknown field")));
        assert!(parse_fetch_acks("ack", 2).is_err());
    }
}
