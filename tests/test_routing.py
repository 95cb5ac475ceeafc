"""Routing through exchanges stored in the database: asserting tests.

Kombu's own suite (test_kombu_suite.py) never checks that a callback ran; these tests
count what each queue receives, route between real processes, and check with SQL that
unbind, delete, auto-delete, x-expires and TTLs leave nothing behind.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections import Counter, defaultdict

import kombu
import pytest
from psycopg import sql

from kombu_pg.store import BrokerStore
from tests.monitor_app import ManagedProcess, process_env
from tests.worker import wait_until

#: Quick safety polls and recovery passes, so TTL and x-expires clean-up is prompt.
OPTIONS = {"polling_interval": 0.1, "recovery_interval": 0.2}


@pytest.fixture
def connection(pg_url, schema):
    conn = kombu.Connection(pg_url, transport_options={"schema": schema, **OPTIONS})
    yield conn
    conn.close()


@pytest.fixture
def db(pg_conn, schema):
    """SQL on the test's schema: ``db.count('queues', "name = %s", [q])``."""

    class DB:
        def count(self, table: str, where: str = "true", params=()) -> int:
            query = sql.SQL("SELECT count(*) FROM {}.{} WHERE " + where).format(
                sql.Identifier(schema), sql.Identifier(table))
            return pg_conn.execute(query, params).fetchone()[0]

        def messages_by_queue(self) -> dict[str, int]:
            query = sql.SQL("SELECT queue, count(*) FROM {}.messages GROUP BY queue").format(
                sql.Identifier(schema))
            return dict(pg_conn.execute(query).fetchall())

        def wait_until(self, predicate, timeout: float, what: str):
            return wait_until(predicate, timeout, what)

    return DB()


def drain_until(conn: kombu.Connection, done, timeout: float = 10.0) -> None:
    """drain_events until ``done()`` or the deadline (each drain blocks on LISTEN)."""
    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"condition not met within {timeout}s")
        try:
            conn.drain_events(timeout=min(remaining, 1.0))
        except socket.timeout:
            pass


def consume_counts(conn: kombu.Connection, queues, expected: dict[str, int], timeout=10.0):
    """Consume from ``queues`` until ``expected`` counts arrive; return the bodies per queue."""
    got: dict[str, list] = defaultdict(list)
    consumers = []
    for q in queues:
        bound = q(conn.default_channel)

        def cb(body, message, _name=bound.name):
            got[_name].append(body["n"])
            message.ack()

        consumers.append(kombu.Consumer(conn, [bound], callbacks=[cb], accept=["json"]))
    for c in consumers:
        c.consume()
    try:
        drain_until(conn, lambda: all(len(got[q]) >= n for q, n in expected.items()), timeout)
    finally:
        for c in consumers:
            c.cancel()
    return {q: sorted(v) for q, v in got.items()}


def recover_until(conn: kombu.Connection, queue: kombu.Queue, done, timeout=10.0) -> None:
    """Consume ``queue`` (which must stay empty) so the connection's recovery passes run.

    Expired messages and queues are deleted by the recovery pass of any consuming
    kombu-pg connection; a connection without consumers runs none.
    """

    def unexpected(body, message):
        raise AssertionError(f"expired message delivered: {body!r}")

    with kombu.Consumer(conn, [queue], callbacks=[unexpected], accept=["json"]):
        drain_until(conn, done, timeout)


def publish(conn, exchange, routing_keys, declare=()):
    producer = kombu.Producer(conn.default_channel, exchange=exchange)
    for n, key in enumerate(routing_keys):
        producer.publish({"n": n, "key": key}, routing_key=key, declare=list(declare),
                         serializer="json")


# -- received counts per exchange type -------------------------------------------------


def test_direct_exchange_delivers_by_exact_key(connection, db):
    ex = kombu.Exchange("rt_direct", type="direct")
    qa = kombu.Queue("rt_a", exchange=ex, routing_key="a")
    qb = kombu.Queue("rt_b", exchange=ex, routing_key="b")
    qa2 = kombu.Queue("rt_a2", exchange=ex, routing_key="a")  # a second queue on key "a"
    keys = ["a", "b", "a", "c", "a.x", "A", ""]
    publish(connection, ex, keys, declare=[qa, qb, qa2])
    # Routed on publish: one row per matching queue, nothing for unmatched keys.
    assert db.messages_by_queue() == {"rt_a": 2, "rt_a2": 2, "rt_b": 1}

    got = consume_counts(connection, [qa, qb, qa2], {"rt_a": 2, "rt_b": 1, "rt_a2": 2})
    assert got == {"rt_a": [0, 2], "rt_b": [1], "rt_a2": [0, 2]}
    assert db.count("messages") == 0


