"""Least privilege and TLS (issue 4, requirement 8).

A DBA creates and migrates the schema as its owner, then grants an application role only
what docs/guarantees.md lists; that role publishes, consumes and runs recovery passes with
``auto_migrate`` off.  The role is dropped afterwards.
"""

from __future__ import annotations

import socket
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import kombu.exceptions
import psycopg
import pytest
from kombu import Connection, Consumer, Producer, Queue
from psycopg import sql

from kombu_pg.store import BrokerStore, apply_migrations

from .chaos_util import messages, terminate

#: Exactly the statements docs/guarantees.md gives (``{schema}``/``{role}`` filled in).
GRANTS = """
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role};
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT USAGE ON SEQUENCES TO {role};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT EXECUTE ON FUNCTIONS TO {role};
"""


def as_user(url: str, user: str) -> str:
    """``url`` with its user replaced (no password: the test server trusts local users)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment))


@pytest.fixture
def app_role(pg_conn, schema, pg_url):
    """A LOGIN role with the documented grants on a schema the superuser migrated."""
    can = pg_conn.execute("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    if not can:
        pytest.skip("the test server's user cannot create roles")
    role = f"kpg_app_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        apply_migrations(pg_conn, schema)  # as the owner (the DBA)
        pg_conn.execute(sql.SQL(GRANTS).format(schema=sql.Identifier(schema), role=sql.Identifier(role)))
        url = as_user(pg_url, role)
        try:
            psycopg.connect(url, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            pytest.skip(f"the test server does not let a new role log in without a password: {exc}")
        yield role, url
    finally:
        pg_conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s", (role,))
        pg_conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        pg_conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        assert not pg_conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()


def receive(conn: Connection, queue: Queue, count: int, timeout: float = 10.0) -> list:
    got: list = []
    with Consumer(conn, [queue], callbacks=[lambda body, message: got.append(message)], prefetch_count=count):
        deadline = time.monotonic() + timeout
        while len(got) < count:
            assert time.monotonic() < deadline, f"received {len(got)} of {count}"
            try:
                conn.drain_events(timeout=0.2)
            except socket.timeout:
                pass
    return got


def flush(conn: Connection) -> None:
    try:
        conn.drain_events(timeout=0.05)
    except socket.timeout:
        pass


@pytest.mark.chaos  # ends the role's sessions with pg_terminate_backend
def test_a_least_privilege_role_publishes_consumes_and_recovers(app_role, pg_conn, schema):
    role, url = app_role
    options = {"schema": schema, "auto_migrate": False, "recovery_interval": 0.2, "polling_interval": 0.2}
    queue = Queue("app_work")
    with Connection(url, transport_options=options) as a:
        store = a.default_channel.store
        assert store.conn.info.user == role
        assert not store.conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        Producer(a.default_channel).publish({"n": 1}, routing_key="app_work", declare=[queue])
        Producer(a.default_channel).publish({"n": 2}, routing_key="app_work")
        [first] = receive(a, queue, 1)
        first.ack()
        flush(a)
        [held] = receive(a, queue, 1)  # left unacked: a's session is about to die
        pids = [r[0] for r in pg_conn.execute("SELECT pid FROM pg_stat_activity WHERE usename = %s", (role,))]
        terminate(pg_conn, pids)

    # Another connection of the same role runs the recovery pass and gets the message again.
    with Connection(url, transport_options=options) as b:
        [again] = receive(b, queue, 1)
        assert again.payload == held.payload == {"n": 2} and again.delivery_info["redelivered"]
        again.ack()
        flush(b)
        report = BrokerStore(b.default_channel.store.conn, schema).recover([])
        assert report.ran
    assert messages(pg_conn, schema) == []
    # The same role may also leave auto_migrate on once the schema is current (it only reads).
    with Connection(url, transport_options={**options, "auto_migrate": True}) as c:
        Producer(c.default_channel).publish("x", routing_key="app_work")
        assert [m.payload for m in receive(c, queue, 1)] == ["x"]


def test_the_least_privilege_role_cannot_change_the_schema(app_role, schema, pg_conn):
    _, url = app_role
    # What a later migration (run by the owner) creates is usable through the default privileges.
    pg_conn.execute(sql.SQL("CREATE TABLE {}.later (id bigserial, x int)").format(sql.Identifier(schema)))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {}.later (x) VALUES (1)").format(sql.Identifier(schema)))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.SQL("DROP TABLE {}.messages").format(sql.Identifier(schema)))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.SQL("CREATE TABLE {}.mine (x int)").format(sql.Identifier(schema)))


def test_sslmode_require_against_a_server_without_tls_fails_clearly(pg_url, pg_conn, schema):
    ssl_on = pg_conn.execute("SHOW ssl").fetchone()[0] == "on"
    host = pg_conn.info.host
    if host.startswith("/"):
        pytest.skip("Unix-socket server: libpq never uses TLS there, whatever sslmode says")
    required = pg_url + ("&" if "?" in pg_url else "?") + "sslmode=require"
    if ssl_on:
        # A server with TLS: the connection must really be encrypted.
        with Connection(required, transport_options={"schema": schema}) as c:
            conn = c.default_channel.store.conn
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
        return
    for conn in (Connection(required, transport_options={"schema": schema}),
                 Connection(pg_url, ssl=True, transport_options={"schema": schema})):  # broker_use_ssl=True
        with pytest.raises((psycopg.OperationalError, kombu.exceptions.OperationalError)) as info:
            conn.ensure_connection(max_retries=0)  # no reconnect back-off: fail at once
        message = str(info.value)
        assert "SSL" in message and "kombu-pg cannot connect" in message
        assert str(pg_conn.info.port) in message  # says where it tried
    assert not pg_conn.execute(
        "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()  # nothing was created
