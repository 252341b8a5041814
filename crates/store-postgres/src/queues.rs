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
//! insert per queue and round trip (a group commit).
//!
//! Long polls: writes that make messages ready `pg_notify` the schema's channel with the
//! queue's name in their transaction; one dedicated connection per `PgQueues` LISTENs
//! and wakes this node's waiters on that queue. Waiters also sleep only until the next
//! delay or lease end, and re-check every second while the LISTEN connection is down
//! (it reconnects with backoff, and wakes every waiter once it listens again).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Object, Pool};
use futures_util::future::OptionFuture;
use futures_util::{StreamExt, TryStreamExt};
use herald_core::{
    Clock, Delivery, Kind, ListedQueue, NewMessage, QueueConfig, QueueCounters, QueueError, QueueFuture, QueueName,
    QueueService, QueueStats, StoreError, Visible,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{AsyncMessage, NoTls, Row};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// Enqueues waiting for the writer, at most (then `enqueue` waits for room).
const ENQUEUE_QUEUE: usize = 4096;
/// Messages in one writer round trip, at most.
const BATCH_MESSAGES: usize = 512;
/// Payload bytes in one writer round trip, at most (one message may exceed it alone).
const BATCH_BYTES: usize = 8 << 20;
/// Messages one fetch takes, at most (the front doors allow 100).
const MAX_FETCH: usize = 1000;
/// Messages one purge or redrive transaction removes or moves, at most.
const ADMIN_BATCH: i64 = 10_000;
/// Queue names one `list` page reads.
const LIST_PAGE: i64 = 200;
/// How often waiters re-check while the LISTEN connection is down.
const RECHECK: Duration = Duration::from_secs(1);
/// The LISTEN connection's reconnect backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Times a writer transaction is retried after a deadlock or serialization failure.
const RETRIES: usize = 3;

/// The statements, with `{s}` the quoted schema.
mod sql {
    /// Enqueue of one queue's batch: reserves ids and adds to the bound unless that says
    /// the queue may be full (then no row: the writer counts), inserts, notifies.
    /// $1 queue, $2 channel, $3 n, $4 max, $5.. the columns as arrays.
    pub const ENQUEUE: &str = "
WITH q AS (
    INSERT INTO {s}.queues AS q (name, next_id, bound) VALUES ($1, $3::bigint + 1, $3::bigint)
    ON CONFLICT (name) DO UPDATE SET next_id = q.next_id + $3::bigint, bound = q.bound + $3::bigint
    WHERE q.bound + $3::bigint <= $4::bigint
    RETURNING q.next_id
), ins AS (
    INSERT INTO {s}.queue_messages (queue, id, kind, payload, ts, visible_at, expires_at)
    SELECT $1, q.next_id - $3::bigint - 1 + u.ord, u.kind, u.payload, u.ts, u.visible_at, u.expires_at
    FROM q, unnest($5::smallint[], $6::bytea[], $7::bigint[], $8::bigint[], $9::bigint[])
        WITH ORDINALITY AS u(kind, payload, ts, visible_at, expires_at, ord)
)
SELECT q.next_id - $3::bigint, pg_notify($2, $1)::text FROM q";

    /// Locks a queue's row (creating it): $1 queue. Returns the bound.
    pub const LOCK_QUEUE: &str = "
INSERT INTO {s}.queues AS q (name) VALUES ($1)
ON CONFLICT (name) DO UPDATE SET name = excluded.name
RETURNING q.bound";

    /// Locks an existing queue's row: $1 queue.
    pub const LOCK_EXISTING: &str = "SELECT bound FROM {s}.queues WHERE name = $1 FOR UPDATE";

    /// $1 queue, $2 bound.
    pub const SET_BOUND: &str = "UPDATE {s}.queues SET bound = $2 WHERE name = $1";

    /// The messages a queue holds, up to $3: $1 queue, $2 now.
    pub const COUNT: &str = "
SELECT count(*) FROM (
    SELECT 1 FROM {s}.queue_messages
    WHERE queue = $1 AND (expires_at IS NULL OR expires_at > $2) LIMIT $3
) held";

    /// Applies the written changes time made: last leases ended (or requeued) move to the
    /// dead-letter queue as new messages dated when they ended, in that order, unless
    /// their TTL passed first; messages whose TTL passed are deleted.
    /// $1 queue, $2 its dead-letter queue, $3 now, $4 channel. Returns the dead letters.
    pub const SETTLE: &str = "
WITH due AS (
    DELETE FROM {s}.queue_messages
    WHERE queue = $1 AND dead_at <= $3 AND (expires_at IS NULL OR expires_at > dead_at)
    RETURNING id, kind, payload, dead_at
), expired AS (
    DELETE FROM {s}.queue_messages
    WHERE queue = $1 AND expires_at <= $3 AND (dead_at IS NULL OR dead_at > $3 OR expires_at <= dead_at)
), n AS (
    SELECT count(*) AS n FROM due
), d AS (
    INSERT INTO {s}.queues AS q (name, next_id, bound) SELECT $2, n.n + 1, n.n FROM n WHERE n.n > 0
    ON CONFLICT (name) DO UPDATE SET next_id = q.next_id + excluded.bound, bound = q.bound + excluded.bound
    RETURNING q.next_id
), moved AS (
    INSERT INTO {s}.queue_messages (queue, id, kind, payload, ts, visible_at)
    SELECT $2, d.next_id - n.n - 1 + row_number() OVER (ORDER BY due.dead_at, due.id),
        due.kind, due.payload, due.dead_at, due.dead_at
    FROM due, d, n
)
SELECT n.n, CASE WHEN n.n > 0 THEN pg_notify($4, $2)::text END FROM n";

    /// Takes up to $3 ready messages, oldest first, leasing each until $4; drops those
    /// whose TTL passed. $1 queue, $2 now, $5 the attempt that is the last one (its
    /// lease end is also its dead-letter time), $6 one nonce per message.
    pub const FETCH: &str = "
WITH expired AS (
    DELETE FROM {s}.queue_messages
    WHERE queue = $1 AND expires_at <= $2 AND (dead_at IS NULL OR dead_at > $2 OR expires_at <= dead_at)
), picked AS (
    SELECT id, visible_at FROM {s}.queue_messages
    WHERE queue = $1 AND dead_at IS NULL AND visible_at <= $2 AND (expires_at IS NULL OR expires_at > $2)
    ORDER BY visible_at, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), numbered AS (
    SELECT id, row_number() OVER (ORDER BY visible_at, id) AS rn FROM picked
)
UPDATE {s}.queue_messages m
SET attempts = m.attempts + 1,
    visible_at = $4,
    delivery = to_hex(m.id) || '-' || (m.attempts + 1) || '-' || to_hex(($6::bigint[])[p.rn]),
    dead_at = CASE WHEN m.attempts + 1 >= $5 THEN $4::bigint END
FROM numbered p
WHERE m.queue = $1 AND m.id = p.id
RETURNING m.id, m.attempts, m.ts, m.kind, m.payload, m.delivery, p.rn";

    /// When the next delay or lease of $1 ends after $2, and (for a dead-letter queue)
    /// the next last lease of its queue $3.
    pub const NEXT_DUE: &str = "
SELECT (SELECT min(visible_at) FROM {s}.queue_messages WHERE queue = $1 AND dead_at IS NULL AND visible_at > $2),
       (SELECT min(dead_at) FROM {s}.queue_messages WHERE queue = $3 AND dead_at > $2)";

    /// The condition naming the current lease: $1 queue, $2 id, $3 delivery, $4 now.
    const CURRENT: &str =
        "queue = $1 AND id = $2 AND delivery = $3 AND visible_at > $4 AND (expires_at IS NULL OR expires_at > $4)";

    pub fn ack() -> String {
        format!("DELETE FROM {{s}}.queue_messages WHERE {CURRENT}")
    }

    /// $5 when it is ready again, $6 channel, $7 the dead-letter queue. Returns whether
    /// it is dead (its last delivery).
    pub fn requeue() -> String {
        format!(
            "
WITH r AS (
    UPDATE {{s}}.queue_messages
    SET delivery = NULL,
        visible_at = CASE WHEN dead_at IS NULL THEN $5 ELSE $4 END,
        dead_at = CASE WHEN dead_at IS NULL THEN NULL ELSE $4::bigint END
    WHERE {CURRENT}
    RETURNING dead_at
)
SELECT r.dead_at IS NOT NULL, pg_notify($6, CASE WHEN r.dead_at IS NULL THEN $1 ELSE $7 END)::text FROM r"
        )
    }

    /// $5 the new lease end.
    pub fn extend() -> String {
        format!(
            "UPDATE {{s}}.queue_messages SET visible_at = $5,
                dead_at = CASE WHEN dead_at IS NULL THEN NULL ELSE $5::bigint END
             WHERE {CURRENT}"
        )
    }

    /// $1 queue, $2 now, $3 its dead-letter queue (NULL for none).
    pub const STATS: &str = "
SELECT count(*) FILTER (WHERE dead_at IS NULL AND visible_at <= $2),
       count(*) FILTER (WHERE delivery IS NOT NULL AND visible_at > $2),
       count(*) FILTER (WHERE delivery IS NULL AND visible_at > $2),
       (SELECT count(*) FROM {s}.queue_messages WHERE queue = $3)
FROM {s}.queue_messages WHERE queue = $1 AND (expires_at IS NULL OR expires_at > $2)";

    /// Deletes up to $3 ready or delayed messages with ids above $4, in id order.
    /// $1 queue, $2 now. Returns how many and the last id.
    pub const PURGE: &str = "
WITH picked AS (
    SELECT id FROM {s}.queue_messages
    WHERE queue = $1 AND id > $4 AND dead_at IS NULL AND (delivery IS NULL OR visible_at <= $2)
        AND (expires_at IS NULL OR expires_at > $2)
    ORDER BY id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {s}.queue_messages m USING picked p WHERE m.queue = $1 AND m.id = p.id RETURNING m.id
)
SELECT count(*), coalesce(max(id), 0) FROM gone";

    /// Moves up to $4 ready messages of dead-letter queue $2, oldest first, to $1 as new
    /// messages ready at $3 (its row locked by the caller). $5 channel.
    pub const REDRIVE: &str = "
WITH picked AS (
    SELECT id, visible_at FROM {s}.queue_messages
    WHERE queue = $2 AND dead_at IS NULL AND visible_at <= $3
    ORDER BY visible_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {s}.queue_messages m USING picked p WHERE m.queue = $2 AND m.id = p.id
    RETURNING m.id, m.kind, m.payload, p.visible_at
), n AS (
    SELECT count(*) AS n FROM gone
), q AS (
    UPDATE {s}.queues SET next_id = next_id + n.n, bound = bound + n.n FROM n WHERE name = $1 RETURNING next_id
), moved AS (
    INSERT INTO {s}.queue_messages (queue, id, kind, payload, ts, visible_at)
    SELECT $1, q.next_id - n.n - 1 + row_number() OVER (ORDER BY g.visible_at, g.id), g.kind, g.payload, $3, $3
    FROM gone g, q, n
)
SELECT n.n, CASE WHEN n.n > 0 THEN pg_notify($5, $1)::text END FROM n";

    /// One page of the registry: names from $1 (the prefix), after $2.
    pub const LIST: &str = "SELECT name FROM {s}.queues WHERE name >= $1 AND name > $2 ORDER BY name LIMIT $3";
}

/// The statements of one schema.
struct Sql {
    enqueue: String,
    lock_queue: String,
    lock_existing: String,
    set_bound: String,
    count: String,
    settle: String,
    fetch: String,
    next_due: String,
    ack: String,
    requeue: String,
    extend: String,
    stats: String,
    purge: String,
    redrive: String,
    list: String,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let quoted = format!("\"{}\"", schema.replace('"', "\"\""));
        let s = |text: &str| text.replace("{s}", &quoted);
        Self {
            enqueue: s(sql::ENQUEUE),
            lock_queue: s(sql::LOCK_QUEUE),
            lock_existing: s(sql::LOCK_EXISTING),
            set_bound: s(sql::SET_BOUND),
            count: s(sql::COUNT),
            settle: s(sql::SETTLE),
            fetch: s(sql::FETCH),
            next_due: s(sql::NEXT_DUE),
            ack: s(&sql::ack()),
            requeue: s(&sql::requeue()),
            extend: s(&sql::extend()),
            stats: s(sql::STATS),
            purge: s(sql::PURGE),
            redrive: s(sql::REDRIVE),
            list: s(sql::LIST),
        }
    }
}

