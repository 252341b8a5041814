//! `PgQueues`: work queues every node shares, kept in PostgreSQL (tables in
//! `migrations/002_queues.sql`, where a message's states are described), with the
//! semantics of the single-node engine (`herald_core::queue`): leases, extend, requeue
//! with delay, attempts, the dead-letter queue, TTL, long polls, purge, redrive, list.
//! Owns only the queue tables; the pool and the schema come from the caller.
//!
//! Time is the calling node's clock, passed to every statement (never the database's
//! `now()`). A fetch is one statement: the oldest ready rows `FOR UPDATE SKIP LOCKED`,
//! leased in place, so no two workers hold one message. What time changes is read from
//! the columns at `now`; only two changes are written, lazily, by the operations that
//! look (`settle`): an ended last lease moves its message to the dead-letter queue, and
//! a passed TTL deletes it. Enqueues are batched by one writer task into one multi-row
//! insert per queue and round trip (a group commit), answered once durable, as are
//! redrives and purges; fetches, acks, requeues and extends commit without waiting for
//! the WAL flush (as the engine does not make them durable before answering either: a
//! database crash may deliver a message again, never lose one).
//!
//! Batching (`batch.rs`): concurrent acks go to an ack batcher that deletes all of
//! them with one statement and answers each by whether its row matched (`not_found`
//! otherwise, as one by one); concurrent fetches on one queue go to a fetch combiner
//! that serves them with one `SKIP LOCKED` statement for the sum of their `max`, rows
//! shared out oldest first, each leased for its caller's visibility. A lone request
//! goes at once; requests arriving while a batch runs make the next one.
//!
//! Long polls: writes that make messages ready `pg_notify` the schema's channel with the
//! queue's name in their transaction; one dedicated connection per `PgQueues` LISTENs
//! and wakes this node's waiters on that queue. Waiters also sleep only until the next
//! delay or lease end, and re-check every second while the LISTEN connection is down
//! (it reconnects with backoff, and wakes every waiter once it listens again).

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Object, Pool};
use futures_util::future::OptionFuture;
use futures_util::{StreamExt, TryStreamExt};
use herald_core::{
    check_enqueue, AckFetchFuture, BatchFuture, Clock, Delivery, Kind, ListedQueue, NewMessage, QueueConfig,
    QueueCounters, QueueError, QueueFuture, QueueName, QueueService, QueueStats, StoreError, Visible,
};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Row, Socket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use batch::{ack_batch, fetch_batch, run_batches, Ack, Fetch, Fetched, BATCH_QUEUE, MAX_ACKS, MAX_FETCHES};
use listen::{channel_of, lock, run_listener, PassOn, Waiting, Wakers};
use sql::Sql;
use writer::{write_enqueues, Enqueue, ENQUEUE_QUEUE};

mod batch;
mod listen;
mod sql;
mod writer;

/// Why [`PgQueues::new`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PgQueuesError {
    /// The LISTEN connection could not be opened or could not listen.
    #[error("postgres: cannot listen for queue wake-ups: {0}")]
    Listen(#[source] tokio_postgres::Error),
    /// The LISTEN task ended before it listened (its runtime is shutting down).
    #[error("postgres: the queue wake-up listener stopped before it listened")]
    ListenerStopped,
}

