"""Publish Celery tasks inside the application's own database transaction.

The task row is written by the application's connection, in its transaction: it becomes
visible to workers exactly when the transaction commits, and vanishes if it rolls back
(savepoints included).  Its NOTIFY is transactional too, so workers are woken on commit
only.  The library never commits, rolls back or otherwise changes the transaction.

    with psycopg.connect(url) as conn:            # or SQLAlchemy / Django, see below
        conn.execute("INSERT INTO orders ...")
        result = publish_in(conn, send_receipt.s(order_id))
        conn.execute("UPDATE orders SET receipt_task = %s ...", (result.id,))
    # committed: the worker runs send_receipt; rolled back: it never existed
"""

from __future__ import annotations

from typing import Any

import psycopg
from celery import Celery
from celery.canvas import Signature
from celery.result import AsyncResult
from psycopg.conninfo import conninfo_to_dict

from .store import BrokerStore
from .transport import Channel, Transport

__all__ = ["WrongDatabase", "publish_in", "psycopg_connection"]


class WrongDatabase(RuntimeError):
    """The application's connection does not reach the broker's database and schema."""


class _TransactionChannel(Channel):
    """A channel whose statements run on a connection the application owns."""

    def __init__(self, transport: Transport, store: BrokerStore) -> None:
        self._foreign_store = store
        super().__init__(transport)

    def _open_store(self) -> BrokerStore:
        return self._foreign_store

    def _should_notify(self, row) -> bool:
        # PostgreSQL delivers the NOTIFY at commit, once per transaction and queue.  Always
        # one: looking for idle consumers holds a lock until commit that a consumer going
        # idle waits for, and the application's transaction may stay open for long.
        return True

    def close(self) -> None:
        # Nothing to hand back and nothing to close: the connection is the application's.
        self.closed = True
        if self.connection is not None:
            self.connection.close_channel(self)


def psycopg_connection(handle: Any) -> psycopg.Connection:
    """The psycopg 3 connection behind a psycopg connection, a SQLAlchemy ``Session`` or
    ``Connection`` (``postgresql+psycopg://``), or Django's ``connection`` (psycopg 3)."""
    if isinstance(handle, psycopg.Connection):
        return handle
    if hasattr(handle, "get_bind") and hasattr(handle, "connection"):  # SQLAlchemy Session
        handle = handle.connection()
    driver = getattr(getattr(handle, "connection", None), "driver_connection", None)  # SQLAlchemy
    if driver is None and hasattr(handle, "ensure_connection"):  # Django
        handle.ensure_connection()
        driver = handle.connection
    if isinstance(driver, psycopg.Connection):
        return driver
    raise TypeError(
        f"cannot publish through {type(handle).__name__}: pass a psycopg 3 connection, a SQLAlchemy "
        "Session/Connection using postgresql+psycopg://, or Django's connection with psycopg 3")


def publish_in(handle: Any, signature: Signature, *, app: Celery | None = None, **options: Any) -> AsyncResult:
    """Publish ``signature`` through the application's connection and transaction.

    Any Celery option works (``queue``, ``priority``, ``countdown``/``eta``, ``headers`` with a
    ``serial_key``...).  Returns the task's ``AsyncResult``; its ``id`` can be stored in the
    same transaction.
    """
    conn = psycopg_connection(handle)
    app = app or signature.app
    transport = app.connection_for_write().transport
    if not isinstance(transport, Transport):
        raise WrongDatabase(f"the app's broker is {transport.driver_type!r}, not PostgreSQL")
    store = BrokerStore(conn, transport.options.schema)
    _check_same_database(conn, transport)
    channel = _TransactionChannel(transport, store)
    try:
        producer = app.amqp.Producer(channel, auto_declare=False)
        # Retrying inside the application's transaction cannot help: errors surface to it.
        return signature.apply_async(producer=producer, retry=False, **options)
    finally:
        channel.close()


def _check_same_database(conn: psycopg.Connection, transport: Transport) -> None:
    schema = transport.options.schema
    database, has_tables = conn.execute(
        "SELECT current_database(), to_regclass(format('%%I.messages', %s::text)) IS NOT NULL",
        (schema,),
    ).fetchone()
    expected = conninfo_to_dict(transport.conninfo).get("dbname")
    if expected and expected != database:
        raise WrongDatabase(
            f"the connection is to database {database!r} but the broker uses {expected!r}: a task "
            "published there would never reach the workers (use on_commit with another broker)")
    if not has_tables:
        raise WrongDatabase(
            f"database {database!r} has no kombu-pg schema {schema!r}: run `celery -A proj pg migrate` "
            "(or start a worker once) first")
