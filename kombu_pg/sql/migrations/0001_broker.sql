-- Broker tables: queues, exchanges, bindings, messages, consumers, invalid messages.

CREATE TABLE {schema}.queues (
    name           text PRIMARY KEY,
    durable        boolean NOT NULL DEFAULT true,
    exclusive      boolean NOT NULL DEFAULT false,
    auto_delete    boolean NOT NULL DEFAULT false,
    message_ttl_ms bigint CHECK (message_ttl_ms >= 0),
    expires_ms     bigint CHECK (expires_ms > 0),
    max_priority   smallint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_used_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX queues_expiring_idx ON {schema}.queues (last_used_at) WHERE expires_ms IS NOT NULL;

CREATE TABLE {schema}.exchanges (
    name        text PRIMARY KEY,
    type        text NOT NULL CHECK (type IN ('direct', 'topic', 'fanout')),
    durable     boolean NOT NULL DEFAULT true,
    auto_delete boolean NOT NULL DEFAULT false
);

CREATE TABLE {schema}.bindings (
    exchange    text NOT NULL,
    queue       text NOT NULL REFERENCES {schema}.queues (name) ON DELETE CASCADE,
    routing_key text NOT NULL DEFAULT '',
    -- POSIX regex for topic bindings (Kombu's key_to_pattern), NULL otherwise.
    pattern     text,
    PRIMARY KEY (exchange, queue, routing_key)
);

CREATE INDEX bindings_queue_idx ON {schema}.bindings (queue);

-- Consumers: one row per claiming session.  The row's owner holds the session-level
-- advisory lock (namespace, id); a free lock means the owner is gone.
CREATE SEQUENCE {schema}.consumer_ids AS integer CYCLE;

CREATE TABLE {schema}.consumers (
    id         integer PRIMARY KEY,
    hostname   text NOT NULL,
    pid        integer NOT NULL,
    backend_pid integer NOT NULL DEFAULT pg_backend_pid(),
    started_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.messages (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue          text NOT NULL,
    -- AMQP semantics: 0-9, higher is delivered first.
    priority       smallint NOT NULL DEFAULT 0,
    -- The Kombu message as JSON text (jsonb rejects \u0000, which Celery headers can carry).
    payload        text NOT NULL,
    serial_key     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- Delayed delivery: not claimable before this time (NULL: now).
    visible_at     timestamptz,
    expires_at     timestamptz,
    delivery_count integer NOT NULL DEFAULT 0,
    lock_token     uuid,
    locked_by      integer,
    locked_at      timestamptz
);

-- The ready path: unlocked, undelayed, unkeyed rows in claim order.
CREATE INDEX messages_ready_idx ON {schema}.messages (queue, priority DESC, id)
    WHERE lock_token IS NULL AND visible_at IS NULL AND serial_key IS NULL;
CREATE INDEX messages_delayed_idx ON {schema}.messages (visible_at)
    WHERE visible_at IS NOT NULL AND lock_token IS NULL;
CREATE INDEX messages_expiring_idx ON {schema}.messages (expires_at)
    WHERE expires_at IS NOT NULL AND lock_token IS NULL;
CREATE UNIQUE INDEX messages_lock_token_idx ON {schema}.messages (lock_token)
    WHERE lock_token IS NOT NULL;
CREATE INDEX messages_locked_by_idx ON {schema}.messages (locked_by, locked_at)
    WHERE lock_token IS NOT NULL;

-- Rows a consumer could not decode are moved here whole instead of being dropped.
CREATE TABLE {schema}.invalid_messages (
    id         bigint PRIMARY KEY,
    queue      text NOT NULL,
    payload    text NOT NULL,
    error      text NOT NULL,
    moved_at   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE {schema}.messages SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_cost_delay = 0
);
