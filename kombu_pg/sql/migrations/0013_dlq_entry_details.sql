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
