"""The Celery app the DLQ tests run in real ``celery worker`` subprocesses.

``make_app(url, schema, **conf)`` builds it (the tests build a client copy in-process);
the module-level ``app`` reads KOMBU_PG_URL / DLQ_SCHEMA / DLQ_CONF (JSON) from the
environment.  Tasks record every run in ``<schema>.runs`` so tests can check them in SQL.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

import psycopg
from celery import Celery
from celery.exceptions import Reject
from psycopg import sql

import celery_dlq
import kombu_pg  # noqa: F401
from celery_dlq import NonRetryable, retry_policy

logger = logging.getLogger("dlq_app")


class PermanentError(NonRetryable):
    """Retrying cannot help (a NonRetryable subclass)."""


class ConfiguredPermanent(Exception):
    """Listed in dlq_non_retryable_exceptions."""


class Flaky(Exception):
    """Retryable."""


RUNS_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.runs (
    task text NOT NULL, task_id text, retries integer, pid integer,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS {schema}.switches (name text PRIMARY KEY, failing boolean NOT NULL);
"""


def make_app(url: str, schema: str, **conf) -> Celery:
    app = Celery("dlq_app", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"schema": schema, "recovery_interval": 0.5, "polling_interval": 0.5,
                                  "max_deliveries": 2},
        result_backend_transport_options={"schema": schema},
        result_extended=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=True,
        dlq_non_retryable_exceptions=[ConfiguredPermanent],
        dlq_write_timeout=1.0,
        dlq_backstop_grace=1.0,
        beat_schedule_filename=os.environ.get("DLQ_BEAT_FILE", "/tmp/dlq-beat-schedule"),
    )
    app.conf.update(conf)
    celery_dlq.install(app)

    def record(task) -> None:
        # Bookkeeping only.  On the shared test server a new connection can be refused
        # ("too many clients"); raised from the task body, that error replaced the failure
        # the test is about (a poison task then failed instead of killing its child; a
        # permanent one went through autoretry, whose retry could not be published either,
        # and Celery recorded Reject).  The task goes on to fail its own way; the missing
        # ``runs`` row is what a run-count assertion then reports, with this log line.
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("INSERT INTO {}.runs (task, task_id, retries, pid) VALUES (%s, %s, %s, %s)")
                    .format(sql.Identifier(schema)),
                    (task.name, task.request.id, task.request.retries, os.getpid()))
        except psycopg.OperationalError as exc:
            logger.error("dlq_app: run of %s[%s] NOT RECORDED: %s", task.name, task.request.id, exc)

    def failing(name: str) -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                sql.SQL("SELECT failing FROM {}.switches WHERE name = %s").format(sql.Identifier(schema)),
                (name,)).fetchone()
        return bool(row and row[0])

    @app.task(bind=True, shared=False, name="dlq_app.permanent", autoretry_for=(Exception,), max_retries=3,
              default_retry_delay=0)
    def permanent(self, x):
        record(self)
        raise PermanentError(f"cannot process {x} (temporary network glitch)")

    @app.task(bind=True, shared=False, name="dlq_app.configured", autoretry_for=(Exception,), max_retries=3,
              default_retry_delay=0)
    def configured(self, x):
        record(self)
        raise ConfiguredPermanent(f"bad input {x}")

    @app.task(bind=True, shared=False, name="dlq_app.flaky", autoretry_for=(Flaky,),
              **retry_policy("fast", jitter=False))
    def flaky(self, x):
        record(self)
        raise Flaky(f"still down ({x})")

    @app.task(bind=True, shared=False, name="dlq_app.manual", max_retries=1)
    def manual(self, x):
        record(self)
        raise self.retry(countdown=0)

    @app.task(bind=True, shared=False, name="dlq_app.manual_policy", **retry_policy("fast", jitter=False))
    def manual_policy(self, x):
        """Calls self.retry() itself: the preset's backoff applies, not default_retry_delay."""
        record(self)
        raise self.retry(exc=Flaky(f"still down ({x})"))

    @app.task(bind=True, shared=False, name="dlq_app.rejecting", acks_late=True)
    def rejecting(self, x):
        record(self)
        raise Reject(f"malformed {x}", requeue=False)

    @app.task(bind=True, shared=False, name="dlq_app.dies")
    def dies(self, x):
        record(self)
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task(bind=True, shared=False, name="dlq_app.poison", acks_late=True, reject_on_worker_lost=True)
    def poison(self, x):
        record(self)
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task(bind=True, shared=False, name="dlq_app.switchable")
    def switchable(self, x):
        record(self)
        if failing("switchable"):
            raise PermanentError(f"switch is on ({x})")
        return x

    @app.task(bind=True, shared=False, name="dlq_app.hangs", time_limit=1)
    def hangs(self, x):
        record(self)
        threading.Event().wait(30)  # killed by the hard time limit

    @app.task(bind=True, shared=False, name="dlq_app.slow_ok", acks_late=True)
    def slow_ok(self, x):
        record(self)
        threading.Event().wait(float(x))
        return x

    @app.task(bind=True, shared=False, name="dlq_app.ok")
    def ok(self, x):
        record(self)
        return x

    return app


def setup_schema(url: str, schema: str) -> None:
    from kombu_pg.store import apply_migrations

    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn, schema)
        conn.execute(sql.SQL(RUNS_DDL).format(schema=sql.Identifier(schema)))


if os.environ.get("DLQ_SCHEMA"):
    app = make_app(os.environ["KOMBU_PG_URL"], os.environ["DLQ_SCHEMA"],
                   **json.loads(os.environ.get("DLQ_CONF") or "{}"))
