//! The gRPC edge of Herald's error table: every failure becomes a `tonic::Status` whose
//! code follows the HTTP front door's code word (docs/protocol.md) and whose message starts with
//! that word, e.g. `invalid_name: name has an empty segment`.

use herald_auth::limits::Over;
use herald_core::{BrokerError, NameError, QueueError};
use herald_protocol::ErrorCode;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// The gRPC status code of a Herald error code; exhaustive, so a new word must be mapped.
pub fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::BadRequest | ErrorCode::InvalidName => Code::InvalidArgument,
        ErrorCode::TooLarge | ErrorCode::RateLimited | ErrorCode::TooManySubscriptions => Code::ResourceExhausted,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::Unauthorized => Code::Unauthenticated,
        ErrorCode::Forbidden => Code::PermissionDenied,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::AlreadySubscribed => Code::AlreadyExists,
        ErrorCode::NotSubscribed => Code::FailedPrecondition,
    }
}

/// A status carrying `code` and human words.
pub fn status(code: ErrorCode, message: impl std::fmt::Display) -> Status {
    Status::new(grpc_code(code), format!("{code}: {message}"))
}

/// A `rate_limited` status (RESOURCE_EXHAUSTED) for a call over an abuse limit, with
/// `grpc-retry-pushback-ms` (gRPC's retry pushback) and `retry-after` (seconds) metadata
/// saying when to retry.
pub fn rate_limited(over: Over) -> Status {
    match over {
        Over::Wait(wait) => {
            let mut s = status(ErrorCode::RateLimited, "over the rate limit of this connection or user; retry later");
            let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            let secs = ms.div_ceil(1000);
            let md = s.metadata_mut();
            md.insert("grpc-retry-pushback-ms", MetadataValue::from(ms));
            md.insert("retry-after", MetadataValue::from(secs));
            s
        }
        Over::Never => status(
            ErrorCode::RateLimited,
            "more messages or bytes at once than the rate limit allows in a second; send fewer at a time",
        ),
    }
}

/// A `bad_request` status.
pub fn bad_request(message: impl std::fmt::Display) -> Status {
    status(ErrorCode::BadRequest, message)
}

/// An `invalid_name` status.
pub fn from_name(e: NameError) -> Status {
    status(ErrorCode::InvalidName, e)
}

/// The status of a broker failure (same codes as HTTP).
pub fn from_broker(e: BrokerError) -> Status {
    if let BrokerError::Store(store) = &e {
        tracing::warn!(error = %store, "store error");
    }
    status(ErrorCode::from(&e), e)
}

/// The status of a queue failure (same codes as HTTP).
pub fn from_queue(e: QueueError) -> Status {
    if let QueueError::Store(store) = &e {
        tracing::warn!(error = %store, "store error");
    }
    status(ErrorCode::from(&e), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_starts_with_the_code_word() {
        let s = status(ErrorCode::TooLarge, "payload of 5 bytes is over the limit of 4 bytes");
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.message(), "too_large: payload of 5 bytes is over the limit of 4 bytes");
        assert_eq!(from_queue(QueueError::NotFound("x".into())).code(), Code::NotFound);
    }
}
