//! [`Tap`]: the sink of a subscription on the WebSocket JSON protocol. It passes messages
//! on to the connection's queue and remembers the last offset it passed on, so that a
//! publish from the same connection to that topic is answered only once its `message`
//! frame is queued: on one connection, `message` always comes before its `published`.
//!
//! Fan-out usually queues the message before the publish returns, but not when the
//! subscription is still replaying history (live messages are held back until the
//! replay ends) or when an earlier offset of the topic, from another publisher, has not
//! resolved yet (the message waits in the reorder buffer).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use herald_core::{CloseReason, Outbound, Outgoing, Subscriber};
use tokio::sync::Notify;

/// A subscription's sink that records how far it has delivered.
pub(crate) struct Tap<C> {
    out: Arc<Outbound<C>>,
    /// The last offset queued (0: none since the subscription or the last delete).
    delivered: AtomicU64,
    /// How many times the topic's history was deleted since the subscription.
    deletes: AtomicU64,
    /// Set while the connection's reader waits, so that deliveries pay for a wake-up
    /// (a lock inside `Notify`) only then.
    waiting: AtomicBool,
    notify: Notify,
}

/// Where the topic's history stood before a publish, to wait for that publish's message.
#[derive(Clone, Copy)]
pub(crate) struct Mark {
    deletes: u64,
}

impl<C: Send + 'static> Tap<C> {
    pub(crate) fn new(out: Arc<Outbound<C>>) -> Self {
        Self {
            out,
            delivered: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    /// Taken before publishing: a delete after it ends [`Tap::until_delivered`], since
    /// the message may then never be delivered (fan-out drops the old history).
    pub(crate) fn mark(&self) -> Mark {
        Mark { deletes: self.deletes.load(Ordering::SeqCst) }
    }

    /// Waits until the message at `offset` is queued, the history was deleted since
    /// `mark`, or the queue closed. `progress` runs each time the connection's writer
    /// writes meanwhile: the reader reads no frame while it waits, and a long replay must
    /// not look like a peer that stopped answering Pings.
    pub(crate) async fn until_delivered(&self, offset: u64, mark: Mark, progress: impl Fn()) {
        // Stored before `delivered` is read, as `deliver` stores `delivered` before it
        // reads this (both SeqCst): either the check below sees the delivery, or the
        // delivery sees the flag and wakes the enabled `Notified`.
        self.waiting.store(true, Ordering::SeqCst);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.delivered.load(Ordering::SeqCst) >= offset
                || self.deletes.load(Ordering::SeqCst) != mark.deletes
                || self.out.close_reason().is_some()
            {
                break;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = self.out.closed() => break,
                _ = self.out.written() => progress(),
            }
        }
        self.waiting.store(false, Ordering::SeqCst);
    }

    fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
    }
}

impl<C: Send + 'static> Subscriber for Tap<C> {
    fn deliver(&self, msg: &Outgoing) -> bool {
        let queued = self.out.push_message(msg.clone());
        self.delivered.store(msg.offset, Ordering::SeqCst);
        self.wake();
        queued
    }

    fn overflow(&self) {
        self.out.close(CloseReason::SlowConsumer);
    }

    fn history_deleted(&self) {
        self.delivered.store(0, Ordering::SeqCst);
        self.deletes.fetch_add(1, Ordering::SeqCst);
        self.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use herald_core::{outbound, Kind, Message, NewMessage, OutboundConfig, TopicName};

    use super::*;

    type Result = std::result::Result<(), Box<dyn std::error::Error>>;

    fn message(offset: u64) -> std::result::Result<Outgoing, Box<dyn std::error::Error>> {
        let topic = TopicName::parse("t")?;
        Ok(Arc::new(Message::new(topic, offset, 0, NewMessage::new(Kind::Text, "x"))).into())
    }

    /// Runs `event` on another task while the tap waits for offset 2; the wait must end.
    async fn wait_ends_on(event: impl FnOnce(&Tap<()>) + Send + 'static) -> Result {
        let (out, _rx) = outbound::<()>(OutboundConfig::default());
        let tap = Arc::new(Tap::new(out));
        let mark = tap.mark();
        tap.deliver(&message(1)?);
        let other = tap.clone();
        let task = tokio::spawn(async move { event(&other) });
        tokio::time::timeout(Duration::from_secs(10), tap.until_delivered(2, mark, || {})).await?;
        task.await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_ends_when_its_offset_is_delivered() -> Result {
        let msg = message(2)?;
        wait_ends_on(move |tap| {
            tap.deliver(&msg);
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_ends_when_the_history_is_deleted() -> Result {
        // The message may have been dropped with the old history: never delivered.
        wait_ends_on(|tap| tap.history_deleted()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_ends_when_the_connection_closes() -> Result {
        wait_ends_on(|tap| tap.overflow()).await
    }
}
