//! The ack batcher and the fetch combiner of one [`super::PgQueues`]: two tasks, each
//! fed by a bounded channel, that take what is queued and serve it with one statement
//! (per queue, for fetches) where one-by-one would take a statement, a transaction and
//! a pooled connection each. Up to [`IN_FLIGHT`] batches of each run at once: while
//! they do, new requests queue up and make the next batch. A lone request goes alone
//! at once (no waiting to fill a batch), so one worker pays only the hop to the task.
//!
//! Acks: one `DELETE ... USING unnest(...)` for the whole batch, every queue at once,
//! each ack judged at its own time (taken when it was called), committed without
//! waiting for the WAL flush like a single ack. Each caller is answered by whether its
//! delivery's row was deleted: `not_found` otherwise, exactly as one-by-one. The same
//! delivery acked twice in a batch goes in once: the first caller gets the answer, the
//! others `not_found` (as the second of two acks one after the other would).
//!
//! Fetches: the fetches waiting on one queue become one `FOR UPDATE SKIP LOCKED`
//! statement for the sum of their `max` (at most [`MAX_FETCH`] each statement), its
//! rows shared out oldest first in the callers' order, each leased for its caller's
//! visibility from one `now` (the batch's, read when it runs: within every call). The
//! deliveries a fetch acks (a worker's finished jobs, at most [`MAX_ACKS`] a group)
//! are deleted by the ack statement in the same transaction, pipelined before it.
//!
//! A failed statement answers its whole batch with the error (nothing of it was
//! committed). Once the tasks stopped (at `close`), requests run alone on the caller's
//! task, as before batching.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use herald_core::{Delivery, QueueError, QueueName};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use super::{after, db_error, retryable, unflushed, Db, DbError, MAX_FETCH, NO_SETTLE};

/// Requests waiting for a batch task, at most (then callers wait for room).
pub(super) const BATCH_QUEUE: usize = 4096;
/// Acks in one statement, at most.
pub(super) const MAX_ACKS: usize = 1024;
/// Fetch calls in one batch, at most (split into statements of [`MAX_FETCH`] messages).
pub(super) const MAX_FETCHES: usize = 256;
/// Batches of one task running at once, each on its own pooled connection.
const IN_FLIGHT: usize = 2;
/// Times an ack batch is retried after a deadlock (only batches holding the same rows
/// in another order can deadlock: the same deliveries acked concurrently).
const RETRIES: usize = 3;

/// One ack for the batcher: answered `Ok(true)` if it deleted its message.
pub(super) struct Ack {
    pub(super) queue: QueueName,
    pub(super) id: i64,
    pub(super) delivery: String,
    /// The ack's time.
    pub(super) now: i64,
    pub(super) reply: oneshot::Sender<Result<bool, QueueError>>,
}

/// One fetch for the combiner (`max` at most [`MAX_FETCH`], one nonce per message),
/// with the deliveries of its queue it acks (message id, delivery id).
pub(super) struct Fetch {
    pub(super) queue: QueueName,
    pub(super) max: usize,
    pub(super) visibility_ms: u64,
    pub(super) nonces: Vec<i64>,
    pub(super) acks: Vec<(i64, String)>,
    pub(super) reply: oneshot::Sender<Result<Fetched, QueueError>>,
}

/// A fetch's answer: what it took, and per ack whether it deleted its message.
pub(super) struct Fetched {
    pub(super) deliveries: Vec<Delivery>,
    pub(super) acked: Vec<bool>,
}

