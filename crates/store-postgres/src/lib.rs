//! `PgStore`: topic histories and queue records in PostgreSQL, and [`PgQueues`], the
//! work queues every node shares through it; every table in one schema of its own so
//! that several deployments share a database.
//!
//! # Layout
//! - `config.rs`: [`PgConfig`], [`PgError`], the redacted URL, connection settings, TLS.
//! - `schema.rs`: the embedded migrations (`migrations/*.sql`) and their runner.
//! - `writer.rs`: the group commit: every append goes to one writer task, which writes
//!   what is queued as one multi-row insert; offsets are assigned by that statement.
//! - `topics.rs`: the SQL of the topic tables, and `head`, `read`, `list`, `delete`, `sweep`.
//! - `records.rs`: the queue records of one node's queue engine (the `Store` trait's
//!   `queue_*` half), written in order by a task.
//! - `queues.rs` (and `queues/`): [`PgQueues`], the `QueueService` on PostgreSQL
//!   (`FOR UPDATE SKIP LOCKED` fetches, group-committed enqueues, long polls woken by
//!   LISTEN/NOTIFY), tables in `migrations/002_queues.sql`.
//!
//! # Topics
//! A `topics` row per topic holds `epoch`, `next_offset`, `first_offset` and `last_ts`,
//! and a `tid` naming its current epoch's rows in `topic_messages` (key `(tid, offset)`).
//! An append's statement bumps `next_offset` and inserts the rows in one implicit
//! transaction, so offsets have no gap and are never reused within an epoch (a
//! statement that fails consumes nothing). Times come from the injected [`Clock`] and
//! never go back per topic (`GREATEST(last_ts, now)`). A delete gives the topic a new
//! `tid` and epoch (`<identity>-<tid>`: never reused) and leaves the old rows to the
//! sweep. `head` and `read` are one statement each, so each reads one snapshot: the
//! epoch they name is the one of the rows they read, and an append whose future
//! resolved (after COMMIT) is seen by any head requested later.
//!
//! Retention is front-only, as in the memory store: a topic keeps offsets
//! `first..next`, `first` being the first row that is within the count, younger than
//! `max_age` and not past its TTL. `head`, `read` and `list` compute it in their query
//! (a few index probes past the dead front), so trimming by count, age or TTL is exact
//! at every call; the sweep then deletes the dead fronts, 10 000 rows per statement.
//! `retention.max_bytes` is not applied (as in the Redis store).
//!
//! # Table bloat
//! Every message row is inserted once and deleted once from its topic's front, and
//! every group commit updates its topics' rows. The migration sets autovacuum to run
//! after 1% of `topic_messages` changed (default 20%) so freed pages are reused before
//! the table grows, and `fillfactor = 50` with a fixed threshold on `topics` so its
//! updates stay HOT and its dead versions are cleaned within seconds. Deleting in
//! batches keeps each transaction short, so vacuum is never held back by the sweep.
//! A table that bloated anyway shrinks only by `VACUUM FULL` or `pg_repack`.
//!
//! # Failures
//! Every statement runs under the configured `statement_timeout` (set on each pooled
//! connection) and a client-side deadline. While the database is unreachable,
//! [`Store::is_ready`] is false (a failed statement or the probe every second notices)
//! and every operation resolves `StoreError::Unavailable` naming the cause, at once;
//! the pool reconnects by itself, and the probe turns the store ready again.

mod config;
mod queues;
mod records;
mod schema;
mod topics;
mod writer;

pub use config::{validate_schema, PgConfig, PgError};
pub use queues::{PgQueues, PgQueuesError};
pub use schema::{latest as latest_migration, MIGRATIONS};

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType};
use herald_core::metrics::{self, BATCH_BUCKETS, LATENCY_BUCKETS};
use herald_core::{
    Appended, Clock, Epoch, History, ListedTopic, LiveQueue, NewMessage, QueueConfig, QueueName, QueueRecord,
    QueueSnapshot, RetentionConfig, Store, StoreError, StoreFuture, TopicHead, TopicName,
};
use prometheus::Histogram;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;

use config::{Tls, CONNECT_TIMEOUT};
use records::QueueOp;
use topics::Sql;
use writer::WriteOp;

