-- Work queues every node shares (src/queues.rs, `PgQueues`). All times are milliseconds
-- since the Unix epoch from the calling node's clock, passed as parameters: the
-- database's now() is never used, so leases, delays and TTLs follow the broker's clock.

-- The queue registry: one row per queue from its first enqueue on (a dead-letter
-- queue's from its first dead letter), never deleted, so `list` shows emptied queues.
CREATE TABLE {schema}.queues (
    -- Byte order ("C"), as `list` pages by name.
    name text COLLATE "C" PRIMARY KEY,
    -- The id the queue's next message gets: ids are consecutive per queue, never reused.
    next_id bigint NOT NULL DEFAULT 1,
    -- An upper bound of the messages the queue holds (every insert adds to it, removals
    -- do not take from it): an enqueue counts the queue's messages only when this bound
    -- says it may be full, and stores the count found.
    bound bigint NOT NULL DEFAULT 0
);

-- One row per live message. Its state at time `now` follows from its columns:
--   ready      dead_at IS NULL AND visible_at <= now (never leased, requeued, its delay
--              or lease ended); fetched oldest first by (visible_at, id)
--   delayed    delivery IS NULL AND visible_at > now
--   in flight  delivery IS NOT NULL AND visible_at > now (visible_at is the lease end)
--   dead       dead_at <= now: its last allowed lease ended (or it was requeued) at
--              dead_at; moved to the dead-letter queue by the next operation that looks
--              (`settle`), as a new message dated dead_at
--   expired    expires_at <= now (before dead_at, if any): dropped, never delivered
CREATE TABLE {schema}.queue_messages (
    queue text COLLATE "C" NOT NULL,
    id bigint NOT NULL,
    -- 0 json, 1 text, 2 binary.
    kind smallint NOT NULL,
    payload bytea NOT NULL,
    -- Enqueue time (dead-letter time in a dead-letter queue).
    ts bigint NOT NULL,
    -- When it is (or was) ready: enqueue time plus delay, requeue time plus delay, or
    -- the end of its current lease.
    visible_at bigint NOT NULL,
    expires_at bigint,
    -- Deliveries so far.
    attempts integer NOT NULL DEFAULT 0,
    -- The current (or last) delivery id; NULL once requeued or never fetched.
    delivery text,
    -- Set while the message is leased on its last allowed attempt (= the lease end), or
    -- to the requeue time when that delivery is requeued: then it is dead, not ready.
    dead_at bigint,
    PRIMARY KEY (queue, id)
) WITH (
    -- Every fetch updates and every ack deletes: vacuum often, so that the head of the
    -- ready index does not fill with dead entries.
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02
);

-- Fetch: the oldest ready message is the first entry of its queue; leased and delayed
-- messages sit past `now` in the same order, so their next end is the first entry after
-- it. A fetch reads only the entries it takes (and those other fetches hold).
CREATE INDEX queue_messages_ready ON {schema}.queue_messages (queue, visible_at, id) WHERE dead_at IS NULL;
-- Messages whose TTL passed, dropped by fetch and settle.
CREATE INDEX queue_messages_expiry ON {schema}.queue_messages (queue, expires_at) WHERE expires_at IS NOT NULL;
-- Last leases, whose end moves the message to the dead-letter queue.
CREATE INDEX queue_messages_dead ON {schema}.queue_messages (queue, dead_at) WHERE dead_at IS NOT NULL;
