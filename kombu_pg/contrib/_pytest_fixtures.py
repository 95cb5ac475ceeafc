"""The fixtures of :mod:`kombu_pg.contrib.pytest` (a module of their own: see there)."""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import psycopg
import pytest
from psycopg import sql

from ..embedded import database_url


@pytest.fixture(scope="session")
def kombu_pg_url() -> Iterator[str]:
    """``$KOMBU_PG_URL``, else the URL of an embedded server stopped after the session."""
    url, server = database_url()
    yield url
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def kombu_pg_schema(kombu_pg_url: str) -> Iterator[str]:
    """A schema of this session's own (tables created on first use), dropped afterwards."""
    name = f"pytest_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(kombu_pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def kombu_pg_celery_config(kombu_pg_url: str, kombu_pg_schema: str) -> dict[str, Any]:
    """Broker and result backend settings; merge into your own ``celery_config``."""
    options = {"schema": kombu_pg_schema}
    return {
        "broker_url": kombu_pg_url,
        "result_backend": kombu_pg_url,
        "broker_transport_options": options,
        "result_backend_transport_options": options,
    }


@pytest.fixture(scope="session")
def celery_config(kombu_pg_celery_config: dict[str, Any]) -> dict[str, Any]:
    return kombu_pg_celery_config
