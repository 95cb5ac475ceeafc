"""celery_dlq.store against a real PostgreSQL: reaping (A1, A2, B1), requeue (A4, A5),
the admin surface (L1-L6).  No Celery here: the store is plain SQL."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg import sql

from celery_dlq.store import DLQStore, Entry, NotFound, UsageError, relink
from kombu_pg.store import BrokerStore, apply_migrations


@pytest.fixture
def migrated(pg_conn, schema):
    apply_migrations(pg_conn, schema)
    return schema


@pytest.fixture
def broker(pg_conn, migrated):
    return BrokerStore(pg_conn, migrated)


@pytest.fixture
def dlq(pg_conn, migrated):
    return DLQStore(pg_conn, migrated)


def kombu_message(task_id=None, task="proj.add", *, retries=0, exchange="celery", routing_key="celery",
                  extra_headers=None):
    """A Kombu message as the transport stores it (Celery protocol 2, json body base64)."""
    task_id = task_id or str(uuid.uuid4())
    return json.dumps({
        "body": "W1sxLCAyXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbH1d",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "retries": retries,
                    "root_id": task_id, "argsrepr": "(1, 2)", "x-custom": "kept\u0000nul",
                    **(extra_headers or {})},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 3,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                       "delivery_info": {"exchange": exchange, "routing_key": routing_key}},
    })


def deliver(broker, queue, times, consumer):
    """Claim and hand back every message of ``queue`` ``times`` times (worker deaths)."""
    for _ in range(times):
        claimed = broker.claim(queue, 1000, consumer)
        broker.requeue([c.token for c in claimed])


def entry(task_id=None, *, task="proj.fail", reason="non_retryable", queue="celery", exc="ValueError",
          retries=0):
    return Entry(message=kombu_message(task_id, task), reason=reason, source="signal", task_id=task_id,
                 task_name=task, queue=queue, exchange="celery", routing_key=queue, priority=0,
                 exception_type=exc, exception_message="boom", retries=retries)


def count(conn, schema, table):
    return conn.execute(f'SELECT count(*) FROM "{schema}".{table}').fetchone()[0]


# -- reaping -------------------------------------------------------------------------------


def test_reap_moves_exhausted_messages_whole_in_one_statement(pg_conn, migrated, broker, dlq):
    consumer = broker.register_consumer()
    poison = kombu_message(task="proj.poison")
    broker.publish("work", poison, priority=3, serial_key=None)
    deliver(broker, "work", 3, consumer)
    broker.publish("work", kombu_message(task="proj.fresh"))  # never delivered: stays

    moved = dlq.reap(max_deliveries=3)

    assert moved == 1
    assert count(pg_conn, migrated, "messages") == 1
    page = dlq.list()
    assert page.total == 1
    row = dlq.get(page.rows[0]["id"])
    assert row["message"] == poison  # the full original Kombu message, byte for byte
    assert (row["reason"], row["source"], row["delivery_count"], row["queue"], row["priority"]) == (
        "max_deliveries", "reaper", 3, "work", 3)
    assert row["task_name"] == "proj.poison"
    assert row["task_id"] == json.loads(poison)["headers"]["id"]


def test_reap_records_job_key_and_publish_time(pg_conn, migrated, broker, dlq):
    """A reaped entry has the broker row's job key, and the publish time from the
    ``dlq_published_at`` header, else the broker row's creation time (a bad header too)."""
    consumer = broker.register_consumer()
    stamped = "2026-01-02T03:04:05+00:00"
    broker.publish_job("work", kombu_message(task="proj.keyed", extra_headers={"dlq_published_at": stamped}),
                       "report:1")
    broker.publish("work", kombu_message(task="proj.bad", extra_headers={"dlq_published_at": "not a time"}))
    deliver(broker, "work", 2, consumer)
    (_, _), (_, bad_created) = pg_conn.execute(sql.SQL("SELECT id, created_at FROM {}.messages ORDER BY id")
                                               .format(sql.Identifier(migrated))).fetchall()
    assert dlq.reap(max_deliveries=2) == 2
    rows = {r["task_name"]: dlq.get(r["id"]) for r in dlq.list().rows}
    keyed, bad = rows["proj.keyed"], rows["proj.bad"]
    assert (keyed["job_key"], keyed["published_at"].isoformat()) == ("report:1", stamped)
    assert (bad["job_key"], bad["published_at"]) == (None, bad_created)
    assert keyed["max_retries"] is None and keyed["unrecovered"] == []
    assert [r["id"] for r in dlq.list({"job_key": "report:1"}).rows] == [keyed["id"]]


