//! What every front door holds while it serves a subscriber, whatever its transport:
//! a [`ConnectionGuard`] (the count behind `max_connections` and the connections
//! gauge), a [`SubscriptionGuard`] (the subscription ends when it drops), and the
//! [`ReplayTask`] that feeds history into the subscriber's outbound queue, paced by the
//! client, before the live messages held for it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::broker::{Broker, Replay, SubscriptionId};
use crate::name::TopicName;
use crate::outbound::{CloseReason, Outbound};

/// Counts one long-lived connection for as long as it lives.
pub struct ConnectionGuard(Broker);

impl ConnectionGuard {
    /// Counts a connection on `broker` until dropped.
    pub fn new(broker: &Broker) -> Self {
        broker.metrics().connections.fetch_add(1, Ordering::Relaxed);
        Self(broker.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.metrics().connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ends a subscription when dropped (also when a connection never completes its
/// upgrade). An empty guard ends nothing.
#[derive(Default)]
pub struct SubscriptionGuard(Option<(Broker, TopicName, SubscriptionId)>);

impl SubscriptionGuard {
    /// Ends subscription `id` to `topic` on drop.
    pub fn new(broker: Broker, topic: TopicName, id: SubscriptionId) -> Self {
        Self(Some((broker, topic, id)))
    }
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        if let Some((broker, topic, id)) = self.0.take() {
            broker.unsubscribe(&topic, id);
        }
    }
}

/// Messages a replay pushes before waiting for the client to drain some.
const REPLAY_CHUNK: usize = 256;

/// The task replaying history into a subscriber's queue; aborted when dropped.
pub struct ReplayTask(JoinHandle<()>);

impl Drop for ReplayTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Replays history into `out` in chunks paced by the client, then switches the
/// subscription to live. If the history cannot be read the queue is closed, since the
/// subscription cannot go on without a gap.
pub fn spawn_replay<C: Send + 'static>(mut replay: Replay, out: Arc<Outbound<C>>) -> ReplayTask {
    ReplayTask(tokio::spawn(async move {
        // Pacing target: half the bound keeps the socket busy without filling the queue.
        let resume_below = out.max_pending_bytes() / 2;
        loop {
            match replay.next_chunk(REPLAY_CHUNK).await {
                Ok(Some(chunk)) => {
                    for msg in chunk {
                        if !out.push_message(msg) {
                            return;
                        }
                    }
                    out.drained_to(resume_below).await;
                    if out.close_reason().is_some() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "replay failed");
                    out.close(CloseReason::Closed);
                    return;
                }
            }
        }
        replay.finish();
    }))
}
