//! A PostgreSQL store in a schema of its own on the server at 127.0.0.1:5432 (or
//! `HERALD_TEST_POSTGRES_URL`); the schema is dropped with the [`Schema`] guard.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_core::{Clock, Kind, NewMessage, RetentionConfig};
use herald_store_postgres::{PgConfig, PgError, PgStore};

/// A test's result.
pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The server the tests use.
pub fn url() -> String {
    std::env::var("HERALD_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The test server's address, user and database (as `url()` names them).
pub fn server() -> Result<(std::net::SocketAddr, String, String)> {
    herald_testkit::pg::server(&url())
}

/// A schema name no other test or run uses.
pub fn unique_schema() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("herald_test_{}_{n}_{}", std::process::id(), nanos % 1_000_000_000_000)
}

/// The settings of a test store in `schema`: a small pool (many tests share the
/// server's 100 connections).
pub fn config(schema: &str, retention: RetentionConfig) -> PgConfig {
    PgConfig {
        url: url(),
        schema: schema.to_owned(),
        pool_size: 4,
        statement_timeout: Duration::from_secs(10),
        retention,
        password: None,
    }
}

/// Connects a store from synchronous code on a multi-threaded runtime.
pub fn connect_blocking(config: PgConfig, clock: Arc<dyn Clock>) -> std::result::Result<PgStore, PgError> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(PgStore::connect(config, clock)))
}

/// A direct connection (no pool) for the tests' own SQL.
pub async fn raw() -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A unique schema, dropped (with everything in it) when this is dropped.
pub struct Schema(pub String);

impl Schema {
    pub fn new() -> Self {
        Self(unique_schema())
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.0.clone();
        let dropped = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                raw().await?.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        });
        if let Err(e) = dropped {
            eprintln!("could not drop schema {name}: {e}");
        }
    }
}

/// A text message.
pub fn text(s: &str) -> NewMessage {
    NewMessage::new(Kind::Text, Bytes::copy_from_slice(s.as_bytes()))
}
