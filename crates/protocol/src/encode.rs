//! Encoding of server frames. Message frames are built once per message and wire form
//! (the caller caches them in the message); replies are small and built per request.

use std::fmt::Write;

use base64::Engine;
use herald_core::{Kind, Member, Message, PresenceEvent, PresenceKind, PresenceList};

use crate::code::ErrorCode;

/// Appends `s` as a JSON string literal. Runs of characters that need no escaping are
/// copied in one go, so plain text costs a scan and a copy.
pub fn push_json_str(buf: &mut String, s: &str) {
    buf.reserve(s.len() + 2);
    buf.push('"');
    let bytes = s.as_bytes();
    // Most strings need no escape: one pass without branches (vectorised) tells.
    if !bytes.iter().fold(false, |any, &b| any | (b < 0x20) | (b == b'"') | (b == b'\\')) {
        buf.push_str(s);
        buf.push('"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        // `i` is at an ASCII byte, so both slices fall on char boundaries.
        buf.push_str(&s[start..i]);
        if escaped.is_empty() {
            let _ = write!(buf, "\\u{:04x}", b);
        } else {
            buf.push_str(escaped);
        }
        start = i + 1;
    }
    buf.push_str(&s[start..]);
    buf.push('"');
}

/// Appends the payload as `"data":...` or `"data_b64":"..."`, per the kind table.
pub fn push_payload(buf: &mut String, msg: &Message) {
    push_kind_payload(buf, msg.kind, &msg.payload);
}

/// [`push_payload`] for a payload and kind outside a topic message (queues).
pub fn push_kind_payload(buf: &mut String, kind: Kind, payload: &[u8]) {
    match kind {
        Kind::Json => {
            buf.push_str("\"data\":");
            // The front door checked it is JSON when it was published.
            buf.push_str(std::str::from_utf8(payload).unwrap_or("null"));
        }
        Kind::Text => {
            buf.push_str("\"data\":");
            push_json_str(buf, std::str::from_utf8(payload).unwrap_or_default());
        }
        Kind::Binary => {
            buf.push_str("\"data_b64\":\"");
            base64::engine::general_purpose::STANDARD.encode_string(payload, buf);
            buf.push('"');
        }
    }
}

/// The JSON view of a message without braces: `"topic":..,"offset":..,"ts":..,"data":..`.
fn push_view(buf: &mut String, msg: &Message) {
    buf.push_str("\"topic\":");
    push_json_str(buf, msg.topic.as_str());
    let _ = write!(buf, ",\"offset\":{},\"ts\":{},", msg.offset, msg.ts);
    push_payload(buf, msg);
}

fn with_capacity(msg: &Message) -> String {
    String::with_capacity(msg.size_hint() + msg.topic.as_str().len())
}

/// `{"type":"message","topic":..,"offset":..,"ts":..,"data"|"data_b64":..}`
pub fn message_frame(msg: &Message) -> String {
    let mut buf = with_capacity(msg);
    buf.push_str("{\"type\":\"message\",");
    push_view(&mut buf, msg);
    buf.push('}');
    buf
}

/// One SSE event: `id: <offset>` and the JSON view as `data:` lines.
pub fn sse_event(msg: &Message) -> String {
    let mut view = with_capacity(msg);
    view.push('{');
    push_view(&mut view, msg);
    view.push('}');
    let mut buf = String::with_capacity(view.len() + 32);
    let _ = writeln!(buf, "id: {}", msg.offset);
    // JSON text as received may span lines; SSE joins consecutive data lines with \n.
    for line in view.split('\n') {
        buf.push_str("data: ");
        buf.push_str(line.strip_suffix('\r').unwrap_or(line));
        buf.push('\n');
    }
    buf.push('\n');
    buf
}

/// A message as listed by HTTP fetch: `{"offset":..,"ts":..,"data"|"data_b64":..}`.
pub fn push_fetched(buf: &mut String, msg: &Message) {
    let _ = write!(buf, "{{\"offset\":{},\"ts\":{},", msg.offset, msg.ts);
    push_payload(buf, msg);
    buf.push('}');
}

fn push_id(buf: &mut String, id: Option<u64>) {
    if let Some(id) = id {
        let _ = write!(buf, ",\"id\":{id}");
    }
}

/// `{"type":"subscribed",...}`
pub fn subscribed(id: Option<u64>, topic: &str, epoch: &str, next: u64, recovered: bool) -> String {
    let mut buf = String::from("{\"type\":\"subscribed\"");
    push_id(&mut buf, id);
    buf.push_str(",\"topic\":");
    push_json_str(&mut buf, topic);
    buf.push_str(",\"epoch\":");
    push_json_str(&mut buf, epoch);
    let _ = write!(buf, ",\"next\":{next},\"recovered\":{recovered}}}");
    buf
}

/// `{"type":"unsubscribed",...}`
pub fn unsubscribed(id: Option<u64>, topic: &str) -> String {
    let mut buf = String::from("{\"type\":\"unsubscribed\"");
    push_id(&mut buf, id);
    buf.push_str(",\"topic\":");
    push_json_str(&mut buf, topic);
    buf.push('}');
    buf
}

/// `{"type":"published",...}`
pub fn published(id: Option<u64>, topic: &str, offset: u64, ts: u64) -> String {
    let mut buf = String::from("{\"type\":\"published\"");
    push_id(&mut buf, id);
    buf.push_str(",\"topic\":");
    push_json_str(&mut buf, topic);
    let _ = write!(buf, ",\"offset\":{offset},\"ts\":{ts}}}");
    buf
}

/// `{"type":"pong","id":..}`
pub fn pong(id: Option<u64>) -> String {
    let mut buf = String::from("{\"type\":\"pong\"");
    push_id(&mut buf, id);
    buf.push('}');
    buf
}

/// `{"type":"authenticated","id":..,"user":..,"expires":..}` (`expires`: the token's
/// `exp`, seconds since the Unix epoch).
pub fn authenticated(id: Option<u64>, user: &str, expires: Option<u64>) -> String {
    let mut buf = String::from("{\"type\":\"authenticated\"");
    push_id(&mut buf, id);
    buf.push_str(",\"user\":");
    push_json_str(&mut buf, user);
    if let Some(exp) = expires {
        let _ = write!(buf, ",\"expires\":{exp}");
    }
    buf.push('}');
    buf
}

/// `{"type":"error","id":..,"code":..,"message":..}`
pub fn error(id: Option<u64>, code: ErrorCode, message: &str) -> String {
    let mut buf = String::from("{\"type\":\"error\"");
    push_id(&mut buf, id);
    let _ = write!(buf, ",\"code\":\"{}\",\"message\":", code.as_str());
    push_json_str(&mut buf, message);
    buf.push('}');
    buf
}

/// A member as JSON: `{"conn":..,"door":..,"role":..,"user":..,"info":..}`.
pub fn push_member(buf: &mut String, m: &Member) {
    let _ = write!(
        buf,
        "{{\"conn\":{},\"door\":\"{}\",\"role\":\"{}\",\"user\":",
        m.conn.id,
        m.conn.door.label(),
        m.role.label()
    );
    match m.conn.user() {
        Some(user) => push_json_str(buf, user),
        None => buf.push_str("null"),
    }
    buf.push_str(",\"info\":");
    buf.push_str(m.info.as_deref().unwrap_or("null"));
    buf.push('}');
}

/// The event's name: `join`, `leave` or `presence_lost`.
pub fn presence_name(event: &PresenceEvent) -> &'static str {
    match event.kind {
        PresenceKind::Join => "join",
        PresenceKind::Leave => "leave",
        PresenceKind::Lost { .. } => "presence_lost",
    }
}

