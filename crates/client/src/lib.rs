//! The Rust client for Herald, used by the `herald pub`/`herald sub` commands, `herald
//! bench` and the tests.
//!
//! - [`Client`]: HTTP publish, fetch, topic info, delete and list; work queues
//!   (enqueue, fetch_jobs with long poll, ack, requeue, extend, queue_stats, list).
//! - [`Client::subscribe`]: a WebSocket subscription that reconnects on its own and
//!   resumes from the last offset it delivered (with the epoch check), so a network blip
//!   loses nothing the topic still retains.
//! - [`WsConnection`]: the JSON WebSocket protocol frame by frame, for tools and tests.
//! - [`GrpcClient`]: gRPC (`herald.v1`): publish, batch publish, subscribe, and the raw
//!   tonic clients for every RPC; generated types in [`grpc::pb`].
//! - [`TlsConfig`]: which CAs `https://`, `wss://` and gRPC over TLS trust (the system's
//!   store by default, or a private CA's PEM file).

pub mod grpc;
mod http;
mod queue;
mod tls;
mod ws;

pub use grpc::{GrpcClient, GrpcSubscription};
pub use http::{basic_auth, bearer_auth, Client, ListOptions, ListedTopic, Page, Published, TopicInfo};
pub use queue::{EntryError, FetchOptions, Job, JobPayload, ListedQueue, NewJob, QueueStats};
pub use tls::{install_crypto_provider, TlsConfig};
pub use ws::{connect_socket, Delivery, Event, Payload, Subscription, WsConnection};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an API error.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Herald's error code word.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The HTTP request failed.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// The server sent something this client does not understand.
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// A gRPC call failed with this status (its message starts with Herald's code word).
    #[error("grpc {:?}: {}", .0.code(), .0.message())]
    Grpc(Box<tonic::Status>),
    /// The gRPC connection could not be made.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A TLS setting could not be used (a CA file unreadable or without certificates).
    #[error("tls: {0}")]
    Tls(String),
    /// The server closed the connection.
    #[error("connection closed{}", .0.as_ref().map(|(c, r)| format!(" with {c} {r}")).unwrap_or_default())]
    Closed(Option<(u16, String)>),
}

impl From<tokio_tungstenite::tungstenite::Error> for ClientError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        ClientError::WebSocket(Box::new(e))
    }
}

impl From<tonic::Status> for ClientError {
    fn from(e: tonic::Status) -> Self {
        ClientError::Grpc(Box::new(e))
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// Only new messages.
    Latest,
    /// Everything retained, then live.
    Earliest,
    /// Messages with offset >= N, then live.
    Offset(u64),
}

impl StartFrom {
    fn to_json(self) -> serde_json::Value {
        match self {
            StartFrom::Latest => "latest".into(),
            StartFrom::Earliest => "earliest".into(),
            StartFrom::Offset(n) => n.into(),
        }
    }
}

impl std::str::FromStr for StartFrom {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "latest" => Ok(StartFrom::Latest),
            "earliest" => Ok(StartFrom::Earliest),
            n => n
                .parse()
                .map(StartFrom::Offset)
                .map_err(|_| format!("expected latest, earliest or an offset, got {s:?}")),
        }
    }
}

/// Turns `http://host:port` into `ws://host:port` (and https into wss).
fn ws_base(base: &str) -> String {
    if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_owned()
    }
}
