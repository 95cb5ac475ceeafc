"""Bulk publish: a batch of Celery tasks written in one statement when the block exits."""

from __future__ import annotations

import pytest
from celery import Celery, group
from psycopg import sql

from kombu_pg.bulk import batch, send_many
from kombu_pg.store.wakeups import Listener


@pytest.fixture
def app(pg_url, schema):
    app = Celery("bulk", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    yield app
    app.close()


def rows(pg_conn, schema, what="payload"):
    return [r[0] for r in pg_conn.execute(sql.SQL("SELECT {} FROM {}.messages ORDER BY id").format(
        sql.Identifier(what), sql.Identifier(schema)))]


def test_nothing_is_visible_until_the_block_exits(app, pg_conn, schema):
    app.send_task("warm.up")  # migrates the schema
    with batch(app) as producer:
        results = [app.send_task("t", (i,), producer=producer, priority=i % 3) for i in range(50)]
        assert len(rows(pg_conn, schema)) == 1
    payloads = rows(pg_conn, schema)[1:]
    assert len(payloads) == 50
    assert all(r.id in p for r, p in zip(results, payloads))  # in publish order
    assert rows(pg_conn, schema, "priority")[1:] == [i % 3 for i in range(50)]


def test_an_exception_publishes_nothing(app, pg_conn, schema):
    app.send_task("warm.up")
    with pytest.raises(KeyError):
        with batch(app) as producer:
            app.send_task("t", producer=producer)
            raise KeyError
    assert len(rows(pg_conn, schema)) == 1


def test_groups_job_keys_and_size_limit(app, pg_conn, schema):
    app.send_task("warm.up")
    with batch(app, max_size=10) as producer:
        group(app.signature("t", (i,)) for i in range(25)).apply_async(producer=producer)
        assert len(rows(pg_conn, schema)) == 21  # two full chunks of 10 written already
        app.send_task("t", headers={"job_key": "once"}, producer=producer)
        assert rows(pg_conn, schema, "job_key").count("once") == 1  # job keys go at once
    assert len(rows(pg_conn, schema)) == 27


def test_one_notify_per_queue_and_due_times_announced(app, pg_url, schema):
    app.conf.broker_transport_options = {"schema": schema, "native_delayed_delivery": True}
    app.send_task("warm.up")
    listener = Listener(pg_url, f"{schema}:queues")
    try:
        send_many([app.signature("t", (i,)) for i in range(20)] +
                  [app.signature("t", (i,), queue="other") for i in range(5)] +
                  [app.signature("t", countdown=3600)])
        seen = listener.wait(5)
        while more := listener.wait(0.2):
            seen |= more
        assert {p for p in seen if not p.startswith("@")} == {"celery", "other"}
        assert len([p for p in seen if p.startswith("@")]) == 1
    finally:
        listener.close()


def test_send_many_of_nothing():
    assert send_many([]) == []