/// A failed database round trip.
#[derive(Debug, thiserror::Error)]
enum DbError {
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error("no connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// Messages one fetch takes, at most (the front doors allow 100).
const MAX_FETCH: usize = 1000;
/// Messages one purge or redrive transaction removes or moves, at most.
const ADMIN_BATCH: i64 = 10_000;
/// Queue names one `list` page reads.
const LIST_PAGE: i64 = 200;
/// How often waiters re-check while the LISTEN connection is down.
const RECHECK: Duration = Duration::from_secs(1);

/// Work queues shared through PostgreSQL. Cheap to clone; the background tasks (the
/// enqueue writer and the LISTEN connection) stop when the last clone is dropped or at
/// [`PgQueues::close`].
#[derive(Clone)]
pub struct PgQueues {
    shared: Arc<Shared>,
}

struct Shared {
    db: Arc<Db>,
    clock: Arc<dyn Clock>,
    config: QueueConfig,
    max_message_bytes: usize,
    counters: Arc<QueueCounters>,
    hasher: RandomState,
    nonces: AtomicU64,
    wakers: Arc<Wakers>,
    enqueue_tx: mpsc::Sender<Enqueue>,
    ack_tx: mpsc::Sender<Ack>,
    fetch_tx: mpsc::Sender<Fetch>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What the writer task shares with the callers.
struct Db {
    pool: Pool,
    sql: Sql,
    channel: String,
    clock: Arc<dyn Clock>,
    config: QueueConfig,
    counters: Arc<QueueCounters>,
}

fn kind_code(kind: Kind) -> i16 {
    match kind {
        Kind::Json => 0,
        Kind::Text => 1,
        Kind::Binary => 2,
    }
}

fn kind_of(code: i16) -> Option<Kind> {
    match code {
        0 => Some(Kind::Json),
        1 => Some(Kind::Text),
        2 => Some(Kind::Binary),
        _ => None,
    }
}

/// A time or count as a PostgreSQL bigint (saturating: `u64::MAX` ms is "never").
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `now` plus `ms`, as a bigint.
fn after(now: u64, ms: u64) -> i64 {
    big(now.saturating_add(ms))
}

fn unavailable(what: impl std::fmt::Display) -> QueueError {
    QueueError::Store(StoreError::Unavailable(format!("postgres: {what}")))
}

/// A database error as the caller sees it (the server's own message when it sent one),
/// logged for the operator.
fn db_error(e: impl Into<DbError>) -> QueueError {
    let text = match e.into() {
        DbError::Db(e) => match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        },
        DbError::Pool(e) => format!("no connection: {e}"),
    };
    tracing::warn!(error = %text, "postgres queue operation failed");
    unavailable(text)
}

/// Whether retrying the whole transaction may succeed (a deadlock or serialization failure).
fn retryable(e: &DbError) -> bool {
    let DbError::Db(e) = e else { return false };
    e.code().is_some_and(|c| {
        *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
            || *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
    })
}

fn col<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, QueueError> {
    row.try_get(i).map_err(db_error)
}

/// The message id a delivery id names, if it is well-formed.
fn message_of(delivery: &str) -> Option<i64> {
    let hex = delivery.split('-').next()?;
    u64::from_str_radix(hex, 16).ok().and_then(|id| i64::try_from(id).ok())
}

impl Db {
    async fn conn(&self) -> Result<Object, QueueError> {
        self.pool.get().await.map_err(|e| {
            tracing::warn!(error = %e, "no postgres connection for a queue operation");
            unavailable(e)
        })
    }

    /// Settles `queue` (a queue with a dead-letter queue) inside a transaction.
    async fn settle_in(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        queue: &QueueName,
        now: u64,
    ) -> Result<(), tokio_postgres::Error> {
        if let Some(dlq) = queue.dlq() {
            let settle = tx.prepare_cached(&self.sql.settle).await?;
            let row = tx.query_one(&settle, &[&queue.as_str(), &dlq.as_str(), &big(now), &self.channel]).await?;
            self.dead_lettered(row.try_get(0)?);
        }
        Ok(())
    }

    fn dead_lettered(&self, n: i64) {
        if n > 0 {
            self.counters.dead_lettered.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Runs `query` (prepared from `text`) on `client` after a settle of `pair`: in one
    /// transaction committed without waiting for its WAL flush, unless `durable` (then
    /// each statement commits on its own, durably). Either way all statements are sent
    /// at once (pipelined) and run in order, so the query sees what the settle moved.
    async fn settled_query(
        &self,
        client: &Object,
        pair: Option<(QueueName, QueueName)>,
        now: u64,
        text: &str,
        params: &[&(dyn ToSql + Sync)],
        durable: bool,
    ) -> Result<Vec<Row>, QueueError> {
        let statement = client.prepare_cached(text).await.map_err(db_error)?;
        let settle = client.prepare_cached(&self.sql.settle).await.map_err(db_error)?;
        let now = big(now);
        let names = pair.as_ref().map(|(queue, dlq)| (queue.as_str(), dlq.as_str()));
        let settle_params =
            names.as_ref().map(|(queue, dlq)| -> [&(dyn ToSql + Sync); 4] { [queue, dlq, &now, &self.channel] });
        let settled = settle_params.as_ref().map(|p| client.query_one(&settle, p));
        let query = client.query(&statement, params);
        let (settled, rows) = if durable {
            let (settled, rows) = futures_util::future::join(OptionFuture::from(settled), query).await;
            (settled.transpose().map_err(db_error)?, rows.map_err(db_error)?)
        } else {
            unflushed(client, settled, query).await.map_err(db_error)?
        };
        if let Some(settled) = settled {
            self.dead_lettered(col(&settled, 0)?);
        }
        Ok(rows)
    }

    /// One fetch statement on `name` at `now` for up to `leases.len()` messages: the
    /// i-th taken (oldest first) is leased until `leases[i]` with nonce `nonces[i]`;
    /// before it, in the same transaction, the ack statement for the deliveries
    /// `ack_deliveries` (of messages `ack_ids`). Returns the deliveries with their
    /// index, in that order, and the acks done (message id, delivery id).
    async fn fetch(
        &self,
        name: &QueueName,
        now: u64,
        (leases, nonces): (&[i64], &[i64]),
        (ack_ids, ack_deliveries): (&[i64], &[&str]),
    ) -> Result<(Vec<(usize, Delivery)>, HashSet<(i64, String)>), QueueError> {
        let client = self.conn().await?;
        // The attempt whose lease end dead-letters (none in a dead-letter queue).
        let last = match name.dlq() {
            Some(_) => i32::try_from(self.config.max_attempts).unwrap_or(i32::MAX),
            None => i32::MAX,
        };
        let (now_ms, limit) = (big(now), leases.len() as i64);
        let params: [&(dyn ToSql + Sync); 6] = [&name.as_str(), &now_ms, &limit, &leases, &last, &nonces];
        // On a dead-letter queue, last leases of its queue that ended are dead letters here.
        let pair = name.parent().map(|parent| (parent, name.clone()));
        // The ack batcher's statement, in the fetch's transaction, when there are acks.
        let ack = match ack_ids.is_empty() {
            true => None,
            false => Some(client.prepare_cached(&self.sql.ack).await.map_err(db_error)?),
        };
        let (queues, nows) = (vec![name.as_str(); ack_ids.len()], vec![now_ms; ack_ids.len()]);
        let ack_params: [&(dyn ToSql + Sync); 4] = [&queues, &ack_ids, &ack_deliveries, &nows];
        let acks = ack.as_ref().map(|ack| client.query(ack, &ack_params));
        let (done, rows) = match (acks, pair) {
            (None, pair) => (None, self.settled_query(&client, pair, now, &self.sql.fetch, &params, false).await?),
            // A dead-letter queue's fetch settles its queue first: the acks go alone before.
            (Some(acks), Some(pair)) => {
                let (_, done) = unflushed(&client, NO_SETTLE, acks).await.map_err(db_error)?;
                (Some(done), self.settled_query(&client, Some(pair), now, &self.sql.fetch, &params, false).await?)
            }
            (Some(acks), None) => {
                let fetch = client.prepare_cached(&self.sql.fetch).await.map_err(db_error)?;
                unflushed(&client, Some(acks), client.query(&fetch, &params)).await.map_err(db_error)?
            }
        };
        let acked: HashSet<(i64, String)> =
            done.iter().flatten().map(|row| Ok((col(row, 1)?, col(row, 2)?))).collect::<Result<_, QueueError>>()?;
        let damaged = || unavailable(format!("a damaged message in {name}"));
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let (id, attempt, ts): (i64, i32, i64) = (col(row, 0)?, col(row, 1)?, col(row, 2)?);
            let order = usize::try_from(col::<i64>(row, 6)? - 1).map_err(|_| damaged())?;
            out.push((
                order,
                Delivery {
                    id: col(row, 5)?,
                    message_id: id as u64,
                    attempt: attempt as u32,
                    ts: ts as u64,
                    kind: kind_of(col(row, 3)?).ok_or_else(damaged)?,
                    payload: Bytes::from(col::<Vec<u8>>(row, 4)?),
                },
            ));
        }
        out.sort_unstable_by_key(|(order, _)| *order);
        self.counters.delivered.fetch_add(out.len() as u64, Ordering::Relaxed);
        let again = out.iter().filter(|(_, d)| d.attempt > 1).count() as u64;
        self.counters.redelivered.fetch_add(again, Ordering::Relaxed);
        self.counters.acked.fetch_add(acked.len() as u64, Ordering::Relaxed);
        Ok((out, acked))
    }
}

impl PgQueues {
    /// The queues in `schema` (its tables made by the migrations) over `pool`, on
    /// `clock`; `listen` is the connection the LISTEN session opens (outside the pool),
    /// through `tls` (`NoTls`, or the pool's TLS connector). Resolves once that session
    /// listens: from then on, an enqueue on any node wakes this node's long polls.
    /// Spawns its tasks on the current runtime.
    pub async fn new<T>(
        pool: Pool,
        schema: String,
        (listen, tls): (tokio_postgres::Config, T),
        clock: Arc<dyn Clock>,
        config: QueueConfig,
        max_message_bytes: usize,
    ) -> Result<Self, PgQueuesError>
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let channel = channel_of(&schema);
        let counters = Arc::new(QueueCounters::default());
        let db = Arc::new(Db {
            pool,
            sql: Sql::new(&schema),
            channel: channel.clone(),
            clock: clock.clone(),
            config,
            counters: counters.clone(),
        });
        let (enqueue_tx, enqueue_rx) = mpsc::channel(ENQUEUE_QUEUE);
        let (shutdown, tasks, wakers) = (CancellationToken::new(), TaskTracker::new(), Arc::new(Wakers::default()));
        let mut listen = listen;
        if listen.get_connect_timeout().is_none() {
            listen.connect_timeout(Duration::from_secs(10));
        }
        // A dead peer is noticed within about half a minute, not the OS's two hours.
        listen.keepalives(true).keepalives_idle(Duration::from_secs(15)).keepalives_interval(Duration::from_secs(5));
        let (started_tx, started_rx) = oneshot::channel();
        tasks.spawn(run_listener(listen, tls, channel, wakers.clone(), shutdown.clone(), started_tx));
        match started_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(PgQueuesError::Listen(e)),
            Err(_) => return Err(PgQueuesError::ListenerStopped),
        }
        tasks.spawn(write_enqueues(db.clone(), enqueue_rx, shutdown.clone()));
        let (ack_tx, ack_rx) = mpsc::channel(BATCH_QUEUE);
        let acks = db.clone();
        tasks.spawn(run_batches(ack_rx, shutdown.clone(), MAX_ACKS, move |batch| ack_batch(acks.clone(), batch)));
        let (fetch_tx, fetch_rx) = mpsc::channel(BATCH_QUEUE);
        let fetches = db.clone();
        tasks.spawn(run_batches(fetch_rx, shutdown.clone(), MAX_FETCHES, move |batch| {
            fetch_batch(fetches.clone(), batch)
        }));
        tasks.close();
        let shared = Shared {
            db,
            clock,
            config,
            max_message_bytes,
            counters,
            hasher: RandomState::new(),
            nonces: AtomicU64::new(0),
            wakers,
            enqueue_tx,
            ack_tx,
            fetch_tx,
            shutdown,
            tasks,
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// Stops: long polls answer with what they have, enqueues already queued are
    /// written (later ones are refused as `Closed`), the LISTEN connection closes.
    /// Resolves once the tasks ended.
    pub async fn close(&self) {
        self.shared.shutdown.cancel();
        self.shared.wakers.wake_all();
        self.shared.tasks.wait().await;
    }

    /// Whether the LISTEN connection listens now (long polls are woken by notifications
    /// rather than re-checking every second).
    pub fn is_listening(&self) -> bool {
        self.shared.wakers.listening.load(Ordering::Acquire)
    }
}

/// Starts a transaction whose commit does not wait for its WAL flush.
const BEGIN_UNFLUSHED: &str = "BEGIN; SET LOCAL synchronous_commit = off";

/// No settle before the statement of [`unflushed`].
const NO_SETTLE: Option<std::future::Ready<Result<Row, tokio_postgres::Error>>> = None;

/// Runs `op` (after `settle`, if any) in one transaction whose commit does not wait for
/// the WAL flush, all sent at once: BEGIN, settle, op and COMMIT in one round trip.
/// For what the single-node engine does not make durable before answering either
/// (leases, acks, requeues, extends, dead-letter moves): a database crash may lose the
/// last fraction of a second of them, and a lost one means a message delivered again,
/// never one lost. A failed statement rolls the transaction back (COMMIT answers
/// ROLLBACK) and its error is returned.
async fn unflushed<S, T>(
    client: &Object,
    settle: Option<impl Future<Output = Result<S, tokio_postgres::Error>>>,
    op: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<(Option<S>, T), tokio_postgres::Error> {
    // Each future sends its request when first polled, and `join4` polls in order.
    let (began, settled, done, committed) = futures_util::future::join4(
        client.batch_execute(BEGIN_UNFLUSHED),
        OptionFuture::from(settle),
        op,
        client.batch_execute("COMMIT"),
    )
    .await;
    began?;
    let settled = settled.transpose()?;
    let done = done?;
    committed?;
    Ok((settled, done))
}

/// What a settle before an operation on `name` covers: the queue whose last leases may
/// owe a dead-letter queue messages, and that dead-letter queue. For a queue, itself;
/// for a dead-letter queue, its queue (a lease ending there brings it a dead letter).
fn settle_pair(name: &QueueName) -> Option<(QueueName, QueueName)> {
    match name.dlq() {
        Some(dlq) => Some((name.clone(), dlq)),
        None => name.parent().map(|parent| (parent, name.clone())),
    }
}

/// The answer to an operation whose store has closed.
fn closed() -> QueueError {
    QueueError::Store(StoreError::Closed)
}

impl Shared {
    /// The writer's record of one enqueue (refused here if [`check_enqueue`] refuses
    /// it), and where its answer comes.
    fn enqueue_of(
        &self,
        name: &QueueName,
        msg: NewMessage,
        delay_ms: u64,
    ) -> Result<(Enqueue, oneshot::Receiver<Result<u64, QueueError>>), QueueError> {
        check_enqueue(name, &msg, self.max_message_bytes)?;
        let now = self.clock.now_ms();
        let (reply, answer) = oneshot::channel();
        let enqueue = Enqueue {
            queue: name.clone(),
            kind: kind_code(msg.kind),
            payload: msg.payload,
            ts: big(now),
            visible_at: after(now, delay_ms),
            expires_at: msg.ttl_ms.map(|ttl| after(now, ttl)),
            reply,
        };
        Ok((enqueue, answer))
    }

    /// One unguessable 48-bit nonce per delivery: a randomly keyed hash of a counter.
    fn nonces(&self, n: usize) -> Vec<i64> {
        (0..n)
            .map(|_| {
                let k = self.nonces.fetch_add(1, Ordering::Relaxed);
                (self.hasher.hash_one(k) & 0xffff_ffff_ffff) as i64
            })
            .collect()
    }

    /// One try: the deliveries taken. Through the fetch combiner (one statement for
    /// the fetches on one queue waiting together), or alone once it stopped.
    async fn try_fetch(&self, name: &QueueName, max: usize, visibility_ms: u64) -> Result<Vec<Delivery>, QueueError> {
        Ok(self.try_fetch_acking(name, max, visibility_ms, Vec::new()).await?.deliveries)
    }

    /// One try that also acks `acks` (message id, delivery id) in its statement.
    async fn try_fetch_acking(
        &self,
        name: &QueueName,
        max: usize,
        visibility_ms: u64,
        acks: Vec<(i64, String)>,
    ) -> Result<Fetched, QueueError> {
        let max = max.min(MAX_FETCH);
        let (reply, answer) = oneshot::channel();
        let fetch = Fetch { queue: name.clone(), max, visibility_ms, nonces: self.nonces(max), acks, reply };
        if let Err(mpsc::error::SendError(fetch)) = self.fetch_tx.send(fetch).await {
            fetch_batch(self.db.clone(), vec![fetch]).await;
        }
        answer.await.map_err(|_| closed())?
    }

    /// When the next delay or lease of `name` ends (on a dead-letter queue, also the
    /// next last lease of its queue), by this node's clock.
    async fn next_due(&self, name: &QueueName) -> Result<Option<u64>, QueueError> {
        let now = big(self.clock.now_ms());
        let client = self.db.conn().await?;
        let statement = client.prepare_cached(&self.db.sql.next_due).await.map_err(db_error)?;
        let parent = name.parent();
        let parent = parent.as_ref().map(|p| p.as_str());
        let row = client.query_one(&statement, &[&name.as_str(), &now, &parent]).await.map_err(db_error)?;
        let (own, dead): (Option<i64>, Option<i64>) = (col(&row, 0)?, col(&row, 1)?);
        Ok(own.into_iter().chain(dead).min().map(|at| at as u64))
    }

    /// Registers a waiting fetch on `name` (refused past `max_waiters_per_queue` on this node).
    fn wait_on(&self, name: &QueueName) -> Result<Waiting, QueueError> {
        let mut queues = lock(&self.wakers.queues);
        let waiters = queues.entry(name.clone()).or_default().clone();
        if waiters.count.load(Ordering::Acquire) >= self.config.max_waiters_per_queue {
            if waiters.count.load(Ordering::Acquire) == 0 {
                queues.remove(name);
            }
            return Err(QueueError::TooManyWaiters(name.clone()));
        }
        waiters.count.fetch_add(1, Ordering::AcqRel);
        self.counters.waiting.fetch_add(1, Ordering::AcqRel);
        Ok(Waiting { wakers: self.wakers.clone(), counters: self.counters.clone(), queue: name.clone(), waiters })
    }

    /// One ack: `not_found` unless `delivery` is the current lease. Through the ack
    /// batcher (one statement for the acks waiting together), or alone once it stopped.
    async fn ack(&self, name: &QueueName, delivery: &str) -> Result<(), QueueError> {
        let not_found = || QueueError::NotFound(delivery.to_owned());
        let id = message_of(delivery).ok_or_else(not_found)?;
        let (reply, answer) = oneshot::channel();
        let now = big(self.clock.now_ms());
        let ack = Ack { queue: name.clone(), id, delivery: delivery.to_owned(), now, reply };
        if let Err(mpsc::error::SendError(ack)) = self.ack_tx.send(ack).await {
            ack_batch(self.db.clone(), vec![ack]).await;
        }
        match answer.await.map_err(|_| closed())? {
            Ok(true) => Ok(()),
            Ok(false) => Err(not_found()),
            Err(e) => Err(e),
        }
    }

    /// One requeue or extend: `not_found` unless `delivery` is the current lease.
    async fn settle_delivery(&self, name: &QueueName, op: Op, delivery: &str) -> Result<(), QueueError> {
        let not_found = || QueueError::NotFound(delivery.to_owned());
        let id = message_of(delivery).ok_or_else(not_found)?;
        let now = self.clock.now_ms();
        let client = self.db.conn().await?;
        let sql = &self.db.sql;
        let now_ms = big(now);
        let done = match op {
            Op::Requeue { delay_ms } => {
                let statement = client.prepare_cached(&sql.requeue).await.map_err(db_error)?;
                let (ready_at, dlq) = (after(now, delay_ms), name.dlq());
                let dlq = dlq.as_ref().map(|d| d.as_str());
                let params: [&(dyn ToSql + Sync); 7] =
                    [&name.as_str(), &id, &delivery, &now_ms, &ready_at, &self.db.channel, &dlq];
                let requeued = unflushed(&client, NO_SETTLE, client.query_opt(&statement, &params));
                requeued.await.map_err(db_error)?.1.is_some()
            }
            Op::Extend { visibility_ms } => {
                let statement = client.prepare_cached(&sql.extend).await.map_err(db_error)?;
                let lease_end = after(now, visibility_ms);
                let params: [&(dyn ToSql + Sync); 5] = [&name.as_str(), &id, &delivery, &now_ms, &lease_end];
                unflushed(&client, NO_SETTLE, client.execute(&statement, &params)).await.map_err(db_error)?.1 == 1
            }
        };
        if done {
            Ok(())
        } else {
            Err(not_found())
        }
    }

    async fn stats(&self, name: &QueueName) -> Result<QueueStats, QueueError> {
        let now = self.clock.now_ms();
        let client = self.db.conn().await?;
        let (dlq, now_ms) = (name.dlq(), big(now));
        let dlq_name = dlq.as_ref().map(|d| d.as_str());
        let params: [&(dyn ToSql + Sync); 3] = [&name.as_str(), &now_ms, &dlq_name];
        let rows = self.db.settled_query(&client, settle_pair(name), now, &self.db.sql.stats, &params, false).await?;
        let row = rows.first().ok_or_else(|| unavailable("no stats row"))?;
        let count = |i| col::<i64>(row, i).map(|n| n as u64);
        Ok(QueueStats { ready: count(0)?, in_flight: count(1)?, delayed: count(2)?, dead: count(3)? })
    }

    async fn purge(&self, name: &QueueName) -> Result<u64, QueueError> {
        let now = self.clock.now_ms();
        let client = self.db.conn().await?;
        let now_ms = big(now);
        let mut cursor = 0_i64;
        let mut purged = 0;
        let mut pair = settle_pair(name);
        // In transactions of at most ADMIN_BATCH messages, walking up the ids; jobs
        // enqueued meanwhile may be purged too.
        loop {
            let params: [&(dyn ToSql + Sync); 4] = [&name.as_str(), &now_ms, &ADMIN_BATCH, &cursor];
            let rows = self.db.settled_query(&client, pair.take(), now, &self.db.sql.purge, &params, true).await?;
            let row = rows.first().ok_or_else(|| unavailable("no purge row"))?;
            let (n, last): (i64, i64) = (col(row, 0)?, col(row, 1)?);
            purged += n as u64;
            if n < ADMIN_BATCH {
                return Ok(purged);
            }
            cursor = last;
        }
    }

    async fn redrive(&self, name: &QueueName, max: usize) -> Result<u64, QueueError> {
        let Some(dlq) = name.dlq() else {
            return Err(QueueError::Unsupported(format!("{name} is a dead-letter queue: it has none to redrive")));
        };
        let mut client = self.db.conn().await?;
        let max = big(max as u64);
        let mut moved = 0;
        // Each transaction moves its batch atomically: a dead letter is in one queue or
        // the other, never both, never neither.
        while moved < max {
            let now = self.clock.now_ms();
            let n = self
                .redrive_batch(&mut client, name, &dlq, ADMIN_BATCH.min(max - moved), now)
                .await
                .map_err(db_error)?;
            moved += n.0;
            if n.0 < n.1 || n.1 == 0 {
                break;
            }
        }
        Ok(moved as u64)
    }

    /// Moves up to `want` dead letters back, no more than the queue has room for.
    /// Returns (moved, tried).
    async fn redrive_batch(
        &self,
        client: &mut Object,
        name: &QueueName,
        dlq: &QueueName,
        want: i64,
        now: u64,
    ) -> Result<(i64, i64), DbError> {
        let sql = &self.db.sql;
        let max_messages = big(self.config.max_queue_messages as u64);
        let tx = client.transaction().await?;
        let lock = tx.prepare_cached(&sql.lock_existing).await?;
        // No row: nothing was ever enqueued, so nothing was dead-lettered either.
        let Some(row) = tx.query_opt(&lock, &[&name.as_str()]).await? else { return Ok((0, 0)) };
        let bound: i64 = row.try_get(0)?;
        self.db.settle_in(&tx, name, now).await?;
        let room = if bound + want <= max_messages {
            want
        } else {
            let count = tx.prepare_cached(&sql.count).await?;
            let held: i64 = tx.query_one(&count, &[&name.as_str(), &big(now), &max_messages]).await?.try_get(0)?;
            let set_bound = tx.prepare_cached(&sql.set_bound).await?;
            tx.execute(&set_bound, &[&name.as_str(), &held]).await?;
            (max_messages - held).clamp(0, want)
        };
        if room == 0 {
            tx.commit().await?;
            return Ok((0, 0));
        }
        let redrive = tx.prepare_cached(&sql.redrive).await?;
        let params: [&(dyn ToSql + Sync); 5] = [&name.as_str(), &dlq.as_str(), &big(now), &room, &self.db.channel];
        let n: i64 = tx.query_one(&redrive, &params).await?.try_get(0)?;
        tx.commit().await?;
        Ok((n, room))
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        visible: Visible<'_>,
    ) -> Result<Vec<QueueName>, QueueError> {
        let client = self.db.conn().await?;
        let statement = client.prepare_cached(&self.db.sql.list).await.map_err(db_error)?;
        let mut cursor = after.unwrap_or("").to_owned();
        let mut out = Vec::new();
        while out.len() < limit {
            let rows = client.query(&statement, &[&prefix, &cursor, &LIST_PAGE]).await.map_err(db_error)?;
            let mut past_prefix = false;
            for row in &rows {
                let name: &str = col(row, 0)?;
                if !name.starts_with(prefix) {
                    past_prefix = true;
                    break;
                }
                match QueueName::parse(name) {
                    Ok(q) if !q.is_dlq() && visible(&q) && out.len() < limit => out.push(q),
                    _ => {}
                }
            }
            match rows.last() {
                Some(last) if !past_prefix && rows.len() as i64 == LIST_PAGE => cursor = col::<String>(last, 0)?,
                _ => break,
            }
        }
        Ok(out)
    }
}

/// What [`Shared::settle_delivery`] does with a current delivery.
#[derive(Clone, Copy)]
enum Op {
    Requeue { delay_ms: u64 },
    Extend { visibility_ms: u64 },
}

impl QueueService for PgQueues {
    fn enqueue<'a>(&'a self, name: &'a QueueName, msg: NewMessage, delay_ms: u64) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let (enqueue, answer) = self.shared.enqueue_of(name, msg, delay_ms)?;
            self.shared.enqueue_tx.send(enqueue).await.map_err(|_| closed())?;
            answer.await.map_err(|_| closed())?
        })
    }

    /// The batch's enqueues go to the writer in one go, in order (room for all of them
    /// taken at once, so no other caller's enqueue comes between them and none can
    /// overtake another): their ids follow the batch's order, and the writer takes them
    /// into as few group commits as its batch size allows.
    fn enqueue_batch<'a>(&'a self, name: &'a QueueName, batch: Vec<(NewMessage, u64)>) -> BatchFuture<'a, u64> {
        Box::pin(async move {
            let shared = &self.shared;
            let made: Vec<_> =
                batch.into_iter().map(|(msg, delay_ms)| shared.enqueue_of(name, msg, delay_ms)).collect();
            // The doors cap a batch below the channel's size; past it, the rest is sent
            // one by one after the reserved ones (still in order).
            let valid = made.iter().filter(|m| m.is_ok()).count().min(ENQUEUE_QUEUE);
            let mut permits = shared.enqueue_tx.reserve_many(valid).await.ok();
            let mut answers = Vec::with_capacity(made.len());
            for m in made {
                let Ok((enqueue, answer)) = m else {
                    answers.push(m.map(|(_, answer)| answer));
                    continue;
                };
                let sent = match permits.as_mut().and_then(Iterator::next) {
                    Some(permit) => {
                        permit.send(enqueue);
                        true
                    }
                    None => shared.enqueue_tx.send(enqueue).await.is_ok(),
                };
                answers.push(if sent { Ok(answer) } else { Err(closed()) });
            }
            let mut out = Vec::with_capacity(answers.len());
            for answer in answers {
                out.push(match answer {
                    Ok(answer) => answer.await.unwrap_or_else(|_| Err(closed())),
                    Err(e) => Err(e),
                });
            }
            out
        })
    }

    fn fetch_wait<'a>(
        &'a self,
        name: &'a QueueName,
        max: usize,
        visibility_ms: u64,
        wait: Duration,
    ) -> QueueFuture<'a, Vec<Delivery>> {
        Box::pin(async move {
            let shared = &self.shared;
            let got = shared.try_fetch(name, max, visibility_ms).await?;
            if !got.is_empty() || wait.is_zero() {
                return Ok(got);
            }
            let deadline = tokio::time::Instant::now() + wait;
            let waiting = shared.wait_on(name)?;
            // The wake-up this waiter was given, passed on or not after its next try.
            let mut pass: Option<PassOn<'_>> = None;
            loop {
                // Registered before the try: a notification for a commit the try did
                // not see arrives after it and wakes us.
                let woken = waiting.waiters.ready.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let got = shared.try_fetch(name, max, visibility_ms).await?;
                if let Some(pass) = pass.take() {
                    if got.len() >= max {
                        pass.more();
                    } else {
                        pass.drained();
                    }
                }
                let now = tokio::time::Instant::now();
                if !got.is_empty() || now >= deadline || shared.shutdown.is_cancelled() {
                    return Ok(got);
                }
                // Sleep to the wait's end, or to the next delay or lease end, whichever
                // is first; a notification wakes us at once. Without notifications (the
                // LISTEN connection is down), re-check every second.
                let mut until = deadline;
                if let Some(at) = shared.next_due(name).await? {
                    until = until.min(now + Duration::from_millis(at.saturating_sub(shared.clock.now_ms())));
                }
                if !shared.wakers.listening.load(Ordering::Acquire) {
                    until = until.min(now + RECHECK);
                }
                tokio::select! {
                    _ = woken => pass = Some(PassOn::new(&waiting.waiters.ready)),
                    _ = tokio::time::sleep_until(until) => {}
                    _ = shared.shutdown.cancelled() => {}
                }
            }
        })
    }

    /// The acks go with the fetch to the fetch combiner, whose transaction for that
    /// queue runs the ack batcher's statement and then the fetch's, pipelined: one
    /// round trip and one commit for both (the acked messages are leased, the fetched
    /// ones ready: never the same).
    fn ack_and_fetch<'a>(
        &'a self,
        name: &'a QueueName,
        deliveries: &'a [String],
        max: usize,
        visibility_ms: u64,
    ) -> AckFetchFuture<'a> {
        Box::pin(async move {
            // A delivery id without a message id names no row (ids start at 1): not found.
            let acks = deliveries.iter().map(|d| (message_of(d).unwrap_or(0), d.clone())).collect();
            match self.shared.try_fetch_acking(name, max, visibility_ms, acks).await {
                Ok(Fetched { deliveries: taken, acked }) => {
                    let outcomes = deliveries
                        .iter()
                        .zip(acked)
                        .map(|(d, done)| if done { Ok(()) } else { Err(QueueError::NotFound(d.clone())) })
                        .collect();
                    (outcomes, Ok(taken))
                }
                // Nothing of the transaction was committed: no ack was done either.
                Err(e) => (deliveries.iter().map(|_| Err(e.clone())).collect(), Err(e)),
            }
        })
    }

    fn ack<'a>(&'a self, name: &'a QueueName, delivery: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            self.shared.ack(name, delivery).await?;
            self.shared.counters.acked.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    fn requeue<'a>(&'a self, name: &'a QueueName, delivery: &'a str, delay_ms: u64) -> QueueFuture<'a, ()> {
        Box::pin(self.shared.settle_delivery(name, Op::Requeue { delay_ms }, delivery))
    }

    fn extend<'a>(&'a self, name: &'a QueueName, delivery: &'a str, visibility_ms: u64) -> QueueFuture<'a, ()> {
        Box::pin(self.shared.settle_delivery(name, Op::Extend { visibility_ms }, delivery))
    }

    fn stats<'a>(&'a self, name: &'a QueueName) -> QueueFuture<'a, QueueStats> {
        Box::pin(self.shared.stats(name))
    }

    fn purge<'a>(&'a self, name: &'a QueueName) -> QueueFuture<'a, u64> {
        Box::pin(self.shared.purge(name))
    }

    fn redrive<'a>(&'a self, name: &'a QueueName, max: usize) -> QueueFuture<'a, u64> {
        Box::pin(self.shared.redrive(name, max))
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
        visible: Visible<'a>,
    ) -> QueueFuture<'a, Vec<ListedQueue>> {
        Box::pin(async move {
            let names = self.shared.list(prefix, after, limit, visible).await?;
            // A few at a time: each is a settle and a count on a pooled connection.
            futures_util::stream::iter(names)
                .map(|queue| async move {
                    let stats = self.shared.stats(&queue).await?;
                    Ok::<_, QueueError>(ListedQueue { queue, stats })
                })
                .buffered(4)
                .try_collect()
                .await
        })
    }

    fn counters(&self) -> &QueueCounters {
        &self.shared.counters
    }
}