/// Appends waiting for the writer; past it `append` answers `Unavailable` at once.
const MAX_PENDING_APPENDS: usize = 8192;
/// Queue writes waiting for the queue task.
const MAX_PENDING_QUEUE_OPS: usize = 8192;
/// How often the connection is probed for [`Store::is_ready`].
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A [`Store`] on PostgreSQL. Cheap to clone; the last clone dropped ends its tasks
/// (once what they hold is written).
#[derive(Clone)]
pub struct PgStore {
    shared: Arc<Shared>,
    appends: mpsc::Sender<WriteOp>,
    queue_ops: mpsc::Sender<QueueOp>,
    /// One pending sweep at most: a sweep asked for while one waits is the same sweep.
    sweeps: mpsc::Sender<()>,
    /// How the queue service's LISTEN connection reaches the database.
    listen: Listen,
}

/// The pool's connection settings and TLS, and the schema, for the LISTEN connection of
/// [`PgStore::queue_service`] (which is outside the pool).
#[derive(Clone)]
struct Listen {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    schema: String,
}

/// What the store's handles and tasks share.
pub(crate) struct Shared {
    pub(crate) pool: Pool,
    pub(crate) sql: Sql,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) retention: RetentionConfig,
    /// This schema's random identity: epochs are `<identity>-<tid>`.
    pub(crate) identity: String,
    /// The epoch of a topic never deleted (`<identity>-0`).
    pub(crate) first_epoch: Epoch,
    /// The longest any database call may take, from taking a connection to its answer.
    deadline: Duration,
    ready: AtomicBool,
    /// Why the store is not ready (shown by every operation refused meanwhile).
    last_error: Mutex<String>,
    pub(crate) commits: CommitMetrics,
    /// The queues' live records, for `queue_load`.
    pub(crate) queues: Mutex<BTreeMap<QueueName, LiveQueue>>,
}

/// What each group commit took and carried.
pub(crate) struct CommitMetrics {
    /// From the batch taken to its COMMIT answered.
    pub(crate) seconds: Histogram,
    /// Appends (caller writes) per commit, as the disk store counts them.
    pub(crate) writes: Histogram,
    /// Message rows inserted per commit.
    pub(crate) rows: Histogram,
}

impl CommitMetrics {
    fn new() -> Self {
        Self {
            seconds: metrics::new_histogram(
                "store_commit_seconds",
                "PostgreSQL store group commits: one multi-row insert from the batch taken to its commit.",
                &LATENCY_BUCKETS,
                None,
            ),
            writes: metrics::new_histogram(
                "store_commit_writes",
                "PostgreSQL store group commits: appends per commit.",
                &BATCH_BUCKETS,
                None,
            ),
            rows: metrics::new_histogram(
                "store_commit_rows",
                "PostgreSQL store group commits: message rows inserted per commit.",
                &BATCH_BUCKETS,
                None,
            ),
        }
    }
}

/// Why a database call failed, before it becomes a [`StoreError`].
#[derive(Debug)]
pub(crate) enum Fail {
    Pool(PoolError),
    Query(tokio_postgres::Error),
    Timeout(Duration),
    Damaged(String),
}

impl From<PoolError> for Fail {
    fn from(e: PoolError) -> Self {
        Fail::Pool(e)
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Query(e)
    }
}

impl Fail {
    /// Whether it says the database cannot be reached (so the store is not ready).
    fn is_outage(&self) -> bool {
        match self {
            Fail::Pool(PoolError::Backend(_) | PoolError::Timeout(_) | PoolError::Closed) => true,
            Fail::Pool(_) => false,
            Fail::Query(e) => match e.code() {
                Some(code) => {
                    code.code().starts_with("08")
                        || [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW]
                            .contains(code)
                        || *code == SqlState::TOO_MANY_CONNECTIONS
                }
                None => e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
            },
            Fail::Timeout(_) => true,
            Fail::Damaged(_) => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Fail::Pool(PoolError::Timeout(TimeoutType::Wait)) => "every pooled connection stayed busy".to_owned(),
            Fail::Pool(PoolError::Timeout(TimeoutType::Create)) => {
                format!("could not connect within {} s", CONNECT_TIMEOUT.as_secs())
            }
            Fail::Pool(PoolError::Timeout(TimeoutType::Recycle)) => "a pooled connection did not answer".to_owned(),
            Fail::Pool(PoolError::Backend(e)) => schema::describe(e),
            Fail::Pool(PoolError::Closed) => "the connection pool is closed".to_owned(),
            Fail::Pool(e) => e.to_string(),
            Fail::Query(e) => schema::describe(e),
            Fail::Timeout(d) => format!("no answer within {} ms", d.as_millis()),
            Fail::Damaged(what) => format!("damaged row: {what}"),
        }
    }
}

