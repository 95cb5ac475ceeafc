-- The whole current schema of kombu-pg in one file, as a newcomer should read it: every
-- table, index, sequence and function as the migrations leave them, with the live
-- definition of each function.  {schema} is the quoted schema identifier.
--
-- Installs and upgrades run the numbered files in migrations/ (kombu_pg/store/migrations.py),
-- never this file: it is the reference, and tests/test_schema.py fails when it differs
-- from what the migrations build.  A change to the schema is a new migration AND the same
-- change here, in one commit (CONTRIBUTING.md).  The migrations keep the history: why a
-- function changed is told at the top of the migration that changed it.
--
-- Column order is the migrations' order (a column added by ALTER TABLE comes last), since
-- row types and SELECT * depend on it.

-- Applied migrations, one row each; created by migrations.py before the first migration.
CREATE TABLE {schema}.schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);


-- ---------------------------------------------------------------------------------------
-- Broker: queues, exchanges, bindings, consumers, messages (0001, 0004, 0005, 0010)
-- ---------------------------------------------------------------------------------------

CREATE TABLE {schema}.queues (
    name           text PRIMARY KEY,
    durable        boolean NOT NULL DEFAULT true,
    exclusive      boolean NOT NULL DEFAULT false,
    auto_delete    boolean NOT NULL DEFAULT false,
    message_ttl_ms bigint CHECK (message_ttl_ms >= 0),
    expires_ms     bigint CHECK (expires_ms > 0),
    max_priority   smallint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_used_at   timestamptz NOT NULL DEFAULT now(),
    -- The consumer whose session declared an exclusive or auto-delete queue (NULL when
    -- that session is gone, or for other queues); its foreign key follows consumers.
    owner          integer
);

CREATE INDEX queues_expiring_idx ON {schema}.queues (last_used_at) WHERE expires_ms IS NOT NULL;
CREATE INDEX queues_owner_idx ON {schema}.queues (owner) WHERE owner IS NOT NULL;

CREATE TABLE {schema}.exchanges (
    name        text PRIMARY KEY,
    type        text NOT NULL CHECK (type IN ('direct', 'topic', 'fanout')),
    durable     boolean NOT NULL DEFAULT true,
    auto_delete boolean NOT NULL DEFAULT false
);