def test_topic_exchange_delivers_by_pattern(connection, db):
    ex = kombu.Exchange("rt_topic", type="topic")
    queues = {
        "rt_star": "t.*",       # exactly one word after t
        # Kombu's virtual-transport semantics (key_to_pattern), shared by redis and
        # memory: "#" is one or more words after "t.", so unlike RabbitMQ it misses "t".
        "rt_hash": "t.#",
        "rt_all": "#",
        "rt_mid": "*.x.*",
        "rt_exact": "t",
    }
    qs = [kombu.Queue(name, exchange=ex, routing_key=key) for name, key in queues.items()]
    keys = ["t.1", "t", "t.1.2", "u.x.y", "tt.1", "t.x.1"]
    publish(connection, ex, keys, declare=qs)
    expected = {
        "rt_star": [0],                      # t.1
        "rt_hash": [0, 2, 5],                # t.1, t.1.2, t.x.1
        "rt_all": [0, 1, 2, 3, 4, 5],
        "rt_mid": [3, 5],                    # u.x.y, t.x.1
        "rt_exact": [1],                     # t
    }
    assert db.messages_by_queue() == {q: len(v) for q, v in expected.items()}
    got = consume_counts(connection, qs, {q: len(v) for q, v in expected.items()})
    assert got == expected
    assert db.count("messages") == 0


def test_fanout_exchange_copies_to_every_bound_queue(connection, db):
    ex = kombu.Exchange("rt_fanout", type="fanout")
    qs = [kombu.Queue(f"rt_f{i}", exchange=ex, routing_key=f"ignored{i}") for i in range(3)]
    # Published before any consumer exists: bound queues keep their copies.
    publish(connection, ex, ["x", "y", "z", "w"], declare=qs)
    assert db.messages_by_queue() == {"rt_f0": 4, "rt_f1": 4, "rt_f2": 4}
    got = consume_counts(connection, qs, {f"rt_f{i}": 4 for i in range(3)})
    assert got == {f"rt_f{i}": [0, 1, 2, 3] for i in range(3)}
    assert db.count("messages") == 0


def test_unbound_fanout_copy_goes_only_to_current_bindings(connection, db):
    ex = kombu.Exchange("rt_fanout2", type="fanout")
    q1, q2 = (kombu.Queue(n, exchange=ex) for n in ("rt_g1", "rt_g2"))
    publish(connection, ex, ["1"], declare=[q1, q2])
    q2(connection.default_channel).unbind_from(ex)
    publish(connection, ex, ["2"])
    assert db.messages_by_queue() == {"rt_g1": 2, "rt_g2": 1}


# -- cross-process routing ------------------------------------------------------------------


def _routing_process(pg_url, schema, *args) -> ManagedProcess:
    return ManagedProcess([sys.executable, "-m", "tests.routing_app", *args],
                          process_env(pg_url, schema), name=f"routing_app {args[0]}")


def test_bind_in_another_process_then_publish_here(connection, db, pg_url, schema):
    """A subprocess binds and consumes; this process publishes without declaring."""
    with _routing_process(pg_url, schema, "bind-consume", "xp_topic", "topic", "xp_q",
                          "a.*", "2") as proc:
        proc.wait_for_line("^bound$", timeout=20)
        # This process has declared nothing: the exchange type and binding come from SQL.
        producer = kombu.Producer(connection.default_channel, auto_declare=False)
        for key in ("a.1", "b.1", "a.2", "a.1.x"):
            producer.publish(key, exchange="xp_topic", routing_key=key, serializer="json")
        proc.wait_for_line("^done$", timeout=20)
        assert proc.wait_exit(10) == 0
    got = [line[4:] for line in proc.lines if line.startswith("got ")]
    assert got == ["a.1", "a.2"]
    assert db.count("messages") == 0  # b.1 and a.1.x matched nothing: never stored


