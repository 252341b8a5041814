-- Topic histories and the queue records of the `Store` trait (crates/store-postgres).
-- `{schema}` is replaced by the quoted schema name. Names are COLLATE "C": listing
-- sorts by bytes, as the broker does, and a LIKE prefix uses the index.

-- This schema's identity, random: the first epoch of every topic is '<identity>-0',
-- a deleted topic's next one '<identity>-<tid>' (tids are never reused), so an epoch
-- is never reused, even by a schema dropped and created again.
CREATE TABLE {schema}.store_meta (
    key text COLLATE "C" PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO {schema}.store_meta (key, value)
VALUES ('identity', substr(md5(random()::text || clock_timestamp()::text), 1, 12));

-- Identifies one epoch of one topic in topic_messages; a delete gives the topic a new one.
CREATE SEQUENCE {schema}.topic_ids;

-- One row per topic ever published or deleted. Its messages are the rows of
-- topic_messages with its tid and offsets from first_offset to next_offset - 1, every
-- one of them present (retention only removes from the front).
CREATE TABLE {schema}.topics (
    name text COLLATE "C" PRIMARY KEY,
    tid bigint NOT NULL UNIQUE,
    epoch text NOT NULL,
    -- The offset the next message gets.
    next_offset bigint NOT NULL,
    -- Offsets below were trimmed by the sweep (reads also skip what is due).
    first_offset bigint NOT NULL,
    -- The newest timestamp given out (ms since the Unix epoch), so that times never go back.
    last_ts bigint NOT NULL
) WITH (
    -- Updated by every group commit: room on the page for HOT updates, vacuumed often.
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000
);

CREATE TABLE {schema}.topic_messages (
    tid bigint NOT NULL,
    "offset" bigint NOT NULL,
    ts bigint NOT NULL,
    -- 0 json, 1 text, 2 binary.
    kind smallint NOT NULL,
    expires_at bigint,
    payload bytea NOT NULL,
    PRIMARY KEY (tid, "offset")
) WITH (
    -- Rows leave from each topic's front in batches: vacuum after 1% of the table (not
    -- the default 20%) so freed pages are reused before the table grows, and mark
    -- pages all-visible soon after inserts (index-only scans, cheaper freezing).
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.05
);

-- Epochs whose messages the sweep still has to delete (a delete only swaps the tid).
CREATE TABLE {schema}.topic_dropped (
    tid bigint PRIMARY KEY
);

-- Queue records of one node's queue engine (`Store::queue_*`).
CREATE TABLE {schema}.store_queues (
    queue text COLLATE "C" PRIMARY KEY,
    -- Above every id ever stored in the queue.
    next_id bigint NOT NULL
);

CREATE TABLE {schema}.store_queue_records (
    queue text COLLATE "C" NOT NULL,
    id bigint NOT NULL,
    kind smallint NOT NULL,
    payload bytea NOT NULL,
    ts bigint NOT NULL,
    ready_at bigint NOT NULL,
    expires_at bigint,
    -- Deliveries so far (0: none recorded).
    attempts integer NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, id)
) WITH (
    autovacuum_vacuum_scale_factor = 0.02
);
