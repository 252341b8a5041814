//! The Redis store runs the store conformance suite, restarts included (a restart is
//! a new connection with the same key prefix), and the queues the nodes of a cluster
//! share (`RedisQueues`) run the queue conformance suite with two nodes (two stores,
//! buses and queue services on one key prefix), against the Redis on 127.0.0.1:6379 and
//! against a Redis Cluster of three primaries on 127.0.0.1:7101-7103 (started by
//! `tools/redis-cluster.sh` if it is not running), where the suites' topics and queues
//! spread over the primaries' slots.

mod common;

use std::sync::Arc;

use herald_core::{ManualClock, QueueConfig, RetentionConfig, Store};
use herald_store_redis::{RedisBus, RedisConfig, RedisQueues, RedisStore};
use herald_testkit::conformance::{Backend, Result};
use herald_testkit::queues::{Node, Opening, QueueBackend};

/// A Redis store under a key prefix of its own, whose keys are deleted on drop.
struct Redis {
    url: &'static str,
    prefix: String,
}

impl Redis {
    fn new(url: &'static str) -> Self {
        if url == common::CLUSTER_URL {
            if let Err(e) = common::ensure_cluster() {
                panic!("the local Redis Cluster is needed: {e}");
            }
        }
        Self { url, prefix: common::unique_prefix() }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let (url, prefix) = (self.url, self.prefix.clone());
        let deleted = tokio::task::block_in_place(|| common::delete_prefix_at(url, &prefix));
        if let Err(e) = deleted {
            eprintln!("could not delete the keys under {prefix}: {e}");
        }
    }
}

impl Backend for Redis {
    fn open(&self, retention: RetentionConfig, clock: Arc<ManualClock>) -> Result<Arc<dyn Store>> {
        Ok(Arc::new(common::connect_blocking_at(self.url, &self.prefix, retention, clock)?))
    }
    fn durable(&self) -> bool {
        true
    }
}

impl QueueBackend for Redis {
    fn open<'a>(&'a self, config: QueueConfig, max_message_bytes: usize, clock: Arc<ManualClock>) -> Opening<'a> {
        Box::pin(async move {
            let redis = RedisConfig {
                url: self.url.to_owned(),
                prefix: self.prefix.clone(),
                retention: RetentionConfig::default(),
            };
            let store = RedisStore::connect(redis, clock.clone()).await?;
            let bus = RedisBus::start(&store).await?;
            let node: Node = Arc::new(RedisQueues::new(&store, &bus, clock, config, max_message_bytes));
            Ok(node)
        })
    }
}

mod standalone {
    use super::*;
    herald_testkit::store_conformance!(Redis::new(common::URL));
    mod queues {
        use super::*;
        herald_testkit::queue_conformance!(Redis::new(common::URL));
    }
}

mod redis_cluster {
    use super::*;
    herald_testkit::store_conformance!(Redis::new(common::CLUSTER_URL));
    mod queues {
        use super::*;
        herald_testkit::queue_conformance!(Redis::new(common::CLUSTER_URL));
    }
}