/// A batch task: waits for a request, takes what else is queued (up to `max`), runs
/// `run` on it, with up to [`IN_FLIGHT`] batches at once. At shutdown, stops taking
/// requests (callers then run theirs alone) and ends once what was queued is answered.
pub(super) async fn run_batches<R, F, Fut>(mut rx: mpsc::Receiver<R>, shutdown: CancellationToken, max: usize, run: F)
where
    F: Fn(Vec<R>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut running = FuturesUnordered::new();
    let mut closing = false;
    loop {
        if running.len() >= IN_FLIGHT {
            running.next().await;
            continue;
        }
        let first = tokio::select! {
            Some(()) = running.next(), if !running.is_empty() => continue,
            _ = shutdown.cancelled(), if !closing => {
                rx.close();
                closing = true;
                continue;
            }
            next = rx.recv() => next,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < max {
            let Ok(next) = rx.try_recv() else { break };
            batch.push(next);
        }
        tracing::trace!(requests = batch.len(), "postgres queue batch");
        running.push(run(batch));
    }
    while running.next().await.is_some() {}
}

/// The deliveries one ack statement names: each once, with the callers that named it.
#[derive(Default)]
struct AckKeys {
    queues: Vec<QueueName>,
    ids: Vec<i64>,
    deliveries: Vec<String>,
    nows: Vec<i64>,
    replies: Vec<Vec<oneshot::Sender<Result<bool, QueueError>>>>,
}

/// Runs one batch of acks: one statement, each caller answered.
pub(super) async fn ack_batch(db: Arc<Db>, batch: Vec<Ack>) {
    let mut keys = AckKeys::default();
    let mut index: HashMap<(QueueName, i64, String), usize> = HashMap::with_capacity(batch.len());
    for ack in batch {
        match index.entry((ack.queue.clone(), ack.id, ack.delivery.clone())) {
            Entry::Occupied(seen) => {
                let i = *seen.get();
                // Judged at the earliest time that named it: the first ack of two in a row.
                keys.nows[i] = keys.nows[i].min(ack.now);
                keys.replies[i].push(ack.reply);
            }
            Entry::Vacant(new) => {
                new.insert(keys.ids.len());
                keys.queues.push(ack.queue);
                keys.ids.push(ack.id);
                keys.deliveries.push(ack.delivery);
                keys.nows.push(ack.now);
                keys.replies.push(vec![ack.reply]);
            }
        }
    }
    let mut tries = 0;
    let deleted = loop {
        tries += 1;
        match db.delete_acked(&keys).await {
            Err(e) if retryable(&e) && tries < RETRIES => {
                tracing::debug!(error = %e, "postgres ack batch retried");
                continue;
            }
            other => break other,
        }
    };
    match deleted {
        Ok(deleted) => {
            let mut acked = vec![false; keys.ids.len()];
            for (queue, id, delivery) in deleted {
                let Ok(queue) = QueueName::parse(&queue) else { continue };
                if let Some(&i) = index.get(&(queue, id, delivery)) {
                    acked[i] = true;
                }
            }
            for (replies, acked) in keys.replies.into_iter().zip(acked) {
                for (n, reply) in replies.into_iter().enumerate() {
                    // The caller may have gone: its ack counts all the same.
                    let _ = reply.send(Ok(acked && n == 0));
                }
            }
        }
        Err(e) => {
            let e = db_error(e);
            for reply in keys.replies.into_iter().flatten() {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

impl Db {
    /// The ack statement of a batch, committed without waiting for the WAL flush.
    /// Returns the deliveries deleted.
    async fn delete_acked(&self, keys: &AckKeys) -> Result<Vec<(String, i64, String)>, DbError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&self.sql.ack).await?;
        let queues: Vec<&str> = keys.queues.iter().map(|q| q.as_str()).collect();
        let params: [&(dyn ToSql + Sync); 4] = [&queues, &keys.ids, &keys.deliveries, &keys.nows];
        let (_, rows) = unflushed(&client, NO_SETTLE, client.query(&statement, &params)).await?;
        rows.iter().map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))).collect()
    }
}

/// Runs one batch of fetches: per queue, statements of up to [`MAX_FETCH`] messages,
/// all at once; each caller answered with its share.
pub(super) async fn fetch_batch(db: Arc<Db>, batch: Vec<Fetch>) {
    // Per group: the queue, the messages and the acks it asks for, its fetches.
    let mut groups: Vec<(QueueName, usize, usize, Vec<Fetch>)> = Vec::new();
    for fetch in batch {
        let open = groups.iter_mut().rev().find(|(queue, total, acks, _)| {
            *queue == fetch.queue && total + fetch.max <= MAX_FETCH && acks + fetch.acks.len() <= MAX_ACKS
        });
        match open {
            Some((_, total, acks, fetches)) => {
                *total += fetch.max;
                *acks += fetch.acks.len();
                fetches.push(fetch);
            }
            None => groups.push((fetch.queue.clone(), fetch.max, fetch.acks.len(), vec![fetch])),
        }
    }
    futures_util::future::join_all(groups.into_iter().map(|(queue, _, _, fetches)| fetch_group(&db, queue, fetches)))
        .await;
}

/// One statement for the fetches on one queue (and their acks).
async fn fetch_group(db: &Db, queue: QueueName, fetches: Vec<Fetch>) {
    let now = db.clock.now_ms();
    let total = fetches.iter().map(|f| f.max).sum();
    let (mut leases, mut nonces) = (Vec::with_capacity(total), Vec::with_capacity(total));
    let (mut ack_ids, mut ack_deliveries) = (Vec::new(), Vec::new());
    for f in &fetches {
        leases.extend(std::iter::repeat_n(after(now, f.visibility_ms), f.max));
        nonces.extend(f.nonces.iter().copied().chain(std::iter::repeat(0)).take(f.max));
        for (id, delivery) in &f.acks {
            ack_ids.push(*id);
            ack_deliveries.push(delivery.as_str());
        }
    }
    match db.fetch(&queue, now, (&leases, &nonces), (&ack_ids, &ack_deliveries)).await {
        Ok((taken, mut acked)) => {
            let mut taken = taken.into_iter().peekable();
            let mut end = 0;
            for f in fetches {
                end += f.max;
                let mut mine = Vec::new();
                while let Some((_, d)) = taken.next_if(|(order, _)| *order < end) {
                    mine.push(d);
                }
                // The same delivery named twice: the first names it done, as one by one.
                let acked = f.acks.into_iter().map(|key| acked.remove(&key)).collect();
                if f.reply.send(Ok(Fetched { deliveries: mine, acked })).is_err() {
                    // Its leases end on their own: the messages are delivered again then.
                    tracing::debug!(queue = %queue, "a fetch's caller left before its answer");
                }
            }
        }
        Err(e) => {
            for f in fetches {
                let _ = f.reply.send(Err(e.clone()));
            }
        }
    }
}