def test_publish_from_a_process_that_never_declared(connection, db, pg_url, schema):
    """This process binds; a subprocess that declares nothing publishes."""
    ex = kombu.Exchange("xp_fanout", type="fanout")
    qs = [kombu.Queue(f"xp_f{i}", exchange=ex) for i in range(2)]
    ch = connection.default_channel
    for q in qs:
        q(ch).declare()
    with _routing_process(pg_url, schema, "publish", "xp_fanout", "any", "m1", "m2", "m3") as proc:
        proc.wait_for_line("^published$", timeout=20)
        assert proc.wait_exit(10) == 0
    assert db.messages_by_queue() == {"xp_f0": 3, "xp_f1": 3}

    received = Counter()

    def on_message(body, message):
        received[(message.delivery_info["routing_key"], body)] += 1
        message.ack()

    with kombu.Consumer(connection, qs, callbacks=[on_message], accept=["json"]):
        drain_until(connection, lambda: sum(received.values()) >= 6)
    assert received == Counter({("any", "m1"): 2, ("any", "m2"): 2, ("any", "m3"): 2})


def test_direct_reply_to_a_queue_bound_by_the_other_process(connection, db, pg_url, schema):
    """The pidbox reply pattern: the client binds its reply queue, another process replies."""
    with _routing_process(pg_url, schema, "bind-consume", "xp_reply", "direct",
                          "client.reply", "oid-123", "1") as proc:
        proc.wait_for_line("^bound$", timeout=20)
        producer = kombu.Producer(connection.default_channel, auto_declare=False)
        producer.publish("pong", exchange="xp_reply", routing_key="oid-123", serializer="json")
        proc.wait_for_line("^done$", timeout=20)
    assert [line for line in proc.lines if line.startswith("got ")] == ["got pong"]


# -- clean-up: unbind, queue delete, exchange delete, auto-delete ----------------------------


def test_unbind_stops_routing_and_removes_the_row(connection, db):
    ex = kombu.Exchange("cu_direct", type="direct")
    q = kombu.Queue("cu_q", exchange=ex, routing_key="k")
    publish(connection, ex, ["k"], declare=[q])
    assert db.count("bindings", "queue = %s", ["cu_q"]) == 1
    q(connection.default_channel).unbind_from(ex, routing_key="k")
    assert db.count("bindings", "queue = %s", ["cu_q"]) == 0
    publish(connection, ex, ["k"])
    assert db.count("messages", "queue = %s", ["cu_q"]) == 1  # only the first one
    assert db.count("queues", "name = %s", ["cu_q"]) == 1      # the queue itself stays


def test_queue_delete_removes_queue_bindings_and_messages(connection, db):
    ex = kombu.Exchange("cu_topic", type="topic")
    q = kombu.Queue("cu_del", exchange=ex, routing_key="#")
    other = kombu.Queue("cu_keep", exchange=ex, routing_key="#")
    publish(connection, ex, ["a", "b"], declare=[q, other])
    # One message in flight (locked by a consumer) is deleted too.
    bound = q(connection.default_channel)
    assert bound.get() is not None
    bound.delete()
    assert db.count("queues", "name = %s", ["cu_del"]) == 0
    assert db.count("bindings", "queue = %s", ["cu_del"]) == 0
    assert db.count("messages", "queue = %s", ["cu_del"]) == 0
    assert db.messages_by_queue() == {"cu_keep": 2}
    publish(connection, ex, ["c"])
    assert db.messages_by_queue() == {"cu_keep": 3}


def test_exchange_delete_removes_exchange_and_its_bindings(connection, db):
    ex = kombu.Exchange("cu_fan", type="fanout")
    keep = kombu.Exchange("cu_other", type="fanout")
    q = kombu.Queue("cu_q2", exchange=ex)
    q2 = kombu.Queue("cu_q3", exchange=keep)
    publish(connection, ex, ["x"], declare=[q, q2])
    ex(connection.default_channel).delete()
    assert db.count("exchanges", "name = %s", ["cu_fan"]) == 0
    assert db.count("bindings", "exchange = %s", ["cu_fan"]) == 0
    assert db.count("bindings", "exchange = %s", ["cu_other"]) == 1
    # Queues and their messages outlive the exchange (as in AMQP).
    assert db.count("queues", "name = %s", ["cu_q2"]) == 1
    assert db.count("messages", "queue = %s", ["cu_q2"]) == 1
    # A publish to the deleted exchange is not routed anywhere.
    kombu.Producer(connection.default_channel, auto_declare=False).publish(
        "y", exchange="cu_fan", routing_key="", serializer="json")
    assert db.count("messages", "queue = %s", ["cu_q2"]) == 1