def test_reap_is_atomic_when_the_session_dies_mid_statement(pg_url, pg_conn, migrated, broker):
    """A1: the move is one statement, so a crash leaves the message in exactly one place."""
    consumer = broker.register_consumer()
    broker.publish("work", kombu_message())
    deliver(broker, "work", 2, consumer)
    victim = psycopg.connect(pg_url, autocommit=True)
    victim.execute("BEGIN")
    moved = DLQStore(victim, migrated).reap_batch(2)
    assert len(moved) == 1  # moved inside the open transaction...
    pg_conn.execute("SELECT pg_terminate_backend(%s, 5000)", (victim.info.backend_pid,))
    with pytest.raises(psycopg.OperationalError):
        victim.execute("COMMIT")
    victim.close()
    # ...and the crash before commit left it in the queue, not in both, not in neither.
    assert count(pg_conn, migrated, "messages") == 1
    assert count(pg_conn, migrated, "dlq") == 0
    assert DLQStore(pg_conn, migrated).reap(2) == 1
    assert (count(pg_conn, migrated, "messages"), count(pg_conn, migrated, "dlq")) == (0, 1)


def test_concurrent_reapers_move_each_message_once(pg_url, pg_conn, migrated, broker):
    """A1 + B1: several reapers at once, small batches: every message moved exactly once."""
    consumer = broker.register_consumer()
    for _ in range(300):
        broker.publish("work", kombu_message())
    deliver(broker, "work", 2, consumer)
    results, errors = [], []
    barrier = threading.Barrier(4)

    def reaper():
        try:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                store = DLQStore(conn, migrated)
                barrier.wait(10)
                results.append(store.reap(2, batch_size=25))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reaper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(results) == 300
    assert count(pg_conn, migrated, "messages") == 0
    assert count(pg_conn, migrated, "dlq") == 300
    assert pg_conn.execute(f'SELECT sum(added) FROM "{migrated}".dlq_counters').fetchone()[0] == 300


def test_reap_never_takes_a_locked_message(pg_conn, migrated, broker, dlq):
    """A2: a message in flight (its last attempt running) is not a candidate."""
    consumer = broker.register_consumer()
    broker.publish("work", kombu_message())
    deliver(broker, "work", 2, consumer)
    running = broker.claim("work", 10, consumer)  # third delivery, in flight
    assert len(running) == 1
    assert dlq.reap(max_deliveries=2) == 0
    assert count(pg_conn, migrated, "messages") == 1
    broker.requeue([running[0].token])  # the attempt ended without an ack
    assert dlq.reap(max_deliveries=2) == 1


def test_reap_skips_rows_another_transaction_holds_without_waiting(pg_url, pg_conn, migrated, broker, dlq):
    """A2/B1: SKIP LOCKED: a row being claimed right now is skipped, the reaper never blocks."""
    consumer = broker.register_consumer()
    broker.publish("work", kombu_message())
    deliver(broker, "work", 2, consumer)
    with psycopg.connect(pg_url) as holder:  # a claim transaction in progress
        holder.execute(f'SELECT id FROM "{migrated}".messages FOR UPDATE').fetchall()
        pg_conn.execute("SET lock_timeout = '2s'")
        assert dlq.reap(max_deliveries=2) == 0
        holder.rollback()
    assert dlq.reap(max_deliveries=2) == 1


