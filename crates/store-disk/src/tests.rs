//! Write, drop, reopen, verify: the disk store's recovery, damage handling,
//! checkpoints and failure behaviour.

use std::collections::BTreeMap;
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

/// Closes `store` as a crash would: without the checkpoint a clean stop writes at the
/// end of the log (so the tests that damage the log's tail find it there).
fn crashed(store: DiskStore) {
    store.close_as_crash();
    drop(store);
}

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
    let msgs = store.read(&topic(t), 0, u64::MAX, 100_000).await?.messages;
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
        (store.read(&topic("a"), 0, u64::MAX, 100).await?.messages, store.head(&topic("b")).await?)
    };
    let store = DiskStore::open(dir.config())?;
    let after = store.read(&topic("a"), 0, u64::MAX, 100).await?.messages;
    assert_eq!(after.len(), 5);
    for (x, y) in before.iter().zip(&after) {
        assert_eq!((x.offset, x.ts, &x.payload, x.kind), (y.offset, y.ts, &y.payload, y.kind));
    }
    assert_eq!(store.head(&topic("b")).await?, head_before, "epoch and offsets after a delete survive");
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
        (
            payloads(&store, "a").await?,
            payloads(&store, "b").await?,
            store.head(&topic("a")).await?,
            store.head(&topic("b")).await?,
        )
    };
    let store = DiskStore::open(dir.config())?;
    let got = (
        payloads(&store, "a").await?,
        payloads(&store, "b").await?,
        store.head(&topic("a")).await?,
        store.head(&topic("b")).await?,
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
        crashed(store);
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
        crashed(store);
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
        crashed(store);
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
    assert_eq!(store.head(&topic("t")).await?.next, 1, "nothing acknowledged, nothing visible");
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

/// Issue 9, item 1, as history is cold: a quiet topic's messages, in a segment older
/// than the newest checkpoint, survive a restart, while the segments of a busy topic
/// around them are deleted as retention trims it; the restart replays only what came
/// after the checkpoint.
#[tokio::test]
async fn a_quiet_topics_messages_before_the_checkpoint_survive_a_restart() -> TestResult {
    let dir = TempDir::new("checkpoint-only");
    let config = DiskConfig {
        segment_bytes: 8192,
        retention: RetentionConfig { max_messages: 100, ..RetentionConfig::default() },
        ..dir.config()
    };
    let head_before = {
        let store = DiskStore::open(config.clone())?;
        publish(&store, "a", 50).await?;
        // Enough to `b` that many checkpoints run and its early segments are trimmed.
        for i in 0..4000 {
            store.append(&topic("b"), vec![text(&format!("{i:0>90}"))]).await?;
        }
        store.head(&topic("a")).await?
    };
    let segments = dir.segments();
    let first = segments.first().cloned().ok_or("no segment")?;
    assert!(!wal::starts_checkpoint(&first), "the segment holding `a` is kept: {segments:?}");
    assert!(segments.iter().any(|p| wal::starts_checkpoint(p)), "{segments:?}");
    assert!(segments.len() <= 6, "b's trimmed segments are deleted: {segments:?}");
    let store = DiskStore::open(config)?;
    let replayed = store.shared.replayed.load(Ordering::Relaxed);
    assert!(replayed < 400, "replayed {replayed} records: only the checkpoint and what follows");
    assert_eq!(store.head(&topic("a")).await?, head_before);
    let got = payloads(&store, "a").await?;
    assert_eq!(got.len(), 50, "retained messages of `a` after the restart");
    assert_eq!(got[49], (50, "a-49".into()));
    assert_eq!(publish(&store, "a", 1).await?, [51]);
    Ok(())
}

/// Retention by bytes applies the same on recovery: a restart keeps what was retained.
#[tokio::test]
async fn retention_by_bytes_holds_across_a_restart() -> TestResult {
    let dir = TempDir::new("max-bytes");
    // Payloads `a-0` to `a-9` are 3 bytes, `a-10` on 4: 20 bytes keep the last five.
    let config =
        DiskConfig { retention: RetentionConfig { max_bytes: 20, ..RetentionConfig::default() }, ..dir.config() };
    let before = {
        let store = DiskStore::open(config.clone())?;
        publish(&store, "a", 30).await?;
        payloads(&store, "a").await?
    };
    assert_eq!(before.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [26, 27, 28, 29, 30]);
    let store = DiskStore::open(config)?;
    assert_eq!(payloads(&store, "a").await?, before);
    assert_eq!(publish(&store, "a", 1).await?, [31]);
    Ok(())
}

/// Issue 9, item 7: a batch larger than one record can hold is split into records the
/// reader accepts, in the log and in checkpoints.
#[tokio::test]
async fn batches_larger_than_a_record_are_split_and_read_back() -> TestResult {
    let dir = TempDir::new("big-batch");
    let config = DiskConfig { fsync: FsyncPolicy::Never, segment_bytes: 4 * record::MAX_RECORD as u64, ..dir.config() };
    let big = Bytes::from(vec![b'x'; record::MAX_RECORD / 8]);
    let batch = |n: usize| (0..n).map(|_| NewMessage::new(Kind::Binary, big.clone())).collect::<Vec<_>>();
    {
        let store = DiskStore::open(config.clone())?;
        // 12 eighths of the record limit in one batch: one record would be unreadable.
        let a = store.append(&topic("t"), batch(12)).await?;
        assert_eq!(a.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>());
    }
    let store = DiskStore::open(config.clone())?;
    assert_eq!(store.head(&topic("t")).await?.retained, 12);
    // A checkpoint of the same data splits by bytes as well.
    store.append(&topic("u"), batch(30)).await?;
    drop(store);
    let store = DiskStore::open(config)?;
    assert_eq!(store.head(&topic("u")).await?.retained, 30);
    assert_eq!(
        store.read(&topic("u"), 0, u64::MAX, 100).await?.messages.iter().map(|m| m.payload.len()).sum::<usize>(),
        30 * big.len()
    );
    Ok(())
}

/// Issue 9, item 8: an incomplete checkpoint that is not a crash's leftover (no older
/// checkpoint, and segments were deleted since the first) is damage: refused unless repair.
#[tokio::test]
async fn damage_inside_a_checkpoint_is_refused_unless_repair() -> TestResult {
    let dir = TempDir::new("checkpoint-damage");
    let config = DiskConfig { segment_bytes: 4096, ..dir.config() };
    {
        let store = DiskStore::open(config.clone())?;
        publish(&store, "t", 3000).await?;
    }
    // The newest checkpoint; the retained messages before it keep their segments, the
    // older checkpoints are gone.
    let segments = dir.segments();
    let checkpoints: Vec<_> = segments.iter().filter(|p| wal::starts_checkpoint(p)).cloned().collect();
    let checkpoint = checkpoints.last().cloned().ok_or("no checkpoint")?;
    assert_eq!(checkpoints.len(), 1, "{segments:?}");
    assert!(segments.first() != Some(&checkpoint) && segments.last() != Some(&checkpoint), "{segments:?}");
    let mut data = std::fs::read(&checkpoint)?;
    data[40] ^= 0x01; // inside the checkpoint's first records
    std::fs::write(&checkpoint, &data)?;
    match DiskStore::open(config.clone()) {
        Err(OpenError::Damaged { file, .. }) => assert_eq!(file, checkpoint),
        Err(e) => return Err(format!("expected Damaged, got {e}").into()),
        Ok(store) => {
            let head = store.head(&topic("t")).await?;
            return Err(format!("opened a log whose checkpoint is damaged: {head:?}").into());
        }
    }
    let store = DiskStore::open(DiskConfig { repair: true, ..config.clone() })?;
    let kept = payloads(&store, "t").await?;
    drop(store);
    let store = DiskStore::open(config)?;
    assert_eq!(payloads(&store, "t").await?, kept, "a repaired log opens again as repaired");
    Ok(())
}

/// Issue 9, item 9: `store.id` is never silently replaced (every epoch would change).
#[tokio::test]
async fn a_damaged_store_id_stops_the_start_instead_of_changing_every_epoch() -> TestResult {
    let dir = TempDir::new("store-id");
    let epoch = {
        let store = DiskStore::open(dir.config())?;
        publish(&store, "t", 1).await?;
        store.delete(&topic("t")).await?;
        publish(&store, "t", 1).await?;
        store.head(&topic("t")).await?.epoch
    };
    let id_path = dir.0.join("store.id");
    let id = std::fs::read(&id_path)?;
    for bad in [&b""[..], &b"\xff\xfe"[..]] {
        std::fs::write(&id_path, bad)?;
        match DiskStore::open(dir.config()) {
            Err(OpenError::Identity { path, .. }) => assert_eq!(path, id_path),
            Err(e) => return Err(format!("expected Identity, got {e}").into()),
            Ok(_) => return Err(format!("opened with store.id = {bad:?}").into()),
        }
    }
    std::fs::write(&id_path, &id)?;
    let store = DiskStore::open(dir.config())?;
    assert_eq!(store.head(&topic("t")).await?.epoch, epoch);
    assert!(!dir.0.join("store.id.tmp").exists());
    Ok(())
}

/// Issue 9, item 10: a torn last record whose payload holds a valid record frame is
/// still a torn tail (the server used to refuse to start).
#[tokio::test]
async fn a_torn_record_whose_payload_holds_a_record_frame_is_a_torn_tail() -> TestResult {
    let dir = TempDir::new("torn-frame");
    let mut inner = Vec::new();
    Record::TopicDelete { topic: topic("x"), generation: 7 }.encode(&mut inner);
    let mut payload = vec![b'p'; 64];
    payload.extend_from_slice(&inner);
    payload.extend_from_slice(&[b'q'; 64]);
    {
        let store = DiskStore::open(dir.config())?;
        publish(&store, "t", 3).await?;
        store.append(&topic("t"), vec![NewMessage::new(Kind::Binary, Bytes::from(payload))]).await?;
        crashed(store);
    }
    let seg = dir.segments().pop().ok_or("no segment")?;
    let len = std::fs::metadata(&seg)?.len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg)?;
    f.set_len(len - 10)?; // the tear falls after the embedded frame
    drop(f);
    let store = DiskStore::open(dir.config())?;
    assert_eq!(payloads(&store, "t").await?.len(), 3);
    assert_eq!(publish(&store, "t", 1).await?, [4]);
    Ok(())
}

