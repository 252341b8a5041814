//! The SQL of [`super::PgQueues`], one statement per operation (see
//! `migrations/002_queues.sql` for the tables and what a message's columns mean), with
//! `{s}` standing for the quoted schema until [`Sql::new`] fills it in. Every time is a
//! parameter: the calling node's clock, never the database's `now()`.

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

/// Takes up to $3 ready messages, oldest first, leasing the n-th until `$4[n]`; drops
/// those whose TTL passed. $1 queue, $2 now, $5 the attempt that is the last one (its
/// lease end is also its dead-letter time), $6 one nonce per message. The fetch
/// combiner serves several callers with one: the n-th message goes to the caller whose
/// share of 1..$3 holds n, leased for that caller's visibility.
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
visible_at = ($4::bigint[])[p.rn],
delivery = to_hex(m.id) || '-' || (m.attempts + 1) || '-' || to_hex(($6::bigint[])[p.rn]),
dead_at = CASE WHEN m.attempts + 1 >= $5 THEN ($4::bigint[])[p.rn] END
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

/// Acks many deliveries at once (the ack batcher): deletes each message whose current
/// lease is the one named, at that ack's time. $1 queues, $2 ids, $3 deliveries, $4
/// times (of the acks, one each). Returns the deliveries it deleted.
pub const ACK: &str = "
DELETE FROM {s}.queue_messages m
USING unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[]) AS u(queue, id, delivery, now)
WHERE m.queue = u.queue AND m.id = u.id AND m.delivery = u.delivery AND m.visible_at > u.now
    AND (m.expires_at IS NULL OR m.expires_at > u.now)
RETURNING m.queue, m.id, m.delivery";

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

/// The statements of one schema.
pub(super) struct Sql {
    pub(super) enqueue: String,
    pub(super) lock_queue: String,
    pub(super) lock_existing: String,
    pub(super) set_bound: String,
    pub(super) count: String,
    pub(super) settle: String,
    pub(super) fetch: String,
    pub(super) next_due: String,
    pub(super) ack: String,
    pub(super) requeue: String,
    pub(super) extend: String,
    pub(super) stats: String,
    pub(super) purge: String,
    pub(super) redrive: String,
    pub(super) list: String,
}

impl Sql {
    pub(super) fn new(schema: &str) -> Self {
        let quoted = format!("\"{}\"", schema.replace('"', "\"\""));
        let s = |text: &str| text.replace("{s}", &quoted);
        Self {
            enqueue: s(ENQUEUE),
            lock_queue: s(LOCK_QUEUE),
            lock_existing: s(LOCK_EXISTING),
            set_bound: s(SET_BOUND),
            count: s(COUNT),
            settle: s(SETTLE),
            fetch: s(FETCH),
            next_due: s(NEXT_DUE),
            ack: s(ACK),
            requeue: s(&requeue()),
            extend: s(&extend()),
            stats: s(STATS),
            purge: s(PURGE),
            redrive: s(REDRIVE),
            list: s(LIST),
        }
    }
}
