//! The topic tables' SQL ([`Sql`], built once per schema) and the calls other than
//! append: `head`, `read`, `list` and `delete`, one statement each (delete: one short
//! transaction), and the sweep task that deletes dead fronts and dropped epochs in
//! batches. Retention (`first` of a topic) is computed inside each query; see the
//! crate doc. Called by `PgStore`; the append statement is here, run by `writer.rs`.

use std::sync::Arc;

use bytes::Bytes;
use herald_core::{Epoch, History, Kind, ListedTopic, Message, NewMessage, StoreError, TopicHead, TopicName};
use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::{Fail, PgError, Shared};

/// Rows one sweep statement deletes at most.
const SWEEP_BATCH: i64 = 10_000;
/// Topics one sweep query looks at.
const SWEEP_PAGE: i64 = 500;
/// Dropped epochs one sweep reclaims at most (the next sweep goes on).
const SWEEP_DROPPED: i64 = 100;

/// The first live offset of topic `t` at or after `lo`: within the count, younger than
/// the age limit, TTL not passed. `$max`, `$cut`, `$now` are parameter placeholders.
fn front(q: &str, max: &str, cut: &str, now: &str) -> String {
    format!(
        r#"(SELECT m."offset" FROM {q}.topic_messages m
            WHERE m.tid = t.tid AND m."offset" >= GREATEST(t.first_offset, t.next_offset - {max})
              AND m.ts > {cut} AND (m.expires_at IS NULL OR m.expires_at > {now})
            ORDER BY m."offset" LIMIT 1)"#
    )
}

/// Every statement of the topic tables and queue records, for one schema.
pub(crate) struct Sql {
    pub(crate) append: String,
    head: String,
    read: String,
    list: String,
    delete_ensure: String,
    delete_lock: String,
    delete_swap: String,
    identity: String,
    dropped: String,
    reclaim: String,
    forget: String,
    trim_page: String,
    trim: String,
    pub(crate) queue_append: String,
    pub(crate) queue_remove: String,
    pub(crate) queue_delivered: String,
    pub(crate) queue_heads: String,
    pub(crate) queue_records: String,
}

