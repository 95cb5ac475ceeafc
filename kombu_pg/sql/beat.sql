-- Named queries of the database scheduler (kombu_pg/beat).  Every time comes from the
-- database clock: a beat passes no time of its own.

-- name: now
SELECT now() AS now

-- name: claim_due
-- One due entry, locked for this transaction.  SKIP LOCKED: another beat publishing it
-- makes this one move on; once that beat commits, next_due has moved past now() and the
-- recheck of the WHERE on the new row version excludes it.
SELECT name, task, schedule, args, kwargs, options, missed, next_due, now() AS now
FROM {schema}.beat_entries
WHERE enabled AND next_due <= now()
ORDER BY next_due
LIMIT 1
FOR UPDATE SKIP LOCKED

-- name: record_tick
-- The primary key (entry, due) makes a tick publish once even if two beats got here.
INSERT INTO {schema}.beat_ticks (entry, due, beat, task_id)
VALUES (%(entry)s, %(due)s, %(beat)s, %(task_id)s)

-- name: advance
UPDATE {schema}.beat_entries
SET next_due = coalesce(%(next_due)s, next_due), last_due = coalesce(%(last_due)s, last_due),
    last_run_at = now(), last_task_id = %(task_id)s, last_beat = %(beat)s,
    run_count = run_count + %(runs)s
WHERE name = %(name)s

-- name: prune
-- The entry's tick records older than the kept period (primary-key range, so cheap enough
-- to run with every publish).
DELETE FROM {schema}.beat_ticks
WHERE entry = %(name)s AND due < now() - make_interval(secs => %(keep)s)

-- name: skip
-- Ticks skipped (by the entry's policy, or because publishing failed): only the due time
-- moves, and only from the due time this beat saw, never over another beat's advance.
UPDATE {schema}.beat_entries SET next_due = %(next_due)s
WHERE name = %(name)s AND next_due = %(due)s

-- name: next_wakeup
-- Seconds until the earliest enabled entry is due (NULL: none).
SELECT greatest(extract(epoch FROM min(next_due) - now()), 0)::float8 AS seconds
FROM {schema}.beat_entries WHERE enabled

-- name: upsert
-- A changed schedule restarts the entry's due time; otherwise its due time, run history and
-- enabled flag survive a beat restart.
INSERT INTO {schema}.beat_entries
    (name, task, schedule, args, kwargs, options, missed, source, enabled, next_due)
VALUES (%(name)s, %(task)s, %(schedule)s, %(args)s, %(kwargs)s, %(options)s, %(missed)s,
        %(source)s, %(enabled)s, %(next_due)s)
ON CONFLICT (name) DO UPDATE SET
    task = EXCLUDED.task, schedule = EXCLUDED.schedule, args = EXCLUDED.args,
    kwargs = EXCLUDED.kwargs, options = EXCLUDED.options, missed = EXCLUDED.missed,
    source = EXCLUDED.source,
    next_due = CASE WHEN beat_entries.schedule = EXCLUDED.schedule THEN beat_entries.next_due
                    ELSE EXCLUDED.next_due END

-- name: drop_stale_config
-- Entries synced from a beat_schedule that no longer has them.
DELETE FROM {schema}.beat_entries WHERE source = 'config' AND NOT (name = ANY(%(names)s))

-- name: get
SELECT name, task, schedule, args, kwargs, options, enabled, missed, source, next_due, last_due,
       last_run_at, last_task_id, last_beat, run_count
FROM {schema}.beat_entries WHERE name = %(name)s

-- name: list
SELECT name, task, schedule, args, kwargs, options, enabled, missed, source, next_due, last_due,
       last_run_at, last_task_id, last_beat, run_count
FROM {schema}.beat_entries ORDER BY name

-- name: set_enabled
-- Enabling restarts the due time from now, so a long-disabled entry does not count its
-- disabled time as missed ticks.
UPDATE {schema}.beat_entries
SET enabled = %(enabled)s,
    next_due = CASE WHEN %(enabled)s AND NOT enabled THEN %(next_due)s ELSE next_due END
WHERE name = %(name)s

-- name: remove
DELETE FROM {schema}.beat_entries WHERE name = %(name)s

-- name: lock_entry
SELECT name, task, schedule, args, kwargs, options, missed, next_due, now() AS now
FROM {schema}.beat_entries WHERE name = %(name)s FOR UPDATE
