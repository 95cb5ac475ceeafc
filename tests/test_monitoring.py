"""Remote control, inspect and events between real processes.

One ``celery worker -E -P threads -c 2`` subprocess (tests/monitor_app.py) serves the
module; this process is the client (``celery inspect``/``control``/events monitor).
Every reply and event crosses processes through bindings stored in the database: the
worker replies to a queue only this process declared, and publishes events to a topic
exchange bound only by this process's receiver.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid

import psycopg
import pytest
from celery.worker.consumer.gossip import Gossip
from celery.worker.consumer.mingle import Mingle
from psycopg import sql

from kombu_pg.store import BrokerStore
from kombu_pg.transport import Transport
from tests.monitor_app import (
    CONTROL_EXPIRES_ENV,
    CeleryProcess,
    make_app,
    process_env,
    start_worker,
)

#: The issue's figure: 1,000 `celery inspect` round trips (about 20 s) leave the tables flat.
PING_ROUNDS = int(os.environ.get("KOMBU_PG_PING_ROUNDS", "1000"))
MONITOR_ROUNDS = 5
#: x-expires (seconds) of the module worker's pidbox queue.
LIVE_PIDBOX_EXPIRES = 4


@pytest.fixture(scope="module")
def mschema(pg_url):
    name = f"mon_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def app(pg_url, mschema):
    app = make_app(pg_url, mschema)
    yield app
    app.close()


@pytest.fixture(scope="module")
def worker(pg_url, mschema, app):
    # Its pidbox queue gets a 4 s x-expires (Celery: 10 s) with recovery passes every 1 s,
    # the same margin as the defaults (2 s): test_live_worker_keeps_its_pidbox_queue.
    proc, node = start_worker(pg_url, mschema, events=True,
                              extra_env={CONTROL_EXPIRES_ENV: str(LIVE_PIDBOX_EXPIRES)})
    proc.node = node
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def db(pg_url, mschema):
    conn = psycopg.connect(pg_url, autocommit=True)

    class DB:
        def count(self, table: str, where: str = "true", params=()) -> int:
            query = sql.SQL("SELECT count(*) FROM {}.{} WHERE " + where).format(
                sql.Identifier(mschema), sql.Identifier(table))
            return conn.execute(query, params).fetchone()[0]

        def rows(self, query: str, params=()):
            return conn.execute(sql.SQL(query).format(s=sql.Identifier(mschema)), params).fetchall()

        def counts(self) -> dict[str, int]:
            return {t: self.count(t) for t in
                    ("queues", "bindings", "messages", "exchanges", "consumers")}

    yield DB()
    conn.close()


def poll(fetch, accept, timeout: float, what: str):
    """Call ``fetch`` until ``accept(value)``: for state with no event to wait on."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        time.sleep(0.1)


