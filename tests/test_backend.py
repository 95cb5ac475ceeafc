"""The PostgreSQL result backend used directly (no worker): storage semantics, groups,
chord counting, serializers, expiry, push-based waiting and reconnection.

Every test runs against a real server in its own schema (the ``schema`` fixture).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from celery import Celery, states
from celery.app.task import Context
from celery.backends.base import COMPRESSED_PAYLOAD_MAGIC
from celery.exceptions import ChordError, TaskRevokedError, TimeoutError
from celery.result import GroupResult
from kombu.utils.uuid import uuid
from psycopg import sql

from kombu_pg.backend import PostgresBackend
from kombu_pg.config import BackendOptions, ConfigurationError
from kombu_pg.store.migrations import MigrationError
from kombu_pg.store.results import ResultStore

from .worker import wait_until


class CustomError(Exception):
    """An application exception type that must come back as itself."""


# -- helpers -------------------------------------------------------------------------


@pytest.fixture
def make_app(pg_url, schema):
    """Build Celery apps whose backend is kombu-pg in this test's schema."""
    apps: list[Celery] = []

    def make(url: str | None = None, options: dict | None = None, **conf) -> Celery:
        app = Celery(f"test_backend_{len(apps)}", backend=url or pg_url, set_as_current=False)
        app.conf.result_backend_transport_options = {"schema": schema, **(options or {})}
        app.conf.update(conf)
        apps.append(app)
        return app

    yield make
    for app in apps:
        backend = app._backend
        if isinstance(backend, PostgresBackend):
            backend.close()


@pytest.fixture
def app(make_app):
    return make_app(result_extended=True)



def sessions(pg_conn, needle: str) -> list[int]:
    """Backend pids (other than ours) whose last statement mentions ``needle``."""
    rows = pg_conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE %s",
        (f"%{needle}%",),
    ).fetchall()
    return [r[0] for r in rows]


def listening_sessions(pg_conn, schema: str) -> list[int]:
    return sessions(pg_conn, f'LISTEN "{schema}:results"')


def request(**kw) -> Context:
    """A worker-like request for backend calls made outside a worker."""
    base = dict(id=uuid(), task="tests.add", args=(2, 3), kwargs={"z": 1}, hostname="w1@host",
                retries=0, delivery_info={"routing_key": "celery"}, group=None, chord=None,
                children=[], ignore_result=False)
    base.update(kw)
    return Context(base)


