"""Job keys: one waiting message per key, decided in one statement, with an outcome."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery
from psycopg import sql

from kombu_pg.jobs import Outcome, enqueue
from kombu_pg.store import BrokerStore, connect


def payload(task_id: str) -> str:
    return '{"headers": {"id": "%s"}, "properties": {}}' % task_id


def waiting(store, key):
    return store.conn.execute(sql.SQL(
        "SELECT payload, priority, visible_at FROM {}.messages WHERE job_key = %s AND lock_token IS NULL"
    ).format(sql.Identifier(store.schema)), (key,)).fetchall()


def test_replace_preserve_eta_and_keep(store):
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    assert store.publish_job("q", payload("a"), "k", visible_at=later).outcome == "enqueued"
    replaced = store.publish_job("q", payload("b"), "k", priority=5)
    assert (replaced.outcome, replaced.replaced_task_id) == ("replaced", "a")
    [(body, prio, due)] = waiting(store, "k")
    assert "b" in body and prio == 5 and due is None  # the new due time (none: now)
    store.publish_job("q", payload("c"), "k", visible_at=later)  # replace: takes the new due time
    store.publish_job("q", payload("d"), "k", mode="preserve_eta")
    [(body, _, due)] = waiting(store, "k")
    assert "d" in body and due == later
    assert store.publish_job("q", payload("e"), "k", mode="keep").outcome == "dropped"
    [(body, _, _)] = waiting(store, "k")
    assert "d" in body


def test_in_flight_message_is_never_modified_and_the_key_frees_on_ack(store):
    cid = store.register_consumer()
    store.publish_job("q", payload("a"), "k")
    [held] = store.claim("q", 1, cid)
    behind = store.publish_job("q", payload("b"), "k")
    assert behind.outcome == "queued_behind_in_flight"
    store.publish_job("q", payload("c"), "k")  # replaces b, never a
    assert held.payload == payload("a")
    store.ack([held.token])
    assert store.publish_job("q", payload("d"), "k").outcome == "replaced"
    assert [r[0] for r in waiting(store, "k")] == [payload("d")]


def test_purge_frees_the_key(store):
    store.publish_job("q", payload("a"), "k")
    store.purge("q")
    assert store.publish_job("q", payload("b"), "k").outcome == "enqueued"


def test_unknown_mode_is_refused(store):
    with pytest.raises(ValueError, match="keep"):
        store.publish_job("q", payload("a"), "k", mode="merge")


def test_job_key_and_serial_key_together(store):
    cid = store.register_consumer()
    store.publish_job("q", payload("a"), "job", serial_key="s")
    store.publish("q", payload("x"), serial_key="s")
    [first] = store.claim("q", 5, cid)
    assert first.payload == payload("a")
    assert store.claim("q", 5, cid) == []  # the serial key still holds


CONCURRENT_PRODUCER = """
import sys
from kombu_pg.store import BrokerStore, connect
url, schema, tag = sys.argv[1:4]
store = BrokerStore(connect(url), schema)
for i in range(50):
    store.publish_job("q", '{"headers": {"id": "%s-%d"}, "properties": {}}' % (tag, i), "hot")
"""


def test_concurrent_producers_never_create_two_waiting_messages(pg_url, store):
    errors = []

    def produce(tag):
        try:
            s = BrokerStore(connect(pg_url), store.schema)
            for i in range(50):
                s.publish_job("q", payload(f"{tag}-{i}"), "hot")
            s.conn.close()
        except Exception as exc:  # asserted below
            errors.append(exc)

    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_PRODUCER, pg_url, store.schema, f"p{n}"])
             for n in range(2)]
    threads = [threading.Thread(target=produce, args=(f"t{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(60) for p in procs] == [0, 0]
    assert errors == []
    assert len(waiting(store, "hot")) == 1


@pytest.fixture
def app(pg_url, schema):
    app = Celery("jobs", broker=pg_url, backend=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    app.conf.result_backend_transport_options = {"schema": schema}
    yield app
    app.close()


def test_enqueue_reports_outcomes_and_revokes_the_replaced_task(app, pg_url, schema):
    sig = app.signature("reindex", args=(42,))
    first = enqueue(sig, "reindex:42")
    assert first.outcome is Outcome.ENQUEUED
    second = enqueue(sig, "reindex:42", priority=7)
    assert second.outcome is Outcome.REPLACED and second.replaced_task_id == first.task_id
    assert app.AsyncResult(first.task_id).state == "REVOKED"
    assert "replaced by task " + second.task_id in str(app.AsyncResult(first.task_id).result)
    dropped = enqueue(sig, "reindex:42", mode="keep")
    assert dropped.outcome is Outcome.DROPPED
    with connect(pg_url) as conn:
        [(body,)] = conn.execute(sql.SQL("SELECT payload FROM {}.messages").format(sql.Identifier(schema)))
    assert second.task_id in body


def test_job_keys_through_an_exchange_are_refused(app):
    from kombu import Exchange, Queue

    app.conf.task_queues = [Queue("routed", Exchange("jobs_ex", "direct"), "rk")]
    with pytest.raises(ValueError, match="default exchange"):
        enqueue(app.signature("reindex"), "k", queue="routed", exchange="jobs_ex", routing_key="rk")


def test_priority_bands_and_redis_conversion():
    from kombu_pg import priorities

    bands = [priorities.EMERGENCY, priorities.FAST_HIGH, priorities.FAST_DEFAULT,
             priorities.BULK_DEFAULT, priorities.BULK_LOW, priorities.BULK_LOWEST]
    assert bands == sorted(bands, reverse=True) and bands[0] == 9 and bands[-1] == 0
    assert priorities.from_redis(0) == 9 and priorities.from_redis(9) == 0
    with pytest.raises(ValueError):
        priorities.from_redis(10)


def test_a_requeued_dead_letter_keeps_its_job_key(store):
    from celery_dlq.store import DLQStore

    cid = store.register_consumer()
    message = '{"headers": {"id": "t1", "task": "x", "job_key": "k"}, "properties": {}}'
    store.publish_job("q", message, "k")
    [held] = store.claim("q", 1, cid)
    assert store.dead_letter(held.token)
    dlq = DLQStore(store.conn, store.schema)
    [entry] = store.conn.execute(sql.SQL("SELECT id FROM {}.dlq").format(sql.Identifier(store.schema))).fetchall()
    assert dlq.requeue_to_broker(entry[0]).requeued
    assert store.publish_job("q", payload("newer"), "k").outcome == "replaced"
    assert len(waiting(store, "k")) == 1
