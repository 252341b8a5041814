//! Write, drop, reopen, verify: the disk store's recovery, damage handling,
//! checkpoints and failure behaviour.

use std::path::PathBuf;

use bytes::Bytes;
use herald_core::Kind;

use super::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("herald-disk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
    fn config(&self) -> DiskConfig {
        DiskConfig::new(&self.0)
    }
    fn segments(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "log"))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn topic(name: &str) -> TopicName {
    TopicName::parse(name).expect("valid name")
}

fn text(s: &str) -> NewMessage {
    NewMessage::new(Kind::Text, Bytes::copy_from_slice(s.as_bytes()))
}

async fn publish(store: &DiskStore, t: &str, n: usize) -> Result<Vec<u64>, StoreError> {
    let mut offsets = Vec::new();
    for i in 0..n {
        let a = store.append(&topic(t), vec![text(&format!("{t}-{i}"))]).await?;
        offsets.push(a.messages[0].offset);
    }
    Ok(offsets)
}

async fn payloads(store: &DiskStore, t: &str) -> Result<Vec<(u64, String)>, StoreError> {
    let msgs = store.read(&topic(t), 0, u64::MAX, 100_000).await?;
    Ok(msgs.iter().map(|m| (m.offset, String::from_utf8_lossy(&m.payload).into_owned())).collect())
}

#[tokio::test]
async fn topics_survive_a_reopen_with_offsets_epochs_and_timestamps() -> TestResult {
    let dir = TempDir::new("reopen");
    let (before, head_before) = {
        let store = DiskStore::open(dir.config())?;
        assert_eq!(publish(&store, "a", 5).await?, [1, 2, 3, 4, 5]);
        publish(&store, "b", 2).await?;
        store.delete(&topic("b")).await?;
        publish(&store, "b", 1).await?;
        (store.read(&topic("a"), 0, u64::MAX, 100).await?, store.head(&topic("b"))?)
    };
    let store = DiskStore::open(dir.config())?;
    let after = store.read(&topic("a"), 0, u64::MAX, 100).await?;
    assert_eq!(after.len(), 5);
    for (x, y) in before.iter().zip(&after) {
        assert_eq!((x.offset, x.ts, &x.payload, x.kind), (y.offset, y.ts, &y.payload, y.kind));
    }
    assert_eq!(store.head(&topic("b"))?, head_before, "epoch and offsets after a delete survive");
    assert_eq!(publish(&store, "a", 1).await?, [6], "offsets continue");
    let delete_epoch = store.delete(&topic("a")).await?;
    assert_ne!(delete_epoch, head_before.epoch, "a new generation, never a reused one");
    Ok(())
}

#[tokio::test]
async fn interleaved_small_records_replay_exactly() -> TestResult {
    // Recovery merges runs of appends to one topic: interleaving, deletes and runs longer
    // than one merge must replay to the same state.
    let dir = TempDir::new("interleave");
    let config = DiskConfig { fsync: FsyncPolicy::Never, ..dir.config() };
    let expected = {
        let store = DiskStore::open(config.clone())?;
        for i in 0..5000 {
            let t = if i % 7 == 0 { "b" } else { "a" };
            store.append(&topic(t), vec![text(&format!("{t}-{i}"))]).await?;
            if i == 2500 {
                store.delete(&topic("b")).await?;
            }
        }
        (payloads(&store, "a").await?, payloads(&store, "b").await?, store.head(&topic("a"))?, store.head(&topic("b"))?)
    };
    let store = DiskStore::open(dir.config())?;
    let got = (
        payloads(&store, "a").await?,
        payloads(&store, "b").await?,
        store.head(&topic("a"))?,
        store.head(&topic("b"))?,
    );
    assert_eq!(got, expected);
    assert_eq!(expected.0.len(), 4285);
    assert_eq!(expected.1.first().map(|(offset, _)| *offset), Some(1), "b restarted at 1 after its delete");
    Ok(())
}

#[tokio::test]
async fn queue_messages_survive_and_removals_apply() -> TestResult {
    let dir = TempDir::new("queues");
    let q = QueueName::parse("jobs")?;
    {
        let store = DiskStore::open(dir.config())?;
        let records: Vec<QueueRecord> = (1..=3)
            .map(|id| QueueRecord {
                id,
                kind: Kind::Binary,
                payload: Bytes::from(vec![id as u8]),
                ts: 1,
                ready_at: 1,
                expires_at: None,
            })
            .collect();
        store.queue_append(&q, records).await?;
        store.queue_delivered(&q, vec![(1, 1), (2, 1)]);
        store.queue_delivered(&q, vec![(1, 2)]);
        store.queue_remove(&q, vec![2]);
        store.flush().await?;
    }
    let store = DiskStore::open(dir.config())?;
    let loaded = store.queue_load();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].next_id, 4);
    assert_eq!(loaded[0].attempts, BTreeMap::from([(1, 2)]), "the latest count, for live messages only");
    assert_eq!(loaded[0].records.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 3]);
    Ok(())
}

