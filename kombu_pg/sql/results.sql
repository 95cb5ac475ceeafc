-- Named queries of the kombu-pg result backend.  Each starts with "-- name: <name>".
-- {schema} is the quoted schema identifier; values are always bound parameters.
-- A row whose expires_at has passed is treated as gone even before cleanup deletes it.

-- name: store_result
-- Insert or update one task's state.  A stored SUCCESS is never overwritten (a
-- redelivered task that runs again must not replace its first result) unless it has
-- expired.  The NOTIFY (payload: the task id) is sent by the same transaction, so a
-- waiter that hears it always reads the new row.  No row back: the write was skipped.
WITH stored AS (
    INSERT INTO {schema}.results AS r (
        task_id, status, content_type, content_encoding, result, traceback, children,
        date_done, date_started, name, args, kwargs, worker, retries, queue, group_id,
        parent_id, extra, expires_at)
    VALUES (
        %(task_id)s, %(status)s, %(content_type)s, %(content_encoding)s, %(result)s,
        %(traceback)s, %(children)s,
        CASE WHEN %(ready)s THEN now() END,
        CASE WHEN %(started)s THEN now() END,
        %(name)s, %(args)s, %(kwargs)s, %(worker)s, %(retries)s, %(queue)s,
        %(group_id)s, %(parent_id)s, %(extra)s,
        now() + make_interval(secs => %(expires)s))
    ON CONFLICT (task_id) DO UPDATE SET
        status = EXCLUDED.status,
        content_type = EXCLUDED.content_type,
        content_encoding = EXCLUDED.content_encoding,
        result = EXCLUDED.result,
        traceback = EXCLUDED.traceback,
        children = EXCLUDED.children,
        date_done = EXCLUDED.date_done,
        date_started = COALESCE(r.date_started, EXCLUDED.date_started),
        name = COALESCE(EXCLUDED.name, r.name),
        args = COALESCE(EXCLUDED.args, r.args),
        kwargs = COALESCE(EXCLUDED.kwargs, r.kwargs),
        worker = COALESCE(EXCLUDED.worker, r.worker),
        retries = COALESCE(EXCLUDED.retries, r.retries),
        queue = COALESCE(EXCLUDED.queue, r.queue),
        group_id = COALESCE(EXCLUDED.group_id, r.group_id),
        parent_id = COALESCE(EXCLUDED.parent_id, r.parent_id),
        extra = COALESCE(EXCLUDED.extra, r.extra),
        updated_at = now(),
        expires_at = EXCLUDED.expires_at
    WHERE r.status <> 'SUCCESS' OR r.expires_at <= now()
    RETURNING r.task_id
)
SELECT task_id, CASE WHEN %(notify)s THEN pg_notify(%(channel)s, task_id) END FROM stored

-- name: get_result
SELECT task_id, status, content_type, content_encoding, result, traceback, children,
       date_done, date_started, name, args, kwargs, worker, retries, queue, group_id,
       parent_id, extra
FROM {schema}.results
WHERE task_id = %(task_id)s AND (expires_at IS NULL OR expires_at > now())

-- name: get_results
-- The rows of the given ids that are in one of the given states (one round trip).
SELECT task_id, status, content_type, content_encoding, result, traceback, children,
       date_done, date_started, name, args, kwargs, worker, retries, queue, group_id,
       parent_id, extra
FROM {schema}.results
WHERE task_id = ANY(%(task_ids)s::text[]) AND status = ANY(%(states)s::text[])
  AND (expires_at IS NULL OR expires_at > now())

-- name: result_exists
SELECT EXISTS (
    SELECT 1 FROM {schema}.results
    WHERE task_id = %(task_id)s AND (expires_at IS NULL OR expires_at > now())
)

-- name: forget
DELETE FROM {schema}.results WHERE task_id = %(task_id)s

-- name: save_group
INSERT INTO {schema}.groups AS g (group_id, content_type, content_encoding, result, expires_at)
VALUES (%(group_id)s, %(content_type)s, %(content_encoding)s, %(result)s,
        now() + make_interval(secs => %(expires)s))