CREATE TABLE {schema}.bindings (
    exchange    text NOT NULL,
    queue       text NOT NULL REFERENCES {schema}.queues (name) ON DELETE CASCADE,
    routing_key text NOT NULL DEFAULT '',
    -- POSIX regex for topic bindings (Kombu's key_to_pattern), NULL otherwise.
    pattern     text,
    PRIMARY KEY (exchange, queue, routing_key)
);

CREATE INDEX bindings_queue_idx ON {schema}.bindings (queue);

-- Consumers: one row per claiming session.  The row's owner holds the session-level
-- advisory lock (namespace, id); a free lock means the owner is gone.
CREATE SEQUENCE {schema}.consumer_ids AS integer CYCLE;

CREATE TABLE {schema}.consumers (
    id          integer PRIMARY KEY,
    hostname    text NOT NULL,
    pid         integer NOT NULL,
    backend_pid integer NOT NULL DEFAULT pg_backend_pid(),
    started_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE {schema}.queues
    ADD FOREIGN KEY (owner) REFERENCES {schema}.consumers (id) ON DELETE SET NULL;

-- Consumers (registered sessions) consuming a queue: a queue is in use (x-expires) while
-- a row names it.  A row goes with its consumer (clean close or recovery finding the
-- session dead) and with its queue.
CREATE TABLE {schema}.queue_consumers (
    queue    text NOT NULL REFERENCES {schema}.queues (name) ON DELETE CASCADE,
    consumer integer NOT NULL REFERENCES {schema}.consumers (id) ON DELETE CASCADE,
    PRIMARY KEY (queue, consumer)
);

CREATE INDEX queue_consumers_consumer_idx ON {schema}.queue_consumers (consumer);

-- RabbitMQ's x-expires counts from the moment a queue lost its last consumer: whichever
-- way a consumer row goes, the queue's clock restarts then.
CREATE FUNCTION {schema}.queue_consumers_left() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {schema}.queues q SET last_used_at = now()
    FROM (SELECT DISTINCT queue FROM gone) g
    WHERE q.name = g.queue AND q.expires_ms IS NOT NULL;
    RETURN NULL;
END
$$;

CREATE TRIGGER queue_consumers_left AFTER DELETE ON {schema}.queue_consumers
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.queue_consumers_left();

-- celery_dlq is installed for this schema when this table has its row (celery_dlq writes
-- it, with its max_deliveries, when it opens enabled in the broker's own schema): expiry,
-- purge and queue deletion then move the poison they would delete into the DLQ first.
CREATE TABLE {schema}.dlq_installed (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_deliveries integer NOT NULL CHECK (max_deliveries >= 1),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.messages (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue            text NOT NULL,
    -- AMQP semantics: 0-9, higher is delivered first.
    priority         smallint NOT NULL DEFAULT 0,
    -- The Kombu message as JSON text (jsonb rejects \u0000, which Celery headers can carry).
    payload          text NOT NULL,
    -- At most one message per serial key in flight, cluster-wide (claim()).
    serial_key       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Delayed delivery: not claimable before this time (NULL: now).
    visible_at       timestamptz,
    expires_at       timestamptz,
    delivery_count   integer NOT NULL DEFAULT 0,
    -- Set while delivered: the token fences acks and requeues of an older delivery.
    lock_token       uuid,
    locked_by        integer,
    locked_at        timestamptz,
    -- At most one waiting message per job key (docs/job-keys.md).
    job_key          text,
    -- Set by a replace to the task id it displaced, so the publish can report it.
    replaced_task_id text
) WITH (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_cost_delay = 0
);

-- The ready path: unlocked, undelayed, unkeyed rows in claim order.
CREATE INDEX messages_ready_idx ON {schema}.messages (queue, priority DESC, id)
    WHERE lock_token IS NULL AND visible_at IS NULL AND serial_key IS NULL;
-- Ready keyed messages in claim order, the (small) set of keys in flight, and each key's head.
CREATE INDEX messages_ready_keyed_idx ON {schema}.messages (queue, priority DESC, id)
    WHERE lock_token IS NULL AND visible_at IS NULL AND serial_key IS NOT NULL;
CREATE INDEX messages_keys_in_flight_idx ON {schema}.messages (serial_key)
    WHERE lock_token IS NOT NULL AND serial_key IS NOT NULL;
CREATE INDEX messages_key_head_idx ON {schema}.messages (serial_key, priority DESC, id)
    WHERE lock_token IS NULL AND serial_key IS NOT NULL;
-- The queue's distinct ready keys, for the claim's skip scan (0012).
CREATE INDEX messages_ready_key_hash_idx ON {schema}.messages (queue, hashtext(serial_key), serial_key)
    WHERE lock_token IS NULL AND visible_at IS NULL AND serial_key IS NOT NULL;
CREATE INDEX messages_delayed_idx ON {schema}.messages (visible_at)
    WHERE visible_at IS NOT NULL AND lock_token IS NULL;
CREATE INDEX messages_expiring_idx ON {schema}.messages (expires_at)
    WHERE expires_at IS NOT NULL AND lock_token IS NULL;
CREATE UNIQUE INDEX messages_lock_token_idx ON {schema}.messages (lock_token)
    WHERE lock_token IS NOT NULL;
CREATE INDEX messages_locked_by_idx ON {schema}.messages (locked_by, locked_at)
    WHERE lock_token IS NOT NULL;
-- Reaper candidates: unlocked messages that were delivered at least once.
CREATE INDEX messages_redelivered_idx ON {schema}.messages (delivery_count, id)
    WHERE lock_token IS NULL AND delivery_count > 0;
-- The one waiting message of a job key (publish_job's ON CONFLICT), and the in-flight ones.
CREATE UNIQUE INDEX messages_waiting_job_key_idx ON {schema}.messages (job_key)
    WHERE job_key IS NOT NULL AND lock_token IS NULL;
CREATE INDEX messages_job_key_in_flight_idx ON {schema}.messages (job_key)
    WHERE job_key IS NOT NULL AND lock_token IS NOT NULL;

-- Rows a consumer could not decode are moved here whole instead of being dropped.
CREATE TABLE {schema}.invalid_messages (
    id         bigint PRIMARY KEY,
    queue      text NOT NULL,
    payload    text NOT NULL,
    error      text NOT NULL,
    moved_at   timestamptz NOT NULL DEFAULT now()
);


-- ---------------------------------------------------------------------------------------
-- Result backend: results, groups, chords, chord parts (0002, 0008)
--
-- Every payload column is bytea holding the bytes Celery's result serializer produced
-- (json, pickle, msgpack...), optionally compressed (result_compression); the row says
-- which serializer wrote it, so a change of result_serializer keeps old rows readable.
-- ---------------------------------------------------------------------------------------

CREATE TABLE {schema}.results (
    task_id          text PRIMARY KEY,
    status           text NOT NULL,
    content_type     text NOT NULL,
    content_encoding text NOT NULL,
    result           bytea,
    traceback        text,
    children         bytea,
    -- Set when a ready state (SUCCESS, FAILURE, REVOKED...) is stored.
    date_done        timestamptz,
    -- Set the first time STARTED is stored (task_track_started), kept afterwards.
    date_started     timestamptz,
    -- result_extended fields; args and kwargs are serialized like the result.
    name             text,
    args             bytea,
    kwargs           bytea,
    worker           text,
    retries          integer,
    queue            text,
    group_id         text,
    parent_id        text,
    -- Anything else Celery puts in the meta (stamped headers), serialized as a dict.
    extra            bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- NULL: never expires.  Rows past this time read as PENDING and are deleted by
    -- celery.backend_cleanup.
    expires_at       timestamptz
);

CREATE INDEX results_expires_idx ON {schema}.results (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX results_group_idx ON {schema}.results (group_id) WHERE group_id IS NOT NULL;

-- GroupResult.save(): the group's result tuple (as_tuple()), serialized.
CREATE TABLE {schema}.groups (
    group_id         text PRIMARY KEY,
    content_type     text NOT NULL,
    content_encoding text NOT NULL,
    result           bytea NOT NULL,
    date_done        timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz
);

CREATE INDEX groups_expires_idx ON {schema}.groups (expires_at) WHERE expires_at IS NOT NULL;

-- One row per chord (keyed by the header's group id): the atomic counter.
-- size comes from set_chord_size(); done counts distinct header parts that returned;
-- fired_by is the claim token of the one on_chord_part_return call that sends the body.
CREATE TABLE {schema}.chords (
    group_id         text PRIMARY KEY,
    size             integer,
    done             integer NOT NULL DEFAULT 0,
    -- The header's task ids in header order: the body gets the values in this order.
    task_ids         text[],
    -- A header holding nested groups is saved so the body gets the nested structure.
    header           bytea,
    content_type     text,
    content_encoding text,
    fired_by         uuid,
    fired_at         timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    -- Ids of the tasks Task.add_to_chord() added: each raises the target once, however
    -- often its statement runs.
    added            text[]
);

CREATE INDEX chords_expires_idx ON {schema}.chords (expires_at) WHERE expires_at IS NOT NULL;

-- The value each header part returned, kept until the body is sent.  The primary key
-- makes a redelivered part count once.
CREATE TABLE {schema}.chord_parts (
    group_id         text NOT NULL,
    task_id          text NOT NULL,
    -- Position in the header (request.group_index); 2147483647 when unknown.
    group_index      integer NOT NULL,
    id               bigint GENERATED ALWAYS AS IDENTITY,
    state            text NOT NULL,
    content_type     text NOT NULL,
    content_encoding text NOT NULL,
    result           bytea,
    expires_at       timestamptz,
    PRIMARY KEY (group_id, task_id, group_index)
);

CREATE INDEX chord_parts_expires_idx ON {schema}.chord_parts (expires_at) WHERE expires_at IS NOT NULL;


-- ---------------------------------------------------------------------------------------
-- Dead-letter queue (celery_dlq): failed messages kept whole, per-reason counters, and
-- tombstones for rows an operator deleted (0003)
-- ---------------------------------------------------------------------------------------

CREATE TABLE {schema}.dlq (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The logical message: Celery's task id (kept by retries and by requeue).
    task_id           text,
    task_name         text,
    -- Where the message came from: the broker queue (reaped rows) or the routing key.
    queue             text,
    exchange          text,
    routing_key       text,
    priority          smallint NOT NULL DEFAULT 0,
    serial_key        text,
    reason            text NOT NULL CHECK (reason IN
                        ('non_retryable', 'retries_exhausted', 'max_deliveries', 'rejected', 'manual')),
    exception_type    text,
    exception_message text,
    traceback         text,
    -- The full Kombu message as JSON text (not jsonb: \u0000 must survive).
    message           text NOT NULL,
    -- Celery retry attempts already made (request.retries), not DLQ captures.
    retries           integer NOT NULL DEFAULT 0,
    -- Broker deliveries (reaped rows only).
    delivery_count    integer,
    -- How many times this logical message reached the DLQ.
    failure_count     integer NOT NULL DEFAULT 1,
    status            text NOT NULL DEFAULT 'dead' CHECK (status IN ('dead', 'requeued', 'resolved')),
    notes             text[] NOT NULL DEFAULT ARRAY[]::text[],
    -- Which path captured it: signal, main (main-process signal), reaper, backstop, manual.
    source            text NOT NULL,
    broker_message_id bigint,
    worker            text,
    first_failed_at   timestamptz NOT NULL DEFAULT now(),
    last_failed_at    timestamptz NOT NULL DEFAULT now(),
    requeue_count     integer NOT NULL DEFAULT 0,
    requeued_at       timestamptz,
    resolved_at       timestamptz,
    -- The task's max_retries at the failure (NULL: unknown, e.g. reaped by the broker).
    max_retries       integer,
    -- When the original message was published (the celery_dlq publish header, or the
    -- broker row's creation time); NULL when neither is known.
    published_at      timestamptz,
    job_key           text,
    -- Message fields the capture could not recover (empty: the message is complete).
    unrecovered       text[] NOT NULL DEFAULT ARRAY[]::text[]
);

CREATE UNIQUE INDEX dlq_task_id_idx ON {schema}.dlq (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX dlq_last_failed_idx ON {schema}.dlq (last_failed_at);
CREATE INDEX dlq_task_name_idx ON {schema}.dlq (task_name, id);
CREATE INDEX dlq_job_key_idx ON {schema}.dlq (job_key, id) WHERE job_key IS NOT NULL;

-- Monotonic "added to the DLQ" counters, bumped in the same statement as every capture,
-- so any process (prefork children included) counts and a scrape reads the database.
CREATE TABLE {schema}.dlq_counters (
    task_name  text NOT NULL,
    reason     text NOT NULL,
    queue_kind text NOT NULL CHECK (queue_kind IN ('parallel', 'serial')),
    added      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (task_name, reason, queue_kind)
);

-- Task ids an operator deleted: the backstop sweep must not bring them back.
CREATE TABLE {schema}.dlq_tombstones (
    task_id    text PRIMARY KEY,
    deleted_at timestamptz NOT NULL DEFAULT now()
);


-- ---------------------------------------------------------------------------------------
-- Functions
-- ---------------------------------------------------------------------------------------

-- A payload that is not JSON must not abort a reaping statement: it reads as NULL.
-- Only used to read header fields: \u0000 escapes (which PostgreSQL cannot extract as
-- text, and Celery's argsrepr can carry) are replaced; the stored message keeps them.
CREATE FUNCTION {schema}.dlq_json(payload text) RETURNS json
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN replace(payload, '\u0000', '\ufffd')::json;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

-- One field of a message document as text, NULL when absent or unreadable.
CREATE FUNCTION {schema}.dlq_text(doc json, VARIADIC path text[]) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN doc #>> path;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

-- A header value as a time, NULL when absent or not a time: a malformed header must not
-- abort a reaping statement.
CREATE FUNCTION {schema}.dlq_time(value text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN value::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

-- Claim up to p_limit messages of p_queue for consumer p_consumer (0004; 0007 finds the
-- locked unkeyed candidates by primary key; 0012 bounds the keyed part by keys, not by the
-- depth of a blocked key, and locks a key's head in the statement that re-checks it).
--
-- Keyed messages first, from two sources of candidate keys, neither reading more than one
-- row of a key: the keys of the first ready keyed messages in claim order (the window),
-- then, when the window may hide claimable keys, a skip scan over the queue's distinct keys
-- (messages_ready_key_hash_idx) from a random point.  For each candidate key, never waiting:
--   1. skip it if a message of the key is in flight;
--   2. take a transaction advisory lock on the key (skip the key if another claim has it);
--   3. check again that no message of the key is in flight -- this statement's snapshot is
--      newer than the commit of any claim that held the advisory lock before us;
--   4. select and lock the key's head (best priority, then oldest) with SKIP LOCKED in one
--      statement whose WHERE re-checks the key, queue, priority, due time and delivery
--      count on the locked row (a job-key replace may have changed them), or skip the key.
-- A key is free again as soon as its message is acked (deleted) or unlocked (requeue,
-- recovery): "held" is derived from the messages themselves, so no lock row can leak.
-- Unkeyed messages fill the rest of the batch.
CREATE FUNCTION {schema}.claim(
    p_queue text, p_limit integer, p_consumer integer, p_max_deliveries integer, p_namespace integer
) RETURNS TABLE (id bigint, priority smallint, payload text, lock_token uuid, delivery_count integer)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    seen_keys text[];
    window_capped boolean;
    window_full boolean;
    head_blocked boolean := false;
    candidates text[];  -- the window's keys, then each batch of the skip scan
    visited integer := 0;
    fetched integer;
    candidate_key text;
    start_hash integer;
    at_hash integer;
    at_key text;
    wrapped boolean := false;
    scan_done boolean := false;
    head_id bigint;
    taken integer := 0;
BEGIN
    -- The window: of the first p_limit * 16 ready keyed messages (read whatever their
    -- keys), those of keys not in flight, up to p_limit * 4; their distinct keys in ready
    -- order.  Keys in flight are left out here already, so they cost no advisory lock (the
    -- check that counts comes after the lock).
    WITH r AS (
        SELECT r.serial_key, r.n
        FROM unnest(ARRAY(
            SELECT m.serial_key FROM {schema}.messages m
            WHERE m.queue = p_queue AND m.serial_key IS NOT NULL AND m.lock_token IS NULL
              AND m.visible_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())
              AND m.delivery_count < p_max_deliveries
            ORDER BY m.priority DESC, m.id
            LIMIT p_limit * 16
        )) WITH ORDINALITY AS r (serial_key, n)
    ), f AS (
        SELECT r.serial_key, r.n FROM r
        WHERE NOT EXISTS (SELECT 1 FROM {schema}.messages h
                          WHERE h.serial_key = r.serial_key AND h.lock_token IS NOT NULL)
        ORDER BY r.n
        LIMIT p_limit * 4
    )
    SELECT ARRAY(SELECT f.serial_key FROM f GROUP BY f.serial_key ORDER BY min(f.n)),
           (SELECT count(*) FROM r) = p_limit * 16,
           (SELECT count(*) FROM f) = p_limit * 4
    INTO candidates, window_capped, window_full;
    seen_keys := candidates;

    LOOP
        EXIT WHEN taken >= p_limit;
        IF visited >= cardinality(candidates) THEN
            -- Past the window only where it may hide claimable keys: when keys in flight
            -- cut it short, or one of its keys has a head that cannot be taken.  Otherwise
            -- the window saw every ready keyed message, or enough candidates (as in 0004).
            EXIT WHEN scan_done OR NOT (window_capped OR window_full)
                      OR (window_full AND NOT head_blocked);
            IF start_hash IS NULL THEN
                start_hash := floor(random() * 4294967296 - 2147483648)::integer;
                at_hash := start_hash;
                at_key := '';  -- keys are non-empty: before every key of this hash
            END IF;
            -- The skip scan's next keys after (at_hash, at_key), one index descent each,
            -- fetched by one statement; those in flight or already seen are left out.
            WITH RECURSIVE s (hash, serial_key, n) AS (
                SELECT at_hash, at_key, 0
                UNION ALL
                SELECT nxt.hash, nxt.serial_key, s.n + 1
                FROM s CROSS JOIN LATERAL (
                    SELECT hashtext(m.serial_key) AS hash, m.serial_key FROM {schema}.messages m
                    WHERE m.queue = p_queue AND m.lock_token IS NULL AND m.visible_at IS NULL
                      AND m.serial_key IS NOT NULL
                      AND (hashtext(m.serial_key), m.serial_key) > (s.hash, s.serial_key)
                    ORDER BY hashtext(m.serial_key), m.serial_key
                    LIMIT 1
                ) nxt
                WHERE s.n < p_limit * 2
            ), found AS (
                -- Past the start again, after wrapping around: every key was visited.
                SELECT s.* FROM s
                WHERE s.n > 0 AND NOT (wrapped AND (s.hash, s.serial_key) > (start_hash, ''))
            )
            SELECT ARRAY(SELECT f.serial_key FROM found f
                         WHERE f.serial_key <> ALL(seen_keys)
                           AND NOT EXISTS (SELECT 1 FROM {schema}.messages h
                                           WHERE h.serial_key = f.serial_key AND h.lock_token IS NOT NULL)
                         ORDER BY f.n),
                   (SELECT count(*) FROM found),
                   (SELECT s.hash FROM s ORDER BY s.n DESC LIMIT 1),
                   (SELECT s.serial_key FROM s ORDER BY s.n DESC LIMIT 1)
            INTO candidates, fetched, at_hash, at_key;
            visited := 0;
            IF fetched < p_limit * 2 THEN  -- the end of the index, or the start again
                scan_done := wrapped;
                wrapped := true;
                at_hash := -2147483648;
                at_key := '';
            END IF;
            CONTINUE;
        END IF;
        visited := visited + 1;
        candidate_key := candidates[visited];

        CONTINUE WHEN NOT pg_try_advisory_xact_lock(p_namespace, hashtext(candidate_key));
        -- This statement's snapshot is newer than the commit of any claim that held the
        -- advisory lock before us, so it sees that claim's message in flight.
        CONTINUE WHEN EXISTS (SELECT 1 FROM {schema}.messages h
                              WHERE h.serial_key = candidate_key AND h.lock_token IS NOT NULL);
        -- The key's head (best priority, then oldest, of all its waiting messages, in any
        -- queue) must be due, of this queue and not poison, or the key waits: a poison head
        -- blocks its key until the dead-letter reaper moves it.  A row locked after a
        -- concurrent job-key replace is re-checked against this WHERE alone, so it names
        -- the key and the priority the head was chosen by (see 2. above).
        SELECT m.id INTO head_id FROM {schema}.messages m
        WHERE (m.id, m.priority) = (SELECT h.id, h.priority FROM {schema}.messages h
                                    WHERE h.serial_key = candidate_key AND h.lock_token IS NULL
                                      AND (h.expires_at IS NULL OR h.expires_at > now())
                                    ORDER BY h.priority DESC, h.id
                                    LIMIT 1)
          AND m.serial_key = candidate_key AND m.queue = p_queue AND m.lock_token IS NULL
          AND m.visible_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())
          AND m.delivery_count < p_max_deliveries
        FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            head_blocked := true;
            CONTINUE;
        END IF;
        RETURN QUERY
            UPDATE {schema}.messages m
            SET lock_token = gen_random_uuid(), locked_by = p_consumer, locked_at = now(),
                delivery_count = m.delivery_count + 1
            WHERE m.id = head_id
            RETURNING m.id, m.priority, m.payload, m.lock_token, m.delivery_count;
        taken := taken + 1;
    END LOOP;

    IF taken < p_limit THEN
        RETURN QUERY
            WITH candidates AS (
                SELECT m.id FROM {schema}.messages m
                WHERE m.queue = p_queue AND m.lock_token IS NULL AND m.visible_at IS NULL
                  AND m.serial_key IS NULL
                  AND (m.expires_at IS NULL OR m.expires_at > now())
                  AND m.delivery_count < p_max_deliveries
                ORDER BY m.priority DESC, m.id
                LIMIT p_limit - taken
                FOR UPDATE SKIP LOCKED
            )
            UPDATE {schema}.messages m
            SET lock_token = gen_random_uuid(), locked_by = p_consumer, locked_at = now(),
                delivery_count = m.delivery_count + 1
            -- By primary key, never a join: with a small table in the statistics the
            -- planner hashes a sequential scan of messages, dead rows included.
            WHERE m.id = ANY(ARRAY(SELECT c.id FROM candidates c))
            RETURNING m.id, m.priority, m.payload, m.lock_token, m.delivery_count;
    END IF;
END
$$;

-- Delete delivered messages by lock token (a token that no longer matches is a no-op:
-- fencing) and wake the consumers of queues where a serial key was freed; returns those
-- queues.  p_durable false: the commit does not wait for the WAL flush (0006 says why
-- that is safe for acks and claims, and only for them).
CREATE FUNCTION {schema}.ack(p_tokens uuid[], p_channel text, p_durable boolean)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    freed text[];
BEGIN
    IF NOT p_durable THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    WITH gone AS (
        DELETE FROM {schema}.messages WHERE lock_token = ANY(p_tokens)
        RETURNING queue, serial_key
    )
    SELECT array_agg(DISTINCT queue) FILTER (WHERE serial_key IS NOT NULL) INTO freed FROM gone;
    PERFORM pg_notify(p_channel, q) FROM unnest(freed) AS q;
    RETURN QUERY SELECT unnest(freed);
END
$$;

-- Ack p_tokens, then claim: a key freed by the ack can be claimed again by this very
-- statement, which sees the delete.  One round trip and one commit per batch (0006).
CREATE FUNCTION {schema}.ack_and_claim(
    p_tokens uuid[], p_channel text, p_durable boolean,
    p_queue text, p_limit integer, p_consumer integer, p_max_deliveries integer, p_namespace integer
) RETURNS TABLE (id bigint, priority smallint, payload text, lock_token uuid, delivery_count integer)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT p_durable THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF cardinality(p_tokens) > 0 THEN
        PERFORM {schema}.ack(p_tokens, p_channel, p_durable);
    END IF;
    RETURN QUERY SELECT * FROM {schema}.claim(p_queue, p_limit, p_consumer, p_max_deliveries, p_namespace);
END
$$;

-- Unlock the messages delivered under p_tokens (a token that no longer matches is a
-- no-op: fencing) and wake their queues' consumers.  Returns one row per queue with
-- messages unlocked (unlocked > 0, job_key NULL) and one row per superseded message
-- (unlocked = 0): its queue, job key, whether it had a serial key, its task id and the
-- waiting message's.  A job key allows one waiting message, so an unlocked message whose
-- key already has one is superseded (deleted) instead of failing the statement (0009).
-- A superseded DLQ requeue's entry goes back to dead with a note (0015).
CREATE FUNCTION {schema}.unlock(p_tokens uuid[], p_channel text)
RETURNS TABLE (queue text, unlocked integer, job_key text, serial boolean, task_id text,
               waiting_task_id text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    freed text[];
    woken text[] := ARRAY[]::text[];
    keyed record;
    gone record;
    twin record;
    violated text;
BEGIN
    -- Unkeyed messages: no unique index covers them, so one UPDATE cannot fail by row.
    WITH unkeyed AS (
        UPDATE {schema}.messages m SET lock_token = NULL, locked_by = NULL, locked_at = NULL
        WHERE m.lock_token = ANY(p_tokens) AND m.job_key IS NULL
        RETURNING m.queue
    )
    SELECT coalesce(array_agg(u.queue), ARRAY[]::text[]) INTO freed FROM unkeyed u;

    -- Keyed ones one at a time, newest first, so that of several messages with one key
    -- unlocked together the newest stays.  A publish with the key can commit between
    -- our check and our update: the unique violation is then caught, row by row (a
    -- subtransaction each), never failing the others.
    FOR keyed IN
        SELECT m.id, m.lock_token, m.job_key FROM {schema}.messages m
        WHERE m.lock_token = ANY(p_tokens) AND m.job_key IS NOT NULL
        ORDER BY m.id DESC
    LOOP
        BEGIN
            UPDATE {schema}.messages m SET lock_token = NULL, locked_by = NULL, locked_at = NULL
            WHERE m.id = keyed.id AND m.lock_token = keyed.lock_token
              AND NOT EXISTS (SELECT 1 FROM {schema}.messages w
                              WHERE w.job_key = keyed.job_key AND w.lock_token IS NULL)
            RETURNING m.queue INTO gone;
            IF FOUND THEN
                freed := freed || gone.queue;
                CONTINUE;
            END IF;
        EXCEPTION WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS violated = CONSTRAINT_NAME;
            IF violated IS DISTINCT FROM 'messages_waiting_job_key_idx' THEN
                RAISE;
            END IF;
        END;
        -- A message with the key is waiting: this one is superseded by it.
        DELETE FROM {schema}.messages m WHERE m.id = keyed.id AND m.lock_token = keyed.lock_token
        RETURNING m.queue, m.serial_key IS NOT NULL AS serial,
                  {schema}.dlq_text({schema}.dlq_json(m.payload), 'headers', 'id') AS task_id,
                  {schema}.dlq_text({schema}.dlq_json(m.payload), 'headers', 'dlq_id') AS dlq_id
        INTO gone;
        CONTINUE WHEN NOT FOUND;  -- acked meanwhile
        SELECT w.queue, {schema}.dlq_text({schema}.dlq_json(w.payload), 'headers', 'id') AS task_id
        INTO twin
        FROM {schema}.messages w WHERE w.job_key = keyed.job_key AND w.lock_token IS NULL;
        -- A requeued dead letter (its dlq_id header) never runs now: its entry is dead
        -- again, with a note, instead of 'requeued' for ever.
        UPDATE {schema}.dlq d SET status = 'dead', notes = array_append(d.notes, format(
                   'requeued task %s was superseded by task %s (same job key) before it was '
                   'acked: back to dead', gone.task_id, twin.task_id))
        WHERE d.id = CASE WHEN gone.dlq_id ~ '^[0-9]{{1,18}}$' THEN gone.dlq_id::bigint END
          AND d.status = 'requeued';
        -- The waiting one may share this one's serial key, which the delete just freed.
        IF twin.queue IS NOT NULL THEN
            woken := woken || twin.queue;
        END IF;
        RETURN QUERY SELECT gone.queue, 0, keyed.job_key, gone.serial, gone.task_id, twin.task_id;
    END LOOP;

    PERFORM pg_notify(p_channel, q) FROM (SELECT DISTINCT q FROM unnest(freed || woken) AS q) AS d;
    RETURN QUERY SELECT f, count(*)::integer, NULL::text, NULL::boolean, NULL::text, NULL::text
                 FROM unnest(freed) AS f GROUP BY f;
END
$$;

-- route() and dlq_matches() are plain SQL functions, not STRICT, not VOLATILE, without SET
-- clauses, so the planner inlines them into the calling statement (0011;
-- tests/test_schema.py checks that they stay inlined).

-- The queues a message published to p_exchange with p_routing_key goes to: every queue
-- with a matching binding (fanout: any; topic: the binding's pattern, Kombu's
-- key_to_pattern; direct and any other type: the exact routing key).  No row: unroutable.
CREATE FUNCTION {schema}.route(p_exchange text, p_routing_key text) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT DISTINCT b.queue
    FROM {schema}.bindings b JOIN {schema}.exchanges e ON e.name = b.exchange
    WHERE b.exchange = p_exchange
      AND CASE e.type
            WHEN 'fanout' THEN true
            WHEN 'topic' THEN p_routing_key ~ b.pattern
            ELSE b.routing_key = p_routing_key
          END
$$;

-- Whether DLQ row d passes an operator's filter; a NULL argument does not filter.
CREATE FUNCTION {schema}.dlq_matches(
    d {schema}.dlq, p_task text, p_queue text, p_job_key text, p_reason text, p_exception text,
    p_status text, p_since timestamptz, p_until timestamptz, p_ids bigint[]
) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_task IS NULL OR d.task_name = p_task)
       AND (p_queue IS NULL OR d.queue = p_queue)
       AND (p_job_key IS NULL OR d.job_key = p_job_key)
       AND (p_reason IS NULL OR d.reason = p_reason)
       AND (p_exception IS NULL OR d.exception_type = p_exception)
       AND (p_status IS NULL OR d.status = p_status)
       AND (p_since IS NULL OR d.last_failed_at >= p_since)
       AND (p_until IS NULL OR d.last_failed_at < p_until)
       AND (p_ids IS NULL OR d.id = ANY(p_ids))
$$;

-- One periodic task.  schedule is the JSON of the Celery schedule's parameters (never a
-- pickle); next_due is computed from the database clock.
CREATE TABLE {schema}.beat_entries (
    name         text PRIMARY KEY,
    task         text NOT NULL,
    schedule     jsonb NOT NULL,
    args         jsonb NOT NULL DEFAULT '[]',
    kwargs       jsonb NOT NULL DEFAULT '{{}}',
    options      jsonb NOT NULL DEFAULT '{{}}',
    enabled      boolean NOT NULL DEFAULT true,
    -- What a beat does with ticks that fell due while no beat ran.
    missed       text NOT NULL DEFAULT 'once' CHECK (missed IN ('skip', 'once', 'catchup')),
    -- 'config': synced from beat_schedule at beat start; 'api': added at runtime.
    source       text NOT NULL DEFAULT 'api' CHECK (source IN ('config', 'api')),
    next_due     timestamptz NOT NULL,
    last_due     timestamptz,
    last_run_at  timestamptz,
    last_task_id text,
    last_beat    text,
    run_count    bigint NOT NULL DEFAULT 0
);

CREATE INDEX beat_entries_due_idx ON {schema}.beat_entries (next_due) WHERE enabled;

-- Every tick published, by which beat (or 'run-now' caller).  The primary key is what makes
-- a tick publish once: a second insert of the same (entry, due) fails its transaction.
CREATE TABLE {schema}.beat_ticks (
    entry        text NOT NULL REFERENCES {schema}.beat_entries (name) ON DELETE CASCADE,
    due          timestamptz NOT NULL,
    beat         text NOT NULL,
    task_id      text NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entry, due)
);