/// The fields of a presence event after its `type`: `"topic":..,"member":{..}` or
/// `"topic":..,"dropped":..,"subscribers":..,"publishers":..`, without braces.
fn push_presence_fields(buf: &mut String, event: &PresenceEvent) {
    buf.push_str("\"topic\":");
    push_json_str(buf, event.topic.as_str());
    match (event.kind, &event.member) {
        (PresenceKind::Lost { dropped, subscribers, publishers }, _) => {
            let _ = write!(buf, ",\"dropped\":{dropped},\"subscribers\":{subscribers},\"publishers\":{publishers}");
        }
        (_, Some(member)) => {
            buf.push_str(",\"member\":");
            push_member(buf, member);
        }
        (_, None) => {}
    }
}

/// A presence event as a JSON protocol frame: `{"type":"join","topic":..,"member":{..}}`.
pub fn presence_frame(event: &PresenceEvent) -> String {
    let mut buf = format!("{{\"type\":\"{}\",", presence_name(event));
    push_presence_fields(&mut buf, event);
    buf.push('}');
    buf
}

/// A presence event as a named SSE event: `event: join` and the frame without `type`.
pub fn presence_sse_event(event: &PresenceEvent) -> String {
    let mut buf = format!("event: {}\ndata: {{", presence_name(event));
    push_presence_fields(&mut buf, event);
    buf.push_str("}\n\n");
    buf
}

