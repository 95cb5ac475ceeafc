-- Serial keys: at most one message per key in flight, cluster-wide, and the single
-- claim function used for every claim (keyed and unkeyed) so a claim is one round trip.

-- Ready keyed messages in claim order, and the (small) set of keys in flight.
CREATE INDEX messages_ready_keyed_idx ON {schema}.messages (queue, priority DESC, id)
    WHERE lock_token IS NULL AND visible_at IS NULL AND serial_key IS NOT NULL;
CREATE INDEX messages_keys_in_flight_idx ON {schema}.messages (serial_key)
    WHERE lock_token IS NOT NULL AND serial_key IS NOT NULL;
CREATE INDEX messages_key_head_idx ON {schema}.messages (serial_key, priority DESC, id)
    WHERE lock_token IS NULL AND serial_key IS NOT NULL;

-- Claim up to p_limit messages of p_queue for consumer p_consumer.
--
-- Keyed messages first: for each candidate key, never waiting,
--   1. take a transaction advisory lock on the key (skip the key if another claim has it);
--   2. check no message of the key is in flight -- this statement's snapshot is newer than
--      the commit of any claim that held the advisory lock before us, so it sees that claim;
--   3. lock the key's head (best priority, then oldest) with SKIP LOCKED, or skip the key.
-- A key is free again as soon as its message is acked (deleted) or unlocked (requeue,
-- recovery): "held" is derived from the messages themselves, so no lock row can leak.
-- Unkeyed messages fill the rest of the batch.
CREATE FUNCTION {schema}.claim(
    p_queue text, p_limit integer, p_consumer integer, p_max_deliveries integer, p_namespace integer
) RETURNS TABLE (id bigint, priority smallint, payload text, lock_token uuid, delivery_count integer)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    candidate record;
    head_id bigint;
    taken integer := 0;
    tried text[] := ARRAY[]::text[];
BEGIN
    FOR candidate IN
        SELECT m.serial_key FROM {schema}.messages m
        WHERE m.queue = p_queue AND m.serial_key IS NOT NULL AND m.lock_token IS NULL
          AND m.visible_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())
          AND m.delivery_count < p_max_deliveries
          AND NOT EXISTS (SELECT 1 FROM {schema}.messages h
                          WHERE h.serial_key = m.serial_key AND h.lock_token IS NOT NULL)
        ORDER BY m.priority DESC, m.id
        LIMIT p_limit * 4
    LOOP
        EXIT WHEN taken >= p_limit;
        CONTINUE WHEN candidate.serial_key = ANY(tried);
        tried := tried || candidate.serial_key;
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(p_namespace, hashtext(candidate.serial_key));
        CONTINUE WHEN EXISTS (SELECT 1 FROM {schema}.messages h
                              WHERE h.serial_key = candidate.serial_key AND h.lock_token IS NOT NULL);
        SELECT m.id INTO head_id FROM {schema}.messages m
        WHERE m.serial_key = candidate.serial_key AND m.lock_token IS NULL
          AND (m.expires_at IS NULL OR m.expires_at > now())
        ORDER BY m.priority DESC, m.id
        LIMIT 1;
        -- The head itself must be due, of this queue and not poison: otherwise the key
        -- waits (a poison head blocks its key until the dead-letter reaper moves it).
        PERFORM 1 FROM {schema}.messages m
        WHERE m.id = head_id AND m.queue = p_queue AND m.lock_token IS NULL
          AND m.visible_at IS NULL AND m.delivery_count < p_max_deliveries
        FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
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
            FROM candidates c
            WHERE m.id = c.id
            RETURNING m.id, m.priority, m.payload, m.lock_token, m.delivery_count;
    END IF;
END
$$;
