//! MQTT 3.1.1 over WebSocket, the little of it `idle` and `mqtt-ws-fanout` need: the
//! packets a client sends (CONNECT, SUBSCRIBE, PUBLISH QoS 0, DISCONNECT), a reader
//! that cuts the received byte stream into packets (a WebSocket frame may hold several
//! packets and a packet may span frames), and the CONNECT/CONNACK and
//! SUBSCRIBE/SUBACK exchanges. MQTT over WebSocket uses binary frames and the
//! subprotocol `mqtt`.

use anyhow::{bail, ensure, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Keep-alive in the CONNECT, in seconds: the largest there is, so that nobody pings
/// during a run. Not 0 ("no keep-alive"): rumqttd refuses a CONNECT with 0.
pub const KEEP_ALIVE: u16 = u16::MAX;

/// Packet types (the high nibble of a packet's first byte).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const SUBACK: u8 = 9;

/// The WebSocket handshake request for `url`, asking for the subprotocol `mqtt`.
pub fn request(url: &str) -> anyhow::Result<Request> {
    let mut request = url.into_client_request().with_context(|| format!("bad WebSocket URL {url}"))?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    Ok(request)
}

/// A packet: the first byte (type and flags), then the remaining length (7 bits a byte,
/// least significant first, at most 4 bytes), then `body`.
pub fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(body.len() + 5);
    packet.push(first_byte);
    let mut length = body.len();
    loop {
        let byte = (length % 128) as u8;
        length /= 128;
        packet.push(if length > 0 { byte | 0x80 } else { byte });
        if length == 0 {
            break;
        }
    }
    packet.extend_from_slice(body);
    packet
}

/// A UTF-8 string field: its length in two bytes, then its bytes.
fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// CONNECT, protocol level 4 (3.1.1), clean session, no will, no user name or password.
pub fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4);
    body.push(0x02);
    body.extend_from_slice(&KEEP_ALIVE.to_be_bytes());
    string(&mut body, client_id);
    packet(0x10, &body)
}

/// SUBSCRIBE to one topic filter at QoS 0.
pub fn subscribe_packet(packet_id: u16, topic: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&packet_id.to_be_bytes());
    string(&mut body, topic);
    body.push(0);
    packet(0x82, &body)
}

/// PUBLISH at QoS 0, not retained (so no packet identifier).
pub fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(2 + topic.len() + payload.len());
    string(&mut body, topic);
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

/// The remaining length of a QoS 0 PUBLISH of `payload` bytes to `topic`.
pub fn publish_body_len(topic: &str, payload: usize) -> usize {
    2 + topic.len() + payload
}

pub fn disconnect_packet() -> Vec<u8> {
    packet(0xe0, &[])
}

/// Cuts received bytes into packets. Bytes are appended with `extend`; `next` returns
/// the next whole packet, if there is one, without copying it.
#[derive(Default)]
pub struct Reader {
    buffer: Vec<u8>,
    /// Where the next packet starts in `buffer`; what is before it was consumed.
    start: usize,
}

/// A packet read: its first byte (type in the high nibble, flags in the low one) and
/// its body (variable header and payload).
pub struct Packet<'a> {
    pub first_byte: u8,
    pub body: &'a [u8],
}

impl Packet<'_> {
    pub fn kind(&self) -> u8 {
        self.first_byte >> 4
    }
}

