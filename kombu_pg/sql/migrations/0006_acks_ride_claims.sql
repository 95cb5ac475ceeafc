-- Acks ride on the next claim, and claims and acks may commit asynchronously.
--
-- A consumer that acks a batch and claims the next one used to commit twice, each commit
-- waiting for a WAL flush: on a small prefetch window (Celery's prefork pool: 8) that
-- wait, not PostgreSQL's work, bounded throughput.  ack_and_claim does both in one
-- statement, and with p_durable false neither waits for the flush (synchronous_commit
-- off, for this transaction only).  That is safe for claims and acks alone: if the server
-- crashes before the flush, the transaction is undone as a whole, so the messages are
-- locked by no live session again (every session died with the server) and are
-- redelivered -- the at-least-once outcome a crash gives in-flight messages anyway.
-- Publishes never use this: they stay durable when they return.

-- Delete delivered messages by lock token (a token that no longer matches is a no-op:
-- fencing) and wake the consumers of queues where a serial key was freed; returns those
-- queues.
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

-- Ack p_tokens, then claim (see the claim function in 0004): a key freed by the ack can
-- be claimed again by this very statement, which sees the delete.
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
