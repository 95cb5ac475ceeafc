"""Failover to a new primary (issue 16, item 11) without replication.

Two private servers, A and B, both migrated; the URL names both with
``target_session_attrs=read-write``.  A starts writable and B read-only
(``default_transaction_read_only``); a real ``celery worker`` (kombu-pg broker and result
backend on that URL) and a client run tasks on A.  Then the roles swap, as when a primary
is demoted and a standby promoted: A read-only, B writable.  A's sessions are either
terminated or kept; kept, they stay connected to a server that refuses their writes with
``ReadOnlySqlTransaction``, and that error alone must make every component reconnect,
which reaches B.  Tasks sent after the swap must run and their results come back.
"""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from celery import Celery

from kombu_pg.store import apply_migrations

from .worker import CeleryWorker, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

TIMEOUT = 30


class _Servers:
    def __init__(self) -> None:
        from .scale_out_server import VethPostgres

        self.a = VethPostgres(["127.0.0.1"], ["127.0.0.1"])
        try:
            self.b = VethPostgres(["127.0.0.1"], ["127.0.0.1"])
        except BaseException:
            self.a.stop()
            raise

    def stop(self) -> None:
        self.a.stop()
        self.b.stop()


@pytest.fixture(scope="module")
def servers():
    pytest.importorskip("pgserver", reason="the two private servers are run from pgserver's binaries")
    try:
        pair = _Servers()
    except Exception as exc:  # no way to run two servers here: say why
        pytest.skip(f"cannot start two private PostgreSQL servers: {exc!r}")
    yield pair
    pair.stop()


def _admin(server) -> psycopg.Connection:
    return psycopg.connect(server.url("127.0.0.1"), autocommit=True, application_name="failover_admin")


def _set_read_only(server, on: bool) -> None:
    with _admin(server) as conn:
        conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
        conn.execute("SELECT pg_reload_conf()")
    # The reload is asynchronous: once a new session sees the setting, the postmaster has
    # reloaded and signalled every existing session, which applies it to its next statement.
    expected = "on" if on else "off"
    wait_until(lambda: _show_read_only(server) == expected, what=f"read-only {expected} on port {server.port}")


def _show_read_only(server) -> str:
    with _admin(server) as conn:
        return conn.execute("SHOW default_transaction_read_only").fetchone()[0]


def _kombu_pg_sessions(server) -> list[int]:
    with _admin(server) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'kombu_pg%'")
        return [pid for (pid,) in rows]


def _listening(server, schema: str) -> bool:
    with _admin(server) as conn:
        return bool(conn.execute("SELECT 1 FROM pg_stat_activity WHERE query = %s",
                                 (f'LISTEN "{schema}:results"',)).fetchone())


class _Thread(threading.Thread):
    """Runs ``fn`` at once; :meth:`result` re-raises what it raised."""

    def __init__(self, fn) -> None:
        super().__init__(daemon=True)
        self.fn, self.error = fn, None
        self.start()

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised by result())
            self.error = exc

    def result(self) -> None:
        self.join(TIMEOUT)
        assert not self.is_alive(), "the sender did not finish"
        if self.error is not None:
            raise self.error


def _terminate_sessions(server) -> None:
    with _admin(server) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")


@pytest.fixture
def roles(servers):
    """A schema migrated on both servers; A writable, B read-only (reset afterwards)."""
    schema = f"f_{uuid.uuid4().hex[:12]}"
    for server in (servers.a, servers.b):
        with _admin(server) as conn:
            apply_migrations(conn, schema)
    _set_read_only(servers.b, True)
    _set_read_only(servers.a, False)
    yield schema
    for server in (servers.a, servers.b):
        _set_read_only(server, False)
        with _admin(server) as conn:
            conn.execute(psycopg.sql.SQL("DROP SCHEMA {} CASCADE").format(psycopg.sql.Identifier(schema)))


@pytest.mark.parametrize("terminate", [False, True], ids=["sessions-kept", "sessions-terminated"])
def test_worker_and_client_follow_the_primary_to_the_other_host(servers, roles, terminate):
    schema = roles
    url = (f"postgresql://postgres@127.0.0.1:{servers.a.port},127.0.0.1:{servers.b.port}/postgres"
           "?target_session_attrs=read-write")
    worker = CeleryWorker("backend_app", {"KOMBU_PG_URL": url, "KOMBU_PG_SCHEMA": schema},
                          pool="threads", concurrency=2)
    client = Celery("failover_client", broker=url, backend=url, set_as_current=False)
    client.conf.broker_transport_options = {"schema": schema}
    # No safety re-read within TIMEOUT: each get() must be woken by a NOTIFY, so a waiter
    # still listening on A after the swap fails the test.
    client.conf.result_backend_transport_options = {"schema": schema, "polling_interval": 60}
    try:
        worker.wait_ready()
        # Every component now holds sessions on A: the worker's broker and backend
        # sessions, the client's producer, data and listening sessions.
        assert client.send_task("backend_app.add", (1, 1)).get(timeout=TIMEOUT) == 2
        assert _kombu_pg_sessions(servers.a)

        _set_read_only(servers.a, True)
        _set_read_only(servers.b, False)
        if terminate:
            _terminate_sessions(servers.a)
        else:
            assert _kombu_pg_sessions(servers.a), "the sessions on A must still be there"

        # This thread waits on its kept sessions: the first read after the swap (on A)
        # must move its data *and* listening sessions to B, where the task's NOTIFY comes
        # from.  The task is sent once the waiter listens on B.  The send's first attempt
        # goes to A (read-only) when the producer's session was kept; the publish retry
        # reconnects to B and the caller sees no error.
        task_id = str(uuid.uuid4())

        def send_once_the_waiter_listens_on_b() -> None:
            wait_until(lambda: _listening(servers.b, schema), timeout=TIMEOUT, what="a waiter on B")
            client.send_task("backend_app.add", (20, 22), task_id=task_id)

        sender = _Thread(send_once_the_waiter_listens_on_b)
        assert client.AsyncResult(task_id).get(timeout=TIMEOUT) == 42
        sender.result()
        results = [client.send_task("backend_app.add", (i, i)) for i in range(5)]
        assert [r.get(timeout=TIMEOUT) for r in results] == [2 * i for i in range(5)]
        with _admin(servers.b) as conn:
            stored = conn.execute(psycopg.sql.SQL("SELECT count(*) FROM {}.results WHERE task_id = ANY(%s)")
                                  .format(psycopg.sql.Identifier(schema)), ([r.id for r in results],))
            assert stored.fetchone()[0] == 5  # through B, the new primary
        assert worker.proc.poll() is None, worker.output()
        assert client.send_task("backend_app.mul", (3, 4)).get(timeout=TIMEOUT) == 12
    finally:
        client.close()
        client.backend.close()
        worker.stop()
