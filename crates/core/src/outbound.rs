//! `Outbound`: one connection's queue of things to send, bounded in bytes, with the
//! slow-consumer policy built in.
//!
//! Publishers push into it without ever waiting: a push is one atomic add and one
//! lock-free channel send. The connection's single writer drains everything ready at
//! once, writes it in one batch, and only then releases the bytes. A queue over
//! `max_pending_bytes` is *full*; one that stays full past `slow_consumer_timeout`, or
//! reaches twice the limit, is closed and stops taking messages (a closed queue is never
//! silently skipped over: the connection ends, so no subscriber ever sees a gap).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::OutboundConfig;
use crate::message::Outgoing;

/// Why an outbound queue closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer did not keep up (WebSocket close code 1013).
    SlowConsumer,
    /// Closed by its owner (connection ended, shutdown).
    Closed,
    /// Closed by an administrator (`DELETE /v1/admin/connections/{id}`).
    Admin,
}

const OPEN: u8 = 0;
const SLOW: u8 = 1;
const CLOSED: u8 = 2;
const ADMIN: u8 = 3;

/// One item queued for a connection.
#[derive(Debug)]
pub enum Item<C> {
    /// A topic message, encoded by the writer through the fan-out's shared cache.
    Message(Outgoing),
    /// A front-door specific frame (a reply, an error) and its size in bytes.
    Control(C, usize),
}

impl<C> Item<C> {
    /// Bytes this item counts for in the queue.
    pub fn size(&self) -> usize {
        match self {
            Item::Message(m) => m.size_hint(),
            Item::Control(_, size) => *size,
        }
    }
}

/// A sink that fan-out delivers topic messages into.
pub trait Subscriber: Send + Sync + 'static {
    /// Queues `msg`; false when the subscriber is gone and should be dropped.
    fn deliver(&self, msg: &Outgoing) -> bool;
    /// The subscriber fell too far behind while catching up: close it as slow.
    fn overflow(&self);
    /// The topic's history was deleted: offsets start again from 1 (a new epoch).
    fn history_deleted(&self) {}
    /// Messages meant for this subscriber can no longer be delivered (a cluster node
    /// missed them and the history no longer holds them). Closed as a slow consumer
    /// would be, so the client resumes by offset and is told `recovered: false`.
    fn messages_lost(&self) {
        self.overflow();
    }
}

struct Shared<C> {
    /// What is queued, and whether the sending side is gone. A lock held only to push
    /// one item or take a batch; an empty queue holds no allocation (an idle
    /// connection costs no slots).
    queue: Mutex<Queue<C>>,
    /// A push made the queue non-empty, or the sending side went away. `notify_one`
    /// keeps a permit for a writer not waiting yet.
    ready: Notify,
    pending: AtomicUsize,
    /// 0 while not full; else milliseconds since `base` when it became full, plus one.
    full_since: AtomicU64,
    state: AtomicU8,
    closed: Notify,
    drained: Notify,
    base: Instant,
    config: OutboundConfig,
}

struct Queue<C> {
    items: VecDeque<Item<C>>,
    senders_gone: bool,
}

/// The sending side: shared by every subscription of one connection.
pub struct Outbound<C> {
    shared: Arc<Shared<C>>,
}

/// The receiving side, owned by the connection's writer.
pub struct OutboundRx<C> {
    shared: Arc<Shared<C>>,
}

/// Creates a connection's outbound queue.
pub fn outbound<C>(config: OutboundConfig) -> (Arc<Outbound<C>>, OutboundRx<C>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue { items: VecDeque::new(), senders_gone: false }),
        ready: Notify::new(),
        pending: AtomicUsize::new(0),
        full_since: AtomicU64::new(0),
        state: AtomicU8::new(OPEN),
        closed: Notify::new(),
        drained: Notify::new(),
        base: Instant::now(),
        config,
    });
    (Arc::new(Outbound { shared: shared.clone() }), OutboundRx { shared })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning means a panic mid-push or mid-take of plain data; the queue is whole
    // between statements, so keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C> Shared<C> {
    fn close(&self, reason: CloseReason) -> bool {
        let code = match reason {
            CloseReason::SlowConsumer => SLOW,
            CloseReason::Closed => CLOSED,
            CloseReason::Admin => ADMIN,
        };
        let first = self.state.compare_exchange(OPEN, code, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if first {
            self.closed.notify_waiters();
            self.drained.notify_waiters();
            // A writer waiting for items wakes and sees the queue closed.
            self.ready.notify_one();
        }
        first
    }

    /// Resolves once the queue is closed (the wake-up is registered before the check).
    async fn until_closed(&self) {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.reason().is_some() {
                return;
            }
            notified.await;
        }
    }

    fn reason(&self) -> Option<CloseReason> {
        match self.state.load(Ordering::Acquire) {
            OPEN => None,
            SLOW => Some(CloseReason::SlowConsumer),
            ADMIN => Some(CloseReason::Admin),
            _ => Some(CloseReason::Closed),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }
}

