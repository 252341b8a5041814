//! A Redis store under a key prefix of its own on the Redis at 127.0.0.1:6379
//! (`.ci/run` starts one); the prefix's keys are deleted when the backend is dropped.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use herald_core::{Clock, Kind, NewMessage, RetentionConfig};
use herald_store_redis::{RedisConfig, RedisStore};

pub const URL: &str = "redis://127.0.0.1:6379/";

/// The seed nodes of the local Redis Cluster that `tools/redis-cluster.sh` starts.
pub const CLUSTER_URL: &str = "redis://127.0.0.1:7101/,redis://127.0.0.1:7102/,redis://127.0.0.1:7103/";

/// Starts the local Redis Cluster unless it answers already (the script is idempotent
/// and serializes concurrent callers).
pub fn ensure_cluster() -> std::io::Result<()> {
    static STARTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *STARTED.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/redis-cluster.sh");
        std::process::Command::new(script).arg("start").status().is_ok_and(|s| s.success())
    });
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other("tools/redis-cluster.sh start failed"))
    }
}

/// A key prefix no other test or run uses.
pub fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("herald-test:{}:{nanos}:{n}:", std::process::id())
}

/// Connects a store with `prefix`, from synchronous code on a multi-threaded runtime.
pub fn connect_blocking(
    prefix: &str,
    retention: RetentionConfig,
    clock: Arc<dyn Clock>,
) -> std::result::Result<RedisStore, herald_store_redis::RedisStoreError> {
    connect_blocking_at(URL, prefix, retention, clock)
}

/// As [`connect_blocking`], to the server (or cluster) at `url`.
pub fn connect_blocking_at(
    url: &str,
    prefix: &str,
    retention: RetentionConfig,
    clock: Arc<dyn Clock>,
) -> std::result::Result<RedisStore, herald_store_redis::RedisStoreError> {
    let config = RedisConfig { url: url.to_owned(), prefix: prefix.to_owned(), retention };
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(RedisStore::connect(config, clock)))
}

/// Deletes every key under `prefix`.
pub fn delete_prefix(prefix: &str) -> redis::RedisResult<()> {
    delete_prefix_at(URL, prefix)
}

/// Deletes every key under `prefix` on each server of `urls` (comma-separated), one key
/// at a time (a Redis Cluster refuses a DEL across slots).
pub fn delete_prefix_at(urls: &str, prefix: &str) -> redis::RedisResult<()> {
    for url in urls.split(',') {
        let mut con = redis::Client::open(url)?.get_connection()?;
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut con)?;
        for key in keys {
            redis::cmd("DEL").arg(&key).query::<()>(&mut con)?;
        }
    }
    Ok(())
}

/// A test's result.
pub type Result = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A text message.
pub fn text(s: &str) -> NewMessage {
    NewMessage::new(Kind::Text, Bytes::copy_from_slice(s.as_bytes()))
}

/// Runs `test` under a fresh key prefix, then deletes the prefix's keys whatever it
/// returned.
pub async fn in_fresh_prefix<F: std::future::Future<Output = Result>>(test: impl FnOnce(String) -> F) -> Result {
    let prefix = unique_prefix();
    let result = test(prefix.clone()).await;
    tokio::task::block_in_place(|| delete_prefix(&prefix))?;
    result
}
