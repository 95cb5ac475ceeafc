"""The Kombu transport against a real server: delivery, ordering, bad input."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from psycopg import sql

from kombu_pg.config import ConfigurationError
from kombu_pg.store import apply_migrations
from kombu_pg.transport import Transport

HERE = Path(__file__).resolve().parent


@pytest.fixture
def conn(pg_url, schema):
    with Connection(pg_url, transport_options={"schema": schema, "polling_interval": 0.5}) as c:
        c.connect()
        yield c


def drain(conn, count, queue, timeout=10.0, ack=True, **consumer_kw):
    got = []

    def on_message(body, message):
        got.append(body)
        if ack:
            message.ack()

    deadline = time.monotonic() + timeout
    with Consumer(conn, [queue], callbacks=[on_message], **consumer_kw):
        while len(got) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"got {len(got)} of {count}"
            try:
                conn.drain_events(timeout=remaining)
            except socket.timeout:
                pass
    return got


def table_count(pg_conn, schema, table, where="true"):
    return pg_conn.execute(
        sql.SQL("SELECT count(*) FROM {}.{} WHERE " + where).format(sql.Identifier(schema), sql.Identifier(table))
    ).fetchone()[0]


def test_aliases_are_registered():
    from kombu.transport import resolve_transport

    assert resolve_transport("postgresql") is Transport
    assert resolve_transport("postgres") is Transport
    assert Connection("postgres://u@h/db").transport_cls in ("postgres", "postgresql")


def test_celery_feature_gates():
    assert Transport.driver_type == "postgresql"
    assert Transport.implements.asynchronous
    assert {"direct", "topic", "fanout"} <= set(Transport.implements.exchange_type)
    assert psycopg.OperationalError in Transport.connection_errors


def test_priority_order_and_fifo_within_priority(conn):
    queue = Queue("prio", Exchange("prio", "direct"), "prio")
    producer = Producer(conn.default_channel)
    for i, prio in enumerate([1, 5, 9, 5, 1, 0]):
        producer.publish({"n": i}, exchange=queue.exchange, routing_key="prio", priority=prio, declare=[queue])
    got = drain(conn, 6, queue)
    assert [m["n"] for m in got] == [2, 1, 3, 0, 4, 5]


def test_requeue_redelivers_in_place_marked_redelivered(conn, pg_conn, schema):
    simple = conn.SimpleQueue("rq")
    simple.put("x")
    first = simple.get(timeout=5)
    assert not first.delivery_info["redelivered"]
    first.requeue()
    second = simple.get(timeout=5)
    assert second.payload == "x" and second.delivery_info["redelivered"]
    assert table_count(pg_conn, schema, "messages") == 1  # no copy was made
    second.ack()  # buffered: flushed before the next claim
    with pytest.raises(simple.Empty):
        simple.get_nowait()
    assert table_count(pg_conn, schema, "messages") == 0
    simple.close()


def test_reject_without_requeue_deletes(conn, pg_conn, schema):
    simple = conn.SimpleQueue("rj")
    simple.put("x")
    simple.get(timeout=5).reject(requeue=False)
    with pytest.raises(simple.Empty):
        simple.get_nowait()
    assert table_count(pg_conn, schema, "messages") == 0
    simple.close()


def test_purge_and_size(conn):
    channel = conn.default_channel
    queue = Queue("pq")(channel)
    queue.declare()
    producer = Producer(channel)
    for i in range(5):
        producer.publish(i, routing_key="pq")
    assert queue.queue_declare(passive=True).message_count == 5
    assert queue.purge() == 5
    assert queue.queue_declare(passive=True).message_count == 0


def test_unacked_messages_return_when_the_channel_closes(pg_url, schema, pg_conn):
    options = {"schema": schema}
    with Connection(pg_url, transport_options=options) as c1:
        Producer(c1.default_channel).publish("m", routing_key="back", declare=[Queue("back")])
        assert drain(c1, 1, Queue("back"), ack=False) == ["m"]
        assert table_count(pg_conn, schema, "messages", "lock_token IS NOT NULL") == 1
    assert table_count(pg_conn, schema, "messages", "lock_token IS NULL") == 1


def test_exactly_once_with_producer_threads_and_consumer_processes(pg_url, schema, pg_conn):
    apply_migrations(pg_conn, schema)
    pg_conn.execute(sql.SQL("CREATE TABLE {}.received (body text, pid int)").format(sql.Identifier(schema)))
    consumers = [
        subprocess.Popen([sys.executable, str(HERE / "consumer_proc.py"), pg_url, schema, "eo", str(prefetch)],
                         stdout=subprocess.PIPE, text=True)
        for prefetch in (1, 10, 50)
    ]
    try:
        for proc in consumers:
            assert proc.stdout.readline().strip() == "consuming"
        per_thread, threads = 300, 4

        def produce(t):
            with Connection(pg_url, transport_options={"schema": schema}) as c:
                producer = Producer(c.default_channel)
                for i in range(per_thread):
                    producer.publish(f"{t}-{i}", routing_key="eo")

        workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        total = per_thread * threads
        deadline = time.monotonic() + 60
        while table_count(pg_conn, schema, "received") < total:
            assert time.monotonic() < deadline, "not every message was delivered"
            time.sleep(0.1)
    finally:
        for proc in consumers:
            proc.send_signal(signal.SIGTERM)
        for proc in consumers:
            assert proc.wait(30) == 0
    rows = pg_conn.execute(sql.SQL("SELECT body, pid FROM {}.received").format(sql.Identifier(schema))).fetchall()
    bodies = [r[0] for r in rows]
    assert len(bodies) == total and len(set(bodies)) == total
    assert len({r[1] for r in rows}) > 1  # the work was actually shared
    assert table_count(pg_conn, schema, "messages") == 0


def test_idle_consumer_wakes_on_notify_not_on_poll(pg_url, schema):
    """With a 30 s safety poll, only NOTIFY can deliver within the drain timeout."""
    options = {"schema": schema, "polling_interval": 30.0, "recovery_interval": 30.0}
    with Connection(pg_url, transport_options=options) as consumer_conn, \
            Connection(pg_url, transport_options=options) as producer_conn:
        queue = Queue("wake")
        got = []
        with Consumer(consumer_conn, [queue], callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
            threading.Timer(0.2, lambda: Producer(producer_conn.default_channel).publish(
                "hello", routing_key="wake")).start()
            started = time.monotonic()
            consumer_conn.drain_events(timeout=20)
            # Polling would take 30 s (and a drain gives up at its deadline, 20 s).
            assert time.monotonic() - started < 10
        assert got == ["hello"]


def test_publish_without_exchange_or_routing_key_is_refused(conn, pg_conn, schema):
    with pytest.raises(ValueError, match="routing key"):
        Producer(conn.default_channel).publish("lost?", routing_key="")
    assert table_count(pg_conn, schema, "messages") == 0


def test_invalid_rows_are_set_aside_and_the_consumer_goes_on(conn, pg_conn, schema):
    producer = Producer(conn.default_channel)
    producer.publish("before", routing_key="bad", declare=[Queue("bad")])
    insert = sql.SQL("INSERT INTO {}.messages (queue, payload) VALUES ('bad', %s)").format(sql.Identifier(schema))
    for junk in ("not json", "[1, 2]", '{"properties": 5}', '{"body": "%%%", "properties": {"body_encoding": "base64"}}'):
        pg_conn.execute(insert, (junk,))
    producer.publish("after", routing_key="bad")
    assert sorted(drain(conn, 2, Queue("bad"))) == ["after", "before"]
    assert table_count(pg_conn, schema, "invalid_messages") == 4
    assert table_count(pg_conn, schema, "messages") == 0


def test_wrong_port_fails_fast_with_a_connection_error():
    started = time.monotonic()
    with pytest.raises(Transport.connection_errors) as info:
        Connection("postgresql://postgres@127.0.0.1:1/nothing", connect_timeout=2).connect()
    assert "127.0.0.1" in str(info.value)
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("bad", ["bad;name", "x" * 60, "", 'q"uote'])
def test_invalid_schema_is_refused_before_connecting(bad):
    # The port is closed: reaching the network would give a connection error instead.
    with pytest.raises(ConfigurationError, match="schema"):
        Connection("postgresql://postgres@127.0.0.1:1/x", transport_options={"schema": bad}).connect()


def test_unknown_transport_option_is_reported():
    with pytest.raises(ConfigurationError, match="visiblity_timeout"):
        Connection("postgresql://postgres@127.0.0.1:1/x", transport_options={"visiblity_timeout": 5}).connect()


def test_libpq_url_parameters_and_separate_credentials_are_merged(pg_url, schema):
    # A user given separately fills in what the URL leaves out; query parameters pass through.
    from urllib.parse import urlsplit

    parts = urlsplit(pg_url)
    user = parts.username or "postgres"
    host = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(filter(None, [parts.query, "application_name=kombu_pg_test", "connect_timeout=5"]))
    url = f"{parts.scheme}://{host}{parts.path}?{query}"
    with Connection(url, userid=user, transport_options={"schema": schema}) as c:
        store = c.default_channel.store
        assert store.conn.info.user == user
        assert store.conn.execute("SHOW application_name").fetchone()[0] == "kombu_pg_test"


def test_acking_a_keyed_message_wakes_the_consumer_waiting_for_that_key(pg_url, schema):
    """With a 30 s safety poll only the ack's NOTIFY can hand the key over in time."""
    options = {"schema": schema, "polling_interval": 30.0, "recovery_interval": 30.0}
    with Connection(pg_url, transport_options=options) as a, Connection(pg_url, transport_options=options) as b:
        producer = Producer(a.default_channel)
        for n in range(2):
            producer.publish(n, routing_key="keyed", headers={"serial_key": "k"}, declare=[Queue("keyed")])
        held = []
        with Consumer(a, [Queue("keyed")], callbacks=[lambda body, msg: held.append(msg)], prefetch_count=1):
            a.drain_events(timeout=5)
            got = []
            with Consumer(b, [Queue("keyed")], callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
                with pytest.raises(socket.timeout):
                    b.drain_events(timeout=0.3)  # the key is held: nothing for b
                threading.Timer(0.2, held[0].ack).start()
                threading.Timer(0.3, lambda: a.transport.flush_acks()).start()
                started = time.monotonic()
                b.drain_events(timeout=20)
                assert time.monotonic() - started < 10  # polling would take 30 s
            assert got == [1]


def test_without_auto_migrate_a_missing_schema_is_a_clear_error(pg_url, schema):
    from kombu_pg.store import MigrationError

    with pytest.raises(MigrationError, match="pg migrate"):
        Connection(pg_url, transport_options={"schema": schema, "auto_migrate": False}).connect()


def test_a_bare_host_name_with_virtual_host_as_database(pg_url, schema):
    from urllib.parse import urlsplit

    parts = urlsplit(pg_url)
    if not parts.hostname:
        pytest.skip("the server listens on a Unix socket only")
    with Connection(hostname=parts.hostname, port=parts.port, userid=parts.username or "postgres",
                    virtual_host=parts.path.lstrip("/"), transport="postgresql",
                    transport_options={"schema": schema}) as c:
        assert c.default_channel.store.conn.info.dbname == parts.path.lstrip("/")


@pytest.mark.parametrize("bad", [{"claim_batch_max": True}, {"visibility_timeout": True}, {"max_deliveries": 0},
                                 {"polling_interval": -1}, {"auto_migrate": "yes"}])
def test_invalid_option_values_are_refused(bad):
    with pytest.raises(ConfigurationError):
        Connection("postgresql://postgres@127.0.0.1:1/x", transport_options=bad).connect()


def test_reject_dead_letters_when_enabled(pg_url, schema, pg_conn):
    options = {"schema": schema, "dead_letter_rejected": True}
    with Connection(pg_url, transport_options=options) as c:
        simple = c.SimpleQueue("dl")
        simple.put({"x": 1}, headers={"id": "task-1", "task": "proj.t"})
        simple.get(timeout=5).reject(requeue=False)
        simple.close()
    [(task_id, reason, message)] = pg_conn.execute(sql.SQL(
        "SELECT task_id, reason, message FROM {}.dlq").format(sql.Identifier(schema))).fetchall()
    assert (task_id, reason) == ("task-1", "rejected")
    assert json.loads(message)["headers"] == {"id": "task-1", "task": "proj.t"}  # kept whole
    assert table_count(pg_conn, schema, "messages") == 0


def test_celery_settings_reach_the_connection(pg_url, schema):
    """broker_connection_timeout becomes libpq's connect_timeout; connect_kwargs is the
    explicit way to pass other libpq parameters; other options are never forwarded."""
    from celery import Celery

    app = Celery("settings", broker=pg_url, set_as_current=False)
    app.conf.broker_connection_timeout = 7
    app.conf.broker_transport_options = {
        "schema": schema, "connect_kwargs": {"application_name": "kombu_pg_settings_test"},
        "max_retries": 3,  # Celery's publish-retry key: accepted, not sent to libpq
    }
    with app.connection_for_write() as conn:
        info = psycopg.conninfo.conninfo_to_dict(conn.transport.conninfo)
        assert info["connect_timeout"] == "7" and "max_retries" not in info
        store = conn.default_channel.store
        assert store.conn.execute("SHOW application_name").fetchone()[0] == "kombu_pg_settings_test"
    app.close()


def test_a_multi_host_url_fails_over_to_the_next_host(pg_url, schema):
    """libpq multi-host URLs pass through untouched: a dead first host is skipped."""
    from urllib.parse import urlsplit

    parts = urlsplit(pg_url)
    if not parts.hostname:
        pytest.skip("the server listens on a Unix socket only")
    user = parts.username or "postgres"
    url = f"postgresql://{user}@127.0.0.1:1,{parts.hostname}:{parts.port or 5432}{parts.path}?connect_timeout=3"
    with Connection(url, transport_options={"schema": schema}) as c:
        assert c.default_channel.store.conn.info.port == (parts.port or 5432)


def test_in_an_event_loop_claims_run_on_a_thread_and_messages_arrive_in_the_loop(pg_url, schema):
    from kombu.asynchronous import Hub

    with Connection(pg_url, transport_options={"schema": schema}) as c:
        producer = Producer(c.default_channel)
        for n in range(30):
            producer.publish(n, routing_key="hub", declare=[Queue("hub")])
        got, delivering_threads = [], set()

        def on_message(body, message):
            got.append(body)
            delivering_threads.add(threading.get_ident())
            message.ack()

        hub = Hub()
        with Consumer(c, [Queue("hub")], callbacks=[on_message], prefetch_count=8):
            c.transport.register_with_event_loop(c.connection, hub)
            loop = hub.create_loop()
            deadline = time.monotonic() + 20
            while len(got) < 30:
                assert time.monotonic() < deadline, f"got {len(got)} of 30"
                next(loop)
            c.transport.unregister_from_event_loop()
        assert sorted(got) == list(range(30))
        assert delivering_threads == {threading.get_ident()}  # never the claimer thread


def test_an_ack_wakes_only_the_queues_of_its_own_channel(pg_url, schema):
    """Freed prefetch capacity on the task channel must not send the claimer to another
    channel's queues (Celery's no-ack pidbox): that empty claim delayed the refill."""
    with Connection(pg_url, transport_options={"schema": schema}) as c:
        producer = Producer(c.default_channel)
        for n in range(2):
            producer.publish(n, routing_key="tasks", declare=[Queue("tasks")])
        producer.publish("hello", routing_key="control", declare=[Queue("control")])
        other = c.channel()
        got = []
        with Consumer(c, [Queue("tasks")], callbacks=[lambda body, message: got.append(message)],
                      prefetch_count=1), \
                Consumer(other, [Queue("control")], callbacks=[lambda body, message: None], no_ack=True):
            while not got:
                c.drain_events(timeout=10)
            c.transport._pending.clear()
            got[0].ack()
            assert c.transport._pending == {"tasks"}
        other.close()


def test_broker_sessions_never_jit_compile(pg_url, schema):
    from kombu_pg.store.connect import connect

    with Connection(pg_url, transport_options={"schema": schema}) as c:
        work = c.default_channel.store.conn
        assert work.execute("SHOW jit").fetchone()[0] == "off"
        assert c.transport.listener().conn.execute("SHOW jit").fetchone()[0] == "off"
    # Options the URL already carries are kept.
    with connect(pg_url, jit=False, options="-c application_name=kept") as conn:
        assert conn.execute("SHOW jit").fetchone()[0] == "off"
        assert conn.execute("SHOW application_name").fetchone()[0] == "kept"


def test_a_claim_still_in_flight_when_the_event_loop_stops_is_handed_back(pg_url, schema, pg_conn):
    from kombu.asynchronous import Hub

    with Connection(pg_url, transport_options={"schema": schema}) as c:
        producer = Producer(c.default_channel)
        for n in range(3):
            producer.publish(n, routing_key="inflight", declare=[Queue("inflight")])
        with Consumer(c, [Queue("inflight")], callbacks=[lambda body, message: None], prefetch_count=8):
            c.transport.register_with_event_loop(c.connection, Hub())
            c.transport._fetch_pending()  # the claim starts; the loop never runs to deliver it
            claim = c.transport._claim
            assert claim is not None
            c.transport.unregister_from_event_loop()
            assert len(claim.future.result(timeout=10)) == 3  # it did claim all three
            # Still connected and consuming, yet nothing is left locked by this consumer.
            assert table_count(pg_conn, schema, "messages", "lock_token IS NOT NULL") == 0
            assert table_count(pg_conn, schema, "messages") == 3


def _notifications_until_marker(listening: psycopg.Connection, pg_conn, channel: str) -> list[str]:
    """Payloads received so far: NOTIFYs arrive in commit order, so once a marker sent now
    arrives, every NOTIFY committed before it has too."""
    pg_conn.execute("SELECT pg_notify(%s, 'marker')", (channel,))
    got = []
    for notification in listening.notifies(timeout=10):
        if notification.payload == "marker":
            return got
        got.append(notification.payload)
    raise AssertionError(f"the marker NOTIFY never arrived; got {got}")


def test_a_delayed_routed_publish_always_announces_its_due_time(pg_url, schema, pg_conn):
    from datetime import datetime, timedelta, timezone

    channel = f"{schema}:due"
    options = {"schema": schema, "native_delayed_delivery": True}
    with psycopg.connect(pg_url, autocommit=True) as listening, Connection(pg_url, transport_options=options) as c:
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        exchange = Exchange("later", "direct", durable=True)
        publisher = Producer(c, exchange=exchange)
        Queue("later", exchange, routing_key="later")(publisher.channel).declare()
        for hours in (1, 2):
            eta = (datetime.now(timezone.utc) + timedelta(hours=hours)).isoformat()
            publisher.publish("x", routing_key="later", headers={"eta": eta})
        payloads = _notifications_until_marker(listening, pg_conn, channel)
    assert len(payloads) == 2 and all(float(p) > time.time() for p in payloads)


# -- Kombu's Producer.batch() ----------------------------------------------------------------


def stored(pg_conn, schema) -> list[tuple[str, object]]:
    return [(queue, json.loads(base64.b64decode(json.loads(payload)["body"])))
            for queue, payload in pg_conn.execute(sql.SQL("SELECT queue, payload FROM {}.messages ORDER BY id")
                                                  .format(sql.Identifier(schema)))]


def test_a_producer_batch_writes_its_publishes_together_when_it_exits(pg_url, schema, pg_conn):
    with Connection(pg_url, transport_options={"schema": schema}) as c:
        fan = Exchange("fan", "fanout")
        producer = Producer(c.default_channel)
        for name in ("a", "b"):
            Queue(name, fan)(producer.channel).declare()
        Queue("direct")(producer.channel).declare()
        assert producer.supports_batch_publish
        with producer.batch():
            producer.publish(1, routing_key="direct")
            producer.publish(2, exchange=fan)
            producer.publish(3, exchange="nowhere", routing_key="x")  # unroutable: dropped
            producer.publish(4, routing_key="direct", headers={"job_key": "once"})  # held too
            assert stored(pg_conn, schema) == []
            producer.publish(5, routing_key="direct")
        assert stored(pg_conn, schema) == [("direct", 1), ("a", 2), ("b", 2), ("direct", 4), ("direct", 5)]
        got = []
        with Consumer(c, [Queue("direct")], callbacks=[lambda body, message: got.append(body) or message.ack()]):
            while len(got) < 3:
                c.drain_events(timeout=10)
        assert got == [1, 4, 5]


def test_a_producer_batch_holds_every_kind_of_publish_in_one_transaction_in_publish_order(pg_url, schema, pg_conn):
    from datetime import datetime, timedelta, timezone

    options = {"schema": schema, "native_delayed_delivery": True, "deadletter_queue": "dead"}
    with Connection(pg_url, transport_options=options) as c:
        producer = Producer(c.default_channel)
        for name, kind, queues, key in (("ex_d", "direct", ["qd"], "kd"), ("ex_t", "topic", ["qt"], "a.*"),
                                        ("ex_f", "fanout", ["qf1", "qf2"], "")):
            for queue in queues:
                Queue(queue, Exchange(name, kind), routing_key=key)(producer.channel).declare()
        Queue("q")(producer.channel).declare()
        eta = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()

        def publish_all(first: int) -> None:
            producer.publish(first, routing_key="q")
            producer.publish(first + 1, exchange="ex_d", routing_key="kd")
            producer.publish(first + 2, exchange="ex_t", routing_key="a.b")
            producer.publish(first + 3, exchange="ex_f")
            producer.publish(first + 4, routing_key="q", headers={"job_key": f"job{first}"})
            producer.publish(first + 5, routing_key="q", headers={"eta": eta})  # delayed
            producer.publish(first + 6, exchange="ex_d", routing_key="nowhere")  # to the dead-letter queue

        with producer.batch():
            publish_all(0)
            assert stored(pg_conn, schema) == []  # job-keyed and routed ones too
            producer.publish(7, routing_key="q")
        assert stored(pg_conn, schema) == [("q", 0), ("qd", 1), ("qt", 2), ("qf1", 3), ("qf2", 3), ("q", 4),
                                           ("q", 5), ("dead", 6), ("q", 7)]

        # A row the database refuses, last, fails the whole flush: the job-keyed message too.
        pg_conn.execute(sql.SQL("ALTER TABLE {}.messages ADD CONSTRAINT refused CHECK (payload NOT LIKE {}) NOT VALID")
                        .format(sql.Identifier(schema), sql.Literal('%"refuse me"%')))
        with pytest.raises(psycopg.errors.CheckViolation):
            with producer.batch():
                publish_all(10)
                producer.publish(17, routing_key="q", headers={"refuse me": True})
        assert len(stored(pg_conn, schema)) == 9


def test_a_producer_batch_writes_every_max_size_and_drops_the_rest_when_its_block_raises(pg_url, schema, pg_conn):
    with Connection(pg_url, transport_options={"schema": schema}) as c:
        producer = Producer(c.default_channel)
        Queue("q")(producer.channel).declare()
        with pytest.raises(KeyError):
            with producer.batch(max_size=3):
                for n in range(5):
                    producer.publish(n, routing_key="q")
                raise KeyError
        assert stored(pg_conn, schema) == [("q", 0), ("q", 1), ("q", 2)]  # the first 3 were written
        with producer.batch():
            with pytest.raises(ValueError, match="queue name"):
                producer.publish("bad", routing_key="bad\x00name")
            producer.publish(5, routing_key="q")
        assert stored(pg_conn, schema)[-1] == ("q", 5)
