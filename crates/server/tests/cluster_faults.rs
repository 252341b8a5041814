//! Cluster faults (docs/cluster.md, "Failure modes"): the nodes' pub/sub connections
//! killed by Redis while publishing, a fan-out node killed with SIGKILL, a node holding
//! queue leases killed with SIGKILL, Redis itself killed and restarted. Acknowledged
//! messages and jobs are never lost, nothing is delivered twice, and every subscriber
//! ends with every offset once, in order.
//!
//! A test binary of its own: `CLIENT KILL TYPE pubsub` reaches every node on the shared
//! Redis, so the tests here run one at a time (`SERIAL`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cluster::{ensure_redis_cluster, node_on, tuned_node_on, Prefix, REDIS, REDIS_CLUSTER};
use common::{eventually, spawn_herald, within, Result, TestServer};
use herald_client::{Delivery, Payload, StartFrom, WsConnection};
use herald_core::Role;
use tokio::sync::{mpsc, watch, Mutex};

static SERIAL: Mutex<()> = Mutex::const_new(());

/// Publishes `n` text messages `m<i>` over HTTP, one at a time, retrying on 503 (Redis
/// away) until `deadline`; reports each acknowledged offset on `acked`.
async fn publish_all(
    server: Arc<TestServer>,
    topic: &'static str,
    n: usize,
    acked: mpsc::UnboundedSender<u64>,
) -> Result {
    let path = format!("/v1/topics/{topic}/messages");
    for i in 0..n {
        loop {
            let (status, body) = server.post(&path, Some("text/plain"), format!("m{i}").into_bytes()).await?;
            match status {
                201 => {
                    acked.send(body["offset"].as_u64().ok_or("no offset")?)?;
                    break;
                }
                503 => tokio::task::yield_now().await,
                _ => return Err(format!("publish answered {status}: {body}").into()),
            }
        }
    }
    Ok(())
}

/// The next delivery on a JSON WebSocket as (offset, text).
async fn next(ws: &mut WsConnection) -> Result<(u64, String)> {
    loop {
        let frame = ws.recv_text().await?;
        if frame.starts_with(r#"{"type":"message""#) {
            let d = Delivery::parse(&frame)?;
            let Payload::Json(json) = d.payload else { return Err("not a text message".into()) };
            return Ok((d.offset, serde_json::from_str::<String>(&json)?));
        }
    }
}

/// Collects `n` deliveries from a JSON WebSocket subscription.
async fn collect(mut ws: WsConnection, n: usize) -> Result<Vec<(u64, String)>> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        got.push(next(&mut ws).await?);
    }
    Ok(got)
}

/// Collects deliveries until one has the offset `last` sends (once it is known).
async fn collect_until(mut ws: WsConnection, mut last: watch::Receiver<u64>) -> Result<Vec<(u64, String)>> {
    let mut got: Vec<(u64, String)> = Vec::new();
    loop {
        let target = *last.borrow();
        if target > 0 && got.last().is_some_and(|(o, _)| *o >= target) {
            return Ok(got);
        }
        tokio::select! {
            d = next(&mut ws) => got.push(d?),
            changed = last.changed() => changed?,
        }
    }
}

fn assert_every_offset_once(got: &[(u64, String)], n: usize) {
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (1..=n as u64).collect::<Vec<_>>(), "every offset once, in order");
    for (o, text) in got {
        assert_eq!(text, &format!("m{}", o - 1), "offset {o} carries the message published as it");
    }
}