impl Sql {
    /// The statements for the schema `q` (quoted).
    pub(crate) fn new(q: &str) -> Self {
        Self {
            // $1 names (sorted), $2 messages per name, $3 the first epoch, $4 now;
            // per message: $5 its name's ordinal, $6 its place among that name's
            // messages, $7 kind, $8 TTL, $9 payload. Returns each name's epoch, next
            // offset and time: its messages got next - n .. next - 1 in $6 order.
            append: format!(
                r#"WITH b AS (
                    SELECT * FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS b(name, n, i)
                ), up AS (
                    INSERT INTO {q}.topics AS t (name, tid, epoch, next_offset, first_offset, last_ts)
                    SELECT b.name, nextval('{q}.topic_ids'), $3, 1 + b.n, 1, $4 FROM b ORDER BY b.i
                    ON CONFLICT (name) DO UPDATE
                        SET next_offset = t.next_offset + excluded.next_offset - 1,
                            last_ts = GREATEST(t.last_ts, excluded.last_ts)
                    RETURNING t.name, t.tid, t.epoch, t.next_offset, t.last_ts
                ), ins AS (
                    INSERT INTO {q}.topic_messages (tid, "offset", ts, kind, expires_at, payload)
                    SELECT up.tid, up.next_offset - b.n + m.k, up.last_ts, m.kind,
                           CASE WHEN m.ttl IS NULL THEN NULL
                                WHEN m.ttl > 9223372036854775807 - up.last_ts THEN 9223372036854775807
                                ELSE up.last_ts + m.ttl END,
                           m.payload
                    FROM unnest($5::bigint[], $6::bigint[], $7::smallint[], $8::bigint[], $9::bytea[])
                        AS m(i, k, kind, ttl, payload)
                    JOIN b ON b.i = m.i
                    JOIN up ON up.name = b.name
                )
                SELECT name, epoch, next_offset, last_ts FROM up"#
            ),
            // $1 name, $2 max messages, $3 cut, $4 now.
            head: format!(
                "SELECT t.epoch, t.next_offset, {} FROM {q}.topics t WHERE t.name = $1",
                front(q, "$2", "$3", "$4")
            ),
            // $1 name, $2 from, $3 until, $4 max messages, $5 cut, $6 now, $7 limit.
            read: format!(
                r#"SELECT t.epoch, m."offset", m.ts, m.kind, m.expires_at, m.payload
                FROM {q}.topics t
                LEFT JOIN LATERAL (
                    SELECT m."offset", m.ts, m.kind, m.expires_at, m.payload FROM {q}.topic_messages m
                    WHERE m.tid = t.tid AND m."offset" >= GREATEST($2, t.first_offset, t.next_offset - $4)
                      AND m."offset" <= $3 AND m.ts > $5 AND (m.expires_at IS NULL OR m.expires_at > $6)
                    ORDER BY m."offset" LIMIT $7
                ) m ON true
                WHERE t.name = $1
                ORDER BY m."offset""#
            ),
            // $1 lowest name, $2 above every name wanted, $3 after, $4 max messages,
            // $5 cut, $6 now, $7 limit. Byte order (COLLATE "C"): [$1, $2) is a prefix.
            list: format!(
                "SELECT t.name, t.next_offset - 1 FROM {q}.topics t
                WHERE t.name >= $1 AND t.name < $2 AND t.name > $3 AND {} IS NOT NULL
                ORDER BY t.name LIMIT $7",
                front(q, "$4", "$5", "$6")
            ),
            // A delete: the row exists (a fresh topic with its first epoch), is locked,
            // its tid goes to topic_dropped and it starts over with a new tid and epoch.
            delete_ensure: format!(
                "INSERT INTO {q}.topics (name, tid, epoch, next_offset, first_offset, last_ts)
                VALUES ($1, nextval('{q}.topic_ids'), $2, 1, 1, 0) ON CONFLICT (name) DO NOTHING"
            ),
            delete_lock: format!("SELECT tid FROM {q}.topics WHERE name = $1 FOR UPDATE"),
            delete_swap: format!(
                "WITH gone AS (INSERT INTO {q}.topic_dropped (tid) VALUES ($2) ON CONFLICT DO NOTHING),
                n AS (SELECT nextval('{q}.topic_ids') AS tid)
                UPDATE {q}.topics t SET tid = n.tid, epoch = $3::text || '-' || n.tid, next_offset = 1, first_offset = 1
                FROM n WHERE t.name = $1
                RETURNING t.epoch"
            ),
            identity: format!("SELECT value FROM {q}.store_meta WHERE key = 'identity'"),
            dropped: format!("SELECT tid FROM {q}.topic_dropped ORDER BY tid LIMIT {SWEEP_DROPPED}"),
            // A dropped epoch's rows are consecutive offsets: the first SWEEP_BATCH of them.
            reclaim: format!(
                r#"DELETE FROM {q}.topic_messages WHERE tid = $1 AND "offset" < (
                    SELECT "offset" FROM {q}.topic_messages WHERE tid = $1 ORDER BY "offset" LIMIT 1
                ) + {SWEEP_BATCH}"#
            ),
            forget: format!("DELETE FROM {q}.topic_dropped WHERE tid = $1"),
            // $1 after (name), $2 max messages, $3 cut, $4 now: topics holding rows, with
            // the offset their live part starts at (next_offset when none is live).
            trim_page: format!(
                "SELECT t.name, t.tid, t.first_offset, COALESCE({}, t.next_offset) FROM {q}.topics t
                WHERE t.name > $1 AND t.first_offset < t.next_offset
                ORDER BY t.name LIMIT {SWEEP_PAGE}",
                front(q, "$2", "$3", "$4")
            ),
            // $1 tid, $2 from, $3 to (exclusive): delete and move the front, if the tid
            // is still the topic's (else the rows are a dropped epoch's, deleted alike).
            trim: format!(
                r#"WITH gone AS (
                    DELETE FROM {q}.topic_messages WHERE tid = $1 AND "offset" >= $2 AND "offset" < $3 RETURNING 1
                ), moved AS (
                    UPDATE {q}.topics SET first_offset = $3 WHERE tid = $1 AND first_offset < $3
                )
                SELECT count(*) FROM gone"#
            ),
            // $1 queue, per record $2 id, $3 kind, $4 payload, $5 ts, $6 ready_at,
            // $7 expires_at; $8 the queue's next id.
            queue_append: format!(
                "WITH ins AS (
                    INSERT INTO {q}.store_queue_records (queue, id, kind, payload, ts, ready_at, expires_at)
                    SELECT $1, r.* FROM unnest($2::bigint[], $3::smallint[], $4::bytea[], $5::bigint[],
                                               $6::bigint[], $7::bigint[]) AS r
                    ON CONFLICT (queue, id) DO UPDATE SET kind = excluded.kind, payload = excluded.payload,
                        ts = excluded.ts, ready_at = excluded.ready_at, expires_at = excluded.expires_at,
                        attempts = 0
                )
                INSERT INTO {q}.store_queues AS s (queue, next_id) VALUES ($1, $8)
                ON CONFLICT (queue) DO UPDATE SET next_id = GREATEST(s.next_id, excluded.next_id)"
            ),
            queue_remove: format!("DELETE FROM {q}.store_queue_records WHERE queue = $1 AND id = ANY($2)"),
            queue_delivered: format!(
                "UPDATE {q}.store_queue_records r SET attempts = a.n
                FROM unnest($2::bigint[], $3::integer[]) AS a(id, n)
                WHERE r.queue = $1 AND r.id = a.id"
            ),
            queue_heads: format!("SELECT queue, next_id FROM {q}.store_queues"),
            queue_records: format!(
                "SELECT queue, id, kind, payload, ts, ready_at, expires_at, attempts
                FROM {q}.store_queue_records ORDER BY queue, id"
            ),
        }
    }
}