/// Issue 9, item 11: a checkpoint is written beside the log while commits go on, and a
/// crash in the middle of one (here: abandoned half-written) loses nothing.
#[tokio::test]
async fn commits_go_on_during_a_checkpoint_and_a_crash_inside_one_loses_nothing() -> TestResult {
    let dir = TempDir::new("checkpoint-concurrent");
    let config = DiskConfig {
        segment_bytes: 4096,
        fsync: FsyncPolicy::Never,
        retention: RetentionConfig { max_messages: 100, ..RetentionConfig::default() },
        ..dir.config()
    };
    let expected = {
        let store = DiskStore::open(config.clone())?;
        let (gate_tx, gate_rx) = std::sync::mpsc::channel();
        *lock(&store.shared.checkpoint_gate) = Some(gate_rx);
        publish(&store, "a", 50).await?;
        // Every commit is acknowledged while the first checkpoint waits at the gate.
        publish(&store, "b", 3000).await?;
        let held = dir.segments().into_iter().filter(|p| wal::starts_checkpoint(p)).collect::<Vec<_>>();
        assert_eq!(held.len(), 1, "one checkpoint in progress: {held:?}");
        drop(gate_tx);
        (payloads(&store, "a").await?, payloads(&store, "b").await?, store.head(&topic("b")).await?)
    };
    let store = DiskStore::open(config.clone())?;
    assert_eq!((payloads(&store, "a").await?, payloads(&store, "b").await?, store.head(&topic("b")).await?), expected);
    assert_eq!(expected.1.len(), 100);
    // With nothing holding it, the next checkpoint completes and the old segments go,
    // but for the one holding `a`.
    publish(&store, "b", 20_000).await?;
    drop(store);
    let segments = dir.segments();
    assert!(segments.iter().any(|p| wal::starts_checkpoint(p)));
    assert!(segments.len() <= 8, "{segments:?}");
    let store = DiskStore::open(config)?;
    assert_eq!(payloads(&store, "a").await?, expected.0);
    assert_eq!(store.head(&topic("b")).await?.next, 23_001);
    Ok(())
}

