//! Dev-only test kit for Herald's crates: the store conformance suite ([`conformance`]),
//! the guarantees of the `Store` trait and of the queue engine over a store, and the
//! queue conformance suite ([`queues`]), the semantics of every `QueueService` (one
//! node's engine, or queues the nodes of a cluster share). Each is written once and run
//! against every backend (memory here, disk in `herald-store-disk`, Redis in
//! `herald-store-redis`) through [`store_conformance!`] and [`queue_conformance!`].
//!
//! [`pg`] holds the PostgreSQL fault tests' helpers (a database URL's address, a TCP
//! proxy that can be cut), shared by the store's tests and the server's.
//!
//! It is never a dependency of a shipped crate.

pub mod conformance;
pub mod pg;
pub mod queues;
