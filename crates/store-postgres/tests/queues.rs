//! `PgQueues` runs the queue conformance suite with two nodes (two pools, two LISTEN
//! connections, one schema) against the PostgreSQL at `HERALD_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`); each case gets a schema of its
//! own, dropped at its end. Then what the suite does not reach: many workers on two
//! nodes, the long poll woken by another node's enqueue (and by a delay ending), a
//! delivery refused once its lease ended and the job went to someone else, a database
//! that does not answer; many acks and fetches at once (served in batches: stale acks
//! refused, no job to two callers, each lease its caller's); and, ignored by default,
//! the round-trip benchmark.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use herald_core::{
    Clock, Kind, ManualClock, NewMessage, QueueConfig, QueueError, QueueName, QueueService, QueueStats, StoreError,
    SystemClock,
};
use herald_store_postgres::{PgQueues, PgQueuesError};
use herald_testkit::conformance::Result;
use herald_testkit::queues::{Node, Opening, QueueBackend};
use tokio::sync::OnceCell;
use tokio_postgres::NoTls;

/// Stand-in for the migration runner: this crate's queue tables, `{schema}` replaced.
const MIGRATION: &str = include_str!("../migrations/002_queues.sql");

/// The time the cases start at (ms since the Unix epoch).
const START_MS: u64 = 1_700_000_000_000;

fn url() -> String {
    std::env::var("HERALD_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn quoted(schema: &str) -> String {
    format!("\"{}\"", schema.replace('"', "\"\""))
}

/// A schema of its own, made at the first node, dropped (CASCADE) on drop.
struct Pg {
    url: String,
    schema: String,
    created: OnceCell<()>,
}

impl Pg {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let schema = format!("herald_test_q_{}_{}_{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        Self { url: url(), schema, created: OnceCell::new() }
    }

    async fn client(&self) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    async fn create(&self) -> Result {
        self.created
            .get_or_try_init(|| async {
                let client = self.client().await?;
                let schema = quoted(&self.schema);
                client.batch_execute(&format!("CREATE SCHEMA {schema}")).await?;
                client.batch_execute(&MIGRATION.replace("{schema}", &schema)).await?;
                Result::Ok(())
            })
            .await?;
        Ok(())
    }

    fn pool(config: tokio_postgres::Config, size: usize) -> Result<Pool> {
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        Ok(Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()?)
    }

    /// The nodes' connections, named after the schema (so a test can find them).
    fn config(&self) -> Result<tokio_postgres::Config> {
        let mut config: tokio_postgres::Config = self.url.parse()?;
        config.application_name(&self.schema);
        Ok(config)
    }

    async fn node(&self, clock: Arc<dyn Clock>, config: QueueConfig, max_bytes: usize) -> Result<PgQueues> {
        self.node_with(clock, config, max_bytes, 8).await
    }

    async fn node_with(
        &self,
        clock: Arc<dyn Clock>,
        config: QueueConfig,
        max_bytes: usize,
        pool_size: usize,
    ) -> Result<PgQueues> {
        self.create().await?;
        let pool = Self::pool(self.config()?, pool_size)?;
        Ok(PgQueues::new(pool, self.schema.clone(), (self.config()?, NoTls), clock, config, max_bytes).await?)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.created.get().is_none() {
            return;
        }
        let statement = format!("DROP SCHEMA IF EXISTS {} CASCADE", quoted(&self.schema));
        let dropped = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let client = self.client().await?;
                client.batch_execute(&statement).await?;
                Result::Ok(())
            })
        });
        if let Err(e) = dropped {
            eprintln!("could not drop schema {}: {e}", self.schema);
        }
    }
}

impl QueueBackend for Pg {
    fn open<'a>(&'a self, config: QueueConfig, max_message_bytes: usize, clock: Arc<ManualClock>) -> Opening<'a> {
        Box::pin(async move {
            let node: Node = Arc::new(self.node(clock, config, max_message_bytes).await?);
            Ok(node)
        })
    }
}

mod conformance {
    use super::*;
    herald_testkit::queue_conformance!(Pg::new());
}

fn queue(name: &str) -> Result<QueueName> {
    Ok(QueueName::parse(name)?)
}

fn text(s: &str) -> NewMessage {
    NewMessage::new(Kind::Text, Bytes::copy_from_slice(s.as_bytes()))
}

