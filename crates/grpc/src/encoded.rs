//! `EncodedEvent`: a `SubscribeEvent` already serialised to protobuf, so fan-out to many
//! gRPC subscribers serialises each message once.
//!
//! The build script maps the proto's `herald.v1.SubscribeEvent` to this type for the
//! server (prost-build `extern_path`); clients use the ordinary generated type, since
//! the bytes on the wire are the same. Its [`prost::Message`] impl writes the stored
//! bytes as they are and reports their length, so tonic's codec frames it like any
//! message. The bytes of a topic message are built once per message through
//! [`Outgoing::encoded`] with [`WireForm::Grpc`] (counted by `Metrics::encoded`) and
//! shared as `Bytes` by every subscriber; the codec then copies them into the HTTP/2
//! frame buffer, as a WebSocket writer copies a shared frame into its socket buffer.
//!
//! A packed event (`messages`, for a subscriber that asked for `pack`) is written from
//! the same shared bytes: a `message` event is field 2 of `SubscribeEvent` holding a
//! `TopicMessage`, and an element of `TopicMessages` is field 1 holding the same
//! `TopicMessage`, so each element is the shared bytes with their first byte (the
//! field's tag) swapped, and nothing is copied before the codec's one copy.

use bytes::{Buf, BufMut, Bytes};
use herald_core::{Kind, Message, Metrics, Outgoing, WireForm};
use prost::encoding::{DecodeContext, WireType};
use prost::DecodeError;

use crate::pb;

/// Protobuf bytes of one `herald.v1.SubscribeEvent`, written to the wire as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedEvent(Repr);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Repr {
    /// A whole event.
    Whole(Bytes),
    /// A `messages` event: the shared `message` events of its elements, and their
    /// total length.
    Packed(Vec<Bytes>, usize),
}

impl Default for EncodedEvent {
    fn default() -> Self {
        Self(Repr::Whole(Bytes::new()))
    }
}

/// Field numbers of `SubscribeEvent`'s oneof.
const SUBSCRIBED: u32 = 1;
const MESSAGE: u32 = 2;
const PRESENCE: u32 = 5;
/// `messages` (field 4, length-delimited): the tag byte of a packed event.
const MESSAGES_TAG: u8 = 4 << 3 | 2;
/// `TopicMessages.messages` (field 1, length-delimited): an element's tag byte, in place
/// of `message`'s (field 2), which is one byte too.
const ELEMENT_TAG: u8 = 1 << 3 | 2;
const MESSAGE_TAG: u8 = (MESSAGE as u8) << 3 | 2;
/// A packed event grows to about this many bytes; a larger message goes alone.
pub(crate) const PACK_LIMIT: usize = 64 << 10;
/// `keepalive` (field 3, length-delimited) holding an empty `Keepalive`.
const KEEPALIVE: &[u8] = &[3 << 3 | 2, 0];

impl EncodedEvent {
    /// The stream's first event.
    pub fn subscribed(subscribed: &pb::Subscribed) -> Self {
        let mut buf = Vec::with_capacity(prost::Message::encoded_len(subscribed) + 8);
        prost::encoding::message::encode(SUBSCRIBED, subscribed, &mut buf);
        Self(Repr::Whole(buf.into()))
    }

    /// `event` as a `SubscribeEvent` with its `presence` case.
    pub fn presence(event: &pb::PresenceEvent) -> Self {
        let mut buf = Vec::with_capacity(prost::Message::encoded_len(event) + 8);
        prost::encoding::message::encode(PRESENCE, event, &mut buf);
        Self(Repr::Whole(buf.into()))
    }

    /// The event sent on an idle stream.
    pub fn keepalive() -> Self {
        Self(Repr::Whole(Bytes::from_static(KEEPALIVE)))
    }

    /// One `messages` event of `events`, which must all be [`EncodedEvent::message`]s;
    /// a lone one stays as it is.
    pub fn packed(mut events: Vec<EncodedEvent>) -> Self {
        if events.len() == 1 {
            return events.remove(0);
        }
        let parts: Vec<Bytes> = events
            .into_iter()
            .filter_map(|e| match e.0 {
                Repr::Whole(b) if b.first() == Some(&MESSAGE_TAG) => Some(b),
                // A caller bug (the writer packs only message events): caught in tests,
                // and in a release build the event is left out rather than mis-framed.
                _ => {
                    debug_assert!(false, "EncodedEvent::packed given an event that is not a message");
                    None
                }
            })
            .collect();
        let len = parts.iter().map(Bytes::len).sum();
        Self(Repr::Packed(parts, len))
    }

    /// Its encoded length, as the codec will write it.
    pub fn len(&self) -> usize {
        prost::Message::encoded_len(self)
    }

    /// Whether it encodes to nothing (never for an event the server sends).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `msg` as a `SubscribeEvent`, serialised on first use and shared afterwards.
    pub fn message(metrics: &Metrics, msg: &Outgoing) -> Self {
        msg.encoded(WireForm::Grpc, |m| {
            metrics.encoded(WireForm::Grpc);
            let event = topic_message(m);
            let mut buf = Vec::with_capacity(prost::Message::encoded_len(&event) + 16);
            prost::encoding::message::encode(MESSAGE, &event, &mut buf);
            Self(Repr::Whole(buf.into()))
        })
    }

