//! gRPC half of the client: the generated `herald.v1` types and tonic clients
//! ([`pb`]), and [`GrpcClient`], a small convenience layer over them (publish, batch
//! publish, subscribe) used by `herald pub --grpc`, `herald sub --grpc` and the
//! benchmarks. Every RPC is reachable through [`GrpcClient::topics`] and
//! [`GrpcClient::queues`].
//!
//! ```no_run
//! use herald_client::grpc::pb;
//! use herald_client::{ClientError, GrpcClient, StartFrom};
//!
//! # async fn example() -> Result<(), ClientError> {
//! let client = GrpcClient::connect("http://127.0.0.1:7070").await?;
//! let published = client.publish("news", pb::Kind::Text, "hello").await?;
//! println!("published at offset {}", published.offset);
//!
//! // One call, consecutive offsets.
//! let batch = ["one", "two"]
//!     .map(|s| pb::BatchMessage { data: s.into(), kind: pb::Kind::Text as i32, ..Default::default() });
//! client.publish_batch("news", batch.to_vec()).await?;
//!
//! let mut subscription = client.subscribe("news", StartFrom::Earliest, None).await?;
//! println!("epoch {}, next {}", subscription.subscribed.epoch, subscription.subscribed.next);
//! while let Some(m) = subscription.next().await? {
//!     println!("{}: {}", m.offset, m.to_line());
//! }
//!
//! // A queue worker with the generated client.
//! let mut queues = client.queues();
//! let fetch = pb::QueueFetchRequest {
//!     queue: "emails".into(),
//!     max: 10,
//!     visibility_ms: 60_000,
//!     wait_ms: 20_000,
//!     ..Default::default()
//! };
//! for job in queues.fetch(fetch).await?.into_inner().messages {
//!     println!("job {} attempt {}: {}", job.message_id, job.attempt, String::from_utf8_lossy(&job.data));
//!     queues.ack(pb::AckRequest { queue: "emails".into(), id: job.id }).await?;
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;

use base64::Engine;
use bytes::Bytes;
pub use tonic::transport::Channel;
use tonic::transport::Endpoint;
use tonic::Streaming;

use crate::{ClientError, Published, StartFrom, TlsConfig};

/// The generated protobuf types and tonic clients of `herald.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("herald.v1");
}

/// Largest response the clients accept: a Fetch stays under 4 MiB, but a queue Fetch of
/// 100 large jobs may not.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// A gRPC connection to a Herald server (HTTP/2 cleartext on the server's one port);
/// cheap to clone, calls are multiplexed on one connection.
#[derive(Debug, Clone)]
pub struct GrpcClient {
    channel: Channel,
    /// The `authorization` metadata this client's own calls carry.
    auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl GrpcClient {
    /// Connects to `url` (`http://host:port`, the same URL as for HTTP; `https://` is
    /// checked against the system's certificate store).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, &TlsConfig::system()).await
    }

