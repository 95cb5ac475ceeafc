"""Bugs the chaos soak (tests/test_soak.py) found, each reduced to a minimal reproduction.

Marked ``xfail(strict=True)`` until fixed: the fix makes them pass, and strict turns
that into a failure that says to remove the mark.
"""

from __future__ import annotations

import uuid

import pytest
from celery import Celery
from psycopg import sql

from kombu_pg.jobs import Outcome, enqueue

from .chaos_util import terminate
from .test_chaos_worker import with_app_name


@pytest.mark.xfail(strict=True, raises=AttributeError, reason=(
    "kombu_pg.jobs.enqueue reads the outcome from the channel it held before the publish; a "
    "publish retried after a lost session (Celery retries by default) commits on a revived "
    "channel, so enqueue raises AttributeError ('NoneType' object has no attribute 'outcome') "
    "although the message is stored"))
def test_enqueue_reports_the_outcome_of_a_publish_retried_after_its_session_ended(pg_conn, pg_url, schema):
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