impl Shared {
    /// Runs one database call under the deadline and maps its failure, noting outages
    /// (and any answer) for `is_ready`.
    pub(crate) async fn db<T>(&self, what: &str, call: impl Future<Output = Result<T, Fail>>) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.deadline, call).await {
            Ok(result) => result,
            Err(_) => Err(Fail::Timeout(self.deadline)),
        };
        match result {
            Ok(v) => {
                self.ready.store(true, Ordering::Relaxed);
                Ok(v)
            }
            Err(fail) => {
                let message = format!("postgres {what}: {}", fail.describe());
                if fail.is_outage() {
                    *lock(&self.last_error) = message.clone();
                    if self.ready.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %message, "PostgreSQL store unavailable");
                    }
                }
                Err(StoreError::Unavailable(message))
            }
        }
    }

    /// Refuses at once while the database is known to be unreachable.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(StoreError::Unavailable(lock(&self.last_error).clone()))
        }
    }

    /// Current time and the retention bounds as query parameters: (now, max messages,
    /// the newest `ts` that is too old). `ts > cut` is the memory store's
    /// `now - ts < max_age`, negative cuts included.
    pub(crate) fn bounds(&self) -> (i64, i64, i64) {
        let now = clamp(self.clock.now_ms());
        let max = clamp(self.retention.max_messages);
        let age = i64::try_from(self.retention.max_age.as_millis()).unwrap_or(i64::MAX);
        (now, max, now.saturating_sub(age))
    }
}

/// A u64 as a bigint (values past i64::MAX, never met in practice, saturate).
pub(crate) fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Locks plain data; a poisoned lock only means another thread panicked between
/// statements that keep it consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ready<T: Send + 'static>(value: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(value))
}