impl<C> Outbound<C> {
    /// Queues a topic message; false if the queue is closed (now or by this push).
    pub fn push_message(&self, msg: impl Into<Outgoing>) -> bool {
        let msg = msg.into();
        let size = msg.size_hint();
        self.push(Item::Message(msg), size)
    }

    /// Queues a front-door frame counting `size` bytes; false if the queue is closed.
    pub fn push_control(&self, frame: C, size: usize) -> bool {
        self.push(Item::Control(frame, size), size)
    }

    fn push(&self, item: Item<C>, size: usize) -> bool {
        let s = &self.shared;
        if s.reason().is_some() {
            return false;
        }
        let pending = s.pending.fetch_add(size, Ordering::AcqRel) + size;
        let max = s.config.max_pending_bytes;
        if pending > max {
            if pending > max.saturating_mul(2) {
                s.close(CloseReason::SlowConsumer);
                return false;
            }
            let now = s.now_ms();
            if let Err(since) = s.full_since.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire) {
                if now.saturating_sub(since) >= s.config.slow_consumer_timeout.as_millis() as u64 {
                    s.close(CloseReason::SlowConsumer);
                    return false;
                }
            }
        }
        let mut queue = lock(&s.queue);
        let was_empty = queue.items.is_empty();
        queue.items.push_back(item);
        drop(queue);
        if was_empty {
            s.ready.notify_one();
        }
        true
    }

    /// Closes the queue; the writer sees `reason` and ends the connection.
    pub fn close(&self, reason: CloseReason) -> bool {
        self.shared.close(reason)
    }

    /// Why the queue closed, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.reason()
    }

    /// The queue's bound: past it the connection counts as full.
    pub fn max_pending_bytes(&self) -> usize {
        self.shared.config.max_pending_bytes
    }

    /// Bytes queued and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.shared.pending.load(Ordering::Acquire)
    }

    /// Resolves once the queue is closed (by any side, or as a slow consumer).
    pub async fn closed(&self) {
        self.shared.until_closed().await
    }

    /// Resolves when the writer next releases written bytes, or the queue closes: the
    /// peer is reading.
    pub async fn written(&self) {
        let notified = self.shared.drained.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.shared.reason().is_some() {
            return;
        }
        notified.await;
    }

    /// Waits until at most `bytes` are pending (or the queue closed); paces replays.
    pub async fn drained_to(&self, bytes: usize) {
        loop {
            let notified = self.shared.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pending_bytes() <= bytes || self.shared.reason().is_some() {
                return;
            }
            notified.await;
        }
    }
}

impl<C> Drop for Outbound<C> {
    /// The sending side is gone: the writer takes what is left, then ends.
    fn drop(&mut self) {
        lock(&self.shared.queue).senders_gone = true;
        self.shared.ready.notify_one();
    }
}

impl<C> Drop for OutboundRx<C> {
    /// Nobody will write what is queued: later pushes are refused, queued items freed
    /// (outside the lock: they may be the last holders of large fan-outs).
    fn drop(&mut self) {
        self.shared.close(CloseReason::Closed);
        let items = std::mem::take(&mut lock(&self.shared.queue).items);
        drop(items);
    }
}

impl<C: Send + 'static> Subscriber for Outbound<C> {
    fn deliver(&self, msg: &Outgoing) -> bool {
        self.push_message(msg.clone())
    }

    fn overflow(&self) {
        self.close(CloseReason::SlowConsumer);
    }
}

impl<C> OutboundRx<C> {
    /// Receives up to `limit` ready items into `buf` (waiting for at least one); 0 when
    /// the queue closed, or the sending side is gone and nothing is left. Closing wins
    /// over items still queued.
    pub async fn recv_many(&mut self, buf: &mut Vec<Item<C>>, limit: usize) -> usize {
        let s = &self.shared;
        loop {
            // Registered before the checks: a push or a close after them leaves a
            // permit (`notify_one`), so neither is missed.
            let ready = s.ready.notified();
            if s.reason().is_some() {
                return 0;
            }
            {
                let mut queue = lock(&s.queue);
                if !queue.items.is_empty() {
                    let n = queue.items.len().min(limit.max(1));
                    buf.extend(queue.items.drain(..n));
                    if queue.items.is_empty() {
                        // Give back what a burst grew.
                        queue.items = VecDeque::new();
                    }
                    return n;
                }
                if queue.senders_gone {
                    return 0;
                }
            }
            ready.await;
        }
    }

    /// Whether nothing is queued right now.
    pub fn is_empty(&self) -> bool {
        lock(&self.shared.queue).items.is_empty()
    }

    /// Releases `bytes` after they were written to the socket.
    pub fn written(&self, bytes: usize) {
        let s = &self.shared;
        let before = s.pending.fetch_sub(bytes, Ordering::AcqRel);
        if before.saturating_sub(bytes) <= s.config.max_pending_bytes {
            s.full_since.store(0, Ordering::Release);
        }
        s.drained.notify_waiters();
    }

    /// When the queue, full now, becomes a slow consumer if nothing drains it.
    pub fn slow_deadline(&self) -> Option<Instant> {
        let since = self.shared.full_since.load(Ordering::Acquire);
        (since != 0)
            .then(|| self.shared.base + Duration::from_millis(since - 1) + self.shared.config.slow_consumer_timeout)
    }