def test_auto_delete_queue_is_removed_when_its_consumer_is_cancelled(connection, db):
    ex = kombu.Exchange("ad_ex", type="fanout")
    q = kombu.Queue("ad_q", exchange=ex, auto_delete=True)
    consumer = kombu.Consumer(connection, [q], callbacks=[lambda b, m: m.ack()])
    consumer.consume()
    publish(connection, ex, ["x"])
    assert db.count("queues", "name = %s", ["ad_q"]) == 1
    assert db.count("messages", "queue = %s", ["ad_q"]) == 1
    consumer.cancel()
    assert db.count("queues", "name = %s", ["ad_q"]) == 0
    assert db.count("bindings", "queue = %s", ["ad_q"]) == 0
    assert db.count("messages", "queue = %s", ["ad_q"]) == 0


def test_auto_delete_queue_is_removed_when_the_connection_closes(pg_url, schema, db):
    conn = kombu.Connection(pg_url, transport_options={"schema": schema, **OPTIONS})
    q = kombu.Queue("ad_close", exchange=kombu.Exchange("ad_ex2", type="topic"),
                    routing_key="#", auto_delete=True)
    with conn:
        consumer = kombu.Consumer(conn, [q], callbacks=[lambda b, m: None])
        consumer.consume()
        publish(conn, q.exchange, ["k"])
        drain_until(conn, lambda: db.count("messages", "lock_token IS NOT NULL") == 1)
        assert db.count("queues", "name = %s", ["ad_close"]) == 1
    # Connection closed with an unacked message and the consumer never cancelled.
    assert db.count("queues", "name = %s", ["ad_close"]) == 0
    assert db.count("bindings") == 0
    assert db.count("messages") == 0


# -- x-expires ---------------------------------------------------------------------------


def test_x_expires_removes_idle_queue_but_not_a_consumed_one(connection, db):
    ex = kombu.Exchange("xe_ex", type="fanout")
    idle = kombu.Queue("xe_idle", exchange=ex, expires=1)     # x-expires 1000 ms
    alive = kombu.Queue("xe_alive", exchange=ex, expires=1)
    publish(connection, ex, ["x"], declare=[idle, alive])
    assert db.count("queues", "expires_ms = 1000") == 2
    declared_at = time.monotonic()
    # This connection consumes xe_alive; its recovery passes touch it and expire others.
    with kombu.Consumer(connection, [alive], callbacks=[lambda b, m: m.ack()], accept=["json"]):
        drain_until(connection, lambda: db.count("queues", "name = %s", ["xe_idle"]) == 0,
                    timeout=15)
        assert time.monotonic() - declared_at >= 1.0, "expired before x-expires elapsed"
        # Its bindings and messages went with it; the consumed queue is still there.
        assert db.count("bindings", "queue = %s", ["xe_idle"]) == 0
        assert db.count("messages", "queue = %s", ["xe_idle"]) == 0
        # Keep consuming for more than another x-expires period: still alive.
        until = time.monotonic() + 1.5
        drain_until(connection, lambda: time.monotonic() >= until, timeout=5)
        assert db.count("queues", "name = %s", ["xe_alive"]) == 1
        publish(connection, ex, ["y"])
        assert db.messages_by_queue().get("xe_idle") is None