def test_reap_drains_in_bounded_batches(pg_conn, migrated, broker, dlq):
    """B1 + A3: 250 exhausted messages give 250 rows, not one batch of 100."""
    consumer = broker.register_consumer()
    for _ in range(250):
        broker.publish("work", kombu_message())
    deliver(broker, "work", 1, consumer)
    assert len(dlq.reap_batch(1, limit=100)) == 100  # a batch is bounded...
    assert dlq.reap(1, batch_size=100) == 150  # ...and reap loops until empty
    assert count(pg_conn, migrated, "dlq") == 250
    assert dlq.reap(1) == 0  # idempotent


def test_reap_survives_a_payload_that_is_not_json(pg_conn, migrated, broker, dlq):
    consumer = broker.register_consumer()
    broker.publish("work", "not json at all")
    deliver(broker, "work", 2, consumer)
    assert dlq.reap(2) == 1
    row = dlq.get(dlq.list().rows[0]["id"])
    assert row["message"] == "not json at all" and row["task_id"] is None


def test_a_reaped_message_seen_again_updates_its_row(pg_conn, migrated, broker, dlq):
    """L2: the same task id reaching the DLQ again is counted on the same row."""
    consumer = broker.register_consumer()
    task_id = str(uuid.uuid4())
    broker.publish("work", kombu_message(task_id))
    broker.publish("work", kombu_message(task_id))  # a duplicate of the same logical message
    deliver(broker, "work", 2, consumer)
    assert dlq.reap(2) == 2
    page = dlq.list()
    assert page.total == 1
    assert page.rows[0]["failure_count"] == 2


# -- capture and the admin surface ------------------------------------------------------------


def test_failure_count_counts_captures_and_retries_is_separate(dlq):
    """L2."""
    task_id = str(uuid.uuid4())
    first, n1 = dlq.capture(entry(task_id, retries=3, reason="retries_exhausted"))
    again, n2 = dlq.capture(entry(task_id, retries=3, reason="retries_exhausted"))
    assert first == again and (n1, n2) == (1, 2)
    row = dlq.get(first)
    assert (row["failure_count"], row["retries"]) == (2, 3)


def test_list_total_respects_filters_and_pages_are_stable(dlq):
    """L1."""
    for i in range(7):
        dlq.capture(entry(str(uuid.uuid4()), task="proj.a", exc="KeyError" if i % 2 else "ValueError"))
    for _ in range(5):
        dlq.capture(entry(str(uuid.uuid4()), task="proj.b", queue="other", reason="rejected"))
    assert dlq.list().total == 12
    assert dlq.list({"task": "proj.a"}).total == 7
    assert dlq.list({"task": "proj.a", "exception": "KeyError"}).total == 3
    assert dlq.list({"queue": "other"}).total == 5
    assert dlq.list({"reason": "rejected"}).total == 5
    assert dlq.list({"since": datetime.now(timezone.utc) + timedelta(hours=1)}).total == 0
    assert dlq.list({"until": datetime.now(timezone.utc) + timedelta(hours=1)}).total == 12

    seen, cursor, added = [], None, 0
    while True:
        page = dlq.list({"task": "proj.a"}, limit=3, cursor=cursor)
        assert page.total == 7 + added  # the total ignores the cursor, respects the filter
        seen += [r["id"] for r in page.rows]
        # A row added between pages does not shift or repeat anything (keyset).
        dlq.capture(entry(str(uuid.uuid4()), task="proj.a"))
        added += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7
    assert seen == sorted(seen, reverse=True)
    assert len(dlq.list(limit=10_000).rows) <= 1000  # capped


def test_delete_reports_whether_the_row_existed(dlq):
    """L3."""
    row_id, _ = dlq.capture(entry(str(uuid.uuid4())))
    assert dlq.delete([row_id]) == [row_id]
    assert dlq.delete([row_id]) == []
    with pytest.raises(NotFound):
        dlq.get(row_id)


def test_bad_requests_are_refused_not_read_as_everything(dlq):
    """L4."""
    dlq.capture(entry(str(uuid.uuid4())))
    with pytest.raises(UsageError):
        dlq.list({"tsak": "proj.fail"})  # unknown field
    with pytest.raises(UsageError):
        dlq.matching_ids({})  # bulk with no filter
    with pytest.raises(UsageError):
        dlq.matching_ids({"reason": "whatever"})
    with pytest.raises(NotFound):
        dlq.get(987654321)
    with pytest.raises(NotFound):
        dlq.requeue_to_broker(987654321)
    assert dlq.count() == 1


