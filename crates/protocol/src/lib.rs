//! Herald's wire vocabulary, shared by every front door and the client: the error-code
//! table of docs/protocol.md, WebSocket close codes, the parsing of client frames of the JSON
//! WebSocket protocol, the encoding of server frames (message, replies, SSE events), and
//! the W3C trace context of requests.
//!
//! It depends on the core only for names and message types; it knows no socket.

pub mod code;
pub mod decode;
pub mod encode;
pub mod payload;
pub mod trace;

pub use code::{close, ErrorCode};
pub use decode::{
    parse_ack_batch, parse_client_frame, parse_enqueue_batch, parse_fetch_acks, BatchEntry, ClientFrame, FrameError,
    Op, Payload,
};
pub use payload::{check_payload, is_delivery_id, kind_of_media_type, PayloadError, DELIVERY_ID_RULE};
