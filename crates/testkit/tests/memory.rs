//! The memory store runs the store conformance suite (it keeps nothing across a
//! reopen, so the restart checks are skipped for it), and the queue engine over it runs
//! the queue conformance suite (one node: its "two nodes" are the same engine).

use std::sync::{Arc, Mutex};

use herald_core::{ManualClock, MemoryStore, QueueConfig, Queues, RetentionConfig, Store};
use herald_testkit::conformance::{Backend, Result};
use herald_testkit::queues::{Node, Opening, QueueBackend};

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

/// One engine over the memory store, handed to every "node".
#[derive(Default)]
struct Engine(Mutex<Option<Node>>);

impl QueueBackend for Engine {
    fn open<'a>(&'a self, config: QueueConfig, max_message_bytes: usize, clock: Arc<ManualClock>) -> Opening<'a> {
        Box::pin(async move {
            let mut node = self.0.lock().map_err(|_| "poisoned")?;
            let store = Arc::new(MemoryStore::with_clock(RetentionConfig::default(), clock.clone()));
            Ok(node.get_or_insert_with(|| Arc::new(Queues::new(store, clock, config, max_message_bytes))).clone())
        })
    }
}

mod queue_engine {
    use super::*;
    herald_testkit::queue_conformance!(Engine::default());
}