/// The fields of a presence list: `"subscribers":..,"publishers":..,"members":[..]`.
pub fn push_presence_list(buf: &mut String, list: &PresenceList) {
    let _ = write!(buf, "\"subscribers\":{},\"publishers\":{},\"members\":[", list.subscribers, list.publishers);
    for (i, m) in list.members.iter().enumerate() {
        if i > 0 {
            buf.push(',');
        }
        push_member(buf, m);
    }
    buf.push(']');
}

/// `{"type":"presence","id":..,"topic":..,"subscribers":..,"publishers":..,"members":[..],"more":..}`
pub fn presence_reply(id: Option<u64>, topic: &str, list: &PresenceList) -> String {
    let mut buf = String::from("{\"type\":\"presence\"");
    push_id(&mut buf, id);
    buf.push_str(",\"topic\":");
    push_json_str(&mut buf, topic);
    buf.push(',');
    push_presence_list(&mut buf, list);
    let _ = write!(buf, ",\"more\":{}}}", list.more);
    buf
}

/// The HTTP error body: `{"error":{"code":..,"message":..}}`.
pub fn http_error(code: ErrorCode, message: &str) -> String {
    let mut buf = format!("{{\"error\":{{\"code\":\"{}\",\"message\":", code.as_str());
    push_json_str(&mut buf, message);
    buf.push_str("}}");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{NewMessage, TopicName};

    fn msg(kind: Kind, payload: &[u8]) -> Message {
        let topic = TopicName::parse("news").expect("name");
        Message::new(topic, 42, 7, NewMessage::new(kind, payload.to_vec()))
    }

    #[test]
    fn frames_follow_the_kind_table() {
        assert_eq!(
            message_frame(&msg(Kind::Json, b"{\"n\":1.000}")),
            r#"{"type":"message","topic":"news","offset":42,"ts":7,"data":{"n":1.000}}"#
        );
        assert_eq!(
            message_frame(&msg(Kind::Text, b"a\"b\n")),
            r#"{"type":"message","topic":"news","offset":42,"ts":7,"data":"a\"b\n"}"#
        );
        assert_eq!(
            message_frame(&msg(Kind::Binary, b"hi")),
            r#"{"type":"message","topic":"news","offset":42,"ts":7,"data_b64":"aGk="}"#
        );
    }

    #[test]
    fn json_strings_are_valid_json() -> Result<(), serde_json::Error> {
        let nasty = "\u{1}\u{1f}\"\\\t é 🎉";
        let mut buf = String::new();
        push_json_str(&mut buf, nasty);
        assert_eq!(serde_json::from_str::<String>(&buf)?, nasty);
        Ok(())
    }

    #[test]
    fn sse_splits_multiline_json() {
        let event = sse_event(&msg(Kind::Json, b"{\r\n\"a\": 1\n}"));
        assert_eq!(
            event,
            "id: 42\ndata: {\"topic\":\"news\",\"offset\":42,\"ts\":7,\"data\":{\ndata: \"a\": 1\ndata: }}\n\n"
        );
    }

    #[test]
    fn replies() {
        assert_eq!(
            subscribed(Some(1), "news", "e", 43, true),
            r#"{"type":"subscribed","id":1,"topic":"news","epoch":"e","next":43,"recovered":true}"#
        );
        assert_eq!(error(None, ErrorCode::BadRequest, "x"), r#"{"type":"error","code":"bad_request","message":"x"}"#);
        assert_eq!(http_error(ErrorCode::NotFound, "y"), r#"{"error":{"code":"not_found","message":"y"}}"#);
    }
}
