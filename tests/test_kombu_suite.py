"""Kombu's own reusable transport test classes, run against kombu-pg.

The classes come from ``t/integration/common.py`` in the sdist of the *installed* Kombu
(see ``tests/kombu_sdist.py``; nothing is vendored).  They reuse fixed queue names
(``test``, ``direct1``, ``fanout1``...), so every test gets a fresh schema.  They never
assert that a consumer callback ran (kombu-transport.md section 11.4): the asserting
counterparts are in ``test_routing.py`` and ``test_monitoring.py``.

Not run: ``BaseFailover`` (kombu's ``;`` failover re-parses URLs with kombu's parser;
kombu-pg uses libpq multi-host URLs instead).
"""

from __future__ import annotations

import os

import kombu
import psycopg
import pytest
from kombu.exceptions import OperationalError

from kombu_pg.transport import Transport
from tests.kombu_sdist import SdistUnavailable, add_to_path

try:
    add_to_path()
except SdistUnavailable as exc:  # offline: skip unless CI demands the sdist
    if os.environ.get("KOMBU_PG_REQUIRE_SDIST") == "1":
        raise
    pytest.skip(f"Kombu sdist unavailable: {exc}", allow_module_level=True)

from t.integration.common import (  # noqa: E402  (needs the sdist on sys.path)
    BaseEventLoop,
    BaseExchangeTypes,
    BaseMessage,
    BasePriority,
    BaseTimeToLive,
    BasicFunctionality,
)

#: Nothing listens on port 1: the connection is refused at once.
INVALID_URL = "postgresql://postgres@127.0.0.1:1/x"

#: What a failed connect may raise: Kombu wraps errors in some paths, not in connect().
CONNECT_ERRORS = (OperationalError, psycopg.OperationalError, psycopg.InterfaceError)


@pytest.fixture
def connection(pg_url, schema):
    conn = kombu.Connection(
        pg_url, transport_options={"schema": schema, "polling_interval": 0.1})
    yield conn
    conn.close()


@pytest.fixture
def invalid_connection():
    conn = kombu.Connection(INVALID_URL, connect_timeout=2)
    yield conn
    conn.close()


class TestBasicFunctionality(BasicFunctionality):
    """Run unchanged, plus a stricter error check than kombu's ``raises(Exception)``."""

    def test_failed_connect_is_a_connection_error(self, invalid_connection):
        with pytest.raises(CONNECT_ERRORS) as info:
            invalid_connection.connect()
        # Kombu and Celery's reconnect logic recognise it as a connection error.
        assert isinstance(info.value, Transport.connection_errors + (OperationalError,))


class TestExchangeTypes(BaseExchangeTypes):
    pass


class TestMessage(BaseMessage):
    pass


class TestTimeToLive(BaseTimeToLive):
    pass


class TestPriority(BasePriority):
    PRIORITY_ORDER = "asc"


class TestEventLoop(BaseEventLoop):
    pass
