"""Bad input (issue 4, requirement 7): hostile names, huge and undecodable messages, odd
URLs and options.  Each either works end to end or fails with a clear error, and nothing
is left half-written.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import time
import uuid

import psycopg
import pytest
from celery import Celery
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Producer, Queue
from psycopg import sql

from kombu_pg.config import BackendOptions, ConfigurationError, Options, build_conninfo, validate_schema
from kombu_pg.store import migration_sql

from .chaos_util import TaskLog, create_log_tables, messages, wait_until
from .worker import CeleryWorker

# derandomize: the same examples every run, so CI never meets a new one by chance.
HYPOTHESIS = settings(max_examples=50, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Text PostgreSQL can store: any character but NUL (surrogates are not text at all).
pg_text = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
names = st.text(pg_text, min_size=1, max_size=300)

NASTY_NAMES = [
    "it's",
    'say "hi"',
    "a;b; DROP TABLE messages;--",
    "Robert'); DROP TABLE {schema}.queues;--",
    "$1 %s %(name)s {schema} {}",
    "back\\slash \\x00 \\n",
    "tab\there, new\nline",
    "ünïcödé 🐍 队列 עברית",
    "x" * 300,
    "é" * 1000,  # 2000 bytes
    "*.#",
    "amq.not.really",
    " ",
]


@pytest.fixture
def conn(pg_url, schema):
    with Connection(pg_url, transport_options={"schema": schema, "polling_interval": 0.2}) as c:
        c.connect()
        yield c


@pytest.fixture(scope="module")
def names_db(pg_url):
    """One schema and connection for the many name round trips: (connection, schema)."""
    name = f"t_names_{uuid.uuid4().hex[:8]}"
    with Connection(pg_url, transport_options={"schema": name, "polling_interval": 0.2}) as c:
        c.connect()
        yield c, name
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def kombu_would_deliver(body):
    """What Kombu itself hands a consumer for ``body`` (its in-memory transport as oracle)."""
    with Connection("memory://") as memory:
        channel = memory.default_channel
        queue = Queue("oracle", channel=channel)
        Producer(channel).publish(body, routing_key="oracle", declare=[queue])
        message = queue.get(no_ack=True)
        return message.payload


def table_count(pg_conn, schema, table) -> int:
    return pg_conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
        sql.Identifier(schema), sql.Identifier(table))).fetchone()[0]


def round_trip(conn: Connection, exchange_type: str, exchange_name: str, queue_name: str,
               routing_key: str, body):
    """Declare, bind, publish, get, ack, then delete it all; return what was received."""
    channel = conn.default_channel
    exchange = Exchange(exchange_name, type=exchange_type, channel=channel)
    queue = Queue(queue_name, exchange, routing_key=routing_key, channel=channel)
    try:
        queue.declare()  # explicitly: Kombu's declare cache outlives the delete below
        Producer(channel).publish(body, exchange=exchange, routing_key=routing_key)
        message = queue.get(no_ack=False)
        assert message is not None, "published message not received"
        message.ack()
        assert queue.get(no_ack=False) is None  # exactly once
        return message.payload, message.delivery_info
    finally:
        queue.delete()
        exchange.delete()


@pytest.mark.parametrize("exchange_type", ["direct", "topic", "fanout"])
@pytest.mark.parametrize("name", NASTY_NAMES, ids=lambda n: repr(n)[:24])
def test_hostile_queue_exchange_and_routing_key_names_round_trip(names_db, pg_conn, name, exchange_type):
    conn, schema = names_db
    body = {"name": name, "n": 1}
    payload, info = round_trip(conn, exchange_type, name, name, name, body)
    assert payload == body and info["exchange"] == name and info["routing_key"] == name
    assert table_count(pg_conn, schema, "messages") == 0
    assert table_count(pg_conn, schema, "invalid_messages") == 0


@HYPOTHESIS
@given(queue_name=names, exchange_name=names, routing_key=names,
       exchange_type=st.sampled_from(["direct", "topic", "fanout"]),
       body=st.one_of(st.text(pg_text, max_size=200), st.binary(max_size=200),
                      st.dictionaries(st.text(pg_text, max_size=10), st.integers(), max_size=5)))
@example(queue_name="a'b", exchange_name='x"y', routing_key="a.*.#", exchange_type="topic", body="")
@example(queue_name="q;--", exchange_name="e;--", routing_key="", exchange_type="direct", body=b"\x00\xff")
@example(queue_name="\u202e\u200b", exchange_name="\ufeff", routing_key="\U0001f600.#", exchange_type="topic",
         body={"\x01": 1})
def test_any_names_publish_consume_round_trip(names_db, pg_conn, queue_name, exchange_name, routing_key,
                                              exchange_type, body):
    conn, schema = names_db
    payload, _ = round_trip(conn, exchange_type, exchange_name, queue_name, routing_key, body)
    assert payload == kombu_would_deliver(body)


def test_a_wildcard_inside_a_topic_word_is_a_literal(conn, pg_conn, schema):
    """AMQP: "*" and "#" are wildcards only as whole words; "user*" is a literal word."""
    channel = conn.default_channel
    exchange = Exchange("logs", type="topic", channel=channel)
    Queue("all_a", exchange, routing_key="a.#", channel=channel).declare()
    odd = Queue("odd", exchange, routing_key="user*", channel=channel)
    odd.declare()
    Queue("odder", exchange, routing_key="*0", channel=channel).declare()
    producer = Producer(channel)
    producer.publish("to a", exchange=exchange, routing_key="a.b")  # must not be broken by "*0"
    producer.publish("literal", exchange=exchange, routing_key="user*")
    producer.publish("not for odd", exchange=exchange, routing_key="userx")
    assert Queue("all_a", channel=channel).get(no_ack=True).payload == "to a"
    assert odd.get(no_ack=True).payload == "literal"
    assert odd.get(no_ack=True) is None
    assert table_count(pg_conn, schema, "messages") == 0


def test_a_nul_character_in_a_name_is_refused_cleanly(conn, pg_conn, schema):
    with pytest.raises((ValueError, psycopg.DataError), match="NUL"):
        Producer(conn.default_channel).publish("x", routing_key="a\x00b", declare=[Queue("a\x00b")])
    assert table_count(pg_conn, schema, "messages") == 0


def test_a_queue_name_too_long_for_notify_is_refused_clearly_and_nothing_is_written(conn, pg_conn, schema):
    from kombu_pg.store.routing import MAX_QUEUE_NAME_BYTES

    channel = conn.default_channel
    longest = "é" * (MAX_QUEUE_NAME_BYTES // 2)  # exactly the limit, in bytes
    payload, _ = round_trip(conn, "direct", "long", longest, longest, "fits")
    assert payload == "fits"
    too_long = "q" * 10_000  # a NOTIFY payload stops near 8000 bytes
    with pytest.raises(ValueError, match="queue name too long"):
        Queue(too_long, channel=channel).declare()
    with pytest.raises(ValueError, match="queue name too long"):
        Producer(channel).publish("body", routing_key=too_long)
    assert table_count(pg_conn, schema, "messages") == 0
    assert pg_conn.execute(sql.SQL("SELECT count(*) FROM {}.queues WHERE length(name) > %s").format(
        sql.Identifier(schema)), (MAX_QUEUE_NAME_BYTES,)).fetchone()[0] == 0


# -- schemas -------------------------------------------------------------------------------

HOSTILE_SCHEMAS = ["kombu; DROP SCHEMA public CASCADE", 'a"b', "a'b", "1abc", "", "x" * 49, "ünï",
                   "pg_catalog.x", "a b", "a-b", None, 5, "kombu_pg\x00"]


@pytest.mark.parametrize("bad", HOSTILE_SCHEMAS, ids=repr)
def test_hostile_schema_names_are_refused_before_any_sql(bad, pg_url):
    # Port 1 is closed: reaching the network would give a connection error instead.
    nowhere = "postgresql://postgres@127.0.0.1:1/x"
    with pytest.raises(ConfigurationError, match="schema"):
        Connection(nowhere, transport_options={"schema": bad}).connect()
    with pytest.raises(ConfigurationError, match="schema"):
        migration_sql(bad)
    app = Celery("bad_schema", set_as_current=False)
    app.conf.result_backend_transport_options = {"schema": bad}
    from kombu_pg.backend import PostgresBackend

    with pytest.raises(ConfigurationError, match="schema"):
        PostgresBackend(app=app, url=nowhere)


def test_a_refused_schema_name_creates_nothing(pg_url, pg_conn):
    before = pg_conn.execute("SELECT count(*) FROM pg_namespace").fetchone()[0]
    for bad in HOSTILE_SCHEMAS:
        with pytest.raises(ConfigurationError):
            with Connection(pg_url, transport_options={"schema": bad}) as c:
                c.connect()
    assert pg_conn.execute("SELECT count(*) FROM pg_namespace").fetchone()[0] == before


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=60), st.text("abcXYZ_019\"';. -", max_size=60)))
@example("kombu_pg")
@example("_" * 48)
def test_schema_validation_accepts_only_plain_identifiers(name):
    try:
        assert validate_schema(name) == name
    except ConfigurationError:
        return
    assert 1 <= len(name) <= 48 and name.isascii() and (name[0].isalpha() or name[0] == "_")
    assert all(ch.isalnum() or ch == "_" for ch in name)


# -- URLs and options ------------------------------------------------------------------------

# NUL is left out here (see test_a_nul_character_in_connection_parameters_is_refused).
no_nul = st.characters(blacklist_characters="\x00")
urlish = st.one_of(
    st.text(no_nul, max_size=80),
    st.builds(
        "{}://{}{}{}/{}{}".format,
        st.sampled_from(["postgresql", "postgres", "mysql", "redis", "", "postgresql+psycopg"]),
        st.sampled_from(["", "user@", "user:pa%20ss@", "u:@", "@", ":p@", "%zz@"]),
        st.sampled_from(["localhost", "127.0.0.1", "[::1]", "h1,h2", "", "/tmp/sock", "höst", "a b"]),
        st.sampled_from(["", ":5432", ":0", ":99999", ":x", ":-1", ",h2:5433"]),
        st.text(no_nul, max_size=10),
        st.sampled_from(["", "?sslmode=require", "?sslmode=bogus", "?application_name=x&connect_timeout=3",
                         "?host=/tmp", "?nonsense=1", "?=", "?a", "?options=-c%20search_path%3Dx"]),
    ),
)
finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    url=urlish,
    user=st.one_of(st.none(), st.text(no_nul, max_size=10)),
    password=st.one_of(st.none(), st.text(no_nul, max_size=10)),
    port=st.one_of(st.none(), st.integers(min_value=-10, max_value=70000)),
    connect_timeout=st.one_of(st.none(), finite),
    ssl=st.one_of(st.none(), st.booleans(),
                  st.dictionaries(st.sampled_from(["sslmode", "sslrootcert", "ssl_cert_reqs", "ca_certs", "sslx"]),
                                  st.one_of(st.text(no_nul, max_size=8), st.integers()), max_size=3)),
    extra=st.dictionaries(st.one_of(st.sampled_from(["keepalives", "sslmode", "prepare_threshold", "x y", ""]),
                                    st.text(no_nul, max_size=6)),
                          st.one_of(st.text(no_nul, max_size=8), st.integers(), st.none()), max_size=3),
)
@example(url="postgresql://u@h/db?sslmode=require", user=None, password=None, port=None,
         connect_timeout=None, ssl=None, extra={})
def test_build_conninfo_returns_a_conninfo_or_raises_configuration_error(
        url, user, password, port, connect_timeout, ssl, extra):
    try:
        conninfo = build_conninfo(url, user=user, password=password, port=port,
                                  connect_timeout=connect_timeout, ssl=ssl, extra=extra)
    except ConfigurationError as exc:
        assert str(exc)
        return
    parsed = psycopg.conninfo.conninfo_to_dict(conninfo)  # a valid conninfo string
    assert parsed.get("application_name")


@pytest.mark.parametrize("timeout", [math.nan, math.inf])
def test_build_conninfo_refuses_a_non_finite_connect_timeout(timeout):
    with pytest.raises(ConfigurationError):
        build_conninfo("postgresql://u@h/db", connect_timeout=timeout)


@pytest.mark.parametrize("url,kwargs", [("\x00", {}), ("postgresql://u@h/db", {"password": "p\x00w"}),
                                        ("postgresql://u@h/db", {"extra": {"sslmode": "require\x00"}})])
def test_a_nul_character_in_connection_parameters_is_refused(url, kwargs):
    with pytest.raises(ConfigurationError):
        build_conninfo(url, **kwargs)


option_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), finite, st.text(max_size=8),
                          st.dictionaries(st.text(max_size=5), st.integers(), max_size=2), st.lists(st.integers(), max_size=2))


OPTION_NAMES = sorted({f.name for cls in (Options, BackendOptions) for f in dataclasses.fields(cls)})


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from([Options, BackendOptions]),
       st.dictionaries(st.one_of(st.sampled_from(OPTION_NAMES + ["max_retries", "interval_start"]),
                                 st.text(max_size=8)),
                       option_values, max_size=4))
def test_options_are_accepted_or_refused_with_configuration_error(cls, raw):
    try:
        options = cls.from_mapping(raw)
    except ConfigurationError as exc:
        assert str(exc)
        return
    assert options.polling_interval > 0
    for f in dataclasses.fields(cls):  # annotations are strings ("float | None")
        value = getattr(options, f.name)
        if f.type == "bool":
            assert isinstance(value, bool), f.name
        elif f.type.split(" | ")[0] in ("int", "float"):
            assert value is None and f.type.endswith("| None") or (
                not isinstance(value, bool) and math.isfinite(value) and value >= 0), f.name
    if cls is Options:
        assert options.recovery_interval > 0


# The broker's and the result backend's options are checked by one rule set: same error
# type, same message for the same mistake.
BOTH_OPTIONS = pytest.mark.parametrize("cls", [Options, BackendOptions])


@BOTH_OPTIONS
def test_unknown_options_are_refused_with_the_list_of_known_ones(cls):
    with pytest.raises(ConfigurationError) as info:
        cls.from_mapping({"polling_intervall": 1})
    known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    assert str(info.value) == (f"unknown kombu-pg option(s) 'polling_intervall' in {cls.SETTING}; "
                               f"known options: {known}")


@BOTH_OPTIONS
@pytest.mark.parametrize("value", ["2", True, None, math.nan, math.inf, -1, 0])
def test_a_bad_value_is_refused_with_the_option_name_and_the_value(cls, value):
    with pytest.raises(ConfigurationError) as info:
        cls.from_mapping({"polling_interval": value})
    assert str(info.value) == f"option 'polling_interval' must be a number > 0, got {value!r}"


@BOTH_OPTIONS
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_number_is_refused_for_every_numeric_option(cls, value):
    numeric = [f.name for f in dataclasses.fields(cls) if "number" in f.metadata["rule"].requirement
               or "integer" in f.metadata["rule"].requirement]
    assert "polling_interval" in numeric
    for name in numeric:
        with pytest.raises(ConfigurationError, match=name):
            cls.from_mapping({name: value})


@BOTH_OPTIONS
def test_options_of_the_other_component_are_named_as_such(cls):
    other = BackendOptions if cls is Options else Options
    own = {f.name for f in dataclasses.fields(cls)}
    foreign = next(f.name for f in dataclasses.fields(other) if f.name not in own)
    with pytest.raises(ConfigurationError, match=rf"\({other.KIND} options belong in {other.SETTING}\)"):
        cls.from_mapping({foreign: 1})


@BOTH_OPTIONS
def test_a_bad_connect_kwargs_is_refused_without_echoing_it(cls):
    with pytest.raises(ConfigurationError) as info:
        cls.from_mapping({"connect_kwargs": "password=s3cret"})
    assert "s3cret" not in str(info.value) and "got a str" in str(info.value)


@pytest.mark.chaos  # pg_terminate_backend
def test_a_retry_policy_with_on_revive_does_not_break_the_reconnect(pg_url, schema, pg_conn):
    revived = []
    with Connection(pg_url, transport_options={"schema": schema}) as c:
        producer = Producer(c)
        producer.publish("a", routing_key="q", declare=[Queue("q")])
        pg_conn.execute("SELECT pg_terminate_backend(%s, 5000)", (c.default_channel.store.conn.info.backend_pid,))
        producer.publish("b", routing_key="q", retry=True,
                         retry_policy={"max_retries": 3, "interval_start": 0, "on_revive": revived.append})
    assert revived and table_count(pg_conn, schema, "messages") == 2


# -- sizes and undecodable messages ----------------------------------------------------------


def test_a_20_mb_message_round_trips_intact(conn, pg_conn, schema):
    body = bytes(range(256)) * (20 * 1024 * 1024 // 256)
    started = time.monotonic()
    payload, _ = round_trip(conn, "direct", "big", "big", "big", body)
    assert payload == body
    text = "é" * (10 * 1024 * 1024)  # 20 MB of UTF-8
    payload, _ = round_trip(conn, "direct", "big", "big", "big", text)
    assert payload == text
    print(f"\ntwo 20 MB round trips in {time.monotonic() - started:.1f} s")


@pytest.fixture
def celery_client(pg_url, schema):
    app = Celery("badinput_client", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    yield app
    app.close()


def test_a_worker_survives_undecodable_messages_and_keeps_the_invalid_rows(
        celery_client, pg_url, pg_conn, schema):
    create_log_tables(pg_conn, schema)
    log = TaskLog(pg_conn, schema)
    # A real Celery message to mutate: published to a queue nobody consumes.
    celery_client.send_task("chaos_app.record", ("template",), queue="scratch")
    [template] = [json.loads(r[0]) for r in pg_conn.execute(
        sql.SQL("SELECT payload FROM {}.messages WHERE queue = 'scratch'").format(sql.Identifier(schema)))]

    def variant(**changes) -> str:
        message = json.loads(json.dumps(template))
        for key, value in changes.items():
            if key == "body":
                message["body"] = value
            elif key == "task":
                message["headers"]["task"] = value
            else:
                message[key] = value
        return json.dumps(message)

    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    set_aside = {  # not Kombu messages: moved to invalid_messages by the transport
        "not json": "{{{",
        "a list": "[1, 2]",
        "no properties": '{"body": "x", "properties": 5}',
        "bad base64": variant(body="%%% not base64 %%%"),
        "unknown body encoding": variant(properties={**template["properties"], "body_encoding": "rot13"}),
    }
    dropped_by_celery = {  # Kombu messages Celery itself refuses (logged, then acked)
        "body not json": variant(body=b64(b"{not json")),
        "disallowed content type": variant(**{"content-type": "application/x-python-serialize"}),
        "unregistered task": variant(task="chaos_app.no_such_task"),
    }
    insert = sql.SQL("INSERT INTO {}.messages (queue, payload) VALUES ('celery', %s)").format(sql.Identifier(schema))
    for payload in [*set_aside.values(), *dropped_by_celery.values()]:
        pg_conn.execute(insert, (payload,))
    pg_conn.execute(sql.SQL("DELETE FROM {}.messages WHERE queue = 'scratch'").format(sql.Identifier(schema)))
    celery_client.send_task("chaos_app.record", ("good",))

    env = {"KOMBU_PG_URL": pg_url, "KOMBU_PG_SCHEMA": schema}
    with CeleryWorker("chaos_app", env, pool="threads", concurrency=2) as worker:
        worker.wait_ready()
        wait_until(lambda: log.args("record") == ["good"] and not messages(pg_conn, schema), timeout=30,
                   what="the good task, and every bad row handled")
        celery_client.send_task("chaos_app.record", ("still alive",))
        wait_until(lambda: "still alive" in log.args("record"), what="a task after the bad ones")
        assert worker.proc.poll() is None
        output = worker.output()
    invalid = pg_conn.execute(sql.SQL("SELECT payload, error FROM {}.invalid_messages").format(
        sql.Identifier(schema))).fetchall()
    assert sorted(p for p, _ in invalid) == sorted(set_aside.values())  # kept whole, with a reason
    assert all(error for _, error in invalid)
    assert "not a valid Kombu message" in output
    assert "unregistered task" in output.lower() or "no_such_task" in output
