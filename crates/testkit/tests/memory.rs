//! The memory store runs the store conformance suite (it keeps nothing across a
//! reopen, so the restart checks are skipped for it).

use std::sync::Arc;

use herald_core::{ManualClock, MemoryStore, RetentionConfig, Store};
use herald_testkit::conformance::{Backend, Result};

struct Memory;

impl Backend for Memory {
    fn open(&self, retention: RetentionConfig, clock: Arc<ManualClock>) -> Result<Arc<dyn Store>> {
        Ok(Arc::new(MemoryStore::with_clock(retention, clock)))
    }
    fn durable(&self) -> bool {
        false
    }
}

herald_testkit::store_conformance!(Memory);
