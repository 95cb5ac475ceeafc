"""Result backend end to end: a real ``celery worker -P threads -c 4`` subprocess with
kombu-pg as broker *and* result backend, driving every canvas primitive.

One worker serves the whole module (in its own schema) to keep the suite fast.
"""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from celery import Celery, chain, chord, group, states
from celery.canvas import chunks, xmap, xstarmap
from celery.exceptions import ChordError
from celery.result import GroupResult
from psycopg import sql

from kombu_pg.backend import PostgresBackend

from .worker import CeleryWorker

pytestmark = pytest.mark.slow

TIMEOUT = 30


@pytest.fixture(scope="module")
def canvas_schema(pg_url):
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def worker(pg_url, canvas_schema):
    env = {"KOMBU_PG_URL": pg_url, "KOMBU_PG_SCHEMA": canvas_schema}
    w = CeleryWorker("backend_app", env, pool="threads", concurrency=4, hostname="canvas@%h")
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def client(pg_url, canvas_schema, worker):
    app = Celery("client", broker=pg_url, backend=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": canvas_schema}
    # A safety re-read only once a minute, more than TIMEOUT: every get() below must be
    # woken by a NOTIFY to pass.
    app.conf.result_backend_transport_options = {"schema": canvas_schema, "polling_interval": 60}
    app.conf.result_extended = True
    yield app
    if isinstance(app._backend, PostgresBackend):
        app._backend.close()
    app.close()


def s(client, name, *args, **options):
    return client.signature(f"backend_app.{name}", args=args, **options)


def test_single_task_result_and_extended_fields(client, worker):
    res = s(client, "add", 2, 3).apply_async(queue="celery")
    assert res.get(timeout=TIMEOUT) == 5
    assert res.state == states.SUCCESS
    assert res.name == "backend_app.add"
    assert list(res.args) == [2, 3] and res.kwargs == {}
    assert res.worker.startswith("canvas@")
    assert res.queue == "celery" and res.retries == 0
    meta = client.backend.get_task_meta(res.id)
    assert meta["date_started"] is not None and meta["date_started"] <= res.date_done


def test_task_failure_comes_back_with_type_and_traceback(client):
    res = s(client, "fail", "on purpose").delay()
    with pytest.raises(Exception) as info:
        res.get(timeout=TIMEOUT)
    assert type(info.value).__name__ == "TaskFailed"
    assert "on purpose" in str(info.value)
    assert res.state == states.FAILURE
    assert "TaskFailed" in res.traceback


def test_binary_result_over_a_megabyte(client):
    res = s(client, "blob", 2 * 1024 * 1024).delay()
    assert res.get(timeout=TIMEOUT) == b"\xab" * (2 * 1024 * 1024)


def test_chain(client):
    res = chain(s(client, "add", 2, 2), s(client, "mul", 4), s(client, "add", 1)).apply_async()
    assert res.get(timeout=TIMEOUT) == 17
    assert res.parent.get(timeout=TIMEOUT) == 16


def test_group_get_and_save_restore(client):
    res = group(s(client, "add", i, i) for i in range(10)).apply_async()
    assert res.get(timeout=TIMEOUT) == [2 * i for i in range(10)]
    res.save()
    restored = GroupResult.restore(res.id, app=client)
    assert restored.get(timeout=TIMEOUT) == [2 * i for i in range(10)]
    restored.delete()
    assert GroupResult.restore(res.id, app=client) is None


def test_chord_uses_the_counter_not_chord_unlock(client, worker):
    res = chord((s(client, "add", i, i) for i in range(8)), s(client, "xsum")).apply_async()
    assert res.get(timeout=TIMEOUT) == sum(2 * i for i in range(8))
    assert not any("celery.chord_unlock" in line for line in worker.lines)


def test_chord_whose_header_tasks_ignore_their_results(client):
    # The parts' values travel through the chord table, not through stored results.
    header = [s(client, "add", i, i, ignore_result=True) for i in range(4)]
    res = chord(header, s(client, "identity")).apply_async()
    assert res.get(timeout=TIMEOUT) == [0, 2, 4, 6]
    assert all(r.state == states.PENDING for r in res.parent.results)


def test_add_to_chord(client, worker):
    res = chord([s(client, "add_to_own_chord", 5), s(client, "add", 1, 1)], s(client, "identity")).delay()
    assert res.get(timeout=TIMEOUT) == [5, 2, 10]
    assert sum(f"[{res.id}] received" in line for line in worker.lines) == 1  # the body fired once


def test_chord_of_chords(client):
    inner1 = chord([s(client, "add", 1, 1), s(client, "add", 2, 2)], s(client, "xsum"))
    inner2 = chord([s(client, "add", 3, 3)], s(client, "xsum"))
    res = chord([inner1, inner2], s(client, "xsum")).apply_async()
    assert res.get(timeout=TIMEOUT) == 12


def test_chord_with_a_nested_group_in_the_header(client):
    # Celery unrolls a group inside a chord header (reversing it: deque.extendleft), so
    # the body gets flat values in the header's frozen order.
    header = [group(s(client, "add", 1, 1), s(client, "add", 2, 2)), s(client, "add", 3, 3)]
    res = chord(header, s(client, "identity")).apply_async()
    value = res.get(timeout=TIMEOUT)
    assert value == [r.get(timeout=TIMEOUT) for r in res.parent.results]
    assert sorted(value) == [2, 4, 6]


def test_chord_whose_header_ends_in_a_group_keeps_the_structure(client):
    # A chain ending in a group is a GroupResult in the header: saved and joined.
    header = [chain(s(client, "add", 1, 1), group(s(client, "double"), s(client, "double"))),
              s(client, "add", 3, 3)]
    res = chord(header, s(client, "identity")).apply_async()
    assert res.get(timeout=TIMEOUT) == [[4, 4], 6]


def test_chain_of_groups(client):
    res = chain(
        group(s(client, "add", 1, 1), s(client, "add", 2, 2)),
        group(s(client, "xsum"), s(client, "xsum")),
    ).apply_async()
    assert res.get(timeout=TIMEOUT) == [6, 6]


def test_group_then_task_in_a_chain(client):
    res = (group(s(client, "double", i) for i in range(5)) | s(client, "xsum") | s(client, "add", 100)).apply_async()
    assert res.get(timeout=TIMEOUT) == 120


def test_map_starmap_and_chunks(client):
    assert xmap(s(client, "double"), [1, 2, 3], app=client).apply_async().get(timeout=TIMEOUT) == [2, 4, 6]
    assert xstarmap(s(client, "add"), [(1, 2), (3, 4)], app=client).apply_async().get(timeout=TIMEOUT) == [3, 7]
    res = chunks(s(client, "add"), [(i, i) for i in range(10)], 3, app=client).apply_async()
    assert res.get(timeout=TIMEOUT) == [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18]]