/// The notification channel of `schema`'s queues: at most 63 bytes (PostgreSQL's
/// identifier length), a stable hash of the schema if its name is too long.
fn channel_of(schema: &str) -> String {
    let plain = format!("herald.queues.{schema}");
    if plain.len() <= 63 {
        return plain;
    }
    // FNV-1a: the same on every node (RandomState would not be).
    let hash = schema.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("herald.queues.{hash:016x}")
}

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

/// This node's long polls, by queue, and whether notifications are coming in.
#[derive(Default)]
struct Wakers {
    queues: Mutex<HashMap<QueueName, Arc<Waiters>>>,
    listening: AtomicBool,
}

#[derive(Default)]
struct Waiters {
    /// Changed under the map's lock only.
    count: AtomicUsize,
    ready: Notify,
}

/// The map's lock is never held across an await: each section is a lookup or an update.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Wakers {
    fn wake(&self, queue: &str) {
        let queues = lock(&self.queues);
        if let Some(w) = QueueName::parse(queue).ok().and_then(|q| queues.get(&q).cloned()) {
            w.ready.notify_waiters();
        }
    }

    fn wake_all(&self) {
        for w in lock(&self.queues).values() {
            w.ready.notify_waiters();
        }
    }
}

/// A waiting fetch; dropped, it leaves its queue's waiters.
struct Waiting {
    wakers: Arc<Wakers>,
    counters: Arc<QueueCounters>,
    queue: QueueName,
    waiters: Arc<Waiters>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.counters.waiting.fetch_sub(1, Ordering::AcqRel);
        let mut queues = lock(&self.wakers.queues);
        if self.waiters.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            queues.remove(&self.queue);
        }
    }
}