ON CONFLICT (group_id) DO UPDATE SET
    content_type = EXCLUDED.content_type,
    content_encoding = EXCLUDED.content_encoding,
    result = EXCLUDED.result,
    date_done = now(),
    expires_at = EXCLUDED.expires_at

-- name: get_group
SELECT content_type, content_encoding, result, date_done
FROM {schema}.groups
WHERE group_id = %(group_id)s AND (expires_at IS NULL OR expires_at > now())

-- name: delete_group
DELETE FROM {schema}.groups WHERE group_id = %(group_id)s

-- name: chord_start
-- apply_chord(), before any header task is sent: a new run of this chord, so any
-- state left by an earlier run of the same (frozen) chord is reset.
WITH gone AS (
    DELETE FROM {schema}.chord_parts WHERE group_id = %(group_id)s
)
INSERT INTO {schema}.chords AS c (
    group_id, task_ids, header, content_type, content_encoding, expires_at)
VALUES (%(group_id)s, %(task_ids)s::text[], %(header)s, %(content_type)s, %(content_encoding)s,
        now() + make_interval(secs => %(expires)s))
ON CONFLICT (group_id) DO UPDATE SET
    size = NULL, done = 0, fired_by = NULL, fired_at = NULL, added = NULL,
    task_ids = EXCLUDED.task_ids,
    header = EXCLUDED.header,
    content_type = EXCLUDED.content_type,
    content_encoding = EXCLUDED.content_encoding,
    created_at = now(),
    expires_at = EXCLUDED.expires_at

-- name: chord_size
-- set_chord_size(): called before the last header task is sent, so parts that returned
-- earlier are already counted.  A chord that already fired is a new run: start over.
INSERT INTO {schema}.chords AS c (group_id, size, expires_at)
VALUES (%(group_id)s, %(size)s, now() + make_interval(secs => %(expires)s))
ON CONFLICT (group_id) DO UPDATE SET
    size = EXCLUDED.size,
    done = CASE WHEN c.fired_by IS NULL THEN c.done ELSE 0 END,
    header = CASE WHEN c.fired_by IS NULL THEN c.header END,
    task_ids = CASE WHEN c.fired_by IS NULL THEN c.task_ids END,
    added = CASE WHEN c.fired_by IS NULL THEN c.added END,
    fired_by = NULL,
    fired_at = NULL,
    expires_at = EXCLUDED.expires_at

-- name: chord_add
-- Task.add_to_chord(): one more part, the added task, must return before the body is
-- sent.  Counted as a part owed (done - 1), so a later set_chord_size() cannot overwrite
-- it; the header task adding it has not returned yet, so the chord cannot have fired.
-- The added task's id goes into `added` and an id already there changes nothing: the
-- statement run again after a lost reply (its first run committed) counts it once.
INSERT INTO {schema}.chords AS c (group_id, done, added, expires_at)
VALUES (%(group_id)s, -1, ARRAY[%(task_id)s::text], now() + make_interval(secs => %(expires)s))
ON CONFLICT (group_id) DO UPDATE SET
    done = c.done - 1,
    added = array_append(c.added, %(task_id)s::text),
    expires_at = EXCLUDED.expires_at
WHERE c.added IS NULL OR NOT %(task_id)s::text = ANY(c.added)

