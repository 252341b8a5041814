//! Messages: what a publisher hands in ([`NewMessage`]), what the store hands back with
//! its offset and timestamp ([`Message`]), and a message on its way out ([`Outgoing`]):
//! the cache of encoded wire forms that makes fan-out cost one encoding per form, not
//! one per subscriber, shared by the subscribers of one fan-out and freed with the last
//! of them, so a retained message keeps no encoded copy of itself.
//!
//! The core never looks inside a payload; front doors validate JSON and UTF-8 before
//! building a message of that kind.

use std::any::Any;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::name::TopicName;

/// How a payload was published, which decides how it is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Valid JSON text, delivered as the exact text received.
    Json,
    /// UTF-8 text.
    Text,
    /// Arbitrary bytes.
    Binary,
}

impl Kind {
    /// The lowercase word used in docs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Json => "json",
            Kind::Text => "text",
            Kind::Binary => "binary",
        }
    }
}

/// A message as a publisher submits it, before the store assigns offset and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// The payload kind. The front door guarantees `Json` is valid JSON and `Text` is UTF-8.
    pub kind: Kind,
    /// The payload bytes.
    pub payload: Bytes,
    /// After this many milliseconds the message is no longer returned by fetch or replay.
    pub ttl_ms: Option<u64>,
}

impl NewMessage {
    /// A message of `kind` with no TTL.
    pub fn new(kind: Kind, payload: impl Into<Bytes>) -> Self {
        Self { kind, payload: payload.into(), ttl_ms: None }
    }
}

/// The wire forms a message may be encoded into; each is encoded at most once per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireForm {
    /// The WebSocket JSON protocol's `message` frame.
    WsJson = 0,
    /// The raw WebSocket frame (the bare payload).
    WsRaw = 1,
    /// A Server-Sent Events event.
    Sse = 2,
    /// A gRPC stream message.
    Grpc = 3,
    /// The JSON `message` frame for packed connections (line breaks as spaces): the
    /// `WsJson` frame itself unless its payload has line breaks.
    WsPacked = 4,
}

/// How many wire forms there are.
pub const FORMS: usize = 5;

/// A stored message: payload plus the offset and timestamp the store assigned.
pub struct Message {
    /// The topic it was published to.
    pub topic: TopicName,
    /// Position in the topic's history, from 1.
    pub offset: u64,
    /// Acceptance time, milliseconds since the Unix epoch; never decreasing along offsets.
    pub ts: u64,
    /// The payload kind.
    pub kind: Kind,
    /// The payload.
    pub payload: Bytes,
    /// Milliseconds since the Unix epoch after which fetch and replay skip it.
    pub expires_at: Option<u64>,
}

impl Message {
    /// Builds a stored message. Stores call this when they assign `offset` and `ts`.
    pub fn new(topic: TopicName, offset: u64, ts: u64, new: NewMessage) -> Self {
        Self {
            topic,
            offset,
            ts,
            kind: new.kind,
            expires_at: new.ttl_ms.map(|ttl| ts.saturating_add(ttl)),
            payload: new.payload,
        }
    }

    /// Whether the TTL has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at.is_some_and(|at| now_ms >= at)
    }

    /// Bytes this message is expected to take in an outbound buffer, for accounting.
    /// Binary payloads grow by a third when base64 encoded; 96 covers the envelope.
    pub fn size_hint(&self) -> usize {
        let payload = match self.kind {
            Kind::Binary => self.payload.len().div_ceil(3) * 4,
            _ => self.payload.len(),
        };
        payload + 96
    }
}

/// A message being fanned out: the stored message plus the wire forms it has been
/// encoded in so far. Cloned (one reference count) into every subscriber's outbound
/// queue; the encoded forms live as long as some queue still holds it, not as long as
/// the history retains the message.
#[derive(Clone)]
pub struct Outgoing(Arc<Encodings>);

type Form = OnceLock<Box<dyn Any + Send + Sync>>;