async fn two_nodes(pg: &Pg, config: QueueConfig) -> Result<(Arc<PgQueues>, Arc<PgQueues>, Arc<ManualClock>)> {
    let clock = Arc::new(ManualClock::new(START_MS));
    let a = Arc::new(pg.node(clock.clone(), config, 1 << 20).await?);
    let b = Arc::new(pg.node(clock.clone(), config, 1 << 20).await?);
    Ok((a, b, clock))
}

/// Eight workers, four per node, long-polling in batches while four producers (two per
/// node) enqueue 2000 jobs: every job acked exactly once, and never held by two leases
/// at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_on_two_nodes_ack_each_job_once() -> Result {
    const JOBS: usize = 2000;
    const PRODUCERS: usize = 4;
    let pg = Pg::new();
    let (a, b, _clock) = two_nodes(&pg, QueueConfig::default()).await?;
    let q = queue("work.many")?;
    let held = Arc::new(Mutex::new(HashSet::<String>::new()));
    let acked = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let (done, overlaps) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut workers = Vec::new();
    for i in 0..8 {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (q, held, acked, done, overlaps) = (q.clone(), held.clone(), acked.clone(), done.clone(), overlaps.clone());
        workers.push(tokio::spawn(async move {
            while done.load(Ordering::Acquire) < JOBS && Instant::now() < deadline {
                for d in node.fetch_wait(&q, 10, 60_000, Duration::from_millis(200)).await? {
                    let job = String::from_utf8_lossy(&d.payload).into_owned();
                    if !held.lock().map_err(|_| "poisoned")?.insert(job.clone()) {
                        overlaps.fetch_add(1, Ordering::Relaxed);
                    }
                    node.ack(&q, &d.id).await?;
                    held.lock().map_err(|_| "poisoned")?.remove(&job);
                    *acked.lock().map_err(|_| "poisoned")?.entry(job).or_default() += 1;
                    done.fetch_add(1, Ordering::AcqRel);
                }
            }
            Result::Ok(())
        }));
    }
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let node = if p % 2 == 0 { a.clone() } else { b.clone() };
            let q = q.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (p..JOBS).step_by(PRODUCERS) {
                    ids.push(node.enqueue(&q, text(&format!("job-{i}")), 0).await?);
                }
                Result::Ok(ids)
            })
        })
        .collect();
    let mut ids = Vec::new();
    for p in producers {
        let mine = p.await??;
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "one producer's ids grow");
        ids.extend(mine);
    }
    for w in workers {
        w.await??;
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), JOBS, "unique ids");
    assert_eq!(ids.first().copied(), Some(1));
    assert_eq!(ids.last().copied(), Some(JOBS as u64), "consecutive ids");
    let acked = acked.lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(acked.len(), JOBS, "every job acked");
    assert!(acked.values().all(|&n| n == 1), "a job acked twice");
    assert_eq!(overlaps.load(Ordering::Relaxed), 0, "a job held by two leases at once");
    assert_eq!(a.stats(&q).await?, QueueStats::default());
    let count = |f: fn(&herald_core::QueueCounters) -> u64| f(a.counters()) + f(b.counters());
    assert_eq!(count(|c| c.enqueued.load(Ordering::Relaxed)), JOBS as u64);
    assert_eq!(count(|c| c.acked.load(Ordering::Relaxed)), JOBS as u64);
    assert_eq!(count(|c| c.delivered.load(Ordering::Relaxed)), JOBS as u64);
    Ok(())
}

/// A long poll on one node returns as soon as the other node's enqueue commits (the
/// notification), not at its wait's end nor at a re-check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_wakes_promptly_on_an_enqueue_from_the_other_node() -> Result {
    let pg = Pg::new();
    let (a, b, _clock) = two_nodes(&pg, QueueConfig::default()).await?;
    assert!(a.is_listening() && b.is_listening());
    let q = queue("poll.prompt")?;
    for round in 0..5 {
        let poll = {
            let (b, q) = (b.clone(), q.clone());
            tokio::spawn(async move { b.fetch_wait(&q, 1, 1000, Duration::from_secs(20)).await })
        };
        while b.counters().waiting.load(Ordering::Acquire) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Let the poll reach its sleep, so that the wake-up below is the notification's.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        a.enqueue(&q, text(&format!("wake-{round}")), 0).await?;
        let got = tokio::time::timeout(Duration::from_secs(5), poll).await.map_err(|_| "not woken")???;
        let took = started.elapsed();
        assert_eq!(got.len(), 1, "round {round}");
        assert!(took < Duration::from_millis(500), "round {round}: woken after {took:?}");
        b.ack(&q, &got[0].id).await?;
    }
    Ok(())
}

