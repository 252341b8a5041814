//! Subscribe streams: a gRPC subscriber is a fan-out subscriber like a WebSocket or SSE
//! one, with its own byte-bounded [`Outbound`] queue and the same slow-consumer policy.
//!
//! A producer task (on the server's task tracker) drains the queue in batches, turns
//! each message into its shared pre-encoded [`EncodedEvent`] and hands the batch to the
//! response stream through a one-slot channel: it runs only as fast as tonic takes
//! items, so a client that stops reading leaves its backlog in the outbound queue, where
//! it is bounded and detected. The stream ends with UNAVAILABLE on shutdown and
//! RESOURCE_EXHAUSTED (`slow consumer`) when the policy closes the queue. An idle stream
//! gets a `keepalive` event every 15 s (as SSE gets a comment), so proxies keep it open
//! and a client that vanished is noticed by the failed write.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::time::Duration;

use herald_core::{
    outbound, spawn_replay, CloseReason, ConnectionGuard, Item, Metrics, OutboundRx, StartFrom, SubscriptionGuard,
    TopicName,
};
use herald_protocol::ErrorCode;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::{Code, Status};

use crate::encoded::EncodedEvent;
use crate::error::{from_broker, status};
use crate::{pb, GrpcState};

/// The response stream of `Topics.Subscribe`.
pub type EventStream = Pin<Box<dyn futures_util::Stream<Item = Result<EncodedEvent, Status>> + Send + 'static>>;

/// Items the producer takes from the outbound queue per batch.
const BATCH: usize = 256;
/// Idle time after which the stream gets a `keepalive` event.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// Subscribes to `topic` and returns the stream that delivers it.
pub(crate) fn open(
    state: &GrpcState,
    topic: TopicName,
    from: StartFrom,
    epoch: Option<&str>,
) -> Result<EventStream, Status> {
    let broker = state.broker().clone();
    let (out, rx) = outbound::<Infallible>(broker.config().outbound);
    let sub = broker.subscribe(&topic, from, epoch, out.clone()).map_err(from_broker)?;
    let first = EncodedEvent::subscribed(&pb::Subscribed {
        topic: topic.as_str().to_owned(),
        epoch: sub.epoch.to_string(),
        next: sub.next,
        recovered: sub.recovered,
    });
    // Everything the subscription owns lives in the producer task and ends with it.
    let owned = (
        ConnectionGuard::new(&broker),
        SubscriptionGuard::new(broker.clone(), topic, sub.id),
        sub.replay.map(|r| spawn_replay(r, out.clone())),
        out,
    );
    let (batch_tx, batch_rx) = mpsc::channel::<Vec<EncodedEvent>>(1);
    let (end_tx, end_rx) = oneshot::channel::<Status>();
    let shutdown = state.inner.shutdown.clone();
    let metrics = broker.metrics().clone();
    let task = state.inner.tracker.spawn(async move {
        let _owned = owned;
        if let Some(end) = produce(first, rx, &batch_tx, &shutdown, &metrics).await {
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

fn slow_consumer(metrics: &Metrics) -> Option<Status> {
    Metrics::add(&metrics.slow_consumers, 1);
    Some(Status::new(
        Code::ResourceExhausted,
        "slow consumer: the subscriber did not keep up (its buffer stayed full past slow_consumer_timeout)",
    ))
}

fn shutting_down() -> Option<Status> {
    Some(status(ErrorCode::Unavailable, "server is shutting down"))
}

/// Moves events from the outbound queue to the stream until the subscription ends;
/// returns the status to end the stream with (`None`: the client went away).
async fn produce(
    first: EncodedEvent,
    mut rx: OutboundRx<Infallible>,
    tx: &mpsc::Sender<Vec<EncodedEvent>>,
    shutdown: &CancellationToken,
    metrics: &Metrics,
) -> Option<Status> {
    let mut ready = vec![first];
    // Bytes of `ready` still counted in the outbound queue: released once handed over,
    // so at most one batch waits outside the queue's bound.
    let mut bytes = 0;
    let mut items: Vec<Item<Infallible>> = Vec::with_capacity(BATCH);
    let mut idle_until = Instant::now() + KEEPALIVE_EVERY;
    loop {
        if !ready.is_empty() {
            let batch = std::mem::replace(&mut ready, Vec::with_capacity(BATCH));
            // A client that stops reading blocks this send: the slow-consumer policy
            // (closing the queue, or the full deadline passing) or shutdown ends it.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return shutting_down(),
                sent = tx.send(batch) => if sent.is_err() { return None },
                reason = rx.until_closed_or_slow() => return match reason {
                    CloseReason::SlowConsumer => slow_consumer(metrics),
                    CloseReason::Closed => Some(status(ErrorCode::Unavailable, "the subscription could not be served")),
                },
            }
            rx.written(bytes);
            bytes = 0;
            idle_until = Instant::now() + KEEPALIVE_EVERY;
        }
        let slow = rx.slow_deadline();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return shutting_down(),
            n = rx.recv_many(&mut items, BATCH) => {
                if n == 0 {
                    return match rx.close_reason() {
                        Some(CloseReason::SlowConsumer) => slow_consumer(metrics),
                        _ => Some(status(ErrorCode::Unavailable, "the subscription could not be served")),
                    };
                }
                for item in items.drain(..) {
                    bytes += item.size();
                    match item {
                        Item::Message(m) => ready.push(EncodedEvent::message(metrics, &m)),
                        Item::Control(never, _) => match never {},
                    }
                }
            }
            _ = sleep_until(slow.unwrap_or_else(Instant::now)), if slow.is_some() => {
                if rx.check_slow() {
                    return slow_consumer(metrics);
                }
            }
            _ = sleep_until(idle_until) => ready.push(EncodedEvent::keepalive()),
        }
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
        let (out, rx) = outbound::<Infallible>(config);
        let (tx, mut batches) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let first = EncodedEvent::subscribed(&pb::Subscribed::default());
        out.push_message(message(1));
        let producer = {
            let (shutdown, metrics, first) = (shutdown.clone(), metrics.clone(), first.clone());
            tokio::spawn(async move { produce(first, rx, &tx, &shutdown, &metrics).await })
        };
        assert_eq!(batches.recv().await, Some(vec![first]), "subscribed comes first, alone");
        let batch = batches.recv().await.expect("a batch");
        assert_eq!(batch, vec![EncodedEvent::message(&metrics, &message(1))]);
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
