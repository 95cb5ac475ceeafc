-- One definition each for two predicates the named queries repeated: which queues a
-- binding routes a message to (publish_routed, publish_many) and which DLQ rows an
-- operator's filter selects (list, count, matching_ids).  Both are plain SQL functions,
-- not STRICT, not VOLATILE, without SET clauses: the planner inlines them into the calling
-- statement, so its plan is the one the repeated text gave.  tests/test_schema.py checks
-- that they stay inlined.

-- The queues a message published to p_exchange with p_routing_key goes to: every queue
-- with a matching binding (fanout: any; topic: the binding's pattern, Kombu's
-- key_to_pattern; direct and any other type: the exact routing key).  No row: unroutable.
CREATE FUNCTION {schema}.route(p_exchange text, p_routing_key text) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT DISTINCT b.queue
    FROM {schema}.bindings b JOIN {schema}.exchanges e ON e.name = b.exchange
    WHERE b.exchange = p_exchange
      AND CASE e.type
            WHEN 'fanout' THEN true
            WHEN 'topic' THEN p_routing_key ~ b.pattern
            ELSE b.routing_key = p_routing_key
          END
$$;

-- Whether DLQ row d passes an operator's filter; a NULL argument does not filter.
CREATE FUNCTION {schema}.dlq_matches(
    d {schema}.dlq, p_task text, p_queue text, p_reason text, p_exception text, p_status text,
    p_since timestamptz, p_until timestamptz, p_ids bigint[]
) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_task IS NULL OR d.task_name = p_task)
       AND (p_queue IS NULL OR d.queue = p_queue)
       AND (p_reason IS NULL OR d.reason = p_reason)
       AND (p_exception IS NULL OR d.exception_type = p_exception)
       AND (p_status IS NULL OR d.status = p_status)
       AND (p_since IS NULL OR d.last_failed_at >= p_since)
       AND (p_until IS NULL OR d.last_failed_at < p_until)
       AND (p_ids IS NULL OR d.id = ANY(p_ids))
$$;