/// The schema's identity (written by the first migration).
pub(crate) async fn identity(client: &Client, sql: &Sql) -> Result<String, PgError> {
    let row = client.query_opt(&sql.identity, &[]).await.map_err(|e| PgError::Database(e.to_string()))?;
    row.and_then(|r| r.get::<_, Option<String>>(0))
        .ok_or_else(|| PgError::Damaged("store_meta has no identity".to_owned()))
}

/// The stored code of a kind.
pub(crate) fn kind_code(kind: Kind) -> i16 {
    match kind {
        Kind::Json => 0,
        Kind::Text => 1,
        Kind::Binary => 2,
    }
}

/// The kind of a stored code.
pub(crate) fn kind_of(code: i16) -> Option<Kind> {
    match code {
        0 => Some(Kind::Json),
        1 => Some(Kind::Text),
        2 => Some(Kind::Binary),
        _ => None,
    }
}

/// A bigint read back as an offset, time or id (never negative when written by us).
pub(crate) fn unsigned(v: i64, what: &str) -> Result<u64, Fail> {
    u64::try_from(v).map_err(|_| Fail::Damaged(format!("{what} {v}")))
}

pub(crate) async fn head(
    shared: &Shared,
    topic: &TopicName,
    (now, max, cut): (i64, i64, i64),
) -> Result<TopicHead, StoreError> {
    let row = shared
        .db("head", async {
            let client = shared.pool.get().await?;
            let stmt = client.prepare_cached(&shared.sql.head).await?;
            Ok(client.query_opt(&stmt, &[&topic.as_str(), &max, &cut, &now]).await?)
        })
        .await?;
    let Some(row) = row else {
        return Ok(TopicHead { epoch: shared.first_epoch.clone(), first: 0, last: 0, next: 1, retained: 0 });
    };
    let decoded = (|| {
        let epoch: String = row.try_get(0)?;
        let next = unsigned(row.try_get(1)?, "next offset")?;
        let first: Option<i64> = row.try_get(2)?;
        Ok::<_, Fail>((epoch, next, first))
    })();
    let (epoch, next, first) = decoded.map_err(|e| damaged("head", &e))?;
    let epoch: Epoch = Arc::from(epoch);
    Ok(match first {
        Some(first) => {
            let first = unsigned(first, "offset").map_err(|e| damaged("head", &e))?;
            TopicHead { epoch, first, last: next.saturating_sub(1), next, retained: next.saturating_sub(first) }
        }
        None => TopicHead { epoch, first: 0, last: 0, next, retained: 0 },
    })
}

