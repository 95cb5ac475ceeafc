-- The claim no longer lets one blocked serial key starve the others, and a job-key replace
-- can no longer put two messages of one key in flight.
--
-- 1. Blocked keys.  The claim of 0004 took its keyed candidates from the first
--    p_limit * 4 ready keyed messages of the queue that belonged to no key in flight.
--    When those were all followers of one key whose head could not be taken (a poison
--    head, a head not yet due, a head in another queue), no keyed message was claimed
--    although other keys were ready; when the key's head was in flight, the scan walked
--    past every waiting message of that key, on every claim.  Any scan in ready order has
--    to read a blocked key's followers, since they are ready rows like any other, so the
--    claim now has two sources of keys; past a fixed window, neither reads more than one
--    row of a key:
--      a. the window: of the first p_limit * 16 ready keyed messages in ready order
--         (priority, then id), read whatever their keys, those of keys not in flight, up
--         to p_limit * 4, as candidates in that order.  It reads at most p_limit * 16 rows
--         and keeps the cross-key order of the common case.
--      b. only when the window may hide claimable keys -- keys in flight cut it short (it
--         read its p_limit * 16 rows and found fewer candidates), or one of its keys has a
--         head that cannot be taken -- and the batch is not full: a skip scan over the
--         queue's distinct keys (messages_ready_key_hash_idx, one index descent per key),
--         from a random point of the hash order, wrapping around, until the batch is full
--         or every key was visited.  The random start spreads a busy queue's claims over
--         its keys; the hash, not the key, orders it because keys often share a long
--         prefix.  One statement (a recursive CTE) fetches up to p_limit * 2 keys at a
--         time: a statement per key cost more than the descents themselves.  The skip scan
--         is not run otherwise: with many keys all busy (64 keys, 8 consumers) a claim
--         that visits every key each time drained keyed messages about a third slower.
--    Each key is then tried as before: skip it if a message of it is in flight (checked
--    before the advisory lock too, so keys in flight cost no lock), take the advisory lock
--    without waiting, re-check in flight, lock the key's head.  The cost is bounded by the
--    window plus one visit per key passed over (blocked or already tried) and per key
--    taken; a blocked key's depth no longer counts.  The price: one more index entry per keyed
--    message published or requeued.  Considered and not taken: a head-only condition on
--    the ready scan (still reads every follower), a per-key head table kept by triggers (a
--    write and a row lock per publish, shared by concurrent publishers of one key).
--
-- 2. Job-key replace.  publish_job's ON CONFLICT DO UPDATE rewrites a waiting message's
--    serial_key, queue and priority.  The head was selected by one statement and locked by
--    another whose WHERE did not name the key, and under READ COMMITTED a row locked after
--    a concurrent update is re-checked against the locking statement's WHERE only: a
--    replace that moved the head to another key between the two put a message of that
--    other key in flight under this key's advisory lock, beside the other key's own.  The
--    head is now selected and locked in one statement whose WHERE requires the row to
--    still be this key's, in this queue, at the priority it was chosen by (its place in the
--    key), due, unexpired and not poison; otherwise the key is skipped for this claim.
--
-- Everything else is as in 0004/0007: at most one message per key in flight, a key's
-- head goes first (priority, then id), a poison or delayed head holds its key back,
-- unkeyed messages fill the rest of the batch, found by primary key.

CREATE INDEX messages_ready_key_hash_idx ON {schema}.messages (queue, hashtext(serial_key), serial_key)
    WHERE lock_token IS NULL AND visible_at IS NULL AND serial_key IS NOT NULL;

CREATE OR REPLACE FUNCTION {schema}.claim(
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
