-- Periodic tasks kept in the database (kombu_pg.beat.Scheduler).
--
-- Any number of beats share these rows.  A beat publishes a tick (an entry at one due
-- time) in the transaction that inserts its beat_ticks row and moves the entry's
-- next_due, so a second beat finds the tick taken and publishes nothing.

-- One periodic task.  schedule is the JSON of the Celery schedule's parameters (never a
-- pickle); next_due is computed from the database clock.
CREATE TABLE {schema}.beat_entries (
    name         text PRIMARY KEY,
    task         text NOT NULL,
    schedule     jsonb NOT NULL,
    args         jsonb NOT NULL DEFAULT '[]',
    kwargs       jsonb NOT NULL DEFAULT '{{}}',
    options      jsonb NOT NULL DEFAULT '{{}}',
    enabled      boolean NOT NULL DEFAULT true,
    -- What a beat does with ticks that fell due while no beat ran.
    missed       text NOT NULL DEFAULT 'once' CHECK (missed IN ('skip', 'once', 'catchup')),
    -- 'config': synced from beat_schedule at beat start; 'api': added at runtime.
    source       text NOT NULL DEFAULT 'api' CHECK (source IN ('config', 'api')),
    next_due     timestamptz NOT NULL,
    last_due     timestamptz,
    last_run_at  timestamptz,
    last_task_id text,
    last_beat    text,
    run_count    bigint NOT NULL DEFAULT 0
);

CREATE INDEX beat_entries_due_idx ON {schema}.beat_entries (next_due) WHERE enabled;

-- Every tick published, by which beat (or 'run-now' caller).  The primary key is what makes
-- a tick publish once: a second insert of the same (entry, due) fails its transaction.
CREATE TABLE {schema}.beat_ticks (
    entry        text NOT NULL REFERENCES {schema}.beat_entries (name) ON DELETE CASCADE,
    due          timestamptz NOT NULL,
    beat         text NOT NULL,
    task_id      text NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entry, due)
);
