//! The one writer discipline every front door runs (WebSocket, SSE, gRPC Subscribe):
//! take a batch from the connection's [`OutboundRx`], encode it, write all of it and
//! flush, and only then release its bytes from the queue's bound. Every wait on the
//! socket (a batch, a keepalive, a first event) races shutdown and the slow-consumer
//! policy, so a peer that stops reading can hold a writer past neither.
//!
//! A front door supplies only its socket side, a [`SocketWriter`]: how to write a batch,
//! what to write first, and its own timer (WebSocket Pings, idle keepalives).
//! [`run_writer`] owns the loop, the byte accounting and the slow-consumer count, so the
//! doors cannot drift apart on them.

use std::future::Future;
use std::pin::Pin;

use tokio::time::{sleep_until, Instant};

use prometheus::Histogram;

use crate::metrics::Metrics;
use crate::outbound::{CloseReason, Item, OutboundRx};

/// Why a connection's writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterEnd<S> {
    /// The server is shutting down.
    Shutdown,
    /// The queue was closed as a slow consumer; [`run_writer`] has counted it.
    SlowConsumer,
    /// The queue was closed by its owner (the connection is ending, a replay failed).
    Closed,
    /// An administrator closed the connection.
    Admin,
    /// The socket side ended it: a failed write, or what the front door asked for.
    Socket(S),
}

/// A front door's socket side of the writer discipline. Every future it returns is raced
/// against shutdown and the slow-consumer policy by [`run_writer`], which may drop it
/// at any await.
pub trait SocketWriter<C>: Send {
    /// Why the socket side ends a connection (a failed write, a close it was asked for).
    type Stop: Send;

    /// Writes what the connection sends before any queued item (a `subscribed` event).
    fn start(&mut self) -> impl Future<Output = Result<(), Self::Stop>> + Send {
        async { Ok(()) }
    }

    /// Encodes and writes every item of `batch`, draining it, and flushes. The batch's
    /// bytes stay counted in the queue until this resolves `Ok`.
    fn write_batch(&mut self, batch: &mut Vec<Item<C>>) -> impl Future<Output = Result<(), Self::Stop>> + Send;

    /// When the front door's own timer (keepalive Ping, idle keepalive) fires next.
    fn next_timer(&self) -> Instant;

    /// The timer fired: write a keepalive, or stop (a peer that stopped answering).
    fn on_timer(&mut self) -> impl Future<Output = Result<(), Self::Stop>> + Send;
}

