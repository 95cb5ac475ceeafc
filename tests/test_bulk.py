"""Bulk publish: a batch of Celery tasks written in one statement when the block exits."""

from __future__ import annotations

import gc
import json
import threading
import time
from datetime import datetime, timedelta, timezone

import kombu
import kombu.exceptions
import psycopg
import pytest
from celery import Celery, Task, group, signals
from psycopg import sql

from celery_dlq.capture import PUBLISHED_HEADER, stamp_published
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


def test_a_batch_larger_than_max_size_is_still_all_or_nothing(app, pg_conn, schema):
    app.send_task("warm.up")
    with batch(app, max_size=10) as producer:
        group(app.signature("t", (i,)) for i in range(25)).apply_async(producer=producer)
        app.send_task("t", ("once",), headers={"job_key": "once"}, producer=producer)
        assert rows(pg_conn, schema, "job_key") == [None]  # a job key joins the batch too
        more = [app.send_task("t", (i,), producer=producer) for i in range(25, 40)]
    assert rows(pg_conn, schema, "job_key").count("once") == 1
    payloads = [json.loads(p) for p in rows(pg_conn, schema)[1:]]
    in_order = [p["headers"]["argsrepr"] for p in payloads]
    # ids follow publish order across chunks
    assert in_order == [f"({i},)" for i in range(25)] + ["('once',)"] + [f"({i},)" for i in range(25, 40)]
    assert payloads[-1]["headers"]["id"] == more[-1].id

    with pytest.raises(KeyError):
        with batch(app, max_size=10) as producer:
            for i in range(35):  # three chunks written by the time the block raises
                app.send_task("t", (i,), producer=producer)
            raise KeyError
    assert len(rows(pg_conn, schema)) == 42


def test_a_batch_whose_writer_session_dies_raises_and_publishes_nothing(app, pg_conn, schema):
    app.send_task("warm.up")
    # Kombu's error for a lost broker connection, raised by the send that meets it or at
    # the end of the block: never a retry that would send the rest outside the batch.
    with pytest.raises(kombu.exceptions.OperationalError):
        with batch(app, max_size=10) as producer:
            for i in range(10):  # one chunk: the writer's transaction is open
                app.send_task("t", (i,), producer=producer)
            writer = wait_for_writer(pg_conn, schema)
            pg_conn.execute("SELECT pg_terminate_backend(%s, 5000)", (writer,))
            for i in range(30):
                app.send_task("t", (i,), producer=producer)
    assert len(rows(pg_conn, schema)) == 1


def test_a_batch_whose_commit_fails_raises_instead_of_hanging(app, pg_conn, schema):
    app.send_task("warm.up")
    outcome = []

    def publish() -> None:
        try:
            with batch(app, max_size=10) as producer:
                for i in range(10):  # exactly one chunk: nothing is left to write at the end
                    app.send_task("t", (i,), producer=producer)
                writer = wait_for_writer(pg_conn, schema)
                pg_conn.execute("SELECT pg_terminate_backend(%s, 5000)", (writer,))
        except kombu.exceptions.OperationalError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the batch hung on a writer whose COMMIT failed"
    assert len(outcome) == 1
    assert len(rows(pg_conn, schema)) == 1