def test_notes_are_appended_and_survive_requeue(dlq, broker):
    """L5."""
    row_id, _ = dlq.capture(entry(str(uuid.uuid4())))
    dlq.add_note(row_id, "looked at it")
    dlq.requeue_to_broker(row_id, note="requeued after fix #12")
    dlq.add_note(row_id, "third")
    assert dlq.get(row_id)["notes"] == ["looked at it", "requeued after fix #12", "third"]


def test_stats_of_an_empty_dlq_are_zeros(dlq):
    """L6."""
    stats = dlq.stats()
    assert (stats["total"], stats["failures"], stats["dead"], stats["by_task"], stats["by_reason"]) == (
        0, 0, 0, {}, {})
    assert stats["oldest"] is None
    dlq.capture(entry(str(uuid.uuid4()), task="proj.a"))
    dlq.capture(entry(str(uuid.uuid4()), task="proj.a", reason="rejected"))
    stats = dlq.stats()
    assert stats["total"] == 2 and stats["by_task"]["proj.a"]["entries"] == 2
    assert stats["by_reason"] == {"non_retryable": {"entries": 1, "failures": 1},
                                  "rejected": {"entries": 1, "failures": 1}}
    assert stats["oldest"] <= stats["newest"]


# -- requeue ------------------------------------------------------------------------------------


def test_requeue_preserves_the_message_and_links_it(pg_conn, migrated, broker, dlq):
    """A5: body, headers, queue, priority and serial key survive; dlq_id links the copy."""
    consumer = broker.register_consumer()
    original = kombu_message()
    broker.publish("work", original, priority=7, serial_key="acct-1")
    pg_conn.execute(f'UPDATE "{migrated}".messages SET delivery_count = 5')
    assert dlq.reap(5) == 1
    row_id = dlq.list().rows[0]["id"]

    result = dlq.requeue_to_broker(row_id)

    assert result.requeued and result.queues == ["work"]
    queue, priority, serial_key, payload, deliveries = pg_conn.execute(
        f'SELECT queue, priority, serial_key, payload, delivery_count FROM "{migrated}".messages').fetchone()
    assert (queue, priority, serial_key, deliveries) == ("work", 7, "acct-1", 0)
    new, old = json.loads(payload), json.loads(original)
    assert new["headers"].pop("dlq_id") == row_id
    assert new == old
    assert dlq.get(row_id)["status"] == "requeued"
    assert dlq.resolve(row_id, None) == row_id
    assert dlq.get(row_id)["status"] == "resolved"
    del consumer


def test_requeue_routes_signal_captures_through_their_exchange(pg_conn, migrated, broker, dlq):
    broker.bind("tasks", "q1", "rk", None, exchange_type="direct")
    row_id, _ = dlq.capture(Entry(message=kombu_message(), reason="non_retryable", source="signal",
                                  task_id=str(uuid.uuid4()), queue="rk", exchange="tasks", routing_key="rk"))
    assert dlq.requeue_to_broker(row_id).queues == ["q1"]