/// Runs `write` (one wait on the socket) to its end, unless shutdown or the queue's
/// closing (by its owner, or as a slow consumer once it stays full past its deadline)
/// comes first.
pub async fn guarded<C, S>(
    rx: &OutboundRx<C>,
    write: impl Future<Output = Result<(), S>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WriterEnd<S>> {
    tokio::select! {
        biased;
        r = write => r.map_err(WriterEnd::Socket),
        reason = rx.until_closed_or_slow() => Err(ended(reason)),
        _ = shutdown => Err(WriterEnd::Shutdown),
    }
}

fn ended<S>(reason: CloseReason) -> WriterEnd<S> {
    match reason {
        CloseReason::SlowConsumer => WriterEnd::SlowConsumer,
        CloseReason::Closed => WriterEnd::Closed,
        CloseReason::Admin => WriterEnd::Admin,
    }
}

/// Drains `rx` into `socket` in batches of up to `batch_limit` items until the
/// connection ends; counts a slow consumer in `metrics` and closes the queue (so fan-out
/// drops its subscriptions) before it returns why.
///
/// `shutdown` comes pinned by the caller: a future taken by value would be kept twice
/// in the connection's task (as the argument and as the pinned local), for its whole
/// life.
pub async fn run_writer<C, W, F>(
    mut rx: OutboundRx<C>,
    socket: &mut W,
    shutdown: Pin<&mut F>,
    metrics: &Metrics,
    batch_limit: usize,
) -> WriterEnd<W::Stop>
where
    W: SocketWriter<C>,
    F: Future<Output = ()>,
{
    let end = drive(&mut rx, socket, shutdown, &metrics.latency.fanout, batch_limit).await;
    if let WriterEnd::SlowConsumer = end {
        Metrics::add(&metrics.slow_consumers, 1);
    }
    rx.close(CloseReason::Closed);
    end
}

async fn drive<C, W, F>(
    rx: &mut OutboundRx<C>,
    socket: &mut W,
    mut shutdown: Pin<&mut F>,
    fanout: &Histogram,
    batch_limit: usize,
) -> WriterEnd<W::Stop>
where
    W: SocketWriter<C>,
    F: Future<Output = ()>,
{
    // Every wait but the idle one is boxed (an allocation per batch or timer): the
    // future of an idle connection then holds only what it waits on, not the larger
    // states of a batch in flight.
    if let Err(end) = Box::pin(guarded(rx, socket.start(), shutdown.as_mut())).await {
        return end;
    }
    // Allocated as items arrive and freed when the queue runs dry: an idle connection
    // holds no batch (512 slots would be 20 KiB per connection).
    let mut batch: Vec<Item<C>> = Vec::new();
    loop {
        let slow = rx.slow_deadline();
        let timer = socket.next_timer();
        tokio::select! {
            biased;
            _ = shutdown.as_mut() => return WriterEnd::Shutdown,
            n = rx.recv_many(&mut batch, batch_limit) => {
                if n == 0 {
                    return ended(rx.close_reason().unwrap_or(CloseReason::Closed));
                }
                let bytes: usize = batch.iter().map(Item::size).sum();
                // The batch's oldest live message times the fan-out (one observation
                // per write, not per delivery).
                let since = batch.iter().find_map(|item| match item {
                    Item::Message(m) => m.since(),
                    Item::Control(..) => None,
                });
                let written = Box::pin(guarded(rx, socket.write_batch(&mut batch), shutdown.as_mut())).await;
                // A socket side that stopped early leaves items behind: never resend them.
                batch.clear();
                if let Err(end) = written {
                    return end;
                }
                // Written and flushed: only now do these bytes leave the bound.
                rx.written(bytes);
                if let Some(since) = since {
                    fanout.observe(since.elapsed().as_secs_f64());
                }
                if rx.is_empty() {
                    batch = Vec::new();
                }
            }
            // One timer for both deadlines (one fewer in an idle connection's future).
            _ = sleep_until(slow.map_or(timer, |slow| slow.min(timer))) => {
                // Full and not drained by a write in time: closed as a slow consumer.
                if slow.is_some() && rx.check_slow() {
                    return WriterEnd::SlowConsumer;
                }
                if Instant::now() >= timer {
                    if let Err(end) = Box::pin(guarded(rx, socket.on_timer(), shutdown.as_mut())).await {
                        return end;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::OutboundConfig;
    use crate::message::{Kind, Message, NewMessage};
    use crate::name::TopicName;
    use crate::outbound::outbound;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn message(len: usize) -> Result<Arc<Message>, Box<dyn std::error::Error>> {
        let topic = TopicName::parse("t")?;
        Ok(Arc::new(Message::new(topic, 1, 0, NewMessage::new(Kind::Text, vec![b'x'; len]))))
    }

    /// A socket whose writes block until `open` is notified, counting what it wrote;
    /// its timer writes a keepalive that blocks the same way.
    struct Gate {
        open: Arc<tokio::sync::Notify>,
        written: usize,
        keepalives: usize,
        next: Instant,
    }

    impl SocketWriter<()> for Gate {
        type Stop = ();

        async fn write_batch(&mut self, batch: &mut Vec<Item<()>>) -> Result<(), ()> {
            self.open.notified().await;
            self.written += batch.drain(..).count();
            Ok(())
        }

        fn next_timer(&self) -> Instant {
            self.next
        }

        async fn on_timer(&mut self) -> Result<(), ()> {
            self.next = Instant::now() + Duration::from_secs(1);
            self.open.notified().await;
            self.keepalives += 1;
            Ok(())
        }
    }

    fn config() -> OutboundConfig {
        OutboundConfig { max_pending_bytes: 1000, slow_consumer_timeout: Duration::from_secs(5) }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_released_only_after_the_write() -> TestResult {
        let (tx, rx) = outbound::<()>(config());
        let open = Arc::new(tokio::sync::Notify::new());
        let mut gate =
            Gate { open: open.clone(), written: 0, keepalives: 0, next: Instant::now() + Duration::from_secs(60) };
        let metrics = Metrics::default();
        let shutdown = tokio::sync::Notify::new();
        tx.push_message(message(400)?);
        let end = {
            let notified = std::pin::pin!(shutdown.notified());
            let writer = run_writer(rx, &mut gate, notified, &metrics, 16);
            tokio::pin!(writer);
            // The writer took the message and waits on the socket: still counted.
            assert!(futures_poll(&mut writer).await.is_none());
            assert_eq!(tx.pending_bytes(), 496);
            open.notify_one();
            assert!(futures_poll(&mut writer).await.is_none());
            assert_eq!(tx.pending_bytes(), 0, "released once written");
            shutdown.notify_one();
            writer.await
        };
        assert_eq!(end, WriterEnd::Shutdown);
        assert_eq!(gate.written, 1);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_keepalive_still_ends_as_a_slow_consumer() -> TestResult {
        let (tx, rx) = outbound::<()>(config());
        let mut gate =
            Gate { open: Arc::new(tokio::sync::Notify::new()), written: 0, keepalives: 0, next: Instant::now() };
        let metrics = Metrics::default();
        let end = {
            let never = std::pin::pin!(std::future::pending());
            let writer = run_writer(rx, &mut gate, never, &metrics, 16);
            tokio::pin!(writer);
            // The keepalive blocks on the socket; a push past twice the bound closes the queue.
            assert!(futures_poll(&mut writer).await.is_none());
            tx.push_message(message(2000)?);
            writer.await
        };
        assert_eq!(end, WriterEnd::SlowConsumer);
        assert_eq!(metrics.slow_consumers.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(gate.keepalives, 0);
        Ok(())
    }

    /// Polls `fut`, lets the tasks it woke run (one yield), polls it again; `Some` if it
    /// finished.
    async fn futures_poll<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = fut => Some(out),
            _ = tokio::task::yield_now() => None,
        }
    }
}