/// One notification for a batch of jobs wakes one waiter, which passes the wake-up on
/// while its fetch comes back full: every one of 16 waiters (one job each) gets a job of
/// one 15-job batch promptly (plus the one job before it), none left asleep until its
/// wait's end; one job is taken by one waiter while the others go on waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_wakes_as_many_waiters_as_it_feeds() -> Result {
    const WAITERS: usize = 16;
    let pg = Pg::new();
    let (a, b, _clock) = two_nodes(&pg, QueueConfig::default()).await?;
    let q = queue("poll.herd")?;
    let polls: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (b, q) = (b.clone(), q.clone());
            tokio::spawn(async move { b.fetch_wait(&q, 1, 60_000, Duration::from_secs(20)).await })
        })
        .collect();
    while b.counters().waiting.load(Ordering::Acquire) < WAITERS {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Let the polls reach their sleep, so that the wake-ups below are the notification's.
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.enqueue(&q, text("one"), 0).await?;
    let started = Instant::now();
    while b.counters().waiting.load(Ordering::Acquire) > WAITERS - 1 {
        assert!(started.elapsed() < Duration::from_secs(5), "one job woke nobody");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.counters().waiting.load(Ordering::Acquire), WAITERS - 1, "one job, one waiter");

    let batch = (1..WAITERS).map(|i| (text(&format!("job-{i}")), 0)).collect();
    let ids: Vec<u64> = a.enqueue_batch(&q, batch).await.into_iter().collect::<std::result::Result<_, _>>()?;
    assert_eq!(ids.len(), WAITERS - 1);
    let mut got = Vec::new();
    for poll in polls {
        let jobs =
            tokio::time::timeout(Duration::from_secs(5), poll).await.map_err(|_| "a waiter left asleep")???;
        got.extend(jobs.into_iter().map(|d| d.message_id));
    }
    got.sort_unstable();
    assert_eq!(got.len(), WAITERS, "every waiter got one job");
    assert!(started.elapsed() < Duration::from_secs(5), "woken after {:?}", started.elapsed());
    Ok(())
}

/// A long poll wakes when a delayed job becomes ready (its timer), with no other event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_wakes_when_a_delay_ends() -> Result {
    let pg = Pg::new();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let a = Arc::new(pg.node(clock.clone(), QueueConfig::default(), 1 << 20).await?);
    let b = Arc::new(pg.node(clock, QueueConfig::default(), 1 << 20).await?);
    let q = queue("poll.delay")?;
    let started = Instant::now();
    a.enqueue(&q, text("later"), 300).await?;
    let got = b.fetch_wait(&q, 1, 1000, Duration::from_secs(10)).await?;
    let took = started.elapsed();
    assert_eq!(got.len(), 1);
    assert!(took >= Duration::from_millis(290) && took < Duration::from_millis(900), "woken after {took:?}");
    Ok(())
}

/// Once a lease ended and the job was delivered again, the first delivery id is refused
/// for ack, requeue and extend, on either node; the current one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_after_its_lease_ended_and_redelivery_is_refused() -> Result {
    let pg = Pg::new();
    let (a, b, clock) = two_nodes(&pg, QueueConfig::default()).await?;
    let q = queue("stale.lease")?;
    a.enqueue(&q, text("job"), 0).await?;
    let first = b.fetch_wait(&q, 1, 1000, Duration::ZERO).await?;
    clock.advance(1000);
    let second = a.fetch_wait(&q, 1, 1000, Duration::ZERO).await?;
    assert_eq!((second[0].message_id, second[0].attempt), (first[0].message_id, 2));
    assert_ne!(first[0].id, second[0].id);
    let stale = &first[0].id;
    for node in [&a, &b] {
        assert!(matches!(node.ack(&q, stale).await, Err(QueueError::NotFound(_))));
        assert!(matches!(node.requeue(&q, stale, 0).await, Err(QueueError::NotFound(_))));
        assert!(matches!(node.extend(&q, stale, 1000).await, Err(QueueError::NotFound(_))));
    }
    assert_eq!(b.stats(&q).await?, QueueStats { in_flight: 1, ..QueueStats::default() });
    b.ack(&q, &second[0].id).await?;
    assert_eq!(a.stats(&q).await?, QueueStats::default());
    Ok(())
}