impl PgStore {
    /// Connects, brings the schema up to date (refusing one migrated by a newer
    /// binary), reads the queue records, and starts the writer, queue, sweep and
    /// probe tasks. Fails within a few seconds if the server cannot be reached.
    pub async fn connect(config: PgConfig, clock: Arc<dyn Clock>) -> Result<PgStore, PgError> {
        validate_schema(&config.schema)?;
        if config.pool_size < 4 {
            return Err(PgError::Setting(format!(
                "pool_size must be at least 4 (two writers, the queue task, reads), got {}",
                config.pool_size
            )));
        }
        let (pg, tls) = config::connection_config(&config)?;
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let mut listen = Listen { config: pg.clone(), tls: None, schema: config.schema.clone() };
        let manager = match tls {
            Tls::Off => Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
            Tls::Verified { roots } => {
                let connector = config::tls_connector(roots.as_deref())?;
                listen.tls = Some(connector.clone());
                Manager::from_config(pg, connector, manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.statement_timeout + CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| PgError::Setting(format!("connection pool: {e}")))?;
        let unavailable = |reason: String| PgError::Unavailable { url: config.redacted_url(), reason };
        let mut client = pool.get().await.map_err(|e| unavailable(Fail::Pool(e).describe()))?;
        schema::migrate(&mut client, &config.schema).await?;
        let sql = Sql::new(&schema::quoted(&config.schema));
        let identity = topics::identity(&client, &sql).await?;
        let queues = records::load(&client, &sql).await?;
        drop(client);
        let shared = Arc::new(Shared {
            pool,
            sql,
            clock,
            retention: config.retention,
            first_epoch: Arc::from(format!("{identity}-0")),
            identity,
            deadline: config.statement_timeout + CONNECT_TIMEOUT + Duration::from_secs(1),
            ready: AtomicBool::new(true),
            last_error: Mutex::new(String::new()),
            commits: CommitMetrics::new(),
            queues: Mutex::new(queues),
        });
        let (appends, appends_rx) = mpsc::channel(MAX_PENDING_APPENDS);
        let (queue_ops, queue_rx) = mpsc::channel(MAX_PENDING_QUEUE_OPS);
        let (sweeps, sweeps_rx) = mpsc::channel(1);
        tokio::spawn(writer::run(shared.clone(), appends_rx));
        tokio::spawn(records::run(shared.clone(), queue_rx));
        tokio::spawn(topics::sweeper(shared.clone(), sweeps_rx));
        tokio::spawn(probe(Arc::downgrade(&shared)));
        tracing::info!(url = %config.redacted_url(), schema = %config.schema, "PostgreSQL store connected");
        Ok(PgStore { shared, appends, queue_ops, sweeps, listen })
    }

    /// The work queues every node shares through this store's database: its pool,
    /// schema, clock and TLS, and a LISTEN connection of their own. The server uses them
    /// for every queue call instead of the engine over [`Store::queue_append`].
    pub async fn queue_service(
        &self,
        config: QueueConfig,
        max_message_bytes: usize,
    ) -> Result<PgQueues, PgQueuesError> {
        let (pool, clock) = (self.shared.pool.clone(), self.shared.clock.clone());
        let (schema, listen) = (self.listen.schema.clone(), self.listen.config.clone());
        match &self.listen.tls {
            None => {
                PgQueues::new(pool, schema, (listen, tokio_postgres::NoTls), clock, config, max_message_bytes).await
            }
            Some(tls) => PgQueues::new(pool, schema, (listen, tls.clone()), clock, config, max_message_bytes).await,
        }
    }
}

/// Probes the database so that `is_ready` follows an outage even when idle, and turns
/// ready again once it answers.
async fn probe(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(shared) = shared.upgrade() else { return };
        let answered = shared
            .db("probe", async {
                let client = shared.pool.get().await?;
                client.simple_query("SELECT 1").await?;
                Ok(())
            })
            .await;
        if answered.is_ok() && !lock(&shared.last_error).is_empty() {
            lock(&shared.last_error).clear();
            tracing::info!("PostgreSQL store available again");
        }
    }
}

impl Store for PgStore {
    /// Queues the batch for the writer task, which commits it with whatever else is
    /// queued (one statement for many appends); offsets follow the order of calls.
    fn append(&self, topic: &TopicName, batch: Vec<NewMessage>) -> StoreFuture<Appended> {
        if let Err(e) = self.shared.check() {
            return ready(Err(e));
        }
        if batch.is_empty() {
            let head = self.head(topic);
            return Box::pin(async move { Ok(Appended { epoch: head.await?.epoch, messages: Vec::new() }) });
        }
        let (done, answer) = oneshot::channel();
        let op = WriteOp::Append(writer::AppendReq { topic: topic.clone(), batch, done });
        match self.appends.try_send(op) {
            Ok(()) => Box::pin(async move { answer.await.map_err(|_| StoreError::Closed)? }),
            Err(mpsc::error::TrySendError::Full(_)) => ready(Err(StoreError::Unavailable(format!(
                "postgres append: {MAX_PENDING_APPENDS} appends already wait for the database"
            )))),
            Err(mpsc::error::TrySendError::Closed(_)) => ready(Err(StoreError::Closed)),
        }
    }

    fn read(&self, topic: &TopicName, from: u64, until: u64, limit: usize) -> StoreFuture<History> {
        if let Err(e) = self.shared.check() {
            return ready(Err(e));
        }
        let shared = self.shared.clone();
        let topic = topic.clone();
        let bounds = shared.bounds();
        Box::pin(async move { topics::read(&shared, &topic, from, until, limit, bounds).await })
    }

    fn head(&self, topic: &TopicName) -> StoreFuture<TopicHead> {
        if let Err(e) = self.shared.check() {
            return ready(Err(e));
        }
        let shared = self.shared.clone();
        let topic = topic.clone();
        let bounds = shared.bounds();
        Box::pin(async move { topics::head(&shared, &topic, bounds).await })
    }

