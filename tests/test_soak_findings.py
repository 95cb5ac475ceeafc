"""Bugs the chaos soak (tests/test_soak.py) found, each reduced to a minimal reproduction
and kept as a regression test once fixed.
"""

from __future__ import annotations

import uuid

from celery import Celery
from psycopg import sql

from kombu_pg.jobs import Outcome, enqueue

from .chaos_util import terminate
from .test_chaos_worker import with_app_name


def test_enqueue_reports_the_outcome_of_a_publish_retried_after_its_session_ended(pg_conn, pg_url, schema):
    """enqueue read the outcome from the channel it held before the publish, so a publish
    retried on a revived channel raised AttributeError although the message was stored."""
    name = f"soak_finding_{uuid.uuid4().hex[:8]}"
    app = Celery("finding", broker=with_app_name(pg_url, name), set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    try:
        assert enqueue(app.signature("t", (1,)), "first", app=app).outcome is Outcome.ENQUEUED
        sessions = [r[0] for r in pg_conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))]
        assert terminate(pg_conn, sessions) >= 1
        try:
            result = enqueue(app.signature("t", (2,)), "second", app=app)  # Celery's default publish retry
        finally:
            # Stored either way: the retried publish committed.
            assert pg_conn.execute(sql.SQL("SELECT job_key FROM {}.messages ORDER BY id").format(
                sql.Identifier(schema))).fetchall() == [("first",), ("second",)]
        assert result.outcome is Outcome.ENQUEUED
    finally:
        app.close()
