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

use bytes::{Buf, BufMut, Bytes};
use herald_core::{Kind, Message, Metrics, Outgoing, WireForm};
use prost::encoding::{DecodeContext, WireType};
use prost::DecodeError;

use crate::pb;

/// Protobuf bytes of one `herald.v1.SubscribeEvent`, written to the wire as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedEvent(Bytes);

/// Field numbers of `SubscribeEvent`'s oneof.
const SUBSCRIBED: u32 = 1;
const MESSAGE: u32 = 2;
/// `keepalive` (field 3, length-delimited) holding an empty `Keepalive`.
const KEEPALIVE: &[u8] = &[3 << 3 | 2, 0];

impl EncodedEvent {
    /// The stream's first event.
    pub fn subscribed(subscribed: &pb::Subscribed) -> Self {
        let mut buf = Vec::with_capacity(prost::Message::encoded_len(subscribed) + 8);
        prost::encoding::message::encode(SUBSCRIBED, subscribed, &mut buf);
        Self(buf.into())
    }

    /// The event sent on an idle stream.
    pub fn keepalive() -> Self {
        Self(Bytes::from_static(KEEPALIVE))
    }

    /// `msg` as a `SubscribeEvent`, serialised on first use and shared afterwards.
    pub fn message(metrics: &Metrics, msg: &Outgoing) -> Self {
        msg.encoded(WireForm::Grpc, |m| {
            metrics.encoded(WireForm::Grpc);
            let event = topic_message(m);
            let mut buf = Vec::with_capacity(prost::Message::encoded_len(&event) + 16);
            prost::encoding::message::encode(MESSAGE, &event, &mut buf);
            Self(buf.into())
        })
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
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
        buf.put_slice(&self.0);
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
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
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
        assert_eq!(framed, first.as_bytes().to_vec(), "written as is");

        // Decode with a mirror of the client-side generated type.
        #[derive(Clone, PartialEq, prost::Message)]
        struct Event {
            #[prost(message, optional, tag = "1")]
            subscribed: Option<pb::Subscribed>,
            #[prost(message, optional, tag = "2")]
            message: Option<pb::TopicMessage>,
            #[prost(message, optional, tag = "3")]
            keepalive: Option<pb::Keepalive>,
        }
        let event = Event::decode(first.as_bytes().clone())?;
        let m = event.message.ok_or("no message")?;
        assert_eq!((m.topic.as_str(), m.offset, m.ts, &m.data[..]), ("news", 7, 1234, &b"{\"a\":1}"[..]));
        assert_eq!(m.kind, pb::Kind::Json as i32);

        let sub = pb::Subscribed { topic: "news".into(), epoch: "e".into(), next: 8, recovered: true };
        let event = Event::decode(EncodedEvent::subscribed(&sub).as_bytes().clone())?;
        assert_eq!(event.subscribed, Some(sub));
        let event = Event::decode(EncodedEvent::keepalive().as_bytes().clone())?;
        assert_eq!(event.keepalive, Some(pb::Keepalive {}));
        Ok(())
    }
}
