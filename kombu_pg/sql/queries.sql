-- Named queries of the kombu-pg store.  Each starts with "-- name: <name>".
-- {schema} is the quoted schema identifier; values are always bound parameters.

-- name: declare_queue
-- owner: the declaring session's consumer id, for exclusive and auto-delete queues (they
-- live as long as that session or a consumer, see unused_queues).
INSERT INTO {schema}.queues (name, durable, exclusive, auto_delete, message_ttl_ms, expires_ms, max_priority,
                             owner)
VALUES (%(name)s, %(durable)s, %(exclusive)s, %(auto_delete)s, %(message_ttl_ms)s, %(expires_ms)s, %(max_priority)s,
        %(owner)s)
ON CONFLICT (name) DO UPDATE
SET durable = EXCLUDED.durable, exclusive = EXCLUDED.exclusive, auto_delete = EXCLUDED.auto_delete,
    message_ttl_ms = EXCLUDED.message_ttl_ms, expires_ms = EXCLUDED.expires_ms,
    max_priority = EXCLUDED.max_priority, owner = EXCLUDED.owner, last_used_at = now()

-- name: queue_exists
SELECT EXISTS (SELECT 1 FROM {schema}.queues WHERE name = %(name)s)
    OR EXISTS (SELECT 1 FROM {schema}.messages WHERE queue = %(name)s)

-- name: touch_queues
-- A basic.get uses the queue (x-expires counts from then).
UPDATE {schema}.queues SET last_used_at = now()
WHERE name = ANY(%(names)s) AND expires_ms IS NOT NULL

-- name: consume_queue
-- The consumer (a registered session) consumes the queue: it is in use as long as that
-- session lives, whatever its loop is doing.  Nothing happens for an undeclared queue.
WITH used AS (
    UPDATE {schema}.queues SET last_used_at = now() WHERE name = %(queue)s RETURNING name
)
INSERT INTO {schema}.queue_consumers (queue, consumer)
SELECT name, %(consumer)s FROM used
ON CONFLICT DO NOTHING

-- name: cancel_queue
-- The consumer stopped consuming the queue (x-expires counts from now: migration trigger).
DELETE FROM {schema}.queue_consumers WHERE queue = %(queue)s AND consumer = %(consumer)s

-- name: delete_queues
-- The queues, their bindings (cascade) and all their messages, in flight ones too.
-- Returns, per queue, the unlocked messages delivered %(poison)s times or more that were
-- deleted (poison nothing captured; a NULL limit: none).
WITH gone_queues AS (
    DELETE FROM {schema}.queues WHERE name = ANY(%(names)s::text[])
), gone AS (
    DELETE FROM {schema}.messages WHERE queue = ANY(%(names)s::text[])
    RETURNING queue, lock_token, delivery_count
)
SELECT queue, count(*) FROM gone
WHERE lock_token IS NULL AND delivery_count >= %(poison)s
GROUP BY queue

-- name: declare_exchange
INSERT INTO {schema}.exchanges (name, type, durable, auto_delete)
VALUES (%(name)s, %(type)s, %(durable)s, %(auto_delete)s)
ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type, durable = EXCLUDED.durable,
    auto_delete = EXCLUDED.auto_delete

-- name: exchange_type
SELECT type FROM {schema}.exchanges WHERE name = %(name)s

-- name: list_exchanges
SELECT name FROM {schema}.exchanges ORDER BY name

-- name: delete_exchange
WITH gone AS (DELETE FROM {schema}.bindings WHERE exchange = %(name)s)
DELETE FROM {schema}.exchanges WHERE name = %(name)s

-- name: bind
-- The queue and exchange rows are created if missing, in the same statement: one
-- statement, never a transaction, since the connection is shared by threads whose
-- statements would land inside it.
WITH queue AS (
    INSERT INTO {schema}.queues (name) VALUES (%(queue)s) ON CONFLICT (name) DO NOTHING
), exchange AS (
    INSERT INTO {schema}.exchanges (name, type) VALUES (%(exchange)s, %(type)s) ON CONFLICT (name) DO NOTHING
)
INSERT INTO {schema}.bindings (exchange, queue, routing_key, pattern)
VALUES (%(exchange)s, %(queue)s, %(routing_key)s, %(pattern)s)
ON CONFLICT (exchange, queue, routing_key) DO UPDATE SET pattern = EXCLUDED.pattern

