//! The client-facing error codes (the words of docs/protocol.md) and WebSocket close codes.

/// An error code as clients see it, with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed input: bad JSON, unknown op, wrong field type or value.
    BadRequest,
    /// A topic or queue name that breaks the naming rules.
    InvalidName,
    /// A payload over `max_message_bytes`.
    TooLarge,
    /// Subscribing twice to one topic on one connection.
    AlreadySubscribed,
    /// Unsubscribing from a topic not subscribed.
    NotSubscribed,
    /// Missing or bad credentials.
    Unauthorized,
    /// Credentials without the right for this topic.
    Forbidden,
    /// Over a rate limit; retry later.
    RateLimited,
    /// Over `max_subscriptions_per_connection`.
    TooManySubscriptions,
    /// The store or server cannot serve now (shutting down, store failure, limits).
    Unavailable,
    /// No such resource (unknown route, stale delivery id).
    NotFound,
}

impl ErrorCode {
    /// The code word.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotFound => "not_found",
        }
    }

    /// The HTTP status for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidName => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadySubscribed | ErrorCode::NotSubscribed => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited | ErrorCode::TooManySubscriptions => 429,
            ErrorCode::Unavailable => 503,
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::RateLimited | ErrorCode::Unavailable)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes Herald sends, and why.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// A data frame on a raw `mode=sub` socket.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// The connection spent its error budget (`limits.errors_per_minute`), or an
    /// administrator closed it (`DELETE /v1/admin/connections/{id}`).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame over the frame limit.
    pub const TOO_BIG: u16 = 1009;
    /// The store failed while publishing a raw frame.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The outbound buffer stayed full: slow consumer.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// JSON WebSocket with auth on: no valid `auth` frame within the time allowed, a
    /// frame before it, refused credentials in it, or the token expired.
    pub const UNAUTHORIZED: u16 = 4401;
    /// Raw WebSocket with auth on: a configuration reload took away the grant its mode needs.
    pub const FORBIDDEN: u16 = 4403;
}
