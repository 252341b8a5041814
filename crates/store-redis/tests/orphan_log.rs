//! An evicted meta must never let an epoch be reused: a log found without its meta is
//! deleted by the next append, which starts a new epoch at offset 1.

mod common;

use std::sync::Arc;

use bytes::Bytes;

use herald_core::{ManualClock, RetentionConfig, Store, TopicName};

use common::{text, Result};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_log_is_deleted_and_the_epoch_changes() -> Result {
    common::in_fresh_prefix(async |prefix| orphan(&prefix).await).await
}

async fn orphan(prefix: &str) -> Result {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let store = common::connect_blocking(prefix, RetentionConfig::default(), clock)?;
    let t = TopicName::parse("orphan.topic")?;
    let old = store.append(&t, vec![text("a"), text("b"), text("c")]).await?;
    assert_eq!(old.messages.last().map(|m| m.offset), Some(3));

    // What an eviction of the meta alone leaves behind.
    let mut con = redis::Client::open(common::URL)?.get_multiplexed_async_connection().await?;
    let meta = format!("{prefix}{{t:orphan.topic}}:meta");
    let log = format!("{prefix}{{t:orphan.topic}}:log");
    redis::cmd("DEL").arg(&meta).query_async::<()>(&mut con).await?;
    assert_eq!(redis::cmd("XLEN").arg(&log).query_async::<u64>(&mut con).await?, 3);

    let new = store.append(&t, vec![text("d")]).await?;
    assert_ne!(new.epoch, old.epoch, "a new epoch");
    assert_eq!(new.messages[0].offset, 1, "offsets from 1");
    let history = store.read(&t, 0, u64::MAX, 100).await?;
    assert_eq!(history.epoch, new.epoch);
    let got: Vec<(u64, Bytes)> = history.messages.iter().map(|m| (m.offset, m.payload.clone())).collect();
    assert_eq!(got, vec![(1, Bytes::from_static(b"d"))], "the old log is gone");
    assert_eq!(redis::cmd("XLEN").arg(&log).query_async::<u64>(&mut con).await?, 1);
    Ok(())
}
