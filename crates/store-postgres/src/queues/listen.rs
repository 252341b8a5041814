//! The long polls of one [`super::PgQueues`]: this node's waiters by queue, and the
//! dedicated LISTEN connection that wakes them when another node (or this one) commits
//! a write that made messages ready in their queue. The connection reconnects with
//! backoff; while it is down waiters re-check on a timer (`super::RECHECK`), and once it
//! listens again every waiter re-checks, since notifications sent meanwhile are lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use herald_core::{QueueCounters, QueueName};
use tokio::sync::{oneshot, Notify};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Socket};
use tokio_util::sync::CancellationToken;

/// The LISTEN connection's reconnect backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The notification channel of `schema`'s queues: at most 63 bytes (PostgreSQL's
/// identifier length), a stable hash of the schema if its name is too long.
pub(super) fn channel_of(schema: &str) -> String {
    let plain = format!("herald.queues.{schema}");
    if plain.len() <= 63 {
        return plain;
    }
    // FNV-1a: the same on every node (RandomState would not be).
    let hash = schema.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("herald.queues.{hash:016x}")
}

/// This node's long polls, by queue, and whether notifications are coming in.
#[derive(Default)]
pub(super) struct Wakers {
    pub(super) queues: Mutex<HashMap<QueueName, Arc<Waiters>>>,
    pub(super) listening: AtomicBool,
}

#[derive(Default)]
pub(super) struct Waiters {
    /// Changed under the map's lock only.
    pub(super) count: AtomicUsize,
    pub(super) ready: Notify,
}

/// The map's lock is never held across an await: each section is a lookup or an update.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Wakers {
    /// A notification for `queue`: jobs became ready there. Wakes one of its waiters; a
    /// waiter whose fetch came back full passes the wake-up on to two more
    /// ([`PassOn`]), so a burst wakes as many waiters as it can feed (doubling per
    /// round) and one job wakes one, instead of every waiter racing to fetch it.
    fn wake(&self, queue: &str) {
        let queues = lock(&self.queues);
        if let Some(w) = QueueName::parse(queue).ok().and_then(|q| queues.get(&q).cloned()) {
            w.ready.notify_one();
        }
    }

    pub(super) fn wake_all(&self) {
        for w in lock(&self.queues).values() {
            w.ready.notify_waiters();
        }
    }
}

/// The wake-up a woken waiter holds until its fetch tells whether its queue may hold
/// more ready jobs: [`PassOn::more`] (the fetch came back full) wakes two more waiters,
/// [`PassOn::drained`] none. Dropped otherwise (the fetch failed, the caller went
/// away), it wakes one, so a wake-up is never lost with its waiter.
pub(super) struct PassOn<'a>(Option<&'a Notify>);

impl<'a> PassOn<'a> {
    pub(super) fn new(ready: &'a Notify) -> Self {
        Self(Some(ready))
    }

    /// The queue may hold more: two more waiters try.
    pub(super) fn more(mut self) {
        if let Some(ready) = self.0.take() {
            ready.notify_one();
            ready.notify_one();
        }
    }

    /// The fetch got less than it asked for: the ready jobs are taken.
    pub(super) fn drained(mut self) {
        self.0 = None;
    }
}

impl Drop for PassOn<'_> {
    fn drop(&mut self) {
        if let Some(ready) = self.0.take() {
            ready.notify_one();
        }
    }
}

/// A waiting fetch; dropped, it leaves its queue's waiters.
pub(super) struct Waiting {
    pub(super) wakers: Arc<Wakers>,
    pub(super) counters: Arc<QueueCounters>,
    pub(super) queue: QueueName,
    pub(super) waiters: Arc<Waiters>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.counters.waiting.fetch_sub(1, Ordering::AcqRel);
        let mut queues = lock(&self.wakers.queues);
        if self.waiters.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            queues.remove(&self.queue);
        }
    }
}

/// The LISTEN connection: (re)connects with backoff, listens, wakes waiters per
/// notification, and every waiter once it listens (again), since notifications sent
/// while it was down are lost. `started` learns how the first attempt went.
pub(super) async fn run_listener<T>(
    config: tokio_postgres::Config,
    tls: T,
    channel: String,
    wakers: Arc<Wakers>,
    shutdown: CancellationToken,
    started: oneshot::Sender<Result<(), tokio_postgres::Error>>,
) where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let mut started = Some(started);
    let mut backoff = BACKOFF_MIN;
    loop {
        let ended = listen_once(&config, &tls, &channel, &wakers, &shutdown, &mut started, &mut backoff).await;
        wakers.listening.store(false, Ordering::Release);
        if shutdown.is_cancelled() {
            return;
        }
        match ended {
            Err(e) => {
                if let Some(tx) = started.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "postgres LISTEN connection for queue wake-ups lost");
            }
            Ok(()) => tracing::warn!(retry_in = ?backoff, "postgres LISTEN connection for queue wake-ups closed"),
        }
        // Waiters switch to re-checking every second until it listens again.
        wakers.wake_all();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn listen_once<T>(
    config: &tokio_postgres::Config,
    tls: &T,
    channel: &str,
    wakers: &Wakers,
    shutdown: &CancellationToken,
    started: &mut Option<oneshot::Sender<Result<(), tokio_postgres::Error>>>,
    backoff: &mut Duration,
) -> Result<(), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, mut connection) = tokio::select! {
        c = config.connect(tls.clone()) => c?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
    let listening = client.batch_execute(&statement);
    tokio::pin!(listening);
    // The connection is driven by polling its messages, also while LISTEN runs.
    loop {
        tokio::select! {
            done = &mut listening => {
                done?;
                break;
            }
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    wakers.listening.store(true, Ordering::Release);
    *backoff = BACKOFF_MIN;
    wakers.wake_all();
    if let Some(tx) = started.take() {
        let _ = tx.send(Ok(()));
    } else {
        tracing::info!(channel, "postgres LISTEN connection for queue wake-ups restored");
    }
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(n))) => wakers.wake(n.payload()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