#[tokio::test]
async fn a_torn_last_record_is_cut_and_the_rest_kept() -> TestResult {
    let dir = TempDir::new("torn");
    {
        let store = DiskStore::open(dir.config())?;
        publish(&store, "t", 10).await?;
    }
    let seg = dir.segments().pop().ok_or("no segment")?;
    let len = std::fs::metadata(&seg)?.len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg)?;
    f.set_len(len - 3)?; // the last record loses its tail
    drop(f);
    let store = DiskStore::open(dir.config())?;
    let got = payloads(&store, "t").await?;
    assert_eq!(got.len(), 9, "the torn record is not served");
    assert_eq!(got[8], (9, "t-8".into()));
    assert_eq!(publish(&store, "t", 1).await?, [10], "the cut offset is free again: it was never acknowledged");
    Ok(())
}

#[tokio::test]
async fn a_flipped_byte_in_the_last_record_is_a_torn_tail() -> TestResult {
    let dir = TempDir::new("flip-tail");
    {
        let store = DiskStore::open(dir.config())?;
        publish(&store, "t", 3).await?;
    }
    let seg = dir.segments().pop().ok_or("no segment")?;
    let mut data = std::fs::read(&seg)?;
    let last = data.len() - 2;
    data[last] ^= 0xff;
    std::fs::write(&seg, &data)?;
    let store = DiskStore::open(dir.config())?;
    assert_eq!(payloads(&store, "t").await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn damage_in_the_middle_refuses_to_start_unless_repair() -> TestResult {
    let dir = TempDir::new("flip-middle");
    {
        let store = DiskStore::open(dir.config())?;
        publish(&store, "t", 10).await?;
    }
    let seg = dir.segments().pop().ok_or("no segment")?;
    let mut data = std::fs::read(&seg)?;
    let middle = data.len() / 2;
    data[middle] ^= 0x01;
    std::fs::write(&seg, &data)?;
    match DiskStore::open(dir.config()) {
        Err(OpenError::Damaged { file, offset, .. }) => {
            assert_eq!(file, seg);
            assert!(offset > 0 && (offset as usize) <= middle, "points at the damaged record: {offset}");
        }
        Err(e) => return Err(format!("expected Damaged, got {e}").into()),
        Ok(_) => return Err("opened a damaged log".into()),
    }
    let store = DiskStore::open(DiskConfig { repair: true, ..dir.config() })?;
    let got = payloads(&store, "t").await?;
    assert!(!got.is_empty() && got.len() < 10, "repair keeps what precedes the damage: {}", got.len());
    assert_eq!(got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), (1..=got.len() as u64).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn checkpoints_reclaim_space_and_keep_the_live_state() -> TestResult {
    let dir = TempDir::new("checkpoint");
    let config = DiskConfig {
        segment_bytes: 4096,
        retention: RetentionConfig { max_messages: 20, ..RetentionConfig::default() },
        ..dir.config()
    };
    let q = QueueName::parse("jobs")?;
    {
        let store = DiskStore::open(config.clone())?;
        publish(&store, "t", 2000).await?;
        let record = QueueRecord {
            id: 1,
            kind: Kind::Text,
            payload: Bytes::from_static(b"job"),
            ts: 1,
            ready_at: 1,
            expires_at: None,
        };
        store.queue_append(&q, vec![record]).await?;
        store.queue_delivered(&q, vec![(1, 3)]);
        publish(&store, "t", 500).await?;
    }
    let total: u64 = dir.segments().iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
    assert!(total < 64 * 1024, "2500 messages written, 20 retained: the log was compacted to {total} bytes");
    let store = DiskStore::open(config)?;
    let got = payloads(&store, "t").await?;
    assert_eq!(got.first().map(|g| g.0), Some(2481));
    assert_eq!(got.last().cloned(), Some((2500, "t-499".into())));
    assert_eq!(store.queue_load()[0].records.len(), 1, "the queue message outlived its segment");
    assert_eq!(store.queue_load()[0].attempts, BTreeMap::from([(1, 3)]), "and so did its attempts");
    assert_eq!(publish(&store, "t", 1).await?, [2501]);
    Ok(())
}

#[tokio::test]
async fn a_failed_write_acknowledges_nothing_and_makes_the_store_read_only() -> TestResult {
    let dir = TempDir::new("full");
    std::fs::create_dir_all(&dir.0)?;
    // The kernel answers every write to /dev/full with ENOSPC, like a full disk.
    std::os::unix::fs::symlink("/dev/full", dir.0.join(format!("{:020}.log", 1)))?;
    let store = DiskStore::open(dir.config())?;
    let result = store.append(&topic("t"), vec![text("lost")]).await;
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
    assert!(!store.is_ready());
    assert_eq!(store.head(&topic("t"))?.next, 1, "nothing acknowledged, nothing visible");
    assert!(matches!(store.append(&topic("t"), vec![text("x")]).await, Err(StoreError::Unavailable(_))));
    Ok(())
}

#[tokio::test]
async fn a_data_directory_is_used_by_one_store_at_a_time() -> TestResult {
    let dir = TempDir::new("lock");
    let _first = DiskStore::open(dir.config())?;
    assert!(matches!(DiskStore::open(dir.config()), Err(OpenError::Locked(_))));
    Ok(())
}