def test_error_in_chord_header_fails_the_body_with_chord_error(client):
    res = chord([s(client, "add", 1, 1), s(client, "fail", "header broke"), s(client, "add", 2, 2)],
                s(client, "xsum")).apply_async()
    # Read the body's own result: res.get() would re-raise the header's error first
    # (it checks the parents while waiting), which is Celery's behaviour too.
    body = client.AsyncResult(res.id)
    with pytest.raises(ChordError) as info:
        body.get(timeout=TIMEOUT)
    assert "header broke" in str(info.value)
    assert body.state == states.FAILURE


def test_many_concurrent_results(client):
    results = [s(client, "add", i, 1).delay() for i in range(60)]
    started = time.monotonic()
    assert [r.get(timeout=TIMEOUT) for r in results] == [i + 1 for i in range(60)]
    assert time.monotonic() - started < TIMEOUT


def test_chord_error_calls_the_body_errback(client):
    errback = s(client, "identity", task_id=str(uuid.uuid4()))
    body = s(client, "xsum").on_error(errback)
    res = chord([s(client, "fail", "boom"), s(client, "add", 1, 1)], body).apply_async()
    with pytest.raises(ChordError):
        client.AsyncResult(res.id).get(timeout=TIMEOUT)
    # An old-style errback is sent as a task with the failed task's id.
    assert client.AsyncResult(errback.id).get(timeout=TIMEOUT) == res.id