-- name: unbind
DELETE FROM {schema}.bindings
WHERE exchange = %(exchange)s AND queue = %(queue)s AND routing_key = %(routing_key)s

-- name: bindings_for_exchange
SELECT routing_key, pattern, queue FROM {schema}.bindings WHERE exchange = %(exchange)s
ORDER BY queue, routing_key

-- name: list_bindings
SELECT queue, exchange, routing_key FROM {schema}.bindings ORDER BY exchange, queue, routing_key

-- name: wake
-- Whether a publish to `queue` notifies (a fragment of publish and publish_routed): as
-- %(notify)s says when it is set; else always for a delayed message (its NOTIFY announces
-- a due time to every consumer), and only when a consumer of the queue is idle.  An idle
-- consumer holds a shared advisory lock on (idle, queue); taking it exclusively and
-- releasing it at once fails only then.  Before looking, the publish takes a shared lock
-- on (publishing, queue) until it commits (or notifies when it cannot: a consumer is
-- going idle right now), which a consumer going idle waits for (mark_idle): see
-- BrokerStore.mark_idle for why no wake-up is lost.  CASE: evaluated in this order.
CASE WHEN %(notify)s::boolean IS NOT NULL THEN %(notify)s::boolean
     WHEN %(notify_payload)s::text IS NOT NULL THEN true
     WHEN NOT pg_try_advisory_xact_lock_shared(hashtext(%(publishing)s), hashtext(queue)) THEN true
     WHEN pg_try_advisory_lock(hashtext(%(idle)s), hashtext(queue))
         THEN NOT pg_advisory_unlock(hashtext(%(idle)s), hashtext(queue))
     ELSE true END

-- name: publish
-- One message to one queue.  TTL: the sooner of the message's and the queue's.
WITH inserted AS (
    INSERT INTO {schema}.messages (queue, priority, payload, serial_key, visible_at, expires_at)
    -- x-max-priority: higher priorities count as the queue's maximum (AMQP).
    SELECT %(queue)s, LEAST(%(priority)s, coalesce(q.max_priority, 255)), %(payload)s, %(serial_key)s,
           -- Delayed delivery: invisible until then (NULL or past: ready now).
           CASE WHEN %(visible_at)s::timestamptz > now() THEN %(visible_at)s::timestamptz END,
           LEAST(now() + make_interval(secs => %(ttl)s),
                 now() + make_interval(secs => q.message_ttl_ms / 1000.0))
    FROM (VALUES (1)) AS one (x) LEFT JOIN {schema}.queues q ON q.name = %(queue)s
    RETURNING queue
)
SELECT CASE WHEN {wake} THEN pg_notify(%(notify_channel)s, coalesce(%(notify_payload)s, queue)) END
FROM inserted

-- name: publish_routed
-- One message to every queue bound to the exchange whose binding matches (route(),
-- migration *_route_and_dlq_filter.sql).
WITH targets AS (
    SELECT queue FROM {schema}.route(%(exchange)s, %(routing_key)s) AS queue
), inserted AS (
    INSERT INTO {schema}.messages (queue, priority, payload, serial_key, visible_at, expires_at)
    SELECT t.queue, LEAST(%(priority)s, coalesce(q.max_priority, 255)), %(payload)s, %(serial_key)s,
           -- Delayed delivery: invisible until then (NULL or past: ready now).
           CASE WHEN %(visible_at)s::timestamptz > now() THEN %(visible_at)s::timestamptz END,
           LEAST(now() + make_interval(secs => %(ttl)s),
                 now() + make_interval(secs => q.message_ttl_ms / 1000.0))
    FROM targets t LEFT JOIN {schema}.queues q ON q.name = t.queue
    RETURNING queue
)
SELECT queue, CASE WHEN {wake} THEN pg_notify(%(notify_channel)s, coalesce(%(notify_payload)s, queue)) END
FROM inserted