/// A damaged length field in the middle makes its record seem to run past the end of
/// the file; the records after it still show the damage is not a torn tail.
#[tokio::test]
async fn a_damaged_length_in_the_middle_is_not_taken_for_a_torn_tail() -> TestResult {
    let dir = TempDir::new("length-middle");
    {
        let store = DiskStore::open(dir.config())?;
        publish(&store, "t", 10).await?;
        crashed(store);
    }
    let seg = dir.segments().pop().ok_or("no segment")?;
    let mut data = std::fs::read(&seg)?;
    // The third record's length: the header of each record is [len u32][crc u32].
    let mut pos = 0;
    for _ in 0..2 {
        pos += Record::decode(&data[pos..])?.1;
    }
    data[pos + 2] = 0x01; // now about 64 KiB: past the end of this small file
    std::fs::write(&seg, &data)?;
    match DiskStore::open(dir.config()) {
        Err(OpenError::Damaged { offset, .. }) => assert_eq!(offset, pos as u64),
        Err(e) => return Err(format!("expected Damaged, got {e}").into()),
        Ok(store) => return Err(format!("cut silently to {} messages", payloads(&store, "t").await?.len()).into()),
    }
    Ok(())
}

/// Cold history: with a cache far smaller than the history, reads from the oldest
/// offset come back whole from the log (through sidecars once segments are sealed),
/// before and after a restart, and the cache stays within its bound.
#[tokio::test]
async fn history_larger_than_the_cache_is_read_back_from_the_log() -> TestResult {
    let dir = TempDir::new("cold");
    let config = DiskConfig { segment_bytes: 16 << 10, cache_bytes: 4096, fsync: FsyncPolicy::Never, ..dir.config() };
    let expected = {
        let store = DiskStore::open(config.clone())?;
        publish(&store, "a", 1500).await?;
        publish(&store, "b", 10).await?;
        // Batches of several messages make records of several messages.
        for i in 0..100 {
            let batch = (0..5).map(|k| text(&format!("a-batch-{i}-{k}"))).collect();
            store.append(&topic("a"), batch).await?;
        }
        let (counted, found) = store.shared.index.cached_bytes();
        assert!(counted == found && found <= 4096, "cache counted {counted}, holds {found}");
        let all = payloads(&store, "a").await?;
        assert_eq!(all.len(), 2000);
        assert!(all.iter().enumerate().all(|(i, (o, _))| *o == i as u64 + 1));
        assert_eq!(all[0].1, "a-0");
        assert_eq!(all[1999].1, "a-batch-99-4");
        // Reads in pages, as a replay does, from every offset.
        let mut paged = Vec::new();
        let mut from = 1;
        loop {
            let page = store.read(&topic("a"), from, u64::MAX, 37).await?.messages;
            let Some(last) = page.last() else { break };
            from = last.offset + 1;
            paged.extend(page.iter().map(|m| (m.offset, String::from_utf8_lossy(&m.payload).into_owned())));
        }
        assert_eq!(paged, all);
        let middle = store.read(&topic("a"), 700, 702, 10).await?.messages;
        assert_eq!(middle.iter().map(|m| m.offset).collect::<Vec<_>>(), [700, 701, 702]);
        (all, payloads(&store, "b").await?)
    };
    let sidecars = std::fs::read_dir(&dir.0)?
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "idx")))
        .count();
    assert!(sidecars >= 2, "sealed segments have sidecars: {sidecars}");
    let store = DiskStore::open(config.clone())?;
    let replayed = store.shared.replayed.load(Ordering::Relaxed);
    assert!(replayed <= 4, "a clean stop left a checkpoint at the end: replayed {replayed} records");
    assert_eq!((payloads(&store, "a").await?, payloads(&store, "b").await?), expected);
    drop(store);
    // A missing or damaged sidecar is rebuilt from its segment.
    let mut idx: Vec<PathBuf> = std::fs::read_dir(&dir.0)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "idx"))
        .collect();
    idx.sort();
    std::fs::remove_file(&idx[0])?;
    let mut data = std::fs::read(&idx[1])?;
    let n = data.len();
    data[n - 20] ^= 0xff; // in the trailer's table CRC
    std::fs::write(&idx[1], &data)?;
    let store = DiskStore::open(config)?;
    assert_eq!((payloads(&store, "a").await?, payloads(&store, "b").await?), expected);
    assert!(idx[0].exists() && std::fs::read(&idx[1])? != data, "both rebuilt");
    Ok(())
}

