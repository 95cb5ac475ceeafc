"""Every deletion of messages captures poison first (issue #16, item 8).

Poison: a message delivered ``max_deliveries`` times, which claims skip and the celery_dlq
reaper would move into the DLQ.  Message expiry (x-message-ttl, ``expiration``/Celery's
``expires=``), purge (``celery purge``: Channel._purge), queue deletion and x-expires
removal delete messages; with celery_dlq installed (its ``dlq_installed`` row) the poison
among them reaches the DLQ table first, without it the deletion is counted
(``kombu_pg_poison_messages_deleted``) and logged at WARNING with the count and queue.
"""

from __future__ import annotations

import logging

import kombu
import pytest
from prometheus_client import REGISTRY
from psycopg import sql

from celery_dlq.store import DLQStore
from tests.worker import wait_until

MAX_DELIVERIES = 2
OPTIONS = {"max_deliveries": MAX_DELIVERIES, "polling_interval": 0.1}


@pytest.fixture
def connection(pg_url, schema):
    conn = kombu.Connection(pg_url, transport_options={"schema": schema, **OPTIONS})
    conn.connect()
    yield conn
    conn.close()


@pytest.fixture(params=[True, False], ids=["dlq_installed", "no_dlq"])
def dlq_installed(request, connection, pg_conn, schema) -> bool:
    """celery_dlq installed for the schema, or not (what celery_dlq's connection records)."""
    connection.default_channel  # migrated
    DLQStore(pg_conn, schema).mark_installed(MAX_DELIVERIES if request.param else None)
    return request.param


def _count(pg_conn, schema, table: str, where: str = "true", params=()) -> int:
    query = sql.SQL("SELECT count(*) FROM {}.{} WHERE " + where).format(sql.Identifier(schema),
                                                                       sql.Identifier(table))
    return pg_conn.execute(query, params).fetchone()[0]


def _poison(connection, queue: kombu.Queue, *, expiration: float | None = None) -> None:
    """Publish one message to ``queue`` and deliver it MAX_DELIVERIES times (each time
    requeued), plus one healthy message; claims then skip the poison one."""
    producer = kombu.Producer(connection.default_channel)
    producer.publish({"n": "poison"}, routing_key=queue.name, declare=[queue], expiration=expiration)
    bound = queue(connection.default_channel)
    for _ in range(MAX_DELIVERIES):
        message = bound.get()
        assert message is not None and message.payload == {"n": "poison"}
        message.requeue()
    producer.publish({"n": "healthy"}, routing_key=queue.name, expiration=expiration)


def _counted(reason: str) -> float:
    return REGISTRY.get_sample_value("kombu_pg_poison_messages_deleted_total", {"reason": reason}) or 0.0


def _check(pg_conn, schema, caplog, queue: str, reason: str, installed: bool, before: float) -> None:
    assert _count(pg_conn, schema, "messages", "queue = %s", [queue]) == 0
    dead = pg_conn.execute(sql.SQL("SELECT reason, queue, source, delivery_count FROM {}.dlq").format(
        sql.Identifier(schema))).fetchall()
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "poison message" in r.getMessage()]
    if installed:
        assert dead == [("max_deliveries", queue, "reaper", MAX_DELIVERIES)]
        assert _counted(reason) == before and warnings == []
    else:
        assert dead == []
        assert _counted(reason) == before + 1
        assert len(warnings) == 1 and f"1 poison message(s)" in warnings[0] and repr(queue) in warnings[0]


def _recovery_pass(connection) -> None:
    transport = connection.transport
    transport.listener()  # maintain() runs for a connection that listens or consumes
    transport.maintain()


def test_purge(connection, dlq_installed, pg_conn, schema, caplog):
    queue = kombu.Queue("cap_purge", routing_key="cap_purge")
    _poison(connection, queue)
    before = _counted("purged")
    with caplog.at_level(logging.WARNING):
        assert queue(connection.default_channel).purge() == (1 if dlq_installed else 2)
    _check(pg_conn, schema, caplog, "cap_purge", "purged", dlq_installed, before)


def test_queue_delete(connection, dlq_installed, pg_conn, schema, caplog):
    queue = kombu.Queue("cap_delete", routing_key="cap_delete")
    _poison(connection, queue)
    before = _counted("queue_deleted")
    with caplog.at_level(logging.WARNING):
        queue(connection.default_channel).delete()
    assert _count(pg_conn, schema, "queues", "name = 'cap_delete'") == 0
    _check(pg_conn, schema, caplog, "cap_delete", "queue_deleted", dlq_installed, before)


def test_message_expiry(connection, dlq_installed, pg_conn, schema, caplog):
    """Per-message expiration (Celery's ``expires=``) and x-message-ttl share the pass."""
    queue = kombu.Queue("cap_expiry", routing_key="cap_expiry")
    _poison(connection, queue, expiration=3.0)
    wait_until(lambda: _count(pg_conn, schema, "messages", "expires_at > now()") == 0, 10,
               "both messages to pass their expiry")
    before = _counted("expired")
    with caplog.at_level(logging.WARNING):
        _recovery_pass(connection)
    _check(pg_conn, schema, caplog, "cap_expiry", "expired", dlq_installed, before)


def test_x_expires(connection, dlq_installed, pg_conn, schema, caplog):
    queue = kombu.Queue("cap_x_expires", routing_key="cap_x_expires", expires=1)  # 1000 ms
    _poison(connection, queue)
    wait_until(lambda: _count(pg_conn, schema, "queues",
                              "name = 'cap_x_expires' AND last_used_at < now() - interval '1 second'") == 1,
               10, "the queue to be unused for its x-expires")
    before = _counted("queue_deleted")
    with caplog.at_level(logging.WARNING):
        _recovery_pass(connection)
    assert _count(pg_conn, schema, "queues", "name = 'cap_x_expires'") == 0
    _check(pg_conn, schema, caplog, "cap_x_expires", "queue_deleted", dlq_installed, before)


def test_a_recovery_pass_reaps_poison_when_celery_dlq_is_installed(connection, dlq_installed, pg_conn, schema):
    """Poison need not wait for beat or a worker restart to run the reaper: with celery_dlq
    installed every recovery pass moves it (the reaper's statement); without, it stays."""
    _poison(connection, kombu.Queue("stuck"))
    report = connection.default_channel.connection._maintenance_store().recover([])
    assert report.ran and not report.failed
    assert report.reaped == (1 if dlq_installed else 0)
    assert _count(pg_conn, schema, "dlq") == report.reaped
    assert _count(pg_conn, schema, "messages", "delivery_count >= %s", (MAX_DELIVERIES,)) == 1 - report.reaped