-- name: claim
-- Ack the given lock tokens (often none), then lock up to `limit` ready messages of one
-- queue for this consumer: one round trip and one commit per batch (see migrations 0004
-- and 0006 for the serial-key protocol and when the commit waits for the WAL flush).
SELECT * FROM {schema}.ack_and_claim(%(acks)s::uuid[], %(channel)s, %(durable)s,
                                     %(queue)s, %(limit)s, %(consumer)s,
                                     coalesce(%(max_deliveries)s, 2147483647), hashtext(%(namespace)s))

-- name: ack
-- Delete by lock token; acking a keyed message frees its key, so that queue's consumers
-- are woken for the key's next message (migration 0006).
SELECT queue FROM {schema}.ack(%(tokens)s::uuid[], %(channel)s, %(durable)s) AS queue

-- name: requeue
-- Unlock in place (never a copy): the message keeps its id, so its position.  One with a
-- job key whose key has a waiting message is superseded instead (the unlock function of
-- migration *_unlock_job_keys.sql).
SELECT * FROM {schema}.unlock(%(tokens)s::uuid[], %(channel)s)

-- name: quarantine
-- Move a message that cannot be decoded out of the way, whole, in one statement.  Like an
-- ack, this frees its serial key: the queue is woken for the key's next message.
WITH moved AS (
    DELETE FROM {schema}.messages WHERE lock_token = %(token)s::uuid
    RETURNING id, queue, payload, serial_key
), kept AS (
    INSERT INTO {schema}.invalid_messages (id, queue, payload, error)
    SELECT id, queue, payload, %(error)s FROM moved
)
SELECT pg_notify(%(channel)s, queue) FROM moved WHERE serial_key IS NOT NULL

-- name: purge
-- The queue's ready messages (in-flight ones stay): how many, and how many of them were
-- delivered %(poison)s times or more (poison nothing captured; a NULL limit: none).
WITH gone AS (
    DELETE FROM {schema}.messages WHERE queue = %(queue)s AND lock_token IS NULL
    RETURNING delivery_count
)
SELECT count(*), count(*) FILTER (WHERE delivery_count >= %(poison)s) FROM gone

-- name: size
SELECT count(*) FROM {schema}.messages
WHERE queue = %(queue)s AND lock_token IS NULL AND (expires_at IS NULL OR expires_at > now())

-- name: mark_idle
-- This session's consumer is about to wait for NOTIFYs on these queues (sorted: two
-- consumers take the locks in one order).  Per queue, the shared idle lock first, then
-- the exclusive publishing lock, which waits for every publish that looked before it (and
-- is released when the statement ends).
SELECT pg_advisory_lock_shared(hashtext(%(idle)s), hashtext(q))::text,
       pg_advisory_xact_lock(hashtext(%(publishing)s), hashtext(q))::text
FROM unnest(%(queues)s::text[]) AS q

-- name: mark_busy
-- The consumer is busy on these queues again: publishes to them stop notifying.
SELECT pg_advisory_unlock_shared(hashtext(%(idle)s), hashtext(q)) FROM unnest(%(queues)s::text[]) AS q

-- name: register_consumer
-- The advisory lock is taken before the row exists, so no one can see the row unlocked.
WITH new AS (
    SELECT nextval(%(sequence)s::regclass)::integer AS id
), locked AS (
    SELECT id, pg_advisory_lock(hashtext(%(namespace)s), id)::text AS ignored FROM new
)
INSERT INTO {schema}.consumers (id, hostname, pid)
SELECT id, %(hostname)s, %(pid)s FROM locked
RETURNING id

-- name: unregister_consumer
WITH freed AS (
    SELECT * FROM {schema}.unlock(
        ARRAY(SELECT lock_token FROM {schema}.messages WHERE locked_by = %(id)s AND lock_token IS NOT NULL),
        %(channel)s)
), gone AS (
    DELETE FROM {schema}.consumers WHERE id = %(id)s
)
SELECT * FROM freed

-- name: release_consumer_lock
SELECT pg_advisory_unlock(hashtext(%(namespace)s), %(id)s)