impl Reader {
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        } else if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole packet, or None until more bytes came; an error if the remaining
    /// length is malformed (more than 4 bytes).
    pub fn next(&mut self) -> anyhow::Result<Option<Packet<'_>>> {
        let rest = &self.buffer[self.start..];
        if rest.len() < 2 {
            return Ok(None);
        }
        let mut length = 0usize;
        let mut header = None;
        for (k, byte) in rest.iter().enumerate().skip(1).take(4) {
            length |= ((byte & 0x7f) as usize) << (7 * (k - 1));
            if byte & 0x80 == 0 {
                header = Some(k + 1);
                break;
            }
        }
        let header = match header {
            Some(header) => header,
            None if rest.len() >= 5 => bail!("malformed MQTT remaining length (more than 4 bytes)"),
            None => return Ok(None),
        };
        if rest.len() < header + length {
            return Ok(None);
        }
        let first_byte = rest[0];
        let body = self.start + header..self.start + header + length;
        self.start = body.end;
        Ok(Some(Packet { first_byte, body: &self.buffer[body] }))
    }
}

/// The next data frame's bytes; control frames are skipped (tungstenite answers pings
/// itself), a text frame (MQTT over WebSocket is binary only), a close or the end of
/// the stream is an error.
pub async fn next_frame<S>(ws: &mut WebSocketStream<S>) -> anyhow::Result<bytes::Bytes>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(b),
            Some(Ok(Message::Text(_))) => bail!("broker sent a text frame (MQTT over WebSocket is binary)"),
            Some(Ok(Message::Close(frame))) => bail!("broker closed the WebSocket: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("WebSocket read failed"),
            None => bail!("broker closed the connection"),
        }
    }
}

/// Reads until the next packet of type `kind` and returns its body; packets of other
/// types before it are skipped.
async fn expect<S>(ws: &mut WebSocketStream<S>, reader: &mut Reader, kind: u8, name: &str) -> anyhow::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        while let Some(packet) = reader.next()? {
            if packet.kind() == kind {
                return Ok(packet.body.to_vec());
            }
        }
        let frame = next_frame(ws).await.with_context(|| format!("waiting for {name}"))?;
        reader.extend(&frame);
    }
}

/// CONNECT with `client_id`, then waits for a CONNACK accepting it.
pub async fn connect<S>(ws: &mut WebSocketStream<S>, reader: &mut Reader, client_id: &str) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::binary(connect_packet(client_id))).await.context("cannot send CONNECT")?;
    let body = expect(ws, reader, CONNACK, "CONNACK").await?;
    ensure!(body.len() >= 2, "short CONNACK");
    ensure!(body[1] == 0, "broker refused the connection: CONNACK return code {}", body[1]);
    Ok(())
}

/// SUBSCRIBE to `topic` at QoS 0, then waits for a SUBACK granting it.
pub async fn subscribe<S>(ws: &mut WebSocketStream<S>, reader: &mut Reader, topic: &str) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::binary(subscribe_packet(1, topic))).await.context("cannot send SUBSCRIBE")?;
    let body = expect(ws, reader, SUBACK, "SUBACK").await?;
    ensure!(body.len() >= 3, "short SUBACK");
    ensure!(body[2] != 0x80, "broker refused the subscription (SUBACK 0x80)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_cuts_packets_across_and_within_frames() {
        let big = publish_packet("t", &[b'x'; 300]); // remaining length in 2 bytes
        let small = publish_packet("t", b"hi");
        let mut stream = Vec::new();
        stream.extend_from_slice(&small);
        stream.extend_from_slice(&big);
        stream.extend_from_slice(&small);
        let mut reader = Reader::default();
        let mut bodies = Vec::new();
        // One byte at a time, then everything at once.
        for chunk in stream.chunks(1) {
            reader.extend(chunk);
            while let Some(p) = reader.next().unwrap() {
                assert_eq!(p.kind(), PUBLISH);
                bodies.push(p.body.len());
            }
        }
        reader.extend(&stream);
        while let Some(p) = reader.next().unwrap() {
            bodies.push(p.body.len());
        }
        let (s, b) = (publish_body_len("t", 2), publish_body_len("t", 300));
        assert_eq!(bodies, vec![s, b, s, s, b, s]);
    }

    #[test]
    fn reader_rejects_a_five_byte_length() {
        let mut reader = Reader::default();
        reader.extend(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(reader.next().is_err());
    }
}