/// One enqueue for the writer task.
struct Enqueue {
    queue: QueueName,
    kind: i16,
    payload: Bytes,
    ts: i64,
    visible_at: i64,
    expires_at: Option<i64>,
    reply: oneshot::Sender<Result<u64, QueueError>>,
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

    /// Writes one batch of enqueues, each queue's in one statement, one transaction
    /// for all (one autocommit statement when the batch is one queue's and fits).
    /// Returns, per queue, the first id and how many were accepted.
    async fn write(&self, groups: &BTreeMap<QueueName, Vec<Enqueue>>) -> Result<Vec<(i64, usize)>, DbError> {
        let max = big(self.config.max_queue_messages as u64);
        let mut client = self.pool.get().await?;
        let insert = client.prepare_cached(&self.sql.enqueue).await?;
        if let [(queue, items)] = &groups.iter().collect::<Vec<_>>()[..] {
            if items.len() as i64 <= max {
                if let Some(row) = client.query_opt(&insert, &self.insert_params(queue, items, max).as_refs()).await? {
                    return Ok(vec![(row.try_get(0)?, items.len())]);
                }
            }
        }
        let now = self.clock.now_ms();
        let tx = client.transaction().await?;
        let mut out = Vec::with_capacity(groups.len());
        for (queue, items) in groups {
            let fast = if items.len() as i64 <= max {
                tx.query_opt(&insert, &self.insert_params(queue, items, max).as_refs()).await?
            } else {
                None
            };
            let written = match fast {
                Some(row) => (row.try_get(0)?, items.len()),
                None => self.write_full(&tx, queue, items, max, now).await?,
            };
            out.push(written);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The bound said the queue may be full: counts its messages (after settling) under
    /// its row lock and inserts what fits.
    async fn write_full(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        queue: &QueueName,
        items: &[Enqueue],
        max: i64,
        now: u64,
    ) -> Result<(i64, usize), tokio_postgres::Error> {
        let lock = tx.prepare_cached(&self.sql.lock_queue).await?;
        tx.query_one(&lock, &[&queue.as_str()]).await?;
        self.settle_in(tx, queue, now).await?;
        let count = tx.prepare_cached(&self.sql.count).await?;
        let held: i64 = tx.query_one(&count, &[&queue.as_str(), &big(now), &max]).await?.try_get(0)?;
        let set_bound = tx.prepare_cached(&self.sql.set_bound).await?;
        tx.execute(&set_bound, &[&queue.as_str(), &held]).await?;
        let fits = usize::try_from(max - held).unwrap_or(0).min(items.len());
        if fits == 0 {
            return Ok((0, 0));
        }
        let insert = tx.prepare_cached(&self.sql.enqueue).await?;
        let row = tx.query_one(&insert, &self.insert_params(queue, &items[..fits], max).as_refs()).await?;
        Ok((row.try_get(0)?, fits))
    }

    fn insert_params<'a>(&'a self, queue: &'a QueueName, items: &'a [Enqueue], max: i64) -> InsertParams<'a> {
        InsertParams {
            queue: queue.as_str(),
            channel: &self.channel,
            n: items.len() as i64,
            max,
            kinds: items.iter().map(|e| e.kind).collect(),
            payloads: items.iter().map(|e| &e.payload[..]).collect(),
            ts: items.iter().map(|e| e.ts).collect(),
            visible_at: items.iter().map(|e| e.visible_at).collect(),
            expires_at: items.iter().map(|e| e.expires_at).collect(),
        }
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
}

/// The parameters of [`sql::ENQUEUE`].
struct InsertParams<'a> {
    queue: &'a str,
    channel: &'a str,
    n: i64,
    max: i64,
    kinds: Vec<i16>,
    payloads: Vec<&'a [u8]>,
    ts: Vec<i64>,
    visible_at: Vec<i64>,
    expires_at: Vec<Option<i64>>,
}