def test_concurrent_requeues_of_one_row_enqueue_once(pg_url, pg_conn, migrated, dlq):
    """A4: the row lock serializes them; the second sees 'already requeued'."""
    row_id, _ = dlq.capture(entry(str(uuid.uuid4())))
    barrier, outcomes = threading.Barrier(5), []

    def requeue():
        with psycopg.connect(pg_url, autocommit=True) as conn:
            barrier.wait(10)
            outcomes.append(DLQStore(conn, migrated).requeue_to_broker(row_id).requeued)

    threads = [threading.Thread(target=requeue) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == [False, False, False, False, True]
    assert count(pg_conn, migrated, "messages") == 1
    assert dlq.get(row_id)["requeue_count"] == 1


def test_requeue_is_one_transaction(pg_conn, migrated, dlq):
    """A4: if the DLQ bookkeeping fails, the new broker message is rolled back with it."""
    row_id, _ = dlq.capture(entry(str(uuid.uuid4())))
    pg_conn.execute(f"""
        CREATE FUNCTION "{migrated}".refuse() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'bookkeeping failed'; END $$;
        CREATE TRIGGER refuse BEFORE UPDATE ON "{migrated}".dlq
        FOR EACH ROW EXECUTE FUNCTION "{migrated}".refuse();""")
    with pytest.raises(psycopg.errors.RaiseException):
        dlq.requeue_to_broker(row_id)
    assert count(pg_conn, migrated, "messages") == 0
    assert dlq.get(row_id)["status"] == "dead"


def test_relink_only_adds_the_link_header():
    original = kombu_message()
    doc = json.loads(relink(original, 42))
    assert doc["headers"].pop("dlq_id") == 42
    assert doc == json.loads(original)


def test_broker_reject_dead_letters_in_one_fenced_statement(pg_conn, migrated, broker, dlq):
    """The transport hook for reject(requeue=False): moved whole, fenced by the lock token,
    and a task id Celery's signal already captured is not counted twice."""
    consumer = broker.register_consumer()
    original = kombu_message()
    broker.publish("work", original)
    [claimed] = broker.claim("work", 1, consumer)
    existed, row_id = dlq.reject_to_dlq(claimed.token, "rejected by consumer")
    assert existed and row_id is not None
    row = dlq.get(row_id)
    assert (row["message"], row["reason"], row["source"], row["queue"]) == (original, "rejected", "broker", "work")
    assert count(pg_conn, migrated, "messages") == 0
    assert dlq.reject_to_dlq(claimed.token) == (False, None)  # a stale token does nothing

    task_id = str(uuid.uuid4())
    dlq.capture(entry(task_id, reason="rejected"))  # the signal path ran first
    broker.publish("work", kombu_message(task_id))
    [claimed] = broker.claim("work", 1, consumer)
    assert dlq.reject_to_dlq(claimed.token) == (True, None)
    assert dlq.list({"reason": "rejected"}).total == 2
    assert dlq.get(dlq.list({"reason": "rejected"}).rows[0]["id"])["failure_count"] == 1
    assert pg_conn.execute(f'SELECT sum(added) FROM "{migrated}".dlq_counters').fetchone()[0] == 2


def test_broker_reject_of_a_requeued_message_updates_its_row(pg_conn, migrated, broker, dlq):
    """reject_to_dlq used to do nothing for a task id already in the DLQ, so a requeued
    message rejected again was deleted and its row stayed 'requeued' forever."""
    consumer = broker.register_consumer()
    task_id = str(uuid.uuid4())
    row_id, _ = dlq.capture(entry(task_id))
    assert dlq.requeue_to_broker(row_id).requeued
    [claimed] = broker.claim("celery", 1, consumer)
    assert dlq.reject_to_dlq(claimed.token, "rejected by consumer") == (True, row_id)
    row = dlq.get(row_id)
    assert (row["status"], row["failure_count"], row["reason"], row["source"]) == ("dead", 2, "rejected", "broker")
    assert (row["exception_type"], row["exception_message"]) == (None, "rejected by consumer")
    assert json.loads(row["message"])["headers"]["dlq_id"] == row_id  # the message that failed
    assert count(pg_conn, migrated, "messages") == 0
    assert pg_conn.execute(f'SELECT sum(added) FROM "{migrated}".dlq_counters').fetchone()[0] == 2


def test_a_failure_captured_before_the_requeue_is_marked_keeps_the_row_dead(dlq):
    """send_task path: the new run can fail (and be captured) before mark_requeued runs;
    the row must not be flipped back to 'requeued' over that failure."""
    task_id = str(uuid.uuid4())
    row_id, seen = dlq.capture(entry(task_id))
    dlq.capture(entry(task_id))  # the requeued run failed at once
    dlq.mark_requeued(row_id, "sent", seen_failures=seen)
    row = dlq.get(row_id)
    assert (row["status"], row["failure_count"], row["requeue_count"], row["notes"]) == ("dead", 2, 1, ["sent"])
    dlq.mark_requeued(row_id, None, seen_failures=2)
    assert dlq.get(row_id)["status"] == "requeued"
