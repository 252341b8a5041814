//! Herald's PostgreSQL store. This worktree's stand-in holds only the work queues every
//! node shares ([`PgQueues`], `queues.rs`, tables in `migrations/002_queues.sql`); the
//! pool, configuration and migration runner come with the topic store.

mod queues;

pub use queues::{PgQueues, PgQueuesError};
