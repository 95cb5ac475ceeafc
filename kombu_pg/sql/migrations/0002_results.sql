-- Result backend tables: task results, saved groups, chord counters and chord parts.
-- {schema} is replaced by the quoted schema identifier.
--
-- Every payload column is bytea holding the bytes Celery's result serializer produced
-- (json, pickle, msgpack...), optionally compressed (result_compression); the row says
-- which serializer wrote it, so a change of result_serializer keeps old rows readable.

CREATE TABLE {schema}.results (
    task_id          text PRIMARY KEY,
    status           text NOT NULL,
    content_type     text NOT NULL,
    content_encoding text NOT NULL,
    result           bytea,
    traceback        text,
    children         bytea,
    -- Set when a ready state (SUCCESS, FAILURE, REVOKED...) is stored.
    date_done        timestamptz,
    -- Set the first time STARTED is stored (task_track_started), kept afterwards.
    date_started     timestamptz,
    -- result_extended fields; args and kwargs are serialized like the result.
    name             text,
    args             bytea,
    kwargs           bytea,
    worker           text,
    retries          integer,
    queue            text,
    group_id         text,
    parent_id        text,
    -- Anything else Celery puts in the meta (stamped headers), serialized as a dict.
    extra            bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- NULL: never expires.  Rows past this time read as PENDING and are deleted by
    -- celery.backend_cleanup.
    expires_at       timestamptz
);

CREATE INDEX results_expires_idx ON {schema}.results (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX results_group_idx ON {schema}.results (group_id) WHERE group_id IS NOT NULL;

-- GroupResult.save(): the group's result tuple (as_tuple()), serialized.
CREATE TABLE {schema}.groups (
    group_id         text PRIMARY KEY,
    content_type     text NOT NULL,
    content_encoding text NOT NULL,
    result           bytea NOT NULL,
    date_done        timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz
);

CREATE INDEX groups_expires_idx ON {schema}.groups (expires_at) WHERE expires_at IS NOT NULL;

-- One row per chord (keyed by the header's group id): the atomic counter.
-- size comes from set_chord_size(); done counts distinct header parts that returned;
-- fired_by is the claim token of the one on_chord_part_return call that sends the body.
CREATE TABLE {schema}.chords (
    group_id         text PRIMARY KEY,
    size             integer,
    done             integer NOT NULL DEFAULT 0,
    -- The header's task ids in header order: the body gets the values in this order.
    task_ids         text[],
    -- A header holding nested groups is saved so the body gets the nested structure.
    header           bytea,
    content_type     text,
    content_encoding text,
    fired_by         uuid,
    fired_at         timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz
);

CREATE INDEX chords_expires_idx ON {schema}.chords (expires_at) WHERE expires_at IS NOT NULL;

-- The value each header part returned, kept until the body is sent.  The primary key
-- makes a redelivered part count once.
CREATE TABLE {schema}.chord_parts (
    group_id         text NOT NULL,
    task_id          text NOT NULL,
    -- Position in the header (request.group_index); 2147483647 when unknown.
    group_index      integer NOT NULL,
    id               bigint GENERATED ALWAYS AS IDENTITY,
    state            text NOT NULL,
    content_type     text NOT NULL,
    content_encoding text NOT NULL,
    result           bytea,
    expires_at       timestamptz,
    PRIMARY KEY (group_id, task_id, group_index)
);

CREATE INDEX chord_parts_expires_idx ON {schema}.chord_parts (expires_at) WHERE expires_at IS NOT NULL;
