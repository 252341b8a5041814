//! The rules a payload must meet for its kind, and the error codes of broker and queue
//! failures: one table for every front door (HTTP, WebSocket, gRPC), so that a payload
//! or a failure gets the same answer whichever door it came through.

use herald_core::{BrokerError, Kind, QueueError};

use crate::code::ErrorCode;

/// Why a payload does not match its kind (a `bad_request`).
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// A text payload that is not UTF-8.
    #[error("a text payload must be UTF-8")]
    NotUtf8,
    /// A JSON payload that does not parse.
    #[error("payload is not valid JSON: {0}")]
    NotJson(serde_json::Error),
}

/// What a malformed delivery id is told (a `bad_request`).
pub const DELIVERY_ID_RULE: &str = "a delivery id is 1 to 64 characters of A-Z a-z 0-9 _ -";

/// Whether `raw` can be a delivery id (docs/protocol.md): 1 to 64 characters of
/// `[A-Za-z0-9_-]`. Checked by every front door before the queue engine sees it.
pub fn is_delivery_id(raw: &str) -> bool {
    !raw.is_empty() && raw.len() <= 64 && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks `payload` against the rules of `kind`: text is UTF-8, JSON parses.
pub fn check_payload(kind: Kind, payload: &[u8]) -> Result<(), PayloadError> {
    match kind {
        Kind::Text if std::str::from_utf8(payload).is_err() => Err(PayloadError::NotUtf8),
        Kind::Json => match serde_json::from_slice::<serde::de::IgnoredAny>(payload) {
            Ok(_) => Ok(()),
            Err(e) => Err(PayloadError::NotJson(e)),
        },
        _ => Ok(()),
    }
}

/// The kind a media type selects (HTTP's `Content-Type`, gRPC's `content_type`):
/// `text/*` is text, `application/json` and `application/*+json` are JSON, anything
/// else is binary. Case-insensitive; parameters (`; charset=...`) are ignored.
pub fn kind_of_media_type(content_type: &str) -> Kind {
    let media = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if media.starts_with("text/") {
        Kind::Text
    } else if media == "application/json" || (media.starts_with("application/") && media.ends_with("+json")) {
        Kind::Json
    } else {
        Kind::Binary
    }
}

impl From<&BrokerError> for ErrorCode {
    fn from(e: &BrokerError) -> Self {
        match e {
            BrokerError::TooLarge { .. } => ErrorCode::TooLarge,
            BrokerError::Store(_) | BrokerError::Role { .. } => ErrorCode::Unavailable,
        }
    }
}

impl From<&QueueError> for ErrorCode {
    fn from(e: &QueueError) -> Self {
        match e {
            QueueError::DeadLetterQueue(_) => ErrorCode::InvalidName,
            QueueError::TooLarge { .. } => ErrorCode::TooLarge,
            QueueError::Full { .. } | QueueError::TooManyWaiters(_) => ErrorCode::RateLimited,
            QueueError::NotFound(_) => ErrorCode::NotFound,
            QueueError::Unsupported(_) => ErrorCode::BadRequest,
            QueueError::Store(_) => ErrorCode::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_checked_by_kind() {
        assert!(check_payload(Kind::Text, b"caf\xc3\xa9").is_ok());
        assert!(matches!(check_payload(Kind::Text, b"\xff"), Err(PayloadError::NotUtf8)));
        assert!(check_payload(Kind::Json, br#"{"a":[1,2]}"#).is_ok());
        assert!(matches!(check_payload(Kind::Json, b"{"), Err(PayloadError::NotJson(_))));
        assert!(check_payload(Kind::Binary, b"\xff").is_ok());
    }

    #[test]
    fn media_types_select_kinds() {
        assert_eq!(kind_of_media_type("Text/Plain; charset=utf-8"), Kind::Text);
        assert_eq!(kind_of_media_type("application/json"), Kind::Json);
        assert_eq!(kind_of_media_type("application/cloudevents+json"), Kind::Json);
        assert_eq!(kind_of_media_type("application/x-www-form-urlencoded"), Kind::Binary);
        assert_eq!(kind_of_media_type(""), Kind::Binary);
    }
}
