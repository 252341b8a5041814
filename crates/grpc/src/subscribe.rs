//! Subscribe streams: a gRPC subscriber is a fan-out subscriber like a WebSocket or SSE
//! one, with its own byte-bounded [`Outbound`] queue and the same slow-consumer policy.
//!
//! A producer task (on the server's task tracker) drains the queue in batches under the
//! core's one writer discipline ([`herald_core::writer`], as WebSocket and SSE do),
//! turns each message into its shared pre-encoded [`EncodedEvent`] and hands the batch
//! to the response stream through a one-slot channel: it runs only as fast as tonic takes
//! items, so a client that stops reading leaves its backlog in the outbound queue, where
//! it is bounded and detected. The stream ends with UNAVAILABLE on shutdown and
//! RESOURCE_EXHAUSTED (`slow consumer`) when the policy closes the queue. An idle stream
//! gets a `keepalive` event every 15 s (as SSE gets a comment), so proxies keep it open
//! and a client that vanished is noticed by the failed write.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use herald_core::{
    outbound, run_writer, spawn_replay, ConnectionGuard, Door, Item, Member, MemberRole, Metrics, Outbound, OutboundRx,
    PresenceEvent, PresenceKind, PresenceSink, SocketWriter, StartFrom, SubscriptionGuard, TopicName, WriterEnd,
};
use herald_protocol::ErrorCode;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::{Code, Status};

use crate::encoded::{EncodedEvent, PACK_LIMIT};
use crate::error::{from_broker, status};
use crate::{pb, GrpcState};

/// The response stream of `Topics.Subscribe`.
pub type EventStream = Pin<Box<dyn futures_util::Stream<Item = Result<EncodedEvent, Status>> + Send + 'static>>;

/// Items the producer takes from the outbound queue per batch.
const BATCH: usize = 256;
/// Idle time after which the stream gets a `keepalive` event.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// The slot of [`PresenceEvent`]'s cache that holds its gRPC form.
const PRESENCE_FORM_GRPC: usize = 2;

/// A member as the proto's `Member`.
pub(crate) fn pb_member(m: &Member) -> pb::Member {
    pb::Member {
        conn: m.conn.id,
        door: m.conn.door.label().to_owned(),
        role: m.role.label().to_owned(),
        user: m.conn.user().unwrap_or_default().to_owned(),
        info: m.info.as_deref().unwrap_or_default().to_owned(),
    }
}

/// Where a subscription's presence events go (`presence: true`): its queue, as
/// `presence` events encoded once per event for every gRPC subscriber.
struct PresenceTap(std::sync::Arc<Outbound<EncodedEvent>>);

impl PresenceSink for PresenceTap {
    fn presence(&self, event: &std::sync::Arc<PresenceEvent>) -> bool {
        let encoded = event.encoded(PRESENCE_FORM_GRPC, |e| {
            let (kind, dropped, subscribers, publishers) = match e.kind {
                PresenceKind::Join => (pb::presence_event::Kind::Join, 0, 0, 0),
                PresenceKind::Leave => (pb::presence_event::Kind::Leave, 0, 0, 0),
                PresenceKind::Lost { dropped, subscribers, publishers } => {
                    (pb::presence_event::Kind::Lost, dropped, subscribers, publishers)
                }
            };
            EncodedEvent::presence(&pb::PresenceEvent {
                topic: e.topic.as_str().to_owned(),
                kind: kind as i32,
                member: e.member.as_ref().map(pb_member),
                dropped,
                subscribers,
                publishers,
            })
        });
        let size = encoded.len();
        self.0.push_control(encoded, size)
    }
}

/// What a subscription asks of presence: its events, and the `info` of its member entry.
pub(crate) struct PresenceAsk {
    pub events: bool,
    pub info: Option<std::sync::Arc<str>>,
}