fn is_unavailable<T: std::fmt::Debug>(got: &std::result::Result<T, QueueError>) -> bool {
    matches!(got, Err(QueueError::Store(StoreError::Unavailable(_))))
}

/// With no database to reach, every operation answers `unavailable` (no panic, no
/// false success), a long poll too; and no LISTEN connection means no `PgQueues`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_does_not_answer_is_unavailable() -> Result {
    let pg = Pg::new();
    let nowhere = "postgres://postgres@127.0.0.1:1/test";
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(START_MS));
    let config = QueueConfig::default();
    let no_listen = PgQueues::new(
        Pg::pool(nowhere.parse()?, 2)?,
        pg.schema.clone(),
        (nowhere.parse()?, NoTls),
        clock.clone(),
        config,
        64,
    );
    assert!(matches!(no_listen.await, Err(PgQueuesError::Listen(_))));
    let node =
        PgQueues::new(Pg::pool(nowhere.parse()?, 2)?, pg.schema.clone(), (pg.url.parse()?, NoTls), clock, config, 64)
            .await?;
    let q = queue("down.jobs")?;
    assert!(is_unavailable(&node.enqueue(&q, text("x"), 0).await));
    assert!(is_unavailable(&node.fetch_wait(&q, 1, 1000, Duration::ZERO).await));
    assert!(is_unavailable(&node.fetch_wait(&q, 1, 1000, Duration::from_secs(5)).await));
    assert!(is_unavailable(&node.ack(&q, "1-1-1").await));
    assert!(is_unavailable(&node.requeue(&q, "1-1-1", 0).await));
    assert!(is_unavailable(&node.extend(&q, "1-1-1", 10).await));
    assert!(is_unavailable(&node.stats(&q).await));
    assert!(is_unavailable(&node.purge(&q).await));
    assert!(is_unavailable(&node.redrive(&q, 10).await));
    assert!(is_unavailable(&node.list("", None, 10, &|_| true).await));
    assert_eq!(node.counters().enqueued.load(Ordering::Relaxed), 0);
    node.close().await;
    assert!(matches!(node.enqueue(&q, text("x"), 0).await, Err(QueueError::Store(StoreError::Closed))));
    Ok(())
}

/// Every connection of both nodes terminated by the server while a long poll waits:
/// the poll still gets a job enqueued meanwhile (re-check, then the reconnected LISTEN
/// connection's wake-up), the pools replace their connections, both LISTEN connections
/// come back, and an enqueue that answered success is there (none that failed is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connections_are_replaced_and_long_polls_recheck() -> Result {
    let pg = Pg::new();
    let (a, b, _clock) = two_nodes(&pg, QueueConfig::default()).await?;
    let q = queue("reconnect.jobs")?;
    a.enqueue(&q, text("warm"), 0).await?;
    for d in b.fetch_wait(&q, 1, 1000, Duration::ZERO).await? {
        b.ack(&q, &d.id).await?;
    }
    let poll = {
        let (b, q) = (b.clone(), q.clone());
        tokio::spawn(async move {
            // The first tries may meet a terminated connection: retried as a client would.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match b.fetch_wait(&q, 1, 60_000, Duration::from_secs(20)).await {
                    Err(QueueError::Store(StoreError::Unavailable(_))) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    other => return other,
                }
            }
        })
    };
    while b.counters().waiting.load(Ordering::Acquire) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let admin = pg.client().await?;
    let killed = admin
        .query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", &[&pg.schema])
        .await?;
    assert!(killed.len() >= 2, "both LISTEN connections and some pooled ones: {}", killed.len());
    let (mut enqueued, deadline) = (Vec::new(), Instant::now() + Duration::from_secs(10));
    while enqueued.is_empty() {
        assert!(Instant::now() < deadline, "no enqueue succeeded after the connections were lost");
        match a.enqueue(&q, text("after"), 0).await {
            Ok(id) => enqueued.push(id),
            Err(QueueError::Store(StoreError::Unavailable(_))) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(e.into()),
        }
    }
    let got =
        tokio::time::timeout(Duration::from_secs(5), poll).await.map_err(|_| "the poll never re-checked")???;
    assert_eq!(got.iter().map(|d| d.message_id).collect::<Vec<_>>(), enqueued, "the job enqueued meanwhile");
    b.ack(&q, &got[0].id).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(a.is_listening() && b.is_listening()) {
        assert!(Instant::now() < deadline, "a LISTEN connection did not come back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Woken by the notification again.
    let poll = {
        let (b, q) = (b.clone(), q.clone());
        tokio::spawn(async move { b.fetch_wait(&q, 1, 1000, Duration::from_secs(20)).await })
    };
    while b.counters().waiting.load(Ordering::Acquire) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    a.enqueue(&q, text("again"), 0).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), poll).await.map_err(|_| "not woken")???;
    assert!(started.elapsed() < Duration::from_millis(500), "woken after {:?}", started.elapsed());
    b.ack(&q, &got[0].id).await?;
    assert_eq!(a.stats(&q).await?, QueueStats::default());
    Ok(())
}

