//! `Con`: the store's command connection, to a standalone Redis or a Redis Cluster,
//! chosen at connect by asking the first server (`INFO cluster`). Both are multiplexed
//! and reconnect by themselves; a cluster connection routes each command (each script,
//! by its first key) to the primary that owns the slot.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a command may wait for its answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a store connects: one server, or the seed nodes of a Redis Cluster.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The URLs given (comma-separated in the configuration).
    pub urls: Vec<String>,
    /// Whether the first one answered `cluster_enabled:1`.
    pub cluster: bool,
}

impl Target {
    /// Parses `a,b,c` and asks the first server whether it is part of a Redis Cluster.
    pub async fn discover(urls: &str) -> RedisResult<Self> {
        let urls: Vec<String> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect();
        let first = urls.first().cloned().unwrap_or_default();
        let client = redis::Client::open(first.as_str())?;
        let mut con = tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {first}")))??;
        let info: String = redis::cmd("INFO").arg("cluster").query_async(&mut con).await?;
        Ok(Self { cluster: info.lines().any(|l| l.trim() == "cluster_enabled:1"), urls })
    }

    /// A command connection.
    pub async fn connect(&self) -> RedisResult<Con> {
        if self.cluster {
            let client = ClusterClientBuilder::new(self.urls.clone())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .build()?;
            return Ok(Con::Cluster(client.get_async_connection().await?));
        }
        let client = redis::Client::open(self.urls[0].as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(3);
        Ok(Con::Single(ConnectionManager::new_with_config(client, config).await?))
    }
}

/// A command connection; cheap to clone (clones share the connection).
#[derive(Clone)]
pub(crate) enum Con {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Con {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Con::Single(c) => c.req_packed_command(cmd),
            Con::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Con::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Con::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::Single(c) => c.get_db(),
            Con::Cluster(c) => c.get_db(),
        }
    }
}
