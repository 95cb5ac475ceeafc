-- Named queries of the dead-letter queue (celery_dlq).  Each starts with "-- name: <name>".
-- {schema} is the quoted schema identifier; values are always bound parameters.

-- name: reap
-- Move up to %(limit)s unlocked messages delivered >= %(max_deliveries)s times into the DLQ,
-- in one statement: a message is in exactly one of (queue, DLQ) whatever happens.
-- FOR UPDATE SKIP LOCKED: a claim in progress or a concurrent reaper owns the row.
-- Only the oldest message per task id moves per statement (ON CONFLICT may touch a row once).
-- Optionally only those of %(queues)s and (%(expired)s) only expired ones: the poison a
-- purge, queue deletion or expiry is about to delete (BrokerStore).
WITH candidates AS (
    SELECT id FROM {schema}.messages
    WHERE lock_token IS NULL AND delivery_count > 0 AND delivery_count >= %(max_deliveries)s
      AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
      AND (NOT %(expired)s OR expires_at <= now())
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), parsed AS (
    SELECT m.id, {schema}.dlq_json(m.payload) AS doc
    FROM {schema}.messages m JOIN candidates c ON c.id = m.id
), firsts AS (
    SELECT p.id, p.doc, {schema}.dlq_text(p.doc, 'headers', 'id') AS task_id,
           row_number() OVER (PARTITION BY coalesce({schema}.dlq_text(p.doc, 'headers', 'id'), p.id::text)
                              ORDER BY p.id) AS rn
    FROM parsed p
), moved AS (
    DELETE FROM {schema}.messages m USING firsts f
    WHERE m.id = f.id AND f.rn = 1 AND m.lock_token IS NULL
    RETURNING m.id, m.queue, m.priority, m.payload, m.serial_key, m.delivery_count, m.job_key,
              m.created_at, f.doc, f.task_id
), ins AS (
    INSERT INTO {schema}.dlq AS d (
        task_id, task_name, queue, exchange, routing_key, priority, serial_key, reason,
        exception_type, exception_message, message, retries, delivery_count, source,
        broker_message_id, job_key, published_at)
    SELECT task_id,
           coalesce({schema}.dlq_text(doc, 'headers', 'shadow'), {schema}.dlq_text(doc, 'headers', 'task')),
           queue,
           {schema}.dlq_text(doc, 'properties', 'delivery_info', 'exchange'),
           {schema}.dlq_text(doc, 'properties', 'delivery_info', 'routing_key'),
           priority, serial_key, 'max_deliveries', NULL,
           format('delivered %%s times without being acknowledged (max_deliveries=%%s)',
                  delivery_count, %(max_deliveries)s),
           payload,
           CASE WHEN {schema}.dlq_text(doc, 'headers', 'retries') ~ '^[0-9]{{1,9}}$'
                THEN {schema}.dlq_text(doc, 'headers', 'retries')::integer ELSE 0 END,
           delivery_count, 'reaper', id, job_key,
           coalesce({schema}.dlq_time({schema}.dlq_text(doc, 'headers', 'dlq_published_at')), created_at)
    FROM moved
    ORDER BY id
    ON CONFLICT (task_id) WHERE task_id IS NOT NULL DO UPDATE SET
        failure_count = d.failure_count + 1, reason = EXCLUDED.reason,
        exception_type = EXCLUDED.exception_type, exception_message = EXCLUDED.exception_message,
        traceback = NULL, message = EXCLUDED.message, queue = EXCLUDED.queue,
        exchange = EXCLUDED.exchange, routing_key = EXCLUDED.routing_key,
        priority = EXCLUDED.priority, serial_key = EXCLUDED.serial_key,
        retries = EXCLUDED.retries, delivery_count = EXCLUDED.delivery_count,
        source = EXCLUDED.source, broker_message_id = EXCLUDED.broker_message_id,
        job_key = EXCLUDED.job_key, published_at = coalesce(EXCLUDED.published_at, d.published_at),
        unrecovered = EXCLUDED.unrecovered, status = 'dead', last_failed_at = now()
    RETURNING d.id, d.task_name, d.reason, d.serial_key
), counted AS (
    INSERT INTO {schema}.dlq_counters AS c (task_name, reason, queue_kind, added)
    SELECT coalesce(task_name, ''), reason,
           CASE WHEN serial_key IS NULL THEN 'parallel' ELSE 'serial' END, count(*)
    FROM ins GROUP BY 1, 2, 3
    ON CONFLICT (task_name, reason, queue_kind) DO UPDATE SET added = c.added + EXCLUDED.added
)
SELECT id FROM ins