/// Acks sent all at once (so that the ack batcher takes many in one statement): 64
/// current deliveries, each acked twice, succeed exactly once each; 32 deliveries whose
/// lease ended and whose jobs went out again, a malformed id and an unknown one are
/// `not_found`, and do not fail the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acks_succeed_once_each_and_stale_ones_are_not_found() -> Result {
    let pg = Pg::new();
    let (a, b, clock) = two_nodes(&pg, QueueConfig::default()).await?;
    let q = queue("batch.acks")?;
    for i in 0..64 {
        a.enqueue(&q, text(&format!("job-{i}")), 0).await?;
    }
    let short = a.fetch_wait(&q, 32, 1000, Duration::ZERO).await?;
    let long = b.fetch_wait(&q, 32, 60_000, Duration::ZERO).await?;
    assert_eq!((short.len(), long.len()), (32, 32));
    clock.advance(1000);
    let again = b.fetch_wait(&q, 32, 60_000, Duration::ZERO).await?;
    assert_eq!(again.len(), 32, "the short leases ended");
    let mut acks: Vec<(String, bool)> = Vec::new();
    acks.extend(short.iter().map(|d| (d.id.clone(), false)));
    for d in again.iter().chain(&long) {
        acks.push((d.id.clone(), true));
        acks.push((d.id.clone(), true));
    }
    acks.push(("not-a-delivery".to_owned(), false));
    acks.push(("7fffffff-1-1".to_owned(), false));
    let start = Arc::new(tokio::sync::Barrier::new(acks.len()));
    let tasks: Vec<_> = acks
        .iter()
        .enumerate()
        .map(|(i, (id, _))| {
            let node = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (q, id, start) = (q.clone(), id.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                node.ack(&q, &id).await
            })
        })
        .collect();
    let mut succeeded = HashMap::<String, u32>::new();
    for ((id, current), task) in acks.iter().zip(tasks) {
        match task.await? {
            Ok(()) => {
                assert!(current, "{id}: a stale or unknown delivery was acked");
                *succeeded.entry(id.clone()).or_default() += 1;
            }
            Err(QueueError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(succeeded.len(), 64, "every current delivery acked");
    assert!(succeeded.values().all(|&n| n == 1), "a delivery acked twice");
    let acked = a.counters().acked.load(Ordering::Relaxed) + b.counters().acked.load(Ordering::Relaxed);
    assert_eq!(acked, 64);
    assert_eq!(a.stats(&q).await?, QueueStats::default());
    Ok(())
}

/// Fetches sent all at once on one node (so that the fetch combiner serves many with
/// one statement), asking for more than the queue holds, with two visibilities: no job
/// goes to two callers, none gets more than it asked, every job goes out, and each
/// lease is its own caller's (the short ones end, the long ones do not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_share_the_jobs_out_once_with_their_own_leases() -> Result {
    const JOBS: usize = 100;
    let pg = Pg::new();
    let (a, _b, clock) = two_nodes(&pg, QueueConfig::default()).await?;
    let q = queue("batch.fetches")?;
    for i in 0..JOBS {
        a.enqueue(&q, text(&format!("job-{i}")), 0).await?;
    }
    // (max, visibility): 15 x 3 short and 15 x 5 long is 120, more than the 100 jobs;
    // and a fetch of none.
    let asks: Vec<(usize, u64)> =
        (0..30).map(|i| if i % 2 == 0 { (3, 1000) } else { (5, 60_000) }).chain([(0, 1000)]).collect();
    let start = Arc::new(tokio::sync::Barrier::new(asks.len()));
    let tasks: Vec<_> = asks
        .iter()
        .map(|&(max, visibility)| {
            let (a, q, start) = (a.clone(), q.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                a.fetch_wait(&q, max, visibility, Duration::ZERO).await
            })
        })
        .collect();
    let (mut seen, mut short) = (HashSet::new(), 0);
    for (&(max, visibility), task) in asks.iter().zip(tasks) {
        let got = task.await??;
        assert!(got.len() <= max, "{} jobs for a fetch of {max}", got.len());
        for d in &got {
            assert!(seen.insert(d.message_id), "job {} went to two callers", d.message_id);
            assert_eq!(d.attempt, 1);
        }
        if visibility == 1000 {
            short += got.len();
        }
    }
    assert_eq!(seen.len(), JOBS, "every job went out");
    let long = JOBS - short;
    assert_eq!(a.stats(&q).await?, QueueStats { in_flight: JOBS as u64, ..QueueStats::default() });
    clock.advance(1000);
    let stats = a.stats(&q).await?;
    assert_eq!((stats.ready, stats.in_flight), (short as u64, long as u64), "each lease is its caller's");
    Ok(())
}

