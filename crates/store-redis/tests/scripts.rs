//! What the conformance suite does not reach: the event each append and delete
//! publishes (the cluster bus reads it; format in src/bus.rs), limits beyond what Lua
//! prints as an integer, and the errors of `connect`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use herald_core::{ManualClock, RetentionConfig, Store, SystemClock, TopicName};
use herald_store_redis::{RedisConfig, RedisStore, RedisStoreError};

use common::{text, Result};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_deletes_are_published_on_the_topic_channel() -> Result {
    common::in_fresh_prefix(async |prefix| published(&prefix).await).await
}

async fn published(prefix: &str) -> Result {
    let store = common::connect_blocking(prefix, RetentionConfig::default(), Arc::new(ManualClock::new(1_000)))?;
    let mut pubsub = redis::Client::open(common::URL)?.get_async_pubsub().await?;
    pubsub.subscribe(format!("{prefix}{{t:pub.topic}}:ch")).await?;
    let mut notes = pubsub.into_on_message();
    let mut next = async || -> std::result::Result<String, Box<dyn std::error::Error + Send + Sync>> {
        let msg = tokio::time::timeout(Duration::from_secs(5), notes.next()).await?.ok_or("pub/sub ended")?;
        Ok(msg.get_payload::<String>()?)
    };
    let t = TopicName::parse("pub.topic")?;
    let a = store.append(&t, vec![text("a"), text("bb"), text("c\nd")]).await?;
    let ts = a.messages[0].ts;
    let event = format!("a {} 1 {ts} 3\ntext - 1\natext - 2\nbbtext - 3\nc\nd", a.epoch);
    assert_eq!(next().await?, event);
    let mut expiring = text("e");
    expiring.ttl_ms = Some(500);
    let b = store.append(&t, vec![expiring]).await?;
    assert_eq!(next().await?, format!("a {} 4 {ts} 1\ntext {} 1\ne", b.epoch, ts + 500));
    let e = store.delete(&t).await?;
    assert_eq!(next().await?, format!("d {} {e}", a.epoch));
    let again = store.delete(&t).await?;
    assert_eq!(next().await?, format!("d {e} {again}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_limits_and_ttls() -> Result {
    common::in_fresh_prefix(async |prefix| unbounded(&prefix).await).await
}

async fn unbounded(prefix: &str) -> Result {
    let retention = RetentionConfig { max_messages: u64::MAX, max_age: Duration::MAX, max_bytes: 0 };
    let store = common::connect_blocking(prefix, retention, Arc::new(ManualClock::new(1_700_000_000_000)))?;
    let t = TopicName::parse("big.limits")?;
    let mut long = text("b");
    long.ttl_ms = Some(u64::MAX);
    store.append(&t, vec![text("a"), long]).await?;
    let history = store.read(&t, 0, u64::MAX, usize::MAX).await?;
    assert_eq!(history.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![1, 2]);
    assert!(history.messages[1].expires_at.is_some_and(|at| at > 1_700_000_000_000));
    let head = store.head(&t).await?;
    assert_eq!((head.first, head.last, head.next, head.retained), (1, 2, 3, 2));
    Ok(())
}

#[tokio::test]
async fn connect_refuses_braces_in_the_prefix_and_reports_an_absent_server() {
    let clock = Arc::new(SystemClock);
    let braces = RedisConfig { prefix: "a{b}:".to_owned(), ..RedisConfig::default() };
    assert!(matches!(RedisStore::connect(braces, clock.clone()).await, Err(RedisStoreError::Prefix(_))));
    // Port 1 on loopback: nothing listens there.
    let absent = RedisConfig { url: "redis://127.0.0.1:1/".to_owned(), ..RedisConfig::default() };
    assert!(matches!(RedisStore::connect(absent, clock).await, Err(RedisStoreError::Redis(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_to_one_topic_share_script_calls() -> Result {
    common::in_fresh_prefix(async |prefix| grouped(&prefix).await).await
}

async fn grouped(prefix: &str) -> Result {
    let store = common::connect_blocking(prefix, RetentionConfig::default(), Arc::new(SystemClock))?;
    let mut pubsub = redis::Client::open(common::URL)?.get_async_pubsub().await?;
    pubsub.subscribe(format!("{prefix}{{t:group.topic}}:ch")).await?;
    let mut events = pubsub.into_on_message();
    let t = TopicName::parse("group.topic")?;
    // 64 appends of 2 messages each, issued together.
    let appends: Vec<_> =
        (0..64).map(|i| store.append(&t, vec![text(&format!("{i}a")), text(&format!("{i}b"))])).collect();
    let mut offsets = Vec::new();
    for (i, append) in appends.into_iter().enumerate() {
        let appended = append.await?;
        let got: Vec<(u64, &[u8])> = appended.messages.iter().map(|m| (m.offset, &m.payload[..])).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, got[0].0 + 1, "a caller's batch keeps consecutive offsets");
        assert_eq!((got[0].1, got[1].1), (format!("{i}a").as_bytes(), format!("{i}b").as_bytes()));
        offsets.extend([got[0].0, got[1].0]);
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=128).collect::<Vec<_>>(), "every message once");
    // Each script call publishes one event: fewer events than appends means calls were shared.
    let mut calls = 0;
    let mut seen = 0;
    while seen < 128 {
        let msg = tokio::time::timeout(Duration::from_secs(5), events.next()).await?.ok_or("pub/sub ended")?;
        let event = msg.get_payload::<Vec<u8>>()?;
        let header = event.split(|&b| b == b'\n').next().ok_or("empty event")?;
        let count: u64 = std::str::from_utf8(header)?.rsplit(' ').next().ok_or("no count")?.parse()?;
        seen += count;
        calls += 1;
    }
    assert!(calls < 64, "64 concurrent appends took {calls} script calls");
    Ok(())
}
