"""Celery end to end: a real ``celery worker`` subprocess on the kombu-pg broker."""

from __future__ import annotations

import signal
import time

import pytest
from celery import Celery
from psycopg import sql

from .worker import CeleryWorker, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def client(pg_url, schema):
    """A producer-side Celery app using the same tasks by name."""
    app = Celery("client", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    yield app
    app.close()


def queue_size(pg_conn, schema, queue="celery") -> int:
    return pg_conn.execute(
        sql.SQL("SELECT count(*) FROM {}.messages WHERE queue = %s").format(sql.Identifier(schema)),
        (queue,),
    ).fetchone()[0]


@pytest.mark.parametrize("pool,concurrency", [("prefork", 2), ("threads", 4)])
def test_tasks_run_once_each(client, worker_env, task_log, pool, concurrency):
    with CeleryWorker("celery_app", worker_env, pool=pool, concurrency=concurrency) as worker:
        worker.wait_ready()
        for i in range(30):
            client.send_task("celery_app.record", (i,))
        wait_until(lambda: len(task_log("record")) >= 30, what="30 tasks")
        worker.wait_for_line("succeeded", count=30)
    # Read after the worker stopped: a duplicate delivery would have shown by now.
    assert sorted(int(r[1]) for r in task_log("record")) == list(range(30))


def test_countdown_retry_and_autoretry(client, worker_env, task_log):
    with CeleryWorker("celery_app", worker_env) as worker:
        worker.wait_ready()
        sent = time.time()
        client.send_task("celery_app.record", ("later",), countdown=1)
        client.send_task("celery_app.retrying", ("r",))
        client.send_task("celery_app.autoretrying", ("a",))
        wait_until(lambda: len(task_log("retrying")) == 3 and len(task_log("autoretrying")) == 4
                   and task_log("record"), what="retries")
        worker.wait_for_line("raised unexpected: Flaky")
    [(_, _, _, _, at)] = task_log("record")
    assert at.timestamp() - sent >= 0.9
    assert [r[2] for r in task_log("retrying")] == [0, 1, 2]
    assert [r[2] for r in task_log("autoretrying")] == [0, 1, 2, 3]


def test_higher_priority_runs_first(client, worker_env, task_log, pg_url, schema):
    for i in range(3):
        client.send_task("celery_app.record", (f"low{i}",), priority=1)
    client.send_task("celery_app.record", ("high",), priority=9)
    env = {**worker_env, "PREFETCH_MULTIPLIER": "1"}
    with CeleryWorker("celery_app", env, pool="solo", concurrency=1) as worker:
        worker.wait_ready()
        wait_until(lambda: len(task_log("record")) == 4, what="4 tasks")
    assert [r[1] for r in task_log("record")] == ["high", "low0", "low1", "low2"]


def test_warm_shutdown_finishes_running_and_hands_back_prefetched(client, worker_env, task_log, pg_conn, schema):
    env = {**worker_env, "PREFETCH_MULTIPLIER": "4"}
    for i in range(4):
        client.send_task("celery_app.slow", (i, 1.0))
    worker = CeleryWorker("celery_app", env, pool="threads", concurrency=1)
    try:
        worker.wait_ready()
        wait_until(lambda: task_log("slow-start"), what="first task to start")
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(30) == 0
    finally:
        worker.stop()
    assert len(task_log("slow-end")) == 1  # the running task finished
    # The three prefetched, unstarted messages are back, unlocked, at once.
    locked = pg_conn.execute(
        sql.SQL("SELECT count(*) FROM {}.messages WHERE lock_token IS NOT NULL").format(sql.Identifier(schema))
    ).fetchone()[0]
    assert (queue_size(pg_conn, schema), locked) == (3, 0)


def test_killed_worker_messages_are_redelivered(client, worker_env, task_log, pg_conn, schema):
    client.send_task("celery_app.slow", ("crash", 30.0))
    first = CeleryWorker("celery_app", worker_env, pool="threads", concurrency=1, hostname="first@%h")
    try:
        first.wait_ready()
        wait_until(lambda: task_log("slow-start"), what="task start")
    finally:
        first.kill(signal.SIGKILL)
        first.stop()
    second = CeleryWorker("celery_app", worker_env, pool="threads", concurrency=1, hostname="second@%h")
    try:
        second.wait_ready()
        rows = wait_until(lambda: len(task_log("slow-start")) == 2 and task_log("slow-start"),
                          what="redelivery", timeout=20)
    finally:
        second.kill(signal.SIGKILL)
        second.stop()
    assert [r[3] for r in rows] == [False, True]
