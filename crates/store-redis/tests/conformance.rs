//! The Redis store runs the store conformance suite, restarts included (a restart is
//! a new connection with the same key prefix), against the Redis on 127.0.0.1:6379.

mod common;

use std::sync::Arc;

use herald_core::{ManualClock, RetentionConfig, Store};
use herald_testkit::conformance::{Backend, Result};

/// A Redis store under a key prefix of its own, whose keys are deleted on drop.
struct Redis {
    prefix: String,
}

impl Redis {
    fn new() -> Self {
        Self { prefix: common::unique_prefix() }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        let deleted = tokio::task::block_in_place(|| common::delete_prefix(&prefix));
        if let Err(e) = deleted {
            eprintln!("could not delete the keys under {prefix}: {e}");
        }
    }
}

impl Backend for Redis {
    fn open(&self, retention: RetentionConfig, clock: Arc<ManualClock>) -> Result<Arc<dyn Store>> {
        Ok(Arc::new(common::connect_blocking(&self.prefix, retention, clock)?))
    }
    fn durable(&self) -> bool {
        true
    }
}

herald_testkit::store_conformance!(Redis::new());