    /// The encoded bytes, in one piece.
    pub fn to_bytes(&self) -> Bytes {
        match &self.0 {
            Repr::Whole(b) => b.clone(),
            Repr::Packed(..) => {
                let mut buf = Vec::with_capacity(self.len());
                prost::Message::encode_raw(self, &mut buf);
                buf.into()
            }
        }
    }
}

/// A stored message as the proto's `TopicMessage` (the payload is shared, not copied).
pub(crate) fn topic_message(m: &Message) -> pb::TopicMessage {
    pb::TopicMessage {
        topic: m.topic.as_str().to_owned(),
        offset: m.offset,
        ts: m.ts,
        kind: pb_kind(m.kind) as i32,
        data: m.payload.clone(),
        content_type: content_type(m.kind).to_owned(),
    }
}

/// The proto enum of a kind.
pub(crate) fn pb_kind(kind: Kind) -> pb::Kind {
    match kind {
        Kind::Json => pb::Kind::Json,
        Kind::Text => pb::Kind::Text,
        Kind::Binary => pb::Kind::Binary,
    }
}

/// The media type a kind is delivered as.
pub(crate) fn content_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Json => "application/json",
        Kind::Text => "text/plain; charset=utf-8",
        Kind::Binary => "application/octet-stream",
    }
}

impl prost::Message for EncodedEvent {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.0 {
            Repr::Whole(b) => buf.put_slice(b),
            Repr::Packed(parts, len) => {
                buf.put_u8(MESSAGES_TAG);
                prost::encoding::encode_varint(*len as u64, buf);
                for part in parts {
                    buf.put_u8(ELEMENT_TAG);
                    buf.put_slice(&part[1..]);
                }
            }
        }
    }

    // The server never decodes its own stream items; skip anything, keep nothing.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        match &self.0 {
            Repr::Whole(b) => b.len(),
            Repr::Packed(_, len) => 1 + prost::encoding::encoded_len_varint(*len as u64) + len,
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{NewMessage, TopicName};
    use prost::Message as _;

    /// The same bytes the generated type would produce, decodable as the generated type.
    #[test]
    fn matches_the_generated_encoding() -> Result<(), Box<dyn std::error::Error>> {
        let topic = TopicName::parse("news")?;
        let msg = Message::new(topic, 7, 1234, NewMessage::new(Kind::Json, &b"{\"a\":1}"[..]));
        let msg = Outgoing::new(std::sync::Arc::new(msg));
        let metrics = Metrics::default();
        let first = EncodedEvent::message(&metrics, &msg);
        let again = EncodedEvent::message(&metrics, &msg);
        assert_eq!(metrics.encodes_of(WireForm::Grpc), 1, "encoded once");
        assert_eq!(first, again);
        let mut framed = Vec::new();
        first.encode(&mut framed)?;
        assert_eq!(framed, first.to_bytes().to_vec(), "written as is");

        // Decode with a mirror of the client-side generated type.
        #[derive(Clone, PartialEq, prost::Message)]
        struct Event {
            #[prost(message, optional, tag = "1")]
            subscribed: Option<pb::Subscribed>,
            #[prost(message, optional, tag = "2")]
            message: Option<pb::TopicMessage>,
            #[prost(message, optional, tag = "3")]
            keepalive: Option<pb::Keepalive>,
            #[prost(message, optional, tag = "4")]
            messages: Option<pb::TopicMessages>,
        }
        let event = Event::decode(first.to_bytes())?;
        let m = event.message.ok_or("no message")?;
        assert_eq!((m.topic.as_str(), m.offset, m.ts, &m.data[..]), ("news", 7, 1234, &b"{\"a\":1}"[..]));
        assert_eq!(m.kind, pb::Kind::Json as i32);

        let sub = pb::Subscribed { topic: "news".into(), epoch: "e".into(), next: 8, recovered: true };
        let event = Event::decode(EncodedEvent::subscribed(&sub).to_bytes())?;
        assert_eq!(event.subscribed, Some(sub));
        let event = Event::decode(EncodedEvent::keepalive().to_bytes())?;
        assert_eq!(event.keepalive, Some(pb::Keepalive {}));

        // Packed: the same messages, in order, as the generated type decodes them; a
        // payload big enough for a two-byte length prefix included.
        let events: Vec<EncodedEvent> = [&b"{\"a\":1}"[..], &[7u8; 300][..], b"x"]
            .iter()
            .enumerate()
            .map(|(i, payload)| {
                let m =
                    Message::new(TopicName::parse("news")?, 8 + i as u64, 1, NewMessage::new(Kind::Binary, *payload));
                Ok(EncodedEvent::message(&metrics, &Outgoing::new(std::sync::Arc::new(m))))
            })
            .collect::<Result<_, Box<dyn std::error::Error>>>()?;
        let packed = EncodedEvent::packed(events.clone());
        let mut framed = Vec::new();
        packed.encode(&mut framed)?;
        assert_eq!(framed.len(), packed.len());
        let event = Event::decode(&framed[..])?;
        let got = event.messages.ok_or("no messages")?.messages;
        let want: Vec<pb::TopicMessage> = events
            .iter()
            .map(|e| Event::decode(e.to_bytes())?.message.ok_or("no message".into()))
            .collect::<Result<_, Box<dyn std::error::Error>>>()?;
        assert_eq!(got, want);
        assert_eq!(got.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![8, 9, 10]);
        assert_eq!(EncodedEvent::packed(vec![events[0].clone()]), events[0], "a lone message stays a `message`");
        Ok(())
    }
}