def test_failure_in_a_chain_propagates_to_its_end(client):
    res = chain(s(client, "add", 1, 1), s(client, "fail", "mid-chain", immutable=True),
                s(client, "add", 1)).apply_async()
    with pytest.raises(Exception) as info:
        res.get(timeout=TIMEOUT)
    assert type(info.value).__name__ == "TaskFailed"
    # The failure is also stored on the chain's last task, which wakes its waiters.
    meta = client.backend.wait_for(res.id, timeout=TIMEOUT)
    assert meta["status"] == states.FAILURE


def test_prefork_pool(pg_url, schema):
    """Pool children inherit the parent's app; each must use its own connections."""
    env = {"KOMBU_PG_URL": pg_url, "KOMBU_PG_SCHEMA": schema}
    app = Celery("client", broker=pg_url, backend=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    app.conf.result_backend_transport_options = {"schema": schema}
    try:
        with CeleryWorker("backend_app", env, pool="prefork", concurrency=2) as w:
            w.wait_ready()
            res = chord((s(app, "add", i, i) for i in range(6)), s(app, "xsum")).apply_async()
            assert res.get(timeout=TIMEOUT) == 30
            assert group(s(app, "double", i) for i in range(6)).apply_async().get(timeout=TIMEOUT) == [
                0, 2, 4, 6, 8, 10]
    finally:
        if isinstance(app._backend, PostgresBackend):
            app._backend.close()
        app.close()


def test_group_after_a_failed_task_reports_that_failure(client):
    # The group never runs; its get() raises the parent's error instead of timing out.
    res = (s(client, "add", 1, 1) | s(client, "fail", "before the group", immutable=True)
           | group(s(client, "add", 1), s(client, "add", 2))).delay()
    with pytest.raises(Exception) as info:
        res.get(timeout=TIMEOUT)
    assert type(info.value).__name__ == "TaskFailed"
    assert res.get(timeout=TIMEOUT, propagate=False)[0].args == ("before the group",)


def test_header_chain_error_takes_precedence_over_the_chord_error(client):
    # As in Celery's own integration suite: the body's get() raises the header's error.
    header = chain(s(client, "identity", 42, immutable=True), s(client, "fail"),
                   s(client, "identity", 42, immutable=True))
    res = chord((header,), s(client, "identity")).delay()
    with pytest.raises(Exception) as info:
        res.get(timeout=TIMEOUT)
    assert type(info.value).__name__ == "TaskFailed"


def test_revoked_task_is_stored_as_revoked(client):
    from celery.exceptions import TaskRevokedError

    task_id = str(uuid.uuid4())
    # reply=True: the worker has recorded the revocation before the task is sent.
    replies = client.control.revoke(task_id, reply=True, timeout=10, limit=1)
    assert replies, "the worker did not answer the revoke broadcast"
    res = s(client, "add", 1, 1).apply_async(task_id=task_id)
    with pytest.raises(TaskRevokedError):
        res.get(timeout=TIMEOUT)
    assert res.state == states.REVOKED


def test_tasks_sent_with_send_many_inside_a_task_are_its_children(client, worker):
    res = s(client, "fan_out", 4).apply_async()
    ids = res.get(timeout=TIMEOUT)
    assert [child.id for child in res.children] == ids
    assert [child.get(timeout=TIMEOUT) for child in res.children] == [0, 2, 4, 6]
