//! The queue records of one node's queue engine (`Store::queue_*`): read whole at
//! connect into a [`LiveQueue`] mirror per queue (`queue_load` is synchronous), then
//! kept by one task that applies appends, removals and attempt counts in the order they
//! were issued, so a removal never overtakes the append it removes. Kept simple: the
//! server's shared queues use their own service; this is the single-node path.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use herald_core::{LiveQueue, QueueName, QueueRecord, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;

use crate::topics::{kind_code, kind_of, unsigned, Sql};
use crate::{clamp, lock, Fail, PgError, Shared};

/// A queue write, applied by [`run`] in the order issued.
pub(crate) enum QueueOp {
    Append { queue: QueueName, records: Vec<QueueRecord>, done: oneshot::Sender<Result<(), StoreError>> },
    Remove { queue: QueueName, ids: Vec<u64> },
    Delivered { queue: QueueName, attempts: Vec<(u64, u32)> },
    Flush(oneshot::Sender<()>),
}

/// Every queue's live records, attempts and next id.
pub(crate) async fn load(client: &Client, sql: &Sql) -> Result<BTreeMap<QueueName, LiveQueue>, PgError> {
    let db =
        |e: tokio_postgres::Error| PgError::Database(format!("loading queue records: {}", crate::schema::describe(&e)));
    let damaged = |e: Fail| PgError::Damaged(e.describe());
    let mut out: BTreeMap<QueueName, LiveQueue> = BTreeMap::new();
    for row in client.query(&sql.queue_heads, &[]).await.map_err(db)? {
        let name: String = row.try_get(0).map_err(db)?;
        let next = unsigned(row.try_get(1).map_err(db)?, "next id").map_err(damaged)?;
        let Ok(queue) = QueueName::parse(&name) else { continue };
        out.insert(queue, LiveQueue { next_id: next, ..LiveQueue::default() });
    }
    for row in client.query(&sql.queue_records, &[]).await.map_err(db)? {
        let decoded = (|| {
            let name: String = row.try_get(0)?;
            let id = unsigned(row.try_get(1)?, "id")?;
            let code: i16 = row.try_get(2)?;
            let kind = kind_of(code).ok_or_else(|| Fail::Damaged(format!("kind {code} of record {id} in {name}")))?;
            let payload: Vec<u8> = row.try_get(3)?;
            let ts = unsigned(row.try_get(4)?, "ts")?;
            let ready_at = unsigned(row.try_get(5)?, "ready_at")?;
            let expires_at = row.try_get::<_, Option<i64>>(6)?.map(|e| unsigned(e, "expires_at")).transpose()?;
            let attempts: i32 = row.try_get(7)?;
            let record = QueueRecord { id, kind, payload: Bytes::from(payload), ts, ready_at, expires_at };
            Ok::<_, Fail>((name, record, attempts))
        })();
        let (name, record, attempts) = decoded.map_err(damaged)?;
        let Ok(queue) = QueueName::parse(&name) else { continue };
        let mirror = out.entry(queue).or_insert_with(|| LiveQueue { next_id: 1, ..LiveQueue::default() });
        let id = record.id;
        mirror.enqueued([record]);
        if attempts > 0 {
            mirror.delivered([(id, attempts as u32)]);
        }
    }
    Ok(out)
}

/// Applies queue writes one at a time, in the order issued; ends with the last handle.
pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<QueueOp>) {
    while let Some(op) = rx.recv().await {
        apply(&shared, op).await;
    }
}

/// Applies a write to the mirror (what `queue_load` answers).
pub(crate) fn mirror(shared: &Shared, op: &QueueOp) {
    let mut queues = lock(&shared.queues);
    match op {
        QueueOp::Append { queue, records, .. } => queues
            .entry(queue.clone())
            .or_insert_with(|| LiveQueue { next_id: 1, ..LiveQueue::default() })
            .enqueued(records.iter().cloned()),
        QueueOp::Remove { queue, ids } => {
            if let Some(q) = queues.get_mut(queue) {
                q.removed(ids.iter().copied());
            }
        }
        QueueOp::Delivered { queue, attempts } => {
            if let Some(q) = queues.get_mut(queue) {
                q.delivered(attempts.iter().copied());
            }
        }
        QueueOp::Flush(_) => {}
    }
}

async fn apply(shared: &Shared, op: QueueOp) {
    let sql = &shared.sql;
    match op {
        QueueOp::Append { queue, records, done } => {
            let ids: Vec<i64> = records.iter().map(|r| clamp(r.id)).collect();
            let kinds: Vec<i16> = records.iter().map(|r| kind_code(r.kind)).collect();
            let payloads: Vec<&[u8]> = records.iter().map(|r| r.payload.as_ref()).collect();
            let ts: Vec<i64> = records.iter().map(|r| clamp(r.ts)).collect();
            let ready: Vec<i64> = records.iter().map(|r| clamp(r.ready_at)).collect();
            let expires: Vec<Option<i64>> = records.iter().map(|r| r.expires_at.map(clamp)).collect();
            let next = ids.iter().copied().max().map_or(1, |m| m.saturating_add(1));
            let result = shared
                .db("queue append", async {
                    let client = shared.pool.get().await?;
                    let stmt = client.prepare_cached(&sql.queue_append).await?;
                    client
                        .execute(&stmt, &[&queue.as_str(), &ids, &kinds, &payloads, &ts, &ready, &expires, &next])
                        .await?;
                    Ok(())
                })
                .await;
            drop(payloads);
            let op = QueueOp::Append { queue, records, done };
            if result.is_ok() {
                mirror(shared, &op);
            }
            if let QueueOp::Append { done, .. } = op {
                let _ = done.send(result);
            }
        }
        QueueOp::Remove { queue, ids } => {
            let keys: Vec<i64> = ids.iter().map(|&id| clamp(id)).collect();
            let result = shared
                .db("queue remove", async {
                    let client = shared.pool.get().await?;
                    let stmt = client.prepare_cached(&sql.queue_remove).await?;
                    Ok(client.execute(&stmt, &[&queue.as_str(), &keys]).await?)
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(queue = queue.as_str(), error = %e, "queue removal not persisted");
            }
            mirror(shared, &QueueOp::Remove { queue, ids });
        }
        QueueOp::Delivered { queue, attempts } => {
            let ids: Vec<i64> = attempts.iter().map(|a| clamp(a.0)).collect();
            let counts: Vec<i32> = attempts.iter().map(|a| i32::try_from(a.1).unwrap_or(i32::MAX)).collect();
            let result = shared
                .db("queue attempts", async {
                    let client = shared.pool.get().await?;
                    let stmt = client.prepare_cached(&sql.queue_delivered).await?;
                    Ok(client.execute(&stmt, &[&queue.as_str(), &ids, &counts]).await?)
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(queue = queue.as_str(), error = %e, "queue attempts not persisted");
            }
            mirror(shared, &QueueOp::Delivered { queue, attempts });
        }
        QueueOp::Flush(done) => {
            let _ = done.send(());
        }
    }
}