-- name: try_recovery_lock
-- One recovery pass at a time per schema; key 0 is never a consumer id.
SELECT pg_try_advisory_xact_lock(hashtext(%(namespace)s), 0)

-- name: dead_consumers
-- A consumer whose advisory lock we can take is gone.  Never test our own ids: the lock
-- is re-entrant, so it would look free.
SELECT id FROM {schema}.consumers
WHERE CASE WHEN id = ANY(%(own)s::integer[]) THEN false
           ELSE pg_try_advisory_xact_lock(hashtext(%(namespace)s), id) END

-- name: release_stale
-- Unlock messages of dead consumers, orphans, and (optionally) locks older than the
-- visibility timeout; then forget the dead consumers.  By lock token, so a message
-- requeued and claimed again meanwhile keeps its new delivery.
WITH freed AS (
    SELECT * FROM {schema}.unlock(ARRAY(
        SELECT m.lock_token FROM {schema}.messages m
        WHERE m.lock_token IS NOT NULL
          AND (m.locked_by = ANY(%(dead)s::integer[])
               OR NOT EXISTS (SELECT 1 FROM {schema}.consumers c WHERE c.id = m.locked_by)
               OR m.locked_at < now() - make_interval(secs => %(visibility_timeout)s))), %(channel)s)
), gone AS (
    DELETE FROM {schema}.consumers WHERE id = ANY(%(dead)s::integer[])
)
SELECT * FROM freed