    /// As [`GrpcClient::connect`], trusting `tls` for `https://`.
    pub async fn connect_with(url: &str, tls: &TlsConfig) -> Result<Self, ClientError> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())?.tcp_nodelay(true);
        if url.starts_with("https://") {
            endpoint = endpoint.tls_config(tls.tonic())?;
        }
        Ok(Self::from_channel(endpoint.connect().await?))
    }

    /// Uses an existing channel (to tune windows, timeouts or TLS).
    pub fn from_channel(channel: Channel) -> Self {
        Self { channel, auth: None }
    }

    /// This client, sending `authorization` (as for HTTP: `Basic ...` or `Bearer ...`)
    /// with the calls it makes itself (publish, publish_batch, subscribe); requests made
    /// through [`GrpcClient::topics`] and [`GrpcClient::queues`] go through
    /// [`GrpcClient::request`].
    pub fn authorized(self, authorization: &str) -> Result<Self, ClientError> {
        let value = authorization
            .parse()
            .map_err(|_| ClientError::Protocol("the Authorization value is not valid metadata".into()))?;
        Ok(Self { auth: Some(value), ..self })
    }

    /// `message` as a request carrying this client's credentials.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }

    /// The `herald.v1.Topics` client.
    pub fn topics(&self) -> pb::topics_client::TopicsClient<Channel> {
        pb::topics_client::TopicsClient::new(self.channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The `herald.v1.Queues` client.
    pub fn queues(&self) -> pb::queues_client::QueuesClient<Channel> {
        pb::queues_client::QueuesClient::new(self.channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The `herald.v1.Admin` client (connections; the `admin` right on `>`).
    pub fn admin(&self) -> pb::admin_client::AdminClient<Channel> {
        pb::admin_client::AdminClient::new(self.channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// Publishes one message of `kind`.
    pub async fn publish(&self, topic: &str, kind: pb::Kind, data: impl Into<Bytes>) -> Result<Published, ClientError> {
        let request =
            pb::PublishRequest { topic: topic.to_owned(), data: data.into(), kind: kind as i32, ..Default::default() };
        let r = self.topics().publish(self.request(request)).await?.into_inner();
        Ok(Published { topic: r.topic, offset: r.offset, ts: r.ts })
    }

    /// Publishes a batch to one topic atomically (consecutive offsets).
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<pb::BatchMessage>,
    ) -> Result<Vec<pb::Published>, ClientError> {
        let request = pb::PublishBatchRequest { topic: topic.to_owned(), messages };
        Ok(self.topics().publish_batch(self.request(request)).await?.into_inner().published)
    }

    /// Subscribes to `topic` from `from`; `epoch` is the epoch seen before, checked when
    /// resuming from an offset. Resolves once the server confirmed the subscription.
    pub async fn subscribe(
        &self,
        topic: &str,
        from: StartFrom,
        epoch: Option<String>,
    ) -> Result<GrpcSubscription, ClientError> {
        use pb::subscribe_request::From;
        let from = match from {
            StartFrom::Latest => None,
            StartFrom::Earliest => Some(From::Start(pb::Start::Earliest as i32)),
            StartFrom::Offset(n) => Some(From::Offset(n)),
        };
        // Packed: a burst arrives as a few `messages` events; `next` hands out one at a time.
        let request = pb::SubscribeRequest { topic: topic.to_owned(), from, epoch, pack: true, ..Default::default() };
        let mut stream = self.topics().subscribe(self.request(request)).await?.into_inner();
        match stream.message().await?.and_then(|e| e.event) {
            Some(pb::subscribe_event::Event::Subscribed(subscribed)) => {
                Ok(GrpcSubscription { subscribed, stream, ready: VecDeque::new() })
            }
            other => Err(ClientError::Protocol(format!("expected a subscribed event first, got {other:?}"))),
        }
    }
}

/// A live gRPC subscription: the server's confirmation, then messages in offset order.
#[derive(Debug)]
pub struct GrpcSubscription {
    /// The first event: epoch, next offset, and whether the start could be resumed.
    pub subscribed: pb::Subscribed,
    stream: Streaming<pb::SubscribeEvent>,
    /// The rest of the last packed event.
    ready: VecDeque<pb::TopicMessage>,
}

impl GrpcSubscription {
    /// The next message; `None` when the stream ended cleanly, an error with the
    /// server's status otherwise (UNAVAILABLE on shutdown, RESOURCE_EXHAUSTED when this
    /// subscriber fell too far behind).
    pub async fn next(&mut self) -> Result<Option<pb::TopicMessage>, ClientError> {
        use pb::subscribe_event::Event;
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Ok(Some(m));
            }
            match self.stream.message().await? {
                None => return Ok(None),
                Some(pb::SubscribeEvent { event: Some(Event::Message(m)) }) => return Ok(Some(m)),
                Some(pb::SubscribeEvent { event: Some(Event::Messages(ms)) }) => self.ready.extend(ms.messages),
                // Keepalives, and event kinds a newer server may add, carry nothing here.
                Some(_) => continue,
            }
        }
    }
}

impl pb::TopicMessage {
    /// The payload as one line of text: text and JSON as they are, binary as base64.
    pub fn to_line(&self) -> String {
        match pb::Kind::try_from(self.kind) {
            Ok(pb::Kind::Json | pb::Kind::Text) => match std::str::from_utf8(&self.data) {
                Ok(s) => s.to_owned(),
                Err(_) => base64::engine::general_purpose::STANDARD.encode(&self.data),
            },
            _ => base64::engine::general_purpose::STANDARD.encode(&self.data),
        }
    }
}
