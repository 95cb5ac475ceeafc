-- Job keys: at most one *waiting* message per job key, decided by the insert itself.
-- A second publish with the key replaces the waiting message (or is dropped, by mode);
-- a message already in flight is never touched, so a new one may wait behind it.

ALTER TABLE {schema}.messages ADD COLUMN job_key text;
-- Set by a replace to the task id it displaced, so the publish can report it.
ALTER TABLE {schema}.messages ADD COLUMN replaced_task_id text;

CREATE UNIQUE INDEX messages_waiting_job_key_idx ON {schema}.messages (job_key)
    WHERE job_key IS NOT NULL AND lock_token IS NULL;
CREATE INDEX messages_job_key_in_flight_idx ON {schema}.messages (job_key)
    WHERE job_key IS NOT NULL AND lock_token IS NOT NULL;
