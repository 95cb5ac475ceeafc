"""Module-scoped fixtures shared by the DLQ test modules that run a real worker: a fresh
schema (``env``), a connection to it (``db``) and the client app (``client``)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from celery_dlq import DLQ

from .dlq_app import make_app, setup_schema


@pytest.fixture(scope="module")
def env(pg_url, tmp_path_factory):
    schema = f"t_{uuid.uuid4().hex[:12]}"
    setup_schema(pg_url, schema)
    yield {"url": pg_url, "schema": schema, "beat": str(tmp_path_factory.mktemp("beat") / "schedule")}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(scope="module")
def db(env):
    with psycopg.connect(env["url"], autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def client(env):
    app = make_app(env["url"], env["schema"])
    yield app
    DLQ(app).close()


def set_switch(db, env, failing: bool) -> None:
    """Make ``dlq_app.switchable`` fail (or succeed) from its next run on."""
    db.execute(sql.SQL("INSERT INTO {}.switches VALUES ('switchable', %s) ON CONFLICT (name) "
                       "DO UPDATE SET failing = EXCLUDED.failing").format(sql.Identifier(env["schema"])),
               (failing,))
