//! The PostgreSQL store under faults, always against the PostgreSQL of
//! `HERALD_TEST_POSTGRES_URL` (default the local `test` database) whatever
//! `HERALD_TEST_STORE` says, each test in a schema of its own dropped at its end: the real
//! binary killed with SIGKILL under publish and enqueue load, the server's database
//! sessions terminated while it publishes and delivers, and the database cut off behind
//! a proxy. Whatever was acknowledged is kept exactly once at its offset, every
//! acknowledged job is delivered (and none twice within its lease), and a write the
//! database could not take is answered 503 `unavailable`, never 201.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::{eventually, postgres_url, spawn_herald, start, within, PgSchema, Result, TestServer};
use herald_server::StoreKind;
use herald_testkit::pg::Proxy;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Pause of a publisher, producer or worker after a 503, before it tries again.
const BACKOFF: Duration = Duration::from_millis(20);

/// A schema no other test or run uses, dropped (with its tables) by the guard.
fn new_schema() -> PgSchema {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    PgSchema(format!("herald_faults_{}_{n}_{nanos}", std::process::id()))
}

/// `url` with `key=value` added to its query.
fn with_param(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={value}")
}

/// What the load was told: every payload sent, and which were acknowledged.
#[derive(Default)]
struct Ledger {
    /// Every payload a publisher or producer sent, answered or not.
    sent: BTreeSet<String>,
    /// Topic -> offset -> payload, for every publish answered 201.
    published: BTreeMap<String, BTreeMap<u64, String>>,
    /// Jobs answered 201.
    enqueued: BTreeSet<String>,
    /// Job -> how many times a worker was handed it.
    delivered: BTreeMap<String, u32>,
}

/// Locks the ledger; no lock is held across an await.
fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|e| e.into_inner())
}

/// What publishers, producers and workers share.
#[derive(Clone)]
struct Load {
    http: reqwest::Client,
    url: String,
    ledger: Arc<Mutex<Ledger>>,
    /// Acknowledged publishes and enqueues so far.
    acks: Arc<watch::Sender<usize>>,
    /// Publishers and producers stop at their next round.
    stop: CancellationToken,
    /// Set just before the server is killed: from then on an unreachable server ends a
    /// task quietly instead of failing it.
    killed: Arc<AtomicBool>,
    /// Requests answered 503 `unavailable`.
    refusals: Arc<AtomicU64>,
}

impl Load {
    fn new(url: &str) -> Self {
        Self {
            http: common::http(),
            url: url.to_owned(),
            ledger: Arc::default(),
            acks: Arc::new(watch::channel(0).0),
            stop: CancellationToken::new(),
            killed: Arc::default(),
            refusals: Arc::default(),
        }
    }