struct Encodings {
    message: Arc<Message>,
    forms: [Form; FORMS],
    /// When a live fan-out started (none for a replayed message): the fan-out latency
    /// histogram counts from here.
    since: Option<Instant>,
}

impl Outgoing {
    /// Starts the delivery of `message` (a replayed one), with nothing encoded yet.
    pub fn new(message: Arc<Message>) -> Self {
        Self(Arc::new(Encodings { message, forms: Default::default(), since: None }))
    }

    /// Starts the live fan-out of `message`, timed from now.
    pub fn live(message: Arc<Message>) -> Self {
        Self(Arc::new(Encodings { message, forms: Default::default(), since: Some(Instant::now()) }))
    }

    /// When its live fan-out started; `None` for a replayed message.
    pub fn since(&self) -> Option<Instant> {
        self.0.since
    }

    /// The stored message.
    pub fn message(&self) -> &Arc<Message> {
        &self.0.message
    }

    /// The message in wire form `form`, encoding it on first use and sharing the result
    /// with every later caller. `T` is the front door's frame type (cheap to clone: it
    /// wraps `Bytes`); `encode` runs at most once per fan-out and form.
    pub fn encoded<T>(&self, form: WireForm, encode: impl FnOnce(&Message) -> T) -> T
    where
        T: Clone + Send + Sync + 'static,
    {
        let slot = &self.0.forms[form as usize];
        let cached = slot.get_or_init(|| Box::new(encode(&self.0.message)));
        match cached.downcast_ref::<T>() {
            Some(frame) => frame.clone(),
            // Two front doors asked for one form with different frame types: a wiring
            // bug, not a client's doing.
            None => unreachable_form(form),
        }
    }
}

impl From<Arc<Message>> for Outgoing {
    fn from(message: Arc<Message>) -> Self {
        Self::new(message)
    }
}

impl std::ops::Deref for Outgoing {
    type Target = Message;

    fn deref(&self) -> &Message {
        &self.0.message
    }
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.message.fmt(f)
    }
}

#[cold]
fn unreachable_form(form: WireForm) -> ! {
    panic!("wire form {form:?} cached with a different frame type")
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic)
            .field("offset", &self.offset)
            .field("ts", &self.ts)
            .field("kind", &self.kind)
            .field("len", &self.payload.len())
            .finish()
    }
}

/// Source of wall-clock time in milliseconds; injectable so tests control time.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when told to; for tests.
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    /// A clock reading `ms`.
    pub fn new(ms: u64) -> Self {
        Self(ms.into())
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame that holds a count of the frames alive.
    #[derive(Clone)]
    struct Frame(#[allow(dead_code, reason = "held for its count")] Arc<()>);

    #[test]
    fn encoded_forms_live_as_long_as_the_fan_out_not_the_message() -> Result<(), crate::NameError> {
        let stored = Arc::new(Message::new(TopicName::parse("t")?, 1, 0, NewMessage::new(Kind::Text, "x")));
        let alive = Arc::new(());
        let mut encodes = 0;
        let fan_out = Outgoing::new(stored.clone());
        let queued = fan_out.clone();
        let a = fan_out.encoded(WireForm::WsJson, |_| {
            encodes += 1;
            Frame(alive.clone())
        });
        let b = queued.encoded(WireForm::WsJson, |_| {
            encodes += 1;
            Frame(alive.clone())
        });
        assert_eq!(encodes, 1, "encoded once per fan-out");
        drop((a, b, fan_out));
        assert_eq!(Arc::strong_count(&alive), 2, "cached while a queue still holds the fan-out");
        drop(queued);
        assert_eq!(Arc::strong_count(&alive), 1, "freed with the last holder; the stored message keeps none");
        let again = Outgoing::new(stored);
        again.encoded(WireForm::WsJson, |_| {
            encodes += 1;
            Frame(alive.clone())
        });
        assert_eq!(encodes, 2, "a later fan-out of the stored message encodes afresh");
        Ok(())
    }
}