    /// Closes the queue as a slow consumer if it is still full at its deadline; true
    /// when the queue is (now or already) closed as a slow consumer.
    pub fn check_slow(&self) -> bool {
        if let Some(deadline) = self.slow_deadline() {
            if Instant::now() >= deadline {
                self.shared.close(CloseReason::SlowConsumer);
            }
        }
        self.shared.reason() == Some(CloseReason::SlowConsumer)
    }

    /// Resolves when the queue closes, or closes it as a slow consumer when it stays
    /// full past its deadline. A writer blocked on a socket races this against the write.
    pub async fn until_closed_or_slow(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.shared.reason() {
                return reason;
            }
            match self.slow_deadline() {
                Some(deadline) => tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => { self.check_slow(); }
                    _ = self.closed() => {}
                },
                // Not full now; it can only become full through a push, which will
                // also have set the deadline: re-check then, or when closed.
                None => tokio::select! {
                    _ = tokio::time::sleep(self.shared.config.slow_consumer_timeout) => {}
                    _ = self.closed() => {}
                },
            }
        }
    }

    /// Why the queue closed, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.reason()
    }

    /// Resolves once the queue is closed (by any side, or as a slow consumer).
    pub async fn closed(&self) {
        self.shared.until_closed().await
    }

    /// Closes the queue from the writer's side.
    pub fn close(&self, reason: CloseReason) -> bool {
        self.shared.close(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Kind, Message, NewMessage};
    use crate::name::TopicName;

    fn message(len: usize) -> Arc<Message> {
        let topic = TopicName::parse("t").expect("name");
        Arc::new(Message::new(topic, 1, 0, NewMessage::new(Kind::Text, vec![b'x'; len])))
    }

    fn config(max: usize) -> OutboundConfig {
        OutboundConfig { max_pending_bytes: max, slow_consumer_timeout: Duration::from_secs(5) }
    }

    #[tokio::test(start_paused = true)]
    async fn stays_open_while_drained() {
        let (tx, mut rx) = outbound::<()>(config(1000));
        let mut buf = Vec::new();
        for _ in 0..100 {
            assert!(tx.push_message(message(400)));
            let n = rx.recv_many(&mut buf, 64).await;
            let bytes: usize = buf.drain(..n).map(|i| i.size()).sum();
            rx.written(bytes);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(tx.close_reason(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn full_past_timeout_closes_as_slow() {
        let (tx, rx) = outbound::<()>(config(1000));
        assert!(tx.push_message(message(500)));
        assert!(tx.push_message(message(500)), "over the limit: full, not closed yet");
        assert!(rx.slow_deadline().is_some());
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!rx.check_slow());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(rx.check_slow());
        assert_eq!(tx.close_reason(), Some(CloseReason::SlowConsumer));
        assert!(!tx.push_message(message(1)), "a closed queue takes nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn twice_the_limit_closes_at_once() {
        let (tx, _rx) = outbound::<()>(config(1000));
        assert!(tx.push_message(message(1000)));
        assert!(!tx.push_message(message(1000)));
        assert_eq!(tx.close_reason(), Some(CloseReason::SlowConsumer));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_below_the_limit_clears_full() {
        let (tx, mut rx) = outbound::<()>(config(1000));
        tx.push_message(message(600));
        tx.push_message(message(600));
        let mut buf = Vec::new();
        let n = rx.recv_many(&mut buf, 64).await;
        assert_eq!(n, 2);
        rx.written(buf[0].size());
        assert_eq!(rx.slow_deadline(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_push_reaches_the_writer_in_order_and_an_idle_queue_holds_nothing() {
        let (tx, mut rx) = outbound::<u32>(config(1 << 30));
        let pusher = tokio::spawn({
            let tx = tx.clone();
            async move {
                for i in 0..10_000u32 {
                    assert!(tx.push_control(i, 1));
                    if i % 100 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        });
        let mut got = Vec::new();
        let mut buf = Vec::new();
        while got.len() < 10_000 {
            let n = rx.recv_many(&mut buf, 512).await;
            assert!(n > 0 && n <= 512);
            got.extend(buf.drain(..).map(|item| match item {
                Item::Control(i, _) => i,
                Item::Message(_) => u32::MAX,
            }));
        }
        assert_eq!(got, (0..10_000).collect::<Vec<_>>(), "none lost, none reordered");
        assert_eq!(lock(&rx.shared.queue).items.capacity(), 0, "drained: no slots held");
        pusher.await.expect("pusher");
        // What was queued before the sending side went away is still written; then the end.
        tx.push_control(7, 1);
        drop(tx);
        assert_eq!(rx.recv_many(&mut buf, 8).await, 1);
        assert_eq!(rx.recv_many(&mut buf, 8).await, 0);
    }

    #[tokio::test]
    async fn a_queue_whose_writer_is_gone_takes_nothing() {
        let (tx, rx) = outbound::<()>(config(1000));
        drop(rx);
        assert!(!tx.push_message(message(1)));
    }
}