/// The cache holds what it counts, and no more than its bound, under concurrent
/// publishers to several topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_holds_what_it_counts_within_its_bound() -> TestResult {
    let dir = TempDir::new("cache-bound");
    let config = DiskConfig { cache_bytes: 64 << 10, fsync: FsyncPolicy::Never, ..dir.config() };
    let store = Arc::new(DiskStore::open(config)?);
    let mut tasks = Vec::new();
    for p in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..300 {
                let batch = (0..3).map(|_| text(&"x".repeat(500 + i % 7))).collect();
                store.append(&topic(&format!("t{}", (p + i) % 5)), batch).await?;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let (counted, found) = store.shared.index.cached_bytes();
    assert_eq!(counted, found);
    assert!(found <= 64 << 10 && found > 32 << 10, "{found}");
    // A topic that held much of the cache gives its slots back once others take it.
    store.append(&topic("big"), (0..800).map(|_| text("y")).collect()).await?;
    let before = store.shared.index.cache_slots();
    for i in 0..200 {
        store.append(&topic("t0"), vec![text(&"z".repeat(600 + i))]).await?;
    }
    let after = store.shared.index.cache_slots();
    assert!(after < before / 2, "cache slots {before} -> {after}");
    Ok(())
}

/// A damaged record in cold history is reported as an error, never read as other data.
#[tokio::test]
async fn damage_in_cold_history_fails_the_read() -> TestResult {
    let dir = TempDir::new("cold-damage");
    let config = DiskConfig { segment_bytes: 8 << 10, cache_bytes: 0, ..dir.config() };
    let store = DiskStore::open(config)?;
    publish(&store, "a", 300).await?;
    let first = dir.segments().first().cloned().ok_or("no segment")?;
    let mut data = std::fs::read(&first)?;
    data[30] ^= 0x01; // inside the first record's body
    std::fs::write(&first, &data)?;
    let read = store.read(&topic("a"), 1, u64::MAX, 10).await;
    assert!(matches!(&read, Err(StoreError::Unavailable(why)) if why.contains("damaged")), "{read:?}");
    // Later history, in other segments, still reads.
    let later = store.read(&topic("a"), 250, u64::MAX, 10).await?.messages;
    assert_eq!(later.first().map(|m| m.offset), Some(250));
    Ok(())
}