def in_thread(fn, *args, **kwargs):
    """Run ``fn`` in a thread; ``.result()`` re-raises its exception."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()

    class Handle:
        thread = t

        @staticmethod
        def result(timeout: float = 30):
            t.join(timeout)
            assert not t.is_alive(), "thread did not finish"
            if "error" in box:
                raise box["error"]
            return box["value"]

    return Handle


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_url_schemes_load_the_backend_through_the_entry_point(make_app, pg_url, scheme):
    url = scheme + pg_url[pg_url.index("://"):] if "://" in pg_url else pg_url
    app = make_app(url=url)
    assert isinstance(app.backend, PostgresBackend)
    app.backend.store_result("t1", 7, states.SUCCESS)
    assert app.AsyncResult("t1").get(timeout=5) == 7


def test_unknown_option_is_refused_with_the_known_ones_listed(make_app):
    app = make_app(options={"scheam": "x"})
    with pytest.raises(ConfigurationError, match="scheam.*schema"):
        app.backend


def test_broker_option_in_backend_options_is_explained(make_app):
    app = make_app(options={"claim_batch_max": 5})
    with pytest.raises(ConfigurationError, match="broker_transport_options"):
        app.backend


@pytest.mark.parametrize("bad", [{"schema": "1bad"}, {"schema": "a;b"}, {"polling_interval": 0},
                                 {"auto_migrate": "yes"}, {"cleanup_batch": 0},
                                 {"cleanup_interval": -1}, {"connect_kwargs": 3}])
def test_invalid_option_values_are_refused(bad):
    with pytest.raises(ConfigurationError):
        BackendOptions.from_mapping(bad)


def test_malformed_url_is_refused(make_app):
    app = make_app(url="postgresql://host/db?notanoption=1")
    with pytest.raises(ConfigurationError):
        app.backend


def test_multi_host_url_is_shown_without_its_password(make_app):
    # urllib (Kombu's and Celery's sanitizers) cannot parse "5432,h2:5433" as a port: the
    # worker's banner and log lines must not crash on such a URL, nor show the password.
    url = "postgresql://u:s3cret@h1:5432,h2:5433/db?target_session_attrs=read-write&password=s3cret"
    app = make_app(url)
    app.conf.broker_url = url
    shown = "postgresql://u:**@h1:5432,h2:5433/db?target_session_attrs=read-write&password=**"
    assert app.backend.as_uri() == shown
    assert app.connection_for_write().as_uri() == shown
    assert app.backend.as_uri(include_password=True) == url


def test_auto_migrate_off_refuses_an_unmigrated_schema(make_app):
    app = make_app(options={"auto_migrate": False})
    with pytest.raises(MigrationError, match="version 0"):
        app.backend.get_task_meta("x")


def test_sessions_are_named_unless_the_url_names_them(make_app, pg_url, pg_conn):
    def app_name(app):
        app.backend.store_result(uuid(), 1, states.SUCCESS)
        pid = app.backend._local.store.conn.info.backend_pid
        return pg_conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]

    assert app_name(make_app()) == "kombu_pg:results"
    sep = "&" if "?" in pg_url else "?"
    assert app_name(make_app(url=f"{pg_url}{sep}application_name=mine")) == "mine"


def test_schema_is_created_on_first_use(app, pg_conn, schema):
    app.backend.store_result("t1", 1, states.SUCCESS)
    version = pg_conn.execute(
        sql.SQL("SELECT max(version) FROM {}.schema_version").format(sql.Identifier(schema))
    ).fetchone()[0]
    assert version >= 2


# -- store / get / forget ----------------------------------------------------------------


def test_unknown_id_is_pending(app):
    res = app.AsyncResult(uuid())
    assert res.state == states.PENDING
    assert res.result is None
    assert not app.backend.task_result_exists(res.id)


@pytest.mark.parametrize("state", sorted(states.ALL_STATES - {states.FAILURE, states.REVOKED, states.RETRY}))
def test_every_plain_state_round_trips(app, state):
    tid = uuid()
    app.backend.store_result(tid, {"state": state}, state)
    meta = app.backend.get_task_meta(tid, cache=False)
    assert meta["status"] == state
    assert meta["result"] == {"state": state}
    assert (meta["date_done"] is not None) == (state in states.READY_STATES)


def test_failure_keeps_exception_type_message_and_traceback(app):
    tid = uuid()
    app.backend.mark_as_failure(tid, CustomError("it broke"), traceback="Traceback: line 1")
    res = app.AsyncResult(tid)
    assert res.state == states.FAILURE
    assert type(res.result) is CustomError and res.result.args == ("it broke",)
    assert res.traceback == "Traceback: line 1"
    with pytest.raises(CustomError, match="it broke"):
        res.get(timeout=5)


def test_retry_state_keeps_the_exception(app):
    tid = uuid()
    app.backend.mark_as_retry(tid, KeyError("again"), traceback="tb")
    meta = app.backend.get_task_meta(tid)
    assert meta["status"] == states.RETRY
    assert isinstance(meta["result"], KeyError)


def test_revoked_task(app):
    tid = uuid()
    app.backend.mark_as_revoked(tid, reason="no longer wanted")
    res = app.AsyncResult(tid)
    assert res.state == states.REVOKED
    with pytest.raises(TaskRevokedError):
        res.get(timeout=5)


def test_forget_removes_the_result(app):
    tid = uuid()
    app.backend.store_result(tid, 1, states.SUCCESS)
    res = app.AsyncResult(tid)
    assert res.get(timeout=5) == 1
    res.forget()
    assert app.AsyncResult(tid).state == states.PENDING
    assert not app.backend.task_result_exists(tid)


def test_success_is_not_overwritten_by_a_later_state(app):
    """A redelivered task must not replace its first stored result."""
    tid = uuid()
    app.backend.store_result(tid, "first", states.SUCCESS)
    app.backend.store_result(tid, None, states.STARTED)
    app.backend.mark_as_failure(tid, CustomError("late duplicate"))
    app.backend.store_result(tid, "second", states.SUCCESS)
    meta = app.backend.get_task_meta(tid, cache=False)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, "first")


def test_extended_result_fields(app):
    req = request(args=(1, "two"), kwargs={"k": [3]}, retries=2,
                  delivery_info={"routing_key": "fast"}, parent_id="p1", group="g1")
    app.backend.store_result(req.id, {"pid": 1}, states.STARTED, request=req)
    app.backend.mark_as_done(req.id, 42, request=req)
    res = app.AsyncResult(req.id)
    assert res.get(timeout=5) == 42
    assert res.name == "tests.add"
    assert res.args == [1, "two"] or res.args == (1, "two")
    assert res.kwargs == {"k": [3]}
    assert res.worker == "w1@host"
    assert res.retries == 2
    assert res.queue == "fast"
    meta = app.backend.get_task_meta(req.id)
    assert meta["group_id"] == "g1" and meta["parent_id"] == "p1"
    started, done = meta["date_started"], res.date_done
    assert isinstance(started, datetime) and started.tzinfo is not None
    assert started <= done <= datetime.now(timezone.utc) + timedelta(seconds=5)


def test_children_are_stored(app):
    child = app.AsyncResult(uuid())
    req = request()
    req.children.append(child)
    app.backend.mark_as_done(req.id, 1, request=req)
    res = app.AsyncResult(req.id)
    res.get(timeout=5)
    assert [c.id for c in res.children] == [child.id]


# -- serializers, binary, size -------------------------------------------------------------


def _serializer_params():
    params = ["json", "pickle"]
    try:
        import msgpack  # noqa: F401
        params.append("msgpack")
    except ImportError:
        params.append(pytest.param("msgpack", marks=pytest.mark.skip(reason="msgpack not installed")))
    return params


@pytest.mark.parametrize("serializer", _serializer_params())
def test_serializers_binary_results_and_exceptions(make_app, serializer):
    app = make_app(result_serializer=serializer, accept_content=[serializer],
                   result_accept_content=[serializer])
    tid, fid = uuid(), uuid()
    value = {"bytes": b"\x00\x01\xffbinary", "text": "h\u00e9llo \u0000 nul", "n": [1, 2.5]}
    app.backend.store_result(tid, value, states.SUCCESS)
    assert app.AsyncResult(tid).get(timeout=5) == value
    app.backend.mark_as_failure(fid, CustomError("bad"))
    with pytest.raises(CustomError):
        app.AsyncResult(fid).get(timeout=5)


def test_pickle_rows_are_refused_by_a_json_only_reader(make_app):
    from kombu.exceptions import ContentDisallowed

    writer = make_app(result_serializer="pickle", accept_content=["pickle", "json"])
    reader = make_app()  # json only
    tid = uuid()
    writer.backend.store_result(tid, {1, 2}, states.SUCCESS)
    with pytest.raises(ContentDisallowed):
        reader.backend.get_task_meta(tid)


def test_compressed_results_are_stored_compressed(make_app, pg_conn, schema):
    app = make_app(result_compression="gzip")
    tid = uuid()
    value = "x" * 100_000
    app.backend.store_result(tid, value, states.SUCCESS)
    raw, = pg_conn.execute(
        sql.SQL("SELECT result FROM {}.results WHERE task_id = %s").format(sql.Identifier(schema)),
        (tid,),
    ).fetchone()
    assert bytes(raw).startswith(COMPRESSED_PAYLOAD_MAGIC) and len(raw) < 10_000
    assert make_app().AsyncResult(tid).get(timeout=5) == value


def test_results_over_one_megabyte(app):
    tid = uuid()
    value = {"blob": b"\x07" * (3 * 1024 * 1024), "text": "y" * (2 * 1024 * 1024)}
    app.backend.store_result(tid, value, states.SUCCESS)
    assert app.AsyncResult(tid).get(timeout=10) == value


# -- groups ---------------------------------------------------------------------------------


def test_group_save_restore_delete(app):
    ids = [uuid() for _ in range(3)]
    group = GroupResult(uuid(), [app.AsyncResult(i) for i in ids], app=app)
    group.save(backend=app.backend)
    restored = GroupResult.restore(group.id, app=app, backend=app.backend)
    assert [r.id for r in restored.results] == ids
    assert app.backend.get_group_meta(group.id)["date_done"].tzinfo is not None
    restored.delete()
    assert GroupResult.restore(group.id, app=app, backend=app.backend) is None


def test_nested_group_round_trips(app):
    inner = GroupResult(uuid(), [app.AsyncResult(uuid())], app=app)
    outer = GroupResult(uuid(), [inner, app.AsyncResult(uuid())], app=app)
    outer.save(backend=app.backend)
    restored = GroupResult.restore(outer.id, app=app, backend=app.backend)
    assert isinstance(restored.results[0], GroupResult)
    assert restored.results[0].results[0].id == inner.results[0].id


def test_group_get_is_a_native_join_in_order(app, make_app):
    ids = [uuid() for _ in range(5)]
    group = GroupResult(uuid(), [app.AsyncResult(i) for i in ids], app=app)
    assert group.supports_native_join
    writer = make_app()

    def write():
        for n, tid in reversed(list(enumerate(ids))):
            writer.backend.store_result(tid, n * 10, states.SUCCESS)

    handle = in_thread(group.get, timeout=15)
    wait_until(lambda: listening_sessions_for(app), what="the group waiter to LISTEN")
    write()
    assert handle.result() == [0, 10, 20, 30, 40]


def test_group_join_reads_only_announced_members(make_app, pg_conn, schema):
    """A wake-up re-reads the ids its NOTIFYs named, not every pending member, so a
    large join stays linear."""
    app = make_app(options={"polling_interval": 60})
    writer = make_app()
    ids = [uuid() for _ in range(30)]
    group = GroupResult(uuid(), [app.AsyncResult(i) for i in ids], app=app)
    backend = app.backend  # this thread's instance: the join runs here
    read_sizes: list[int] = []
    real_fetch = backend._fetch_ready

    def counting_fetch(task_ids, ready_states):
        read_sizes.append(len(task_ids))
        return real_fetch(task_ids, ready_states)

    backend._fetch_ready = counting_fetch

    def write():
        wait_until(lambda: listening_sessions(pg_conn, schema), what="the join to LISTEN")
        for n, tid in enumerate(ids):
            writer.backend.store_result(tid, n, states.SUCCESS)

    handle = in_thread(write)
    assert group.get(timeout=20) == list(range(30))
    handle.result()
    # Two full reads (before and after LISTEN), then only what was announced.
    assert sum(read_sizes) <= 2 * 30 + 30, read_sizes


def listening_sessions_for(app):
    with psycopg.connect(app.backend.conninfo, autocommit=True) as conn:
        return listening_sessions(conn, app.backend.schema)


def test_get_many_times_out_and_returns_what_is_ready(app):
    ready, missing = uuid(), uuid()
    app.backend.store_result(ready, "r", states.SUCCESS)
    got = {}
    with pytest.raises(TimeoutError):
        for tid, meta in app.backend.get_many([ready, missing], timeout=0.3):
            got[tid] = meta["result"]
    assert got == {ready: "r"}


def test_get_times_out_on_a_pending_result(app):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        app.AsyncResult(uuid()).get(timeout=0.3)
    assert time.monotonic() - started < 3


# -- push-based waiting --------------------------------------------------------------------


def test_get_is_woken_by_notify_not_by_polling(make_app, pg_conn, schema):
    """With a 60 s safety interval, only the NOTIFY can wake the waiter in time."""
    waiter = make_app(options={"polling_interval": 60})
    writer = make_app()
    tid = uuid()
    handle = in_thread(waiter.AsyncResult(tid).get, timeout=20)
    wait_until(lambda: listening_sessions(pg_conn, schema), what="the waiter to LISTEN")
    stored_at = time.monotonic()
    writer.backend.store_result(tid, "pushed", states.SUCCESS)
    assert handle.result() == "pushed"
    assert time.monotonic() - stored_at < 5
    # The waiter stops listening once it has its result.
    wait_until(lambda: not listening_sessions(pg_conn, schema), what="UNLISTEN")


def test_non_ready_states_do_not_wake_waiters_and_ready_ones_do(make_app, pg_conn, schema):
    waiter = make_app(options={"polling_interval": 60})
    writer = make_app()
    tid = uuid()
    handle = in_thread(waiter.AsyncResult(tid).get, timeout=20)
    wait_until(lambda: listening_sessions(pg_conn, schema), what="the waiter to LISTEN")
    writer.backend.store_result(tid, {"step": 1}, states.STARTED)
    assert handle.thread.is_alive()
    writer.backend.mark_as_failure(tid, CustomError("ready now"))
    with pytest.raises(CustomError):
        handle.result()


def test_listening_connection_killed_during_get_reconnects(make_app, pg_conn, schema):
    waiter = make_app(options={"polling_interval": 60})
    writer = make_app()
    tid = uuid()
    handle = in_thread(waiter.AsyncResult(tid).get, timeout=30)
    first = wait_until(lambda: listening_sessions(pg_conn, schema), what="the waiter to LISTEN")
    pg_conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (first,))
    # The waiter notices, reconnects and listens again from a new session.
    wait_until(lambda: set(listening_sessions(pg_conn, schema)) - set(first),
               what="the waiter to LISTEN again")
    started = time.monotonic()
    writer.backend.store_result(tid, "after reconnect", states.SUCCESS)
    assert handle.result() == "after reconnect"
    assert time.monotonic() - started < 5


def test_result_stored_while_listener_is_dead_is_not_missed(make_app, pg_conn, schema):
    waiter = make_app(options={"polling_interval": 60})
    tid = uuid()
    handle = in_thread(waiter.AsyncResult(tid).get, timeout=30)
    first = wait_until(lambda: listening_sessions(pg_conn, schema), what="the waiter to LISTEN")
    # Store first, then kill the listener: the NOTIFY may be lost with the session,
    # but the waiter re-reads after reconnecting.
    writer = make_app()
    writer.backend.store_result(tid, "stored", states.SUCCESS)
    pg_conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (first,))
    assert handle.result() == "stored"


@pytest.mark.chaos
def test_server_restart_during_get(make_app):
    """A waiter outlives a server restart: it keeps reconnecting (with backoff) and
    gets a result stored once the server is back.  A private embedded server is
    restarted, never a shared one."""
    from kombu_pg.embedded import EmbeddedPostgres

    with EmbeddedPostgres() as server:
        waiter = make_app(url=server.url, options={"polling_interval": 60})
        tid = uuid()
        handle = in_thread(waiter.AsyncResult(tid).get, timeout=90)
        wait_until(lambda: listening_sessions_for(waiter), what="the waiter to LISTEN")
        server.restart()
        make_app(url=server.url).backend.store_result(tid, "after restart", states.SUCCESS)
        assert handle.result(timeout=90) == "after restart"
        waiter.backend.close()


def test_data_connection_killed_between_calls_reconnects(app, pg_conn, schema):
    tid = uuid()
    app.backend.store_result(tid, 1, states.SUCCESS)
    victim = app.backend._local.store.conn.info.backend_pid
    pg_conn.execute("SELECT pg_terminate_backend(%s)", (victim,))
    wait_until(lambda: not pg_conn.execute(
        "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (victim,)).fetchone(),
        what="the session to end")
    app.backend.store_result(uuid(), 2, states.SUCCESS)  # reconnects transparently
    assert app.backend._local.store.conn.info.backend_pid != victim
    assert app.backend.get_task_meta(tid, cache=False)["result"] == 1


def test_thread_safe_backend_shared_by_waiting_threads(make_app):
    """With result_backend_thread_safe one backend serves every thread; each thread
    still waits on its own connections."""
    app = make_app(result_backend_thread_safe=True, options={"polling_interval": 30})
    writer = make_app()
    ids = [uuid() for _ in range(4)]
    handles = [in_thread(app.AsyncResult(tid).get, timeout=20) for tid in ids]
    for n, tid in enumerate(ids):
        writer.backend.store_result(tid, n, states.SUCCESS)
    assert [h.result() for h in handles] == [0, 1, 2, 3]
    assert app._backend_cache is app.backend  # one instance for all threads


def test_many_concurrent_writers_and_waiters(make_app):
    n_waiters, per_waiter = 6, 20
    ids = [[uuid() for _ in range(per_waiter)] for _ in range(n_waiters)]
    waiters = []
    for group_ids in ids:
        app = make_app(options={"polling_interval": 30})
        group = GroupResult(uuid(), [app.AsyncResult(i) for i in group_ids], app=app)
        waiters.append(in_thread(group.get, timeout=60))
    flat = [(i, tid) for group_ids in ids for i, tid in enumerate(group_ids)]
    chunks = [flat[k::4] for k in range(4)]

    def write(chunk):
        writer = make_app()
        for i, tid in chunk:
            writer.backend.store_result(tid, i, states.SUCCESS)
        writer.backend.close()
        return len(chunk)

    writers = [in_thread(write, chunk) for chunk in chunks]
    assert sum(w.result() for w in writers) == n_waiters * per_waiter
    for w in waiters:
        assert w.result() == list(range(per_waiter))


# -- chords (counter, no chord_unlock) --------------------------------------------------------


@pytest.fixture
def chord_app(make_app):
    # The body runs in-process when sent; its failure is stored like a worker would.
    app = make_app(task_always_eager=True, task_store_eager_result=True)
    received: list = []

    @app.task(name="tests.collect", shared=False)
    def collect(values):
        received.append(values)
        return values

    app.received = received
    app.collect = collect
    return app


def _header(app, gid, n):
    return [request(id=uuid(), group=gid, group_index=i, chord=dict(app.collect.s())) for i in range(n)]


def test_chord_counter_fires_the_body_once_with_ordered_values(chord_app):
    app, gid = chord_app, uuid()
    parts = _header(app, gid, 4)
    app.backend.apply_chord((gid, [app.AsyncResult(p.id) for p in parts]), app.collect.s())
    app.backend.set_chord_size(gid, 4)
    for p in reversed(parts[1:]):
        app.backend.mark_as_done(p.id, p.group_index * 2, request=p)
    assert app.received == []
    app.backend.mark_as_done(parts[0].id, 0, request=parts[0])
    assert app.received == [[0, 2, 4, 6]]
    # A redelivered part does not fire the body again.
    app.backend.mark_as_done(parts[2].id, 4, request=parts[2])
    assert app.received == [[0, 2, 4, 6]]


def test_redelivered_part_counts_once(chord_app):
    app, gid = chord_app, uuid()
    parts = _header(app, gid, 3)
    app.backend.apply_chord((gid, [app.AsyncResult(p.id) for p in parts]), app.collect.s())
    app.backend.set_chord_size(gid, 3)
    app.backend.mark_as_done(parts[0].id, "a", request=parts[0])
    app.backend.on_chord_part_return(parts[0], states.SUCCESS, "a")  # duplicate delivery
    app.backend.mark_as_done(parts[1].id, "b", request=parts[1])
    assert app.received == []
    app.backend.mark_as_done(parts[2].id, "c", request=parts[2])
    assert app.received == [["a", "b", "c"]]


def test_concurrent_parts_fire_exactly_once(chord_app, make_app):
    app, gid, n = chord_app, uuid(), 24
    parts = _header(app, gid, n)
    app.backend.apply_chord((gid, [app.AsyncResult(p.id) for p in parts]), app.collect.s())
    app.backend.set_chord_size(gid, n)
    barrier = threading.Barrier(6)

    def run(chunk):
        barrier.wait(10)
        for p in chunk:  # each thread gets its own backend instance (thread-local)
            app.backend.mark_as_done(p.id, p.group_index, request=p)
        app.backend.close()

    threads = [in_thread(run, parts[k::6]) for k in range(6)]
    for t in threads:
        t.result()
    assert app.received == [list(range(n))]


def test_failed_part_fails_the_body_with_chord_error(chord_app):
    app, gid = chord_app, uuid()
    parts = _header(app, gid, 3)
    body = app.collect.s().freeze()
    for p in parts:
        p.chord = dict(app.collect.s().set(task_id=body.id))
    app.backend.apply_chord((gid, [app.AsyncResult(p.id) for p in parts]), app.collect.s())
    app.backend.set_chord_size(gid, 3)
    app.backend.mark_as_done(parts[0].id, 1, request=parts[0])
    app.backend.mark_as_failure(parts[1].id, CustomError("part failed"), request=parts[1])
    app.backend.mark_as_done(parts[2].id, 3, request=parts[2])
    assert app.received == []
    res = app.AsyncResult(body.id)
    assert res.state == states.FAILURE
    assert isinstance(res.result, ChordError)
    assert parts[1].id in str(res.result) and "part failed" in str(res.result)


def test_chord_state_is_dropped_after_firing(chord_app, pg_conn, schema):
    app, gid = chord_app, uuid()
    parts = _header(app, gid, 2)
    app.backend.apply_chord((gid, [app.AsyncResult(p.id) for p in parts]), app.collect.s())
    app.backend.set_chord_size(gid, 2)
    for p in parts:
        app.backend.mark_as_done(p.id, 1, request=p)
    counts = app.backend._run(lambda st: st.counts())
    assert counts["chord_parts"] == 0 and counts["chords"] == 1  # the fired marker


def test_reapplied_chord_fires_again(chord_app):
    app, gid = chord_app, uuid()
    for run in range(2):
        parts = _header(app, gid, 2)
        app.backend.apply_chord((gid, [app.AsyncResult(p.id) for p in parts]), app.collect.s())
        app.backend.set_chord_size(gid, 2)
        for p in parts:
            app.backend.mark_as_done(p.id, run, request=p)
    assert app.received == [[0, 0], [1, 1]]


def test_add_to_chord_retried_after_a_lost_reply_counts_it_once(chord_app, pg_conn, monkeypatch):
    """chord_add commits, then its session dies before the reply arrives: the backend
    runs it again on a new connection, which must not raise the chord's target twice
    (the body would wait for a part that never comes)."""
    app, gid = chord_app, uuid()
    parts = _header(app, gid, 2)
    app.backend.apply_chord((gid, [app.AsyncResult(p.id) for p in parts]), app.collect.s())
    real_chord_add, lost = ResultStore.chord_add, []

    def commit_then_lose_the_reply(store, *args, **kwargs):
        real_chord_add(store, *args, **kwargs)
        if not lost:
            lost.append(store.conn.info.backend_pid)
            pg_conn.execute("SELECT pg_terminate_backend(%s, 10000)", (lost[0],))
            store.conn.execute("SELECT 1")  # the session is gone: OperationalError

    monkeypatch.setattr(ResultStore, "chord_add", commit_then_lose_the_reply)
    added = request(id=uuid(), group=gid, group_index=0, chord=dict(app.collect.s()))
    app.backend.add_to_chord(gid, app.AsyncResult(added.id))
    assert lost and app.backend._local.store.conn.info.backend_pid != lost[0]  # it was retried
    app.backend.set_chord_size(gid, 2)
    for p in parts:
        app.backend.mark_as_done(p.id, p.group_index, request=p)
    assert app.received == []
    app.backend.mark_as_done(added.id, "x", request=added)
    assert app.received == [[0, 1, "x"]]


# -- expiry and cleanup -----------------------------------------------------------------------


def _expire_everything(pg_conn, schema):
    for table in ("results", "groups", "chords", "chord_parts"):
        pg_conn.execute(
            sql.SQL("UPDATE {}.{} SET expires_at = now() - interval '1 second' WHERE expires_at IS NOT NULL")
            .format(sql.Identifier(schema), sql.Identifier(table))
        )


def test_expired_results_read_as_pending_and_cleanup_deletes_them(make_app, pg_conn, schema):
    app = make_app(result_expires=timedelta(hours=1), options={"cleanup_batch": 7})
    ids = [uuid() for _ in range(20)]
    for tid in ids:
        app.backend.store_result(tid, 1, states.SUCCESS)
    GroupResult(uuid(), [app.AsyncResult(i) for i in ids], app=app).save(backend=app.backend)
    keep = make_app(result_expires=None)
    kept = uuid()
    keep.backend.store_result(kept, "forever", states.SUCCESS)
    _expire_everything(pg_conn, schema)
    assert app.backend.get_task_meta(ids[0], cache=False)["status"] == states.PENDING
    app.tasks["celery.backend_cleanup"].apply()  # what celery beat schedules daily
    assert app.backend._run(lambda st: st.counts()) == {
        "results": 1, "groups": 0, "chords": 0, "chord_parts": 0}
    assert keep.AsyncResult(kept).get(timeout=5) == "forever"


def test_writes_piggyback_a_bounded_cleanup_without_beat(make_app, pg_conn, schema):
    import kombu_pg.backend as backend_module

    app = make_app(result_expires=timedelta(hours=1),
                   options={"cleanup_interval": 3600, "cleanup_batch": 10})
    for _ in range(25):
        app.backend.store_result(uuid(), 1, states.SUCCESS)
    _expire_everything(pg_conn, schema)
    key = (app.backend.conninfo, schema)
    backend_module._NEXT_CLEANUP.pop(key, None)  # make the next write's cleanup due
    app.backend.store_result(uuid(), 1, states.SUCCESS)
    assert app.backend._run(lambda st: st.counts())["results"] == 25 - 10 + 1
    # Not due again yet: the interval is an hour...
    app.backend.mark_as_failure(uuid(), CustomError("x"))
    assert app.backend._run(lambda st: st.counts())["results"] == 25 - 10 + 2
    # ...but a full batch brings the next pass forward (catch-up), to within a second.
    assert backend_module._NEXT_CLEANUP[key] - time.monotonic() <= backend_module.CLEANUP_CATCH_UP
    backend_module._NEXT_CLEANUP.pop(key, None)
    app.backend.store_result(uuid(), 1, states.SUCCESS)
    assert app.backend._run(lambda st: st.counts())["results"] == 25 - 20 + 3


def test_beat_schedules_backend_cleanup_when_results_expire(make_app):
    from celery.beat import Scheduler

    app = make_app(result_expires=timedelta(hours=1))
    assert app.backend.supports_autoexpire is False
    sched = Scheduler(app, lazy=True)
    sched.install_default_entries({})
    assert sched.schedule["celery.backend_cleanup"].task == "celery.backend_cleanup"


def test_result_expires_sets_expiry_and_failure_expires_applies_to_failures(make_app, pg_conn, schema):
    app = make_app(result_expires=timedelta(hours=2), result_failure_expires=timedelta(days=3))
    ok, bad = uuid(), uuid()
    app.backend.store_result(ok, 1, states.SUCCESS)
    app.backend.mark_as_failure(bad, CustomError("x"))
    rows = dict(pg_conn.execute(
        sql.SQL("SELECT task_id, extract(epoch FROM expires_at - now()) FROM {}.results")
        .format(sql.Identifier(schema))
    ).fetchall())
    assert 7000 < rows[ok] <= 7200
    assert 3 * 86400 - 200 < rows[bad] <= 3 * 86400


def test_cleanup_uses_the_expiry_index(app, pg_conn, schema):
    app.backend.store_result(uuid(), 1, states.SUCCESS)
    with pg_conn.transaction():
        pg_conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in pg_conn.execute(
            sql.SQL("EXPLAIN SELECT ctid FROM {}.results WHERE expires_at <= now() "
                    "ORDER BY expires_at LIMIT 100").format(sql.Identifier(schema))))
    assert "results_expires_idx" in plan


# -- fork safety -------------------------------------------------------------------------------


def test_fork_child_drops_inherited_connections_without_closing_them(app):
    import os

    tid = uuid()
    app.backend.store_result(tid, "parent", states.SUCCESS)
    parent_conn = app.backend._local.store.conn
    pid = os.fork()
    if pid == 0:  # child: use the backend, which must open its own connection
        code = 0
        try:
            meta = app.backend.get_task_meta(tid, cache=False)
            if meta["result"] != "parent" or app.backend._local.store.conn is parent_conn:
                code = 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's connection still works: the child never sent it a Terminate.
    assert app.backend._local.store.conn is parent_conn
    assert app.backend.get_task_meta(tid, cache=False)["result"] == "parent"
