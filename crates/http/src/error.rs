//! `ApiError`: the one error type handlers return, rendered as docs/protocol.md's
//! `{"error":{"code","message"}}` with the code's status.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use herald_auth::limits::Over;
use herald_core::{BrokerError, NameError};
use herald_protocol::{encode, ErrorCode};

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The code word.
    pub code: ErrorCode,
    /// Human words.
    pub message: String,
    /// With `rate_limited`: when to retry (the `Retry-After` header, rounded up to a
    /// second; one second when unknown).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after: None }
    }

    /// A `rate_limited` for a request over a limit.
    pub fn rate_limited(over: Over) -> Self {
        match over {
            Over::Wait(wait) => Self {
                retry_after: Some(wait),
                ..Self::new(ErrorCode::RateLimited, "over the rate limit of this connection or user; retry later")
            },
            Over::Never => Self::new(
                ErrorCode::RateLimited,
                "more messages or bytes at once than the rate limit allows in a second; send fewer at a time",
            ),
        }
    }

    /// A `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        Self::new(ErrorCode::InvalidName, e.to_string())
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        if let BrokerError::Store(store) = &e {
            tracing::warn!(error = %store, "store error");
        }
        Self::new(ErrorCode::from(&e), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, encode::http_error(self.code, &self.message)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.code == ErrorCode::RateLimited {
            let secs = self.retry_after.map_or(1, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
