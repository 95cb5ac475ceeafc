"""A3 with real ``celery worker`` processes: capture runs at worker start, before
``--purge`` (a cleanup that deletes messages) and before consuming."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import sql

from kombu_pg.store import BrokerStore

from .dlq_app import make_app, setup_schema
from .worker import CeleryWorker

pytestmark = pytest.mark.slow


def count(conn, schema, table, where="true"):
    return conn.execute(sql.SQL("SELECT count(*) FROM {}.{} WHERE " + where)
                        .format(sql.Identifier(schema), sql.Identifier(table))).fetchone()[0]


def publish_exhausted(pg_url, schema, n_unlocked, n_held_by_dead_worker):
    """Messages past max_deliveries=2: unlocked ones, and ones a dead worker still holds."""
    client = make_app(pg_url, schema)
    for i in range(n_unlocked + n_held_by_dead_worker):
        client.send_task("dlq_app.ok", (i,))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {}.messages SET delivery_count = 2").format(sql.Identifier(schema)))
    if n_held_by_dead_worker:
        dead = psycopg.connect(pg_url, autocommit=True)
        store = BrokerStore(dead, schema)
        claimed = store.claim("celery", n_held_by_dead_worker, store.register_consumer())
        assert len(claimed) == n_held_by_dead_worker
        dead.close()  # the worker "died": its session and liveness lock are gone
    client._celery_dlq.close()


def start(pg_url, schema, tmp_path, conf):
    return CeleryWorker(
        "dlq_app",
        {"KOMBU_PG_URL": pg_url, "DLQ_SCHEMA": schema, "DLQ_CONF": json.dumps(conf),
         "DLQ_BEAT_FILE": str(tmp_path / "beat")},
        pool="solo", concurrency=1, args=["--purge", "-Q", "celery"],
    )


def test_exhausted_messages_are_captured_before_purge_at_worker_start(pg_url, schema, tmp_path):
    setup_schema(pg_url, schema)
    publish_exhausted(pg_url, schema, 250, 10)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert count(conn, schema, "messages") == 260
        with start(pg_url, schema, tmp_path, {}) as worker:
            worker.wait_ready()
            worker.wait_for_line("start-up capture: 260 exhausted message(s) moved")
        # All of them, not one batch: 250 unlocked plus 10 a dead worker still held.
        assert count(conn, schema, "dlq", "reason = 'max_deliveries'") == 260
        assert count(conn, schema, "messages") == 0
        assert count(conn, schema, "runs") == 0  # none was run (or purged) first


def test_with_the_dlq_disabled_the_worker_warns_that_messages_cannot_be_recovered(pg_url, schema, tmp_path):
    setup_schema(pg_url, schema)
    publish_exhausted(pg_url, schema, 3, 0)
    with start(pg_url, schema, tmp_path, {"dlq_enabled": False}) as worker:
        worker.wait_ready()
        worker.wait_for_line("cannot be recovered")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert count(conn, schema, "dlq") == 0


def test_a_misspelt_setting_stops_the_worker(pg_url, schema, tmp_path):
    """Celery swallows signal-handler errors; the DLQ refuses to run silently misconfigured."""
    setup_schema(pg_url, schema)
    worker = start(pg_url, schema, tmp_path, {"dlq_max_delivries": 3})
    try:
        assert worker.proc.wait(60) != 0
    finally:
        worker.stop()  # also drains its output
    assert "unknown celery_dlq setting(s) dlq_max_delivries" in "".join(worker.lines)
    assert not worker.ready.is_set()
