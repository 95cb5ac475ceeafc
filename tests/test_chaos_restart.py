"""The database server restarts under load (issue 4, requirement 3).

The broker is a private embedded server started by this module (never the machine's);
tasks log to the test server, which stays up.  Producers publish with Celery's publish
retry while workers consume; the server restarts in the middle.  Every publish that
returned must be processed; duplicates are allowed only for messages in flight at the
restart, and are counted.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter

import psycopg
import pytest
from celery import Celery
from psycopg import sql

from kombu_pg.embedded import EmbeddedPostgres
from kombu_pg.store import apply_migrations

from .chaos_util import TaskLog, create_log_tables, wait_until
from .worker import CeleryWorker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

RETRY_POLICY = {"max_retries": 100, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.5}


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("pgserver")
    server = EmbeddedPostgres()
    yield server
    server.stop()


@pytest.fixture
def broker(server):
    """A fresh schema on the embedded server: (url, schema)."""
    schema = f"r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        apply_migrations(conn, schema)
    yield server.url, schema
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def log(pg_conn, schema) -> TaskLog:
    create_log_tables(pg_conn, schema)
    return TaskLog(pg_conn, schema)


class Producer(threading.Thread):
    """Publishes until stopped; remembers when each publish started and which returned."""

    def __init__(self, app: Celery, name: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.app, self.prefix, self.stop = app, name, stop
        self.started: dict[str, float] = {}
        self.returned: dict[str, float] = {}
        self.failed: list[tuple[str, BaseException]] = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            arg = f"{self.prefix}-{i}"
            task = "chaos_app.record_late" if i % 2 else "chaos_app.record"
            self.started[arg] = time.time()
            try:
                # declare=[]: a declare retried inside the publish retry leaves Kombu holding a
                # closed channel, which kombu-pg answers with AttributeError (pinned by
                # test_chaos_worker.py::test_publish_retry_survives_a_reconnect_during_its_declare).
                self.app.send_task(task, (arg,), retry=True, retry_policy=RETRY_POLICY, declare=[])
            except Exception as exc:  # counted: the assertion below names them
                self.failed.append((arg, exc))
            else:
                self.returned[arg] = time.time()
            i += 1
            time.sleep(0.005)  # load shaping: a steady stream rather than a burst


def test_every_returned_publish_is_processed_across_a_server_restart(server, broker, log, pg_url, schema):
    broker_url, broker_schema = broker
    env = {"KOMBU_PG_URL": broker_url, "KOMBU_PG_SCHEMA": broker_schema,
           "CHAOS_LOG_URL": pg_url, "CHAOS_LOG_SCHEMA": schema}
    workers = [CeleryWorker("chaos_app", env, pool="threads", concurrency=4, hostname=f"w{i}@%h")
               for i in range(2)]
    app = Celery("chaos_producer", broker=broker_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": broker_schema}
    stop = threading.Event()
    producers = [Producer(app, f"p{i}", stop) for i in range(2)]
    crashed: list[str] = []  # output of workers that exited
    try:
        for worker in workers:
            worker.wait_ready()
        for producer in producers:
            producer.start()

        def processed() -> list[str]:
            return log.args(phase="run")

        wait_until(lambda: len(processed()) >= 100, what="100 tasks before the restart")
        restart_began = time.time()
        server.restart()
        restart_ended = time.time()
        wait_until(lambda: sum(t > restart_ended for p in producers for t in p.returned.values()) >= 100,
                   timeout=60, what="100 publishes after the restart")
        stop.set()
        for producer in producers:
            producer.join(60)
            assert not producer.is_alive()

        returned = {arg for p in producers for arg in p.returned}
        started = {arg: t for p in producers for arg, t in p.started.items()}

        def all_processed():
            # Supervised like a service manager would: a worker that exits is replaced (and
            # counted; see test_chaos_worker.py for the known way a reconnect can kill one).
            for i, worker in enumerate(workers):
                if worker.proc.poll() is not None:
                    crashed.append(worker.output())
                    workers[i] = CeleryWorker("chaos_app", env, pool="threads", concurrency=4,
                                              hostname=f"w{i}-{len(crashed)}@%h")
            return returned <= set(processed())

        wait_until(all_processed, timeout=90, what="every returned publish to be processed")
        with psycopg.connect(broker_url, autocommit=True) as conn:
            left = sql.SQL("SELECT count(*) FROM {}.messages").format(sql.Identifier(broker_schema))
            wait_until(lambda: conn.execute(left).fetchone()[0] == 0, timeout=30, what="every message acked")
    finally:
        stop.set()
        for worker in workers:
            worker.kill(signal.SIGKILL)
            worker.stop(10)
        app.close()

    runs = log.rows(phase="run")
    counts = Counter(r.arg for r in runs)
    duplicates = {arg: n for arg, n in counts.items() if n > 1}
    failed = [arg for p in producers for arg, _ in p.failed]
    print(f"\npublished {len(returned)} (returned), {len(failed)} publish(es) raised, processed "
          f"{len(counts)} distinct in {len(runs)} runs; {len(duplicates)} duplicated: {sorted(duplicates)}; "
          f"restart took {restart_ended - restart_began:.2f} s; worker crashes: {len(crashed)}")
    # Count in = count out: nothing whose publish returned is lost, nothing appears from nowhere.
    assert returned <= set(counts)
    assert set(counts) <= set(started)
    assert not failed, f"publishes that raised despite retry: {[(a, repr(e)) for p in producers for a, e in p.failed]}"
    # Duplicates only among messages in flight at the restart: published before it ended,
    # and run again after it began.  (A worker that exited also redelivers what it held
    # later on; that is the known late-ack-after-reconnect bug, pinned in test_chaos_worker.py.)
    if not crashed:
        for arg in duplicates:
            times = sorted(r.at for r in runs if r.arg == arg)
            assert started[arg] < restart_ended and times[-1] > restart_began, (arg, times)
