"""Putting many messages on a queue before a scenario consumes them.

Every broker gets real publishes: one Kombu ``Producer.publish`` per message, through the
default exchange (Celery's task path: routing key = queue name), persistent.  kombu_pg is
the exception that needs no exception: its queue is a table, so after one real publish the
row that publish wrote is copied by one ``INSERT ... SELECT`` (:class:`Template`), which
fills a million messages in seconds instead of an hour of single commits.  The copies are
what the publish statement writes, column for column; ids and ``created_at`` come from
their defaults, as in a publish.
"""

from __future__ import annotations

from typing import Any

import psycopg
from kombu import Exchange, Producer, Queue
from psycopg import sql

from kombu_pg.config import Options

from .brokers import Broker

#: The columns kombu_pg's publish statement writes, with their types (the casts keep a NULL
#: of an unset column, e.g. ``visible_at``, from being read as text in INSERT ... SELECT).
_PUBLISHED_COLUMNS = {
    "queue": "text",
    "priority": "smallint",
    "payload": "text",
    "serial_key": "text",
    "visible_at": "timestamptz",
    "expires_at": "timestamptz",
}


def durable_queue(name: str) -> Queue:
    """The queue every scenario here uses: durable, on a direct exchange of the same name
    (what :func:`bench.brokers.delete_entities` removes)."""
    return Queue(name, Exchange(name, "direct", durable=True), routing_key=name, durable=True)


def publish(producer: Producer, queue: str, seq: int, pad: str) -> None:
    """One persistent message through the default exchange, as Celery publishes a task."""
    producer.publish(
        {"seq": seq, "pad": pad}, exchange="", routing_key=queue, delivery_mode=2
    )


def schema_of(broker: Broker) -> str:
    """The kombu_pg schema the broker's transport options select."""
    return Options.from_mapping(broker.transport_options).schema


def fill(broker: Broker, queue: str, n: int, pad: str) -> None:
    """Declare ``queue`` and put ``n`` messages on it (see the module docstring)."""
    with broker.connection() as conn:
        producer = conn.Producer(serializer="json")
        durable_queue(queue)(producer.channel).declare()
        publish(producer, queue, 0, pad)
        if broker.key != "kombu_pg":
            for seq in range(1, n):
                publish(producer, queue, seq, pad)
            return
    with psycopg.connect(broker.url, autocommit=True) as pg:
        Template(pg, schema_of(broker), queue).insert(n - 1)


class Template:
    """The row of the oldest message of a kombu_pg queue, kept in memory and inserted again
    on demand (the original may be claimed and acked meanwhile)."""

    def __init__(self, conn: psycopg.Connection, schema: str, queue: str) -> None:
        self.conn = conn
        table = sql.SQL("{}.messages").format(sql.Identifier(schema))
        columns = sql.SQL(", ").join(map(sql.Identifier, _PUBLISHED_COLUMNS))
        row = conn.execute(
            sql.SQL("SELECT {} FROM {} WHERE queue = %s ORDER BY id LIMIT 1").format(
                columns, table
            ),
            (queue,),
        ).fetchone()
        if row is None:
            raise RuntimeError(f"no message in queue {queue!r} to use as a template")
        self.values: dict[str, Any] = dict(zip(_PUBLISHED_COLUMNS, row))
        typed = sql.SQL(", ").join(
            sql.SQL("{}::{}").format(sql.Placeholder(name), sql.SQL(type_))
            for name, type_ in _PUBLISHED_COLUMNS.items()
        )
        self._insert = sql.SQL(
            "INSERT INTO {} ({}) SELECT {} FROM generate_series(1, %(copies)s)"
        ).format(table, columns, typed)

    def insert(self, copies: int) -> None:
        """Insert ``copies`` more copies of the message, in one statement (one commit)."""
        if copies > 0:
            self.conn.execute(self._insert, {**self.values, "copies": copies})