impl InsertParams<'_> {
    fn as_refs(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.queue,
            &self.channel,
            &self.n,
            &self.max,
            &self.kinds,
            &self.payloads,
            &self.ts,
            &self.visible_at,
            &self.expires_at,
        ]
    }
}

/// The writer task: takes what is queued (up to a batch), writes it in one round trip,
/// answers each caller after the commit. At shutdown it writes what was queued first.
async fn write_enqueues(db: Arc<Db>, mut rx: mpsc::Receiver<Enqueue>, shutdown: CancellationToken) {
    let mut closing = false;
    loop {
        let first = if closing {
            rx.recv().await
        } else {
            tokio::select! {
                next = rx.recv() => next,
                _ = shutdown.cancelled() => {
                    rx.close();
                    closing = true;
                    continue;
                }
            }
        };
        let Some(first) = first else { return };
        let mut bytes = first.payload.len();
        let mut batch = vec![first];
        while batch.len() < BATCH_MESSAGES && bytes < BATCH_BYTES {
            let Ok(next) = rx.try_recv() else { break };
            bytes += next.payload.len();
            batch.push(next);
        }
        let mut groups: BTreeMap<QueueName, Vec<Enqueue>> = BTreeMap::new();
        for e in batch {
            groups.entry(e.queue.clone()).or_default().push(e);
        }
        let mut tries = 0;
        let written = loop {
            tries += 1;
            match db.write(&groups).await {
                Err(e) if retryable(&e) && tries < RETRIES => continue,
                other => break other,
            }
        };
        match written {
            Ok(written) => {
                for ((queue, items), (first_id, accepted)) in groups.into_iter().zip(written) {
                    db.counters.enqueued.fetch_add(accepted as u64, Ordering::Relaxed);
                    for (i, e) in items.into_iter().enumerate() {
                        let answer = if i < accepted {
                            Ok((first_id + i as i64) as u64)
                        } else {
                            Err(QueueError::Full { queue: queue.clone(), max: db.config.max_queue_messages })
                        };
                        // The caller may have gone: the message is enqueued all the same.
                        let _ = e.reply.send(answer);
                    }
                }
            }
            Err(e) => {
                let e = db_error(e);
                for e2 in groups.into_values().flatten() {
                    let _ = e2.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The LISTEN connection: (re)connects with backoff, listens, wakes waiters per
/// notification, and every waiter once it listens (again), since notifications sent
/// while it was down are lost. `started` learns how the first attempt went.
async fn run_listener(
    config: tokio_postgres::Config,
    channel: String,
    wakers: Arc<Wakers>,
    shutdown: CancellationToken,
    started: oneshot::Sender<Result<(), tokio_postgres::Error>>,
) {
    let mut started = Some(started);
    let mut backoff = BACKOFF_MIN;
    loop {
        let ended = listen_once(&config, &channel, &wakers, &shutdown, &mut started, &mut backoff).await;
        wakers.listening.store(false, Ordering::Release);
        if shutdown.is_cancelled() {
            return;
        }
        match ended {
            Err(e) => {
                if let Some(tx) = started.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "postgres LISTEN connection for queue wake-ups lost");
            }
            Ok(()) => tracing::warn!(retry_in = ?backoff, "postgres LISTEN connection for queue wake-ups closed"),
        }
        // Waiters switch to re-checking every second until it listens again.
        wakers.wake_all();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    wakers: &Wakers,
    shutdown: &CancellationToken,
    started: &mut Option<oneshot::Sender<Result<(), tokio_postgres::Error>>>,
    backoff: &mut Duration,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = tokio::select! {
        c = config.connect(NoTls) => c?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
    let listening = client.batch_execute(&statement);
    tokio::pin!(listening);
    // The connection is driven by polling its messages, also while LISTEN runs.
    loop {
        tokio::select! {
            done = &mut listening => {
                done?;
                break;
            }
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    wakers.listening.store(true, Ordering::Release);
    *backoff = BACKOFF_MIN;
    wakers.wake_all();
    if let Some(tx) = started.take() {
        let _ = tx.send(Ok(()));
    } else {
        tracing::info!(channel, "postgres LISTEN connection for queue wake-ups restored");
    }
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(n))) => wakers.wake(n.payload()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

impl PgQueues {
    /// The queues in `schema` (its tables made by the migrations) over `pool`, on
    /// `clock`; `listen` is the connection the LISTEN session opens (outside the pool).
    /// Resolves once that session listens: from then on, an enqueue on any node wakes
    /// this node's long polls. Spawns its tasks on the current runtime.
    pub async fn new(
        pool: Pool,
        schema: String,
        listen: tokio_postgres::Config,
        clock: Arc<dyn Clock>,
        config: QueueConfig,
        max_message_bytes: usize,
    ) -> Result<Self, PgQueuesError> {
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
        tasks.spawn(run_listener(listen, channel, wakers.clone(), shutdown.clone(), started_tx));
        match started_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(PgQueuesError::Listen(e)),
            Err(_) => return Err(PgQueuesError::ListenerStopped),
        }
        tasks.spawn(write_enqueues(db.clone(), enqueue_rx, shutdown.clone()));
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
async fn unflushed<T>(
    client: &Object,
    settle: Option<impl Future<Output = Result<Row, tokio_postgres::Error>>>,
    op: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<(Option<Row>, T), tokio_postgres::Error> {
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

impl Shared {
    /// One unguessable 48-bit nonce per delivery: a randomly keyed hash of a counter.
    fn nonces(&self, n: usize) -> Vec<i64> {
        (0..n)
            .map(|_| {
                let k = self.nonces.fetch_add(1, Ordering::Relaxed);
                (self.hasher.hash_one(k) & 0xffff_ffff_ffff) as i64
            })
            .collect()
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
        let settle = client.prepare_cached(&self.db.sql.settle).await.map_err(db_error)?;
        let now = big(now);
        let names = pair.as_ref().map(|(queue, dlq)| (queue.as_str(), dlq.as_str()));
        let settle_params =
            names.as_ref().map(|(queue, dlq)| -> [&(dyn ToSql + Sync); 4] { [queue, dlq, &now, &self.db.channel] });
        let settled = settle_params.as_ref().map(|p| client.query_one(&settle, p));
        let query = client.query(&statement, params);
        let (settled, rows) = if durable {
            let (settled, rows) = futures_util::future::join(OptionFuture::from(settled), query).await;
            (settled.transpose().map_err(db_error)?, rows.map_err(db_error)?)
        } else {
            unflushed(client, settled, query).await.map_err(db_error)?
        };
        if let Some(settled) = settled {
            self.db.dead_lettered(col(&settled, 0)?);
        }
        Ok(rows)
    }

    /// One try: the deliveries taken.
    async fn try_fetch(&self, name: &QueueName, max: usize, visibility_ms: u64) -> Result<Vec<Delivery>, QueueError> {
        let max = max.min(MAX_FETCH);
        let now = self.clock.now_ms();
        let client = self.db.conn().await?;
        // The attempt whose lease end dead-letters (none in a dead-letter queue).
        let last = match name.dlq() {
            Some(_) => i32::try_from(self.config.max_attempts).unwrap_or(i32::MAX),
            None => i32::MAX,
        };
        let nonces = self.nonces(max);
        let (now_ms, limit, lease_end) = (big(now), max as i64, after(now, visibility_ms));
        let params: [&(dyn ToSql + Sync); 6] = [&name.as_str(), &now_ms, &limit, &lease_end, &last, &nonces];
        // On a dead-letter queue, last leases of its queue that ended are dead letters here.
        let pair = name.parent().map(|parent| (parent, name.clone()));
        let rows = self.settled_query(&client, pair, now, &self.db.sql.fetch, &params, false).await?;
        let damaged = || unavailable(format!("a damaged message in {name}"));
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let (id, attempt, ts): (i64, i32, i64) = (col(row, 0)?, col(row, 1)?, col(row, 2)?);
            let order: i64 = col(row, 6)?;
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
        let out: Vec<Delivery> = out.into_iter().map(|(_, d)| d).collect();
        self.counters.delivered.fetch_add(out.len() as u64, Ordering::Relaxed);
        let again = out.iter().filter(|d| d.attempt > 1).count() as u64;
        self.counters.redelivered.fetch_add(again, Ordering::Relaxed);
        Ok(out)
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

    /// One ack, requeue or extend: `not_found` unless `delivery` is the current lease.
    async fn settle_delivery(&self, name: &QueueName, op: Op, delivery: &str) -> Result<(), QueueError> {
        let not_found = || QueueError::NotFound(delivery.to_owned());
        let id = message_of(delivery).ok_or_else(not_found)?;
        let now = self.clock.now_ms();
        let client = self.db.conn().await?;
        let sql = &self.db.sql;
        let now_ms = big(now);
        let current: [&(dyn ToSql + Sync); 4] = [&name.as_str(), &id, &delivery, &now_ms];
        let done = match op {
            Op::Ack => {
                let statement = client.prepare_cached(&sql.ack).await.map_err(db_error)?;
                unflushed(&client, NO_SETTLE, client.execute(&statement, &current)).await.map_err(db_error)?.1 == 1
            }
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
        let rows = self.settled_query(&client, settle_pair(name), now, &self.db.sql.stats, &params, false).await?;
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
            let rows = self.settled_query(&client, pair.take(), now, &self.db.sql.purge, &params, true).await?;
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
    Ack,
    Requeue { delay_ms: u64 },
    Extend { visibility_ms: u64 },
}

impl QueueService for PgQueues {
    fn enqueue<'a>(&'a self, name: &'a QueueName, msg: NewMessage, delay_ms: u64) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let shared = &self.shared;
            if name.is_dlq() {
                return Err(QueueError::DeadLetterQueue(name.clone()));
            }
            if msg.payload.len() > shared.max_message_bytes {
                return Err(QueueError::TooLarge { size: msg.payload.len(), max: shared.max_message_bytes });
            }
            let now = shared.clock.now_ms();
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
            let closed = || QueueError::Store(StoreError::Closed);
            shared.enqueue_tx.send(enqueue).await.map_err(|_| closed())?;
            answer.await.map_err(|_| closed())?
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
            loop {
                // Registered before the try: a notification for a commit the try did
                // not see arrives after it and wakes us.
                let woken = waiting.waiters.ready.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let got = shared.try_fetch(name, max, visibility_ms).await?;
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
                    _ = woken => {}
                    _ = tokio::time::sleep_until(until) => {}
                    _ = shared.shutdown.cancelled() => {}
                }
            }
        })
    }

    fn ack<'a>(&'a self, name: &'a QueueName, delivery: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            self.shared.settle_delivery(name, Op::Ack, delivery).await?;
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
