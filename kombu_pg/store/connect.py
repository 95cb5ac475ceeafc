"""Opening psycopg connections the way every kombu-pg component needs them."""

from __future__ import annotations

import psycopg


def connect(conninfo: str, **kwargs) -> psycopg.Connection:
    """An autocommit connection: each statement commits on its own, and nothing holds a
    transaction open across callbacks (LISTEN needs that too)."""
    return psycopg.connect(conninfo, autocommit=True, **kwargs)