-- name: reject_to_dlq
-- Broker-level dead-lettering of one delivered message (Kombu reject(requeue=False)),
-- fenced by its lock token, in one statement.  A task id whose row is 'dead' was captured
-- by Celery's signal for this very failure (the signal fires before the reject): the row
-- is kept as it is, no double count.  A 'requeued' (or 'resolved') row failed again: it
-- is updated like every other capture path does (status dead, failure_count + 1).
WITH moved AS (
    DELETE FROM {schema}.messages WHERE lock_token = %(token)s::uuid
    RETURNING id, queue, priority, payload, serial_key, delivery_count, job_key, created_at,
              {schema}.dlq_json(payload) AS doc
), ins AS (
    INSERT INTO {schema}.dlq AS d (
        task_id, task_name, queue, exchange, routing_key, priority, serial_key, reason,
        exception_message, message, retries, delivery_count, source, broker_message_id, job_key,
        published_at)
    SELECT {schema}.dlq_text(doc, 'headers', 'id'),
           coalesce({schema}.dlq_text(doc, 'headers', 'shadow'), {schema}.dlq_text(doc, 'headers', 'task')),
           queue,
           {schema}.dlq_text(doc, 'properties', 'delivery_info', 'exchange'),
           {schema}.dlq_text(doc, 'properties', 'delivery_info', 'routing_key'),
           priority, serial_key, 'rejected', %(detail)s, payload,
           CASE WHEN {schema}.dlq_text(doc, 'headers', 'retries') ~ '^[0-9]{{1,9}}$'
                THEN {schema}.dlq_text(doc, 'headers', 'retries')::integer ELSE 0 END,
           delivery_count, 'broker', id, job_key,
           coalesce({schema}.dlq_time({schema}.dlq_text(doc, 'headers', 'dlq_published_at')), created_at)
    FROM moved
    -- The same logical message (its queue and routing do not change): record the failure.
    ON CONFLICT (task_id) WHERE task_id IS NOT NULL DO UPDATE SET
        failure_count = d.failure_count + 1, reason = 'rejected', exception_type = NULL,
        exception_message = EXCLUDED.exception_message, traceback = NULL,
        message = EXCLUDED.message, delivery_count = EXCLUDED.delivery_count, source = 'broker',
        broker_message_id = EXCLUDED.broker_message_id, job_key = EXCLUDED.job_key,
        published_at = coalesce(EXCLUDED.published_at, d.published_at), unrecovered = EXCLUDED.unrecovered,
        status = 'dead', last_failed_at = now()
    WHERE d.status <> 'dead'
    RETURNING d.id, d.task_name, d.reason, d.serial_key
), counted AS (
    INSERT INTO {schema}.dlq_counters AS c (task_name, reason, queue_kind, added)
    SELECT coalesce(task_name, ''), reason,
           CASE WHEN serial_key IS NULL THEN 'parallel' ELSE 'serial' END, count(*)
    FROM ins GROUP BY 1, 2, 3
    ON CONFLICT (task_name, reason, queue_kind) DO UPDATE SET added = c.added + EXCLUDED.added
)
SELECT (SELECT count(*) FROM moved), (SELECT id FROM ins)

