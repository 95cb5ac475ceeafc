-- DLQ entries record what an operator needs to judge them (issue #21): the retry limit
-- in force when the task failed, when its message was first published, its job key
-- (filterable like task and queue), and which fields a capture could not recover (the
-- backstop sweep rebuilds entries from the result backend, which keeps no headers).

ALTER TABLE {schema}.dlq
    -- The task's max_retries at the failure (NULL: unknown, e.g. reaped by the broker).
    ADD COLUMN max_retries integer,
    -- When the original message was published (the celery_dlq publish header, or the
    -- broker row's creation time); NULL when neither is known.
    ADD COLUMN published_at timestamptz,
    ADD COLUMN job_key text,
    -- Message fields the capture could not recover (empty: the message is complete).
    ADD COLUMN unrecovered text[] NOT NULL DEFAULT ARRAY[]::text[];

CREATE INDEX dlq_job_key_idx ON {schema}.dlq (job_key, id) WHERE job_key IS NOT NULL;

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

-- The DLQ filter (0011's dlq_matches) gains the job key: one more argument, so a new
-- function in place of the old one.
DROP FUNCTION {schema}.dlq_matches({schema}.dlq, text, text, text, text, text, timestamptz, timestamptz, bigint[]);
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