/// Frames `body` as a log record (for writing logs of the old format by hand).
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// A data directory of the previous format (checkpoints that copy every retained
/// message, heads without a first offset) opens, and keeps its history as new
/// checkpoints of heads replace the old one.
#[tokio::test]
async fn a_log_of_the_old_format_opens_and_carries_on() -> TestResult {
    let dir = TempDir::new("old-format");
    std::fs::create_dir_all(&dir.0)?;
    std::fs::write(dir.0.join("store.id"), "0123456789ab")?;
    let t = topic("t");
    let now = SystemClock.now_ms();
    let append = |first: u64, payloads: &[&str]| {
        let entries = payloads.iter().map(|p| (now - 1000 + first, text(p))).collect::<Vec<_>>();
        let mut buf = Vec::new();
        Record::TopicAppend { topic: t.clone(), generation: 0, first, entries }.encode(&mut buf);
        buf
    };
    // Segment 2: an old checkpoint holding offsets 3..=5 of `t`, whose next is 6.
    let mut checkpoint = Vec::new();
    Record::CheckpointBegin { heads_only: false }.encode(&mut checkpoint);
    let mut head = vec![3u8];
    head.extend_from_slice(&1u32.to_le_bytes());
    head.extend_from_slice(b"t");
    for v in [0u64, 6, now - 995] {
        head.extend_from_slice(&v.to_le_bytes());
    }
    checkpoint.extend(framed(&head));
    checkpoint.extend(append(3, &["m3", "m4", "m5"]));
    Record::CheckpointEnd.encode(&mut checkpoint);
    std::fs::write(dir.0.join(format!("{:020}.log", 2)), &checkpoint)?;
    std::fs::write(dir.0.join(format!("{:020}.log", 3)), append(6, &["m6"]))?;
    let config = DiskConfig { segment_bytes: 4096, ..dir.config() };
    let expected: Vec<(u64, String)> = (3..=6).map(|i| (i, format!("m{i}"))).collect();
    {
        let store = DiskStore::open(config.clone())?;
        assert_eq!(payloads(&store, "t").await?, expected);
        assert_eq!(store.head(&t).await?.epoch.as_ref(), "0123456789ab-0");
        // Enough for new checkpoints to replace the old one.
        publish(&store, "u", 300).await?;
    }
    let store = DiskStore::open(config)?;
    assert_eq!(payloads(&store, "t").await?, expected);
    assert_eq!(publish(&store, "t", 1).await?, [7]);
    assert_eq!(payloads(&store, "u").await?.len(), 300);
    Ok(())
}
