//! The disk store runs the store conformance suite, restarts included: once with the
//! default segment size, once with 4 KiB segments so that segment switches and
//! checkpoints happen inside the cases, and once with those and no cache, so that every
//! read is a cold one. The queue engine over it runs the queue
//! conformance suite (one node: its "two nodes" are the same engine).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use herald_core::{ManualClock, QueueConfig, Queues, RetentionConfig, Store};
use herald_store_disk::{DiskConfig, DiskStore};
use herald_testkit::conformance::{Backend, Result};
use herald_testkit::queues::{Node, Opening, QueueBackend};

/// A disk store in a directory of its own, removed when the backend is dropped.
struct Disk {
    dir: PathBuf,
    segment_bytes: u64,
    cache_bytes: u64,
    /// The queue engine every "node" of the queue suite shares.
    engine: Mutex<Option<Node>>,
}

impl Disk {
    fn new(segment_bytes: u64) -> Self {
        Self::with_cache(segment_bytes, DiskConfig::new("").cache_bytes)
    }

    fn with_cache(segment_bytes: u64, cache_bytes: u64) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("herald-conformance-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self { dir, segment_bytes, cache_bytes, engine: Mutex::new(None) }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Backend for Disk {
    fn open(&self, retention: RetentionConfig, clock: Arc<ManualClock>) -> Result<Arc<dyn Store>> {
        let config = DiskConfig {
            segment_bytes: self.segment_bytes,
            cache_bytes: self.cache_bytes,
            retention,
            ..DiskConfig::new(&self.dir)
        };
        Ok(Arc::new(DiskStore::open_with_clock(config, clock)?))
    }
    fn durable(&self) -> bool {
        true
    }
}

mod default_segments {
    use super::Disk;
    herald_testkit::store_conformance!(Disk::new(64 << 20));
}

mod tiny_segments {
    use super::Disk;
    herald_testkit::store_conformance!(Disk::new(4096));
}

/// No cache: every read of history goes to the log (sealed segments through their
/// sidecars), and retention trims cold runs.
mod no_cache {
    use super::Disk;
    herald_testkit::store_conformance!(Disk::with_cache(4096, 0));
}

impl QueueBackend for Disk {
    fn open<'a>(&'a self, config: QueueConfig, max_message_bytes: usize, clock: Arc<ManualClock>) -> Opening<'a> {
        Box::pin(async move {
            let mut engine = self.engine.lock().map_err(|_| "poisoned")?;
            if let Some(node) = &*engine {
                return Ok(node.clone());
            }
            let store = Backend::open(self, RetentionConfig::default(), clock.clone())?;
            let node: Node = Arc::new(Queues::new(store, clock, config, max_message_bytes));
            *engine = Some(node.clone());
            Ok(node)
        })
    }
}

mod queue_engine {
    use super::Disk;
    herald_testkit::queue_conformance!(Disk::new(64 << 20));
}
