-- A superseded dead letter goes back to dead.
--
-- 0009's unlock() supersedes a delivered message whose job key has a waiting message: it
-- deletes it and the waiting one runs.  When the deleted message was a DLQ requeue (its
-- dlq_id header), its entry stayed 'requeued' for ever, since that copy never runs.  The
-- entry is now dead again, with a note naming both task ids, in the same statement.
-- Otherwise the function of 0009, unchanged.

CREATE OR REPLACE FUNCTION {schema}.unlock(p_tokens uuid[], p_channel text)
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
