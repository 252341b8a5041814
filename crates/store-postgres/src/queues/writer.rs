//! The enqueue writer of one [`super::PgQueues`]: a task fed by a bounded channel that
//! takes what is queued (up to a batch), writes each queue's share with one multi-row
//! insert (ids reserved on the queue's row, the notification in the same statement),
//! all in one round trip and one durable commit (a group commit), then answers each
//! caller. A queue whose row says it may be full is counted under its row lock first.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use herald_core::{QueueError, QueueName};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use super::{big, db_error, retryable, Db, DbError};

/// Enqueues waiting for the writer, at most (then `enqueue` waits for room).
pub(super) const ENQUEUE_QUEUE: usize = 4096;
/// Messages in one writer round trip, at most.
const BATCH_MESSAGES: usize = 512;
/// Payload bytes in one writer round trip, at most (one message may exceed it alone).
const BATCH_BYTES: usize = 8 << 20;
/// Times a writer transaction is retried after a deadlock or serialization failure.
const RETRIES: usize = 3;

/// One enqueue for the writer task.
pub(super) struct Enqueue {
    pub(super) queue: QueueName,
    pub(super) kind: i16,
    pub(super) payload: Bytes,
    pub(super) ts: i64,
    pub(super) visible_at: i64,
    pub(super) expires_at: Option<i64>,
    pub(super) reply: oneshot::Sender<Result<u64, QueueError>>,
}

impl Db {
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
}

/// The parameters of `sql::ENQUEUE`.
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
pub(super) async fn write_enqueues(db: Arc<Db>, mut rx: mpsc::Receiver<Enqueue>, shutdown: CancellationToken) {
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
