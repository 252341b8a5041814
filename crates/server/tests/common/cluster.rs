//! Cluster test helpers: nodes on the Redis at 127.0.0.1:6379 (or another), each under
//! a key prefix of its own that is deleted when the test ends.

use herald_core::Role;

use super::{start, Result, TestServer};

/// The Redis `.ci/run` starts.
pub const REDIS: &str = "redis://127.0.0.1:6379/";

/// The seed nodes of the local Redis Cluster (three primaries) `tools/redis-cluster.sh`
/// starts; [`ensure_redis_cluster`] starts it if needed.
pub const REDIS_CLUSTER: &str = "redis://127.0.0.1:7101/,redis://127.0.0.1:7102/,redis://127.0.0.1:7103/";

/// Starts the local Redis Cluster unless it answers already.
pub fn ensure_redis_cluster() -> Result {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/redis-cluster.sh");
    let status = std::process::Command::new(script).arg("start").status()?;
    if !status.success() {
        return Err("tools/redis-cluster.sh start failed".into());
    }
    Ok(())
}

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
        // The prefix's keys, on the standalone Redis and on each primary of the cluster
        // (one key at a time: a cluster refuses a DEL across slots).
        for url in REDIS.split(',').chain(REDIS_CLUSTER.split(',')) {
            let cleaned = (|| -> redis::RedisResult<()> {
                let mut con = redis::Client::open(url)?.get_connection()?;
                let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}*", self.0)).query(&mut con)?;
                for key in keys {
                    redis::cmd("DEL").arg(&key).query::<()>(&mut con)?;
                }
                Ok(())
            })();
            if let Err(e) = cleaned {
                if url == REDIS {
                    eprintln!("could not delete the test keys under {} on {url}: {e}", self.0);
                }
            }
        }
    }
}

/// A node of the cluster on the Redis at [`REDIS`], under `prefix`.
pub async fn node(prefix: &Prefix, role: Role) -> Result<TestServer> {
    node_on(REDIS, prefix, role).await
}

/// A node of the cluster on the Redis at `url`, under `prefix`.
pub async fn node_on(url: &str, prefix: &Prefix, role: Role) -> Result<TestServer> {
    tuned_node_on(url, prefix, role, |_| {}).await
}

/// As [`node_on`], after `tune` adjusts the rest of the config.
pub async fn tuned_node_on(
    url: &str,
    prefix: &Prefix,
    role: Role,
    tune: impl FnOnce(&mut herald_server::Config),
) -> Result<TestServer> {
    start(|c| {
        c.store = herald_server::StoreKind::Redis;
        c.cluster.redis = Some(url.to_owned());
        c.cluster.prefix = prefix.0.clone();
        c.broker.role = role;
        tune(c);
    })
    .await
}
