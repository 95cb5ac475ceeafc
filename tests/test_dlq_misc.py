"""Settings, the reaping loop (B2), retry presets, metric labels (M1), requeue with
another broker (A4), the retry guard in-process."""

from __future__ import annotations

import json
import threading
import uuid

import psycopg
import pytest
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest
from psycopg import sql

import celery_dlq
from celery_dlq import DLQ, PRESETS, NonRetryable, retry_policy
from celery_dlq.config import load
from celery_dlq.metrics import DLQCollector
from celery_dlq.reaper import ReaperLoop
from celery_dlq.store import DLQStore, Entry
from kombu_pg.config import ConfigurationError
from kombu_pg.store import apply_migrations

from .test_dlq_store import kombu_message


# -- settings ----------------------------------------------------------------------------


def test_settings_default_to_the_kombu_pg_broker_and_refuse_typos(pg_url):
    app = Celery("s", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": "myschema", "max_deliveries": 4}
    s = load(app)
    assert (s.database_url, s.schema, s.max_deliveries, s.atomic) == (pg_url, "myschema", 4, True)
    app.conf.dlq_max_delivries = 3  # a typo must not silently do nothing
    with pytest.raises(ConfigurationError, match="dlq_max_delivries"):
        load(app)


def test_another_broker_needs_a_database_url(pg_url):
    app = Celery("s", broker="memory://", set_as_current=False)
    with pytest.raises(ConfigurationError, match="dlq_database_url"):
        load(app)
    app.conf.dlq_database_url = pg_url
    app.conf.dlq_non_retryable_exceptions = ["celery_dlq.NonRetryable"]
    s = load(app)
    assert not s.atomic and s.max_deliveries is None and s.non_retryable == (NonRetryable,)


# -- B2: the standalone loop ----------------------------------------------------------------


def test_reaper_loop_backs_off_exponentially_capped_and_resets():
    outcomes = iter([False] * 7 + [True, False, True])
    calls, waits = [], []

    def reap():
        calls.append(len(waits))  # how many waits happened before this pass
        if not next(outcomes):
            raise psycopg.OperationalError("server closed the connection")

    def wait(delay):
        waits.append(delay)
        return len(waits) >= 10  # "stop requested" after ten passes

    ReaperLoop(reap, 2.0, wait=wait).run()
    assert calls[0] == 0  # the first pass runs immediately
    assert waits == [4, 8, 16, 32, 64, 64, 64, 2, 4, 2]  # 2 * 2^k, capped at 32x; reset on success


def test_reaper_loop_stops_promptly():
    started = threading.Event()
    loop = ReaperLoop(started.set, 3600)
    thread = threading.Thread(target=loop.run)
    thread.start()
    assert started.wait(10)
    loop.stop()
    thread.join(5)
    assert not thread.is_alive()


# -- retry presets ------------------------------------------------------------------------------


def test_presets_map_attempts_to_celery_options():
    assert retry_policy("fast") == {"max_retries": 2, "retry_backoff": 1, "retry_backoff_max": 10,
                                    "retry_jitter": True}
    assert PRESETS["default"].delays() == [2, 4, 8, 16]
    assert PRESETS["conservative"].delays() == [30, 60, 120]
    assert PRESETS["aggressive"].delays() == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert retry_policy("aggressive", jitter=False)["retry_jitter"] is False
    with pytest.raises(ValueError):
        retry_policy("reckless")


def test_celery_applies_the_preset_countdowns(pg_url, schema):
    """R2 in-process: the countdown Celery computes for each retry is the preset's delay."""
    app = Celery("r", broker="memory://", set_as_current=False)
    app.conf.update(dlq_database_url=pg_url, dlq_schema=schema, task_always_eager=False)
    celery_dlq.install(app)
    seen = []

    @app.task(bind=True, autoretry_for=(IOError,), **retry_policy("default", jitter=False))
    def fetch(self):
        raise IOError("down")

    original_retry = fetch.retry

    def spy(*args, **kwargs):
        seen.append(kwargs.get("countdown"))
        kwargs["throw"] = False
        return original_retry(*args, **kwargs)

    fetch.retry = spy
    for retries in range(4):
        fetch.push_request(retries=retries, id=str(uuid.uuid4()), called_directly=False)
        try:
            fetch.run()
        except Exception:
            pass
        finally:
            fetch.pop_request()
    assert seen == PRESETS["default"].delays()


# -- M1: bounded labels ----------------------------------------------------------------------------


def test_metric_labels_come_from_fixed_sets(pg_url, schema):
    app = Celery("m", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}

    @app.task(name="proj.known")
    def known():
        pass

    celery_dlq.install(app)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        apply_migrations(conn, schema)
        store = DLQStore(conn, schema)
        secret_ids = []
        for task, key in (("proj.known", None), (f"evil.{uuid.uuid4().hex}", "customer-42"),
                          ("proj.known", "acct-7")):
            task_id = str(uuid.uuid4())
            secret_ids.append(task_id)
            store.capture(Entry(message=kombu_message(task_id, task), reason="non_retryable",
                                source="signal", task_id=task_id, task_name=task, serial_key=key,
                                exception_message="card 4111 declined"))
    registry = CollectorRegistry()
    registry.register(DLQCollector(app))
    text = generate_latest(registry).decode()
    assert 'celery_dlq_added_total{queue_kind="parallel",reason="non_retryable",task="proj.known"} 1.0' in text
    assert 'celery_dlq_added_total{queue_kind="serial",reason="non_retryable",task="other"} 1.0' in text
    assert 'celery_dlq_size{queue_kind="serial",reason="non_retryable",task="proj.known"} 1.0' in text
    for leaked in [*secret_ids, "customer-42", "acct-7", "evil.", "4111"]:
        assert leaked not in text
    app._celery_dlq.close()


# -- A4 with another broker ----------------------------------------------------------------------------


def test_requeue_with_another_broker_publishes_and_survives_bookkeeping_failure(pg_url, schema):
    app = Celery("other", broker="memory://", set_as_current=False)
    app.conf.update(dlq_database_url=pg_url, dlq_schema=schema, dlq_write_timeout=1.0)
    api = DLQ(app)
    task_id, queue = str(uuid.uuid4()), f"q-{uuid.uuid4().hex}"
    row_id = api.runtime.store().capture(Entry(
        message=kombu_message(task_id, "proj.add", extra_headers={"tenant": "t1"}), reason="non_retryable",
        source="signal", task_id=task_id, task_name="proj.add", queue=queue, exchange="",
        routing_key=queue))[0]
    with app.connection_for_write() as conn:
        conn.SimpleQueue(queue).close()  # declared, as a worker would have
    with psycopg.connect(pg_url) as blocker:
        # SHARE blocks the status UPDATE but not reads: publish works, bookkeeping fails.
        blocker.execute(sql.SQL("LOCK TABLE {}.dlq IN SHARE MODE").format(sql.Identifier(schema)))
        [result] = api.requeue([row_id])
        blocker.rollback()
    assert result.requeued and "status not updated" in result.detail
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue(queue).get(timeout=5)
        headers = message.headers
        body = message.decode()
        message.ack()
    assert headers["id"] == task_id and headers["task"] == "proj.add"
    assert headers["dlq_id"] == row_id and headers["tenant"] == "t1"
    assert body[0] == [1, 2]
    # The row was not marked, so a second requeue is possible (at-least-once, never lost).
    assert api.show(row_id)["status"] == "dead"
    api.close()


def test_requeue_with_another_broker_restores_retries_and_clears_expires_unless_kept(pg_url, schema):
    """send_task path: a requeue publishes retries 0 and no expires, or the stored values
    with keep_retries / keep_expires."""
    app = Celery("other", broker="memory://", set_as_current=False)
    app.conf.update(dlq_database_url=pg_url, dlq_schema=schema)
    api = DLQ(app)
    queue, expires = f"q-{uuid.uuid4().hex}", "2001-01-01T00:00:00+00:00"

    def add() -> int:
        task_id = str(uuid.uuid4())
        return api.runtime.store().capture(Entry(
            message=kombu_message(task_id, "proj.add", retries=3, extra_headers={"expires": expires}),
            reason="retries_exhausted", source="signal", task_id=task_id, task_name="proj.add", queue=queue,
            exchange="", routing_key=queue))[0]

    fresh, kept = add(), add()
    with app.connection_for_write() as conn:
        conn.SimpleQueue(queue).close()
    assert api.requeue([fresh])[0].requeued
    assert api.requeue([kept], keep_retries=True, keep_expires=True)[0].requeued
    headers = {}
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        for _ in range(2):
            message = simple.get(timeout=5)
            headers[message.headers["dlq_id"]] = message.headers
            message.ack()
    assert (headers[fresh]["retries"], headers[fresh]["expires"]) == (0, None)
    assert (headers[kept]["retries"], headers[kept]["expires"]) == (3, expires)
    api.close()


# -- the retry guard, in-process ------------------------------------------------------------------


def test_retry_guard_turns_a_non_retryable_retry_into_a_failure(pg_url, schema):
    app = Celery("g", broker="memory://", set_as_current=False)
    app.conf.update(dlq_database_url=pg_url, dlq_schema=schema, task_always_eager=True,
                    task_eager_propagates=False)
    celery_dlq.install(app)

    class Declined(NonRetryable):
        pass

    runs = []

    @app.task(bind=True, autoretry_for=(Exception,), max_retries=5)
    def charge(self):
        runs.append(self.request.retries)
        raise Declined("card declined")

    result = charge.apply()
    assert result.failed() and isinstance(result.result, NonRetryable)
    assert runs == [0]
    row = DLQ(app).list().rows[0]
    assert (row["reason"], row["retries"]) == ("non_retryable", 0)
    assert json.loads(DLQ(app).show(row["id"])["message"])["headers"]["task"] == charge.name
    app._celery_dlq.close()


def test_jittered_countdowns_stay_within_the_preset_bounds(pg_url, schema):
    """R2: with retry_jitter, Celery's countdown is random in [0, the preset delay]."""
    app = Celery("j", broker="memory://", set_as_current=False)
    app.conf.update(dlq_database_url=pg_url, dlq_schema=schema)
    celery_dlq.install(app)
    seen: dict[int, list] = {}

    @app.task(bind=True, autoretry_for=(IOError,), **retry_policy("aggressive"))
    def poll(self):
        raise IOError("down")

    original_retry = poll.retry

    def spy(*args, **kwargs):
        seen.setdefault(poll.request.retries, []).append(kwargs.get("countdown"))
        kwargs["throw"] = False
        return original_retry(*args, **kwargs)

    poll.retry = spy
    for _ in range(30):
        for retries in range(9):
            poll.push_request(retries=retries, id=str(uuid.uuid4()), called_directly=False)
            try:
                poll.run()
            except Exception:
                pass
            finally:
                poll.pop_request()
    bounds = PRESETS["aggressive"].delays()
    for retries, countdowns in seen.items():
        assert all(0 <= c <= bounds[retries] for c in countdowns), (retries, countdowns)
    assert len(set(seen[8])) > 1  # really random


def test_backstop_sweep_respects_grace_and_tombstones(pg_url, schema, caplog):
    """R5 in-process: a failed DLQ write is logged CRITICAL; the sweep captures the FAILURE
    result once it is older than the grace period, and never resurrects a deleted entry."""
    app = Celery("b", broker=pg_url, backend=pg_url, set_as_current=False)
    app.conf.update(broker_transport_options={"schema": schema},
                    result_backend_transport_options={"schema": schema}, result_extended=True,
                    task_always_eager=True, task_store_eager_result=True, dlq_write_timeout=1.0,
                    dlq_backstop_grace=3600.0)
    api = DLQ(app)

    @app.task(name="proj.boom")
    def boom(x):
        raise NonRetryable(f"no {x}")

    api.stats()  # migrations applied
    with psycopg.connect(pg_url) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {}.dlq IN SHARE MODE").format(sql.Identifier(schema)))
        result = boom.apply((7,))
        blocker.rollback()
    assert result.failed()
    assert "DLQ WRITE FAILED for task proj.boom[%s]" % result.id in caplog.text
    assert api.reap()["swept"] == 0  # younger than the grace period
    object.__setattr__(api.settings, "backstop_grace", 0.0)
    assert api.reap()["swept"] == 1
    [row] = api.list().rows
    assert (row["task_id"], row["reason"], row["source"]) == (result.id, "non_retryable", "backstop")
    assert row["exception_type"] == "celery_dlq.capture.NonRetryable"
    assert api.show(row["id"])["call"]["args"] == [7]
    assert api.reap()["swept"] == 0  # idempotent
    api.delete([row["id"]])
    assert api.reap()["swept"] == 0  # the tombstone keeps it deleted
    api.close()


def test_a_serial_key_header_is_kept_for_requeue_and_labels():
    from celery_dlq.capture import entry_from_message

    doc = json.loads(kombu_message(extra_headers={"serial_key": "acct-9"}))
    entry = entry_from_message(doc, reason="non_retryable", source="trace", exc=ValueError("x"),
                               traceback=None, worker="w1")
    assert entry.serial_key == "acct-9" and entry.exception_type == "ValueError"


def test_backstop_sweep_pages_past_failures_it_does_not_capture(pg_url, schema):
    """A batch full of failures the rules skip must not stall (or loop) the sweep."""
    app = Celery("p", broker=pg_url, backend=pg_url, set_as_current=False)
    app.conf.update(broker_transport_options={"schema": schema},
                    result_backend_transport_options={"schema": schema}, result_extended=True,
                    dlq_capture_unclassified=False, dlq_backstop_grace=0.0)
    api = DLQ(app)
    api.stats()
    backend = app.backend
    for i in range(5):  # unclassified first failures: skipped by the rules
        backend.mark_as_failure(f"skip-{i}", ValueError("x"), request=_request(app, f"skip-{i}", 0))
    backend.mark_as_failure("keep-1", ValueError("y"), request=_request(app, "keep-1", 3))
    runtime = api.runtime
    assert runtime.sweep(limit=2) == 1
    assert [r["task_id"] for r in api.list().rows] == ["keep-1"]
    assert api.list().rows[0]["reason"] == "retries_exhausted"
    api.close()


def _request(app, task_id, retries):
    from celery.app.task import Context

    return Context(id=task_id, task="proj.job", args=[1], kwargs={}, retries=retries,
                   delivery_info={"routing_key": "celery"}, hostname="w1", ignore_result=False)


def test_a_failure_whose_arguments_cannot_be_serialized_is_still_captured(pg_url, schema):
    app = Celery("u", broker="memory://", set_as_current=False)
    app.conf.update(dlq_database_url=pg_url, dlq_schema=schema, task_always_eager=True)
    celery_dlq.install(app)

    @app.task(name="proj.takes_object")
    def takes_object(obj):
        raise NonRetryable("no")

    takes_object.apply((object(),))
    [row] = DLQ(app).list().rows
    assert row["task_name"] == "proj.takes_object" and row["reason"] == "non_retryable"
    shown = DLQ(app).show(row["id"])
    assert "dlq_unrebuildable" in json.loads(shown["message"])["headers"]
    assert shown["unrecovered"][-2:] == ["args", "kwargs"] and "headers" in shown["unrecovered"]
    app._celery_dlq.close()


# -- "installed" at the SQL level (issue #16, item 8) -----------------------------------------------


def test_the_dlq_says_in_the_broker_schema_whether_it_is_installed(pg_url, schema):
    """Expiry, purge and queue deletion capture poison while dlq_installed has its row:
    celery_dlq writes it (with its max_deliveries) whenever it connects enabled, with the
    DLQ in the broker's own database and schema, and removes it when it connects disabled."""

    def connect_runtime(**conf):
        app = Celery("installed", broker=pg_url, set_as_current=False)
        app.conf.broker_transport_options = {"schema": schema, "max_deliveries": 4}
        app.conf.update(conf)
        dlq = celery_dlq.install(app)
        dlq.store()
        dlq.close()

    def installed():
        with psycopg.connect(pg_url, autocommit=True) as conn:
            return conn.execute(sql.SQL("SELECT max_deliveries FROM {}.dlq_installed").format(
                sql.Identifier(schema))).fetchall()

    connect_runtime()
    assert installed() == [(4,)]
    connect_runtime(dlq_max_deliveries=2)
    assert installed() == [(2,)]
    connect_runtime(dlq_enabled=False)
    assert installed() == []
    # A DLQ in another schema is not this broker's: nothing is recorded for it.
    connect_runtime(dlq_schema=f"{schema}_elsewhere")
    assert installed() == []
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(f"{schema}_elsewhere")))


def test_a_requeued_entry_is_resolved_after_the_dlq_session_was_lost(pg_url, schema, pg_conn):
    """Found by the chaos soak: a requeued task succeeded while the worker's DLQ session had
    been terminated, the resolve failed once and the row stayed 'requeued' for ever."""
    app = Celery("resolve", broker="memory://", set_as_current=False)
    app.conf.update(dlq_database_url=pg_url, dlq_schema=schema)
    api = DLQ(app)

    @app.task(name="proj.add")
    def add(x, y):
        return x + y

    task_id = str(uuid.uuid4())
    store = api.runtime.store()
    row_id = store.capture(Entry(
        message=kombu_message(task_id, "proj.add"), reason="non_retryable", source="signal",
        task_id=task_id, task_name="proj.add", queue="q", exchange="", routing_key="q"))[0]
    store.mark_requeued(row_id)
    pg_conn.execute("SELECT pg_terminate_backend(%s)", (store.conn.info.backend_pid,))
    add.push_request(id=task_id, headers={"dlq_id": row_id})
    try:
        api.runtime.on_task_success(sender=add)  # what Celery's task_success signal calls
    finally:
        add.pop_request()
    assert api.show(row_id)["status"] == "resolved"
    api.close()
