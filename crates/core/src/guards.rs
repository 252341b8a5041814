//! What every front door holds while it serves a subscriber, whatever its transport:
//! a [`ConnectionGuard`] (the count behind `max_connections` and the connections
//! gauge), a [`SubscriptionGuard`] (the subscription ends when it drops), and the
//! [`ReplayTask`] that feeds history into the subscriber's outbound queue, paced by the
//! client and yielding to live traffic, before the live messages held for it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::broker::{Broker, Replay, SubscriptionId};
use crate::connections::ConnectionInfo;
use crate::metrics::Door;
use crate::name::TopicName;
use crate::outbound::{CloseReason, Outbound};

/// Counts one long-lived connection for as long as it lives, in all and by door, and
/// registers it for the admin API ([`crate::Connections`]).
pub struct ConnectionGuard {
    broker: Broker,
    info: Arc<ConnectionInfo>,
}

impl ConnectionGuard {
    /// Counts and registers a connection through `door` on `broker` until dropped.
    pub fn new(broker: &Broker, door: Door) -> Self {
        let m = broker.metrics();
        m.connections.fetch_add(1, Ordering::Relaxed);
        m.connections_by_door[door as usize].fetch_add(1, Ordering::Relaxed);
        let info = broker.connections().register(door);
        Self { broker: broker.clone(), info }
    }

    /// The connection's entry: set its address, user, topics and handle here.
    pub fn info(&self) -> &Arc<ConnectionInfo> {
        &self.info
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let m = self.broker.metrics();
        m.connections.fetch_sub(1, Ordering::Relaxed);
        m.connections_by_door[self.info.door as usize].fetch_sub(1, Ordering::Relaxed);
        self.broker.connections().remove(self.info.id);
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

/// Replays history into `out` in chunks paced by the client (and by live traffic, see
/// [`yield_to_live`]), then switches the
/// subscription to live. If the history cannot be read the queue is closed, since the
/// subscription cannot go on without a gap.
pub fn spawn_replay<C: Send + 'static>(mut replay: Replay, out: Arc<Outbound<C>>) -> ReplayTask {
    ReplayTask(tokio::spawn(async move {
        // Pacing target: half the bound keeps the socket busy without filling the queue.
        let resume_below = out.max_pending_bytes() / 2;
        let mut live = replay.live_appends();
        loop {
            // Alone, a replay streams at full speed; while live messages are being
            // fanned out on this node, it is background work.
            let now = replay.live_appends();
            if now != live {
                live = now;
                yield_to_live().await;
            }
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

/// Scheduling lag a replay accepts before it backs off: below it the runtime has no
/// backlog worth protecting.
const LAG_TARGET: Duration = Duration::from_micros(200);

/// Longest pause between two chunks of one replay, so that a replay under sustained
/// load still makes progress (at least [`REPLAY_CHUNK`] messages per pause).
const MAX_PAUSE: Duration = Duration::from_millis(20);

/// Makes a replay background work (as LEDBAT does for bulk transfers): before each
/// chunk read while live traffic flows, the replay yields and measures how long the runtime takes to come back to it,
/// which is the backlog of ready tasks (live fan-out, publishes) queued ahead of it.
/// Above [`LAG_TARGET`] it pauses for a time growing with that lag, so history streams
/// at full speed on an idle server and gives way to live traffic on a busy one.
async fn yield_to_live() {
    let asked = Instant::now();
    tokio::task::yield_now().await;
    let pause = pause_after(asked.elapsed());
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
}

/// The pause a replay takes after a scheduling lag of `lag`: none up to the target,
/// then four times the excess, at most [`MAX_PAUSE`].
fn pause_after(lag: Duration) -> Duration {
    lag.saturating_sub(LAG_TARGET).saturating_mul(4).min(MAX_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_pauses_only_beyond_the_target_and_at_most_max_pause() {
        assert_eq!(pause_after(Duration::ZERO), Duration::ZERO);
        assert_eq!(pause_after(LAG_TARGET), Duration::ZERO);
        assert_eq!(pause_after(LAG_TARGET + Duration::from_micros(100)), Duration::from_micros(400));
        assert_eq!(pause_after(Duration::from_secs(1)), MAX_PAUSE);
    }

    /// On a runtime whose only other task never stops being ready, the replay's yield
    /// comes back late and it pauses; on an idle one it does not.
    #[tokio::test(flavor = "current_thread", start_paused = false)]
    async fn a_busy_runtime_makes_the_replay_wait() {
        let started = Instant::now();
        yield_to_live().await;
        let idle = started.elapsed();
        assert!(idle < MAX_PAUSE, "idle runtime: replay went on at once ({idle:?})");

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = tokio::spawn({
            let stop = stop.clone();
            async move {
                // Live work: each poll holds the thread for 1 ms, then yields.
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    tokio::task::yield_now().await;
                }
            }
        });
        tokio::task::yield_now().await; // let it start
        let started = Instant::now();
        yield_to_live().await;
        let waited = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        busy.await.expect("busy task");
        // The lag was at least one busy poll (1 ms): the pause adds 4 x (lag - 200 µs).
        assert!(waited >= Duration::from_millis(4), "busy runtime: replay waited only {waited:?}");
    }
}