def test_a_killed_consumers_temporary_queues_go_and_a_live_ones_stay(connection, db, pg_url, schema,
                                                                      pg_conn):
    """Exclusive and auto-delete queues without x-expires live as long as their session.

    A SIGKILLed consumer closes nothing: the first recovery pass after its session ended
    removes its queues and bindings, so fanout copies stop piling up there.
    """
    live = _routing_process(pg_url, schema, "hold", "hold_fan", "live").start()
    dead = _routing_process(pg_url, schema, "hold", "hold_fan", "dead").start()
    try:
        for proc in (live, dead):
            proc.wait_for_line("^consuming$", timeout=20)
        assert db.count("bindings", "exchange = 'hold_fan'") == 4
        backends = [r[0] for r in pg_conn.execute(
            sql.SQL("SELECT backend_pid FROM {}.consumers WHERE pid = %s").format(sql.Identifier(schema)),
            [dead.proc.pid])]
        assert backends
        dead.kill()
        db.wait_until(lambda: pg_conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                                              [backends]).fetchone()[0] == 0,
                      10, "the killed consumer's session to end")
        store = BrokerStore(pg_conn, schema)
        db.wait_until(lambda: store.recover([]).ran, 10, "a recovery pass of this process")
        for name in ("dead.x", "dead.ad"):
            assert db.count("queues", "name = %s", [name]) == 0
            assert db.count("bindings", "queue = %s", [name]) == 0
        for name in ("live.x", "live.ad"):
            assert db.count("queues", "name = %s", [name]) == 1
            assert db.count("bindings", "queue = %s", [name]) == 1
        # A broadcast now reaches the live consumer's queues only.
        message = connection.default_channel.prepare_message('"x"', content_type="application/json",
                                                             content_encoding="utf-8")
        assert sorted(store.publish_routed("hold_fan", "", json.dumps(message))) == ["live.ad", "live.x"]
    finally:
        dead.kill()
        live.stop()


# -- TTL ------------------------------------------------------------------------------------


def _wait_all_expired(db, queue, timeout=10.0):
    """Wait until every message of ``queue`` has passed its expires_at (server clock)."""
    db.wait_until(
        lambda: db.count("messages", "queue = %s AND expires_at > now()", [queue]) == 0,
        timeout, f"messages of {queue} to pass their expiry")


def test_per_message_expiration(connection, db):
    q = kombu.Queue("ttl_msg", routing_key="ttl_msg")
    producer = kombu.Producer(connection.default_channel)
    producer.publish({"n": 1}, routing_key="ttl_msg", declare=[q], expiration=0.3)
    producer.publish({"n": 2}, routing_key="ttl_msg", declare=[q])
    assert db.count("messages", "expires_at IS NOT NULL") == 1
    _wait_all_expired(db, "ttl_msg")
    bound = q(connection.default_channel)
    message = bound.get()
    assert message is not None and message.payload == {"n": 2}
    message.ack()
    assert bound.get() is None
    assert db.count("messages") == 1  # the expired row, invisible to consumers
    # The recovery pass deletes the expired row (no consumer would ever see it).
    recover_until(connection, q, lambda: db.count("messages") == 0)


def test_queue_message_ttl(connection, db):
    q = kombu.Queue("ttl_q", routing_key="ttl_q", message_ttl=0.3)  # x-message-ttl 300 ms
    producer = kombu.Producer(connection.default_channel)
    producer.publish({"n": 1}, routing_key="ttl_q", declare=[q])
    producer.publish({"n": 2}, routing_key="ttl_q", declare=[q], expiration=60)  # sooner wins
    assert db.count("queues", "name = 'ttl_q' AND message_ttl_ms = 300") == 1
    assert db.count("messages", "expires_at IS NOT NULL") == 2
    _wait_all_expired(db, "ttl_q")
    assert q(connection.default_channel).get() is None
    recover_until(connection, q, lambda: db.count("messages") == 0)


def test_ttl_on_fanout_copies(connection, db):
    ex = kombu.Exchange("ttl_fan", type="fanout")
    short = kombu.Queue("ttl_short", exchange=ex, message_ttl=0.3)
    plain = kombu.Queue("ttl_plain", exchange=ex)
    plain2 = kombu.Queue("ttl_plain2", exchange=ex)
    producer = kombu.Producer(connection.default_channel, exchange=ex)
    producer.publish({"n": 1}, declare=[short, plain, plain2])                  # queue TTL only
    producer.publish({"n": 2}, declare=[short, plain, plain2], expiration=0.3)  # every copy
    assert db.messages_by_queue() == {"ttl_short": 2, "ttl_plain": 2, "ttl_plain2": 2}
    for name in ("ttl_short", "ttl_plain", "ttl_plain2"):
        _wait_all_expired(db, name)
    # ttl_short lost both copies; the plain queues keep only the message without TTL.
    assert kombu.Queue("ttl_short", exchange=ex)(connection.default_channel).get() is None
    for queue in (plain, plain2):
        bound = queue(connection.default_channel)
        message = bound.get()
        assert message is not None and message.payload == {"n": 1}
        message.ack()
        assert bound.get() is None
    recover_until(connection, short, lambda: db.count("messages") == 0)
