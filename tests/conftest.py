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