-- name: delete_expired_messages
-- x-message-ttl and per-message expiration (Celery's expires=): per queue, how many were
-- deleted and how many of them were delivered %(poison)s times or more (as in purge).
WITH gone AS (
    DELETE FROM {schema}.messages
    WHERE lock_token IS NULL AND expires_at IS NOT NULL AND expires_at <= now()
    RETURNING queue, delivery_count
)
SELECT queue, count(*), count(*) FILTER (WHERE delivery_count >= %(poison)s) FROM gone
GROUP BY queue

-- name: unused_queues
-- Queues to remove now, locked until the pass ends (delete_queues removes them).  Never
-- one with a consumer: a queue_consumers row lives as long as its consumer's session.
-- x-expires (RabbitMQ): no consumer, and not declared, consumed or read (basic.get) for
-- that long.  Exclusive and auto-delete queues: no consumer, and the session that
-- declared them is gone.  SKIP LOCKED: a queue being declared or consumed right now is
-- in use.
SELECT name FROM {schema}.queues q
WHERE NOT EXISTS (SELECT 1 FROM {schema}.queue_consumers c WHERE c.queue = q.name)
  AND ((q.expires_ms IS NOT NULL
        AND q.last_used_at < now() - make_interval(secs => q.expires_ms / 1000.0))
       OR ((q.exclusive OR q.auto_delete) AND q.owner IS NULL))
FOR UPDATE SKIP LOCKED

-- name: set_aside
-- Keep a no-ack message that cannot be decoded (it was already taken from its queue).
INSERT INTO {schema}.invalid_messages (id, queue, payload, error)
VALUES (%(id)s, %(queue)s, %(payload)s, %(error)s)
ON CONFLICT (id) DO NOTHING

-- name: queue_stats
-- One row per queue that is declared or has messages: what an operator wants to see
-- (`pg status`, and the per-queue gauges of kombu_pg.metrics at scrape time).
-- temporary: declared auto-delete, exclusive or with x-expires (pidbox, reply and event
-- queues, whose names carry host names or uuids).  oldest_ready_age: age of the oldest
-- message a consumer could take now (not delayed, not in flight, not poison).
-- Cost: one sequential scan of messages with hash aggregation (per queue and serial key,
-- then per queue); in-flight rows, few, come from the lock_token index.  Counting
-- DISTINCT in the scan itself sorted every queue's rows: ~25 s at 3M messages, not ~3 s.
WITH per_key AS (
    SELECT queue, serial_key,
           count(*) FILTER (WHERE lock_token IS NULL AND visible_at IS NULL
                              AND delivery_count < coalesce(%(max_deliveries)s, 2147483647)) AS ready,
           count(*) FILTER (WHERE lock_token IS NOT NULL) AS in_flight,
           count(*) FILTER (WHERE lock_token IS NULL AND visible_at IS NOT NULL) AS delayed,
           count(*) FILTER (WHERE lock_token IS NULL
                              AND delivery_count >= coalesce(%(max_deliveries)s, 2147483647)) AS poison,
           count(*) FILTER (WHERE lock_token IS NULL) AS waiting,
           min(created_at) FILTER (WHERE lock_token IS NULL) AS oldest,
           min(created_at) FILTER (WHERE lock_token IS NULL AND visible_at IS NULL
                                     AND delivery_count < coalesce(%(max_deliveries)s, 2147483647)) AS oldest_ready
    FROM {schema}.messages
    GROUP BY queue, serial_key
), counts AS (
    SELECT queue, sum(ready) AS ready, sum(in_flight) AS in_flight, sum(delayed) AS delayed,
           sum(poison) AS poison, min(oldest) AS oldest, min(oldest_ready) AS oldest_ready,
           count(serial_key) FILTER (WHERE waiting > 0) AS keys_waiting
    FROM per_key
    GROUP BY queue
), held AS (
    SELECT queue, count(DISTINCT locked_by) AS consumers_holding,
           count(DISTINCT serial_key) AS keys_in_flight
    FROM {schema}.messages
    WHERE lock_token IS NOT NULL
    GROUP BY queue
)
SELECT coalesce(q.name, c.queue) AS queue,
       coalesce(c.ready, 0)::bigint AS ready,
       coalesce(c.in_flight, 0)::bigint AS in_flight,
       coalesce(c.delayed, 0)::bigint AS delayed,
       coalesce(c.poison, 0)::bigint AS poison,
       extract(epoch FROM now() - c.oldest) AS oldest_age,
       coalesce(h.consumers_holding, 0) AS consumers_holding,
       coalesce(h.keys_in_flight, 0) AS keys_in_flight,
       coalesce(c.keys_waiting, 0) AS keys_waiting,
       extract(epoch FROM now() - c.oldest_ready) AS oldest_ready_age,
       coalesce(q.auto_delete OR q.exclusive OR q.expires_ms IS NOT NULL, false) AS temporary
FROM {schema}.queues q
FULL JOIN counts c ON c.queue = q.name
LEFT JOIN held h ON h.queue = coalesce(q.name, c.queue)
ORDER BY 1

-- name: serial_key_stats
-- Keys with messages, busiest first: whether one is in flight and how many wait.
SELECT serial_key, queue,
       bool_or(lock_token IS NOT NULL) AS in_flight,
       count(*) FILTER (WHERE lock_token IS NULL) AS waiting,
       extract(epoch FROM now() - min(created_at)) AS oldest_age
FROM {schema}.messages
WHERE serial_key IS NOT NULL
GROUP BY serial_key, queue
ORDER BY count(*) DESC, serial_key
LIMIT %(limit)s

-- name: consumer_list
SELECT id, hostname, pid, backend_pid, started_at FROM {schema}.consumers ORDER BY id

-- name: invalid_count
SELECT count(*) FROM {schema}.invalid_messages

-- name: promote_due
-- Delayed messages whose time has come become ready; their consumers are woken.
WITH due AS (
    SELECT id FROM {schema}.messages
    WHERE visible_at IS NOT NULL AND visible_at <= now() AND lock_token IS NULL
    ORDER BY visible_at
    LIMIT 10000
    FOR UPDATE SKIP LOCKED
), promoted AS (
    UPDATE {schema}.messages m SET visible_at = NULL FROM due WHERE m.id = due.id
    RETURNING m.queue
)
SELECT queue, pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM promoted) q

-- name: next_due
-- Seconds until the next delayed message is due (NULL: none waiting).
SELECT extract(epoch FROM min(visible_at) - now()) FROM {schema}.messages
WHERE visible_at IS NOT NULL AND lock_token IS NULL

