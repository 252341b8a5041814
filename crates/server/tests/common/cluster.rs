//! Cluster test helpers: nodes on the Redis at 127.0.0.1:6379 (or another), each under
//! a key prefix of its own that is deleted when the test ends.

use herald_core::Role;

use super::{start, Result, TestServer};

/// The Redis `.ci/run` starts.
pub const REDIS: &str = "redis://127.0.0.1:6379/";

/// A key prefix no other test or run uses; its keys are deleted on drop.
pub struct Prefix(pub String);

impl Prefix {
    pub fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Self(format!("herald-test:{name}:{}:{nanos}:", std::process::id()))
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let cleaned = (|| -> redis::RedisResult<()> {
            let mut con = redis::Client::open(REDIS)?.get_connection()?;
            let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}*", self.0)).query(&mut con)?;
            if !keys.is_empty() {
                redis::cmd("DEL").arg(&keys).query::<()>(&mut con)?;
            }
            Ok(())
        })();
        if let Err(e) = cleaned {
            eprintln!("could not delete the test keys under {}: {e}", self.0);
        }
    }
}

/// A node of the cluster on the Redis at [`REDIS`], under `prefix`.
pub async fn node(prefix: &Prefix, role: Role) -> Result<TestServer> {
    node_on(REDIS, prefix, role).await
}

/// A node of the cluster on the Redis at `url`, under `prefix`.
pub async fn node_on(url: &str, prefix: &Prefix, role: Role) -> Result<TestServer> {
    start(|c| {
        c.store = herald_server::StoreKind::Redis;
        c.cluster.redis = Some(url.to_owned());
        c.cluster.prefix = prefix.0.clone();
        c.broker.role = role;
    })
    .await
}