def wait_for_writer(pg_conn, schema) -> int:
    """The pid of the session that has written this schema's first chunk, not committed."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = pg_conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE %s",
            (f'%"{schema}".%',)).fetchall()  # query text is cut at 1 kB: match its start
        if found:
            return found[0][0]
        pg_conn.execute("SELECT pg_stat_clear_snapshot()")
    raise AssertionError("the batch's writer never showed up in pg_stat_activity")


def test_max_size_must_be_a_positive_integer(app):
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_size"):
            with batch(app, max_size=bad):
                pass


def test_one_notify_per_queue_and_due_times_announced(app, pg_url, pg_conn, schema):
    app.conf.broker_transport_options = {"schema": schema, "native_delayed_delivery": True}
    app.send_task("warm.up")
    due = []
    listener = Listener(pg_url, f"{schema}:queues", f"{schema}:due", due.append)
    try:
        send_many([app.signature("t", (i,)) for i in range(20)] +
                  [app.signature("t", (i,), queue="other") for i in range(5)] +
                  [app.signature("t", countdown=3600), app.signature("t", countdown=7200)])
        assert notified_until_marker(listener, pg_conn) == ["celery", "other"]
        assert len(due) == 1 and 3500 < due[0] - time.time() <= 3600  # the earliest, once
    finally:
        listener.close()


def notified_until_marker(listener: Listener, pg_conn) -> list[str]:
    """Queue names notified so far: NOTIFYs arrive in commit order, so once a marker sent
    now arrives, every NOTIFY committed before it has too."""
    pg_conn.execute("SELECT pg_notify(%s, 'marker')", (listener.channel,))
    seen: set[str] = set()
    deadline = time.monotonic() + 10
    while "marker" not in seen and time.monotonic() < deadline:
        seen |= listener.wait(1)
    assert "marker" in seen, f"the marker NOTIFY never arrived; got {seen}"
    return sorted(seen - {"marker"})


def test_send_many_leaves_the_cyclic_gc_as_it_found_it(app, add):
    assert gc.isenabled()
    send_many([add.s(1, 2)])
    assert gc.isenabled()
    with pytest.raises(TypeError):
        send_many([add.s(1)])
    assert gc.isenabled()
    gc.disable()
    try:
        send_many([add.s(1, 2)])
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_send_many_of_nothing():
    assert send_many([]) == []


# -- send_many's templates -----------------------------------------------------------------


class CountingTask(Task):
    """Counts the messages Celery itself built: send_many's templates build the others."""

    built = 0

    def apply_async(self, *args, **kwargs):
        CountingTask.built += 1
        return super().apply_async(*args, **kwargs)


@pytest.fixture
def add(app):
    CountingTask.built = 0

    @app.task(name="tests.add", base=CountingTask, shared=False)
    def add(x, y):
        return x + y

    return add


def messages(pg_conn, schema) -> list[dict]:
    return [json.loads(p) for p in rows(pg_conn, schema)]


def without_ids(message: dict) -> dict:
    """The message with what must differ per task (its id, its delivery tag) blanked."""
    message = json.loads(json.dumps(message))
    task_id = message["headers"]["id"]
    for where, key in ((message["headers"], "id"), (message["headers"], "root_id"),
                       (message["properties"], "correlation_id"), (message["properties"], "delivery_tag")):
        if key in where:
            assert key == "delivery_tag" or where[key] == task_id
            where[key] = "ID"
    if PUBLISHED_HEADER in message["headers"]:  # celery_dlq installed in this process: a time
        message["headers"][PUBLISHED_HEADER] = "TIME"
    return message


SHAPES = [
    lambda add, app: add.s(1, 2),
    lambda add, app: add.s(3, y=4).set(queue="other", priority=5),
    lambda add, app: add.si(5, 6).set(headers={"serial_key": "user-1"}, shadow="renamed"),
    lambda add, app: add.s(7, 8).set(ignore_result=True, time_limit=30, soft_time_limit=20),
    lambda add, app: app.signature("remote.task", ("it's", "tab\t", None, 1.5), {"k": "x" * 2000}),
    lambda add, app: app.signature("remote.task", (list(range(300)),), headers={"job_key": "j1"}),
]


