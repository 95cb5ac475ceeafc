"""Shared fixtures: a real PostgreSQL server for every test.

``KOMBU_PG_URL`` points the suite at an existing server; without it the session starts
an embedded one (pgserver) in a temporary directory.  Each test gets its own schema, so
tests never see each other's rows.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

import kombu_pg  # noqa: F401  (registers the postgresql:// scheme)
from kombu_pg.embedded import database_url
from kombu_pg.store import BrokerStore, apply_migrations, connect


@pytest.fixture(scope="session")
def pg_server():
    """The embedded server, or None when KOMBU_PG_URL names a real one."""
    url, server = database_url()
    yield server
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def pg_url(pg_server) -> str:
    return pg_server.url if pg_server is not None else database_url()[0]


@pytest.fixture
def pg_conn(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def schema(pg_url):
    """A fresh schema name for this test; dropped afterwards with everything in it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def store(pg_url, schema):
    """The broker store on a migrated fresh schema (no Kombu involved)."""
    conn = connect(pg_url)
    apply_migrations(conn, schema)
    yield BrokerStore(conn, schema)
    conn.close()


@pytest.fixture
def task_log(pg_conn, schema):
    """Creates the schema's task_log table and returns a function reading it."""
    apply_migrations(pg_conn, schema)
    pg_conn.execute(
        sql.SQL(
            "CREATE TABLE {}.task_log (id bigserial, task text, arg text, attempt int,"
            " redelivered bool, at timestamptz DEFAULT clock_timestamp())"
        ).format(sql.Identifier(schema))
    )

    def rows(task: str | None = None) -> list[tuple]:
        query = sql.SQL("SELECT task, arg, attempt, redelivered, at FROM {}.task_log {} ORDER BY id").format(
            sql.Identifier(schema), sql.SQL("WHERE task = %(task)s" if task else "")
        )
        return pg_conn.execute(query, {"task": task}).fetchall()

    return rows


@pytest.fixture
def worker_env(pg_url, schema):
    return {"KOMBU_PG_URL": pg_url, "KOMBU_PG_SCHEMA": schema}
