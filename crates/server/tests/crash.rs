//! Crash safety of the disk store, against the real binary: under publish and enqueue
//! load, `kill -9` at random moments; after each restart every acknowledged message is
//! there with its offset, every enqueued and unacked job is delivered again, and nothing
//! unacknowledged is served half-written.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{spawn_herald, within, Result, Rng};

const ROUNDS: u64 = 20;

#[derive(Default)]
struct Acked {
    /// Topic offset -> payload, for every publish answered 201.
    published: BTreeMap<u64, String>,
    /// Queue jobs answered 201.
    enqueued: BTreeSet<String>,
    /// Queue jobs a consumer sent an ack for. Kept apart from `enqueued` because a
    /// consumer may fetch and ack a job before its producer has seen the 201.
    ack_sent: BTreeSet<String>,
}

async fn body(r: reqwest::Response) -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&r.bytes().await?)?)
}

async fn load(url: String, round: u64, acked: Arc<Mutex<Acked>>) {
    let http = common::http();
    let mut tasks = Vec::new();
    for p in 0..2 {
        let (h, u, a) = (http.clone(), url.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let (http, url, acked) = (h, u, a);
            for i in 0.. {
                let payload = format!("p{round}-{p}-{i}-{}", "x".repeat(i % 300));
                let Ok(r) = http
                    .post(format!("{url}/v1/topics/crash/messages"))
                    .header("content-type", "text/plain")
                    .body(payload.clone())
                    .send()
                    .await
                else {
                    return;
                };
                let Ok(v) = body(r).await else { return };
                let Some(offset) = v["offset"].as_u64() else { return };
                if let Ok(mut a) = acked.lock() {
                    a.published.insert(offset, payload);
                }
            }
        }));
        let (h, u, a) = (http.clone(), url.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let (http, url, acked) = (h, u, a);
            for i in 0.. {
                let job = format!("q{round}-{p}-{i}");
                let Ok(r) = http
                    .post(format!("{url}/v1/queues/crashq/messages"))
                    .header("content-type", "text/plain")
                    .body(job.clone())
                    .send()
                    .await
                else {
                    return;
                };
                if r.status() != 201 {
                    return;
                }
                if let Ok(mut a) = acked.lock() {
                    a.enqueued.insert(job);
                }
            }
        }));
    }
    // A consumer acking half the jobs it fetches: acked ones may come back (acks are
    // persisted lazily), but the others, leased for a minute when the crash comes, must.
    let (http2, url2, acked2) = (http.clone(), url.clone(), acked.clone());
    tasks.push(tokio::spawn(async move {
        loop {
            let Ok(r) = http2.post(format!("{url2}/v1/queues/crashq/fetch?max=5&visibility_ms=60000")).send().await
            else {
                return;
            };
            let Ok(v) = body(r).await else { return };
            for m in v["messages"].as_array().cloned().unwrap_or_default() {
                let (Some(id), Some(job)) = (m["id"].as_str(), m["data"].as_str()) else { return };
                if job.ends_with(['1', '3', '5', '7', '9']) {
                    continue; // Leased, never acked: must come back after the crash.
                }
                // Recorded before the ack is sent: a crash may cut the 204 off after the
                // server has already removed the job, which then rightly stays gone.
                if let Ok(mut a) = acked2.lock() {
                    a.ack_sent.insert(job.to_owned());
                }
                let _ = http2.post(format!("{url2}/v1/queues/crashq/ack/{id}")).send().await;
            }
        }
    }));
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_nothing_acknowledged() -> Result {
    let dir = std::env::temp_dir().join(format!("herald-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.to_string_lossy().into_owned();
    // 16 KiB segments: a round writes hundreds of KiB, so segment switches and
    // checkpoints (from 64 KiB of log) happen inside every round, and crashes land
    // during them.
    let args = ["--store", "disk", "--data-dir", data_dir.as_str(), "--segment-bytes", "16384"];
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut rng = Rng::new(42);
    let http = common::http();
    // A topic written once, before every crash: after the first rounds its only copy
    // is in checkpoints.
    let old: Vec<String> = (0..30).map(|i| format!("old-{i}")).collect();
    {
        let (mut child, url) = spawn_herald(&args)?;
        for payload in &old {
            let r = http
                .post(format!("{url}/v1/topics/old/messages"))
                .header("content-type", "text/plain")
                .body(payload.clone())
                .send()
                .await?;
            assert_eq!(r.status(), 201);
        }
        child.kill()?;
        child.wait()?;
    }
    for round in 0..ROUNDS {
        let (mut child, url) = spawn_herald(&args)?;
        let loader = tokio::spawn(load(url.clone(), round, acked.clone()));
        tokio::time::sleep(Duration::from_millis(30 + rng.below(200))).await; // the crash moment
        child.kill()?; // SIGKILL
        child.wait()?;
        within(Duration::from_secs(10), "load stops", loader).await??;

        let (mut child, url) = spawn_herald(&args)?;
        let page = body(http.get(format!("{url}/v1/topics/old/messages?from=0&limit=100")).send().await?).await?;
        let kept: Vec<&str> =
            page["messages"].as_array().ok_or("messages")?.iter().filter_map(|m| m["data"].as_str()).collect();
        assert_eq!(kept, old, "round {round}: the history written before the checkpoints");
        // Every acknowledged publish is there, at its offset; offsets have no holes and
        // every message served is whole (one of ours, intact).
        let mut served = BTreeMap::new();
        let mut from = 0;
        loop {
            let page =
                body(http.get(format!("{url}/v1/topics/crash/messages?from={from}&limit=1000")).send().await?).await?;
            let msgs = page["messages"].as_array().cloned().unwrap_or_default();
            if msgs.is_empty() {
                break;
            }
            for m in &msgs {
                served.insert(m["offset"].as_u64().ok_or("offset")?, m["data"].as_str().ok_or("data")?.to_owned());
            }
            from = page["next"].as_u64().ok_or("next")?;
        }
        let expected = acked.lock().map_err(|_| "poisoned")?.published.clone();
        for (offset, payload) in &expected {
            assert_eq!(served.get(offset), Some(payload), "round {round}: acknowledged offset {offset}");
        }
        let offsets: Vec<u64> = served.keys().copied().collect();
        assert_eq!(offsets, (1..=offsets.len() as u64).collect::<Vec<_>>(), "round {round}: no holes");
        for payload in served.values() {
            let mut parts = payload.splitn(4, '-');
            let ok = parts.next().is_some_and(|p| p.starts_with('p'))
                && parts.next().is_some()
                && parts
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| parts.next().is_some_and(|pad| pad.len() == i % 300));
            assert!(ok, "round {round}: served a damaged message {payload:?}");
        }
        // Every enqueued job not acked by a consumer is delivered again.
        let mut delivered = BTreeSet::new();
        loop {
            let v = body(http.post(format!("{url}/v1/queues/crashq/fetch?max=100&visibility_ms=60000")).send().await?)
                .await?;
            let msgs = v["messages"].as_array().cloned().unwrap_or_default();
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                delivered.insert(m["data"].as_str().ok_or("data")?.to_owned());
                let id = m["id"].as_str().ok_or("id")?;
                assert_eq!(http.post(format!("{url}/v1/queues/crashq/ack/{id}")).send().await?.status(), 204);
            }
        }
        let mut a = acked.lock().map_err(|_| "poisoned")?;
        let missing: Vec<&String> =
            a.enqueued.iter().filter(|job| !a.ack_sent.contains(*job) && !delivered.contains(*job)).collect();
        assert!(missing.is_empty(), "round {round}: unacked jobs not redelivered: {missing:?}");
        // Everything left has now been delivered and acked.
        a.enqueued.clear();
        a.ack_sent.clear();
        eprintln!("round {round}: {} messages, {} jobs redelivered", served.len(), delivered.len());
        drop(a);
        // A clean stop between rounds keeps the next crash's load on a fresh process.
        child.kill()?;
        child.wait()?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The newest segment file of a data directory.
fn last_segment(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let mut logs: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    Ok(logs.pop().ok_or("no segment")?)
}

async fn publish_n(http: &reqwest::Client, url: &str, n: usize) -> Result {
    for i in 0..n {
        let r = http
            .post(format!("{url}/v1/topics/t/messages"))
            .header("content-type", "text/plain")
            .body(format!("m{i}"))
            .send()
            .await?;
        assert_eq!(r.status(), 201);
    }
    Ok(())
}

async fn last_offset(http: &reqwest::Client, url: &str) -> Result<u64> {
    let info = body(http.get(format!("{url}/v1/topics/t")).send().await?).await?;
    Ok(info["last"].as_u64().ok_or("last")?)
}

#[tokio::test]
async fn damaged_segments_torn_tail_is_cut_middle_damage_stops_the_start_unless_repair() -> Result {
    let dir = std::env::temp_dir().join(format!("herald-damage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.to_string_lossy().into_owned();
    let args = ["--store", "disk", "--data-dir", data_dir.as_str()];
    let http = common::http();

    let (mut child, url) = spawn_herald(&args)?;
    publish_n(&http, &url, 20).await?;
    child.kill()?;
    child.wait()?;

    // A torn tail: the last record loses its end. It is cut, and never served.
    let segment = last_segment(&dir)?;
    let len = std::fs::metadata(&segment)?.len();
    std::fs::OpenOptions::new().write(true).open(&segment)?.set_len(len - 3)?;
    let (mut child, url) = spawn_herald(&args)?;
    assert_eq!(last_offset(&http, &url).await?, 19, "the torn 20th record is cut");
    publish_n(&http, &url, 1).await?;
    assert_eq!(last_offset(&http, &url).await?, 20, "the log goes on after the cut");
    child.kill()?;
    child.wait()?;

    // Damage in the middle: one flipped byte in an early record stops the start, saying where.
    let segment = last_segment(&dir)?;
    let mut bytes = std::fs::read(&segment)?;
    let at = bytes.len() / 4;
    bytes[at] ^= 0x40;
    std::fs::write(&segment, &bytes)?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse to start: {stderr}");
    let name = segment.file_name().and_then(|n| n.to_str()).ok_or("name")?;
    assert!(stderr.contains("damaged log") && stderr.contains(name) && stderr.contains("repair"), "{stderr}");

    // With --repair it starts, keeping what precedes the damage.
    let mut repair = args.to_vec();
    repair.push("--repair");
    let (child, url) = spawn_herald(&repair)?;
    let kept = last_offset(&http, &url).await?;
    assert!((1..20).contains(&kept), "kept the records before the damage, got {kept}");
    let page = body(http.get(format!("{url}/v1/topics/t/messages?from=0")).send().await?).await?;
    let served: Vec<&str> =
        page["messages"].as_array().ok_or("messages")?.iter().filter_map(|m| m["data"].as_str()).collect();
    let expected: Vec<String> = (0..kept).map(|i| format!("m{i}")).collect();
    assert_eq!(served, expected);
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn a_full_disk_answers_503_and_acknowledges_nothing() -> Result {
    let dir = std::env::temp_dir().join(format!("herald-full-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // The kernel answers every write to /dev/full with ENOSPC, as a full disk does.
    std::os::unix::fs::symlink("/dev/full", dir.join(format!("{:020}.log", 1)))?;
    let data_dir = dir.to_string_lossy().into_owned();
    let (child, url) = spawn_herald(&["--store", "disk", "--data-dir", data_dir.as_str()])?;
    let http = common::http();

    let r = http.post(format!("{url}/v1/topics/t/messages")).body("lost").send().await?;
    assert_eq!(r.status(), 503);
    let error = body(r).await?;
    assert_eq!(error["error"]["code"], "unavailable", "{error}");
    let r = http.post(format!("{url}/v1/queues/q/messages")).body("lost").send().await?;
    assert_eq!(r.status(), 503);
    // Over WebSocket: an error frame, and the connection stays open.
    let mut ws = herald_client::WsConnection::connect(&url).await?;
    let reply = ws.publish("t", serde_json::json!({"lost": true})).await?;
    assert_eq!((reply["type"].as_str(), reply["code"].as_str()), (Some("error"), Some("unavailable")), "{reply}");
    assert_eq!(ws.publish("t", serde_json::json!(2)).await?["code"], "unavailable");
    // Nothing was acknowledged, so nothing is served; the node says it is not ready.
    assert_eq!(http.get(format!("{url}/readyz")).send().await?.status(), 503);
    let page = body(http.get(format!("{url}/v1/topics/t/messages?from=0")).send().await?).await?;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(0), "{page}");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn attempts_count_across_crashes_and_the_last_one_dead_letters() -> Result {
    let dir = std::env::temp_dir().join(format!("herald-attempts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.to_string_lossy().into_owned();
    let args = ["--store", "disk", "--data-dir", data_dir.as_str(), "--queue-max-attempts", "2"];
    let http = common::http();
    let fetch = |url: String, queue: &'static str| {
        let http = http.clone();
        async move {
            let v = body(http.post(format!("{url}/v1/queues/{queue}/fetch?visibility_ms=60000")).send().await?).await?;
            Result::Ok(v["messages"].as_array().cloned().unwrap_or_default())
        }
    };

    let (mut child, url) = spawn_herald(&args)?;
    let r = http.post(format!("{url}/v1/queues/jobs/messages")).header("content-type", "text/plain").body("poison");
    assert_eq!(r.send().await?.status(), 201);
    // Attempt counts are written lazily, in order with everything else: an acknowledged
    // enqueue after a fetch proves the count before it is on disk.
    let barrier = |url: String| {
        let http = http.clone();
        async move {
            let r = http.post(format!("{url}/v1/queues/barrier/messages")).body("x").send().await?;
            Result::Ok(r.status())
        }
    };
    let first = fetch(url.clone(), "jobs").await?;
    assert_eq!(first.first().map(|m| m["attempt"].clone()), Some(1.into()));
    assert_eq!(barrier(url.clone()).await?, 201);
    child.kill()?; // The worker's lease is cut off by the crash: it counted as an attempt.
    child.wait()?;

    let (mut child, url) = spawn_herald(&args)?;
    let second = fetch(url.clone(), "jobs").await?;
    assert_eq!(second.first().map(|m| m["attempt"].clone()), Some(2.into()), "the count survived the crash");
    assert_eq!(barrier(url.clone()).await?, 201);
    child.kill()?;
    child.wait()?;

    // The second and last allowed delivery also ended without an ack: dead-lettered at start.
    let (child, url) = spawn_herald(&args)?;
    assert!(fetch(url.clone(), "jobs").await?.is_empty(), "not delivered a third time");
    let dead = fetch(url.clone(), "jobs.dlq").await?;
    assert_eq!(dead.first().map(|m| m["data"].clone()), Some("poison".into()));
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Issue 9, item 1, as a user met it: with small segments and retention by count, a
/// quiet topic's retained messages, written before many checkpoints of a busy topic,
/// survive a SIGTERM and restart, and its offsets go on under the same epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retained_history_survives_checkpoints_and_a_restart() -> Result {
    let dir = std::env::temp_dir().join(format!("herald-retained-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.to_string_lossy().into_owned();
    let args = [
        "--store",
        "disk",
        "--data-dir",
        data_dir.as_str(),
        "--segment-bytes",
        "65536",
        "--retention-max-messages",
        "100",
    ];
    let http = common::http();
    let (child, url) = spawn_herald(&args)?;
    for i in 0..50 {
        let r = http
            .post(format!("{url}/v1/topics/a/messages"))
            .header("content-type", "text/plain")
            .body(format!("a-{i}"))
            .send()
            .await?;
        assert_eq!(r.status(), 201);
    }
    let before = body(http.get(format!("{url}/v1/topics/a")).send().await?).await?;
    // About 4000 messages of about 100 bytes to another topic: checkpoints run.
    let mut tasks = Vec::new();
    for p in 0..8 {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..500 {
                let r = http.post(format!("{url}/v1/topics/b/messages")).body(format!("{p}-{i:0>96}")).send().await?;
                assert_eq!(r.status(), 201);
            }
            Ok::<_, reqwest::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    assert!(status.success());
    let mut child = child;
    assert!(child.wait()?.success(), "a clean stop");
    let segments: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".log"))
        .collect();
    // `a`'s messages keep the first segment; `b`'s trimmed ones went with theirs.
    let numbers: Vec<u64> = segments.iter().filter_map(|n| n.strip_suffix(".log")?.parse().ok()).collect();
    assert!(numbers.contains(&1), "{segments:?}");
    assert!(numbers.iter().max() >= Some(&8) && numbers.len() <= 5, "checkpoints ran: {segments:?}");

    let (mut child, url) = spawn_herald(&args)?;
    let after = body(http.get(format!("{url}/v1/topics/a")).send().await?).await?;
    assert_eq!((after["retained"].as_u64(), after["first"].as_u64()), (Some(50), Some(1)), "{after}");
    assert_eq!(after["epoch"], before["epoch"]);
    let page = body(http.get(format!("{url}/v1/topics/a/messages?from=0&limit=100")).send().await?).await?;
    let data: Vec<&str> =
        page["messages"].as_array().ok_or("messages")?.iter().filter_map(|m| m["data"].as_str()).collect();
    assert_eq!(data, (0..50).map(|i| format!("a-{i}")).collect::<Vec<_>>());
    let r = body(
        http.post(format!("{url}/v1/topics/a/messages"))
            .header("content-type", "text/plain")
            .body("a-50")
            .send()
            .await?,
    )
    .await?;
    assert_eq!(r["offset"].as_u64(), Some(51), "offsets go on");
    let info = body(http.get(format!("{url}/v1/topics/a")).send().await?).await?;
    assert_eq!(info["epoch"], before["epoch"], "in the same epoch");
    let b = body(http.get(format!("{url}/v1/topics/b")).send().await?).await?;
    assert_eq!((b["retained"].as_u64(), b["last"].as_u64()), (Some(100), Some(4000)), "{b}");
    child.kill()?;
    child.wait()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