def test_send_many_sends_what_apply_async_sends(app, add, pg_conn, schema):
    app.send_task("warm.up")
    # Each shape published alone by Celery, then three times by send_many: the first of
    # those is Celery's, the others are built from it.
    for shape in SHAPES:
        shape(add, app).apply_async()
    expected = [without_ids(m) for m in messages(pg_conn, schema)[1:]]
    pg_conn.execute(sql.SQL("DELETE FROM {}.messages").format(sql.Identifier(schema)))
    registered = sum(1 for shape in SHAPES if shape(add, app).task == add.name)
    CountingTask.built = 0

    results = send_many(shape(add, app) for shape in SHAPES for _ in range(3))

    assert CountingTask.built == registered  # once per shape: the rest came from templates
    got = messages(pg_conn, schema)
    job_keyed = [m for m in got if m["headers"].get("job_key")]
    assert len(job_keyed) == 1  # a job key allows one waiting message: the last replaced the others
    got = [m for m in got if not m["headers"].get("job_key")]
    assert [without_ids(m) for m in got] == [e for e in expected[:-1] for _ in range(3)]
    assert without_ids(job_keyed[0]) == expected[-1]
    assert [m["headers"]["id"] for m in got] == [r.id for r in results[:-3]]
    assert len({r.id for r in results}) == len(results)
    assert [r.ignored for r in results] == [False] * 9 + [True] * 3 + [None] * 6  # as Celery sets it


def test_send_many_builds_every_message_with_celery_when_a_publish_signal_listens(app, add, pg_conn, schema):
    app.send_task("warm.up")
    traced = []

    def trace(headers=None, **kwargs):
        headers["trace"] = len(traced)
        traced.append(headers["id"])

    signals.before_task_publish.connect(trace)
    try:
        results = send_many(add.s(i, i) for i in range(4))
    finally:
        signals.before_task_publish.disconnect(trace)
    assert CountingTask.built == 4
    assert [m["headers"]["trace"] for m in messages(pg_conn, schema)[1:]] == [0, 1, 2, 3]
    assert traced == [r.id for r in results]


def test_send_many_checks_arguments_of_every_task_and_publishes_nothing_on_error(app, add, pg_conn, schema):
    app.send_task("warm.up")
    with pytest.raises(TypeError):
        send_many([add.s(1, 2), add.s(3, 4), add.s(5)])
    assert CountingTask.built == 1  # the bad one was a templated one
    assert len(rows(pg_conn, schema)) == 1


def test_celery_dlqs_publish_time_header_keeps_templates_on(app, add, pg_conn, schema):
    """celery_dlq stamps every publish with its time (a before_task_publish receiver marked
    template-safe): send_many still builds from templates, and every message has the header."""
    connected = any(key[0] == "celery_dlq.published" for key, _ in signals.before_task_publish.receivers)
    signals.before_task_publish.connect(stamp_published, weak=False, dispatch_uid="celery_dlq.published")
    try:
        app.send_task("warm.up")
        send_many([add.s(i, i) for i in range(5)])
    finally:
        if not connected:  # as this process had it: other tests may rely on either
            signals.before_task_publish.disconnect(stamp_published, dispatch_uid="celery_dlq.published")
    assert CountingTask.built == 1
    assert all(PUBLISHED_HEADER in m["headers"] for m in messages(pg_conn, schema))


def test_send_many_gives_each_delayed_task_its_own_eta(app, add, pg_conn, schema):
    app.send_task("warm.up")
    send_many([add.s(1, 2), add.s(3, 4)], countdown=60)
    assert CountingTask.built == 2
    etas = [m["headers"]["eta"] for m in messages(pg_conn, schema)[1:]]
    assert all(etas) and len(etas) == 2


# -- every publish joins the batch: routed, job-keyed, delayed, fallback ----------------------


class PeekingTask(Task):
    """Calls ``peek`` whenever Celery itself builds one of its messages (a fallback)."""

    peek = staticmethod(lambda: None)

    def apply_async(self, *args, **kwargs):
        PeekingTask.peek()
        return super().apply_async(*args, **kwargs)