class EventCollector:
    """An events monitor (celery.events.EventReceiver) consuming in a thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.events: list[dict] = []
        self.cond = threading.Condition()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.conn = app.connection_for_read()
        self.receiver = app.events.Receiver(self.conn, handlers={"*": self._on_event})
        plain = self.receiver.on_consume_ready

        def on_consume_ready(*args, **kwargs):
            plain(*args, **kwargs)  # also asks the workers for a heartbeat now
            self.ready.set()

        self.receiver.on_consume_ready = on_consume_ready
        self.thread = threading.Thread(target=self._run, name="event-receiver", daemon=True)

    def _on_event(self, event: dict) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def _run(self) -> None:
        try:
            for _ in self.receiver.consume(safety_interval=0.2, wakeup=True):
                pass
        except BaseException as exc:  # reported by start()/wait_for()
            self.error = exc
            self.ready.set()
            with self.cond:
                self.cond.notify_all()

    def start(self, timeout: float = 10) -> "EventCollector":
        self.thread.start()
        assert self.ready.wait(timeout), "event receiver never started consuming"
        assert self.error is None, self.error
        return self

    def stop(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "event receiver did not stop"
        self.conn.release()

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                assert self.error is None, self.error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    types = sorted({e["type"] for e in self.events})
                    raise AssertionError(f"no {what} event within {timeout}s; saw types {types}")
                self.cond.wait(remaining)

    def __enter__(self) -> "EventCollector":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def inspect(app, worker, timeout=5.0):
    # With a destination, a call returns as soon as that worker replied.
    return app.control.inspect(destination=[worker.node], timeout=timeout)


def task_succeeded_line(task_name: str, task_id: str) -> str:
    return rf"Task {task_name}\[{task_id}\] succeeded"


# -- remote control (pidbox) --------------------------------------------------------------


def test_ping_round_trip_between_processes(app, worker):
    assert inspect(app, worker).ping() == {worker.node: {"ok": "pong"}}
    # A broadcast without destination waits for its whole timeout and still sees it.
    replies = app.control.inspect(timeout=1.0).ping()
    assert replies.get(worker.node) == {"ok": "pong"}


def test_celery_status_command(pg_url, mschema, worker):
    status = CeleryProcess(["-A", "tests.monitor_app", "status", "--timeout", "2"],
                           process_env(pg_url, mschema), name="celery status").start()
    try:
        assert status.wait_exit(60) == 0, status.output
    finally:
        status.stop()
    assert f"{worker.node}: OK" in status.output
    assert "1 node online." in status.output


def test_inspect_stats_and_registered(app, worker, mschema):
    stats = inspect(app, worker).stats()[worker.node]
    assert stats["broker"]["transport"] == "postgresql"
    assert stats["broker"]["transport_options"]["schema"] == mschema
    assert stats["pool"]["max-concurrency"] == 2
    assert stats["prefetch_count"] == 4
    registered = inspect(app, worker).registered()[worker.node]
    names = {entry.split(" ", 1)[0] for entry in registered}
    assert {"monitor_app.add", "monitor_app.fail", "monitor_app.wait_for_file"} <= names


def test_inspect_active_reserved_scheduled_and_revoke(app, worker, tmp_path):
    release = tmp_path / "release"
    wait_task = app.tasks["monitor_app.wait_for_file"]
    blocking = [wait_task.apply_async((str(release),)) for _ in range(3)]
    eta = app.tasks["monitor_app.add"].apply_async((1, 2), countdown=600)
    ids = {r.id for r in blocking}
    insp = inspect(app, worker)
    try:
        def snapshot():
            active = {t["id"] for t in insp.active()[worker.node]}
            reserved = {t["id"] for t in insp.reserved()[worker.node]}
            scheduled = {t["request"]["id"] for t in insp.scheduled()[worker.node]}
            return active, reserved, scheduled

        # Two threads run two blocked tasks; the third waits in the worker (reserved);
        # the countdown task sits in the worker's timer (scheduled).
        active, reserved, scheduled = poll(
            snapshot,
            lambda s: len(s[0]) == 2 and len(s[1]) == 1 and eta.id in s[2],
            timeout=15, what="2 active, 1 reserved, 1 scheduled")
        assert active | reserved == ids
        assert scheduled == {eta.id}

        replies = app.control.revoke(eta.id, destination=[worker.node], reply=True, timeout=5)
        assert replies == [{worker.node: {"ok": f"tasks {{'{eta.id}'}} flagged as revoked"}}]
        assert eta.id in insp.revoked()[worker.node]
    finally:
        release.touch()
    for result in blocking:
        worker.wait_for_line(task_succeeded_line("monitor_app.wait_for_file", result.id), 20)
    assert insp.active()[worker.node] == []


def test_control_rate_limit(app, worker):
    replies = app.control.rate_limit("monitor_app.add", "100/m", destination=[worker.node],
                                     reply=True, timeout=5)
    assert replies == [{worker.node: {"ok": "new rate limit set successfully"}}]
    registered = inspect(app, worker).registered("rate_limit")[worker.node]
    assert "monitor_app.add [rate_limit=100/m]" in registered


def test_control_add_and_cancel_consumer(app, worker, db):
    queue = f"extra_{uuid.uuid4().hex[:8]}"
    replies = app.control.add_consumer(queue, destination=[worker.node], reply=True, timeout=5)
    assert replies == [{worker.node: {"ok": f"add consumer {queue}"}}]
    names = {q["name"] for q in inspect(app, worker).active_queues()[worker.node]}
    assert {"celery", queue} <= names

    result = app.tasks["monitor_app.add"].apply_async((2, 3), queue=queue)
    worker.wait_for_line(task_succeeded_line("monitor_app.add", result.id), 20)

    replies = app.control.cancel_consumer(queue, destination=[worker.node], reply=True, timeout=5)
    assert replies == [{worker.node: {"ok": f"no longer consuming from {queue}"}}]
    names = {q["name"] for q in inspect(app, worker).active_queues()[worker.node]}
    assert queue not in names
    # The worker no longer claims from it: a new task stays in the table, unlocked.
    app.tasks["monitor_app.add"].apply_async((3, 4), queue=queue)
    assert inspect(app, worker).ping() == {worker.node: {"ok": "pong"}}
    assert db.count("messages", "queue = %s AND lock_token IS NULL", [queue]) == 1


def test_control_shutdown(app, worker, pg_url, mschema, db):
    proc, node = start_worker(pg_url, mschema, events=False, queues=f"q_{uuid.uuid4().hex[:6]}")
    try:
        assert app.control.inspect(destination=[node], timeout=5).ping() == {node: {"ok": "pong"}}
        # Two worker processes: a broadcast reaches both (one fanout copy each).
        replies = app.control.inspect(destination=[node, worker.node], timeout=5).ping()
        assert replies == {node: {"ok": "pong"}, worker.node: {"ok": "pong"}}
        pidbox = f"{node}.celery.pidbox"
        assert db.count("queues", "name = %s", [pidbox]) == 1
        app.control.shutdown(destination=[node])
        assert proc.wait_exit(30) == 0, proc.output_tail()
        assert "Got shutdown from remote" in proc.output
        # Its exclusive, auto-delete pidbox queue went with its connection.
        assert db.count("queues", "name = %s", [pidbox]) == 0
    finally:
        proc.stop()


def test_killed_worker_leaves_nothing_behind(app, worker, pg_url, mschema, db):
    """SIGKILL: no channel close runs; recovery cleans up instead.

    The killed worker's pidbox queue is auto-delete: the first recovery pass after its
    session ended removes it with its binding and messages, long before its x-expires
    (Celery's 10 s, counted from then) could; the live worker's stays.
    """
    consumers_before = db.count("consumers")
    proc, node = start_worker(pg_url, mschema, events=False, queues=f"q_{uuid.uuid4().hex[:6]}")
    pidbox = f"{node}.celery.pidbox"
    try:
        assert app.control.inspect(destination=[node], timeout=5).ping() == {node: {"ok": "pong"}}
        assert db.count("queues", "name = %s AND expires_ms = 10000", [pidbox]) == 1
        assert db.count("consumers") == consumers_before + 1
        backends = [r[0] for r in db.rows("SELECT backend_pid FROM {s}.consumers WHERE pid = %s",
                                          [proc.proc.pid])]
    finally:
        proc.kill()
    poll(lambda: db.rows("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [backends])[0][0],
         lambda n: n == 0, timeout=10, what="the killed worker's sessions to end")
    store = BrokerStore(psycopg.connect(pg_url, autocommit=True), mschema)
    try:
        poll(lambda: store.recover([]).ran, bool, timeout=10, what="a recovery pass here")
    finally:
        store.conn.close()
    assert (db.count("queues", "name = %s", [pidbox]), db.count("bindings", "queue = %s", [pidbox]),
            db.count("messages", "queue = %s", [pidbox]), db.count("consumers")) == (0, 0, 0, consumers_before)
    # Commands to the dead worker land nowhere; the live worker still gets its own.
    app.control.broadcast("ping", destination=[node], reply=False)
    assert db.count("messages", "queue = %s", [pidbox]) == 0
    assert inspect(app, worker).ping() == {worker.node: {"ok": "pong"}}


def test_a_busy_solo_worker_keeps_its_pidbox_queue(app, pg_url, mschema, db, tmp_path):
    """x-expires must not delete a queue a live session consumes (issue #16, item 6).

    ``celery worker -P solo`` runs a task in its only thread, so its loop stands still.
    Its pidbox queue (x-expires 1 s here, Celery's default 10 s) is still consumed by its
    live session: recovery passes of another process must leave the queue and its fanout
    binding alone, so broadcasts after the task still reach the worker.
    """
    queue = f"solo_{uuid.uuid4().hex[:6]}"
    proc, node = start_worker(pg_url, mschema, events=False, queues=queue, pool="solo",
                              extra_env={CONTROL_EXPIRES_ENV: "1"})
    pidbox = f"{node}.celery.pidbox"
    release = tmp_path / "release"
    try:
        assert app.control.ping(destination=[node], timeout=5) == [{node: {"ok": "pong"}}]
        busy = app.tasks["monitor_app.wait_for_file"].apply_async((str(release),), queue=queue)
        proc.wait_for_line(rf"Task monitor_app.wait_for_file\[{busy.id}\] received", 20)
        poll(lambda: db.count("queues", "name = %s AND last_used_at < now() - interval '1 second'",
                              [pidbox]),
             lambda n: n == 1, timeout=10, what=f"{pidbox} to be unused for longer than its x-expires")
        store = BrokerStore(psycopg.connect(pg_url, autocommit=True), mschema)
        try:
            poll(lambda: store.recover([]).ran, bool, timeout=10, what="a recovery pass here")
        finally:
            store.conn.close()
        assert db.count("queues", "name = %s", [pidbox]) == 1
        assert db.count("bindings", "queue = %s AND exchange = 'celery.pidbox'", [pidbox]) == 1
    finally:
        release.touch()
    try:
        proc.wait_for_line(task_succeeded_line("monitor_app.wait_for_file", busy.id), 20)
        assert app.control.ping(destination=[node], timeout=5) == [{node: {"ok": "pong"}}]
        replies = app.control.revoke("no-such-task", destination=[node], reply=True, timeout=5)
        assert replies == [{node: {"ok": "tasks {'no-such-task'} flagged as revoked"}}]
    finally:
        proc.stop()


# -- events ----------------------------------------------------------------------------------


def test_event_receiver_sees_worker_and_task_events(app, worker):
    with EventCollector(app) as events:
        heartbeat = events.wait_for(
            lambda e: e["type"] == "worker-heartbeat" and e["hostname"] == worker.node,
            timeout=10, what="worker-heartbeat")
        assert heartbeat["freq"] > 0

        ok = app.tasks["monitor_app.add"].delay(2, 2)
        bad = app.tasks["monitor_app.fail"].delay("expected failure")
        for task_id, kinds in ((ok.id, ("sent", "received", "started", "succeeded")),
                               (bad.id, ("sent", "received", "started", "failed"))):
            for kind in kinds:
                events.wait_for(
                    lambda e, kind=kind, task_id=task_id:
                        e["type"] == f"task-{kind}" and e.get("uuid") == task_id,
                    timeout=15, what=f"task-{kind} for {task_id}")
        sent = events.wait_for(lambda e: e["type"] == "task-sent" and e["uuid"] == ok.id, 1, "")
        assert sent["name"] == "monitor_app.add"
        succeeded = events.wait_for(
            lambda e: e["type"] == "task-succeeded" and e["uuid"] == ok.id, 1, "")
        assert succeeded["result"] == "4" and succeeded["hostname"] == worker.node
        failed = events.wait_for(lambda e: e["type"] == "task-failed" and e["uuid"] == bad.id, 1, "")
        assert "ValueError" in failed["exception"] and "expected failure" in failed["exception"]


def test_exchange_types_celery_uses(app, worker, db):
    """Events: topic ``celeryev``; commands: fanout; replies: direct (research section 9)."""
    inspect(app, worker).ping()
    types = dict(db.rows("SELECT name, type FROM {s}.exchanges"))
    assert types["celeryev"] == "topic"
    assert types["celery.pidbox"] == "fanout"
    assert types["reply.celery.pidbox"] == "direct"


def test_mingle_and_gossip_are_off_for_postgresql(worker):
    assert Transport.driver_type == "postgresql"
    assert Transport.driver_type not in Mingle.compatible_transports
    assert Transport.driver_type not in Gossip.compatible_transports
    assert "mingle: searching for neighbors" not in worker.output
    # Remote control is on: Celery requires a fanout exchange type for it.
    assert "fanout" in Transport.implements.exchange_type


# -- no unbounded growth --------------------------------------------------------------


def test_pings_and_monitors_leave_no_rows_behind(app, worker, db):
    """Pidbox replies, reply queues and monitors' event queues are all cleaned up.

    Counts in queues, bindings, messages, exchanges and consumers must return to the
    baseline after PING_ROUNDS inspect() calls and MONITOR_ROUNDS monitor start/stops.
    """
    insp = inspect(app, worker)
    assert insp.ping()  # declares the reply exchange once
    baseline = db.counts()
    started = time.monotonic()
    for i in range(PING_ROUNDS):
        assert insp.ping() == {worker.node: {"ok": "pong"}}, f"ping {i} got no reply"
    ping_seconds = time.monotonic() - started
    for i in range(MONITOR_ROUNDS):
        with EventCollector(app) as events:
            assert db.count("queues", "name LIKE 'celeryev.%%'") == 1
            if i == 0:
                events.wait_for(lambda e: e["type"] == "worker-heartbeat", 10, "heartbeat")
    poll(db.counts, lambda c: c == baseline, timeout=10,
         what=f"table counts back to the baseline {baseline}")
    print(f"{PING_ROUNDS} pings in {ping_seconds:.2f}s", file=sys.stderr)


def test_live_worker_keeps_its_pidbox_queue(app, worker, db):
    """x-expires must not remove a queue its consumer is using (research pitfall P8).

    The worker's session consumes its pidbox queue (a queue_consumers row); if that did
    not count as use, a recovery pass would delete the queue and remote control would go
    silent (the worker never re-declares it).
    """
    pidbox = f"{worker.node}.celery.pidbox"
    (created,) = db.rows("SELECT created_at FROM {s}.queues WHERE name = %s", [pidbox])[0]
    assert db.count("queues", "name = %s AND expires_ms = %s", [pidbox, LIVE_PIDBOX_EXPIRES * 1000]) == 1
    # Wait (if the module has not run that long already) until the queue has lived
    # through two expiry periods; the worker is idle apart from its own housekeeping.
    poll(lambda: db.count("queues", "name = %s AND created_at < now() - make_interval(secs => %s)",
                          [pidbox, 2 * LIVE_PIDBOX_EXPIRES]),
         lambda n: n == 1, timeout=3 * LIVE_PIDBOX_EXPIRES,
         what=f"{pidbox} to be {2 * LIVE_PIDBOX_EXPIRES} s old (or it was deleted)")
    assert inspect(app, worker).ping() == {worker.node: {"ok": "pong"}}
    # The same row: never deleted and re-created.
    assert db.rows("SELECT created_at FROM {s}.queues WHERE name = %s", [pidbox]) == [(created,)]