fn damaged(what: &str, e: &Fail) -> StoreError {
    StoreError::Unavailable(format!("postgres {what}: {}", e.describe()))
}

pub(crate) async fn read(
    shared: &Shared,
    topic: &TopicName,
    from: u64,
    until: u64,
    limit: usize,
    (now, max, cut): (i64, i64, i64),
) -> Result<History, StoreError> {
    let (from, until, limit) = (crate::clamp(from), crate::clamp(until), crate::clamp(limit as u64));
    let rows = shared
        .db("read", async {
            let client = shared.pool.get().await?;
            let stmt = client.prepare_cached(&shared.sql.read).await?;
            Ok(client.query(&stmt, &[&topic.as_str(), &from, &until, &max, &cut, &now, &limit]).await?)
        })
        .await?;
    let Some(first) = rows.first() else {
        return Ok(History { epoch: shared.first_epoch.clone(), messages: Vec::new() });
    };
    let epoch: Epoch = Arc::from(first.try_get::<_, String>(0).map_err(|e| damaged("read", &Fail::Query(e)))?);
    let mut messages = Vec::with_capacity(rows.len());
    for row in &rows {
        let decoded = (|| {
            let Some(offset) = row.try_get::<_, Option<i64>>(1)? else { return Ok(None) };
            let ts = unsigned(row.try_get(2)?, "ts")?;
            let code: i16 = row.try_get(3)?;
            let kind = kind_of(code).ok_or_else(|| Fail::Damaged(format!("kind {code} in {topic}")))?;
            let expires: Option<i64> = row.try_get(4)?;
            let payload: Vec<u8> = row.try_get(5)?;
            let ttl_ms = expires.map(|e| u64::try_from(e).unwrap_or(0).saturating_sub(ts));
            let new = NewMessage { kind, payload: Bytes::from(payload), ttl_ms };
            Ok::<_, Fail>(Some(Arc::new(Message::new(topic.clone(), unsigned(offset, "offset")?, ts, new))))
        })();
        // A topic without live rows comes back as one row of its epoch and NULLs.
        if let Some(message) = decoded.map_err(|e| damaged("read", &e))? {
            messages.push(message);
        }
    }
    Ok(History { epoch, messages })
}

/// The byte range `[low, high)` of names starting with `prefix` (names are ASCII
/// below DEL), or none when no name can start with it.
fn prefix_range(prefix: &str) -> Option<(String, String)> {
    if prefix.is_empty() {
        return Some((String::new(), "\u{7f}".to_owned()));
    }
    let last = prefix.chars().last()?;
    if !prefix.chars().all(|c| c.is_ascii_graphic()) {
        return None;
    }
    let next = char::from(last as u8 + 1);
    Some((prefix.to_owned(), format!("{}{next}", &prefix[..prefix.len() - 1])))
}

pub(crate) async fn list(
    shared: &Shared,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    (now, max, cut): (i64, i64, i64),
) -> Result<Vec<ListedTopic>, StoreError> {
    let Some((low, high)) = prefix_range(prefix) else { return Ok(Vec::new()) };
    let after = after.unwrap_or("");
    let limit = crate::clamp(limit as u64);
    let rows = shared
        .db("list", async {
            let client = shared.pool.get().await?;
            let stmt = client.prepare_cached(&shared.sql.list).await?;
            Ok(client.query(&stmt, &[&low, &high, &after, &max, &cut, &now, &limit]).await?)
        })
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let decoded = (|| {
            let name: String = row.try_get(0)?;
            let last = unsigned(row.try_get(1)?, "offset")?;
            Ok::<_, Fail>((name, last))
        })();
        let (name, last) = decoded.map_err(|e| damaged("list", &e))?;
        // A name that no longer parses (none is stored otherwise) is skipped.
        if let Ok(topic) = TopicName::parse(&name) {
            out.push(ListedTopic { topic, last });
        }
    }
    Ok(out)
}