/// Subscribes to `topic` and returns the stream that delivers it.
pub(crate) async fn open(
    state: &GrpcState,
    topic: TopicName,
    from: StartFrom,
    epoch: Option<&str>,
    (pack, ask): (bool, PresenceAsk),
    watch: herald_auth::Watch,
    (peer, user): (Option<std::net::SocketAddr>, Option<std::sync::Arc<str>>),
) -> Result<EventStream, Status> {
    let broker = state.broker().clone();
    let (out, rx) = outbound::<EncodedEvent>(broker.config().outbound);
    let sub = broker.subscribe(&topic, from, epoch, out.clone()).await.map_err(from_broker)?;
    let first = EncodedEvent::subscribed(&pb::Subscribed {
        topic: topic.as_str().to_owned(),
        epoch: sub.epoch.to_string(),
        next: sub.next,
        recovered: sub.recovered,
    });
    let guard = ConnectionGuard::new(&broker, Door::Grpc);
    let info = guard.info();
    if let Some(peer) = peer {
        info.set_peer(peer);
    }
    if let Some(user) = user {
        info.set_user(user);
    }
    info.attach(out.clone());
    let watcher: Option<std::sync::Arc<dyn PresenceSink>> =
        ask.events.then(|| std::sync::Arc::new(PresenceTap(out.clone())) as std::sync::Arc<dyn PresenceSink>);
    let member = Member { conn: info.clone(), role: MemberRole::Subscriber, info: ask.info };
    let presence = broker.presence().join(&topic, member, watcher);
    // Everything the subscription owns lives in the producer task and ends with it.
    let owned = (
        guard,
        SubscriptionGuard::new(broker.clone(), topic, sub.id),
        sub.replay.map(|r| spawn_replay(r, out.clone())),
        presence,
        out,
    );
    let (batch_tx, batch_rx) = mpsc::channel::<Vec<EncodedEvent>>(1);
    let (end_tx, end_rx) = oneshot::channel::<Status>();
    let shutdown = state.inner.shutdown.clone();
    let metrics = broker.metrics().clone();
    let task = state.inner.tracker.spawn(async move {
        let _owned = owned;
        let ended = watch.ended();
        tokio::pin!(ended);
        let end = tokio::select! {
            end = produce(first, rx, (&batch_tx, pack), &shutdown, &metrics) => end,
            why = &mut ended => Some(match why {
                herald_auth::Ended::Expired => status(ErrorCode::Unauthorized, "token expired"),
                herald_auth::Ended::Refused => status(ErrorCode::Unauthorized, "credentials no longer accepted"),
                herald_auth::Ended::Withdrawn => status(ErrorCode::Forbidden, "grant withdrawn"),
            }),
        };
        if let Some(end) = end {
            // Sent before `batch_tx` drops, so the stream finds it once drained.
            let _ = end_tx.send(end);
        }
    });
    let feed = Feed { batch_rx, ready: VecDeque::new(), end_rx: Some(end_rx), _task: AbortOnDropHandle::new(task) };
    Ok(Box::pin(futures_util::stream::unfold(feed, Feed::next)))
}

/// The stream's side: events handed over by the producer, then its ending status.
struct Feed {
    batch_rx: mpsc::Receiver<Vec<EncodedEvent>>,
    ready: VecDeque<EncodedEvent>,
    end_rx: Option<oneshot::Receiver<Status>>,
    /// Dropping the stream (the client went away) stops the producer.
    _task: AbortOnDropHandle<()>,
}

impl Feed {
    async fn next(mut self) -> Option<(Result<EncodedEvent, Status>, Self)> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some((Ok(event), self));
            }
            match self.batch_rx.recv().await {
                Some(batch) => self.ready.extend(batch),
                None => {
                    let end = self.end_rx.take()?.await.ok()?;
                    return Some((Err(end), self));
                }
            }
        }
    }
}

fn slow_consumer() -> Option<Status> {
    Some(Status::new(
        Code::ResourceExhausted,
        "slow consumer: the subscriber did not keep up (its buffer stayed full past slow_consumer_timeout)",
    ))
}

/// The gRPC side of the writer discipline ([`herald_core::run_writer`]): the
/// `subscribed` event first, then each batch as one hand-over to the response stream,
/// and a `keepalive` event when idle.
struct GrpcWriter<'a> {
    tx: &'a mpsc::Sender<Vec<EncodedEvent>>,
    /// Whether the subscriber asked for packed `messages` events.
    pack: bool,
    metrics: &'a Metrics,
    first: Option<EncodedEvent>,
    idle_until: Instant,
}

impl GrpcWriter<'_> {
    /// Hands `events` to the stream; a client that stops reading blocks this (the
    /// channel has one slot), leaving its backlog in the outbound queue.
    async fn hand_over(&mut self, events: Vec<EncodedEvent>) -> Result<(), ()> {
        self.tx.send(events).await.map_err(drop)?;
        self.idle_until = Instant::now() + KEEPALIVE_EVERY;
        Ok(())
    }
}