    fn delete(&self, topic: &TopicName) -> StoreFuture<Epoch> {
        if let Err(e) = self.shared.check() {
            return ready(Err(e));
        }
        let shared = self.shared.clone();
        let topic = topic.clone();
        Box::pin(async move { topics::delete(&shared, &topic).await })
    }

    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> StoreFuture<Vec<ListedTopic>> {
        if let Err(e) = self.shared.check() {
            return ready(Err(e));
        }
        let shared = self.shared.clone();
        let (prefix, after) = (prefix.to_owned(), after.map(str::to_owned));
        let bounds = shared.bounds();
        Box::pin(async move { topics::list(&shared, &prefix, after.as_deref(), limit, bounds).await })
    }

    fn queue_append(&self, queue: &QueueName, records: Vec<QueueRecord>) -> StoreFuture<()> {
        if let Err(e) = self.shared.check() {
            return ready(Err(e));
        }
        let (done, answer) = oneshot::channel();
        match self.queue_ops.try_send(QueueOp::Append { queue: queue.clone(), records, done }) {
            Ok(()) => Box::pin(async move { answer.await.map_err(|_| StoreError::Closed)? }),
            Err(mpsc::error::TrySendError::Full(_)) => ready(Err(StoreError::Unavailable(format!(
                "postgres queue append: {MAX_PENDING_QUEUE_OPS} queue writes already wait for the database"
            )))),
            Err(mpsc::error::TrySendError::Closed(_)) => ready(Err(StoreError::Closed)),
        }
    }

    fn queue_remove(&self, queue: &QueueName, ids: Vec<u64>) {
        self.lazy_queue_op(QueueOp::Remove { queue: queue.clone(), ids });
    }

    fn queue_delivered(&self, queue: &QueueName, attempts: Vec<(u64, u32)>) {
        self.lazy_queue_op(QueueOp::Delivered { queue: queue.clone(), attempts });
    }

    /// The queues read at connect, with this store's writes since applied.
    fn queue_load(&self) -> Vec<QueueSnapshot> {
        lock(&self.shared.queues).iter().map(|(q, m)| m.snapshot(q)).collect()
    }

    /// Resolves once every append and queue write issued before it is committed (or
    /// has failed and said so to its caller).
    fn flush(&self) -> StoreFuture<()> {
        let (appends, queue_ops) = (self.appends.clone(), self.queue_ops.clone());
        Box::pin(async move {
            let (writer_done, writer_flushed) = oneshot::channel();
            let (queue_done, queue_flushed) = oneshot::channel();
            appends.send(WriteOp::Flush(writer_done)).await.map_err(|_| StoreError::Closed)?;
            queue_ops.send(QueueOp::Flush(queue_done)).await.map_err(|_| StoreError::Closed)?;
            writer_flushed.await.map_err(|_| StoreError::Closed)?;
            queue_flushed.await.map_err(|_| StoreError::Closed)
        })
    }

    /// Asks the sweep task to delete the dead fronts (count, age, TTL) and the
    /// histories of deleted epochs, in batches; a sweep already waiting covers this one.
    fn sweep(&self) {
        let _ = self.sweeps.try_send(());
    }

    fn register_metrics(&self, registry: &prometheus::Registry) {
        let commits = &self.shared.commits;
        for h in [&commits.seconds, &commits.writes, &commits.rows] {
            metrics::register(registry, h);
        }
    }

    /// False from a statement or probe that could not reach the database until one does.
    fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }
}

impl PgStore {
    /// Queues a lazy queue write; one that finds the queue full is dropped and logged
    /// (a lost removal or attempt count only costs a redelivery after a restart; the
    /// mirror keeps agreeing with the database).
    fn lazy_queue_op(&self, op: QueueOp) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue_ops.try_send(op) {
            tracing::warn!("PostgreSQL queue write dropped: {MAX_PENDING_QUEUE_OPS} already wait");
        }
    }

    /// Runs a sweep now (what [`Store::sweep`] asks the sweep task for) and resolves
    /// once it is done, with the number of message rows it deleted.
    pub async fn sweep_now(&self) -> Result<u64, StoreError> {
        topics::sweep(&self.shared).await
    }

    /// The schema's identity, for tests and diagnostics: epochs of this schema start
    /// with it.
    pub fn identity(&self) -> &str {
        &self.shared.identity
    }
}
