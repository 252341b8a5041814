//! The long-lived connections this node serves (WebSockets, SSE streams, gRPC Subscribe
//! streams), for the admin API: each registered by its [`crate::ConnectionGuard`] for
//! as long as it lives, with its door, address, user, queued bytes and a way to close
//! it (its subscriptions are its presence entries: [`crate::Presence::subscriptions`]). Registration and removal take one short lock per connection;
//! nothing here is on the message path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::message::{Clock, SystemClock};
use crate::metrics::Door;
use crate::outbound::{CloseReason, Outbound};

/// What the admin API can do to a connection: read its queued bytes, close it.
pub trait ConnectionHandle: Send + Sync {
    /// Bytes queued for the connection, not yet written.
    fn queued_bytes(&self) -> usize;
    /// Closes the connection as an administrator asked (WebSocket close 1008, the SSE
    /// stream ends, a gRPC stream ends with `UNAVAILABLE`).
    fn close(&self);
}

impl<C: Send + 'static> ConnectionHandle for Outbound<C> {
    fn queued_bytes(&self) -> usize {
        self.pending_bytes()
    }

    fn close(&self) {
        Outbound::close(self, CloseReason::Admin);
    }
}

/// One registered connection.
pub struct ConnectionInfo {
    /// Unique on this node while it runs (never reused).
    pub id: u64,
    /// The door it came through.
    pub door: Door,
    /// When it was registered (ms since the epoch).
    pub since_ms: u64,
    peer: OnceLock<SocketAddr>,
    user: OnceLock<Arc<str>>,
    handle: OnceLock<Arc<dyn ConnectionHandle>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConnectionInfo {
    /// Records the client's address (the first call counts).
    pub fn set_peer(&self, peer: SocketAddr) {
        let _ = self.peer.set(peer);
    }

    /// Records the authenticated user (the first call counts).
    pub fn set_user(&self, user: Arc<str>) {
        let _ = self.user.set(user);
    }

    /// Attaches what reads the queue and closes the connection (the first call counts).
    pub fn attach(&self, handle: Arc<dyn ConnectionHandle>) {
        let _ = self.handle.set(handle);
    }

    /// The client's address, if known.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer.get().copied()
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.get().map(|u| &**u)
    }

    /// Bytes queued for it, not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.handle.get().map_or(0, |h| h.queued_bytes())
    }
}

/// The registry of one broker.
#[derive(Default)]
pub struct Connections {
    next_id: std::sync::atomic::AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<ConnectionInfo>>>,
}

impl Connections {
    /// Registers a new connection through `door`.
    pub(crate) fn register(&self, door: Door) -> Arc<ConnectionInfo> {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let info = Arc::new(ConnectionInfo {
            id,
            door,
            since_ms: SystemClock.now_ms(),
            peer: OnceLock::new(),
            user: OnceLock::new(),
            handle: OnceLock::new(),
        });
        lock(&self.open).insert(id, info.clone());
        info
    }

    pub(crate) fn remove(&self, id: u64) {
        // Dropped outside the lock.
        let gone = lock(&self.open).remove(&id);
        drop(gone);
    }

    /// Up to `limit` connections with an id above `after`, by id.
    pub fn list(&self, after: u64, limit: usize) -> Vec<Arc<ConnectionInfo>> {
        lock(&self.open).range(after.saturating_add(1)..).take(limit).map(|(_, c)| c.clone()).collect()
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        lock(&self.open).len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes connection `id` as an administrator asked; false if there is none (or it
    /// has nothing to close it with yet).
    pub fn close(&self, id: u64) -> bool {
        let Some(info) = lock(&self.open).get(&id).cloned() else { return false };
        match info.handle.get() {
            Some(handle) => {
                tracing::info!(id, door = info.door.label(), peer = ?info.peer(), "connection closed by an administrator");
                handle.close();
                true
            }
            None => false,
        }
    }
}