impl SocketWriter<EncodedEvent> for GrpcWriter<'_> {
    /// The stream is gone: the client went away.
    type Stop = ();

    async fn start(&mut self) -> Result<(), ()> {
        match self.first.take() {
            Some(first) => self.hand_over(vec![first]).await,
            None => Ok(()),
        }
    }

    async fn write_batch(&mut self, batch: &mut Vec<Item<EncodedEvent>>) -> Result<(), ()> {
        if !self.pack {
            let events = batch
                .drain(..)
                .map(|item| match item {
                    Item::Message(m) => EncodedEvent::message(self.metrics, &m),
                    Item::Control(event, _) => event,
                })
                .collect();
            return self.hand_over(events).await;
        }
        // Messages are packed in runs; a presence event goes alone between them.
        let mut events = Vec::new();
        let mut run = Vec::new();
        for item in batch.drain(..) {
            match item {
                Item::Message(m) => run.push(EncodedEvent::message(self.metrics, &m)),
                Item::Control(event, _) => {
                    events.extend(pack(std::mem::take(&mut run).into_iter()));
                    events.push(event);
                }
            }
        }
        events.extend(pack(run.into_iter()));
        self.hand_over(events).await
    }

    fn next_timer(&self) -> Instant {
        self.idle_until
    }

    async fn on_timer(&mut self) -> Result<(), ()> {
        self.hand_over(vec![EncodedEvent::keepalive()]).await
    }
}

/// `messages` events of at most about [`PACK_LIMIT`] bytes each (a larger message alone).
fn pack(messages: impl Iterator<Item = EncodedEvent>) -> Vec<EncodedEvent> {
    let mut events = Vec::new();
    let (mut group, mut bytes) = (Vec::new(), 0);
    for m in messages {
        if !group.is_empty() && bytes + m.len() > PACK_LIMIT {
            events.push(EncodedEvent::packed(std::mem::take(&mut group)));
            bytes = 0;
        }
        bytes += m.len();
        group.push(m);
    }
    if !group.is_empty() {
        events.push(EncodedEvent::packed(group));
    }
    events
}

/// Moves events from the outbound queue to the stream (`tx`, packing when asked) until
/// the subscription ends; returns the status to end the stream with (`None`: the
/// client went away).
async fn produce(
    first: EncodedEvent,
    rx: OutboundRx<EncodedEvent>,
    (tx, pack): (&mpsc::Sender<Vec<EncodedEvent>>, bool),
    shutdown: &CancellationToken,
    metrics: &Metrics,
) -> Option<Status> {
    let mut socket = GrpcWriter { tx, pack, metrics, first: Some(first), idle_until: Instant::now() + KEEPALIVE_EVERY };
    match run_writer(rx, &mut socket, std::pin::pin!(shutdown.cancelled()), metrics, BATCH).await {
        WriterEnd::Shutdown => Some(status(ErrorCode::Unavailable, "server is shutting down")),
        WriterEnd::SlowConsumer => slow_consumer(),
        WriterEnd::Closed => Some(status(ErrorCode::Unavailable, "the subscription could not be served")),
        WriterEnd::Admin => Some(status(ErrorCode::Unavailable, "closed by an administrator")),
        WriterEnd::Socket(()) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use herald_core::{Kind, Message, NewMessage, OutboundConfig};

    fn message(offset: u64) -> Arc<herald_core::Message> {
        let topic = TopicName::parse("t").expect("name");
        Arc::new(Message::new(topic, offset, 0, NewMessage::new(Kind::Text, "x")))
    }

    #[tokio::test(start_paused = true)]
    async fn subscribed_first_then_messages_then_keepalives_when_idle() {
        let config = OutboundConfig { max_pending_bytes: 1 << 20, slow_consumer_timeout: Duration::from_secs(5) };
        let (out, rx) = outbound::<EncodedEvent>(config);
        let (tx, mut batches) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let first = EncodedEvent::subscribed(&pb::Subscribed::default());
        out.push_message(message(1));
        let producer = {
            let (shutdown, metrics, first) = (shutdown.clone(), metrics.clone(), first.clone());
            tokio::spawn(async move { produce(first, rx, (&tx, false), &shutdown, &metrics).await })
        };
        assert_eq!(batches.recv().await, Some(vec![first]), "subscribed comes first, alone");
        let batch = batches.recv().await.expect("a batch");
        assert_eq!(batch, vec![EncodedEvent::message(&metrics, &message(1).into())]);
        assert_eq!(out.pending_bytes(), 0, "handed-over bytes are released");

        // Idle: a keepalive after 15 s, not before.
        tokio::time::advance(KEEPALIVE_EVERY - Duration::from_millis(1)).await;
        assert!(batches.try_recv().is_err());
        assert_eq!(batches.recv().await, Some(vec![EncodedEvent::keepalive()]));

        shutdown.cancel();
        let end = producer.await.expect("producer").expect("a status");
        assert_eq!(end.code(), Code::Unavailable);
    }
}
