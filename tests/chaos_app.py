"""The Celery app the chaos tests run in real ``celery worker`` subprocesses.

Configured from the environment so each test can pick its failure settings:

- ``KOMBU_PG_URL`` / ``KOMBU_PG_SCHEMA``: the broker (may be an embedded server that the
  test restarts);
- ``CHAOS_LOG_URL`` / ``CHAOS_LOG_SCHEMA``: where tasks record what they did (defaults:
  the broker's), in ``<schema>.task_log``; gates tasks wait on are rows of
  ``<schema>.gates``;
- ``RECOVERY_INTERVAL``, ``VISIBILITY_TIMEOUT``, ``MAX_DELIVERIES``: kombu-pg options, left
  at their defaults when unset;
- ``PREFETCH_MULTIPLIER`` (default 4), ``TASK_QUEUE`` (default ``celery``);
- ``CHAOS_RESULTS``: when set, kombu-pg is also the result backend (same URL and schema).

The tables are made by :func:`chaos_util.create_log_tables`.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
from celery import Celery
from psycopg import sql

import kombu_pg  # noqa: F401

URL = os.environ["KOMBU_PG_URL"]
SCHEMA = os.environ["KOMBU_PG_SCHEMA"]
LOG_URL = os.environ.get("CHAOS_LOG_URL") or URL
LOG_SCHEMA = os.environ.get("CHAOS_LOG_SCHEMA") or SCHEMA

options: dict = {"schema": SCHEMA}
if os.environ.get("RECOVERY_INTERVAL"):
    options["recovery_interval"] = float(os.environ["RECOVERY_INTERVAL"])
if os.environ.get("VISIBILITY_TIMEOUT"):
    options["visibility_timeout"] = float(os.environ["VISIBILITY_TIMEOUT"])
if os.environ.get("MAX_DELIVERIES"):
    options["max_deliveries"] = int(os.environ["MAX_DELIVERIES"])
if os.environ.get("DURABLE_ACKS"):
    options["durable_acks"] = True

app = Celery("chaos_app", broker=URL, backend=URL if os.environ.get("CHAOS_RESULTS") else None)
app.conf.result_backend_transport_options = {"schema": SCHEMA}
app.conf.broker_transport_options = options
app.conf.worker_prefetch_multiplier = int(os.environ.get("PREFETCH_MULTIPLIER", "4"))
app.conf.task_default_queue = os.environ.get("TASK_QUEUE", "celery")
# Explicit: a connection loss must not cancel running tasks (their late acks are what the
# fencing tests look at).
app.conf.worker_cancel_long_running_tasks_on_connection_loss = False
app.conf.broker_connection_retry_on_startup = True

_log_conn: psycopg.Connection | None = None


def _connection() -> psycopg.Connection:
    """One log connection per process (reopened after a fork or a failure)."""
    global _log_conn
    if _log_conn is None or _log_conn.closed or getattr(_log_conn, "_chaos_pid", None) != os.getpid():
        # Its own application_name: tests terminate the worker's broker sessions by name.
        _log_conn = psycopg.connect(LOG_URL, autocommit=True, application_name="chaos_log")
        _log_conn._chaos_pid = os.getpid()  # type: ignore[attr-defined]
    return _log_conn


def _run(query: sql.Composable, params: tuple = ()):
    """Run one statement on the log database, retrying for up to 30 s on connection loss."""
    global _log_conn
    deadline = time.monotonic() + 30
    while True:
        try:
            return _connection().execute(query, params)
        except psycopg.OperationalError:
            _log_conn = None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def log(task, phase: str, arg) -> None:
    request = task.request
    delivery_info = request.delivery_info or {}
    _run(
        sql.SQL(
            "INSERT INTO {}.task_log (task, phase, arg, task_id, hostname, pid, redelivered, at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(sql.Identifier(LOG_SCHEMA)),
        (task.name.rsplit(".", 1)[-1], phase, str(arg), request.id, request.hostname,
         os.getpid(), bool(delivery_info.get("redelivered")), time.time()),
    )


def wait_for_gate(name: str, timeout: float) -> bool:
    """The task's own workload: block until the test opens gate ``name`` (or timeout)."""
    query = sql.SQL("SELECT 1 FROM {}.gates WHERE name = %s").format(sql.Identifier(LOG_SCHEMA))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _run(query, (name,)).fetchone():
            return True
        time.sleep(0.05)
    return False


@app.task(bind=True)
def record(self, arg):
    """Early ack (Celery's default): acked when it starts."""
    log(self, "run", arg)
    return arg


@app.task(bind=True, acks_late=True)
def record_late(self, arg):
    log(self, "run", arg)
    return arg


def _block(task, arg, timeout):
    log(task, "start", arg)
    if not (task.request.delivery_info or {}).get("redelivered"):
        # First delivery only: a redelivered copy runs straight through.
        wait_for_gate(str(arg), timeout)
    log(task, "end", arg)


@app.task(bind=True)
def block(self, arg, timeout=120.0):
    """Early ack, blocks until its gate opens on its first delivery."""
    _block(self, arg, timeout)


@app.task(bind=True, acks_late=True)
def block_late(self, arg, timeout=120.0):
    """Late ack, blocks until its gate opens on its first delivery."""
    _block(self, arg, timeout)


@app.task(bind=True, acks_late=True)
def hold_late(self, arg, timeout=120.0):
    """Late ack; every delivery blocks on its own gate, "<arg>:first" or "<arg>:redelivered"."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    log(self, "start", arg)
    wait_for_gate(f"{arg}:{'redelivered' if redelivered else 'first'}", timeout)
    log(self, "end", arg)


@app.task(bind=True, acks_late=True)
def die(self, arg):
    """A poison message: takes the whole worker down (main process) every time it runs."""
    log(self, "start", arg)
    main = os.getpid() if os.environ.get("CHAOS_POOL", "threads") in ("threads", "solo") else os.getppid()
    os.kill(main, signal.SIGKILL)
    time.sleep(60)  # not reached: SIGKILL is immediate
