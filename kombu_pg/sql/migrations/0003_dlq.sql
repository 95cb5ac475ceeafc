-- Dead-letter queue (celery_dlq): failed messages kept whole, per-reason counters, and
-- tombstones for rows an operator deleted.  {schema} is the quoted schema identifier.

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
    resolved_at       timestamptz
);

CREATE UNIQUE INDEX dlq_task_id_idx ON {schema}.dlq (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX dlq_last_failed_idx ON {schema}.dlq (last_failed_at);
CREATE INDEX dlq_task_name_idx ON {schema}.dlq (task_name, id);

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

-- Reaper candidates: unlocked messages that were delivered at least once.
CREATE INDEX messages_redelivered_idx ON {schema}.messages (delivery_count, id)
    WHERE lock_token IS NULL AND delivery_count > 0;

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
