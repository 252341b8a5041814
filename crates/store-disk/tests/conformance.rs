//! The disk store runs the store conformance suite, restarts included: once with the
//! default segment size, and once with 4 KiB segments so that segment switches and
//! checkpoints happen inside the cases.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use herald_core::{ManualClock, RetentionConfig, Store};
use herald_store_disk::{DiskConfig, DiskStore};
use herald_testkit::conformance::{Backend, Result};

/// A disk store in a directory of its own, removed when the backend is dropped.
struct Disk {
    dir: PathBuf,
    segment_bytes: u64,
}

impl Disk {
    fn new(segment_bytes: u64) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("herald-conformance-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self { dir, segment_bytes }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Backend for Disk {
    fn open(&self, retention: RetentionConfig, clock: Arc<ManualClock>) -> Result<Arc<dyn Store>> {
        let config = DiskConfig { segment_bytes: self.segment_bytes, retention, ..DiskConfig::new(&self.dir) };
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