    /// POSTs `body` (text) to `path`; status and JSON answer (`null` when it has none),
    /// or `None` once the server was killed and cannot be reached.
    async fn post(&self, path: &str, body: Option<&str>) -> Result<Option<(u16, Value)>> {
        let mut request = self.http.post(format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.header("content-type", "text/plain").body(body.to_owned());
        }
        let answer = async {
            let r = request.send().await?;
            let status = r.status().as_u16();
            let bytes = r.bytes().await?;
            Ok::<_, reqwest::Error>((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
        };
        match answer.await {
            Ok(answer) => Ok(Some(answer)),
            Err(_) if self.killed.load(Ordering::SeqCst) => Ok(None),
            Err(e) => Err(format!("POST {path}: {e}").into()),
        }
    }

    /// Sends numbered messages to `topics` in turn until stopped; records each 201.
    async fn publisher(self, me: usize, topics: Vec<String>) -> Result {
        for i in 0.. {
            if self.stop.is_cancelled() {
                break;
            }
            let topic = &topics[i % topics.len()];
            let payload = format!("{topic}/p{me}/{i}");
            lock(&self.ledger).sent.insert(payload.clone());
            let Some((status, reply)) = self.post(&format!("/v1/topics/{topic}/messages"), Some(&payload)).await?
            else {
                break;
            };
            match status {
                201 => {
                    let offset = reply["offset"].as_u64().ok_or_else(|| format!("no offset in {reply}"))?;
                    let mut ledger = lock(&self.ledger);
                    let earlier = ledger.published.entry(topic.clone()).or_default().insert(offset, payload.clone());
                    if let Some(earlier) = earlier {
                        return Err(format!("{topic} offset {offset} acknowledged twice: {earlier}, {payload}").into());
                    }
                    drop(ledger);
                    self.acks.send_modify(|n| *n += 1);
                }
                503 => self.refused(&payload, &reply).await?,
                _ => return Err(format!("publish {payload}: {status} {reply}").into()),
            }
        }
        Ok(())
    }

    /// Enqueues numbered jobs into `queue` until stopped; records each 201.
    async fn producer(self, me: usize, queue: String) -> Result {
        for i in 0.. {
            if self.stop.is_cancelled() {
                break;
            }
            let job = format!("{queue}/q{me}/{i}");
            lock(&self.ledger).sent.insert(job.clone());
            let Some((status, reply)) = self.post(&format!("/v1/queues/{queue}/messages"), Some(&job)).await? else {
                break;
            };
            match status {
                201 => {
                    lock(&self.ledger).enqueued.insert(job);
                    self.acks.send_modify(|n| *n += 1);
                }
                503 => self.refused(&job, &reply).await?,
                _ => return Err(format!("enqueue {job}: {status} {reply}").into()),
            }
        }
        Ok(())
    }

    /// Fetches from `queue` with 60 s leases and acks each job at once, until a fetch
    /// begun after `producers_done` finds the queue empty.
    async fn worker(self, queue: String, producers_done: CancellationToken) -> Result {
        loop {
            let last_round = producers_done.is_cancelled();
            let path = format!("/v1/queues/{queue}/fetch?max=10&visibility_ms=60000&wait_ms=100");
            let Some((status, reply)) = self.post(&path, None).await? else { return Ok(()) };
            match status {
                200 => {
                    let jobs = reply["messages"].as_array().ok_or_else(|| format!("no messages in {reply}"))?;
                    if jobs.is_empty() && last_round {
                        return Ok(());
                    }
                    for job in jobs {
                        let data = job["data"].as_str().ok_or_else(|| format!("no data in {job}"))?;
                        *lock(&self.ledger).delivered.entry(data.to_owned()).or_default() += 1;
                        let id = job["id"].as_str().ok_or_else(|| format!("no id in {job}"))?;
                        self.ack(&queue, id).await?;
                    }
                }
                503 => self.refused("a fetch", &reply).await?,
                _ => return Err(format!("fetch: {status} {reply}").into()),
            }
        }
    }

    /// Acks `id`, retrying while the database is unavailable. A 404 after a failed try
    /// means that try went through and only its answer was lost (the lease, 60 s, is
    /// still ours otherwise).
    async fn ack(&self, queue: &str, id: &str) -> Result {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut failed = false;
        loop {
            let Some((status, reply)) = self.post(&format!("/v1/queues/{queue}/ack/{id}"), None).await? else {
                return Ok(());
            };
            match status {
                204 => return Ok(()),
                404 if failed => return Ok(()),
                503 if tokio::time::Instant::now() < deadline => {
                    failed = true;
                    self.refused("an ack", &reply).await?;
                }
                _ => return Err(format!("ack {id}: {status} {reply}").into()),
            }
        }
    }

    /// A 503 must say `unavailable`; then a pause before the next try.
    async fn refused(&self, what: &str, reply: &Value) -> Result {
        if reply["error"]["code"] != "unavailable" {
            return Err(format!("{what} refused without code unavailable: {reply}").into());
        }
        self.refusals.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(BACKOFF).await;
        Ok(())
    }
}

/// Every message of `topic`: offset -> payload (a repeated offset fails).
async fn history(http: &reqwest::Client, url: &str, topic: &str) -> Result<BTreeMap<u64, String>> {
    let mut served = BTreeMap::new();
    let mut from = 0;
    loop {
        let r = http.get(format!("{url}/v1/topics/{topic}/messages?from={from}&limit=1000")).send().await?;
        let status = r.status().as_u16();
        let page: Value = serde_json::from_slice(&r.bytes().await?)?;
        if status != 200 {
            return Err(format!("history of {topic}: {status} {page}").into());
        }
        let messages = page["messages"].as_array().ok_or_else(|| format!("no messages in {page}"))?;
        if messages.is_empty() {
            return Ok(served);
        }
        for m in messages {
            let offset = m["offset"].as_u64().ok_or_else(|| format!("no offset in {m}"))?;
            let data = m["data"].as_str().ok_or_else(|| format!("no data in {m}"))?;
            if served.insert(offset, data.to_owned()).is_some() {
                return Err(format!("{topic}: offset {offset} served twice").into());
            }
        }
        from = page["next"].as_u64().ok_or_else(|| format!("no next in {page}"))?;
    }
}

/// Checks every topic's history against the ledger: offsets 1..=n without a hole, every
/// acknowledged payload at its offset, no payload twice, nothing that was never sent.
async fn check_histories(http: &reqwest::Client, url: &str, topics: &[String], ledger: &Mutex<Ledger>) -> Result {
    for topic in topics {
        let served = history(http, url, topic).await?;
        let ledger = lock(ledger);
        let acked = ledger.published.get(topic).cloned().unwrap_or_default();
        let offsets: Vec<u64> = served.keys().copied().collect();
        assert_eq!(offsets, (1..=offsets.len() as u64).collect::<Vec<_>>(), "{topic}: offsets have a hole");
        for (offset, payload) in &acked {
            assert_eq!(served.get(offset), Some(payload), "{topic}: acknowledged offset {offset}");
        }
        let mut seen = BTreeSet::new();
        for payload in served.values() {
            assert!(seen.insert(payload), "{topic}: {payload} stored twice");
            assert!(ledger.sent.contains(payload), "{topic}: {payload} was never sent");
        }
        eprintln!("{topic}: {} messages, {} acknowledged", served.len(), acked.len());
    }
    Ok(())
}

/// Fetches (5 s leases) and acks until `queue` is empty; job -> times delivered.
async fn drain(http: &reqwest::Client, url: &str, queue: &str) -> Result<BTreeMap<String, u32>> {
    let mut delivered = BTreeMap::new();
    loop {
        let r = http.post(format!("{url}/v1/queues/{queue}/fetch?max=100&visibility_ms=5000")).send().await?;
        let status = r.status().as_u16();
        let reply: Value = serde_json::from_slice(&r.bytes().await?)?;
        if status != 200 {
            return Err(format!("fetch from {queue}: {status} {reply}").into());
        }
        let jobs = reply["messages"].as_array().ok_or_else(|| format!("no messages in {reply}"))?;
        if jobs.is_empty() {
            return Ok(delivered);
        }
        for job in jobs {
            let data = job["data"].as_str().ok_or_else(|| format!("no data in {job}"))?;
            *delivered.entry(data.to_owned()).or_default() += 1;
            let id = job["id"].as_str().ok_or_else(|| format!("no id in {job}"))?;
            let acked = http.post(format!("{url}/v1/queues/{queue}/ack/{id}")).send().await?.status();
            assert_eq!(acked, 204, "ack of {data}");
        }
    }
}

/// Awaits every task (within `limit`), failing with the first error.
async fn join_all(limit: Duration, what: &str, tasks: Vec<JoinHandle<Result>>) -> Result {
    within(limit, what, async {
        for task in tasks {
            task.await??;
        }
        Ok::<_, common::Error>(())
    })
    .await?
}

/// `/readyz`'s status.
async fn readyz(http: &reqwest::Client, url: &str) -> Result<u16> {
    Ok(http.get(format!("{url}/readyz")).send().await?.status().as_u16())
}

/// POSTs `body` (text) to `path` of `server`; status and JSON answer.
async fn post_text(server: &TestServer, path: &str, body: &str) -> Result<(u16, Value)> {
    server.post(path, Some("text/plain"), body.as_bytes().to_vec()).await
}

/// Starts an in-process server on PostgreSQL at `url`, in `schema`, with a small pool
/// (tests share the database's connections).
async fn start_on(url: String, schema: &PgSchema) -> Result<TestServer> {
    let schema = schema.0.clone();
    start(move |c| {
        c.store = StoreKind::Postgres;
        c.postgres.url = url;
        c.postgres.schema = schema;
        c.postgres.pool_size = 6;
    })
    .await
}

/// Stops an in-process server and waits until it has (its pool closed) before its
/// schema is dropped.
async fn stop(mut server: TestServer) -> Result {
    let server = server.server.take().ok_or("no server")?;
    server.shutdown();
    server.shutdown(); // again: no drain delay
    within(Duration::from_secs(10), "server stops", server.wait()).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged() -> Result {
    let schema = new_schema();
    let url = postgres_url();
    let args = [
        "--store",
        "postgres",
        "--postgres-url",
        url.as_str(),
        "--postgres-schema",
        schema.0.as_str(),
        "--postgres-pool-size",
        "6",
    ];
    let topics: Vec<String> = ["orders", "audit", "events"].map(String::from).to_vec();
    let (mut child, base) = spawn_herald(&args)?;
    let load = Load::new(&base);
    let mut tasks = Vec::new();
    for p in 0..4 {
        tasks.push(tokio::spawn(load.clone().publisher(p, topics.clone())));
    }
    for p in 0..3 {
        tasks.push(tokio::spawn(load.clone().producer(p, "jobs".to_owned())));
    }
    let mut acks = load.acks.subscribe();
    within(Duration::from_secs(15), "400 acknowledgements", acks.wait_for(|n| *n >= 400)).await??;
    load.killed.store(true, Ordering::SeqCst);
    child.kill()?; // SIGKILL, mid-load
    child.wait()?;
    join_all(Duration::from_secs(10), "the load stops", tasks).await?;

    let (_child, base) = spawn_herald(&args)?;
    check_histories(&load.http, &base, &topics, &load.ledger).await?;
    let delivered = within(Duration::from_secs(15), "drain", drain(&load.http, &base, "jobs")).await??;
    let ledger = lock(&load.ledger);
    let missing: Vec<&String> = ledger.enqueued.iter().filter(|job| !delivered.contains_key(*job)).collect();
    assert!(missing.is_empty(), "acknowledged jobs not delivered: {missing:?}");
    for (job, times) in &delivered {
        assert!(ledger.sent.contains(job), "{job} was never sent");
        assert_eq!(*times, 1, "{job} delivered {times} times (enqueued twice?)");
    }
    eprintln!("jobs: {} delivered, {} acknowledged", delivered.len(), ledger.enqueued.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_terminated_while_publishing_and_consuming() -> Result {
    let schema = new_schema();
    // The server's sessions carry the schema's name, so only they are terminated.
    let app = schema.0.clone();
    let server = start_on(with_param(&postgres_url(), "application_name", &app), &schema).await?;
    let (admin, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let topics: Vec<String> = ["alpha", "beta"].map(String::from).to_vec();
    let load = Load::new(&server.url);
    let producers_done = CancellationToken::new();
    let mut writers = Vec::new();
    for p in 0..3 {
        writers.push(tokio::spawn(load.clone().publisher(p, topics.clone())));
    }
    for p in 0..2 {
        writers.push(tokio::spawn(load.clone().producer(p, "work".to_owned())));
    }
    let workers: Vec<_> =
        (0..3).map(|_| tokio::spawn(load.clone().worker("work".to_owned(), producers_done.clone()))).collect();
    let mut acks = load.acks.subscribe();
    within(Duration::from_secs(10), "the load runs", acks.wait_for(|n| *n >= 100)).await??;

    // Every 200 ms, 15 times, while the load runs: every session of the server ends.
    let mut terminated = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    for _ in 0..15 {
        tick.tick().await;
        // In the select list, not the WHERE clause: evaluated only for the rows the
        // filter kept (a WHERE clause's conditions may be evaluated in any order).
        let sql = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1";
        for row in admin.query(sql, &[&app]).await? {
            terminated += u32::from(row.try_get::<_, bool>(0)?);
        }
    }
    assert!(terminated >= 15, "only {terminated} sessions of the server were terminated");
    let acked_during = *load.acks.borrow();
    let refusals = load.refusals.load(Ordering::Relaxed);

    // Back to ready, and a publish is taken again.
    eventually(Duration::from_secs(10), "/readyz is 200 again", || async {
        Ok(readyz(&load.http, &server.url).await? == 200)
    })
    .await?;
    // A pooled connection terminated a moment ago may not be known closed yet: its first
    // statement fails (503, retried), and the pool replaces it.
    let mut tries = 0;
    eventually(Duration::from_secs(10), "a publish is taken again", || {
        tries += 1;
        let (payload, server, ledger) = (format!("after-{tries}"), &server, &load.ledger);
        async move {
            lock(ledger).sent.insert(payload.clone());
            let (status, reply) = post_text(server, "/v1/topics/alpha/messages", &payload).await?;
            match status {
                201 => {
                    let offset = reply["offset"].as_u64().ok_or("offset")?;
                    lock(ledger).published.entry("alpha".to_owned()).or_default().insert(offset, payload);
                    Ok(true)
                }
                503 if reply["error"]["code"] == "unavailable" => Ok(false),
                _ => Err(format!("a publish once ready again: {status} {reply}").into()),
            }
        }
    })
    .await?;

    load.stop.cancel();
    join_all(Duration::from_secs(10), "publishers and producers stop", writers).await?;
    producers_done.cancel();
    join_all(Duration::from_secs(15), "workers drain the queue", workers).await?;

    check_histories(&load.http, &server.url, &topics, &load.ledger).await?;
    {
        let ledger = lock(&load.ledger);
        let missing: Vec<&String> = ledger.enqueued.iter().filter(|job| !ledger.delivered.contains_key(*job)).collect();
        assert!(missing.is_empty(), "acknowledged jobs not delivered: {missing:?}");
        for (job, times) in &ledger.delivered {
            assert!(ledger.sent.contains(job), "{job} was never sent");
            assert_eq!(*times, 1, "{job} delivered {times} times within its 60 s lease");
        }
        eprintln!(
            "{terminated} sessions terminated; {acked_during} acknowledgements and {} refusals by then; {tries} \
             publishes to be taken again; jobs: {} delivered, {} acknowledged",
            refusals,
            ledger.delivered.len(),
            ledger.enqueued.len()
        );
    }
    drop(admin);
    let _ = connection.await;
    stop(server).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_unreachable_readiness_and_errors() -> Result {
    let schema = new_schema();
    let (upstream, user, name) = herald_testkit::pg::server(&postgres_url())?;
    let mut proxy = Proxy::start(upstream).await?;
    let server = start_on(format!("postgres://{user}@127.0.0.1:{}/{name}", proxy.port), &schema).await?;
    let http = &server.http;
    let mut before = Vec::new();
    for i in 0..5 {
        let (status, reply) = post_text(&server, "/v1/topics/cut/messages", &format!("before-{i}")).await?;
        assert_eq!(status, 201, "{reply}");
        before.push(format!("before-{i}"));
        let (status, reply) = post_text(&server, "/v1/queues/cutq/messages", &format!("job-before-{i}")).await?;
        assert_eq!(status, 201, "{reply}");
    }

    proxy.cut().await;
    eventually(Duration::from_secs(10), "/readyz is 503", || async { Ok(readyz(http, &server.url).await? == 503) })
        .await?;
    let (_, reply) = server.get_json("/readyz").await?;
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    for i in 0..5 {
        let (status, reply) = post_text(&server, "/v1/topics/cut/messages", &format!("refused-{i}")).await?;
        assert_eq!((status, &reply["error"]["code"]), (503, &Value::from("unavailable")), "a publish: {reply}");
        let (status, reply) = post_text(&server, "/v1/queues/cutq/messages", &format!("job-refused-{i}")).await?;
        assert_eq!((status, &reply["error"]["code"]), (503, &Value::from("unavailable")), "an enqueue: {reply}");
    }
    let (status, reply) = server.post("/v1/queues/cutq/fetch?visibility_ms=1000", None, Vec::new()).await?;
    assert_eq!((status, &reply["error"]["code"]), (503, &Value::from("unavailable")), "a fetch: {reply}");

    proxy.resume().await?;
    eventually(Duration::from_secs(10), "/readyz is 200 again", || async {
        Ok(readyz(http, &server.url).await? == 200)
    })
    .await?;
    let (status, reply) = post_text(&server, "/v1/topics/cut/messages", "after").await?;
    assert_eq!((status, &reply["offset"]), (201, &Value::from(6)), "a publish once ready: {reply}");
    before.push("after".to_owned());
    let (status, reply) = post_text(&server, "/v1/queues/cutq/messages", "job-after").await?;
    assert_eq!(status, 201, "an enqueue once ready: {reply}");

    // Only what was acknowledged is there: the refused writes left nothing behind.
    let served = history(http, &server.url, "cut").await?;
    let expected: BTreeMap<u64, String> = (1..).zip(before).collect();
    assert_eq!(served, expected, "the history");
    let delivered = within(Duration::from_secs(10), "drain", drain(http, &server.url, "cutq")).await??;
    let jobs: BTreeSet<String> = delivered.into_keys().collect();
    let mut expected: BTreeSet<String> = (0..5).map(|i| format!("job-before-{i}")).collect();
    expected.insert("job-after".to_owned());
    assert_eq!(jobs, expected, "the jobs delivered");
    stop(server).await
}
