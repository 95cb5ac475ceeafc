-- Which live sessions use which queue, and whether celery_dlq keeps what deletions remove.
--
-- x-expires used to count from the last time a consuming loop touched the queue, so a
-- worker whose loop was blocked (celery worker -P solo running a long task) lost its
-- pidbox queue and bindings to another process's recovery pass.  A queue is now in use
-- while a registered consumer (a live session: see the consumers table) consumes it, and
-- an exclusive or auto-delete queue lives as long as the session that declared it or one
-- that consumes it: a killed process's temporary queues no longer collect fanout copies
-- forever.

-- Consumers (registered sessions) consuming a queue.  A row goes with its consumer (clean
-- close or recovery finding the session dead) and with its queue.
CREATE TABLE {schema}.queue_consumers (
    queue    text NOT NULL REFERENCES {schema}.queues (name) ON DELETE CASCADE,
    consumer integer NOT NULL REFERENCES {schema}.consumers (id) ON DELETE CASCADE,
    PRIMARY KEY (queue, consumer)
);

CREATE INDEX queue_consumers_consumer_idx ON {schema}.queue_consumers (consumer);

-- The consumer whose session declared an exclusive or auto-delete queue (NULL when that
-- session is gone, or for other queues).
ALTER TABLE {schema}.queues
    ADD COLUMN owner integer REFERENCES {schema}.consumers (id) ON DELETE SET NULL;

CREATE INDEX queues_owner_idx ON {schema}.queues (owner) WHERE owner IS NOT NULL;

-- RabbitMQ's x-expires counts from the moment a queue lost its last consumer: whichever
-- way a consumer row goes (cancel, clean close, or recovery deleting a dead consumer,
-- which cascades here), the queue's clock restarts then.
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

-- celery_dlq is installed for this schema when this table has its row: celery_dlq writes
-- it when it opens its connection enabled, with its DLQ table in the broker's own database
-- and schema and a max_deliveries, and removes it when it opens disabled.  Expiry, purge
-- and queue deletion then move the poison messages they would delete (delivered
-- max_deliveries times, unlocked) into the DLQ first, with the reaper's statement.
CREATE TABLE {schema}.dlq_installed (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_deliveries integer NOT NULL CHECK (max_deliveries >= 1),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