-- name: installed
-- celery_dlq is installed for this schema (see the dlq_installed table's migration): the
-- max_deliveries its reaper uses, or no row; and whether `reap` (same arguments) would
-- move anything: otherwise it is not run, so a deletion never waits for a lock on the
-- DLQ table it does not need.
SELECT i.max_deliveries,
       EXISTS (SELECT 1 FROM {schema}.messages
               WHERE lock_token IS NULL AND delivery_count > 0 AND delivery_count >= i.max_deliveries
                 AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
                 AND (NOT %(expired)s OR expires_at <= now()))
FROM {schema}.dlq_installed i

-- name: mark_installed
INSERT INTO {schema}.dlq_installed (max_deliveries) VALUES (%(max_deliveries)s)
ON CONFLICT (singleton) DO UPDATE SET max_deliveries = EXCLUDED.max_deliveries, updated_at = now()
WHERE dlq_installed.max_deliveries <> EXCLUDED.max_deliveries

-- name: mark_not_installed
DELETE FROM {schema}.dlq_installed

-- name: count_exhausted
SELECT count(*) FROM {schema}.messages
WHERE lock_token IS NULL AND delivery_count > 0 AND delivery_count >= %(max_deliveries)s

-- name: capture
-- A failure reported by Celery (signal paths).  The same task id reaching the DLQ again
-- updates its row: failure_count + 1, status back to dead, notes kept.
WITH ins AS (
    INSERT INTO {schema}.dlq AS d (
        task_id, task_name, queue, exchange, routing_key, priority, serial_key, reason,
        exception_type, exception_message, traceback, message, retries, source, worker,
        max_retries, published_at, job_key, unrecovered)
    VALUES (%(task_id)s, %(task_name)s, %(queue)s, %(exchange)s, %(routing_key)s, %(priority)s,
            %(serial_key)s, %(reason)s, %(exception_type)s, %(exception_message)s, %(traceback)s,
            %(message)s, %(retries)s, %(source)s, %(worker)s, %(max_retries)s, %(published_at)s,
            %(job_key)s, %(unrecovered)s)
    ON CONFLICT (task_id) WHERE task_id IS NOT NULL DO UPDATE SET
        failure_count = d.failure_count + 1, reason = EXCLUDED.reason,
        exception_type = EXCLUDED.exception_type, exception_message = EXCLUDED.exception_message,
        traceback = EXCLUDED.traceback, message = EXCLUDED.message,
        queue = coalesce(EXCLUDED.queue, d.queue), exchange = coalesce(EXCLUDED.exchange, d.exchange),
        routing_key = coalesce(EXCLUDED.routing_key, d.routing_key),
        priority = EXCLUDED.priority, serial_key = EXCLUDED.serial_key,
        retries = EXCLUDED.retries, source = EXCLUDED.source, worker = EXCLUDED.worker,
        max_retries = EXCLUDED.max_retries, published_at = coalesce(EXCLUDED.published_at, d.published_at),
        job_key = EXCLUDED.job_key, unrecovered = EXCLUDED.unrecovered,
        status = 'dead', last_failed_at = now()
    RETURNING d.id, d.failure_count, d.task_name, d.reason, d.serial_key
), counted AS (
    INSERT INTO {schema}.dlq_counters AS c (task_name, reason, queue_kind, added)
    SELECT coalesce(task_name, ''), reason,
           CASE WHEN serial_key IS NULL THEN 'parallel' ELSE 'serial' END, 1
    FROM ins
    ON CONFLICT (task_name, reason, queue_kind) DO UPDATE SET added = c.added + 1
)
SELECT id, failure_count FROM ins

-- name: capture_if_absent
-- The backstop sweep: a failure with no DLQ row and no tombstone is added.  A row that
-- was requeued before this failure (%(failed_at)s: the result's date_done) failed again
-- without its capture reaching the DLQ: it is updated (status dead, failure_count + 1,
-- the new error), keeping its stored message and routing, which are the exact ones.
WITH ins AS (
    INSERT INTO {schema}.dlq AS d (
        task_id, task_name, queue, exchange, routing_key, priority, serial_key, reason,
        exception_type, exception_message, traceback, message, retries, source, worker,
        max_retries, published_at, job_key, unrecovered)
    SELECT %(task_id)s, %(task_name)s, %(queue)s, %(exchange)s, %(routing_key)s, %(priority)s,
           %(serial_key)s, %(reason)s, %(exception_type)s, %(exception_message)s, %(traceback)s,
           %(message)s, %(retries)s, %(source)s, %(worker)s, %(max_retries)s, %(published_at)s,
           %(job_key)s, %(unrecovered)s
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.dlq_tombstones t WHERE t.task_id = %(task_id)s)
    ON CONFLICT (task_id) WHERE task_id IS NOT NULL DO UPDATE SET
        failure_count = d.failure_count + 1, reason = EXCLUDED.reason,
        exception_type = EXCLUDED.exception_type, exception_message = EXCLUDED.exception_message,
        traceback = EXCLUDED.traceback, retries = EXCLUDED.retries, source = EXCLUDED.source,
        worker = EXCLUDED.worker, max_retries = EXCLUDED.max_retries, status = 'dead',
        last_failed_at = now()
    WHERE d.status = 'requeued' AND d.requeued_at < %(failed_at)s::timestamptz
    RETURNING d.id, d.task_name, d.reason, d.serial_key
), counted AS (
    INSERT INTO {schema}.dlq_counters AS c (task_name, reason, queue_kind, added)
    SELECT coalesce(task_name, ''), reason,
           CASE WHEN serial_key IS NULL THEN 'parallel' ELSE 'serial' END, 1
    FROM ins
    ON CONFLICT (task_name, reason, queue_kind) DO UPDATE SET added = c.added + 1
)
SELECT id FROM ins

-- name: backstop_candidates
-- FAILURE results (result backend table) that never reached the DLQ, in (date_done,
-- task_id) order after the given position (keyset: rows the caller skipped stay behind).
-- A row requeued before the failure counts as missing: the requeued run failed again.
SELECT r.task_id, r.name, r.queue, coalesce(r.retries, 0), r.worker, r.content_type,
       r.content_encoding, r.result, r.traceback, r.args, r.kwargs, r.date_done
FROM {schema}.results r
WHERE r.status = 'FAILURE' AND r.name IS NOT NULL
  AND r.date_done >= now() - make_interval(secs => %(window)s)
  -- A failure the signal handler is writing right now is not the sweep's business.
  AND r.date_done < now() - make_interval(secs => %(grace)s)
  AND (%(after_ts)s::timestamptz IS NULL OR (r.date_done, r.task_id) > (%(after_ts)s, %(after_id)s::text))
  AND NOT EXISTS (SELECT 1 FROM {schema}.dlq d WHERE d.task_id = r.task_id
                  AND NOT (d.status = 'requeued' AND d.requeued_at < r.date_done))
  AND NOT EXISTS (SELECT 1 FROM {schema}.dlq_tombstones t WHERE t.task_id = r.task_id)
  AND NOT (r.name = ANY(%(excluded)s::text[]))
ORDER BY r.date_done, r.task_id
LIMIT %(limit)s

-- name: results_table_exists
SELECT to_regclass(format('%%I.results', %(schema)s::text)) IS NOT NULL

-- name: forget_tombstones
DELETE FROM {schema}.dlq_tombstones WHERE deleted_at < now() - make_interval(secs => %(window)s)

-- name: list
-- Newest first; the cursor is the last id of the previous page (keyset pagination).
-- The filter (dlq_matches, migration *_route_and_dlq_filter.sql) is the one count and
-- matching_ids apply.
SELECT id, task_id, task_name, queue, reason, exception_type, exception_message, status,
       retries, failure_count, delivery_count, source, first_failed_at, last_failed_at,
       requeue_count, job_key
FROM {schema}.dlq d
WHERE {schema}.dlq_matches(d, %(task)s::text, %(queue)s::text, %(job_key)s::text, %(reason)s::text,
                           %(exception)s::text, %(status)s::text, %(since)s::timestamptz,
                           %(until)s::timestamptz, %(ids)s::bigint[])
  AND (%(cursor)s::bigint IS NULL OR id < %(cursor)s)
ORDER BY id DESC
LIMIT %(limit)s

-- name: count
SELECT count(*) FROM {schema}.dlq d
WHERE {schema}.dlq_matches(d, %(task)s::text, %(queue)s::text, %(job_key)s::text, %(reason)s::text,
                           %(exception)s::text, %(status)s::text, %(since)s::timestamptz,
                           %(until)s::timestamptz, %(ids)s::bigint[])

-- name: matching_ids
SELECT id FROM {schema}.dlq d
WHERE {schema}.dlq_matches(d, %(task)s::text, %(queue)s::text, %(job_key)s::text, %(reason)s::text,
                           %(exception)s::text, %(status)s::text, %(since)s::timestamptz,
                           %(until)s::timestamptz, %(ids)s::bigint[])
ORDER BY id
LIMIT %(limit)s

-- name: get
SELECT id, task_id, task_name, queue, exchange, routing_key, priority, serial_key, reason,
       exception_type, exception_message, traceback, message, retries, delivery_count,
       failure_count, status, notes, source, broker_message_id, worker, first_failed_at,
       last_failed_at, requeue_count, requeued_at, resolved_at, max_retries, published_at, job_key,
       unrecovered
FROM {schema}.dlq WHERE id = %(id)s

-- name: lock_for_requeue
SELECT id, task_id, task_name, queue, exchange, routing_key, priority, serial_key, message,
       status, source
FROM {schema}.dlq WHERE id = %(id)s FOR UPDATE

-- name: mark_requeued
-- %(seen_failures)s: the failure_count read before publishing (send_task path).  If a
-- failure of the new run was captured meanwhile, the row stays 'dead'.
UPDATE {schema}.dlq
SET status = CASE WHEN %(seen_failures)s::integer IS NULL OR failure_count = %(seen_failures)s::integer
                  THEN 'requeued' ELSE status END,
    requeue_count = requeue_count + 1, requeued_at = now(),
    notes = CASE WHEN %(note)s::text IS NULL THEN notes ELSE array_append(notes, %(note)s::text) END
WHERE id = %(id)s
RETURNING requeue_count

-- name: waiting_job
-- The task id of the waiting (undelivered) message holding a job key, if any.
SELECT {schema}.dlq_text({schema}.dlq_json(payload), 'headers', 'id')
FROM {schema}.messages WHERE job_key = %(job_key)s AND lock_token IS NULL

-- name: resolve
-- A requeued message succeeded.
UPDATE {schema}.dlq SET status = 'resolved', resolved_at = now()
WHERE status = 'requeued' AND (id = %(id)s OR (%(id)s::bigint IS NULL AND task_id = %(task_id)s))
RETURNING id

-- name: requeue_undone
-- The requeued message never ran (revoked, expired or discarded when it arrived): the
-- entry is dead again, with a note saying why; nothing else will ever resolve it.
UPDATE {schema}.dlq SET status = 'dead', notes = array_append(notes, %(note)s::text)
WHERE id = %(id)s AND status = 'requeued'
RETURNING id

-- name: add_note
UPDATE {schema}.dlq SET notes = array_append(notes, %(note)s::text) WHERE id = %(id)s RETURNING id

-- name: delete
-- One round trip; the task id is remembered so the backstop sweep leaves it alone.
WITH gone AS (
    DELETE FROM {schema}.dlq WHERE id = ANY(%(ids)s::bigint[]) RETURNING id, task_id
), tomb AS (
    INSERT INTO {schema}.dlq_tombstones (task_id)
    SELECT task_id FROM gone WHERE task_id IS NOT NULL
    ON CONFLICT (task_id) DO UPDATE SET deleted_at = now()
)
SELECT id FROM gone

-- name: stats_totals
SELECT count(*), coalesce(sum(failure_count), 0),
       count(*) FILTER (WHERE status = 'dead'),
       count(*) FILTER (WHERE status = 'requeued'),
       count(*) FILTER (WHERE status = 'resolved'),
       min(first_failed_at), max(last_failed_at),
       min(last_failed_at) FILTER (WHERE status = 'dead')
FROM {schema}.dlq

-- name: stats_by_task
SELECT coalesce(task_name, ''), count(*), coalesce(sum(failure_count), 0) FROM {schema}.dlq
GROUP BY 1 ORDER BY 2 DESC, 1

-- name: stats_by_reason
SELECT reason, count(*), coalesce(sum(failure_count), 0) FROM {schema}.dlq
GROUP BY 1 ORDER BY 2 DESC, 1

-- name: metrics_size
-- One query per scrape: size and oldest dead row per (reason, queue kind, task).
SELECT reason, CASE WHEN serial_key IS NULL THEN 'parallel' ELSE 'serial' END,
       coalesce(task_name, ''), count(*),
       coalesce(extract(epoch FROM now() - min(last_failed_at)), 0)
FROM {schema}.dlq WHERE status = 'dead'
GROUP BY 1, 2, 3

-- name: metrics_added
SELECT task_name, reason, queue_kind, added FROM {schema}.dlq_counters
