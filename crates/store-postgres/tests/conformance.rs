//! The PostgreSQL store runs the store conformance suite against the server at
//! 127.0.0.1:5432 (or `HERALD_TEST_POSTGRES_URL`), restarts included: a restart is a
//! new store (new pool) on the same schema. Each case has a schema of its own, dropped
//! at its end.

mod common;

use std::sync::Arc;

use herald_core::{ManualClock, RetentionConfig, Store};
use herald_testkit::conformance::{Backend, Result};

/// A PostgreSQL store in a schema of its own.
struct Postgres {
    schema: common::Schema,
}

impl Backend for Postgres {
    fn open(&self, retention: RetentionConfig, clock: Arc<ManualClock>) -> Result<Arc<dyn Store>> {
        Ok(Arc::new(common::connect_blocking(common::config(&self.schema.0, retention), clock)?))
    }

    fn durable(&self) -> bool {
        true
    }
}

herald_testkit::store_conformance!(Postgres { schema: common::Schema::new() });