-- name: chord_part_return
-- One header part returned: record its value once (a redelivered part is not counted
-- twice), bump the counter, and claim the body for this call when the counter reaches
-- the chord size.  The row lock on the chord serializes concurrent parts, so exactly
-- one call sees the claim.  The token is unique per call and reused when the call is
-- retried after a lost connection, so an ambiguous commit still fires the body once.
WITH part AS (
    INSERT INTO {schema}.chord_parts (
        group_id, task_id, group_index, state, content_type, content_encoding, result,
        expires_at)
    SELECT %(group_id)s, %(task_id)s, %(group_index)s, %(state)s, %(content_type)s,
           %(content_encoding)s, %(result)s, now() + make_interval(secs => %(expires)s)
    WHERE NOT EXISTS (
        SELECT 1 FROM {schema}.chords
        WHERE group_id = %(group_id)s AND fired_by IS NOT NULL
    )
    ON CONFLICT (group_id, task_id, group_index) DO NOTHING
    RETURNING 1
), added AS (
    SELECT count(*)::integer AS n FROM part
)
INSERT INTO {schema}.chords AS c (group_id, size, done, fired_by, fired_at, expires_at)
SELECT %(group_id)s, %(size)s::integer, added.n,
       CASE WHEN added.n >= %(size)s::integer THEN %(token)s::uuid END,
       CASE WHEN added.n >= %(size)s::integer THEN now() END,
       now() + make_interval(secs => %(expires)s)
FROM added
ON CONFLICT (group_id) DO UPDATE SET
    size = COALESCE(c.size, EXCLUDED.size),
    done = c.done + EXCLUDED.done,
    fired_by = CASE
        WHEN c.fired_by IS NULL AND c.done + EXCLUDED.done >= COALESCE(c.size, EXCLUDED.size)
        THEN %(token)s::uuid ELSE c.fired_by END,
    fired_at = CASE
        WHEN c.fired_by IS NULL AND c.done + EXCLUDED.done >= COALESCE(c.size, EXCLUDED.size)
        THEN now() ELSE c.fired_at END,
    expires_at = EXCLUDED.expires_at
RETURNING c.done, c.size, COALESCE(c.fired_by = %(token)s::uuid, false) AS claimed

-- name: chord_header
SELECT header, content_type, content_encoding FROM {schema}.chords WHERE group_id = %(group_id)s

-- name: chord_parts
-- The returned header values in header order: the position of the task id in the
-- header saved by chord_start, then group_index, then arrival.
WITH header AS (
    SELECT h.task_id, min(h.pos) AS pos
    FROM {schema}.chords c, unnest(c.task_ids) WITH ORDINALITY AS h (task_id, pos)
    WHERE c.group_id = %(group_id)s
    GROUP BY h.task_id
)
SELECT p.task_id, p.state, p.content_type, p.content_encoding, p.result
FROM {schema}.chord_parts p LEFT JOIN header ON header.task_id = p.task_id
WHERE p.group_id = %(group_id)s
ORDER BY header.pos NULLS LAST, p.group_index, p.id

-- name: chord_finish
-- The body was sent (or failed): drop the parts, keep the chord row as a marker so a
-- late copy of a header task cannot fire the body again, until it expires.
WITH gone AS (
    DELETE FROM {schema}.chord_parts WHERE group_id = %(group_id)s
)
UPDATE {schema}.chords
SET header = NULL, task_ids = NULL, added = NULL,
    expires_at = now() + make_interval(secs => %(expires)s)
WHERE group_id = %(group_id)s

-- name: cleanup_results
-- Batched, oldest first, through results_expires_idx; rows locked elsewhere are skipped.
DELETE FROM {schema}.results
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {schema}.results
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))

-- name: cleanup_groups
DELETE FROM {schema}.groups
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {schema}.groups
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))

-- name: cleanup_chords
DELETE FROM {schema}.chords
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {schema}.chords
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))

-- name: cleanup_chord_parts
DELETE FROM {schema}.chord_parts
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {schema}.chord_parts
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))

-- name: try_cleanup_lock
-- One piggy-backed cleanup at a time per schema (held until the transaction ends).
SELECT pg_try_advisory_xact_lock(hashtextextended('kombu_pg:results-cleanup:' || %(schema)s, 0))

-- name: count_rows
SELECT (SELECT count(*) FROM {schema}.results),
       (SELECT count(*) FROM {schema}.groups),
       (SELECT count(*) FROM {schema}.chords),
       (SELECT count(*) FROM {schema}.chord_parts)