async fn subscribe(server: &TestServer, topic: &str) -> Result<WsConnection> {
    let mut ws = server.json_ws().await?;
    let reply = ws.subscribe(topic, StartFrom::Earliest, None).await?;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    Ok(ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_pubsub_connections_are_repaired_from_the_history() -> Result {
    let _serial = SERIAL.lock().await;
    killed_pubsub_connections(REDIS, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_sharded_pubsub_connections_of_a_redis_cluster_are_repaired() -> Result {
    let _serial = SERIAL.lock().await;
    ensure_redis_cluster()?;
    killed_pubsub_connections(REDIS_CLUSTER, true).await
}

/// Kills every pub/sub connection of the Redis (of each primary, on a cluster) three
/// times while publishing; every subscriber ends with every offset once, in order.
async fn killed_pubsub_connections(redis: &str, sharded: bool) -> Result {
    const TOPIC: &str = "faults.kill";
    const N: usize = 1500;
    let prefix = Prefix::new("pubsub-kill");
    let all = Arc::new(node_on(redis, &prefix, Role::All).await?);
    let fanout = node_on(redis, &prefix, Role::Fanout).await?;
    let subs = vec![
        tokio::spawn(collect(subscribe(&fanout, TOPIC).await?, N)),
        tokio::spawn(collect(subscribe(&fanout, TOPIC).await?, N)),
        tokio::spawn(collect(subscribe(&all, TOPIC).await?, N)),
    ];

    let (acked, mut offsets) = mpsc::unbounded_channel();
    let publisher = tokio::spawn(publish_all(all.clone(), TOPIC, N, acked));
    let mut admins = Vec::new();
    for url in redis.split(',') {
        admins.push(redis::Client::open(url)?.get_multiplexed_async_connection().await?);
    }
    let channel = format!("{}{{t:{TOPIC}}}:ch", prefix.0);
    let numsub = if sharded { "SHARDNUMSUB" } else { "NUMSUB" };
    let mut kills = 0;
    while let Some(offset) = offsets.recv().await {
        // What is published until the connections are back is a gap to repair.
        if offset % 400 == 0 {
            // Both buses are subscribed to the topic's channel (again) before a kill.
            let both = || {
                let (mut admins, channel) = (admins.clone(), channel.clone());
                async move {
                    let mut subscribed = 0;
                    for admin in &mut admins {
                        let n: (String, u64) =
                            redis::cmd("PUBSUB").arg(numsub).arg(&channel).query_async(admin).await?;
                        subscribed += n.1;
                    }
                    Ok(subscribed == 2)
                }
            };
            eventually(Duration::from_secs(10), "both nodes subscribed again", both).await?;
            let mut killed = 0;
            for admin in &mut admins {
                let n: u64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(admin).await?;
                killed += n;
            }
            assert!(killed >= 2, "both nodes' pub/sub connections killed, not {killed}");
            kills += 1;
        }
    }
    within(Duration::from_secs(60), "publisher", publisher).await???;
    assert_eq!(kills, 3);
    for sub in subs {
        assert_every_offset_once(&within(Duration::from_secs(60), "subscriber", sub).await???, N);
    }
    // Each reconnect repaired the watched topic; nobody was told messages were lost.
    for server in [&*all, &fanout] {
        assert!(server.metric("herald_cluster_repairs_total").await? >= 1);
        assert_eq!(server.metric("herald_cluster_lost_subscriptions_total").await?, 0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_of_a_killed_fanout_node_resume_on_the_survivor() -> Result {
    let _serial = SERIAL.lock().await;
    killed_fanout_node(REDIS).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_redis_cluster_subscribers_of_a_killed_fanout_node_resume_on_the_survivor() -> Result {
    let _serial = SERIAL.lock().await;
    ensure_redis_cluster()?;
    killed_fanout_node(REDIS_CLUSTER).await
}

/// Two fan-out node processes and an ingest node on `redis`; one fan-out node is killed
/// with SIGKILL while publishing.
async fn killed_fanout_node(redis: &str) -> Result {
    const TOPIC: &str = "faults.node";
    const N: usize = 1500;
    let prefix = Prefix::new("node-kill");
    let ingest = Arc::new(node_on(redis, &prefix, Role::Ingest).await?);
    let args = ["--cluster", redis, "--cluster-prefix", prefix.0.as_str(), "--role", "fanout"];
    let (mut doomed, doomed_url) = spawn_herald(&args)?;
    let (_survivor, survivor_url) = spawn_herald(&args)?;

    // One subscriber on the survivor all along; one on the doomed node that moves over.
    let mut steady = WsConnection::connect(&survivor_url).await?;
    steady.subscribe(TOPIC, StartFrom::Earliest, None).await?;
    let steady = tokio::spawn(collect(steady, N));
    let mut moving = WsConnection::connect(&doomed_url).await?;
    let reply = moving.subscribe(TOPIC, StartFrom::Earliest, None).await?;
    let epoch = reply["epoch"].as_str().ok_or("no epoch")?.to_owned();

    let (acked, mut offsets) = mpsc::unbounded_channel();
    let publisher = tokio::spawn(publish_all(ingest.clone(), TOPIC, N, acked));
    // Read from the doomed node until a third of the messages arrived, then kill it.
    let mut got = Vec::new();
    while got.len() < N / 3 {
        got.push(within(Duration::from_secs(30), "delivery", next(&mut moving)).await??);
    }
    doomed.kill()?;
    doomed.wait()?;
    // The client sees its connection end, reconnects to the survivor and resumes after
    // the last offset it got, with the epoch it knows.
    let last = got.last().map_or(0, |(o, _)| *o);
    let mut resumed = WsConnection::connect(&survivor_url).await?;
    let reply = resumed.subscribe(TOPIC, StartFrom::Offset(last + 1), Some(&epoch)).await?;
    assert_eq!(reply["recovered"], true, "{reply}");
    got.extend(within(Duration::from_secs(60), "resumed", collect(resumed, N - got.len())).await??);
    while offsets.recv().await.is_some() {}
    within(Duration::from_secs(60), "publisher", publisher).await???;
    assert_every_offset_once(&got, N);
    assert_every_offset_once(&within(Duration::from_secs(60), "steady subscriber", steady).await???, N);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_leased_on_a_killed_node_are_redelivered_by_the_survivor() -> Result {
    let _serial = SERIAL.lock().await;
    const N: usize = 300;
    const LEASED: usize = 100;
    let prefix = Prefix::new("queue-kill");
    let args = ["--cluster", REDIS, "--cluster-prefix", prefix.0.as_str()];
    let (mut doomed, doomed_url) = spawn_herald(&args)?;
    let survivor = node_on(REDIS, &prefix, Role::All).await?;
    let http = common::http();
    for i in 0..N {
        let url = format!("{doomed_url}/v1/queues/faults.jobs/messages");
        let r = http.post(url).header("content-type", "text/plain").body(format!("job-{i}")).send().await?;
        assert_eq!(r.status(), 201, "enqueue {i}");
    }
    // A worker on the doomed node leases a third of the jobs; then the node dies.
    let mut leased = std::collections::HashSet::new();
    while leased.len() < LEASED {
        let r = http.post(format!("{doomed_url}/v1/queues/faults.jobs/fetch?max=10&visibility_ms=1000")).send().await?;
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
        for m in body["messages"].as_array().ok_or("messages")? {
            leased.insert(m["data"].as_str().ok_or("data")?.to_owned());
        }
    }
    doomed.kill()?;
    doomed.wait()?;
    // Workers on the survivor get every job: the others at once, the leased ones when
    // their leases end, as second attempts.
    let mut done = std::collections::HashMap::new();
    while done.len() < N {
        let (status, body) = within(
            Duration::from_secs(30),
            "fetch",
            survivor.post("/v1/queues/faults.jobs/fetch?max=50&wait_ms=5000", None, Vec::new()),
        )
        .await??;
        assert_eq!(status, 200, "{body}");
        for m in body["messages"].as_array().ok_or("messages")? {
            let job = m["data"].as_str().ok_or("data")?.to_owned();
            let attempt = m["attempt"].as_u64().ok_or("attempt")?;
            assert!(done.insert(job.clone(), attempt).is_none(), "{job} delivered twice on the survivor");
            let ack = survivor.http.post(format!(
                "{}/v1/queues/faults.jobs/ack/{}",
                survivor.url,
                m["id"].as_str().ok_or("id")?
            ));
            assert_eq!(ack.send().await?.status(), 204);
        }
    }
    for (job, attempt) in &done {
        let want = if leased.contains(job) { 2 } else { 1 };
        assert_eq!(*attempt, want, "{job}");
    }
    let (_, stats) = survivor.get_json("/v1/queues/faults.jobs").await?;
    assert_eq!((stats["ready"].as_u64(), stats["in_flight"].as_u64()), (Some(0), Some(0)), "{stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gap_the_history_no_longer_holds_is_reported_not_skipped() -> Result {
    let _serial = SERIAL.lock().await;
    const TOPIC: &str = "faults.lost";
    let prefix = Prefix::new("lost");
    // Retention of 5 messages: a gap of 50 cannot be filled from the history.
    let short = |c: &mut herald_server::Config| c.retention.max_messages = 5;
    let ingest = tuned_node_on(REDIS, &prefix, Role::Ingest, short).await?;
    let fanout = tuned_node_on(REDIS, &prefix, Role::Fanout, short).await?;
    let mut ws = subscribe(&fanout, TOPIC).await?;
    ingest.client().publish_text(TOPIC, "m0").await?;
    assert_eq!(next(&mut ws).await?, (1, "m0".to_owned()));

    // The fan-out node's pub/sub connection dies; 50 messages are published (one batch)
    // before it is back (it reconnects after 200 ms): the history keeps only 5 of them.
    let mut admin = redis::Client::open(REDIS)?.get_multiplexed_async_connection().await?;
    let killed: u64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut admin).await?;
    assert!(killed >= 1);
    let batch: Vec<_> = (1..=50)
        .map(|i| herald_client::grpc::pb::BatchMessage {
            data: format!("\"m{i}\"").into_bytes().into(),
            kind: herald_client::grpc::pb::Kind::Json as i32,
            ..Default::default()
        })
        .collect();
    herald_client::GrpcClient::connect(&ingest.url).await?.publish_batch(TOPIC, batch).await?;

    // The subscriber is not left behind silently: its connection is closed as a slow
    // consumer would be, and resuming after offset 1 is refused as not recovered.
    let ended = within(Duration::from_secs(20), "the lost subscriber closed", next(&mut ws)).await?;
    let message = format!("{:?}", ended.err());
    assert!(message.contains("1013"), "closed with 1013, not {message}");
    let mut again = fanout.json_ws().await?;
    let info = ingest.get_json(&format!("/v1/topics/{TOPIC}")).await?.1;
    let epoch = info["epoch"].as_str().ok_or("no epoch")?;
    let reply = again.subscribe(TOPIC, StartFrom::Offset(2), Some(epoch)).await?;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(fanout.metric("herald_cluster_lost_subscriptions_total").await?, 1);
    Ok(())
}

/// A private Redis with an append-only file fsynced at every write, so that a SIGKILL
/// loses nothing it acknowledged; killed when dropped.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl PrivateRedis {
    fn start(port: u16, dir: &std::path::Path) -> Result<Self> {
        Self::start_with(port, dir, &[])
    }

    /// A primary of a Redis Cluster (its `nodes.conf` in `dir`, so a restart rejoins).
    fn start_clustered(port: u16, dir: &std::path::Path) -> Result<Self> {
        let cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"];
        Self::start_with(port, dir, &[&cluster[..], &["--cluster-node-timeout", "2000"]].concat())
    }

    fn start_with(port: u16, dir: &std::path::Path, extra: &[&str]) -> Result<Self> {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(extra)
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()?;
        Ok(Self { child, port })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn wait_ready(&self) -> Result {
        let url = self.url();
        let answers = async || {
            let Ok(client) = redis::Client::open(url.as_str()) else { return Ok(false) };
            let Ok(mut con) = client.get_multiplexed_async_connection().await else { return Ok(false) };
            Ok(redis::cmd("PING").query_async::<String>(&mut con).await.is_ok())
        };
        eventually(Duration::from_secs(10), "redis answers", answers).await
    }

    fn kill(&mut self) -> Result {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn ready(server: &TestServer) -> Result<u16> {
    Ok(server.http.get(format!("{}/readyz", server.url)).send().await?.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_loses_nothing_acknowledged_and_readiness_follows_it() -> Result {
    let _serial = SERIAL.lock().await;
    const TOPIC: &str = "faults.restart";
    const N: usize = 1200;
    let dir = TempDir(std::env::temp_dir().join(format!("herald-redis-{}-{}", std::process::id(), free_port()?)));
    std::fs::create_dir_all(&dir.0)?;
    let port = free_port()?;
    let mut redis = PrivateRedis::start(port, &dir.0)?;
    redis.wait_ready().await?;
    let prefix = Prefix::new("restart");
    let all = Arc::new(node_on(&redis.url(), &prefix, Role::All).await?);
    let fanout = node_on(&redis.url(), &prefix, Role::Fanout).await?;
    let (last_tx, last_rx) = watch::channel(0);
    let subs = vec![
        tokio::spawn(collect_until(subscribe(&fanout, TOPIC).await?, last_rx.clone())),
        tokio::spawn(collect_until(subscribe(&all, TOPIC).await?, last_rx)),
    ];

    let (status, body) = all.post("/v1/queues/faults.restart/messages", Some("text/plain"), b"job".to_vec()).await?;
    assert_eq!(status, 201, "{body}");
    let (acked, mut offsets) = mpsc::unbounded_channel();
    let publisher = tokio::spawn(publish_all(all.clone(), TOPIC, N, acked));
    let mut acknowledged = Vec::new();
    while let Some(offset) = offsets.recv().await {
        acknowledged.push(offset);
        if acknowledged.len() == N / 2 {
            redis.kill()?;
            let down = async || Ok(ready(&all).await? == 503 && ready(&fanout).await? == 503);
            eventually(Duration::from_secs(10), "both nodes not ready", down).await?;
            let (status, body) =
                all.post("/v1/queues/faults.restart/messages", Some("text/plain"), b"x".to_vec()).await?;
            assert_eq!((status, body["error"]["code"].as_str()), (503, Some("unavailable")), "enqueue with Redis away");
            redis = PrivateRedis::start(port, &dir.0)?;
            redis.wait_ready().await?;
            let up = async || Ok(ready(&all).await? == 200 && ready(&fanout).await? == 200);
            eventually(Duration::from_secs(20), "both nodes ready again", up).await?;
        }
    }
    within(Duration::from_secs(60), "publisher", publisher).await???;
    nothing_lost(&all, "faults.restart", &acknowledged, last_tx, subs).await
}

/// A subscriber's deliveries being collected as (offset, text).
type Collecting = tokio::task::JoinHandle<Result<Vec<(u64, String)>>>;

/// After a Redis outage during publishing: acknowledged offsets increase, at most the
/// publish in flight when Redis died was stored twice (its answer lost, the publisher
/// retried: at least once, as promised), every subscriber got every offset exactly once
/// with each acknowledged message at its offset, and the job `queue` held before the
/// outage (Redis ran with appendfsync always) is still there, the one refused is not.
async fn nothing_lost(
    node: &TestServer,
    queue: &str,
    acknowledged: &[u64],
    last_tx: watch::Sender<u64>,
    subs: Vec<Collecting>,
) -> Result {
    assert!(acknowledged.windows(2).all(|w| w[0] < w[1]), "acknowledged offsets increase");
    let last = *acknowledged.last().ok_or("nothing acknowledged")?;
    assert!(last <= acknowledged.len() as u64 + 1, "at most the one publish in flight stored twice: {last}");
    last_tx.send(last)?;
    for sub in subs {
        let got = within(Duration::from_secs(60), "subscriber", sub).await???;
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (1..=last).collect::<Vec<_>>(),
            "every offset once"
        );
        for (i, offset) in acknowledged.iter().enumerate() {
            assert_eq!(got[*offset as usize - 1].1, format!("m{i}"), "acknowledged message {i} at its offset");
        }
    }
    let (_, jobs) = node.post(&format!("/v1/queues/{queue}/fetch?max=10"), None, Vec::new()).await?;
    let jobs: Vec<_> = jobs["messages"].as_array().ok_or("messages")?.iter().map(|m| m["data"].clone()).collect();
    assert_eq!(jobs, vec![serde_json::json!("job")], "the job enqueued before the outage");
    Ok(())
}

/// The port of the primary that serves `key`'s slot, from `CLUSTER NODES`.
async fn primary_of(seed: &str, key: &str) -> Result<u16> {
    let mut con = redis::Client::open(seed)?.get_multiplexed_async_connection().await?;
    let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut con).await?;
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut con).await?;
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let owns = fields.iter().skip(8).any(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
        });
        if owns {
            let port = fields.get(1).and_then(|a| a.split(['@', ':']).nth(1)).ok_or("no address")?;
            return Ok(port.parse()?);
        }
    }
    Err(format!("no primary serves slot {slot}").into())
}

async fn cluster_ok(port: u16) -> Result<bool> {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}/")) else { return Ok(false) };
    let Ok(mut con) = client.get_multiplexed_async_connection().await else { return Ok(false) };
    let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut con).await.unwrap_or_default();
    Ok(info.contains("cluster_state:ok"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_cluster_primary_restart_loses_nothing_acknowledged() -> Result {
    let _serial = SERIAL.lock().await;
    const TOPIC: &str = "faults.primary";
    const N: usize = 1200;
    // A private 3-primary cluster with fsynced AOFs, so the killed primary comes back
    // with what it acknowledged and its slots (nodes.conf).
    let dir = TempDir(std::env::temp_dir().join(format!("herald-rc-{}-{}", std::process::id(), free_port()?)));
    let ports = [free_port()?, free_port()?, free_port()?];
    let mut primaries = Vec::new();
    for port in ports {
        let d = dir.0.join(port.to_string());
        std::fs::create_dir_all(&d)?;
        let primary = PrivateRedis::start_clustered(port, &d)?;
        primary.wait_ready().await?;
        primaries.push(primary);
    }
    let created = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(std::process::Stdio::null())
        .status()?;
    assert!(created.success(), "redis-cli --cluster create");
    for port in ports {
        eventually(Duration::from_secs(20), "cluster_state:ok", async || cluster_ok(port).await).await?;
    }
    let seeds = ports.iter().map(|p| format!("redis://127.0.0.1:{p}/")).collect::<Vec<_>>().join(",");
    let prefix = Prefix::new("primary-restart");
    let all = Arc::new(node_on(&seeds, &prefix, Role::All).await?);
    let fanout = node_on(&seeds, &prefix, Role::Fanout).await?;
    let (status, body) = all.post("/v1/queues/faults.primary/messages", Some("text/plain"), b"job".to_vec()).await?;
    assert_eq!(status, 201, "{body}");
    let (last_tx, last_rx) = watch::channel(0);
    let subs = vec![
        tokio::spawn(collect_until(subscribe(&fanout, TOPIC).await?, last_rx.clone())),
        tokio::spawn(collect_until(subscribe(&all, TOPIC).await?, last_rx)),
    ];
    // The primary that holds the topic (and, killed, its pub/sub shard).
    let doomed_port = primary_of(&primaries[0].url(), &format!("{}{{t:{TOPIC}}}:meta", prefix.0)).await?;
    let doomed = ports.iter().position(|p| *p == doomed_port).ok_or("not one of ours")?;

    let (acked, mut offsets) = mpsc::unbounded_channel();
    let publisher = tokio::spawn(publish_all(all.clone(), TOPIC, N, acked));
    let mut acknowledged = Vec::new();
    while let Some(offset) = offsets.recv().await {
        acknowledged.push(offset);
        if acknowledged.len() == N / 2 {
            primaries[doomed].kill()?;
            let (status, _) =
                all.post(&format!("/v1/topics/{TOPIC}/messages"), Some("text/plain"), b"x".to_vec()).await?;
            assert_eq!(status, 503, "a publish to the topic of a primary that is down");
            let d = dir.0.join(doomed_port.to_string());
            primaries[doomed] = PrivateRedis::start_clustered(doomed_port, &d)?;
            primaries[doomed].wait_ready().await?;
            eventually(Duration::from_secs(20), "cluster_state:ok again", async || cluster_ok(doomed_port).await)
                .await?;
        }
    }
    within(Duration::from_secs(60), "publisher", publisher).await???;
    nothing_lost(&all, "faults.primary", &acknowledged, last_tx, subs).await
}
