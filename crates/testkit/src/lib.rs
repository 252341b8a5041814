//! Dev-only test kit for Herald's crates. Its one resident is the store conformance
//! suite ([`conformance`]): the guarantees of the `Store` trait, and of the queue engine
//! over a store, written once and run against every backend (memory here, disk in
//! `herald-store-disk`, and every later one) through [`store_conformance!`].
//!
//! It depends on `herald-core` only and is never a dependency of a shipped crate.

pub mod conformance;