@pytest.fixture
def mixed(app, pg_conn, schema):
    """A batch of every kind of publish, and the queue/argument pairs it stores, in order.

    Named exchanges are fallbacks (Celery builds each message); so are the delayed ones
    and those with a link; a job key and plain signatures are templated.
    """
    app.conf.broker_transport_options = {"schema": schema, "native_delayed_delivery": True,
                                         "deadletter_queue": "dead"}
    app.conf.task_create_missing_queues = True

    @app.task(name="tests.peek", base=PeekingTask, shared=False)
    def peek(x):
        return x

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for name, kind, queues, key in (("ex_direct", "direct", ["qd"], "kd"), ("ex_topic", "topic", ["qt"], "a.*"),
                                        ("ex_fan", "fanout", ["qf1", "qf2"], "")):
            exchange = kombu.Exchange(name, kind)
            for queue in queues:
                kombu.Queue(queue, exchange, routing_key=key)(channel).declare()
        kombu.Queue("celery")(channel).declare()
    app.send_task("warm.up")
    eta = datetime.now(timezone.utc) + timedelta(hours=1)
    sigs_and_rows = [
        (peek.s(0), [("celery", 0)]),
        (peek.s(1), [("celery", 1)]),  # templated
        (peek.s(2).set(exchange="ex_direct", routing_key="kd"), [("qd", 2)]),
        (peek.s(3).set(exchange="ex_topic", routing_key="a.b"), [("qt", 3)]),
        (peek.s(4).set(exchange="ex_fan", routing_key="x"), [("qf1", 4), ("qf2", 4)]),
        (peek.s(5).set(headers={"job_key": "k5"}), [("celery", 5)]),
        (peek.s(6).set(countdown=3600), [("celery", 6)]),
        (peek.s(7).set(eta=eta), [("celery", 7)]),
        (peek.s(8).set(exchange="ex_direct", routing_key="nowhere"), [("dead", 8)]),  # unroutable
        (peek.s(9).set(headers={"job_key": "k9"}), [("celery", 9)]),  # templated job key
        (peek.s(10).set(link=peek.s(0)), [("celery", 10)]),
        (peek.s(11), [("celery", 11)]),
    ]
    return peek, [sig for sig, _ in sigs_and_rows], [row for _, rows in sigs_and_rows for row in rows]


def stored_args(pg_conn, schema) -> list[tuple[str, object]]:
    return [(queue, json.loads(payload)["headers"]["argsrepr"])
            for queue, payload in pg_conn.execute(sql.SQL("SELECT queue, payload FROM {}.messages ORDER BY id")
                                                  .format(sql.Identifier(schema)))]


@pytest.mark.parametrize("max_size", [4, 1000])  # with and without the writer thread
def test_every_kind_of_publish_waits_for_the_batch_and_keeps_publish_order(app, pg_conn, schema, mixed, max_size):
    peek, sigs, expected = mixed
    seen = []
    PeekingTask.peek = lambda: seen.append(len(stored_args(pg_conn, schema)))
    try:
        results = send_many(sigs + [peek.s(12)], max_size=max_size)
    finally:
        PeekingTask.peek = staticmethod(lambda: None)
    assert len(seen) >= 8 and set(seen) == {1}  # only warm.up, whenever a fallback was built
    assert stored_args(pg_conn, schema)[1:] == [(q, f"({n},)") for q, n in expected + [("celery", 12)]]
    assert len({r.id for r in results}) == len(sigs) + 1
    delayed = pg_conn.execute(sql.SQL("SELECT count(*) FROM {}.messages WHERE visible_at IS NOT NULL")
                              .format(sql.Identifier(schema))).fetchone()[0]
    assert delayed == 2


@pytest.mark.parametrize("max_size", [4, 1000])
@pytest.mark.parametrize("failure", ["argument check", "row refused by the database"])
def test_a_failure_anywhere_in_the_batch_leaves_no_row_of_it(app, pg_conn, schema, mixed, max_size, failure):
    peek, sigs, _ = mixed
    if failure == "argument check":
        last, error = peek.s(), TypeError  # a templated signature, checked at publish
    else:
        # (DDL takes no parameters: the pattern is a quoted literal.)
        pg_conn.execute(sql.SQL("ALTER TABLE {}.messages ADD CONSTRAINT refused CHECK (payload NOT LIKE {}) NOT VALID")
                        .format(sql.Identifier(schema), sql.Literal("%refuse me%")))
        last, error = peek.s("refuse me"), psycopg.errors.CheckViolation
    with pytest.raises(error):
        send_many(sigs + [last], max_size=max_size)
    assert stored_args(pg_conn, schema) == [("celery", "()")]  # warm.up alone