-- name: publish_job
-- One message with a job key, in one statement: insert, or replace the waiting message
-- with the key (keeping its due time for 'preserve_eta'), or ('keep') leave it alone.
-- Returns nothing when dropped.
INSERT INTO {schema}.messages AS m (queue, priority, payload, serial_key, visible_at, expires_at, job_key)
SELECT %(queue)s, LEAST(%(priority)s, coalesce(q.max_priority, 255)), %(payload)s, %(serial_key)s,
       CASE WHEN %(visible_at)s::timestamptz > now() THEN %(visible_at)s::timestamptz END,
       LEAST(now() + make_interval(secs => %(ttl)s),
             now() + make_interval(secs => q.message_ttl_ms / 1000.0)),
       %(job_key)s
FROM (VALUES (1)) AS one (x) LEFT JOIN {schema}.queues q ON q.name = %(queue)s
ON CONFLICT (job_key) WHERE job_key IS NOT NULL AND lock_token IS NULL
DO UPDATE SET
    queue = EXCLUDED.queue,
    priority = EXCLUDED.priority,
    payload = EXCLUDED.payload,
    serial_key = EXCLUDED.serial_key,
    expires_at = EXCLUDED.expires_at,
    visible_at = CASE WHEN %(mode)s = 'preserve_eta' THEN m.visible_at ELSE EXCLUDED.visible_at END,
    replaced_task_id = m.payload::json -> 'headers' ->> 'id',
    delivery_count = 0
WHERE %(mode)s <> 'keep' AND m.lock_token IS NULL
RETURNING xmax = 0 AS inserted,
          replaced_task_id,
          EXISTS (SELECT 1 FROM {schema}.messages f
                  WHERE f.job_key = %(job_key)s AND f.lock_token IS NOT NULL) AS behind_in_flight,
          pg_notify(%(notify_channel)s, coalesce(%(notify_payload)s, queue)) AS notified

-- name: publish_many
-- Many messages in one statement (bulk publish): parallel arrays, one element per message.
-- A message with an exchange goes to every queue whose binding matches (as publish_routed
-- does), or to `deadletter` when none does and it is set; one without goes to the queue
-- its routing key names.
WITH rows AS (
    -- Binary parameters: text-format arrays would escape every quote of every payload.
    SELECT * FROM unnest(%(exchanges)b::text[], %(routing_keys)b::text[], %(priorities)b::smallint[],
                         %(payloads)b::text[], %(serial_keys)b::text[], %(visible_ats)b::timestamptz[],
                         %(ttls)b::float8[])
                  WITH ORDINALITY AS r (exchange, routing_key, priority, payload, serial_key, visible_at,
                                        ttl, n)
), targets AS (
    SELECT r.*, r.routing_key AS queue FROM rows r WHERE r.exchange = ''
    UNION ALL
    SELECT r.*, coalesce(bound.queue, %(deadletter)s)
    FROM rows r
    LEFT JOIN LATERAL {schema}.route(r.exchange, r.routing_key) AS bound (queue) ON true
    WHERE r.exchange <> ''
), inserted AS (
    INSERT INTO {schema}.messages (queue, priority, payload, serial_key, visible_at, expires_at)
    SELECT t.queue, LEAST(t.priority, coalesce(q.max_priority, 255)), t.payload, t.serial_key,
           CASE WHEN t.visible_at > now() THEN t.visible_at END,
           LEAST(now() + make_interval(secs => t.ttl),
                 now() + make_interval(secs => q.message_ttl_ms / 1000.0))
    FROM targets t LEFT JOIN {schema}.queues q ON q.name = t.queue
    WHERE t.queue IS NOT NULL  -- unroutable, no dead-letter queue: dropped, as AMQP does
    ORDER BY t.n, t.queue  -- ids (FIFO order) follow publish order
    RETURNING queue, visible_at
)
SELECT pg_notify(%(channel)s, queue)
FROM (SELECT DISTINCT queue FROM inserted WHERE visible_at IS NULL) q
UNION ALL
-- Delayed ones: announce the earliest due time once, on the due channel (see due_payload).
SELECT pg_notify(%(due_channel)s, extract(epoch FROM min(visible_at))::text)
FROM inserted WHERE visible_at IS NOT NULL HAVING count(*) > 0
