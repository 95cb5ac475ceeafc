"""Native delayed delivery: ETA/countdown messages wait in the database, not in workers."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery
from psycopg import sql


from .worker import CeleryWorker, wait_until


def test_delayed_message_is_invisible_until_promoted(store):
    cid = store.register_consumer()
    soon = datetime.now(timezone.utc) + timedelta(seconds=0.3)
    store.publish("q", "later", visible_at=soon)
    store.publish("q", "now", visible_at=datetime.now(timezone.utc) - timedelta(seconds=1))
    assert [c.payload for c in store.claim("q", 5, cid)] == ["now"]
    assert 0 < store.next_due() <= 0.3
    assert store.promote_due() == []  # not due yet
    wait = store.next_due()
    time.sleep(wait + 0.05)  # the delay under test is the point of this test
    assert store.promote_due() == ["q"]
    assert store.next_due() is None
    assert [c.payload for c in store.claim("q", 5, cid)] == ["later"]


def test_due_time_is_announced_on_the_due_channel(pg_url, store):
    from kombu_pg.store.wakeups import Listener

    announced = []
    listener = Listener(pg_url, store.channel, store.due_channel, announced.append)
    try:
        due = datetime.now(timezone.utc) + timedelta(hours=1)
        store.publish("q", "x", visible_at=due)
        assert listener.wait(5) == set()  # no queue name: the queue channel says nothing
        [epoch] = announced
        assert abs(epoch - due.timestamp()) < 0.01
    finally:
        listener.close()


@pytest.fixture
def client(pg_url, schema):
    app = Celery("client", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema, "native_delayed_delivery": True}
    yield app
    app.close()


def delayed_rows(pg_conn, schema) -> int:
    return pg_conn.execute(sql.SQL("SELECT count(*) FROM {}.messages WHERE visible_at IS NOT NULL")
                           .format(sql.Identifier(schema))).fetchone()[0]


@pytest.mark.slow
def test_countdown_survives_a_worker_restart_without_pinning_prefetch(
        client, worker_env, task_log, pg_conn, schema):
    env = {**worker_env, "NATIVE_DELAY": "1"}
    sent = time.time()
    client.send_task("celery_app.record", ("delayed",), countdown=3)
    assert delayed_rows(pg_conn, schema) == 1
    with CeleryWorker("celery_app", env) as first:
        first.wait_ready()
        client.send_task("celery_app.record", ("marker",))
        wait_until(lambda: task_log("record"), what="marker task")
        # The worker is running and idle, yet the delayed message stays in the database.
        assert delayed_rows(pg_conn, schema) == 1
    assert [r[1] for r in task_log("record")] == ["marker"]
    with CeleryWorker("celery_app", env) as second:
        second.wait_ready()
        wait_until(lambda: len(task_log("record")) == 2, what="delayed task", timeout=20)
    [(_, _, _, _, at)] = task_log("record")[1:]
    assert at.timestamp() - sent >= 2.9


@pytest.mark.slow
def test_retry_countdown_goes_through_the_database(client, worker_env, task_log):
    env = {**worker_env, "NATIVE_DELAY": "1"}
    with CeleryWorker("celery_app", env) as worker:
        worker.wait_ready()
        client.send_task("celery_app.retrying", ("r",))
        wait_until(lambda: len(task_log("retrying")) == 3, what="3 attempts")
    rows = task_log("retrying")
    assert [r[2] for r in rows] == [0, 1, 2]
    assert all((b[4] - a[4]).total_seconds() >= 0.15 for a, b in zip(rows, rows[1:]))


@pytest.mark.slow
def test_a_queue_whose_name_starts_with_at_is_woken_by_notify_and_due_times_still_arrive(
        client, worker_env, task_log):
    """'@…' was the due-time announcement's prefix: a queue so named was never woken.

    Polling and maintenance are a minute apart, so whatever runs within half of that was
    picked up through a NOTIFY (the queue's, then the due time's)."""
    env = {**worker_env, "NATIVE_DELAY": "1", "TASK_QUEUE": "@foo", "POLLING_INTERVAL": "60",
           "RECOVERY_INTERVAL": "60"}
    with CeleryWorker("celery_app", env) as worker:
        worker.wait_ready()
        for n, arg in enumerate(["first", "second"], 1):
            # The second one certainly comes after the worker's claims went idle.
            client.send_task("celery_app.record", (arg,), queue="@foo")
            wait_until(lambda: len(task_log("record")) == n, what=f"the {arg} task", timeout=30)
        sent = time.time()
        client.send_task("celery_app.record", ("delayed",), queue="@foo", countdown=2)
        wait_until(lambda: len(task_log("record")) == 3, what="the delayed task", timeout=30)
    assert [r[1] for r in task_log("record")] == ["first", "second", "delayed"]
    assert task_log("record")[-1][4].timestamp() - sent >= 1.9