pub(crate) async fn delete(shared: &Shared, topic: &TopicName) -> Result<Epoch, StoreError> {
    let epoch = shared
        .db("delete", async {
            let mut client = shared.pool.get().await?;
            let ensure = client.prepare_cached(&shared.sql.delete_ensure).await?;
            let lock = client.prepare_cached(&shared.sql.delete_lock).await?;
            let swap = client.prepare_cached(&shared.sql.delete_swap).await?;
            let tx = client.transaction().await?;
            tx.execute(&ensure, &[&topic.as_str(), &&*shared.first_epoch]).await?;
            let old: i64 = tx.query_one(&lock, &[&topic.as_str()]).await?.try_get(0)?;
            let epoch: String = tx.query_one(&swap, &[&topic.as_str(), &old, &shared.identity]).await?.try_get(0)?;
            tx.commit().await?;
            Ok(epoch)
        })
        .await?;
    Ok(Arc::from(epoch))
}

/// Runs a sweep each time one is asked for, until the store is dropped.
pub(crate) async fn sweeper(shared: Arc<Shared>, mut asked: mpsc::Receiver<()>) {
    while asked.recv().await.is_some() {
        if let Err(e) = sweep(&shared).await {
            tracing::warn!(error = %e, "PostgreSQL store sweep stopped; the next one goes on");
        }
    }
}

/// Deletes the histories of deleted epochs, then every topic's dead front, each in
/// statements of at most [`SWEEP_BATCH`] rows (each its own transaction); returns the
/// message rows deleted.
pub(crate) async fn sweep(shared: &Shared) -> Result<u64, StoreError> {
    let mut deleted = 0;
    let sql = &shared.sql;
    let dropped = shared
        .db("sweep", async {
            let client = shared.pool.get().await?;
            let rows = client.query(&sql.dropped, &[]).await?;
            rows.iter().map(|r| r.try_get::<_, i64>(0).map_err(Fail::Query)).collect::<Result<Vec<_>, _>>()
        })
        .await?;
    for tid in dropped {
        loop {
            let rows = shared
                .db("sweep", async {
                    let client = shared.pool.get().await?;
                    Ok(client.execute(&sql.reclaim, &[&tid]).await?)
                })
                .await?;
            if rows == 0 {
                break;
            }
            deleted += rows;
        }
        shared
            .db("sweep", async {
                let client = shared.pool.get().await?;
                Ok(client.execute(&sql.forget, &[&tid]).await?)
            })
            .await?;
    }
    let mut after = String::new();
    loop {
        // Bounds per page: a long sweep trims by the time it reads each page.
        let (now, max, cut) = shared.bounds();
        let page = shared
            .db("sweep", async {
                let client = shared.pool.get().await?;
                let stmt = client.prepare_cached(&sql.trim_page).await?;
                let rows = client.query(&stmt, &[&after, &max, &cut, &now]).await?;
                rows.iter()
                    .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?, r.try_get(2)?, r.try_get(3)?)))
                    .collect::<Result<Vec<(String, i64, i64, i64)>, Fail>>()
            })
            .await?;
        let Some((last, ..)) = page.last() else { return Ok(deleted) };
        after = last.clone();
        let full = page.len() as i64 == SWEEP_PAGE;
        for (_, tid, mut from, front) in page {
            while from < front {
                let to = front.min(from + SWEEP_BATCH);
                let rows: i64 = shared
                    .db("sweep", async {
                        let client = shared.pool.get().await?;
                        let stmt = client.prepare_cached(&sql.trim).await?;
                        Ok(client.query_one(&stmt, &[&tid, &from, &to]).await?.try_get(0)?)
                    })
                    .await?;
                deleted += rows as u64;
                from = to;
            }
        }
        if !full {
            return Ok(deleted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_become_byte_ranges() {
        assert_eq!(prefix_range("conf.read."), Some(("conf.read.".to_owned(), "conf.read/".to_owned())));
        assert_eq!(prefix_range("a"), Some(("a".to_owned(), "b".to_owned())));
        assert_eq!(prefix_range(""), Some((String::new(), "\u{7f}".to_owned())));
        assert_eq!(prefix_range("é"), None);
        assert_eq!(prefix_range("a b"), None);
    }

    #[test]
    fn kinds_round_trip() {
        for kind in [Kind::Json, Kind::Text, Kind::Binary] {
            assert_eq!(kind_of(kind_code(kind)), Some(kind));
        }
        assert_eq!(kind_of(7), None);
    }
}