/// Round trips (enqueue one job, fetch one, ack it) per second on one node with 1, 8
/// and 64 workers, ~5 s each; then fetch+ack alone on a queue 1 000 000 jobs deep.
/// `cargo test -p herald-store-postgres --test queues -- --ignored --nocapture round_trips_per_second`
/// (dependencies are built optimised in the dev profile; the time is the database's).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run by hand"]
async fn round_trips_per_second() -> Result {
    let pg = Pg::new();
    let node = Arc::new(pg.node_with(Arc::new(SystemClock), QueueConfig::default(), 1 << 20, 16).await?);
    for workers in [1, 8, 64] {
        let q = queue(&format!("bench.w{workers}"))?;
        let stop = Instant::now() + Duration::from_secs(5);
        let done = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..workers)
            .map(|_| {
                let (node, q, done) = (node.clone(), q.clone(), done.clone());
                tokio::spawn(async move {
                    while Instant::now() < stop {
                        node.enqueue(&q, text("{\"job\":1}"), 0).await?;
                        for d in node.fetch_wait(&q, 1, 30_000, Duration::ZERO).await? {
                            node.ack(&q, &d.id).await?;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Result::Ok(())
                })
            })
            .collect();
        let started = Instant::now();
        for t in tasks {
            t.await??;
        }
        let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        println!("{workers:>3} workers: {rate:>8.0} round trips/s");
    }

    // A deep queue: fetch must take the head of the index, not scan.
    const DEEP: i64 = 1_000_000;
    let q = queue("bench.deep")?;
    let client = pg.client().await?;
    let schema = quoted(&pg.schema);
    let now = SystemClock.now_ms() as i64;
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.queue_messages (queue, id, kind, payload, ts, visible_at)
                 SELECT $1, i, 1, '\\x7b7d'::bytea, $2, $2 FROM generate_series(1, $3::bigint) i"
            ),
            &[&q.as_str(), &now, &DEEP],
        )
        .await?;
    client
        .execute(
            &format!("INSERT INTO {schema}.queues (name, next_id, bound) VALUES ($1, $2::bigint + 1, $2::bigint)"),
            &[&q.as_str(), &DEEP],
        )
        .await?;
    client.batch_execute(&format!("ANALYZE {schema}.queue_messages")).await?;
    let single = Instant::now();
    let got = node.fetch_wait(&q, 1, 30_000, Duration::ZERO).await?;
    println!("deep queue: first fetch {:?}", single.elapsed());
    node.ack(&q, &got[0].id).await?;
    let stop = Instant::now() + Duration::from_secs(5);
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (node, q, done) = (node.clone(), q.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    for d in node.fetch_wait(&q, 1, 30_000, Duration::ZERO).await? {
                        node.ack(&q, &d.id).await?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Result::Ok(())
            })
        })
        .collect();
    let started = Instant::now();
    for t in tasks {
        t.await??;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    println!("deep queue ({DEEP} ready), 8 workers: {rate:>8.0} fetch+ack/s");
    let plan = client
        .query(
            &format!(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT id FROM {schema}.queue_messages
                 WHERE queue = $1 AND dead_at IS NULL AND visible_at <= $2 AND (expires_at IS NULL OR expires_at > $2)
                 ORDER BY visible_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
            ),
            &[&q.as_str(), &(now + 1000)],
        )
        .await?;
    for row in plan {
        println!("  {}", row.try_get::<_, String>(0)?);
    }
    node.close().await;
    Ok(())
}
